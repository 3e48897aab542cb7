"""Per-exit statistics: each exit's probabilities, read in row chunks, become a few numbers per row.

For every row (image) of every exit the analysis keeps its top-1 and top-5 confidence and
whether the exit's answer is right in either sense (``ExitStats``: O(N), never the [N, C]
matrix), and from those the exit's residual-accuracy curve. Real ``.npy`` dumps are read through
one memory map per chunk, the original's pickles (``legacy_dumps.load_array``) whole. Numpy only.

Definitions, per row of an exit's probabilities p [num_classes] with label y:

* top-1 confidence: max(p). top-5 confidence: the sum of the 5 largest entries of p, computed in
  float32 in a fixed order: the 5 values sorted ascending and added left to right
  (((p5 + p4) + p3) + p2) + p1, the order ``cascade_export.confidence`` uses too, so the
  exported model and the analysis give bit-identical confidences.
* correct (top-1): p[y] >= max(p); correct (top-5): p[y] >= the 5th largest entry of p. A class
  tied with the k-th largest value counts as in the top k, the rule of ``tf.nn.in_top_k`` behind
  the run loop's accuracy metrics. (The original's all-zero padding rows with label 0 are counted
  correct, as the original did.)
* residual accuracy alpha(delta): the mean correctness of the rows with confidence >= delta,
  at each distinct confidence value (tied rows are always in or out together).

Every row read must be a probability vector: finite, each entry in [0, 1], summing to 1 within
``SUM_TOLERANCE`` (the original's all-zero padding rows excepted, in its layout only).
"""

import concurrent.futures
import dataclasses

import numpy as np
from absl import logging
from tqdm import tqdm

import dump_layout
import legacy_dumps
from cascade_thresholds import MODES, TOP_K
from dump_layout import DumpError

# How far a row's sum may be from 1. float32 softmax rows over 1001 classes sum to 1 within
# ~1e-4 (each of the C terms carries a relative rounding error of ~1e-7, and the producer's and
# our float32 sums add up to C of them); float16 dumps within ~5e-4 (2^-11 per stored value).
# 1e-3 accepts both with a margin, while what the check is for is off by far more: logits sum to
# anything, log-probabilities of 1001 classes to about -7000, percentages to 100.
SUM_TOLERANCE = 1e-3
# A chunk is processed in pieces of about this size, which the L2/L3 caches hold.
_PIECE_BYTES = 4 * 1024**2
# top_values: blocks for the lower bound, and candidates kept per row before falling back.
_BOUND_BLOCKS = 7
_CANDIDATE_WIDTH = 16


# -------------------------------------------------------------------------------------------------
# What is read: file headers and labels.


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


def inspect_npy(path):
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


def inspect_dumps(dumps):
  """Reads the header of every probability file and checks class and row counts.

  Pickles are checked when they are loaded, since their shape is inside the pickle.

  Args:
    dumps: a dump_layout.Dumps.

  Returns:
    (parts: split -> exits[k] = list of ProbabilityPart in row order, num_classes or None).
  """
  manifest = dumps.manifest or {}
  num_classes = manifest.get('num_classes')
  reference = dump_layout.manifest_path(dumps.softmax_dir) if num_classes else None
  all_parts = {}
  for split in dumps.splits.values():
    all_parts[split.name] = [[inspect_npy(path) for path in paths] for paths in split.exits]
    rows = None
    rows_ref = None
    for parts in all_parts[split.name]:
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
  return all_parts, num_classes


def read_labels(split, num_classes=None):
  """Reads the labels of a split (dump_layout.SplitDumps); every label file found must agree.

  Returns:
    int64 [N] class ids.
  """
  labels, reference = None, None
  for path in split.label_paths:
    values = np.asarray(legacy_dumps.load_array(path, allow_mmap=False))   # int [N]
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


# -------------------------------------------------------------------------------------------------
# Per-row statistics of a block of rows.


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


def first_non_probability(p, max_prob, allow_zero_rows=False):
  """The first row of a block that is not a probability vector.

  The row maxima are the ones row_statistics found already; the check adds two passes over the
  block: the row sums (a matrix-vector product, 4x faster than ``p.sum(axis=1)``) and one
  minimum over the whole block (per-row minima only when the block holds a negative entry).

  Args:
    p: float32 [n, C] without NaN (NaN rows are reported before, by the caller).
    max_prob: float32 [n] the maximum of each row.
    allow_zero_rows: accept all-zero rows (the original's padding).

  Returns:
    None, or (row index, its sum, its smallest entry, its largest entry).
  """
  sums = np.asarray(p) @ np.ones(p.shape[1], np.float32)             # [n]
  bad = ~(np.abs(sums - 1) <= SUM_TOLERANCE) | ~(max_prob <= 1)       # NaN and inf are bad too
  if allow_zero_rows:
    bad &= max_prob != 0           # with no negative entry (below), max 0 means all zero
  if p.size and not p.min() >= 0:
    bad |= p.min(axis=1) < 0
  if not bad.any():
    return None
  row = int(np.argmax(bad))
  return row, float(sums[row]), float(p[row].min()), float(max_prob[row])


# -------------------------------------------------------------------------------------------------
# Per exit: statistics of every row, and the residual-accuracy curve.


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


class _PartReader:
  """Hands out row blocks of one part: per-chunk memory maps, or slices of a loaded pickle.

  A memory map of the whole 5 GB file would leave every page it touched counted in the resident
  size; a map per chunk is released when the chunk is done.
  """

  def __init__(self, part):
    self.part = part
    self.array = None
    if part.is_pickle:
      self.array = legacy_dumps.load_array(part.path, allow_mmap=False)
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


def _piece_statistics(p, labels, stats, first, first_in_file, path, allow_zero_rows):
  """Fills rows first.. of ``stats`` from the block p float32 [n, C] of ``path``; checks it."""
  rows = slice(first, first + p.shape[0])
  max_prob, top5_sum, top1, top5 = row_statistics(p, labels[rows])
  if np.isnan(max_prob).any() or np.isnan(top5_sum).any():
    bad = first_in_file + int(np.flatnonzero(np.isnan(max_prob) | np.isnan(top5_sum))[0])
    raise DumpError(f'{path}: NaN probabilities in row {bad}; the model diverged or the dump is '
                    'corrupt')
  problem = first_non_probability(p, max_prob, allow_zero_rows)
  if problem:
    row, total, low, high = problem
    raise DumpError(
        f'{path}: row {first_in_file + row} is not a probability vector (entries {low:.4g}..'
        f'{high:.4g}, sum {total:.6g}); every row must be finite, in [0, 1] and sum to 1 within '
        f'{SUM_TOLERANCE:g}: dump the softmax of the logits (not logits or log-probabilities)')
  stats.max_prob[rows], stats.top5_sum[rows] = max_prob, top5_sum
  stats.top1_correct[rows], stats.top5_correct[rows] = top1, top5


def exit_statistics(parts, labels, num_classes, chunk_rows=16384, num_threads=2, desc='',
                    show_progress=True, allow_zero_rows=False):
  """Reads one exit's probabilities in row chunks and keeps per-row statistics.

  Args:
    parts: ProbabilityParts of the exit, in row order (several for the original's train chunks).
    labels: int64 [N].
    num_classes: expected class count, or None to accept the first part's.
    chunk_rows: rows per chunk; memory is about num_threads * chunk_rows * C * 4 bytes.
    num_threads: chunks processed at once (numpy releases the GIL in the heavy loops).
    desc: progress bar label.
    show_progress: draw a tqdm bar.
    allow_zero_rows: accept all-zero rows (the original's padding), not probabilities otherwise.

  Returns:
    ExitStats with [N] vectors.

  Raises:
    DumpError: wrong row or class count, rows that are not probabilities (NaN, inf, outside
      [0, 1], not summing to 1).
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
        # Piece by piece, so that the probability check's two passes find the rows still in the
        # cache: it adds ~10% CPU time to the statistics instead of ~20% on whole chunks.
        piece = max(1, _PIECE_BYTES // (4 * reader.part.num_classes))
        for low in range(0, stop - start, piece):
          high = min(low + piece, stop - start)
          _piece_statistics(np.asarray(block[low:high], np.float32), labels, stats,
                            offset + start + low, start + low, reader.part.path, allow_zero_rows)
        del block
        return stop - start

      for done in pool.map(work, range(0, part.num_rows, chunk_rows)):
        bar.update(done)
      reader.close()   # frees a loaded pickle before the next one is read
      first += part.num_rows
  if first != n:
    raise DumpError(f'{parts[0].path}: {first} rows of probabilities but {n} labels; dumps and '
                    'labels must cover the same images')
  return stats


def read_split(dumps, split, parts, num_classes, chunk_rows=16384, num_threads=2,
               show_progress=True):
  """Reads the labels and every exit of a split.

  Args:
    dumps: dump_layout.Dumps. split: the split's name.
    parts: exits[k] = ProbabilityParts of exit k (from inspect_dumps).
    num_classes: expected class count, or None.
    chunk_rows, num_threads, show_progress: see exit_statistics.

  Returns:
    (labels int64 [N], list of ExitStats, one per exit, num_classes).
  """
  labels = read_labels(dumps.splits[split], num_classes)
  stats = []
  for k, exit_parts in enumerate(parts):
    stats.append(exit_statistics(exit_parts, labels, num_classes, chunk_rows, num_threads,
                                 desc=f'{split} clf{k}', show_progress=show_progress,
                                 allow_zero_rows=dumps.layout == 'original'))
    num_classes = exit_parts[0].num_classes
  zero_rows = int(np.count_nonzero(stats[-1].max_prob == 0))
  if zero_rows:
    logging.warning('%s: %d rows are all zero (the original\'s padding for images missing from '
                    'its TFRecords); like the original, they count as correct when the label is '
                    '0.', split, zero_rows)
  return labels, stats, num_classes


def exit_accuracies(stats):
  """[{exit, top1, top5}] of one split's ExitStats list."""
  return [{'exit': k, 'top1': float(s.top1_correct.mean()) if s.top1_correct.size else 0.0,
           'top5': float(s.top5_correct.mean()) if s.top5_correct.size else 0.0}
          for k, s in enumerate(stats)]


def subset_stats(stats, rows):
  """The ExitStats of a list restricted to ``rows`` (int [n]), in that order."""
  return [ExitStats(max_prob=s.max_prob[rows], top5_sum=s.top5_sum[rows],
                    top1_correct=s.top1_correct[rows], top5_correct=s.top5_correct[rows])
          for s in stats]
