"""Tests of prepare_fashion_mnist.py on the real Fashion-MNIST of the Debian package.

Expected records are rebuilt here from the idx files with numpy alone, independently of the
module under test.
"""

import functools
import gzip
import http.server
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import run_helpers

import cifar10_main
import prepare_fashion_mnist as pfm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = 1 + 3 * 32 * 32


@pytest.fixture(scope='module')
def debian_dir():
  # At module set-up, before any test points pfm.DEBIAN_DIR elsewhere.
  return run_helpers.require_fashion_mnist()


def _read_source(folder, name, offset):
  with gzip.open(os.path.join(folder, name)) as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


@pytest.fixture(scope='module')
def source(debian_dir):
  """{'train'|'test': (images uint8 [N, 28, 28], labels uint8 [N])} read with numpy alone."""
  out = {}
  for split, prefix in [('train', 'train'), ('test', 't10k')]:
    images = _read_source(debian_dir, f'{prefix}-images-idx3-ubyte.gz', 16).reshape(-1, 28, 28)
    labels = _read_source(debian_dir, f'{prefix}-labels-idx1-ubyte.gz', 8)
    out[split] = (images, labels)
  return out


def _check_records(path, images, labels):
  """The file holds exactly `labels`/`images` as padded, 3-channel CIFAR-10 records."""
  raw = np.fromfile(path, np.uint8)
  assert raw.size == len(labels) * RECORD, path
  raw = raw.reshape(len(labels), RECORD)
  np.testing.assert_array_equal(raw[:, 0], labels)
  planes = raw[:, 1:].reshape(len(labels), 3, 32, 32)
  for channel in range(3):
    np.testing.assert_array_equal(planes[:, channel, 2:30, 2:30], images)
  border = planes.copy()
  border[:, :, 2:30, 2:30] = 0
  assert not border.any(), 'the 2-pixel border must be zero'


def _batch_path(out, name):
  return os.path.join(out, cifar10_main.BATCHES_DIR, name)


def _train_names():
  return [f'data_batch_{i}.bin' for i in range(1, 6)]


def test_full_data_set_has_the_cifar_layout(tmp_path, debian_dir, source):
  out = str(tmp_path)
  batches = pfm.prepare(out, fashion_mnist_dir=debian_dir, allow_install=False)
  assert batches == os.path.join(out, 'cifar-10-batches-bin')
  assert sorted(os.listdir(batches)) == sorted(_train_names() + ['test_batch.bin',
                                                                 'batches.meta.txt'])
  train_images, train_labels = source['train']
  assert len(train_labels) == 60000
  for i, name in enumerate(_train_names()):
    part = slice(12000 * i, 12000 * (i + 1))
    _check_records(_batch_path(out, name), train_images[part], train_labels[part])
  test_images, test_labels = source['test']
  assert len(test_labels) == 10000
  _check_records(_batch_path(out, 'test_batch.bin'), test_images, test_labels)
  with open(os.path.join(batches, 'batches.meta.txt')) as f:
    names = f.read().splitlines()
  assert len(names) == 10 and names[0] == 'T-shirt/top' and names[9] == 'Ankle boot'

  # Everything is there: a second run skips, without even looking for the sources.
  stamps = {name: os.stat(os.path.join(batches, name)).st_mtime_ns
            for name in os.listdir(batches)}
  pfm.prepare(out, fashion_mnist_dir=str(tmp_path / 'absent'), allow_install=False)
  assert stamps == {name: os.stat(os.path.join(batches, name)).st_mtime_ns
                    for name in os.listdir(batches)}


def test_limits_take_the_first_images_over_five_files(tmp_path, debian_dir, source):
  out = str(tmp_path)
  pfm.prepare(out, fashion_mnist_dir=debian_dir, train_limit=23, test_limit=7,
              allow_install=False)
  train_images, train_labels = source['train']
  start = 0
  for name, count in zip(_train_names(), [5, 5, 5, 4, 4], strict=True):
    _check_records(_batch_path(out, name), train_images[start:start + count],
                   train_labels[start:start + count])
    start += count
  _check_records(_batch_path(out, 'test_batch.bin'), *[a[:7] for a in source['test']])
  assert cifar10_main.count_records(out, 'train') == 23

  # Other limits: the files are rewritten, not skipped.
  pfm.prepare(out, fashion_mnist_dir=debian_dir, train_limit=10, test_limit=3,
              allow_install=False)
  assert cifar10_main.count_records(out, 'train') == 10
  _check_records(_batch_path(out, 'test_batch.bin'), *[a[:3] for a in source['test']])
  assert not [n for n in os.listdir(os.path.join(out, 'cifar-10-batches-bin'))
              if n.endswith('.partial')]


@pytest.mark.parametrize('flag, kwargs', [
    ('--train_limit=4', {'train_limit': 4}),
    ('--train_limit=60001', {'train_limit': 60001}),
    ('--test_limit=0', {'test_limit': 0}),
])
def test_limits_out_of_range(tmp_path, flag, kwargs):
  with pytest.raises(ValueError, match=flag):
    pfm.prepare(str(tmp_path), allow_install=False, **kwargs)
  assert os.listdir(tmp_path) == []


def _idx_bytes(magic, dims, payload):
  return struct.pack('>' + 'I' * (1 + len(dims)), magic, *dims) + payload


def _corrupt(folder, debian_dir, name, how):
  """Copies the four source files into `folder` with `name` damaged in one way."""
  for other in pfm.SOURCE_FILES:
    target = os.path.join(folder, other)
    if other != name:
      os.symlink(os.path.join(debian_dir, other), target)
  with gzip.open(os.path.join(debian_dir, name)) as f:
    data = f.read()
  if how == 'truncated gzip':
    with open(os.path.join(debian_dir, name), 'rb') as f:
      blob = f.read()[:2000]
  else:
    if how == 'bad magic':
      data = struct.pack('>I', 0x00000802) + data[4:]
    elif how == 'wrong count':
      data = data[:4] + struct.pack('>I', 59999) + data[8:]
    elif how == 'short data':
      data = data[:-100]
    elif how == 'bad label':
      data = data[:-1] + bytes([10])
    blob = gzip.compress(data, compresslevel=1)
  with open(os.path.join(folder, name), 'wb') as f:
    f.write(blob)


@pytest.mark.parametrize('name, how, message', [
    ('t10k-images-idx3-ubyte.gz', 'truncated gzip', 'not a complete gzip file'),
    ('t10k-labels-idx1-ubyte.gz', 'bad magic', 'magic number 0x00000802'),
    ('train-labels-idx1-ubyte.gz', 'wrong count', 'holds 59999 items'),
    ('t10k-images-idx3-ubyte.gz', 'short data', 'header promises'),
    ('t10k-labels-idx1-ubyte.gz', 'bad label', 'label 10'),
])
def test_corrupt_source_is_one_clear_error_and_writes_nothing(tmp_path, debian_dir, name, how,
                                                               message):
  source_dir = tmp_path / 'source'
  source_dir.mkdir()
  _corrupt(str(source_dir), debian_dir, name, how)
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match=message) as info:
    pfm.prepare(str(out), fashion_mnist_dir=str(source_dir), train_limit=5, test_limit=1,
                allow_install=False)
  assert name in str(info.value)
  assert not out.exists()


def test_missing_file_in_given_folder_is_named(tmp_path, debian_dir):
  for name in pfm.SOURCE_FILES[1:]:
    os.symlink(os.path.join(debian_dir, name), tmp_path / name)
  with pytest.raises(FileNotFoundError, match=pfm.SOURCE_FILES[0]):
    pfm.prepare(str(tmp_path / 'out'), fashion_mnist_dir=str(tmp_path), allow_install=False)


def test_stray_training_batches_are_refused(tmp_path, debian_dir):
  batches = tmp_path / 'cifar-10-batches-bin'
  batches.mkdir()
  (batches / 'data_batch_6.bin').write_bytes(b'\0' * RECORD)
  with pytest.raises(ValueError, match='data_batch_6.bin'):
    pfm.prepare(str(tmp_path), fashion_mnist_dir=debian_dir, train_limit=5, test_limit=1,
                allow_install=False)
  assert sorted(os.listdir(batches)) == ['data_batch_6.bin']


###############################################################################
# Where the sources come from
###############################################################################
@pytest.fixture
def nowhere(tmp_path, monkeypatch):
  """No Debian folder, not root, and download URLs that refuse connections at once."""
  monkeypatch.setattr(pfm, 'DEBIAN_DIR', str(tmp_path / 'no-debian') + '/')
  monkeypatch.setattr(pfm, '_running_as_root', lambda: False)
  monkeypatch.setattr(pfm, 'DOWNLOAD_URLS', ('http://127.0.0.1:1/',))


def test_no_source_and_no_network_is_one_clear_error(tmp_path, nowhere):
  out = tmp_path / 'out'
  with pytest.raises(FileNotFoundError) as info:
    pfm.prepare(str(out), train_limit=5, test_limit=1, timeout=2)
  message = str(info.value)
  assert '--fashion_mnist_dir' in message
  assert 'apt-get install dataset-fashion-mnist' in message
  assert 'http://127.0.0.1:1/' in message
  assert not out.exists() or os.listdir(out) == []


def test_debian_package_is_installed_when_root(tmp_path, monkeypatch, nowhere, debian_dir,
                                                source):
  fake_debian = tmp_path / 'no-debian'
  calls = []

  def fake_run(command, **kwargs):
    calls.append(command[:2])
    if command[1] == 'install' and len(calls) == 1:
      return subprocess.CompletedProcess(command, 100, '', 'E: Unable to locate package')
    if command[1] == 'install':  # after the update: the package "installs"
      fake_debian.mkdir()
      for name in pfm.SOURCE_FILES:
        os.symlink(os.path.join(debian_dir, name), fake_debian / name)
    return subprocess.CompletedProcess(command, 0, '', '')

  monkeypatch.setattr(pfm, '_running_as_root', lambda: True)
  monkeypatch.setattr(pfm.shutil, 'which', lambda name: '/usr/bin/' + name)
  monkeypatch.setattr(pfm.subprocess, 'run', fake_run)
  out = str(tmp_path / 'out')
  pfm.prepare(out, train_limit=5, test_limit=2)
  assert calls == [['apt-get', 'install'], ['apt-get', 'update'], ['apt-get', 'install']]
  _check_records(_batch_path(out, 'test_batch.bin'), *[a[:2] for a in source['test']])


def test_failed_install_falls_back_to_the_download(tmp_path, monkeypatch, nowhere):
  calls = []

  def failing_run(command, **kwargs):
    calls.append(command[1])
    return subprocess.CompletedProcess(command, 100, '', 'E: network unreachable')

  monkeypatch.setattr(pfm, '_running_as_root', lambda: True)
  monkeypatch.setattr(pfm.shutil, 'which', lambda name: '/usr/bin/' + name)
  monkeypatch.setattr(pfm.subprocess, 'run', failing_run)
  with pytest.raises(FileNotFoundError, match='could not be downloaded'):
    pfm.prepare(str(tmp_path / 'out'), train_limit=5, test_limit=1, timeout=2)
  assert calls == ['install', 'update']


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


def test_download_tries_mirrors_and_keeps_the_files(tmp_path, monkeypatch, nowhere, debian_dir,
                                                    source):
  # A local mirror on the loopback interface stands in for the public one.
  handler = functools.partial(_QuietHandler, directory=debian_dir)
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  mirror = f'http://127.0.0.1:{server.server_address[1]}/'
  monkeypatch.setattr(pfm, 'DOWNLOAD_URLS', ('http://127.0.0.1:1/', mirror))
  out = tmp_path / 'out'
  try:
    pfm.prepare(str(out), train_limit=5, test_limit=3, timeout=5)
  finally:
    server.shutdown()
    server.server_close()
  assert sorted(os.listdir(out / 'fashion-mnist')) == sorted(pfm.SOURCE_FILES)
  _check_records(_batch_path(str(out), 'test_batch.bin'), *[a[:3] for a in source['test']])

  # The next run with other limits uses the downloaded files; the server is gone.
  pfm.prepare(str(out), train_limit=6, test_limit=4, timeout=1)
  _check_records(_batch_path(str(out), 'test_batch.bin'), *[a[:4] for a in source['test']])


###############################################################################
# Command line
###############################################################################
def _run_cli(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, 'prepare_fashion_mnist.py'), *args],
                        capture_output=True, text=True, cwd=REPO, check=False, timeout=120)


def test_command_line(tmp_path, debian_dir, source):
  out = str(tmp_path / 'out')
  result = _run_cli(f'--output_dir={out}', f'--fashion_mnist_dir={debian_dir}',
                    '--train_limit=10', '--test_limit=5')
  assert result.returncode == 0, result.stderr
  _check_records(_batch_path(out, 'data_batch_1.bin'), *[a[:2] for a in source['train']])
  _check_records(_batch_path(out, 'test_batch.bin'), *[a[:5] for a in source['test']])

  result = _run_cli(f'--output_dir={out}', '--train_limit=3')
  assert result.returncode == 1
  assert 'error: --train_limit=3 is out of range' in result.stderr
  assert 'Traceback' not in result.stderr
