"""Tests of the CIFAR-10 binary data path: file discovery, record parsing, input_fn, download.

The data are real Fashion-MNIST images written by prepare_fashion_mnist.py from the Debian
package dataset-fashion-mnist; the expected pixels are computed here from the source files
with numpy alone.
"""

import functools
import gzip
import http.server
import os
import shutil
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
import run_helpers
import tensorflow.compat.v1 as tf

import cifar10_download_and_extract
import cifar10_main
import prepare_fashion_mnist

NUM_TRAIN = 103  # 21/21/21/20/20 records over the five training files
NUM_TEST = 37


def _source(split, limit):
  """Fashion-MNIST read straight from the idx files: uint8 [limit, 28, 28], uint8 [limit]."""
  folder = run_helpers.require_fashion_mnist()
  images_name, labels_name, _ = prepare_fashion_mnist.SOURCES[split]
  with gzip.open(os.path.join(folder, images_name)) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
  with gzip.open(os.path.join(folder, labels_name)) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  return images[:limit], labels[:limit]


def _as_cifar_pixels(images):
  """uint8 [N, 28, 28] -> float64 [N, 32, 32, 3]: zero border of 2, grey in all channels."""
  padded = np.pad(images, [(0, 0), (2, 2), (2, 2)]).astype(np.float64)
  return np.repeat(padded[..., None], 3, axis=-1)


def _standardise(images):
  """Per-image standardisation as documented for tf.image.per_image_standardization."""
  axes = tuple(range(1, images.ndim))
  mean = images.mean(axis=axes, keepdims=True)
  std = images.std(axis=axes, keepdims=True)
  floor = 1.0 / np.sqrt(np.prod(images.shape[1:]))
  return (images - mean) / np.maximum(std, floor)


def _collect(make_dataset, max_batches=None):
  """Runs a dataset built by `make_dataset()` in a graph; returns its batches as numpy."""
  with tf.Graph().as_default():
    next_batch = tf.data.make_one_shot_iterator(make_dataset()).get_next()
    batches = []
    with tf.Session() as sess:
      while max_batches is None or len(batches) < max_batches:
        try:
          batches.append(sess.run(next_batch))
        except tf.errors.OutOfRangeError:
          break
  return batches


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  folder = run_helpers.require_fashion_mnist()
  out = str(tmp_path_factory.mktemp('fashion_cifar'))
  prepare_fashion_mnist.prepare(out, fashion_mnist_dir=folder, train_limit=NUM_TRAIN,
                                test_limit=NUM_TEST, allow_install=False)
  return out


def _write_random_batch(path, num_records, rng):
  records = rng.integers(0, 256, size=[num_records, cifar10_main.RECORD_BYTES], dtype=np.uint8)
  records[:, 0] %= cifar10_main.NUM_CLASSES
  records.tofile(path)
  return records


###############################################################################
# Files and counts
###############################################################################
def test_count_records_sums_files_of_unequal_length(tmp_path):
  batches = tmp_path / cifar10_main.BATCHES_DIR
  batches.mkdir()
  rng = np.random.default_rng(0)
  for name, count in [('data_batch_1.bin', 3), ('data_batch_2.bin', 5),
                      ('data_batch_10.bin', 1), ('test_batch.bin', 2)]:
    _write_random_batch(str(batches / name), count, rng)
  (batches / 'batches.meta.txt').write_text('a\n')

  for data_dir in (str(tmp_path), str(batches)):  # the parent folder or the folder itself
    assert cifar10_main.count_records(data_dir, 'train') == 9
    assert cifar10_main.count_records(data_dir, 'validation') == 2
    names = [os.path.basename(p) for p in cifar10_main.get_filenames('train', data_dir)]
    assert names == ['data_batch_1.bin', 'data_batch_2.bin', 'data_batch_10.bin']

  # The training pipeline yields every record of every file once per epoch.
  batches_out = _collect(lambda: cifar10_main.input_fn(True, str(tmp_path), batch_size=4))
  assert [len(labels) for _, labels in batches_out] == [4, 4, 1]


def test_real_cifar_sizes_are_the_defaults():
  assert cifar10_main.RECORD_BYTES == 1 + 32 * 32 * 3
  assert cifar10_main.NUM_IMAGES == {'train': 50000, 'validation': 10000}
  assert cifar10_download_and_extract.BATCHES_DIR == cifar10_main.BATCHES_DIR


def test_missing_folder_is_one_clear_error(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError) as info:
    cifar10_main.input_fn(False, missing, batch_size=8)
  message = str(info.value)
  assert missing in message
  assert 'cifar10_download_and_extract.py' in message
  assert 'prepare_fashion_mnist.py' in message


def test_missing_validation_file_is_named(tmp_path):
  batches = tmp_path / cifar10_main.BATCHES_DIR
  batches.mkdir()
  _write_random_batch(str(batches / 'data_batch_1.bin'), 2, np.random.default_rng(1))
  with pytest.raises(FileNotFoundError, match='test_batch.bin'):
    cifar10_main.input_fn(False, str(tmp_path), batch_size=8)
  (batches / 'data_batch_1.bin').unlink()
  (batches / 'test_batch.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match=r'data_batch_\*\.bin'):
    cifar10_main.get_filenames('train', str(tmp_path))


@pytest.mark.parametrize('name', ['test_batch.bin', 'data_batch_3.bin'])
def test_truncated_batch_file_is_one_clear_error(data_dir, tmp_path, name):
  copy = tmp_path / cifar10_main.BATCHES_DIR
  shutil.copytree(os.path.join(data_dir, cifar10_main.BATCHES_DIR), copy)
  path = copy / name
  size = path.stat().st_size - 5  # an interrupted copy
  with open(path, 'r+b') as f:
    f.truncate(size)
  with pytest.raises(ValueError) as info:
    cifar10_main.input_fn(name.startswith('data'), str(tmp_path), batch_size=8)
  assert str(path) in str(info.value)
  assert f'{size} bytes' in str(info.value)


def test_bad_arguments(data_dir):
  with pytest.raises(ValueError, match='split'):
    cifar10_main.get_filenames('test', data_dir)
  with pytest.raises(ValueError, match='batch_size'):
    cifar10_main.input_fn(False, data_dir, batch_size=0)


###############################################################################
# Records
###############################################################################
def test_decode_record_restores_source_pixels_and_label(data_dir):
  images, labels = _source('test', NUM_TEST)
  path = cifar10_main.get_filenames('validation', data_dir)[0]
  raw = np.fromfile(path, np.uint8).reshape(NUM_TEST, cifar10_main.RECORD_BYTES)
  index = 11
  with tf.Graph().as_default():
    image, label = cifar10_main.decode_record(tf.constant(raw[index].tobytes()))
    with tf.Session() as sess:
      image, label = sess.run([image, label])
  assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
  np.testing.assert_array_equal(image, _as_cifar_pixels(images[index:index + 1])[0])
  assert label == labels[index]


def test_decode_record_reads_channel_major_planes():
  # Grey Fashion-MNIST has equal planes, so colour layout needs a record of its own:
  # red rises along rows, green along columns, blue is constant.
  rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
  planes = np.stack([rows * 8, cols * 8, np.full_like(rows, 200)]).astype(np.uint8)
  record = bytes([7]) + planes.tobytes()  # label, then all R, all G, all B
  with tf.Graph().as_default():
    image, label = cifar10_main.decode_record(tf.constant(record))
    with tf.Session() as sess:
      image, label = sess.run([image, label])
  assert label == 7
  np.testing.assert_array_equal(image[:, :, 0], rows * 8)
  np.testing.assert_array_equal(image[:, :, 1], cols * 8)
  assert (image[:, :, 2] == 200).all()


def test_eval_input_reads_every_image_once_in_order(data_dir):
  images, labels = _source('test', NUM_TEST)
  # drop_remainder is ignored in evaluation: the last 7 images still come out.
  batches = _collect(lambda: cifar10_main.input_fn(
      False, data_dir, batch_size=10, num_epochs=3, drop_remainder=True))
  assert [len(b_labels) for _, b_labels in batches] == [10, 10, 10, 7]
  got_images = np.concatenate([b_images for b_images, _ in batches])
  got_labels = np.concatenate([b_labels for _, b_labels in batches])
  assert got_images.dtype == np.float32 and got_labels.dtype == np.int32
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_allclose(got_images, _standardise(_as_cifar_pixels(images)), atol=1e-4)


def test_eval_input_shards_without_overlap(data_dir):
  _, labels = _source('test', NUM_TEST)
  shards = []
  for pipeline_id in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id)
    batches = _collect(functools.partial(
        cifar10_main.input_fn, False, data_dir, batch_size=64, input_context=context,
        datasets_num_private_threads=1))
    shards.append(np.concatenate([b_labels for _, b_labels in batches]))
  assert [len(s) for s in shards] == [19, 18]
  np.testing.assert_array_equal(shards[0], labels[0::2])
  np.testing.assert_array_equal(shards[1], labels[1::2])


def test_train_input_shapes_standardisation_and_epochs(data_dir):
  _, labels = _source('train', NUM_TRAIN)
  batches = _collect(lambda: cifar10_main.input_fn(True, data_dir, batch_size=32, num_epochs=2))
  assert [len(b_labels) for _, b_labels in batches] == [32] * 6 + [14]  # 2 x 103 = 206
  images = np.concatenate([b_images for b_images, _ in batches])
  got_labels = np.concatenate([b_labels for _, b_labels in batches])
  assert images.shape == (206, 32, 32, 3) and images.dtype == np.float32
  flat = images.reshape(len(images), -1)
  np.testing.assert_allclose(flat.mean(axis=1), 0, atol=1e-4)
  np.testing.assert_allclose(flat.std(axis=1), 1, atol=1e-3)
  # Shuffled, but each epoch holds each image once.
  np.testing.assert_array_equal(np.sort(got_labels[:NUM_TRAIN]), np.sort(labels))
  np.testing.assert_array_equal(np.sort(got_labels[NUM_TRAIN:]), np.sort(labels))
  assert not np.array_equal(got_labels[:NUM_TRAIN], labels)

  full = _collect(lambda: cifar10_main.input_fn(
      True, data_dir, batch_size=32, num_epochs=2, drop_remainder=True,
      dtype=tf.float16))
  assert [b_images.shape for b_images, _ in full] == [(32, 32, 32, 3)] * 6
  assert full[0][0].dtype == np.float16


def test_training_augmentation_is_pad_crop_flip(data_dir):
  images, _ = _source('train', 1)
  source = _as_cifar_pixels(images)[0]  # [32, 32, 3]
  padded = np.pad(source, [(4, 4), (4, 4), (0, 0)])
  candidates = {}
  for dy in range(9):
    for dx in range(9):
      crop = padded[dy:dy + 32, dx:dx + 32]
      candidates[(dy, dx, False)] = crop
      candidates[(dy, dx, True)] = crop[:, ::-1]
  keys = list(candidates)
  stacked = _standardise(np.stack([candidates[k] for k in keys]))

  with tf.Graph().as_default():
    augmented = cifar10_main.preprocess_image(tf.constant(source, tf.float32), is_training=True)
    with tf.Session() as sess:
      draws = [sess.run(augmented) for _ in range(40)]
  seen = set()
  for draw in draws:
    errors = np.abs(stacked - draw).reshape(len(keys), -1).max(axis=1)
    assert errors.min() < 1e-4, 'not a standardised 32x32 crop of the padded, flipped image'
    matches = [keys[i] for i in np.flatnonzero(errors < 1e-4)]
    seen.add(matches[0])
  assert len(seen) > 10  # random positions ...
  assert {flip for _, _, flip in seen} == {False, True}  # ... and flips
  unchanged = _standardise(source[None])[0]
  assert any(np.abs(draw - unchanged).max() > 0.1 for draw in draws)


###############################################################################
# Download and extraction
###############################################################################
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture
def local_server(tmp_path):
  """An HTTP server on the loopback interface serving tmp_path/served/; yields its base URL."""
  served = tmp_path / 'served'
  served.mkdir()
  handler = functools.partial(_QuietHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{server.server_address[1]}/', served
  server.shutdown()
  server.server_close()


def _cifar_tarball(data_dir, path, drop=()):
  """A cifar-10-binary.tar.gz made of the batches in data_dir, less the names in `drop`."""
  batches = os.path.join(data_dir, cifar10_main.BATCHES_DIR)
  with tarfile.open(path, 'w:gz') as tar:
    for name in sorted(os.listdir(batches)):
      if name not in drop:
        tar.add(os.path.join(batches, name), arcname=f'{cifar10_main.BATCHES_DIR}/{name}')


def test_download_without_network_fails_clearly_and_leaves_nothing(tmp_path):
  target = tmp_path / 'cifar'
  with pytest.raises(cifar10_download_and_extract.DownloadError) as info:
    cifar10_download_and_extract.download_and_extract(
        str(target), url='http://127.0.0.1:1/cifar-10-binary.tar.gz', timeout=2)
  message = str(info.value)
  assert 'http://127.0.0.1:1/cifar-10-binary.tar.gz' in message
  assert 'no internet access' in message
  assert str(target / 'cifar-10-binary.tar.gz') in message  # where to put a manual download
  assert 'prepare_fashion_mnist.py' in message
  assert os.listdir(target) == []


def test_download_http_error_leaves_nothing(tmp_path, local_server):
  base_url, _ = local_server
  target = tmp_path / 'cifar'
  with pytest.raises(cifar10_download_and_extract.DownloadError, match='HTTP 404'):
    cifar10_download_and_extract.download_and_extract(
        str(target), url=base_url + 'cifar-10-binary.tar.gz', timeout=5)
  assert os.listdir(target) == []


def test_download_and_extract_then_read(data_dir, tmp_path, local_server):
  base_url, served = local_server
  _cifar_tarball(data_dir, str(served / 'cifar-10-binary.tar.gz'))
  target = str(tmp_path / 'cifar')
  batches = cifar10_download_and_extract.download_and_extract(
      target, url=base_url + 'cifar-10-binary.tar.gz', timeout=5)
  assert batches == os.path.join(target, cifar10_main.BATCHES_DIR)
  assert sorted(os.listdir(target)) == [cifar10_main.BATCHES_DIR, 'cifar-10-binary.tar.gz']
  assert cifar10_main.count_records(target, 'train') == NUM_TRAIN
  assert cifar10_main.count_records(target, 'validation') == NUM_TEST
  # Done already: no server needed the second time.
  cifar10_download_and_extract.download_and_extract(
      target, url='http://127.0.0.1:1/cifar-10-binary.tar.gz', timeout=1)


def test_tarball_put_by_hand_is_extracted_without_network(data_dir, tmp_path):
  target = tmp_path / 'cifar'
  target.mkdir()
  _cifar_tarball(data_dir, str(target / 'cifar-10-binary.tar.gz'))
  cifar10_download_and_extract.download_and_extract(
      str(target), url='http://127.0.0.1:1/cifar-10-binary.tar.gz', timeout=1)
  assert cifar10_main.count_records(str(target), 'validation') == NUM_TEST


def test_incomplete_or_corrupt_tarball_is_refused(data_dir, tmp_path):
  target = tmp_path / 'cifar'
  target.mkdir()
  tarball = target / 'cifar-10-binary.tar.gz'
  _cifar_tarball(data_dir, str(tarball), drop=('data_batch_4.bin',))
  with pytest.raises(ValueError, match='data_batch_4.bin'):
    cifar10_download_and_extract.download_and_extract(str(target), timeout=1)
  assert os.listdir(target) == ['cifar-10-binary.tar.gz']  # no half-extracted folder

  _cifar_tarball(data_dir, str(tarball))
  with open(tarball, 'r+b') as f:
    f.truncate(5000)  # an interrupted copy
  with pytest.raises(ValueError, match='Delete it'):
    cifar10_download_and_extract.download_and_extract(str(target), timeout=1)
  assert os.listdir(target) == ['cifar-10-binary.tar.gz']


def test_command_line_reports_one_clear_error(tmp_path):
  (tmp_path / 'cifar-10-binary.tar.gz').write_bytes(b'not a tarball')
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'cifar10_download_and_extract.py')
  result = subprocess.run([sys.executable, script, f'--data_dir={tmp_path}'],
                          capture_output=True, text=True, check=False, timeout=60)
  assert result.returncode == 1
  assert 'error: ' in result.stderr and 'Delete it and run this script again' in result.stderr
  assert 'Traceback' not in result.stderr
  assert os.listdir(tmp_path) == ['cifar-10-binary.tar.gz']
