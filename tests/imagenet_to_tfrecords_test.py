"""Tests of Imagenet_tools/imagenet_to_tfrecords.py on miniature ILSVRC2012 downloads."""

import collections
import contextlib
import gzip
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import imagenet_fixtures
import numpy as np
import psutil
import pytest
from PIL import Image

from Imagenet_tools import imagenet_to_tfrecords as converter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SHARDS, VALIDATION_SHARDS = 3, 2


@pytest.fixture(scope='module')
def mini(tmp_path_factory):
  return imagenet_fixtures.make_miniature_imagenet(str(tmp_path_factory.mktemp('imagenet')))


@pytest.fixture(scope='module')
def converted(mini, tmp_path_factory):
  output_dir = str(tmp_path_factory.mktemp('tf_records'))
  summaries = imagenet_fixtures.convert_miniature(mini, output_dir, train_shards=TRAIN_SHARDS,
                                                  validation_shards=VALIDATION_SHARDS)
  records = {split: imagenet_fixtures.read_examples(summaries[split].shard_paths)
             for split in converter.SPLITS}
  return output_dir, summaries, records


def _listing(directory):
  return sorted(n for n in os.listdir(directory) if n != converter.MANIFEST_NAME)


def test_shards_hold_every_image_exactly_once(mini, converted):
  output_dir, summaries, records = converted
  assert _listing(os.path.join(output_dir, 'train')) == [
      f'train-{k:05d}-of-00003' for k in range(3)]
  assert _listing(os.path.join(output_dir, 'validation')) == [
      'validation-00000-of-00002', 'validation-00001-of-00002']
  for split, expected in (('train', mini.train), ('validation', mini.validation)):
    names = collections.Counter(r['filename'] for r in records[split])
    assert names == collections.Counter(expected.keys())
    assert summaries[split].num_images == summaries[split].num_written == len(expected)
    assert summaries[split].skipped == []
  # Shard sizes differ by at most one image.
  sizes = [len(imagenet_fixtures.read_examples([p], decode=False))
           for p in summaries['train'].shard_paths]
  assert sum(sizes) == len(mini.train) and max(sizes) - min(sizes) <= 1


def test_labels_synsets_and_texts_follow_the_sorted_class_list(mini, converted):
  _, _, records = converted
  assert len(mini.class_synsets) == 1000
  for split, expected in (('train', mini.train), ('validation', mini.validation)):
    for r in records[split]:
      image = expected[r['filename']]
      assert r['class/synset'] == image.synset
      assert r['class/label'] == image.label == 1 + mini.class_synsets.index(image.synset)
      assert r['class/text'] == mini.class_texts[image.synset]
  # The photo of a cat carries the 1001-way checkpoint's label of "Egyptian cat".
  cat = [r for r in records['validation'] if r['class/synset'] == 'n02124075']
  assert cat and all(r['class/label'] == 286 and r['class/text'] == 'Egyptian cat' for r in cat)


def test_every_record_decodes_with_its_stated_size(mini, converted):
  _, _, records = converted
  for split, expected in (('train', mini.train), ('validation', mini.validation)):
    for r in records[split]:
      image = expected[r['filename']]
      height, width = image.shape
      assert (r['height'], r['width']) == (height, width)
      assert tuple(r['decoded_shape']) == (height, width, 3)
      assert r['format'] == 'JPEG'
      if image.kind == 'grayscale':
        assert (r['channels'], r['colorspace']) == (1, 'Grayscale')
      else:
        assert (r['channels'], r['colorspace']) == (3, 'RGB')


def test_ordinary_jpegs_are_copied_and_png_cmyk_become_rgb_jpegs(mini, converted):
  _, summaries, records = converted
  by_name = {r['filename']: r for split in records.values() for r in split}
  for name, image in list(mini.train.items()) + list(mini.validation.items()):
    if image.kind in ('jpeg', 'grayscale'):
      assert by_name[name]['encoded'] == image.data
  special = mini.files_of_kind('cmyk') + mini.files_of_kind('png')
  assert len(special) == 2
  assert summaries['train'].reencoded == sorted(special)
  for name in special:
    with Image.open(io.BytesIO(by_name[name]['encoded'])) as im:
      assert (im.format, im.mode) == ('JPEG', 'RGB')
      pixels = np.asarray(im, dtype=np.float64)
    # Colours survive (an inverted CMYK conversion would be off by ~100 levels).
    assert np.abs(pixels - mini.train[name].rgb).mean() < 8


def test_validation_sorted_and_training_shuffled(mini, converted):
  _, _, records = converted
  assert [r['filename'] for r in records['validation']] == sorted(mini.validation)
  order = [(r['class/synset'], r['filename']) for r in records['train']]
  assert order != sorted(order)
  assert len({synset for synset, _ in order[:10]}) >= 3  # the first shard mixes classes


def test_training_order_depends_on_seed_not_on_member_order(mini, converted, tmp_path):
  _, _, records = converted
  reordered = imagenet_fixtures.make_miniature_imagenet(str(tmp_path / 'reordered'),
                                                        member_order_seed=7)
  # The same images, stored in another order.
  assert {n: im.data for n, im in reordered.train.items()} == {
      n: im.data for n, im in mini.train.items()}
  with open(reordered.train_archive, 'rb') as a, open(mini.train_archive, 'rb') as b:
    assert a.read() != b.read()
  order = [r['filename'] for r in records['train']]

  def train_order(seed):
    summaries = imagenet_fixtures.convert_miniature(
        reordered, str(tmp_path / f'out{seed}'), train_shards=TRAIN_SHARDS, splits=('train',),
        shuffle_seed=seed)
    return [r['filename'] for r in imagenet_fixtures.read_examples(summaries['train'].shard_paths,
                                                                   decode=False)]

  assert train_order(0) == order
  other = train_order(1)
  assert other != order and sorted(other) == sorted(order)


def test_bounding_boxes_are_normalised(mini, converted):
  _, _, records = converted
  assert len(mini.boxes) >= 10
  for r in records['train']:
    expected = mini.boxes.get(r['filename'], ((), (), (), ()))
    for got, want in zip(r['bbox'], expected, strict=True):
      np.testing.assert_allclose(got, want, atol=1e-6)
  assert all(r['bbox'] == ([], [], [], []) for r in records['validation'])


def _stats(directory):
  return {n: (os.stat(os.path.join(directory, n)).st_ino,
              os.stat(os.path.join(directory, n)).st_mtime_ns) for n in _listing(directory)}


def test_rerun_rewrites_only_a_deleted_shard(mini, converted, tmp_path):
  output_dir = str(tmp_path / 'tf_records')
  shutil.copytree(converted[0], output_dir)
  train_dir = os.path.join(output_dir, 'train')
  before = _stats(train_dir)
  validation_before = _stats(os.path.join(output_dir, 'validation'))
  deleted = os.path.join(train_dir, 'train-00001-of-00003')
  with open(deleted, 'rb') as f:
    original = f.read()
  os.remove(deleted)
  # What a killed run leaves: a half-written shard under its temporary name.
  with open(os.path.join(output_dir, 'validation', 'validation-00001-of-00002.partial'), 'wb') as f:
    f.write(b'half')

  summaries = imagenet_fixtures.convert_miniature(mini, output_dir, train_shards=TRAIN_SHARDS,
                                                  validation_shards=VALIDATION_SHARDS)
  assert summaries['train'].shards_written == ['train-00001-of-00003']
  assert summaries['validation'].shards_written == []
  after = _stats(train_dir)
  assert {n: s for n, s in after.items() if n != 'train-00001-of-00003'} == {
      n: s for n, s in before.items() if n != 'train-00001-of-00003'}
  assert _stats(os.path.join(output_dir, 'validation')) == validation_before
  with open(deleted, 'rb') as f:
    assert f.read() == original
  assert summaries['train'].num_written == len(mini.train)


def test_truncated_image_is_an_error_or_a_counted_skip(tmp_path):
  mini = imagenet_fixtures.make_miniature_imagenet(
      str(tmp_path / 'imagenet'), train_per_class=4, validation_per_class=1, num_classes=4,
      special_files=False, truncated=1, with_boxes=False)
  bad = mini.files_of_kind('truncated')
  assert len(bad) == 1
  output_dir = str(tmp_path / 'out')
  with pytest.raises(converter.BadImageError, match=bad[0]) as error:
    imagenet_fixtures.convert_miniature(mini, output_dir, train_shards=2, validation_shards=1,
                                        splits=('train',))
  assert '--skip_bad_images' in str(error.value)
  train_dir = os.path.join(output_dir, 'train')
  names = _listing(train_dir)
  assert not [n for n in names if n.endswith('.partial')]
  assert len(names) < 2  # the shard holding the bad image was not completed

  summaries = imagenet_fixtures.convert_miniature(
      mini, output_dir, train_shards=2, validation_shards=1, splits=('train',),
      skip_bad_images=True)
  assert summaries['train'].skipped == bad
  assert summaries['train'].num_written == len(mini.train) - 1
  written = imagenet_fixtures.read_examples(summaries['train'].shard_paths)
  assert {r['filename'] for r in written} == set(mini.train) - set(bad)


def test_label_file_without_devkit_gives_the_same_labels(mini, converted, tmp_path):
  _, _, records = converted
  summaries = converter.convert(
      None, str(tmp_path / 'out'), splits=('validation',),
      validation_archive=mini.validation_archive,
      validation_labels_file=mini.validation_labels_file, validation_shards=1, num_workers=1,
      show_progress=False)
  again = imagenet_fixtures.read_examples(summaries['validation'].shard_paths, decode=False)
  assert [(r['filename'], r['class/label'], r['class/text']) for r in again] == [
      (r['filename'], r['class/label'], r['class/text']) for r in records['validation']]


def test_devkit_with_only_the_miniature_classes(tmp_path):
  mini = imagenet_fixtures.make_miniature_imagenet(
      str(tmp_path / 'imagenet'), train_per_class=2, validation_per_class=1, all_classes=False,
      special_files=False, with_boxes=False)
  summaries = imagenet_fixtures.convert_miniature(mini, str(tmp_path / 'out'), train_shards=2,
                                                  validation_shards=1)
  records = imagenet_fixtures.read_examples(
      summaries['train'].shard_paths + summaries['validation'].shard_paths, decode=False)
  expected = {**mini.train, **mini.validation}
  assert sorted({r['class/label'] for r in records}) == list(range(1, 7))
  for r in records:
    assert r['class/label'] == 1 + sorted(mini.class_synsets).index(r['class/synset'])
    assert r['class/synset'] == expected[r['filename']].synset


def test_missing_tarball_is_one_clear_error(mini, tmp_path):
  empty = str(tmp_path / 'empty')
  os.makedirs(empty)
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar'):
    converter.convert(empty, show_progress=False)
  shutil.copy(mini.train_archive, empty)
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_val.tar'):
    converter.convert(empty, show_progress=False)
  shutil.copy(mini.validation_archive, empty)
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_devkit_t12.tar.gz.*validation_labels'):
    converter.convert(empty, show_progress=False)
  assert not os.path.exists(os.path.join(empty, 'tf_records'))


def test_devkit_without_ground_truth_is_one_clear_error(tmp_path):
  mini = imagenet_fixtures.make_miniature_imagenet(
      str(tmp_path / 'imagenet'), train_per_class=2, validation_per_class=1, num_classes=2,
      special_files=False, with_boxes=False, ground_truth=False)
  with pytest.raises(ValueError, match='ILSVRC2012_validation_ground_truth.txt'):
    converter.convert(mini.imagenet_home, show_progress=False)
  assert not os.path.exists(os.path.join(mini.imagenet_home, 'tf_records'))


def test_output_folder_with_another_split_count_is_one_clear_error(mini, converted):
  output_dir = converted[0]
  before = _stats(os.path.join(output_dir, 'train'))
  with pytest.raises(ValueError, match='another split count.*train_shards=3'):
    imagenet_fixtures.convert_miniature(mini, output_dir, train_shards=4,
                                        validation_shards=VALIDATION_SHARDS)
  assert _stats(os.path.join(output_dir, 'train')) == before


def test_compressed_tarball_is_rejected(mini, tmp_path):
  packed = str(tmp_path / 'ILSVRC2012_img_val.tar')
  with open(mini.validation_archive, 'rb') as f, gzip.open(packed, 'wb') as g:
    g.write(f.read())
  with pytest.raises(ValueError, match='gzip-compressed'):
    converter.convert(mini.imagenet_home, str(tmp_path / 'out'), splits=('validation',),
                      validation_archive=packed, show_progress=False)


def test_devkit_count_mismatch_is_reported(mini):
  classes, _ = converter.read_devkit(mini.devkit_archive, need_ground_truth=True)
  classes.train_counts['n02124075'] += 1
  with pytest.raises(ValueError, match='n02124075: 5 images, devkit says 6'):
    converter.index_train_archive(mini.train_archive, classes, show_progress=False)


def test_prepare_image_checks_content_not_names(mini):
  jpeg = next(im.data for im in mini.train.values() if im.kind == 'jpeg')
  # Bytes after the end-of-image marker do not make a JPEG bad, and it is not re-encoded.
  data, *_, source = converter.prepare_image(jpeg + b'\x00trailing')
  assert data == jpeg + b'\x00trailing' and source is None
  png = mini.train[mini.files_of_kind('png')[0]].data
  data, _, _, channels, colorspace, source = converter.prepare_image(png)
  assert data[:2] == b'\xff\xd8' and (channels, colorspace) == (3, b'RGB')
  assert source.startswith('PNG')
  for broken in (jpeg[:len(jpeg) // 2], b'not an image at all'):
    with pytest.raises(converter.BadImageError):
      converter.prepare_image(broken)


def _run_script(env_home, *args):
  env = {k: v for k, v in os.environ.items() if k != 'IMAGENET_HOME'}
  if env_home is not None:
    env['IMAGENET_HOME'] = env_home
  return subprocess.run(['bash', os.path.join(REPO, 'Imagenet_tools', 'preprocess_imagenet.sh'),
                         *args], env=env, capture_output=True, text=True, timeout=300)


def test_shell_wrapper_end_to_end(tmp_path):
  mini = imagenet_fixtures.make_miniature_imagenet(
      str(tmp_path / 'imagenet'), train_per_class=3, validation_per_class=1, num_classes=3)
  done = _run_script(mini.imagenet_home, '--train_shards=2', '--validation_shards=1',
                     '--num_workers=2')
  assert done.returncode == 0, done.stderr
  records = imagenet_fixtures.read_examples(
      [os.path.join(mini.imagenet_home, 'tf_records', 'train', f'train-0000{k}-of-00002')
       for k in range(2)] +
      [os.path.join(mini.imagenet_home, 'tf_records', 'validation', 'validation-00000-of-00001')],
      decode=False)
  assert sorted(r['filename'] for r in records) == sorted({**mini.train, **mini.validation})

  unset = _run_script(None)
  assert unset.returncode != 0 and 'IMAGENET_HOME' in unset.stderr

  failed = _run_script(str(tmp_path))
  assert failed.returncode == 1
  assert 'error: The train tarball not found' in failed.stderr
  assert 'Traceback' not in failed.stderr


def test_temp_folder_too_long_for_a_socket(tmp_path):
  # Python 3.11's fork server fails with "AF_UNIX path too long" under such a TMPDIR.
  mini = imagenet_fixtures.make_miniature_imagenet(
      str(tmp_path / 'imagenet'), train_per_class=2, validation_per_class=1, num_classes=2,
      special_files=False, with_boxes=False)
  long_temp_dir = tmp_path / ('t' * 60) / ('m' * 40)
  long_temp_dir.mkdir(parents=True)
  output_dir = str(tmp_path / 'out')
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, 'Imagenet_tools', 'imagenet_to_tfrecords.py'),
       f'--imagenet_home={mini.imagenet_home}', f'--output_dir={output_dir}', '--splits=train',
       '--train_shards=2', '--num_workers=2'],
      env=dict(os.environ, TMPDIR=str(long_temp_dir), TF_CPP_MIN_LOG_LEVEL='2'),
      capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'is too long for the workers\' Unix socket; using /tmp' in done.stderr
  records = imagenet_fixtures.read_examples(
      [os.path.join(output_dir, 'train', converter.shard_name('train', k, 2)) for k in range(2)],
      decode=False)
  assert sorted(r['filename'] for r in records) == sorted(mini.train)


def _still_running(processes):
  """The processes that have not ended (a zombie has ended; it only waits to be reaped)."""
  running = []
  for process in processes:
    try:
      if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
        running.append(process)
    except psutil.NoSuchProcess:
      pass
  return running


def _kill(processes):
  for process in processes:
    with contextlib.suppress(psutil.NoSuchProcess):
      process.kill()


def _wait_for(condition, timeout, what, converter_process, stderr):
  deadline = time.monotonic() + timeout
  while not (result := condition()):
    if converter_process.poll() is not None:
      stderr.seek(0)
      pytest.fail(f'The converter ended (exit code {converter_process.returncode}) before '
                  f'{what}:\n{stderr.read()[-3000:]}')
    if time.monotonic() > deadline:
      pytest.fail(f'Timed out after {timeout} s waiting for {what}.')
    time.sleep(0.005)
  return result


@pytest.mark.parametrize('signum', [signal.SIGKILL, signal.SIGTERM], ids=['SIGKILL', 'SIGTERM'])
def test_killed_converter_takes_its_processes_along(signum, tmp_path, request):
  # Its forkserver, workers and resource tracker (~870 MB) must end with it, however it ends.
  # 240 images in 24 shards: enough work that the workers are caught before they finish it.
  mini = imagenet_fixtures.make_miniature_imagenet(
      str(tmp_path / 'imagenet'), train_per_class=40, validation_per_class=1,
      special_files=False, with_boxes=False)
  num_shards = 24
  output_dir = str(tmp_path / 'out')
  train_dir = os.path.join(output_dir, 'train')
  # multiprocessing makes its pymp-* folders in the converter's TMPDIR. A short one, so that the
  # converter keeps it (a TMPDIR too long for the fork server's socket is replaced by /tmp).
  temp_dir = tempfile.mkdtemp(prefix='conv-')
  request.addfinalizer(lambda: shutil.rmtree(temp_dir, ignore_errors=True))
  env = dict(os.environ, TMPDIR=temp_dir, TF_CPP_MIN_LOG_LEVEL='2')
  descendants = []
  # stderr goes to a file: leftover processes would keep a pipe open and block reading it.
  with open(tmp_path / 'stderr.txt', 'w+', newline='') as stderr:
    converter_process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'Imagenet_tools', 'imagenet_to_tfrecords.py'),
         f'--imagenet_home={mini.imagenet_home}', f'--output_dir={output_dir}', '--splits=train',
         f'--train_shards={num_shards}', '--num_workers=2'],
        env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    parent = psutil.Process(converter_process.pid)

    def workers():
      try:  # the workers are the forkserver's children, not the converter's
        found = [p for p in parent.children(recursive=True) if p.ppid() != parent.pid]
      except psutil.NoSuchProcess:
        return None
      return found if len(found) == 2 else None

    def in_write_loop():
      stderr.seek(0)
      return '\rwrite:' in stderr.read()  # the progress bar: every worker has been started

    try:
      # Freeze the workers as soon as they exist, so that the conversion cannot end before the
      # converter is signalled, whatever the machine's load.
      frozen = _wait_for(workers, 120, 'its 2 workers started', converter_process, stderr)
      for worker in frozen:
        worker.suspend()

      _wait_for(in_write_loop, 60, 'its write loop', converter_process, stderr)
      # Their pids now: once the converter is gone they are reparented and cannot be found.
      descendants = parent.children(recursive=True)
      assert len(descendants) == 4  # forkserver, resource tracker and the 2 workers
      commands = {p.pid: ' '.join(p.cmdline())[:100] for p in descendants}
      start = time.monotonic()
      converter_process.send_signal(signum)
      for worker in frozen:
        worker.resume()
      converter_process.wait(timeout=60)
      while _still_running(descendants) and time.monotonic() < start + 20:
        time.sleep(0.05)
      running = _still_running(descendants)
      assert not running, (f'{signal.Signals(signum).name} of the converter left '
                           f'{[commands[p.pid] for p in running]} running after 20 s')
      stderr.seek(0)
      output = stderr.read()
    finally:
      # A failing test must not leave the processes behind either.
      if not descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
          descendants = parent.children(recursive=True)
      _kill(_still_running(descendants + [parent]))
      converter_process.wait(timeout=60)

  last_line = output.rstrip().splitlines()[-1]
  if signum == signal.SIGTERM:
    assert converter_process.returncode == 1
    assert last_line == ('Terminated (SIGTERM). Finished shards are kept; rerun the same '
                         'command to write the rest.')
    assert 'Traceback' not in output
  else:
    assert converter_process.returncode == -signal.SIGKILL
  names = os.listdir(train_dir)
  assert not [n for n in names if n.endswith('.partial')]
  assert not [n for n in os.listdir(temp_dir) if n.startswith('pymp-')]

  # A rerun writes exactly the shards that were not finished.
  finished = {n for n in names if n.startswith('train-')}
  summaries = imagenet_fixtures.convert_miniature(mini, output_dir, train_shards=num_shards,
                                                  splits=('train',))
  assert summaries['train'].shards_written == sorted(
      {converter.shard_name('train', k, num_shards) for k in range(num_shards)} - finished)
  records = imagenet_fixtures.read_examples(summaries['train'].shard_paths, decode=False)
  assert sorted(r['filename'] for r in records) == sorted(mini.train)
