"""Turns the softmax dumps into the article's results: exit accuracies, thresholds, cascade curves.

Usage::

    python analyze_imagenet_labels.py --softmax_dir output_softmax --output_dir cascade_report
    python analyze_imagenet_labels.py -softmax_dir_to_validate_against output_softmax \\
        -dataset_path Imagenet_tools            # the original's command line, old dumps

Needs numpy, matplotlib, tqdm and absl only (no TensorFlow), and reads the 15 GB of ImageNet train
dumps in row chunks, keeping only a few numbers per image, so it runs in well under 2 GB of RAM.

The analysis, in the order it runs (``run_analysis``):

1. Load: find the dumps, in the layout of ``dump_layout.py`` (``<softmax_dir>/<split>/labels.npy``,
   ``<split>/clf<k>_probabilities.npy``, ``manifest.json`` with per-stage MACs) or in the original
   repository's (``legacy_dumps.py``: pickles, labels in ``-dataset_path``, costed with the
   article's MAC counts).
2. Per-exit statistics (``exit_statistics.py``): every exit's confidences and correctness per row,
   printed as the original's accuracy block.
3. Thresholds, per exit, on the calibration split (below).
4. Cascade, on the evaluation split (below).
5. Report (``cascade_report.py``): the tables, and ``thresholds.json`` (its format:
   ``cascade_thresholds.py``, which the early-exit exporter reads), ``cascade.csv`` and figures.

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
"""

import concurrent.futures
import math
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

import cascade_report
import cascade_thresholds
import dump_layout
import exit_statistics
import legacy_dumps
from cascade_thresholds import MODES, NEVER_EXIT_THRESHOLD
from dump_layout import DumpError
from exit_statistics import confidence  # noqa: F401 -- for tests checking the exported model

# Epsilon grids of the article, as fractions (the original's defaults 0..20 were wrong units).
DEFAULT_EPSILONS = {
    'top1': tuple(round(0.01 * i, 2) for i in range(21)),
    'top5': (0.0, 0.01, 0.016, 0.017, 0.018, 0.019, 0.02, 0.025, 0.026, 0.027, 0.028, 0.03, 0.04,
             0.051, 0.052, 0.053, 0.054, 0.06, 0.07),
}
GLOBAL_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(101))


# -------------------------------------------------------------------------------------------------
# Load.


def find_dumps(softmax_dir, dataset_path=None):
  """Finds the dump files of every split and checks that the set is complete.

  Args:
    softmax_dir: folder of the dumps, in the current layout or the original's.
    dataset_path: optional folder with the original's label pickles
      (``validation_non_onehot.npy``, ``train_non_onehot.npy``).

  Returns:
    A ``dump_layout.Dumps``. Row and class counts are checked later, by
    ``exit_statistics.inspect_dumps``; splits still being written are in ``pending``.

  Raises:
    DumpError: missing folder, files or exits.
  """
  if not os.path.isdir(softmax_dir):
    raise DumpError(f'--softmax_dir {softmax_dir} does not exist; point it at the folder the run '
                    'loop wrote (default output_softmax)')
  if dataset_path and not os.path.isdir(dataset_path):
    raise DumpError(f'-dataset_path {dataset_path} does not exist')
  manifest = dump_layout.read_manifest(softmax_dir)
  # The original's label pickles, if given, must agree with the labels the dumps carry.
  extra_labels = {s: legacy_dumps.label_paths(s, None, dataset_path) for s in dump_layout.SPLITS}
  dumps = dump_layout.find_current(softmax_dir, manifest, extra_labels)
  if not dumps.splits and not dumps.pending:
    dumps = legacy_dumps.find_legacy(softmax_dir, dataset_path)
    dumps.manifest = manifest
    if not dumps.splits and dumps.num_exits is not None:
      raise DumpError(f'{softmax_dir} holds the original\'s dumps but no labels for them: pass '
                      '-dataset_path with validation_non_onehot.npy (Imagenet_tools/)')
  if not dumps.splits and not dumps.pending:
    raise DumpError(
        f'no dumps in {softmax_dir}: expected <split>/{dump_layout.LABELS_NAME} and '
        f'<split>/{dump_layout.probabilities_name(0)}, ... (written by the run loop) or the '
        f'original\'s clf0_all_probabilities.npy')
  return dumps


def resolve_costs(dumps, stage_macs=None, plain_macs=None):
  """Returns (stage_macs tuple, plain_macs): flags first, then the manifest, then the article."""
  manifest = dumps.manifest or {}
  if stage_macs is None:
    stage_macs = manifest.get('stage_macs')
    if stage_macs is None:
      stage_macs = legacy_dumps.ARTICLE_STAGE_MACS
      logging.info('No per-stage MACs in the dumps: using the article\'s ResNet-50 counts %s.',
                   stage_macs)
  if plain_macs is None:
    plain_macs = manifest.get('plain_macs', legacy_dumps.ARTICLE_PLAIN_MACS)
  stage_macs = tuple(int(m) for m in stage_macs)
  if len(stage_macs) != dumps.num_exits:
    raise DumpError(f'{len(stage_macs)} stage MAC counts for {dumps.num_exits} exits; pass '
                    f'--stage_macs with {dumps.num_exits} comma-separated integers')
  if min(stage_macs) <= 0 or int(plain_macs) <= 0:
    raise DumpError(f'MAC counts must be positive: stage_macs={stage_macs}, '
                    f'plain_macs={plain_macs}')
  return stage_macs, int(plain_macs)


def choose_splits(dumps, calibration_split, evaluation_split):
  """The (calibration, evaluation) splits to use; falls back, with a log line, to what exists.

  A split another dump is still writing (``dumps.pending``) is an error if it is one of the two,
  and skipped with a log line otherwise: only the splits the analysis reads must be complete.
  """
  for name in (calibration_split, evaluation_split):
    if name not in dump_layout.SPLITS:
      raise DumpError(f'unknown split {name!r}; choose one of {dump_layout.SPLITS}')
  available = dumps.splits
  roles = ((calibration_split, '--calibration_split'), (evaluation_split, '--eval_split'))
  for name, flag in roles:
    if name in dumps.pending:
      others = [s for s in available if s != name]
      hint = f'; or pass {flag} {others[0]} to analyse without it' if others else ''
      raise DumpError(dumps.pending[name] + hint)
  for split, why in dumps.pending.items():
    logging.warning('Not reading the %s split: %s.', split, why)
  if not available:
    raise DumpError(f'no complete dumps in {dumps.softmax_dir}: '
                    + '; '.join(dumps.pending.values()))
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


# -------------------------------------------------------------------------------------------------
# Thresholds.


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
  values, alpha, _ = exit_statistics.residual_accuracy(confidences, correct)
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
  calibration_split, evaluation_split = choose_splits(dumps, calibration_split, evaluation_split)
  stage_macs, plain_macs = resolve_costs(dumps, stage_macs, plain_macs)
  parts, num_classes = exit_statistics.inspect_dumps(dumps)
  logging.info('Reading %s dumps (%s layout) of %d exits from %s.',
               ', '.join(dumps.splits), dumps.layout, dumps.num_exits, softmax_dir)
  labels, stats = {}, {}
  for split in dump_layout.SPLITS:
    if split in dumps.splits:
      start = time.perf_counter()
      labels[split], stats[split], num_classes = exit_statistics.read_split(
          dumps, split, parts[split], num_classes, chunk_rows, num_threads, show_progress)
      logging.info('Read %s: %d exits x %d images in %.1f s.', split, dumps.num_exits,
                   labels[split].size, time.perf_counter() - start)
  accuracies = {split: exit_statistics.exit_accuracies(s) for split, s in stats.items()}
  print(cascade_report.format_exit_accuracies(accuracies), file=out)

  manifest = dumps.manifest or {}
  report = {
      'format_version': cascade_thresholds.FORMAT_VERSION,
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
    print(cascade_report.format_cascade_table(report[mode], mode, calibration_split,
                                              evaluation_split), file=out)
  logging.info('Thresholds and cascades in %.1f s.', time.perf_counter() - start)
  start = time.perf_counter()
  files = cascade_report.write_report(report, stats[evaluation_split], stats[calibration_split],
                                      output_dir)
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
