"""Writes Fashion-MNIST in the CIFAR-10 binary format, so `cifar10_main.py` can train on it.

    python prepare_fashion_mnist.py --output_dir=/tmp/fashion_mnist_cifar
    python cifar10_main.py --data_dir=/tmp/fashion_mnist_cifar ...

Output, in `<output_dir>/cifar-10-batches-bin/`:

    data_batch_1.bin .. data_batch_5.bin   the 60,000 training images, 12,000 per file
    test_batch.bin                         the 10,000 test images
    batches.meta.txt                       the 10 class names, one per line, in label order

Each 28x28 grey image is zero-padded by 2 pixels on every side to 32x32 and repeated in the
three colour planes; records are laid out as `cifar10_main` describes. `--train_limit` and
`--test_limit` keep only the first N images of a split (the Fashion-MNIST files are in random
class order, so the first N are close to class-balanced); a training subset is still spread
over five files, as evenly as possible.

Where the Fashion-MNIST files (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`) are taken from, first found first:
  1. `--fashion_mnist_dir`, when given;
  2. the Debian package's folder `/usr/share/datasets/fashion-mnist/`;
  3. `<output_dir>/fashion-mnist/`, where an earlier run downloaded them;
  4. the Debian package `dataset-fashion-mnist`, installed with apt-get when running as root;
  5. the public download (needs internet access).
"""

import gzip
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

import cifar10_main
from cifar10_download_and_extract import DownloadError, download

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist/'
DEBIAN_PACKAGE = 'dataset-fashion-mnist'
# The data set's home; the second is a mirror kept by the Keras project.
DOWNLOAD_URLS = (
    'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
    'https://storage.googleapis.com/tensorflow/tf-keras-datasets/',
)
DOWNLOAD_SUBDIR = 'fashion-mnist'

# split -> (images file, labels file, number of images)
SOURCES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 60000),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', 10000),
}
SOURCE_FILES = tuple(name for images, labels, _ in SOURCES.values() for name in (images, labels))

# Label order of Fashion-MNIST.
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
               'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

SOURCE_SIZE = 28
NUM_TRAIN_FILES = 5

# idx headers: a big-endian magic number (0x0801 unsigned bytes, 1 dimension / 0x0803, 3
# dimensions) followed by one big-endian uint32 per dimension.
_IDX_LABELS_MAGIC = 0x00000801
_IDX_IMAGES_MAGIC = 0x00000803

_PAD = (cifar10_main.HEIGHT - SOURCE_SIZE) // 2


###############################################################################
# Reading the idx files
###############################################################################
def _read_gzip(path):
  try:
    with gzip.open(path, 'rb') as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(
        f'Corrupt Fashion-MNIST file {path}: not a complete gzip file ({e}). Replace it with a '
        f'good copy (e.g. reinstall the Debian package {DEBIAN_PACKAGE}).') from e


def read_idx(path, expected_count):
  """Reads an idx labels or images file and checks its header against its content.

  Args:
    path: a `*-labels-idx1-ubyte.gz` or `*-images-idx3-ubyte.gz` file.
    expected_count: the number of labels or images the file must hold.

  Returns:
    uint8 array: labels [expected_count] or images [expected_count, 28, 28].

  Raises:
    ValueError: the file is not gzip, has a wrong magic number, wrong dimensions, a count other
      than `expected_count`, a size that disagrees with its header, or labels >= 10.
  """
  data = _read_gzip(path)
  bad = f'Corrupt Fashion-MNIST file {path}: {{}}. Replace it with a good copy.'
  if len(data) < 8:
    raise ValueError(bad.format(f'only {len(data)} bytes'))
  magic, count = struct.unpack('>II', data[:8])
  if magic == _IDX_LABELS_MAGIC:
    shape, offset = (count,), 8
  elif magic == _IDX_IMAGES_MAGIC:
    if len(data) < 16:
      raise ValueError(bad.format(f'an images header needs 16 bytes, the file has {len(data)}'))
    rows, cols = struct.unpack('>II', data[8:16])
    if (rows, cols) != (SOURCE_SIZE, SOURCE_SIZE):
      raise ValueError(bad.format(f'images are {rows}x{cols}, expected 28x28'))
    shape, offset = (count, rows, cols), 16
  else:
    raise ValueError(bad.format(
        f'magic number {magic:#010x} is neither {_IDX_LABELS_MAGIC:#010x} (labels) nor '
        f'{_IDX_IMAGES_MAGIC:#010x} (images)'))
  if count != expected_count:
    raise ValueError(bad.format(f'holds {count} items, Fashion-MNIST has {expected_count}'))
  expected_bytes = offset + int(np.prod(shape))
  if len(data) != expected_bytes:
    raise ValueError(bad.format(
        f'{len(data)} bytes after decompression, its header promises {expected_bytes}'))
  array = np.frombuffer(data, np.uint8, offset=offset).reshape(shape)
  if magic == _IDX_LABELS_MAGIC and array.max(initial=0) >= len(CLASS_NAMES):
    raise ValueError(bad.format(f'label {array.max()} is not below {len(CLASS_NAMES)}'))
  return array


def load_split(source_dir, split):
  """Reads and checks one split of Fashion-MNIST.

  Returns:
    images: uint8 [N, 28, 28].
    labels: uint8 [N].
  """
  images_name, labels_name, count = SOURCES[split]
  images = read_idx(os.path.join(source_dir, images_name), count)
  labels = read_idx(os.path.join(source_dir, labels_name), count)
  if images.ndim != 3 or labels.ndim != 1:
    raise ValueError(
        f'{images_name} must hold images and {labels_name} labels; in {source_dir} they are '
        f'swapped or renamed. Replace them with good copies.')
  return images, labels


###############################################################################
# Conversion to CIFAR-10 records
###############################################################################
def to_cifar_records(images, labels):
  """Turns grey 28x28 images into CIFAR-10 binary records.

  Args:
    images: uint8 [N, 28, 28].
    labels: integer [N], 0..9.

  Returns:
    uint8 [N, RECORD_BYTES]: per row the label, then the image zero-padded to 32x32, repeated
    as the red, green and blue planes.
  """
  num = len(images)
  records = np.zeros([num, cifar10_main.RECORD_BYTES], np.uint8)
  records[:, 0] = labels
  planes = records[:, cifar10_main.LABEL_BYTES:].reshape(
      num, cifar10_main.NUM_CHANNELS, cifar10_main.HEIGHT, cifar10_main.WIDTH)
  planes[:, :, _PAD:_PAD + SOURCE_SIZE, _PAD:_PAD + SOURCE_SIZE] = images[:, None]
  return records


def _train_file_counts(num_train):
  """Records per training file: `num_train` spread over NUM_TRAIN_FILES files, larger first."""
  return [len(part) for part in np.array_split(np.arange(num_train), NUM_TRAIN_FILES)]


def _planned_outputs(batches_dir, num_train, num_test):
  """{path: expected size in bytes} of every batch file to write."""
  planned = {}
  for i, count in enumerate(_train_file_counts(num_train), start=1):
    name = cifar10_main.TRAIN_FILE_FORMAT.format(i)
    planned[os.path.join(batches_dir, name)] = count * cifar10_main.RECORD_BYTES
  planned[os.path.join(batches_dir, cifar10_main.VALIDATION_FILE)] = (
      num_test * cifar10_main.RECORD_BYTES)
  return planned


def _meta_text():
  return ''.join(name + '\n' for name in CLASS_NAMES)


def _write_atomically(path, write):
  """Calls `write(file)` on `<path>.partial`, then renames it to `path`; no partial file stays."""
  partial_path = path + '.partial'
  try:
    with open(partial_path, 'wb') as f:
      write(f)
    os.replace(partial_path, path)
  except BaseException:
    if os.path.exists(partial_path):
      os.remove(partial_path)
    raise


def _is_done(planned, meta_path):
  if not all(os.path.isfile(p) and os.path.getsize(p) == size for p, size in planned.items()):
    return False
  if not os.path.isfile(meta_path):
    return False
  with open(meta_path) as f:
    return f.read() == _meta_text()


###############################################################################
# Finding the Fashion-MNIST files
###############################################################################
def _missing_files(folder):
  return [name for name in SOURCE_FILES if not os.path.isfile(os.path.join(folder, name))]


def _running_as_root():
  return hasattr(os, 'geteuid') and os.geteuid() == 0


def _install_debian_package():
  """`apt-get install -y dataset-fashion-mnist`, after `apt-get update` if the first try fails.

  Returns:
    Whether the installation succeeded.
  """
  env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
  install = ['apt-get', 'install', '-y', '--no-install-recommends', DEBIAN_PACKAGE]
  logging.info('Installing the Debian package %s: %s', DEBIAN_PACKAGE, ' '.join(install))
  result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    # A fresh machine has no package lists yet ("Unable to locate package").
    logging.info('apt-get install failed; running apt-get update and trying again.')
    update = subprocess.run(['apt-get', 'update'], env=env, capture_output=True, text=True,
                            check=False)
    if update.returncode != 0:
      logging.warning('apt-get update failed:\n%s', update.stderr.strip())
      return False
    result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    logging.warning('apt-get install %s failed:\n%s', DEBIAN_PACKAGE, result.stderr.strip())
    return False
  return True


def _download_sources(download_dir, timeout):
  """Downloads the four files missing from `download_dir`, trying each mirror in turn.

  Raises:
    DownloadError: a file could be fetched from no mirror.
  """
  created = not os.path.isdir(download_dir)
  os.makedirs(download_dir, exist_ok=True)
  try:
    for name in _missing_files(download_dir):
      errors = []
      for base_url in DOWNLOAD_URLS:
        try:
          download(base_url + name, os.path.join(download_dir, name), timeout=timeout)
          break
        except DownloadError as e:
          errors.append(str(e))
      else:
        raise DownloadError(' '.join(errors))
  except BaseException:
    # Keep completed files for the next try, but no empty folder of ours.
    if created and not os.listdir(download_dir):
      os.rmdir(download_dir)
    raise


def find_source_dir(fashion_mnist_dir, output_dir, allow_install=True, timeout=30):
  """The folder holding the four Fashion-MNIST files, getting them if needed.

  Args:
    fashion_mnist_dir: a folder given by the user, or None to search (see the module docstring).
    output_dir: the output folder; downloads go to `<output_dir>/fashion-mnist/`.
    allow_install: whether the Debian package may be installed when running as root.
    timeout: seconds to wait for a download server.

  Returns:
    The folder's path.

  Raises:
    FileNotFoundError: `fashion_mnist_dir` lacks some of the files, or the data could be found,
      installed and downloaded nowhere; the message says what to do.
  """
  if fashion_mnist_dir is not None:
    missing = _missing_files(fashion_mnist_dir)
    if missing:
      raise FileNotFoundError(
          f'--fashion_mnist_dir={fashion_mnist_dir} lacks {", ".join(missing)}. Point it at '
          f'the folder with the four Fashion-MNIST *-ubyte.gz files.')
    return fashion_mnist_dir

  download_dir = os.path.join(output_dir, DOWNLOAD_SUBDIR)
  for folder in (DEBIAN_DIR, download_dir):
    if not _missing_files(folder):
      return folder

  if allow_install and _running_as_root() and shutil.which('apt-get'):
    if _install_debian_package() and not _missing_files(DEBIAN_DIR):
      return DEBIAN_DIR
    logging.warning('The Debian package did not provide %s; trying the public download.',
                    DEBIAN_DIR)

  try:
    _download_sources(download_dir, timeout)
  except DownloadError as e:
    raise FileNotFoundError(
        f'Fashion-MNIST is not on this machine and could not be downloaded ({e}). Pass '
        f'--fashion_mnist_dir=DIR with the four *-ubyte.gz files, or install the Debian package '
        f'(`apt-get install {DEBIAN_PACKAGE}`, which puts them in {DEBIAN_DIR}).') from e
  return download_dir


###############################################################################
# The whole step
###############################################################################
def _check_limit(name, limit, minimum, maximum):
  if limit is None:
    return maximum
  if not minimum <= limit <= maximum:
    raise ValueError(f'--{name}={limit} is out of range: use {minimum}..{maximum}, or leave it '
                     f'unset for all {maximum} images.')
  return limit


def prepare(output_dir, fashion_mnist_dir=None, train_limit=None, test_limit=None,
            allow_install=True, timeout=30):
  """Writes Fashion-MNIST (or its first images) in the CIFAR-10 binary format.

  Does nothing when every output file already exists with the expected size and the class
  names file matches. Every file appears under its final name only once complete.

  Args:
    output_dir: the files go to `<output_dir>/cifar-10-batches-bin/` (created if missing).
    fashion_mnist_dir: the folder with the four `*-ubyte.gz` files, or None to search for them
      (see the module docstring).
    train_limit: keep only the first `train_limit` training images (at least 5: one per file).
    test_limit: keep only the first `test_limit` test images.
    allow_install: whether the Debian package may be installed when running as root.
    timeout: seconds to wait for a download server.

  Returns:
    The path of the `cifar-10-batches-bin` folder.

  Raises:
    ValueError: a limit is out of range, a source file is corrupt, or the output folder holds
      other training batches.
    FileNotFoundError: the Fashion-MNIST files could not be found or fetched.
  """
  num_train = _check_limit('train_limit', train_limit, NUM_TRAIN_FILES, SOURCES['train'][2])
  num_test = _check_limit('test_limit', test_limit, 1, SOURCES['test'][2])

  batches_dir = os.path.join(output_dir, cifar10_main.BATCHES_DIR)
  meta_path = os.path.join(batches_dir, cifar10_main.META_FILE)
  planned = _planned_outputs(batches_dir, num_train, num_test)
  if _is_done(planned, meta_path):
    logging.info('%s already holds Fashion-MNIST with %d training and %d test images; '
                 'skipping.', batches_dir, num_train, num_test)
    return batches_dir

  # cifar10_main reads every data_batch_*.bin; a stray one would mix in other images.
  if os.path.isdir(batches_dir):
    strays = sorted(
        name for name in os.listdir(batches_dir)
        if name.startswith('data_batch_') and name.endswith('.bin')
        and os.path.join(batches_dir, name) not in planned)
    if strays:
      raise ValueError(
          f'{batches_dir} holds other training batches ({", ".join(strays)}) that would be read '
          f'together with Fashion-MNIST. Choose another --output_dir or delete them.')

  source_dir = find_source_dir(fashion_mnist_dir, output_dir, allow_install, timeout)
  logging.info('Reading Fashion-MNIST from %s', source_dir)
  # Read and check every source before writing anything.
  train_images, train_labels = load_split(source_dir, 'train')
  test_images, test_labels = load_split(source_dir, 'test')

  os.makedirs(batches_dir, exist_ok=True)
  train_parts = np.array_split(np.arange(num_train), NUM_TRAIN_FILES)
  jobs = [(path, part, train_images, train_labels)
          for path, part in zip(list(planned)[:NUM_TRAIN_FILES], train_parts, strict=True)]
  jobs.append((list(planned)[-1], np.arange(num_test), test_images, test_labels))
  for path, indices, images, labels in tqdm(jobs, desc='batch files', unit='file'):
    records = to_cifar_records(images[indices], labels[indices])
    _write_atomically(path, lambda f, records=records: f.write(records.tobytes()))
  _write_atomically(meta_path, lambda f: f.write(_meta_text().encode('utf-8')))
  logging.info('Wrote %d training images (%s per file) and %d test images to %s', num_train,
               '/'.join(str(len(p)) for p in train_parts), num_test, batches_dir)
  return batches_dir


def define_flags():
  flags.DEFINE_string(
      'fashion_mnist_dir', None,
      'Folder with the four Fashion-MNIST *-ubyte.gz files. Default: the Debian package\'s '
      f'folder {DEBIAN_DIR} (installing {DEBIAN_PACKAGE} with apt-get when running as root), '
      'else a download to <output_dir>/fashion-mnist/.')
  flags.DEFINE_string(
      'output_dir', None,
      'Where to write cifar-10-batches-bin/; pass the same folder as --data_dir to '
      'cifar10_main.py.')
  flags.DEFINE_integer(
      'train_limit', None,
      'Keep only the first N training images (N >= 5, spread over the 5 data_batch files).')
  flags.DEFINE_integer('test_limit', None, 'Keep only the first N test images.')
  flags.mark_flag_as_required('output_dir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  try:
    prepare(f.output_dir, fashion_mnist_dir=f.fashion_mnist_dir, train_limit=f.train_limit,
            test_limit=f.test_limit)
  except (FileNotFoundError, ValueError) as e:
    # One clear message, not a traceback: these errors are about the user's files or machine.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  define_flags()
  app.run(main)
