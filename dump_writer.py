"""Writing a dump: rows streamed into real .npy files, resumable after a kill, safe beside other
dumps into the same folder. The layout itself (file names, manifest) is ``dump_layout``'s.
"""

import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil

import numpy as np

import dump_layout
from dump_layout import LOCK_SUFFIX, PARTIAL_SUFFIX, PROGRESS_SUFFIX, DumpError

# Fixed size of the .npy header we write, so that the row count can be filled in at the end
# without moving the data. 128 bytes hold a (1e15, 1e6) shape with room to spare.
_HEADER_BYTES = 128
_NPY_MAGIC = b'\x93NUMPY\x01\x00'
_JOB_KEY_RE = re.compile(r'^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$')

_log = logging.getLogger(__name__)


def _npy_header(dtype, shape):
  """A version 1.0 .npy header of exactly ``_HEADER_BYTES`` bytes."""
  descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
  text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
  room = _HEADER_BYTES - len(_NPY_MAGIC) - 2
  if len(text) + 1 > room:
    raise ValueError(f'shape {shape} does not fit the .npy header')
  text = text.ljust(room - 1) + '\n'
  return _NPY_MAGIC + np.uint16(room).tobytes() + text.encode('latin1')


def holds_rows(partial_path, dtype, row_shape, rows):
  """Whether ``partial_path`` is an unfinished NpyRowWriter file of this dtype and row shape
  holding at least ``rows`` rows (its header still says 0 rows: it was never finished)."""
  row_shape = tuple(int(d) for d in row_shape)
  try:
    with open(partial_path, 'rb') as f:
      header = f.read(_HEADER_BYTES)
      size = os.fstat(f.fileno()).st_size
  except OSError:
    return False
  row_bytes = np.dtype(dtype).itemsize * math.prod(row_shape)
  return header == _npy_header(dtype, (0,) + row_shape) and size >= _HEADER_BYTES + rows * row_bytes


class NpyRowWriter:
  """Streams rows of a 1-D or 2-D array into a real ``.npy`` file.

  Rows are appended with ``write(block)``; the row count need not be known in advance. The data
  goes to ``partial_path`` (default ``<path>.<pid>-<random>.partial``, unique to this writer) and
  is renamed to ``path`` by ``close()``, so a killed job never leaves a file that looks complete
  and two writers of one path never share a partial file. Whatever fails, including ``close()``
  itself on a full disk, the partial file is removed; ``abort()`` removes it and never raises.

  ``resume_rows`` > 0 reopens an existing ``partial_path`` (checked with ``holds_rows``) and
  keeps exactly its first ``resume_rows`` rows.
  """

  def __init__(self, path, dtype, row_shape=(), partial_path=None, resume_rows=0):
    self.path = path
    self.dtype = np.dtype(dtype)
    self.row_shape = tuple(int(d) for d in row_shape)
    self.partial_path = partial_path or f'{path}.{os.getpid()}-{secrets.token_hex(4)}' \
                                        f'{PARTIAL_SUFFIX}'
    self.row_bytes = self.dtype.itemsize * math.prod(self.row_shape)
    self.num_rows = 0
    self._file = None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
      if resume_rows:
        self._file = open(self.partial_path, 'r+b')  # noqa: SIM115 -- open across write() calls
        self._file.truncate(_HEADER_BYTES + resume_rows * self.row_bytes)
        self._file.seek(0, os.SEEK_END)
        self.num_rows = int(resume_rows)
      else:
        self._file = open(self.partial_path, 'wb')  # noqa: SIM115 -- open across write() calls
        self._file.write(self._header(0))
    except BaseException:
      self.abort()
      raise

  def _header(self, rows):
    return _npy_header(self.dtype, (rows,) + self.row_shape)

  def write(self, block):
    """Appends ``block`` of shape [rows] + row_shape (cast to the file's dtype)."""
    block = np.ascontiguousarray(block, dtype=self.dtype)
    if block.shape[1:] != self.row_shape:
      raise ValueError(f'{self.path}: expected rows of shape {self.row_shape}, '
                       f'got a block of shape {block.shape}')
    self._file.write(block.tobytes())
    self.num_rows += block.shape[0]

  def sync(self):
    """Flushes the rows written so far to the disk (fsync)."""
    self._file.flush()
    os.fsync(self._file.fileno())

  def finalize(self, sync=False):
    """Writes the row count into the header and closes the partial file (fsync'd if ``sync``)."""
    try:
      self._file.seek(0)
      self._file.write(self._header(self.num_rows))
      if sync:
        self.sync()
      self._file.close()
    except BaseException:
      self.abort()
      raise

  def publish(self):
    """Renames the finalized partial file to ``path``."""
    try:
      os.replace(self.partial_path, self.path)
    except BaseException:
      self.abort()
      raise

  def close(self, sync=False):
    """finalize() then publish(): the complete file appears under its real name."""
    self.finalize(sync)
    self.publish()

  def abort(self):
    """Closes and removes the partial file; never raises (closing may fail on a full disk)."""
    try:
      if self._file is not None:
        self._file.close()   # Closes the descriptor even when flushing the buffer fails.
    except Exception:  # noqa: BLE001 -- ENOSPC again while flushing: the file goes anyway
      pass
    try:
      dump_layout.remove_quietly(self.partial_path)
    except OSError as e:
      _log.warning('could not remove %s: %s', self.partial_path, e)


# -------------------------------------------------------------------------------------------------
# The manifest.


class SplitDump:
  """Writes one split's labels and per-exit probabilities: resumable after a kill, safe beside
  other dumps into the same folder.

  Files of the job, in ``<softmax_dir>/<split>/``: ``<final name>.<job_key>.partial`` (the rows),
  ``<job_key>.progress.json`` (the rows known to be on disk) and ``<job_key>.lock`` (held while
  the job runs). ``commit()`` makes the rows written so far survive a kill; a new ``SplitDump``
  with the same ``job_key`` then starts at ``rows_done`` (the caller skips that many images) and
  the finished files are byte for byte those of an uninterrupted dump. On an error the caller
  calls ``abort()``.

  Args:
    softmax_dir: the dump folder.
    split: 'validation' or 'train'.
    exits: exit ids to write.
    num_classes: C, the width of every probability row.
    job_key: a short name of the job ([A-Za-z0-9_.-], at most 100 characters), derived by the
      caller from checkpoint, split and exits, so that a rerun of the same job finds its files.

  Raises:
    DumpError: another process runs the same job now (the message names its pid), or the
      job's progress file records other exits or another class count.
  """

  def __init__(self, softmax_dir, split, exits, num_classes, job_key):
    if not isinstance(job_key, str) or not _JOB_KEY_RE.match(job_key):
      raise ValueError(f'job_key must be 1-100 characters of [A-Za-z0-9_.-] not starting with '
                       f'a dot, got {job_key!r}')
    self.softmax_dir, self.split, self.job_key = softmax_dir, split, job_key
    self.exits = sorted({int(e) for e in exits})
    self.num_classes = int(num_classes)
    folder = dump_layout.split_dir(softmax_dir, split)
    os.makedirs(folder, exist_ok=True)
    self._progress_path = os.path.join(folder, job_key + PROGRESS_SUFFIX)
    self._lock = dump_layout.FileLock(os.path.join(folder, job_key + LOCK_SUFFIX))
    try:
      self._lock.acquire(blocking=False)
    except BlockingIOError:
      raise DumpError(f'another process (pid {self._lock.holder()}) is running the dump job '
                      f'{job_key} into {folder}; wait for it to finish or stop it') from None
    self._writers = {}   # final path -> NpyRowWriter, labels first
    try:
      self.rows_done = self._resume_point()
      if not self.rows_done:
        dump_layout.remove_quietly(self._progress_path)   # stale: its rows are gone
      for path, dtype, row_shape in self._files():
        self._writers[path] = NpyRowWriter(path, dtype, row_shape, self._partial(path),
                                           self.rows_done)
      self._labels = self._writers[dump_layout.labels_path(softmax_dir, split)]
    except BaseException:
      self.abort()
      raise

  def _partial(self, path):
    return f'{path}.{self.job_key}{PARTIAL_SUFFIX}'

  def _files(self):
    """(final path, dtype, row shape) of every file of the job, labels first."""
    yield dump_layout.labels_path(self.softmax_dir, self.split), np.int32, ()
    for e in self.exits:
      yield (dump_layout.probabilities_path(self.softmax_dir, self.split, e), np.float32,
             (self.num_classes,))

  def _resume_point(self):
    """Rows a killed run of this job committed, if all its partial files still hold them."""
    try:
      with open(self._progress_path) as f:
        progress = json.load(f)
      rows = int(progress['rows'])
    except FileNotFoundError:
      return 0
    except (ValueError, KeyError, TypeError) as e:
      _log.warning('%s is unreadable (%s); dumping %s from the start', self._progress_path, e,
                   self.split)
      return 0
    if progress.get('exits') != self.exits or progress.get('num_classes') != self.num_classes:
      raise DumpError(f'{self._progress_path}: job {self.job_key} was started for exits '
                      f'{progress.get("exits")} with {progress.get("num_classes")} classes, not '
                      f'exits {self.exits} with {self.num_classes}; give each job its own '
                      'job_key, or delete the file to start this one afresh')
    for path, dtype, row_shape in self._files():
      if not holds_rows(self._partial(path), dtype, row_shape, rows):
        _log.warning('%s lacks the %d rows %s records; dumping %s from the start',
                     self._partial(path), rows, self._progress_path, self.split)
        return 0
    _log.info('resuming the %s dump (job %s) after %d rows', self.split, self.job_key, rows)
    return rows

  def write(self, labels, probabilities):
    """Appends one batch.

    Args:
      labels: int [n] class ids.
      probabilities: {exit_id: float32 [n, num_classes]} with exactly this dump's exits.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
      raise ValueError(f'labels must be [n], got shape {labels.shape}')
    if sorted(probabilities) != self.exits:
      raise ValueError(f'expected probabilities of exits {self.exits}, got {sorted(probabilities)}')
    for exit_id, p in probabilities.items():
      if np.shape(p) != (labels.size, self.num_classes):
        raise ValueError(f'exit {exit_id}: expected probabilities of shape '
                         f'{(labels.size, self.num_classes)}, got {np.shape(p)}')
    # Checked before anything is written, so the files always hold the same number of rows.
    self._labels.write(labels)
    for exit_id in self.exits:
      self._writers[dump_layout.probabilities_path(self.softmax_dir, self.split, exit_id)].write(
          probabilities[exit_id])

  def commit(self):
    """Flushes and fsyncs every file, then records rows_done atomically.

    After it returns, a SIGKILL (or a power cut) loses none of the rows written so far.
    """
    for writer in self._writers.values():
      writer.sync()
    # The rows every file holds: a write() interrupted between files (Ctrl-C) left some ahead.
    rows = min(writer.num_rows for writer in self._writers.values())
    dump_layout.write_json_atomically(self._progress_path, {'job_key': self.job_key, 'rows': rows,
                                                 'exits': self.exits,
                                                 'num_classes': self.num_classes})
    self.rows_done = rows

  def finish(self, manifest_common, expected_images=None):
    """Moves the files to their final names and merges the manifest (under its lock).

    Args:
      manifest_common: split-independent manifest fields (see merge_manifest).
      expected_images: the split's nominal size, to warn when another count was written.

    Returns:
      The number of rows written.
    """
    try:
      if len({writer.num_rows for writer in self._writers.values()}) > 1:
        raise DumpError(f'the files of dump job {self.job_key} hold different row counts (a '
                        'write() was interrupted); re-run the dump')
      # Every file is complete and on disk before the first one replaces an older dump.
      for writer in self._writers.values():
        writer.finalize(sync=True)
      for writer in self._writers.values():
        writer.publish()
      dump_layout.fsync_dir(dump_layout.split_dir(self.softmax_dir, self.split))
    except BaseException:
      self.abort()
      raise
    rows = self._labels.num_rows
    if expected_images is not None and rows != expected_images:
      _log.warning('dumped %d %s images, but the data set nominally has %d', rows, self.split,
                   expected_images)
    try:
      dump_layout.merge_manifest(self.softmax_dir, self.split, rows, self.exits, manifest_common)
    finally:
      self.abort()   # Only the progress and lock files are left to remove.
    return rows

  def abort(self):
    """Removes this job's partial and progress files and releases its lock; never raises."""
    for writer in self._writers.values():
      writer.abort()
    try:
      dump_layout.remove_quietly(self._progress_path)
    except OSError as e:
      _log.warning('could not remove %s: %s', self._progress_path, e)
    try:
      self._lock.release()
    except OSError as e:
      _log.warning('could not release %s: %s', self._lock.path, e)


# -------------------------------------------------------------------------------------------------
# Sharded dumps: each worker writes a part; the last one to finish joins them.


PARTS_DIR = '.parts'   # hidden from the analysis, which reads <softmax_dir>/<split>/ only


def part_dir(softmax_dir, job_key, part, num_parts):
  """The dump folder of one part of a sharded job (a small dump of its own)."""
  return os.path.join(softmax_dir, PARTS_DIR, job_key, f'part-{part:05d}-of-{num_parts:05d}')


def part_rows(num_images, batch_size, part, num_parts):
  """Rows [start, end) of part ``part`` of ``num_parts`` of a split; end None: to its end.

  Parts are whole global batches, so each part's batches are those of a one-process dump and the
  joined files are byte for byte the one-process dump. The last part reads to the end of the
  split, whatever its count.
  """
  batches = -(-num_images // batch_size)
  start = batch_size * (part * batches // num_parts)
  end = None if part == num_parts - 1 else batch_size * ((part + 1) * batches // num_parts)
  return start, end


def join_parts(softmax_dir, split, exits, job_key, num_parts, manifest_common, check_count=None,
               chunk_rows=65536):
  """Joins the parts of a sharded dump into the split's files, once every part is complete.

  Runs under a lock, so of several workers that finish at once one joins and the others find
  the split done. The manifest records how the dump was made (``made_of_parts``).

  Returns:
    The split's rows, or None while parts are missing (their workers have not finished).
  """
  folder = os.path.join(softmax_dir, PARTS_DIR, job_key)
  checkpoint = manifest_common['checkpoint']
  with dump_layout.FileLock(folder + LOCK_SUFFIX):
    if set(exits) <= dump_layout.completed_exits(softmax_dir, split, checkpoint):
      return dump_layout.read_manifest(softmax_dir)['splits'][split]['num_images']
    parts = [part_dir(softmax_dir, job_key, k, num_parts) for k in range(num_parts)]
    missing = [k for k, d in enumerate(parts)
               if not set(exits) <= dump_layout.completed_exits(d, split, checkpoint)]
    if missing:
      _log.info('dump %s: part(s) %s of %d not finished yet; the worker finishing last joins '
                'them', split, missing, num_parts)
      return None
    files = [(dump_layout.labels_path, np.int32, ())] + [
        (lambda d, s, e=e: dump_layout.probabilities_path(d, s, e), np.float32, None)
        for e in sorted(exits)]
    writers = []
    try:
      for path_of, dtype, row_shape in files:
        arrays = [np.load(path_of(d, split), mmap_mode='r') for d in parts]
        writer = NpyRowWriter(path_of(softmax_dir, split), dtype,
                              arrays[0].shape[1:] if row_shape is None else row_shape)
        writers.append(writer)
        for array in arrays:
          for start in range(0, len(array), chunk_rows):
            writer.write(array[start:start + chunk_rows])
      rows = writers[0].num_rows
      if check_count is not None:
        check_count(rows)
      for writer in writers:
        writer.finalize(sync=True)
      for writer in writers:
        writer.publish()
    except BaseException:
      for writer in writers:
        writer.abort()
      raise
    dump_layout.merge_manifest(softmax_dir, split, rows, exits,
                               dict(manifest_common, made_of_parts=num_parts))
    shutil.rmtree(folder, ignore_errors=True)
  with contextlib.suppress(OSError):   # the parts folder, unless another job's parts are there
    os.rmdir(os.path.dirname(folder))
  _log.info('dump %s: joined %d parts into %d rows', split, num_parts, rows)
  return rows
