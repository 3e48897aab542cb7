"""Downloads the CIFAR-10 binary version and extracts it to `<data_dir>/cifar-10-batches-bin/`.

    python cifar10_download_and_extract.py --data_dir=/tmp/cifar10_data

This needs internet access. Without it, download `cifar-10-binary.tar.gz` elsewhere and put it
in `--data_dir` (the script then only extracts it), or write Fashion-MNIST in the same format
with `prepare_fashion_mnist.py`.

The module needs no TensorFlow; `download` is shared with `prepare_fashion_mnist.py`.
"""

import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib

from absl import app, flags, logging
from tqdm import tqdm

DATA_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
# Kept identical to cifar10_main.BATCHES_DIR (not imported, to keep this script free of
# TensorFlow); tests check that the two agree.
BATCHES_DIR = 'cifar-10-batches-bin'
EXPECTED_FILES = tuple(f'data_batch_{i}.bin' for i in range(1, 6)) + ('test_batch.bin',)
# Seconds without any answer from the server before giving up.
DEFAULT_TIMEOUT = 30
_CHUNK_BYTES = 1 << 20
# What a missing network or a failing server raise (HTTPError is a URLError).
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError,
                   http.client.HTTPException)


class DownloadError(OSError):
  """A download failed; the message says why and what to do instead."""


def download(url, dest_path, timeout=DEFAULT_TIMEOUT, advice=''):
  """Downloads `url` to `dest_path` with a progress bar.

  The data go to `<dest_path>.partial` first and are renamed when complete, so `dest_path`
  either does not exist or holds the whole file.

  Args:
    url: what to download.
    dest_path: where to write it; its folder must exist.
    timeout: seconds to wait for the server before giving up.
    advice: a sentence appended to the error message, saying what to do without network.

  Returns:
    dest_path.

  Raises:
    DownloadError: the server could not be reached, answered with an error, or the transfer
      ended early. Nothing is left at `dest_path` or `<dest_path>.partial`.
  """
  partial_path = dest_path + '.partial'
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
      total = response.length  # None when the server sends no Content-Length.
      received = 0
      with open(partial_path, 'wb') as out, tqdm(
          total=total, unit='B', unit_scale=True, unit_divisor=1024,
          desc=os.path.basename(dest_path)) as progress:
        while True:
          chunk = response.read(_CHUNK_BYTES)
          if not chunk:
            break
          out.write(chunk)
          received += len(chunk)
          progress.update(len(chunk))
      if total is not None and received != total:
        raise DownloadError(
            f'Download of {url} ended after {received} of {total} bytes. Try again. {advice}')
    os.replace(partial_path, dest_path)
  except BaseException as e:  # Also on Ctrl-C: never leave a partial file behind.
    if os.path.exists(partial_path):
      os.remove(partial_path)
    if isinstance(e, urllib.error.HTTPError):
      raise DownloadError(
          f'Could not download {url}: the server answered HTTP {e.code} ({e.reason}). '
          f'{advice}') from e
    if isinstance(e, _NETWORK_ERRORS):
      reason = getattr(e, 'reason', None) or e
      raise DownloadError(
          f'Could not download {url}: {reason}. This machine may have no internet access. '
          f'{advice}') from e
    raise
  logging.info('Downloaded %s (%d bytes) to %s', url, os.path.getsize(dest_path), dest_path)
  return dest_path


def _extract(tarball_path, data_dir):
  """Extracts the tarball's `cifar-10-batches-bin/` into `data_dir`, all or nothing.

  Raises:
    ValueError: the tarball is not a readable CIFAR-10 binary archive.
  """
  bad_archive = (f'{tarball_path} is not a complete CIFAR-10 binary archive ({{}}). Delete it '
                 f'and run this script again.')
  # Extract next to the final place, then rename: a half-extracted folder never carries the
  # final name, and the rename stays on one file system.
  staging = tempfile.mkdtemp(prefix='.extract-', dir=data_dir)
  try:
    try:
      with tarfile.open(tarball_path, 'r:gz') as tar:
        # The 'data' filter refuses absolute paths, '..' and links that leave the folder.
        tar.extractall(staging, filter='data')
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      raise ValueError(bad_archive.format(e)) from e
    extracted = os.path.join(staging, BATCHES_DIR)
    missing = [name for name in EXPECTED_FILES
               if not os.path.isfile(os.path.join(extracted, name))]
    if missing:
      raise ValueError(bad_archive.format(f'{BATCHES_DIR}/ lacks {", ".join(missing)}'))
    os.replace(extracted, os.path.join(data_dir, BATCHES_DIR))
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def download_and_extract(data_dir, url=DATA_URL, timeout=DEFAULT_TIMEOUT):
  """Makes sure `<data_dir>/cifar-10-batches-bin/` holds CIFAR-10, downloading it if needed.

  Skips whatever is already done: an extracted folder, or a complete tarball in `data_dir`.

  Args:
    data_dir: the folder to download to and extract in (created if missing).
    url: where to download the tarball from.
    timeout: seconds to wait for the server before giving up.

  Returns:
    The path of the `cifar-10-batches-bin` folder.

  Raises:
    DownloadError: no tarball in `data_dir` and the download failed.
    ValueError: the tarball is corrupt.
  """
  batches_dir = os.path.join(data_dir, BATCHES_DIR)
  if all(os.path.isfile(os.path.join(batches_dir, name)) for name in EXPECTED_FILES):
    logging.info('%s already holds the CIFAR-10 batches; nothing to do.', batches_dir)
    return batches_dir
  if os.path.isdir(batches_dir):
    raise ValueError(
        f'{batches_dir} exists but lacks some of {", ".join(EXPECTED_FILES)}. Move it away or '
        f'delete it, then run this script again.')
  os.makedirs(data_dir, exist_ok=True)
  tarball_path = os.path.join(data_dir, os.path.basename(url))
  if os.path.isfile(tarball_path):
    logging.info('Using the tarball already in %s', tarball_path)
  else:
    download(url, tarball_path, timeout=timeout, advice=(
        f'Download {url} elsewhere and put it at {tarball_path} (this script then only '
        f'extracts it), or write Fashion-MNIST in the CIFAR-10 format instead with '
        f'`python prepare_fashion_mnist.py --output_dir={data_dir}`.'))
  logging.info('Extracting %s', tarball_path)
  _extract(tarball_path, data_dir)
  logging.info('CIFAR-10 is ready in %s', batches_dir)
  return batches_dir


def define_flags():
  flags.DEFINE_string(
      'data_dir', '/tmp/cifar10_data',
      'Folder to download the CIFAR-10 tarball to and extract it in.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    download_and_extract(flags.FLAGS.data_dir)
  except (DownloadError, ValueError) as e:
    # One clear message, not a traceback: these errors are about the user's machine or files.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  define_flags()
  app.run(main)
