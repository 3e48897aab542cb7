"""Turns the softmax dumps into the article's results: exit accuracies, thresholds, cascade curves.

Usage::

    python analyze_imagenet_labels.py --softmax_dir output_softmax --output_dir cascade_report
    python analyze_imagenet_labels.py -softmax_dir_to_validate_against output_softmax \\
        -dataset_path Imagenet_tools            # the original's command line, old dumps

Needs numpy, matplotlib, tqdm and absl only (no TensorFlow), and reads the 15 GB of ImageNet train
dumps in row chunks, keeping only a few numbers per image, so it runs in well under 2 GB of RAM.

Inputs
------
The dump layout of ``dump_layout.py`` (``<softmax_dir>/<split>/labels.npy``,
``<split>/clf<k>_probabilities.npy``, ``manifest.json`` with per-stage MACs), or the original
repository's layout: pickled ``clf<k>_all_probabilities.npy`` (validation) and
``clf<k>_train_<i>of3_all_probabilities.npy`` (train) in ``softmax_dir``, with the labels
``validation_non_onehot.npy`` / ``train_non_onehot.npy`` in ``-dataset_path`` (or ``softmax_dir``).
Without a manifest the article's ResNet-50 MAC counts are used (``ARTICLE_STAGE_MACS``).

Definitions
-----------
Per row of an exit's probabilities p [num_classes] with label y:

* top-1 confidence: max(p). top-5 confidence: the sum of the 5 largest entries of p, computed in
  float32 in a fixed order: the 5 values sorted ascending and added left to right
  (((p5 + p4) + p3) + p2) + p1. The exported TensorFlow model computes
  ``tf.reduce_sum(tf.math.top_k(p, 5).values)``, whose summation order may differ by a few ulps.
* correct (top-1): p[y] >= max(p); correct (top-5): p[y] >= the 5th largest entry of p. A class
  tied with the k-th largest value counts as in the top k, the rule of ``tf.nn.in_top_k`` behind
  the run loop's accuracy metrics. (The original's all-zero padding rows with label 0 are counted
  correct, as the original did.)

Threshold rule, per exit, on the calibration split (N samples with confidence c and correctness y):

* residual accuracy alpha(delta) = mean of y over the samples with c >= delta. It is evaluated
  only at the distinct values of c, so tied samples are always in or out together.
* target(epsilon) = max over delta of alpha(delta), minus epsilon (epsilon is a fraction).
* delta(epsilon) = the smallest distinct confidence value with alpha(delta) >= target and
  alpha(delta) > 0. If every sample is wrong (alpha is 0 everywhere) the exit must never take a
  sample: its threshold is ``NEVER_EXIT_THRESHOLD`` = 2.0, above any confidence (a top-5 sum can
  exceed 1.0 by rounding, never 2.0), which keeps the JSON plain numbers.

The confidences are sorted once per exit; every epsilon is then a binary search on the running
maximum of alpha, so all epsilons cost O(N log N) per exit together.

Cascade, on the evaluation split: a sample leaves at the first exit k whose confidence reaches its
threshold (c_k >= delta_k); the last exit takes everything left, unconditionally. A sample leaving
at exit k costs sum(stage_macs[:k + 1]). Reported: accuracy (top-1 accuracy in top-1 mode, top-5
in top-5 mode), mean MACs per image, speedup = plain_macs / mean MACs, MAC reduction =
1 - mean MACs / plain_macs, and the share of images leaving at each exit. The global-threshold
baseline uses one threshold for all early exits, scanned over 0.00, 0.01, ..., 1.00.

thresholds.json
---------------
::

    {
      "format_version": 1,
      "num_classes": 1001, "num_exits": 3,
      "stage_macs": [s0, s1, s2],          # incremental MACs of each stage (int)
      "cumulative_macs": [s0, s0+s1, ...], # cost of leaving at each exit
      "plain_macs": 4037883817,            # the network without exit heads: speedup baseline
      "calibration_split": "train", "evaluation_split": "validation",
      "num_images": {"train": N, "validation": M},
      "never_exit_threshold": 2.0,
      "exit_accuracy": {"validation": [{"exit": 0, "top1": a, "top5": b}, ...], "train": [...]},
      "top1": [                            # one entry per epsilon, ascending; "top5" alike
        {"epsilon": 0.05,
         "thresholds": [delta_0, delta_1], # one per early exit (not the last), compare with >=
         "accuracy": 0.7590, "mean_macs": 3.49e9, "speedup": 1.158, "mac_reduction": 0.136,
         "exit_shares": [f0, f1, f2]},     # fractions of images leaving at each exit
        ...],
      "global_threshold": {"top1": [{"threshold": t, "accuracy": ..., "mean_macs": ...,
                                     "speedup": ..., "mac_reduction": ..., "exit_shares": [...]},
                                    ...], "top5": [...]},
      "source": {"softmax_dir": ..., "layout": "current" or "original", "model": ..., ...}
    }

A report made with ``--top5`` has no ``top1`` key. Thresholds are float32 confidences written as
exact decimal expansions; confidences and thresholds are compared in float32, offline as in the
exported model. ``load_thresholds``, ``confidence`` and ``cascade_exit_index`` are the pieces the
early-exit exporter imports.
"""

import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

import dump_layout

# The article's ResNet-50 v2 costs (MAC_count_calculations.xlsx, sheet "Imagenet"), used when the
# dumps carry no manifest (the original's dumps): incremental MACs of the three stages (stem to
# exit 0, group 3 and exit-1 head, group 4 and final layer) and of the plain network.
ARTICLE_STAGE_MACS = (1_817_092_009, 1_467_571_177, 759_970_793)
ARTICLE_PLAIN_MACS = 4_037_883_817

MODES = ('top1', 'top5')
# Epsilon grids of the article, as fractions (the original's defaults 0..20 were wrong units).
DEFAULT_EPSILONS = {
    'top1': tuple(round(0.01 * i, 2) for i in range(21)),
    'top5': (0.0, 0.01, 0.016, 0.017, 0.018, 0.019, 0.02, 0.025, 0.026, 0.027, 0.028, 0.03, 0.04,
             0.051, 0.052, 0.053, 0.054, 0.06, 0.07),
}
GLOBAL_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(101))
NEVER_EXIT_THRESHOLD = 2.0
EPSILON_TOLERANCE = 1e-6
THRESHOLDS_FORMAT_VERSION = 1
TOP_K = 5
RELIABILITY_BINS = 200
# top_values: blocks for the lower bound, and candidates kept per row before falling back.
_BOUND_BLOCKS = 7
_CANDIDATE_WIDTH = 16

THRESHOLDS_JSON = 'thresholds.json'
CASCADE_CSV = 'cascade.csv'
RELIABILITY_PNG = 'reliability.png'
ACCURACY_PNG = 'accuracy_vs_gmacs_{mode}.png'

# The original repository's file names (section 5.4 and 6 of its description).
_LEGACY_VALIDATION_RE = re.compile(r'^clf(\d+)_all_probabilities\.npy$')
_LEGACY_TRAIN_RE = re.compile(r'^clf(\d+)_train_(\d+)of(\d+)_all_probabilities\.npy$')
_LEGACY_LABELS = {'validation': 'validation_non_onehot.npy', 'train': 'train_non_onehot.npy'}
_CURRENT_PROBABILITIES_RE = re.compile(r'^clf(\d+)_probabilities\.npy$')


class DumpError(ValueError):
  """A problem with the dumps or the arguments; the message names the file and the fix."""


# -------------------------------------------------------------------------------------------------
# Locating the dumps.


@dataclasses.dataclass
class ProbabilityPart:
  """One file holding consecutive rows of an exit's probabilities.

  ``offset`` is the byte offset of row 0 in a real .npy file (read memory-mapped); it is None for
  the original's pickles, whose shape is only known once loaded.
  """
  path: str
  num_rows: int | None = None
  num_classes: int | None = None
  dtype: np.dtype | None = None
  offset: int | None = None

  @property
  def is_pickle(self):
    return self.offset is None


@dataclasses.dataclass
class SplitDumps:
  name: str
  label_paths: list          # every label file found for the split; they must agree
  exits: list                # exits[k] = list of ProbabilityPart of exit k, in row order


@dataclasses.dataclass
class Dumps:
  softmax_dir: str
  layout: str                # 'current' (dump_layout.py) or 'original'
  manifest: dict | None
  num_exits: int
  splits: dict               # split name -> SplitDumps, only splits with labels


def _inspect_npy(path):
  """Returns a ProbabilityPart for ``path``, reading only the header of a real .npy file."""
  try:
    array = np.load(path, mmap_mode='r')
  except ValueError as e:
    if 'pickle' in str(e):
      return ProbabilityPart(path=path)   # the original's pickled arrays
    raise DumpError(f'{path}: not a readable .npy file ({e}); re-create the dump') from e
  except OSError as e:
    raise DumpError(f'{path}: cannot read it ({e})') from e
  if array.ndim != 2:
    raise DumpError(f'{path}: expected a [num_images, num_classes] array, got shape '
                    f'{array.shape}; is this a probability dump?')
  if not array.flags.c_contiguous:
    raise DumpError(f'{path}: stored in Fortran order; re-save it row-major (np.save of '
                    'np.ascontiguousarray) so it can be read row by row')
  if not np.issubdtype(array.dtype, np.floating):
    raise DumpError(f'{path}: probabilities must be floating point, got {array.dtype}')
  part = ProbabilityPart(path=path, num_rows=int(array.shape[0]),
                         num_classes=int(array.shape[1]), dtype=array.dtype,
                         offset=int(array.offset))
  del array
  return part


def _legacy_label_paths(split, softmax_dir, dataset_path):
  name = _LEGACY_LABELS[split]
  folders = [d for d in (dataset_path, softmax_dir) if d]
  return [os.path.join(d, name) for d in folders if os.path.isfile(os.path.join(d, name))]


def _contiguous_exits(found, where):
  """Checks that ``found`` (a set of exit ids) is 0..K-1 and returns K."""
  expected = set(range(max(found) + 1))
  if found != expected:
    missing = ', '.join(f'clf{k}' for k in sorted(expected - found))
    raise DumpError(f'{where}: probabilities of {missing} are missing (found '
                    f'{", ".join(f"clf{k}" for k in sorted(found))}); dump every exit')
  return len(found)


def _find_current(softmax_dir, dataset_path, manifest):
  splits = {}
  num_exits = manifest.get('num_exits') if manifest else None
  exits_source = 'the manifest'
  for split in dump_layout.SPLITS:
    folder = dump_layout.split_dir(softmax_dir, split)
    if not os.path.isdir(folder):
      if manifest and split in manifest.get('splits', {}):
        raise DumpError(f'{dump_layout.manifest_path(softmax_dir)} lists the split "{split}" but '
                        f'{folder} does not exist; re-run the dump or fix the manifest')
      continue
    names = os.listdir(folder)
    partial = sorted(n for n in names if n.endswith('.partial'))
    if partial:
      raise DumpError(f'{folder}: {", ".join(partial)} still being written (or the dump was '
                      'killed); wait for the run to finish or re-run the dump')
    found = {int(m.group(1)) for m in map(_CURRENT_PROBABILITIES_RE.match, names) if m}
    if not found:
      if dump_layout.LABELS_NAME in names or (manifest and split in manifest.get('splits', {})):
        raise DumpError(f'missing dump {dump_layout.probabilities_path(softmax_dir, split, 0)} '
                        f'({folder} holds no probabilities); re-run the dump of this split')
      continue
    k = _contiguous_exits(found, folder)
    if num_exits is None:
      num_exits, exits_source = k, f'{split}/'
    elif k != num_exits:
      missing = [dump_layout.probabilities_path(softmax_dir, split, e)
                 for e in range(num_exits) if e not in found]
      if missing:
        raise DumpError(f'missing dump {missing[0]} ({exits_source} has {num_exits} exits); '
                        'dump that exit for this split')
      raise DumpError(f'{folder} holds {k} exits but {exits_source} has {num_exits}')
    label_paths = []
    if os.path.isfile(dump_layout.labels_path(softmax_dir, split)):
      label_paths.append(dump_layout.labels_path(softmax_dir, split))
    label_paths += _legacy_label_paths(split, None, dataset_path)
    if not label_paths:
      raise DumpError(f'missing labels {dump_layout.labels_path(softmax_dir, split)}; the run '
                      'loop writes it with the probabilities: re-run the dump of this split')
    exits = [[_inspect_npy(dump_layout.probabilities_path(softmax_dir, split, e))]
             for e in range(num_exits)]
    splits[split] = SplitDumps(name=split, label_paths=label_paths, exits=exits)
  return splits, num_exits


def _find_legacy(softmax_dir, dataset_path):
  names = os.listdir(softmax_dir)
  validation = {int(m.group(1)): name for name in names
                if (m := _LEGACY_VALIDATION_RE.match(name))}
  train = {}
  for name in names:
    m = _LEGACY_TRAIN_RE.match(name)
    if m:
      train.setdefault(int(m.group(1)), []).append((int(m.group(2)), int(m.group(3)), name))
  files = {'validation': validation, 'train': train}
  splits = {}
  num_exits = None
  for split in ('validation', 'train'):
    if not files[split]:
      continue
    k = _contiguous_exits(set(files[split]), f'{softmax_dir} ({split}, original layout)')
    if num_exits is not None and k != num_exits:
      raise DumpError(f'{softmax_dir}: {num_exits} exits for validation but {k} for train; '
                      'dump every exit for both splits')
    num_exits = k
    label_paths = _legacy_label_paths(split, softmax_dir, dataset_path)
    if not label_paths:
      logging.warning('Skipping the %s split: its labels %s are neither in -dataset_path (%s) '
                      'nor in %s (the public original lacks train_non_onehot.npy).', split,
                      _LEGACY_LABELS[split], dataset_path, softmax_dir)
      continue
    exits = []
    for e in range(k):
      if split == 'validation':
        exits.append([_inspect_npy(os.path.join(softmax_dir, validation[e]))])
        continue
      chunks = sorted(train[e])
      total = chunks[0][1]
      if [c[0] for c in chunks] != list(range(1, total + 1)) or any(c[1] != total for c in chunks):
        raise DumpError(f'{softmax_dir}: train chunks of clf{e} are incomplete or mixed: '
                        f'{", ".join(c[2] for c in chunks)}; expected 1of{total}..{total}of'
                        f'{total}')
      exits.append([_inspect_npy(os.path.join(softmax_dir, c[2])) for c in chunks])
    splits[split] = SplitDumps(name=split, label_paths=label_paths, exits=exits)
  return splits, num_exits


def find_dumps(softmax_dir, dataset_path=None):
  """Finds the dump files of every split and checks that the set is complete.

  Args:
    softmax_dir: folder of the dumps, in the current layout or the original's.
    dataset_path: optional folder with the original's label pickles
      (``validation_non_onehot.npy``, ``train_non_onehot.npy``).

  Returns:
    A ``Dumps``. Row and class counts of real .npy files are checked later, by ``check_shapes``.

  Raises:
    DumpError: missing folder, files or exits, a dump still being written.
  """
  if not os.path.isdir(softmax_dir):
    raise DumpError(f'--softmax_dir {softmax_dir} does not exist; point it at the folder the run '
                    'loop wrote (default output_softmax)')
  if dataset_path and not os.path.isdir(dataset_path):
    raise DumpError(f'-dataset_path {dataset_path} does not exist')
  manifest = dump_layout.read_manifest(softmax_dir)
  splits, num_exits = _find_current(softmax_dir, dataset_path, manifest)
  layout = 'current'
  if not splits:
    splits, num_exits = _find_legacy(softmax_dir, dataset_path)
    layout = 'original'
    if not splits and num_exits is not None:
      raise DumpError(f'{softmax_dir} holds the original\'s dumps but no labels for them: pass '
                      '-dataset_path with validation_non_onehot.npy (Imagenet_tools/)')
  if not splits:
    raise DumpError(
        f'no dumps in {softmax_dir}: expected <split>/{dump_layout.LABELS_NAME} and '
        f'<split>/{dump_layout.probabilities_name(0)}, ... (written by the run loop) or the '
        f'original\'s clf0_all_probabilities.npy')
  return Dumps(softmax_dir=softmax_dir, layout=layout, manifest=manifest,
               num_exits=num_exits, splits=splits)


def resolve_costs(dumps, stage_macs=None, plain_macs=None):
  """Returns (stage_macs tuple, plain_macs): flags first, then the manifest, then the article."""
  manifest = dumps.manifest or {}
  if stage_macs is None:
    stage_macs = manifest.get('stage_macs')
    if stage_macs is None:
      stage_macs = ARTICLE_STAGE_MACS
      logging.info('No per-stage MACs in the dumps: using the article\'s ResNet-50 counts %s.',
                   stage_macs)
  if plain_macs is None:
    plain_macs = manifest.get('plain_macs', ARTICLE_PLAIN_MACS)
  stage_macs = tuple(int(m) for m in stage_macs)
  if len(stage_macs) != dumps.num_exits:
    raise DumpError(f'{len(stage_macs)} stage MAC counts for {dumps.num_exits} exits; pass '
                    f'--stage_macs with {dumps.num_exits} comma-separated integers')
  if min(stage_macs) <= 0 or int(plain_macs) <= 0:
    raise DumpError(f'MAC counts must be positive: stage_macs={stage_macs}, '
                    f'plain_macs={plain_macs}')
  return stage_macs, int(plain_macs)


def check_shapes(dumps):
  """Checks the class count and row counts of every real .npy file; returns num_classes.

  Pickles are checked when they are loaded, since their shape is inside the pickle.
  """
  manifest = dumps.manifest or {}
  num_classes = manifest.get('num_classes')
  reference = dump_layout.manifest_path(dumps.softmax_dir) if num_classes else None
  for split in dumps.splits.values():
    rows = None
    rows_ref = None
    for parts in split.exits:
      first = 0
      for part in parts:
        if part.is_pickle:
          first = None
          break
        if num_classes is None:
          num_classes, reference = part.num_classes, part.path
        elif part.num_classes != num_classes:
          raise DumpError(f'{part.path} has {part.num_classes} classes but {reference} has '
                          f'{num_classes}; the dumps come from different models or datasets')
        first += part.num_rows
      if first is None:
        continue
      if rows is None:
        rows, rows_ref = first, parts[0].path
      elif first != rows:
        raise DumpError(f'{parts[0].path} has {first} rows but {rows_ref} has {rows}; every exit '
                        'of a split must cover the same images: re-run the shorter dump')
    expected = manifest.get('splits', {}).get(split.name, {}).get('num_images')
    if rows is not None and expected is not None and rows != expected:
      raise DumpError(f'{rows_ref} has {rows} rows but the manifest says {expected} images for '
                      f'{split.name}; re-run the dump')
  return num_classes


# -------------------------------------------------------------------------------------------------
# Reading: a few numbers per row, chunk by chunk.


def _load_array(path, allow_mmap):
  """Loads a real .npy file, or one of the original's pickles (trusted files only)."""
  try:
    return np.load(path, mmap_mode='r' if allow_mmap else None)
  except ValueError as e:
    if 'pickle' not in str(e):
      raise DumpError(f'{path}: not a readable .npy file ({e})') from e
  except OSError as e:
    raise DumpError(f'{path}: cannot read it ({e})') from e
  try:
    with open(path, 'rb') as f:
      # The original wrote its arrays with pickle.dump despite the .npy suffix.
      return np.asarray(pickle.load(f))
  except Exception as e:  # noqa: BLE001 -- any unpickling failure means a corrupt file
    raise DumpError(f'{path}: neither an .npy file nor a readable pickle ({e})') from e


def read_labels(split, num_classes=None):
  """Reads the labels of a split; every label file found must agree.

  Returns:
    int64 [N] class ids.
  """
  labels, reference = None, None
  for path in split.label_paths:
    values = np.asarray(_load_array(path, allow_mmap=False))   # int [N]
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
      raise DumpError(f'{path}: labels must be a 1-D integer array, got {values.dtype} '
                      f'{values.shape}')
    values = values.astype(np.int64)
    if values.size == 0:
      raise DumpError(f'{path} holds no labels: the {split.name} dump is empty; re-run it')
    if labels is None:
      labels, reference = values, path
      continue
    if values.shape != labels.shape:
      raise DumpError(f'label files disagree: {path} has {values.size} labels, {reference} has '
                      f'{labels.size}; remove the stale one')
    diff = np.flatnonzero(values != labels)
    if diff.size:
      i = int(diff[0])
      raise DumpError(f'label files disagree: {path} and {reference} differ in {diff.size} rows '
                      f'(first at row {i}: {values[i]} vs {labels[i]}); remove the stale one')
  if num_classes is not None and labels.size and (labels.min() < 0
                                                  or labels.max() >= num_classes):
    raise DumpError(f'{reference}: labels span {labels.min()}..{labels.max()} but the '
                    f'probabilities have {num_classes} classes')
  return labels


def _largest_per_position(columns, k):
  """The k largest values at each position of a sequence of equal-length vectors.

  An insertion network run on whole vectors: each column is merged into k running maxima with
  np.maximum / np.minimum, 2k vector operations per column whatever the values.

  Args:
    columns: float [num_columns, n] (or any sequence of float [n] vectors).
    k: how many values.

  Returns:
    list of k float [n] arrays, largest first (-inf where there were fewer than k columns).
  """
  n = len(columns[0])
  top = [np.full(n, -np.inf, np.float32) for _ in range(k)]
  low = np.empty(n, np.float32)
  for column in columns:
    value = np.array(column, np.float32)
    for j in range(k):
      np.minimum(top[j], value, out=low)
      np.maximum(top[j], value, out=top[j])
      value, low = low, value
  return top


def top_values(probabilities, k=TOP_K):
  """The k largest entries of each row, ascending.

  ``np.partition`` of 1001-wide rows costs ~10 ns per entry, too slow for the 3.85e9 entries of
  the train dumps, so this finds the values in a few vector passes:

  1. A lower bound per row: cut the row into ``_BOUND_BLOCKS`` contiguous blocks and take the
     k-th largest block maximum. Those k maxima are k distinct entries >= the bound, so the row's
     k-th largest value is >= the bound too.
  2. The candidates: entries >= the bound (5 to 10 per row on softmax outputs), found with one
     comparison and ``np.flatnonzero``.
  3. The k largest candidates of each row, from a table of ``_CANDIDATE_WIDTH`` per row. Rows
     with more candidates (many ties, e.g. all-zero rows) use ``np.partition`` instead.

  Exact, ties included (only the multiset of values is returned). A row holding a NaN gets NaN.

  Args:
    probabilities: float [n, C].
    k: how many values.

  Returns:
    float32 [n, min(k, C)], each row ascending.
  """
  p = np.ascontiguousarray(probabilities, dtype=np.float32)
  n, num_classes = p.shape
  k = min(k, num_classes)
  block = num_classes // _BOUND_BLOCKS
  if block < 8 or n == 0:
    return np.sort(np.partition(p, num_classes - k, axis=1)[:, num_classes - k:], axis=1)
  covered = _BOUND_BLOCKS * block
  # [n, blocks, block] view of the first `covered` columns, no copy.
  blocks = np.lib.stride_tricks.as_strided(
      p, shape=(n, _BOUND_BLOCKS, block), strides=(p.strides[0], block * 4, 4), writeable=False)
  block_max = blocks.max(axis=2)                                            # [n, blocks]
  bound = _largest_per_position(block_max.T, k)[-1]                        # [n]
  flat = np.flatnonzero(p >= bound[:, None])                                # candidates
  rows = flat // num_classes
  counts = np.bincount(rows, minlength=n)                                   # [n], >= k
  slot = np.arange(flat.size) - (np.cumsum(counts) - counts)[rows]          # rank in its row
  fits = counts[rows] <= _CANDIDATE_WIDTH
  table = np.full((n, _CANDIDATE_WIDTH), -np.inf, np.float32)
  table[rows[fits], slot[fits]] = p.reshape(-1)[flat[fits]]
  top = np.stack(_largest_per_position(table.T, k)[::-1], axis=1)           # [n, k] ascending
  crowded = np.flatnonzero(counts > _CANDIDATE_WIDTH)
  if crowded.size:
    top[crowded] = np.sort(np.partition(p[crowded], num_classes - k, axis=1)[:, -k:], axis=1)
  # NaN compares false, so such a row lost its NaN above: mark it for the caller's check.
  has_nan = np.isnan(block_max).any(axis=1)
  if covered < num_classes:
    has_nan |= np.isnan(p[:, covered:]).any(axis=1)
  top[has_nan] = np.nan
  return top


def sum_ascending(values):
  """Sums each row of float32 [n, k] (ascending) left to right, in float32."""
  total = values[:, 0].astype(np.float32)
  for j in range(1, values.shape[1]):
    total += values[:, j]
  return total


def confidence(probabilities, mode):
  """Confidence of each row: the max probability ('top1') or the top-5 sum ('top5').

  Args:
    probabilities: float [N, C] softmax outputs of one exit.
    mode: 'top1' or 'top5'.

  Returns:
    float32 [N].
  """
  probabilities = np.asarray(probabilities)
  if probabilities.ndim != 2:
    raise ValueError(f'probabilities must be [N, C], got shape {probabilities.shape}')
  if mode == 'top1':
    return probabilities.max(axis=1).astype(np.float32)
  if mode == 'top5':
    return sum_ascending(top_values(probabilities.astype(np.float32, copy=False)))
  raise ValueError(f'mode must be one of {MODES}, got {mode!r}')


@dataclasses.dataclass
class ExitStats:
  """What the analysis keeps of one exit on one split: O(N), never the [N, C] matrix."""
  max_prob: np.ndarray       # float32 [N] top-1 confidence
  top5_sum: np.ndarray       # float32 [N] top-5 confidence
  top1_correct: np.ndarray   # bool [N]
  top5_correct: np.ndarray   # bool [N]
  _curves: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def confidence(self, mode):
    return self.max_prob if mode == 'top1' else self.top5_sum

  def correct(self, mode):
    return self.top1_correct if mode == 'top1' else self.top5_correct

  def residual_curve(self, mode):
    """``residual_accuracy`` of this exit in ``mode``, sorted once and kept."""
    if mode not in self._curves:
      self._curves[mode] = residual_accuracy(self.confidence(mode), self.correct(mode))
    return self._curves[mode]


def row_statistics(probabilities, labels):
  """Per-row confidences and correctness of a block of rows.

  Args:
    probabilities: float [n, C].
    labels: int [n].

  Returns:
    (max_prob float32 [n], top5_sum float32 [n], top1_correct bool [n], top5_correct bool [n]).
  """
  p = probabilities
  if p.dtype != np.float32:
    p = p.astype(np.float32)
  top = top_values(p)                                   # [n, 5] ascending
  label_prob = p[np.arange(p.shape[0]), labels]         # [n]
  max_prob = top[:, -1].copy()
  return max_prob, sum_ascending(top), label_prob >= max_prob, label_prob >= top[:, 0]


class _PartReader:
  """Hands out row blocks of one part: per-chunk memory maps, or slices of a loaded pickle.

  A memory map of the whole 5 GB file would leave every page it touched counted in the resident
  size; a map per chunk is released when the chunk is done.
  """

  def __init__(self, part):
    self.part = part
    self.array = None
    if part.is_pickle:
      self.array = _load_array(part.path, allow_mmap=False)
      if self.array.ndim != 2 or not np.issubdtype(self.array.dtype, np.floating):
        raise DumpError(f'{part.path}: expected float [num_images, num_classes] probabilities, '
                        f'got {self.array.dtype} {self.array.shape}')
      part.num_rows, part.num_classes = (int(d) for d in self.array.shape)
      part.dtype = self.array.dtype

  def rows(self, start, stop):
    if self.array is not None:
      return self.array[start:stop]
    part = self.part
    return np.memmap(part.path, dtype=part.dtype, mode='r', shape=(stop - start, part.num_classes),
                     offset=part.offset + start * part.num_classes * part.dtype.itemsize)

  def close(self):
    self.array = None


def exit_statistics(parts, labels, num_classes, chunk_rows=16384, num_threads=2, desc='',
                    show_progress=True):
  """Reads one exit's probabilities in row chunks and keeps per-row statistics.

  Args:
    parts: ProbabilityParts of the exit, in row order (several for the original's train chunks).
    labels: int64 [N].
    num_classes: expected class count, or None to accept the first part's.
    chunk_rows: rows per chunk; memory is about num_threads * chunk_rows * C * 4 bytes.
    num_threads: chunks processed at once (numpy releases the GIL in the heavy loops).
    desc: progress bar label.
    show_progress: draw a tqdm bar.

  Returns:
    ExitStats with [N] vectors.

  Raises:
    DumpError: wrong row or class count, NaN probabilities.
  """
  n = labels.size
  stats = ExitStats(max_prob=np.empty(n, np.float32), top5_sum=np.empty(n, np.float32),
                    top1_correct=np.empty(n, bool), top5_correct=np.empty(n, bool))
  first = 0
  with tqdm(total=n, unit='rows', unit_scale=True, desc=desc, disable=not show_progress,
            mininterval=1.0, leave=False) as bar, \
      concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for part in parts:
      reader = _PartReader(part)
      if num_classes is not None and part.num_classes != num_classes:
        raise DumpError(f'{part.path} has {part.num_classes} classes, expected {num_classes}; '
                        'the dumps come from different models or datasets')
      if num_classes is None and labels.size and labels.max() >= part.num_classes:
        raise DumpError(f'labels reach {labels.max()} but {part.path} has {part.num_classes} '
                        'classes; labels and probabilities come from different datasets')
      num_classes = part.num_classes
      if first + part.num_rows > n:
        raise DumpError(f'{part.path}: the probabilities have more rows ({first} + '
                        f'{part.num_rows}) than there are labels ({n}); dumps and labels must '
                        'cover the same images')
      offset = first

      def work(start, reader=reader, offset=offset):
        stop = min(start + chunk_rows, reader.part.num_rows)
        block = reader.rows(start, stop)                      # [rows, C]
        rows = slice(offset + start, offset + stop)
        max_prob, top5_sum, top1, top5 = row_statistics(block, labels[rows])
        del block
        if np.isnan(max_prob).any() or np.isnan(top5_sum).any():
          bad = start + int(np.flatnonzero(np.isnan(max_prob) | np.isnan(top5_sum))[0])
          raise DumpError(f'{reader.part.path}: NaN probabilities in row {bad}; the model '
                          'diverged or the dump is corrupt')
        stats.max_prob[rows], stats.top5_sum[rows] = max_prob, top5_sum
        stats.top1_correct[rows], stats.top5_correct[rows] = top1, top5
        return stop - start

      for done in pool.map(work, range(0, part.num_rows, chunk_rows)):
        bar.update(done)
      reader.close()   # frees a loaded pickle before the next one is read
      first += part.num_rows
  if first != n:
    raise DumpError(f'{parts[0].path}: {first} rows of probabilities but {n} labels; dumps and '
                    'labels must cover the same images')
  return stats


def read_split(dumps, split, num_classes, chunk_rows=16384, num_threads=2, show_progress=True):
  """Reads the labels and every exit of a split.

  Returns:
    (labels int64 [N], list of ExitStats, one per exit, num_classes).
  """
  split_dumps = dumps.splits[split]
  labels = read_labels(split_dumps, num_classes)
  stats = []
  for k, parts in enumerate(split_dumps.exits):
    stats.append(exit_statistics(parts, labels, num_classes, chunk_rows, num_threads,
                                 desc=f'{split} clf{k}', show_progress=show_progress))
    num_classes = parts[0].num_classes
  zero_rows = int(np.count_nonzero(stats[-1].max_prob == 0))
  if zero_rows:
    logging.warning('%s: %d rows are all zero (the original\'s padding for images missing from '
                    'its TFRecords); like the original, they count as correct when the label is '
                    '0.', split, zero_rows)
  return labels, stats, num_classes


# -------------------------------------------------------------------------------------------------
# Per-exit accuracy, printed as the original did.


def exit_accuracies(stats):
  """[{exit, top1, top5}] of one split's ExitStats list."""
  return [{'exit': k, 'top1': float(s.top1_correct.mean()) if s.top1_correct.size else 0.0,
           'top5': float(s.top5_correct.mean()) if s.top5_correct.size else 0.0}
          for k, s in enumerate(stats)]


def format_exit_accuracies(accuracies):
  """The original README's block, e.g. 'Classifier 0:\\n Train top-1:0.5208\\n ...'.

  Args:
    accuracies: split name -> list of {exit, top1, top5}; 'train' prints as Train, 'validation'
      as Test (the original's words), each only if present.
  """
  lines = []
  num_exits = max(len(v) for v in accuracies.values())
  for k in range(num_exits):
    lines.append(f'Classifier {k}:')
    for split, word in (('train', 'Train'), ('validation', 'Test')):
      if split in accuracies:
        lines.append(f' {word} top-1:{float(accuracies[split][k]["top1"]):.4}')
        lines.append(f' {word} top-5:{float(accuracies[split][k]["top5"]):.4}')
  return '\n'.join(lines)


# -------------------------------------------------------------------------------------------------
# Thresholds.


def residual_accuracy(confidences, correct):
  """Residual accuracy alpha at each distinct confidence value.

  Args:
    confidences: float [N].
    correct: bool [N].

  Returns:
    (values float [D] distinct confidences ascending, alpha float64 [D] mean correctness of the
    samples with confidence >= value, counts int64 [D] how many samples that is).
  """
  confidences = np.asarray(confidences)
  if confidences.size == 0:
    raise DumpError('cannot compute thresholds from zero samples')
  order = np.argsort(confidences, kind='stable')
  values = confidences[order]
  hits = np.asarray(correct, dtype=np.int64)[order]
  starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
  correct_from = np.cumsum(hits[::-1])[::-1]            # correct_from[j] = sum(hits[j:])
  counts = values.size - starts
  return values[starts], correct_from[starts] / counts, counts


def thresholds_from_curve(values, alpha, epsilons):
  """The threshold rule of the module docstring for every epsilon, from one residual curve.

  Returns:
    float64 [len(epsilons)]: confidence values (float32-exact), or NEVER_EXIT_THRESHOLD.
  """
  epsilons = np.asarray(epsilons, dtype=np.float64)
  best = alpha.max()
  if best <= 0:
    return np.full(epsilons.shape, NEVER_EXIT_THRESHOLD)
  # The first index where alpha >= t is the first where its running maximum >= t, and the
  # running maximum is sorted: one binary search per epsilon.
  running = np.maximum.accumulate(alpha)
  targets = best - epsilons
  index = np.where(targets > 0, np.searchsorted(running, targets, side='left'),
                   np.searchsorted(running, 0.0, side='right'))
  return values[index].astype(np.float64)


def find_thresholds(confidences, correct, epsilons):
  """Per-epsilon thresholds of one exit. confidences float [N], correct bool [N]."""
  values, alpha, _ = residual_accuracy(confidences, correct)
  return thresholds_from_curve(values, alpha, epsilons)


def sort_residual_curves(calibration_stats, evaluation_stats, modes, num_threads=2):
  """Computes, in parallel, every residual curve the thresholds and the reliability figure use.

  Each is one sort of N confidences (0.3 s for the 1.28M train images); numpy releases the GIL
  while sorting, so the sorts of different exits and modes overlap.
  """
  wanted = [(s, m) for s in calibration_stats[:-1] for m in modes]
  wanted += [(s, modes[0]) for s in calibration_stats + evaluation_stats]   # reliability figure
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    list(pool.map(lambda pair: pair[0].residual_curve(pair[1]), wanted))


def calibrate(stats, mode, epsilons):
  """Thresholds of every early exit for every epsilon: float64 [len(epsilons), num_exits - 1]."""
  columns = [thresholds_from_curve(*s.residual_curve(mode)[:2], epsilons) for s in stats[:-1]]
  return np.stack(columns, axis=1) if columns else np.zeros((len(epsilons), 0))


# -------------------------------------------------------------------------------------------------
# Cascade.


def cascade_exit_index(confidences_per_exit, thresholds):
  """Which exit each sample leaves at.

  Args:
    confidences_per_exit: float [num_exits, N].
    thresholds: num_exits - 1 thresholds, one per early exit.

  Returns:
    int64 [N]: the first exit k < num_exits - 1 with confidence >= thresholds[k], else the last
    exit (unconditional). Both sides are compared in float32, as the exported model does, so a
    threshold such as 0.7 means float32(0.7) here too.
  """
  conf = np.asarray(confidences_per_exit, dtype=np.float32)
  thresholds = np.asarray(thresholds, dtype=np.float32).reshape(-1)
  if conf.ndim != 2 or thresholds.size != conf.shape[0] - 1:
    raise ValueError(f'expected [num_exits, N] confidences and num_exits - 1 thresholds, got '
                     f'{conf.shape} and {thresholds.size}')
  leaves = conf[:-1] >= thresholds[:, None]                                # [K - 1, N]
  leaves = np.concatenate([leaves, np.ones((1, conf.shape[1]), bool)], axis=0)
  return np.argmax(leaves, axis=0).astype(np.int64)


def evaluate_cascade(confidences, correct, thresholds, stage_macs, plain_macs):
  """Accuracy and cost of the cascade for one set of thresholds.

  Args:
    confidences: float [num_exits, N].
    correct: bool [num_exits, N] correctness of each exit's answer.
    thresholds: num_exits - 1 thresholds.
    stage_macs: num_exits incremental stage costs.
    plain_macs: cost of the plain network.

  Returns:
    dict with accuracy, mean_macs, speedup, mac_reduction, exit_shares (list of num_exits).
  """
  exits = cascade_exit_index(confidences, thresholds)
  n = exits.size
  num_exits = len(stage_macs)
  taken = np.bincount(exits, minlength=num_exits)
  cumulative = np.cumsum(np.asarray(stage_macs, dtype=np.int64))
  mean_macs = float(int(taken @ cumulative) / n)
  return {
      'accuracy': float(np.count_nonzero(np.asarray(correct)[exits, np.arange(n)]) / n),
      'mean_macs': mean_macs,
      'speedup': plain_macs / mean_macs,
      'mac_reduction': 1.0 - mean_macs / plain_macs,
      'exit_shares': [float(t / n) for t in taken],
  }


def cascade_curve(calibration_stats, evaluation_stats, mode, epsilons, stage_macs, plain_macs):
  """Classifier-specific thresholds per epsilon and what the cascade then scores and costs."""
  table = calibrate(calibration_stats, mode, epsilons)
  conf = np.stack([s.confidence(mode) for s in evaluation_stats])
  correct = np.stack([s.correct(mode) for s in evaluation_stats])
  entries = []
  for eps, thresholds in zip(epsilons, table, strict=True):
    entry = {'epsilon': float(eps), 'thresholds': [float(t) for t in thresholds]}
    entry.update(evaluate_cascade(conf, correct, thresholds, stage_macs, plain_macs))
    entries.append(entry)
  return entries


def global_threshold_curve(evaluation_stats, mode, stage_macs, plain_macs,
                           grid=GLOBAL_THRESHOLDS):
  """The baseline: one threshold shared by every early exit, scanned over ``grid``."""
  conf = np.stack([s.confidence(mode) for s in evaluation_stats])
  correct = np.stack([s.correct(mode) for s in evaluation_stats])
  entries = []
  for t in grid:
    entry = {'threshold': float(t)}
    entry.update(evaluate_cascade(conf, correct, [t] * (conf.shape[0] - 1), stage_macs,
                                  plain_macs))
    entries.append(entry)
  return entries


# -------------------------------------------------------------------------------------------------
# Report: table, JSON, CSV, figures.


def format_cascade_table(entries, mode, calibration_split, evaluation_split):
  """A printable table of one mode's cascade entries."""
  num_thresholds = len(entries[0]['thresholds']) if entries else 0
  num_exits = len(entries[0]['exit_shares']) if entries else 0
  head = (['epsilon'] + [f'delta_{k}' for k in range(num_thresholds)]
          + [f'{mode}_acc', 'GMACs', 'speedup', 'reduction']
          + [f'exit{k}' for k in range(num_exits)])
  rows = []
  for e in entries:
    rows.append([f'{e["epsilon"]:.3f}'] + [f'{t:.4f}' for t in e['thresholds']]
                + [f'{e["accuracy"]:.4f}', f'{e["mean_macs"] / 1e9:.3f}', f'{e["speedup"]:.3f}',
                   f'{100 * e["mac_reduction"]:.1f}%']
                + [f'{100 * s:.1f}%' for s in e['exit_shares']])
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
  title = (f'Cascade, {mode} confidence: evaluated on {evaluation_split}, thresholds from '
           f'{calibration_split}')
  lines = [title, '  '.join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
  lines += ['  '.join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
  return '\n'.join(lines)


def _write_json(report, path):
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
    f.write('\n')


def write_cascade_csv(report, path):
  """One row per (mode, scheme, epsilon or global threshold)."""
  num_exits = report['num_exits']
  fields = (['mode', 'scheme', 'epsilon', 'global_threshold']
            + [f'threshold_{k}' for k in range(num_exits - 1)]
            + ['accuracy', 'mean_macs', 'mean_gmacs', 'speedup', 'mac_reduction']
            + [f'exit_share_{k}' for k in range(num_exits)])
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(fields)
    for mode in MODES:
      if mode not in report:
        continue
      scheme_rows = [('classifier_specific', e, e['epsilon'], '', e['thresholds'])
                     for e in report[mode]]
      scheme_rows += [('global', e, '', e['threshold'], [e['threshold']] * (num_exits - 1))
                      for e in report['global_threshold'][mode]]
      for scheme, e, eps, global_t, thresholds in scheme_rows:
        writer.writerow([mode, scheme, eps, global_t] + list(thresholds)
                        + [e['accuracy'], e['mean_macs'], e['mean_macs'] / 1e9, e['speedup'],
                           e['mac_reduction']] + list(e['exit_shares']))


def _pyplot():
  import matplotlib  # imported here so that the exporter's imports stay light
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_accuracy_vs_gmacs(report, mode, path):
  """Accuracy vs mean GMACs: classifier-specific and global curves, plain net, single exits."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 5))
  cumulative = np.asarray(report['cumulative_macs']) / 1e9
  evaluation = report['exit_accuracy'][report['evaluation_split']]
  entries = sorted(report[mode], key=lambda e: (e['mean_macs'], e['epsilon']))
  x = [e['mean_macs'] / 1e9 for e in entries]
  y = [e['accuracy'] for e in entries]
  ax.plot(x, y, 'o-', color='red', lw=2, ms=4, label='classifier-specific thresholds')
  baseline = sorted(report['global_threshold'][mode], key=lambda e: e['mean_macs'])
  ax.plot([e['mean_macs'] / 1e9 for e in baseline], [e['accuracy'] for e in baseline], '--',
          color='orange', lw=1.5, label='one global threshold')
  ax.plot([report['plain_macs'] / 1e9], [evaluation[-1][mode]], '*', color='black', ms=12,
          label='plain network')
  ax.plot(cumulative, [a[mode] for a in evaluation], 's', color='tab:blue', ms=6,
          label='single exit')
  for k, (cx, a) in enumerate(zip(cumulative, evaluation, strict=True)):
    ax.annotate(f'exit {k}', (cx, a[mode]), textcoords='offset points', xytext=(5, -10),
                fontsize=8, color='tab:blue')
  # Label the epsilons of the points whose label would not overlap an earlier one.
  (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
  shown = []
  for e, xi, yi in zip(entries, x, y, strict=True):
    if all(abs(xi - a) > 0.06 * (x1 - x0) or abs(yi - b) > 0.04 * (y1 - y0) for a, b in shown):
      ax.annotate(f'{100 * e["epsilon"]:g}%', (xi, yi), textcoords='offset points', xytext=(4, 4),
                  fontsize=7, color='red')
      shown.append((xi, yi))
  ax.set_xlabel('Giga-MACs per image (mean)')
  ax.set_ylabel(f'{"top-1" if mode == "top1" else "top-5"} accuracy ({report["evaluation_split"]})')
  ax.set_title(f'Cascade, {mode} confidence, thresholds from {report["calibration_split"]}',
               fontsize=10)
  ax.grid(True, ls=':')
  ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


def reliability_curves(stats, mode, bins=RELIABILITY_BINS):
  """Residual accuracy and confidence histogram of one exit on ``bins`` equal bins of [0, 1].

  Args:
    stats: ExitStats of the exit. mode: 'top1' or 'top5'. bins: number of bins.

  Returns:
    (edges float [bins + 1], alpha float [bins] at each left edge, NaN where no sample reaches
    it, frequency float [bins] share of samples per bin).
  """
  edges = np.linspace(0.0, 1.0, bins + 1)
  values, alpha, _ = stats.residual_curve(mode)
  confidences = stats.confidence(mode)
  index = np.searchsorted(values, edges[:-1], side='left')
  curve = np.full(bins, np.nan)
  inside = index < values.size
  curve[inside] = alpha[index[inside]]
  # Top-5 sums may exceed 1.0 by rounding: count them in the last bin.
  counts, _ = np.histogram(np.clip(confidences, 0.0, 1.0), bins=edges)
  return edges, curve, counts / max(1, len(confidences))


def plot_reliability(report, evaluation_stats, calibration_stats, mode, path):
  """Section 10's figure: alpha_k(delta) per exit (top) and the confidence histogram (bottom)."""
  plt = _pyplot()
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
  colors = ['red', 'orange', 'green', 'blue', 'purple', 'brown']
  same = calibration_stats is evaluation_stats
  for k, stats in enumerate(evaluation_stats):
    color = colors[k % len(colors)]
    edges, alpha, freq = reliability_curves(stats, mode)
    top.plot(edges[:-1], alpha, color=color, lw=1.5,
             label=f'exit {k}, {report["evaluation_split"]}')
    if not same:
      _, alpha_cal, _ = reliability_curves(calibration_stats[k], mode)
      top.plot(edges[:-1], alpha_cal, color=color, lw=1, ls='--',
               label=f'exit {k}, {report["calibration_split"]}')
    bottom.stairs(freq, edges, color=color, fill=True, alpha=0.35, label=f'exit {k}')
  top.set_ylabel('residual accuracy alpha(delta)')
  top.set_title(f'Reliability of each exit ({mode} confidence)', fontsize=10)
  top.grid(True, ls=':')
  top.legend(fontsize=7)
  bottom.set_xlabel('confidence delta')
  bottom.set_ylabel('share of images')
  bottom.grid(True, ls=':')
  bottom.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


def write_report(report, evaluation_stats, calibration_stats, output_dir):
  """Writes thresholds.json, cascade.csv and the figures; all or nothing.

  Everything goes to a temporary folder beside ``output_dir`` first; only when every file is
  complete are they moved in (renames on one file system), so an error leaves no partial report
  and other files already in ``output_dir`` are left alone.
  """
  output_dir = os.path.abspath(output_dir)
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(output_dir)}.partial-', dir=parent)
  try:
    _write_json(report, os.path.join(staging, THRESHOLDS_JSON))
    write_cascade_csv(report, os.path.join(staging, CASCADE_CSV))
    modes = [m for m in MODES if m in report]
    for mode in modes:
      plot_accuracy_vs_gmacs(report, mode, os.path.join(staging, ACCURACY_PNG.format(mode=mode)))
    plot_reliability(report, evaluation_stats, calibration_stats, modes[0],
                     os.path.join(staging, RELIABILITY_PNG))
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(os.listdir(staging)):
      os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return sorted(os.listdir(output_dir))


def load_thresholds(path, epsilon, mode='top1'):
  """Per-exit thresholds for ``epsilon`` from a thresholds.json, for the early-exit model.

  Args:
    path: a thresholds.json written by this script.
    epsilon: allowed accuracy drop as a fraction, matched within EPSILON_TOLERANCE.
    mode: 'top1' (max probability) or 'top5' (sum of the 5 largest probabilities).

  Returns:
    list of num_exits - 1 floats; sample leaves at exit k if its confidence >= thresholds[k];
    NEVER_EXIT_THRESHOLD (2.0) means the exit never takes a sample.

  Raises:
    ValueError: unknown mode, or epsilon not in the file (the message lists those available).
  """
  with open(path) as f:
    report = json.load(f)
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  if mode not in report:
    raise ValueError(f'{path} has no {mode} thresholds (modes present: '
                     f'{[m for m in MODES if m in report]}); re-run the analysis without --top5')
  for entry in report[mode]:
    if abs(entry['epsilon'] - float(epsilon)) <= EPSILON_TOLERANCE:
      return [float(t) for t in entry['thresholds']]
  available = ', '.join(f'{e["epsilon"]:g}' for e in report[mode])
  raise ValueError(f'{path}: no {mode} thresholds for epsilon {epsilon:g}; available: '
                   f'{available} (epsilon is a fraction: 0.05 means 5%)')


# -------------------------------------------------------------------------------------------------
# The whole analysis.


def check_epsilons(epsilons):
  """Returns the epsilons as sorted unique floats; raises DumpError outside [0, 1]."""
  values = [float(e) for e in epsilons]
  bad = [e for e in values if not 0.0 <= e <= 1.0 or math.isnan(e)]
  if bad:
    raise DumpError(f'epsilons must be fractions in [0, 1], got {bad}; e.g. --epsilons=0,0.01,'
                    '0.05 (0.05 means an accuracy drop of 5%)')
  if not values:
    raise DumpError('--epsilons is empty; give at least one value, e.g. --epsilons=0.05')
  return sorted(set(values))


def choose_splits(available, calibration_split, evaluation_split):
  """Falls back to what exists, with a log line, when a requested split is missing."""
  for name in (calibration_split, evaluation_split):
    if name not in dump_layout.SPLITS:
      raise DumpError(f'unknown split {name!r}; choose one of {dump_layout.SPLITS}')
  if evaluation_split not in available:
    other = next(s for s in dump_layout.SPLITS if s in available)
    logging.warning('No %s dumps: evaluating the cascade on %s instead.', evaluation_split, other)
    evaluation_split = other
  if calibration_split not in available:
    logging.warning('No %s dumps: tuning the thresholds on %s instead.', calibration_split,
                    evaluation_split)
    calibration_split = evaluation_split
  if calibration_split == evaluation_split:
    logging.warning('Thresholds are tuned and evaluated on the same split (%s): the cascade '
                    'figures are optimistic.', evaluation_split)
  return calibration_split, evaluation_split


def run_analysis(softmax_dir, output_dir='cascade_report', dataset_path=None, modes=MODES,
                 epsilons=None, calibration_split='train', evaluation_split='validation',
                 stage_macs=None, plain_macs=None, chunk_rows=16384, num_threads=2,
                 show_progress=True, out=sys.stdout):
  """Runs everything: reads the dumps, prints the tables, writes the report.

  Args:
    softmax_dir: dump folder. dataset_path: optional folder with the original's label pickles.
    output_dir: report folder. modes: subset of MODES.
    epsilons: list of fractions for every mode, or None for DEFAULT_EPSILONS.
    calibration_split, evaluation_split: 'train' or 'validation'.
    stage_macs, plain_macs: override the manifest (or the article's numbers).
    chunk_rows, num_threads, show_progress: reading.
    out: stream for the printed tables.

  Returns:
    The thresholds.json content (dict).
  """
  modes = [m for m in MODES if m in modes]
  if not modes:
    raise DumpError(f'no mode to run; choose from {MODES}')
  eps = {m: check_epsilons(epsilons if epsilons is not None else DEFAULT_EPSILONS[m])
         for m in modes}
  if chunk_rows <= 0:
    raise DumpError(f'--chunk_rows must be positive, got {chunk_rows}')
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise DumpError(f'--output_dir {output_dir} is a file; choose a folder')
  dumps = find_dumps(softmax_dir, dataset_path)
  stage_macs, plain_macs = resolve_costs(dumps, stage_macs, plain_macs)
  num_classes = check_shapes(dumps)
  calibration_split, evaluation_split = choose_splits(dumps.splits, calibration_split,
                                                      evaluation_split)
  logging.info('Reading %s dumps (%s layout) of %d exits from %s.',
               ', '.join(dumps.splits), dumps.layout, dumps.num_exits, softmax_dir)
  labels, stats = {}, {}
  for split in dump_layout.SPLITS:
    if split in dumps.splits:
      start = time.perf_counter()
      labels[split], stats[split], num_classes = read_split(
          dumps, split, num_classes, chunk_rows, num_threads, show_progress)
      logging.info('Read %s: %d exits x %d images in %.1f s.', split, dumps.num_exits,
                   labels[split].size, time.perf_counter() - start)
  accuracies = {split: exit_accuracies(s) for split, s in stats.items()}
  print(format_exit_accuracies(accuracies), file=out)

  manifest = dumps.manifest or {}
  report = {
      'format_version': THRESHOLDS_FORMAT_VERSION,
      'num_classes': int(num_classes),
      'num_exits': dumps.num_exits,
      'stage_macs': list(stage_macs),
      'cumulative_macs': [int(c) for c in np.cumsum(stage_macs)],
      'plain_macs': plain_macs,
      'calibration_split': calibration_split,
      'evaluation_split': evaluation_split,
      'num_images': {split: int(v.size) for split, v in labels.items()},
      'never_exit_threshold': NEVER_EXIT_THRESHOLD,
      'exit_accuracy': accuracies,
      'source': {'softmax_dir': os.path.abspath(softmax_dir), 'layout': dumps.layout,
                 **{k: manifest[k] for k in ('model', 'checkpoint', 'global_step', 'dataset')
                    if k in manifest}},
      'global_threshold': {},
  }
  start = time.perf_counter()
  sort_residual_curves(stats[calibration_split], stats[evaluation_split], modes, num_threads)
  for mode in modes:
    report[mode] = cascade_curve(stats[calibration_split], stats[evaluation_split], mode,
                                 eps[mode], stage_macs, plain_macs)
    report['global_threshold'][mode] = global_threshold_curve(stats[evaluation_split], mode,
                                                              stage_macs, plain_macs)
    print('', file=out)
    print(format_cascade_table(report[mode], mode, calibration_split, evaluation_split),
          file=out)
  logging.info('Thresholds and cascades in %.1f s.', time.perf_counter() - start)
  start = time.perf_counter()
  files = write_report(report, stats[evaluation_split], stats[calibration_split], output_dir)
  logging.info('Wrote %s to %s in %.1f s.', ', '.join(files), output_dir,
               time.perf_counter() - start)
  return report


# -------------------------------------------------------------------------------------------------
# Command line.


def define_flags():
  flags.DEFINE_string('softmax_dir', 'output_softmax', 'Folder of the softmax dumps.')
  flags.DEFINE_string('softmax_dir_to_validate_against', None,
                      'The original\'s name for --softmax_dir.')
  flags.DEFINE_string('dataset_path', None,
                      'Folder with the original\'s label pickles validation_non_onehot.npy / '
                      'train_non_onehot.npy (needed for the original\'s dumps only).')
  flags.DEFINE_string('output_dir', 'cascade_report', 'Where the report goes.')
  flags.DEFINE_boolean('top5', False, 'Only the top-5 mode (default: top-1 and top-5).')
  flags.DEFINE_list('epsilons', None, 'Allowed accuracy drops as fractions, e.g. 0,0.01,0.05 '
                    '(default: 0..0.20 for top-1, the article\'s list for top-5).')
  flags.DEFINE_enum('calibration_split', 'train', dump_layout.SPLITS,
                    'Split the thresholds are tuned on (the article: train).')
  flags.DEFINE_enum('eval_split', 'validation', dump_layout.SPLITS,
                    'Split the cascade is evaluated on.')
  flags.DEFINE_list('stage_macs', None, 'Incremental MACs of each stage, e.g. 1817092009,'
                    '1467571177,759970793 (default: the manifest, else the article\'s).')
  flags.DEFINE_integer('plain_macs', None, 'MACs of the plain network (speedup baseline).')
  flags.DEFINE_integer('chunk_rows', 16384, 'Rows read at a time per thread.', lower_bound=1)
  flags.DEFINE_integer('num_threads', min(4, os.cpu_count() or 1),
                       'Chunks processed in parallel.', lower_bound=1)


def _parse_numbers(values, kind, flag):
  try:
    return [kind(v) for v in values]
  except ValueError as e:
    raise DumpError(f'--{flag}: cannot read {values} as {kind.__name__}s ({e})') from e


def main(argv):
  del argv
  f = flags.FLAGS
  softmax_dir = f.softmax_dir
  if f.softmax_dir_to_validate_against:
    if f['softmax_dir'].present and f.softmax_dir != f.softmax_dir_to_validate_against:
      sys.exit('error: --softmax_dir and -softmax_dir_to_validate_against disagree; give one')
    softmax_dir = f.softmax_dir_to_validate_against
  try:
    run_analysis(
        softmax_dir, output_dir=f.output_dir, dataset_path=f.dataset_path,
        modes=('top5',) if f.top5 else MODES,
        epsilons=_parse_numbers(f.epsilons, float, 'epsilons') if f.epsilons else None,
        calibration_split=f.calibration_split, evaluation_split=f.eval_split,
        stage_macs=_parse_numbers(f.stage_macs, int, 'stage_macs') if f.stage_macs else None,
        plain_macs=f.plain_macs, chunk_rows=f.chunk_rows, num_threads=f.num_threads)
  except DumpError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
