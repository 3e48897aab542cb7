"""Layout of the softmax dumps: the one contract between the run loop and the analysis.

It names the files, owns the manifest (``read_manifest``, ``merge_manifest``) and finds a dump
again (``split_exits``, ``completed_exits``, ``find_current``); ``dump_writer`` writes the rows.
It needs only numpy (no TensorFlow), so the analysis can import it on a laptop.

A dump folder (``--softmax_dir``, default ``output_softmax/``) holds::

    manifest.json                       model, checkpoint, global step, class count,
                                        per-stage MACs, image count and exits per split
    <split>/labels.npy                  int32 [N]               ground-truth class ids
    <split>/clf<k>_probabilities.npy    float32 [N, num_classes] softmax of exit k

``<split>`` is ``validation`` or ``train``. Row i of every file of a split is the same image.
The ``.npy`` files are real numpy arrays (``np.load(..., mmap_mode='r')`` works) written row
block by row block, so a 1.28M x 1001 array is never held in memory.

Several dumps may write into one folder at once (e.g. ``--classifier_id 0`` and ``1``). So a file
appears under its final name only once it is complete; until then it is
``<name>.<tag>.partial``, with a tag of its own writer (``dump_writer.SplitDump``: the job key,
so that a rerun of a killed job finds its rows again; ``NpyRowWriter``: process id and random). The
manifest is read, merged and replaced under a lock (``manifest.json.lock``, ``fcntl.flock``), so
concurrent dumps never lose each other's exits.
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import secrets

import numpy as np

MANIFEST_NAME = 'manifest.json'
LABELS_NAME = 'labels.npy'
SPLITS = ('validation', 'train')
MANIFEST_VERSION = 1
PARTIAL_SUFFIX = '.partial'
LOCK_SUFFIX = '.lock'
PROGRESS_SUFFIX = '.progress.json'
# Facts of the run that wrote a dump, as opposed to facts of the model and data set.
RUN_FIELDS = ('checkpoint', 'global_step', 'pretrained_global_step', 'made_of_parts')

_PROBABILITIES_RE = re.compile(r'^clf(\d+)_probabilities\.npy$')
# '<final name>.partial' (older writers, hand renames) or '<final name>.<tag>.partial'.
_PARTIAL_RE = re.compile(r'^(?P<target>.+?\.(?:npy|json))(?:\..+)?' + re.escape(PARTIAL_SUFFIX)
                         + '$')

_log = logging.getLogger(__name__)


class DumpError(ValueError):
  """A problem with the dumps or the arguments; the message names the file and the fix."""


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


def partial_target(name):
  """The final file name a partial file ``name`` is being written for, or None if not partial."""
  match = _PARTIAL_RE.match(name)
  return match.group('target') if match else None


def split_exits(softmax_dir, split):
  """Exit ids, ascending, whose final probabilities file exists in ``<softmax_dir>/<split>/``."""
  folder = split_dir(softmax_dir, split)
  if not os.path.isdir(folder):
    return []
  return sorted(int(m.group(1)) for m in map(_PROBABILITIES_RE.match, os.listdir(folder)) if m)


def remove_quietly(path):
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


def fsync_dir(folder):
  """Makes the renames in ``folder`` durable (a rename lives in the folder, not in the file)."""
  handle = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(handle)
  finally:
    os.close(handle)


def write_json_atomically(path, content):
  """Writes JSON through a uniquely named temporary beside ``path``, fsync'd, then renamed."""
  folder = os.path.dirname(os.path.abspath(path))
  temporary = f'{path}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}'
  # O_EXCL: never another writer's file; mode 0o666 less the umask, as open() would give.
  handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(handle, 'w') as f:
      json.dump(content, f, indent=2, sort_keys=True)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    remove_quietly(temporary)
    raise
  fsync_dir(folder)


class FileLock:
  """An exclusive ``fcntl.flock`` on ``path``; the file is created to lock and removed on release.

  The kernel drops the lock when its holder dies (even by SIGKILL), so a lock file left behind
  by a killed process locks nothing.
  """

  def __init__(self, path):
    self.path = path
    self._fd = None

  def acquire(self, blocking=True):
    """Takes the lock; with ``blocking=False`` raises BlockingIOError if another holds it."""
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        # The previous holder removes the file on release: if it did so after we opened it, our
        # lock is on a file nobody else can open any more. Lock the current one instead.
        current = os.stat(self.path)
        mine = os.fstat(fd)
        if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
          self._fd = fd
          os.ftruncate(fd, 0)
          os.write(fd, str(os.getpid()).encode())
          return self
      except FileNotFoundError:
        pass
      except BaseException:
        os.close(fd)
        raise
      os.close(fd)

  def holder(self):
    """The pid the process holding the lock wrote into the file ('unknown' if unreadable)."""
    try:
      with open(self.path) as f:
        return f.read().strip() or 'unknown'
    except OSError:
      return 'unknown'

  def __del__(self):
    # Dropped without release(), as by a killed holder: the lock goes, the file stays.
    if self._fd is not None:
      with contextlib.suppress(Exception):
        os.close(self._fd)

  def release(self):
    if self._fd is None:
      return
    try:
      remove_quietly(self.path)   # while still holding it: see acquire()
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *unused_exc_info):
    self.release()


# -------------------------------------------------------------------------------------------------
# Writing.


def read_manifest(softmax_dir):
  """Returns the manifest dict, or None when the folder has none (e.g. the original's dumps).

  Raises:
    DumpError: the file is not a JSON object (damaged, cut short).
  """
  path = manifest_path(softmax_dir)
  if not os.path.exists(path):
    return None
  fix = (f'restore it, or re-run the dumps into an empty --softmax_dir (it describes every dump '
         f'in {softmax_dir})')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise DumpError(f'{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): '
                    f'it is damaged or was cut short; {fix}') from e
  except (OSError, UnicodeDecodeError) as e:
    raise DumpError(f'{path}: cannot read it ({e}); {fix}') from e
  if not isinstance(manifest, dict):
    raise DumpError(f'{path} holds a JSON {type(manifest).__name__}, not the manifest object; '
                    f'{fix}')
  return manifest


def write_manifest(softmax_dir, manifest):
  """Writes ``manifest`` atomically (uniquely named temporary file, fsync, rename)."""
  os.makedirs(softmax_dir, exist_ok=True)
  write_json_atomically(manifest_path(softmax_dir), manifest)


def merge_manifest(softmax_dir, split, num_images, exit_ids, common):
  """Records that ``split`` now holds ``num_images`` rows for ``exit_ids``.

  ``common`` holds the split-independent facts (model, checkpoint, global step, num_classes,
  stage_macs, ...). Exits written earlier by another run stay listed, so runs for different
  classifier ids can share one folder, also at the same time: the read-merge-write runs under
  the manifest's lock. The top-level run fields (``RUN_FIELDS``) describe the latest run;
  ``exit_sources[split][exit]`` keeps, for every file, the run that wrote it.
  """
  os.makedirs(softmax_dir, exist_ok=True)
  with FileLock(manifest_path(softmax_dir) + LOCK_SUFFIX):
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


# -------------------------------------------------------------------------------------------------
# A resumable dump of one split.


def _npy_rows(path):
  """Row count of a real .npy file (its header only), or None if it is not one."""
  try:
    return int(np.load(path, mmap_mode='r').shape[0])
  except (OSError, ValueError, IndexError):
    return None


def completed_exits(softmax_dir, split, checkpoint):
  """Exits of ``split`` already dumped from ``checkpoint``: a rerun need not dump them again.

  An exit counts when its final file exists and has the manifest's row count for the split (as
  has labels.npy), and the manifest records it as written from ``checkpoint``.

  Returns:
    set of int exit ids.

  Raises:
    DumpError: the manifest is not valid JSON.
  """
  manifest = read_manifest(softmax_dir) or {}
  entry = manifest.get('splits', {}).get(split, {})
  rows = entry.get('num_images')
  if rows is None or _npy_rows(labels_path(softmax_dir, split)) != rows:
    return set()
  sources = manifest.get('exit_sources', {}).get(split, {})
  return {e for e in split_exits(softmax_dir, split)
          if e in entry.get('exits', []) and sources.get(str(e), {}).get('checkpoint') == checkpoint
          and _npy_rows(probabilities_path(softmax_dir, split, e)) == rows}


# -------------------------------------------------------------------------------------------------
# Locating the dumps of the current layout, for the analysis.


@dataclasses.dataclass
class SplitDumps:
  name: str
  label_paths: list          # every label file found for the split; they must agree
  exits: list                # exits[k] = paths of exit k's probability files, in row order


@dataclasses.dataclass
class Dumps:
  softmax_dir: str
  layout: str                # 'current' (this module) or 'original' (legacy_dumps)
  manifest: dict | None
  num_exits: int | None
  splits: dict               # split name -> SplitDumps, only complete splits with labels
  pending: dict = dataclasses.field(default_factory=dict)
  # pending: split name -> why it cannot be read yet (a file it needs is still being written)


def contiguous_exits(found, where):
  """Checks that ``found`` (a set of exit ids) is 0..K-1 and returns K."""
  expected = set(range(max(found) + 1))
  if found != expected:
    missing = ', '.join(f'clf{k}' for k in sorted(expected - found))
    raise DumpError(f'{where}: probabilities of {missing} are missing (found '
                    f'{", ".join(f"clf{k}" for k in sorted(found))}); dump every exit')
  return len(found)


def _needed(name, num_exits):
  """Whether the analysis needs the file ``name`` of a split with ``num_exits`` (None: unknown)."""
  match = _PROBABILITIES_RE.match(name)
  return name == LABELS_NAME or bool(match and (num_exits is None
                                                or int(match.group(1)) < num_exits))


def find_current(softmax_dir, manifest, extra_label_paths=None):
  """Finds the dumps of the current layout and checks that each split's set is complete.

  Only the files the analysis needs count: labels.npy and clf0..clf<K-1>. If one of them is
  missing while a partial file of it exists, another dump is writing it and the split is pending;
  partial files of complete files (another job rewriting them) are ignored.

  Args:
    softmax_dir: the dump folder.
    manifest: its manifest dict, or None.
    extra_label_paths: split -> more label files that must agree (the original's pickles).

  Returns:
    Dumps with layout 'current'; its ``splits`` and ``pending`` are empty if there is none.

  Raises:
    DumpError: a split lacks a file and nobody is writing it.
  """
  splits, pending = {}, {}
  num_exits = manifest.get('num_exits') if manifest else None
  exits_source = 'the manifest'
  listed = manifest.get('splits', {}) if manifest else {}
  for split in SPLITS:
    folder = split_dir(softmax_dir, split)
    if not os.path.isdir(folder):
      if split in listed:
        raise DumpError(f'{manifest_path(softmax_dir)} lists the split "{split}" but {folder} '
                        'does not exist; re-run the dump or fix the manifest')
      continue
    names = set(os.listdir(folder))
    written = sorted(n for n in names if (target := partial_target(n)) and target not in names
                     and _needed(target, num_exits))
    if written:
      pending[split] = (f'{os.path.join(folder, partial_target(written[0]))} is still being '
                        f'written ({", ".join(written)}), or the dump writing it was killed; '
                        'wait for the dump to finish, or re-run it')
      continue
    found = set(split_exits(softmax_dir, split))
    if not found:
      if LABELS_NAME in names or split in listed:
        raise DumpError(f'missing dump {probabilities_path(softmax_dir, split, 0)} ({folder} '
                        'holds no probabilities); re-run the dump of this split')
      continue
    k = contiguous_exits(found, folder)
    if num_exits is None:
      num_exits, exits_source = k, f'{split}/'
    elif k != num_exits:
      missing = [probabilities_path(softmax_dir, split, e)
                 for e in range(num_exits) if e not in found]
      if missing:
        raise DumpError(f'missing dump {missing[0]} ({exits_source} has {num_exits} exits); '
                        'dump that exit for this split')
      raise DumpError(f'{folder} holds {k} exits but {exits_source} has {num_exits}')
    label_paths = [labels_path(softmax_dir, split)] if LABELS_NAME in names else []
    label_paths += (extra_label_paths or {}).get(split, [])
    if not label_paths:
      raise DumpError(f'missing labels {labels_path(softmax_dir, split)}; the run loop writes it '
                      'with the probabilities: re-run the dump of this split')
    exits = [[probabilities_path(softmax_dir, split, e)] for e in range(num_exits)]
    splits[split] = SplitDumps(name=split, label_paths=label_paths, exits=exits)
  return Dumps(softmax_dir=softmax_dir, layout='current', manifest=manifest, num_exits=num_exits,
               splits=splits, pending=pending)
