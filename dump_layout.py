"""Layout of the softmax dumps: the one contract between the run loop and the analysis.

This module needs only numpy (no TensorFlow), so the analysis can import it on a laptop.

A dump folder (``--softmax_dir``, default ``output_softmax/``) holds::

    manifest.json                       model, checkpoint, global step, class count,
                                        per-stage MACs, image count and exits per split
    <split>/labels.npy                  int32 [N]               ground-truth class ids
    <split>/clf<k>_probabilities.npy    float32 [N, num_classes] softmax of exit k

``<split>`` is ``validation`` or ``train``. Row i of every file of a split is the same image.
The ``.npy`` files are real numpy arrays (``np.load(..., mmap_mode='r')`` works) written row
block by row block, so a 1.28M x 1001 array is never held in memory. A file appears under its
final name only once it is complete; while it is being written it is called ``<name>.partial``.
"""

import json
import os

import numpy as np

MANIFEST_NAME = 'manifest.json'
LABELS_NAME = 'labels.npy'
SPLITS = ('validation', 'train')
MANIFEST_VERSION = 1

# Fixed size of the .npy header we write, so that the row count can be filled in at the end
# without moving the data. 128 bytes hold a (1e15, 1e6) shape with room to spare.
_HEADER_BYTES = 128
_NPY_MAGIC = b'\x93NUMPY\x01\x00'


def probabilities_name(exit_id):
  """File name of exit ``exit_id``'s probabilities, e.g. ``clf0_probabilities.npy``."""
  return f'clf{int(exit_id)}_probabilities.npy'


def split_dir(softmax_dir, split):
  return os.path.join(softmax_dir, split)


def labels_path(softmax_dir, split):
  return os.path.join(softmax_dir, split, LABELS_NAME)


def probabilities_path(softmax_dir, split, exit_id):
  return os.path.join(softmax_dir, split, probabilities_name(exit_id))


def manifest_path(softmax_dir):
  return os.path.join(softmax_dir, MANIFEST_NAME)


def _npy_header(dtype, shape):
  """A version 1.0 .npy header of exactly ``_HEADER_BYTES`` bytes."""
  descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
  text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
  room = _HEADER_BYTES - len(_NPY_MAGIC) - 2
  if len(text) + 1 > room:
    raise ValueError(f'shape {shape} does not fit the .npy header')
  text = text.ljust(room - 1) + '\n'
  return _NPY_MAGIC + np.uint16(room).tobytes() + text.encode('latin1')


class NpyRowWriter:
  """Streams rows of a 1-D or 2-D array into a real ``.npy`` file.

  Rows are appended with ``write(block)``; the row count need not be known in advance. The
  data goes to ``<path>.partial`` and is renamed to ``path`` by ``close()``, so a killed job
  never leaves a file that looks complete. ``abort()`` removes the partial file.
  """

  def __init__(self, path, dtype, row_shape=()):
    self.path = path
    self.dtype = np.dtype(dtype)
    self.row_shape = tuple(int(d) for d in row_shape)
    self.num_rows = 0
    self._partial = path + '.partial'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._file = open(self._partial, "wb")  # noqa: SIM115 -- kept open across write() calls
    self._file.write(_npy_header(self.dtype, (0,) + self.row_shape))

  def write(self, block):
    """Appends ``block`` of shape [rows] + row_shape (cast to the file's dtype)."""
    block = np.ascontiguousarray(block, dtype=self.dtype)
    if block.shape[1:] != self.row_shape:
      raise ValueError(f'{self.path}: expected rows of shape {self.row_shape}, '
                       f'got a block of shape {block.shape}')
    self._file.write(block.tobytes())
    self.num_rows += block.shape[0]

  def close(self):
    """Writes the final row count into the header and moves the file to its real name."""
    self._file.seek(0)
    self._file.write(_npy_header(self.dtype, (self.num_rows,) + self.row_shape))
    self._file.close()
    os.replace(self._partial, self.path)

  def abort(self):
    if not self._file.closed:
      self._file.close()
    if os.path.exists(self._partial):
      os.remove(self._partial)


def read_manifest(softmax_dir):
  """Returns the manifest dict, or None when the folder has none (e.g. the original's dumps)."""
  path = manifest_path(softmax_dir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_manifest(softmax_dir, manifest):
  """Writes ``manifest`` atomically (temporary file, then rename)."""
  os.makedirs(softmax_dir, exist_ok=True)
  path = manifest_path(softmax_dir)
  with open(path + '.partial', 'w') as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(path + '.partial', path)


# Facts of the run that wrote a dump, as opposed to facts of the model and data set.
RUN_FIELDS = ('checkpoint', 'global_step', 'pretrained_global_step')


def merge_manifest(softmax_dir, split, num_images, exit_ids, common):
  """Records that ``split`` now holds ``num_images`` rows for ``exit_ids``.

  ``common`` holds the split-independent facts (model, checkpoint, global step, num_classes,
  stage_macs, ...). Exits written earlier by another run stay listed, so runs for different
  classifier ids can share one folder. The top-level run fields (``RUN_FIELDS``) describe the
  latest run; ``exit_sources[split][exit]`` keeps, for every file, the run that wrote it.
  """
  manifest = read_manifest(softmax_dir) or {}
  for field in RUN_FIELDS:
    manifest.pop(field, None)   # A field the latest run lacks must not survive from an older one.
  manifest.update(common)
  manifest['format_version'] = MANIFEST_VERSION
  splits = manifest.setdefault('splits', {})
  entry = splits.get(split, {})
  exits = sorted(set(entry.get('exits', [])) | {int(k) for k in exit_ids})
  splits[split] = {'num_images': int(num_images), 'exits': exits}
  run = {field: common[field] for field in RUN_FIELDS if field in common}
  sources = manifest.setdefault('exit_sources', {}).setdefault(split, {})
  for exit_id in exit_ids:
    sources[str(int(exit_id))] = run
  write_manifest(softmax_dir, manifest)
  return manifest
