"""Turns the softmax dumps into the article's results: exit accuracies, thresholds, cascade curves.

Usage::

    python analyze_imagenet_labels.py --softmax_dir output_softmax --output_dir cascade_report
    python analyze_imagenet_labels.py -softmax_dir_to_validate_against output_softmax \\
        -dataset_path Imagenet_tools            # the original's command line, old dumps
    python analyze_imagenet_labels.py --softmax_dir output_softmax --calibration_split validation \\
        --calibration_fraction 0.5 --accuracy_drop 0.005,0.01 --coverage_trials 100
                                                # thresholds that keep an accuracy-drop promise

Needs numpy, scipy, matplotlib, tqdm and absl only (no TensorFlow), and reads the 15 GB of ImageNet
train dumps in row chunks, keeping only a few numbers per image, so it runs in well under 2 GB of
RAM.

The analysis, in the order it runs (``run_analysis``):

1. Load: find the dumps, in the layout of ``dump_layout.py`` (``<softmax_dir>/<split>/labels.npy``,
   ``<split>/clf<k>_probabilities.npy``, ``manifest.json`` with per-stage MACs) or in the original
   repository's (``legacy_dumps.py``: pickles, labels in ``-dataset_path``, costed with the
   article's MAC counts).
2. Per-exit statistics (``exit_statistics.py``): every exit's confidences and correctness per row,
   printed as the original's accuracy block.
3. Images: which calibrate and which evaluate (below).
4. Thresholds, per exit, on the calibration images (below).
5. Cascade, on the evaluation images (below).
6. Risk-controlled thresholds, when asked for (below).
7. Report (``cascade_report.py``): the tables, and ``thresholds.json`` (its format:
   ``cascade_thresholds.py``, which the early-exit exporter reads), ``cascade.csv`` and figures.

Images. The article tunes on the training split and reports on the validation split
(``--calibration_split train``, the default). ``--calibration_split validation`` alone tunes and
reports on the same validation images (optimistic; logged). With ``--calibration_fraction F``
a random F of the ``--eval_split`` images (``--calibration_seed``) calibrate and the other 1 - F,
disjoint from them, are where every cascade figure is measured. Every table and figure names its
images (``measured_on`` in thresholds.json).

Threshold rule, per exit, on the calibration images (N samples with confidence c and correctness y):

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

Risk-controlled thresholds (``--accuracy_drop D1,D2,.. --delta P --risk_control ltt|crc``).
epsilon bounds the drop of the *training-set* residual accuracy per exit, which a network that
fits its training set hardly shows: it is not the accuracy a user loses. These thresholds bound
that loss instead. Per image, loss = final_correct - cascade_correct (top-1, or top-5 in top-5
mode); its mean is the accuracy drop against the plain network on the same images.

* Candidates: the article's threshold vectors for ``CANDIDATE_EPSILONS``, identical vectors
  dropped, in epsilon order (safe to aggressive). They must not depend on the calibration
  images: they come from the training split when its dumps exist and it is neither the
  calibration nor the evaluation split (training images are independent of the others; that they
  are not exchangeable with them only costs power), else from a seeded random
  ``CANDIDATE_FRACTION`` of the calibration images, which then no longer calibrate
  (``candidates_from`` says which).
* ``ltt`` (``risk_control.ltt_select``): fixed-sequence testing with Hoeffding-Bentkus p-values
  keeps the most aggressive candidate before the first one not shown to drop <= D, so that
  P(drop on new images <= D) >= 1 - delta over the calibration draw. ``crc``: the expected drop
  is <= D, if the loss does not decrease along the candidates (violations are reported).
* The calibration images must be exchangeable with the images the cascade will see and disjoint
  from the evaluation images: held-out validation images (``--calibration_fraction``). Training
  images calibrate only with ``--allow_train_calibration``.
* ``--coverage_trials R`` repeats the random split R times and reports, per D, the share of
  trials whose drop on the evaluation images is <= D and the mean MAC reduction, next to the
  article's rule with epsilon = D (tuned on the calibration images, and on train as the article
  does) and the naive rule "calibration drop <= D", on the same splits (``baseline_thresholds``).
"""

import concurrent.futures
import dataclasses
import math
import os
import sys
import time

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

import cascade_report
import cascade_thresholds
import dump_layout
import exit_statistics
import legacy_dumps
import risk_control
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

# Risk control: allowed accuracy drops (fractions: 0.01 is one percentage point) and LTT's delta.
DEFAULT_ACCURACY_DROPS = (0.005, 0.01, 0.02, 0.05)
DEFAULT_DELTA = 0.1
# The epsilons whose thresholds are the candidates. Fixed-sequence testing pays nothing for a
# long sequence, so the grid is fine where the useful drops are (steps of 0.05% of residual
# accuracy up to 10%) and coarse up to epsilon 1, where every image leaves at exit 0.
CANDIDATE_EPSILONS = tuple(sorted({round(e, 4) for e in (
    [0.0005 * i for i in range(200)] + [0.1 + 0.0025 * i for i in range(80)]
    + [0.3 + 0.01 * i for i in range(71)])}))
# Without separate training dumps, this share of the calibration images is set aside to compute
# the candidates (a quarter: the candidates need the shape of each exit's residual curve, the
# test needs the rest to have power).
CANDIDATE_FRACTION = 0.25


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
  return calibration_split, evaluation_split


# -------------------------------------------------------------------------------------------------
# Images: which calibrate the thresholds, which evaluate the cascade.


def check_calibration(calibration_split, evaluation_split, fraction=None, risk_controlled=False,
                      coverage_trials=0, allow_train_calibration=False):
  """Refuses calibration images that cannot do what they are asked for; see the module docstring.

  Args:
    calibration_split, evaluation_split: the splits ``choose_splits`` settled on.
    fraction: --calibration_fraction, or None.
    risk_controlled: whether risk-controlled thresholds are asked for.
    coverage_trials: --coverage_trials.
    allow_train_calibration: --allow_train_calibration.

  Raises:
    DumpError: naming the flags and what to type instead.
  """
  if fraction is not None:
    if not 0.0 < fraction < 1.0:      # NaN fails too
      raise DumpError(f'--calibration_fraction must be in (0, 1), got {fraction}; e.g. '
                      f'--calibration_fraction 0.5 calibrates on a random half of the '
                      f'{evaluation_split} images and reports the cascade on the other half')
    if calibration_split != evaluation_split:
      raise DumpError(f'--calibration_fraction {fraction:g} holds a share of the --eval_split '
                      f'{evaluation_split} images out for calibration, but --calibration_split is '
                      f'{calibration_split}: add --calibration_split {evaluation_split}')
  if coverage_trials and fraction is None:
    raise DumpError('--coverage_trials repeats the random calibration/evaluation split of '
                    '--calibration_fraction: add --calibration_split validation '
                    '--calibration_fraction 0.5')
  if not risk_controlled:
    return
  if calibration_split == 'train' and not allow_train_calibration:
    raise DumpError(
        '--accuracy_drop with --calibration_split train: the network was fitted on its training '
        'images, so their losses are not exchangeable with those of new images and the promised '
        'drop would not hold. Calibrate on held-out images: --calibration_split validation '
        '--calibration_fraction 0.5 (or pass --allow_train_calibration to use train anyway)')
  if calibration_split == evaluation_split and fraction is None:
    raise DumpError(f'--accuracy_drop needs calibration images disjoint from the evaluation '
                    f'images, but both would be all the {evaluation_split} images: add '
                    f'--calibration_fraction 0.5 (a random half calibrates, the other evaluates)')


def split_rows(num_images, fraction, seed):
  """risk_control.calibration_split, with its errors as DumpError (they name the flag)."""
  try:
    return risk_control.calibration_split(num_images, fraction, seed)
  except ValueError as e:
    raise DumpError(str(e)) from e


def subset_stats(stats, rows):
  """The ExitStats of a list restricted to ``rows`` (int [n]), in that order."""
  return [exit_statistics.ExitStats(max_prob=s.max_prob[rows], top5_sum=s.top5_sum[rows],
                                    top1_correct=s.top1_correct[rows],
                                    top5_correct=s.top5_correct[rows]) for s in stats]


@dataclasses.dataclass
class Images:
  """The calibration and evaluation images of a run, as per-exit statistics.

  Attributes:
    calibration, evaluation: lists of ExitStats, one per exit (the very same list when one split
      is tuned and evaluated on without --calibration_fraction).
    calibration_split, evaluation_split: their split names.
    fraction, seed: --calibration_fraction and --calibration_seed, None without a fraction.
    measured_on: {'calibration': text, 'evaluation': text} naming the images, for the tables,
      figures and thresholds.json.
  """
  calibration: list
  evaluation: list
  calibration_split: str
  evaluation_split: str
  fraction: float | None
  seed: int | None
  measured_on: dict

  @property
  def num_calibration(self):
    return int(self.calibration[0].max_prob.size)

  @property
  def num_evaluation(self):
    return int(self.evaluation[0].max_prob.size)


def choose_images(stats, calibration_split, evaluation_split, fraction=None, seed=0):
  """The run's Images: whole splits, or a seeded random ``fraction`` of one split held out.

  Args:
    stats: split name -> list of ExitStats.
    calibration_split, evaluation_split: split names (equal when ``fraction`` is given).
    fraction: share of the evaluation split's images that calibrate, or None.
    seed: seed of that split (``risk_control.calibration_split``).
  """
  if fraction is None:
    calibration, evaluation = stats[calibration_split], stats[evaluation_split]
    n_cal, n_eval = calibration[0].max_prob.size, evaluation[0].max_prob.size
    measured_on = {'calibration': f'{calibration_split} ({n_cal:,} images)',
                   'evaluation': f'{evaluation_split} ({n_eval:,} images)'}
    if calibration_split == evaluation_split:
      measured_on['evaluation'] += ', the calibration images themselves'
      logging.warning('Thresholds are tuned and evaluated on the same %s images: the cascade '
                      'figures are optimistic (--calibration_fraction 0.5 holds half of them '
                      'out).', evaluation_split)
    return Images(calibration, evaluation, calibration_split, evaluation_split, None, None,
                  measured_on)
  split = stats[evaluation_split]
  total = split[0].max_prob.size
  calibration_rows, evaluation_rows = split_rows(total, fraction, seed)
  measured_on = {
      'calibration': f'{calibration_rows.size:,} random {evaluation_split} images (of {total:,}; '
                     f'--calibration_fraction {fraction:g}, --calibration_seed {seed})',
      'evaluation': f'the other {evaluation_rows.size:,} {evaluation_split} images',
  }
  return Images(subset_stats(split, calibration_rows), subset_stats(split, evaluation_rows),
                evaluation_split, evaluation_split, float(fraction), int(seed), measured_on)


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
    dict with accuracy, drop (the last exit's accuracy on the same images minus the cascade's),
    mean_macs, speedup, mac_reduction, exit_shares (list of num_exits).
  """
  exits = cascade_exit_index(confidences, thresholds)
  n = exits.size
  num_exits = len(stage_macs)
  taken = np.bincount(exits, minlength=num_exits)
  cumulative = np.cumsum(np.asarray(stage_macs, dtype=np.int64))
  mean_macs = float(int(taken @ cumulative) / n)
  correct = np.asarray(correct)
  hits = np.count_nonzero(correct[exits, np.arange(n)])
  return {
      'accuracy': float(hits / n),
      # From counts, so that a drop of exactly D compares equal to D.
      'drop': float((np.count_nonzero(correct[-1]) - hits) / n),
      'mean_macs': mean_macs,
      'speedup': plain_macs / mean_macs,
      'mac_reduction': 1.0 - mean_macs / plain_macs,
      'exit_shares': [float(t / n) for t in taken],
  }


def stacked(stats, mode):
  """(confidences float32 [num_exits, N], correct bool [num_exits, N]) of a list of ExitStats."""
  return (np.stack([s.confidence(mode) for s in stats]),
          np.stack([s.correct(mode) for s in stats]))


def cascade_curve(calibration_stats, evaluation_stats, mode, epsilons, stage_macs, plain_macs):
  """Classifier-specific thresholds per epsilon and what the cascade then scores and costs."""
  table = calibrate(calibration_stats, mode, epsilons)
  conf, correct = stacked(evaluation_stats, mode)
  entries = []
  for eps, thresholds in zip(epsilons, table, strict=True):
    entry = {'epsilon': float(eps), 'thresholds': [float(t) for t in thresholds]}
    entry.update(evaluate_cascade(conf, correct, thresholds, stage_macs, plain_macs))
    entries.append(entry)
  return entries


def global_threshold_curve(evaluation_stats, mode, stage_macs, plain_macs,
                           grid=GLOBAL_THRESHOLDS):
  """The baseline: one threshold shared by every early exit, scanned over ``grid``."""
  conf, correct = stacked(evaluation_stats, mode)
  entries = []
  for t in grid:
    entry = {'threshold': float(t)}
    entry.update(evaluate_cascade(conf, correct, [t] * (conf.shape[0] - 1), stage_macs,
                                  plain_macs))
    entries.append(entry)
  return entries


# -------------------------------------------------------------------------------------------------
# Risk-controlled thresholds.


def candidate_thresholds(stats, mode, epsilons=CANDIDATE_EPSILONS):
  """The candidates: the article's thresholds for each epsilon, repeated vectors dropped.

  Args:
    stats: ExitStats of the images the candidates come from (never the calibration images).
    mode: 'top1' or 'top5'.
    epsilons: ascending; their order (safe to aggressive) is the order of the tests.

  Returns:
    (candidates float64 [J, num_exits - 1], epsilons float64 [J]: the first epsilon that gives
    each candidate).
  """
  epsilons = np.asarray(epsilons, np.float64)
  table = calibrate(stats, mode, epsilons)                            # [len(epsilons), K - 1]
  if table.shape[1] == 0:
    return table[:1], epsilons[:1]
  # Each exit's threshold never rises with epsilon, so repeats are neighbours; np.unique finds
  # them anyway, and keeping first occurrences in their order keeps the order fixed.
  _, first = np.unique(table, axis=0, return_index=True)
  keep = np.sort(first)
  return table[keep], epsilons[keep]


def candidate_losses(candidates, confidences, correct, block=64):
  """Every candidate's loss on every image (``risk_control.cascade_losses``).

  Args:
    candidates: float [J, num_exits - 1]. confidences: float32 [num_exits, N].
    correct: bool [num_exits, N]. block: candidates at a time.

  Returns:
    int8 [J, N], final_correct - cascade_correct in {-1, 0, 1}.
  """
  losses = np.empty((len(candidates), confidences.shape[1]), np.int8)
  # The exit indices are int64 (8 bytes per candidate and image): a block at a time keeps them
  # at a few tens of MB for 50,000 ImageNet images.
  for start in range(0, len(candidates), block):
    exits = risk_control.exits_for_candidates(confidences, candidates[start:start + block])
    losses[start:start + block] = risk_control.cascade_losses(exits, correct)
  return losses


@dataclasses.dataclass
class RiskImages:
  """The roles of the images in risk control; candidates, calibration, evaluation are disjoint.

  Attributes:
    candidates: ExitStats of the images the candidate thresholds are computed on.
    candidates_from: 'train' or 'calibration_part' (a seeded share of the calibration images).
    calibration: ExitStats of the images the candidates are tested on.
    evaluation: ExitStats of the images the chosen thresholds are scored on.
    all_calibration: ExitStats of every calibration image (``calibration`` and, without train,
      the candidates' part): what the article's rule of the same run is tuned on.
    train: ExitStats of the training split when it is no image of the other roles, else None.
  """
  candidates: list
  candidates_from: str
  calibration: list
  evaluation: list
  all_calibration: list
  train: list | None = None


def risk_images(calibration, evaluation, train=None, seed=0):
  """Assigns the roles: candidates from ``train`` if given, else from part of ``calibration``.

  Args:
    calibration, evaluation: lists of ExitStats (disjoint images).
    train: ExitStats of the training split, when its dumps exist and it is neither the calibration
      nor the evaluation split; else None.
    seed: seeds the choice of the CANDIDATE_FRACTION of calibration images (without ``train``).
  """
  if train is not None:
    return RiskImages(train, 'train', calibration, evaluation, calibration, train)
  n = calibration[0].max_prob.size
  if n < 2:
    raise DumpError(f'{n} calibration image: too few to set candidates aside and test them; '
                    'raise --calibration_fraction')
  candidate_rows, test_rows = risk_control.calibration_split(
      n, min(max(CANDIDATE_FRACTION, 1 / n), 1 - 1 / n), np.random.SeedSequence([seed, 1]))
  return RiskImages(subset_stats(calibration, candidate_rows), 'calibration_part',
                    subset_stats(calibration, test_rows), evaluation, calibration)


def _never_exit(num_thresholds):
  return np.full(num_thresholds, NEVER_EXIT_THRESHOLD)


def baseline_thresholds(images, mode, accuracy_drops, candidates, losses):
  """The rules risk control is compared with, per D: rule name -> float64 [len(D), K - 1].

  epsilon_rule: the article's rule with epsilon = D, tuned on all the calibration images (as the
  run's epsilon table); epsilon_rule_train: the same tuned on the training split, the article's
  own setting (only when the training split is no image of the other roles); empirical_rule:
  the most aggressive candidate whose calibration drop is <= D (no guarantee).
  """
  rules = {'epsilon_rule': calibrate(images.all_calibration, mode, accuracy_drops)}
  if images.train is not None:
    rules['epsilon_rule_train'] = calibrate(images.train, mode, accuracy_drops)
  naive = [risk_control.empirical_select(losses, d).index for d in accuracy_drops]
  rules['empirical_rule'] = np.stack([candidates[j] if j != risk_control.NEVER_EXIT
                                      else _never_exit(candidates.shape[1]) for j in naive])
  return rules


def control_risk(images, mode, accuracy_drops, delta, method, stage_macs, plain_macs):
  """Risk-controlled thresholds per allowed drop, scored on the evaluation images.

  Args:
    images: RiskImages.
    mode: 'top1' or 'top5'.
    accuracy_drops: the allowed drops D (fractions).
    delta: LTT's error probability (recorded as None for crc, which does not use it).
    method: 'ltt' or 'crc'.
    stage_macs, plain_macs: costs.

  Returns:
    A list of "risk_controlled" entries of thresholds.json (cascade_thresholds), one per D, each
    with the same figures for the ``baseline_thresholds`` under "baselines".
  """
  candidates, epsilons = candidate_thresholds(images.candidates, mode)
  conf, correct = stacked(images.calibration, mode)
  losses = candidate_losses(candidates, conf, correct)                 # int8 [J, n]
  drops = losses.sum(axis=1, dtype=np.int64) / losses.shape[1]          # [J]
  eval_conf, eval_correct = stacked(images.evaluation, mode)

  def evaluation(thresholds):
    return {'images': int(eval_conf.shape[1]),
            **evaluate_cascade(eval_conf, eval_correct, thresholds, stage_macs, plain_macs)}

  baselines = baseline_thresholds(images, mode, accuracy_drops, candidates, losses)
  violations = risk_control.monotonicity_violations(losses) if method == 'crc' else None
  entries = []
  for i, target in enumerate(accuracy_drops):
    selection = risk_control.select(method, losses, target, delta)
    j = selection.index
    chosen = j != risk_control.NEVER_EXIT
    thresholds = candidates[j] if chosen else _never_exit(candidates.shape[1])
    entry = {
        'mode': mode, 'accuracy_drop': float(target),
        'delta': float(delta) if method == 'ltt' else None, 'method': method,
        'thresholds': [float(t) for t in thresholds],
        'calibration_images': int(losses.shape[1]),
        'candidates_from': images.candidates_from,
        'candidate_images': int(images.candidates[0].max_prob.size),
        'num_candidates': int(len(candidates)),
        'candidate_index': int(j),
        'candidate_epsilon': float(epsilons[j]) if chosen else None,
        # On the calibration images: the drop, the bounded risk mean(max(L, 0)) the test is on,
        # and its p-value (ltt) or conformal bound (crc).
        'calibration': {'drop': float(drops[j]) if chosen else 0.0,
                        'bounded_risk': float(selection.risks[j]) if chosen else 0.0,
                        'score': float(selection.scores[j]) if chosen else None},
        'evaluation': evaluation(thresholds),
        'baselines': {rule: {'thresholds': [float(t) for t in table[i]],
                             'evaluation': evaluation(table[i])}
                      for rule, table in baselines.items()},
    }
    if violations is not None:
      entry['monotonicity_violations'] = {'count': violations.count,
                                          'max_decrease': violations.max_decrease}
    entries.append(entry)
  return entries


def _summary(drops, reductions, target):
  """Coverage figures of one rule over the trials: drops, reductions float [R]."""
  return {'share_within': float(np.mean(drops <= target)), 'mean_drop': float(np.mean(drops)),
          'max_drop': float(np.max(drops)), 'mean_mac_reduction': float(np.mean(reductions))}


def run_coverage_trials(split_stats, train, mode, fraction, seed, trials, accuracy_drops, delta,
                        method, stage_macs, plain_macs, show_progress=False):
  """Repeats split, calibrate and evaluate on ``trials`` random splits of one split's images.

  Every trial does what a run does (``control_risk``): a random ``fraction`` of the images
  calibrates (candidates from ``train``, or from part of the calibration images), the rest
  evaluate. Per D it records the chosen thresholds' drop and MAC reduction on the evaluation
  images, and on the same split those of the ``baseline_thresholds``.

  Args:
    split_stats: ExitStats of the split that is split (the evaluation split).
    train: ExitStats of the training split for the candidates, or None.
    mode: 'top1' or 'top5'.
    fraction, seed: the calibration share; trial r splits with seed trial_seeds[r], drawn from
      ``np.random.default_rng([seed, 2])``.
    trials: R >= 1.
    accuracy_drops, delta, method, stage_macs, plain_macs: as for ``control_risk``.
    show_progress: a tqdm bar over the trials.

  Returns:
    list, one per D, of the "coverage" dicts of thresholds.json: trials, calibration_fraction,
    seed, trial_seeds, share_within, mean_drop, max_drop, mean_mac_reduction, never_exit_share,
    required_share_within (1 - delta for ltt, else None), drops (per trial), and the same
    figures under "baselines" (epsilon_rule, epsilon_rule_train with ``train``, empirical_rule).
  """
  num_images = split_stats[0].max_prob.size
  trial_seeds = np.random.default_rng([seed, 2]).integers(0, 2**63 - 1, size=trials)
  drops, reductions = {}, {}                        # rule -> float [len(D), R]
  never = np.empty((len(accuracy_drops), trials), bool)
  for r, trial_seed in enumerate(tqdm(trial_seeds, desc=f'coverage trials {mode}', leave=False,
                                      disable=not show_progress, mininterval=1.0)):
    calibration_rows, evaluation_rows = split_rows(num_images, fraction, int(trial_seed))
    images = risk_images(subset_stats(split_stats, calibration_rows),
                         subset_stats(split_stats, evaluation_rows), train, int(trial_seed))
    entries = control_risk(images, mode, accuracy_drops, delta, method, stage_macs, plain_macs)
    for i, entry in enumerate(entries):
      results = {'risk_controlled': entry['evaluation'],
                 **{rule: b['evaluation'] for rule, b in entry['baselines'].items()}}
      for rule, result in results.items():
        drops.setdefault(rule, np.empty((len(accuracy_drops), trials)))[i, r] = result['drop']
        reductions.setdefault(rule, np.empty((len(accuracy_drops), trials)))[i, r] = (
            result['mac_reduction'])
      never[i, r] = entry['candidate_index'] == risk_control.NEVER_EXIT
  summaries = []
  for i, target in enumerate(accuracy_drops):
    summary = {'trials': int(trials), 'calibration_fraction': float(fraction), 'seed': int(seed),
               'trial_seeds': [int(s) for s in trial_seeds],
               **_summary(drops['risk_controlled'][i], reductions['risk_controlled'][i], target),
               'never_exit_share': float(np.mean(never[i])),
               'required_share_within': 1.0 - float(delta) if method == 'ltt' else None,
               'drops': [float(d) for d in drops['risk_controlled'][i]],
               'baselines': {rule: _summary(drops[rule][i], reductions[rule][i], target)
                             for rule in drops if rule != 'risk_controlled'}}
    summaries.append(summary)
  return summaries


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


def check_risk_control(accuracy_drops, delta, method, coverage_trials):
  """Returns the drops as sorted unique floats; raises DumpError on a bad value of any flag."""
  values = [float(d) for d in accuracy_drops]
  bad = [d for d in values if not 0.0 < d < 1.0 or math.isnan(d)]
  if bad:
    raise DumpError(f'--accuracy_drop values must be fractions in (0, 1), got {bad}; e.g. '
                    '--accuracy_drop 0.005,0.01 (0.01 allows one percentage point of accuracy)')
  if not values:
    raise DumpError('--accuracy_drop is empty; give at least one value, e.g. --accuracy_drop 0.01')
  if not 0.0 < float(delta) < 1.0:
    raise DumpError(f'--delta must be in (0, 1), got {delta}; e.g. --delta 0.1: the drop stays '
                    'within --accuracy_drop with probability at least 90%')
  if method not in cascade_thresholds.RISK_CONTROL_METHODS:
    raise DumpError(f'--risk_control must be one of {cascade_thresholds.RISK_CONTROL_METHODS}, '
                    f'got {method!r}')
  if int(coverage_trials) < 0:
    raise DumpError(f'--coverage_trials must be >= 0, got {coverage_trials}')
  return sorted(set(values))


def run_analysis(softmax_dir, output_dir='cascade_report', dataset_path=None, modes=MODES,
                 epsilons=None, calibration_split='train', evaluation_split='validation',
                 calibration_fraction=None, calibration_seed=0, accuracy_drops=None,
                 delta=DEFAULT_DELTA, risk_control_method='ltt', coverage_trials=0,
                 allow_train_calibration=False, stage_macs=None, plain_macs=None,
                 chunk_rows=16384, num_threads=2, show_progress=True, out=sys.stdout):
  """Runs everything: reads the dumps, prints the tables, writes the report.

  Args:
    softmax_dir: dump folder. dataset_path: optional folder with the original's label pickles.
    output_dir: report folder. modes: subset of MODES.
    epsilons: list of fractions for every mode, or None for DEFAULT_EPSILONS.
    calibration_split, evaluation_split: 'train' or 'validation'.
    calibration_fraction: None, or the share of the evaluation split's images that calibrate
      (then ``calibration_split`` must equal ``evaluation_split``); ``calibration_seed`` seeds it.
    accuracy_drops: allowed drops D for risk-controlled thresholds; None: DEFAULT_ACCURACY_DROPS
      when ``calibration_fraction`` holds calibration images out, else no risk control.
    delta, risk_control_method: LTT's error probability; 'ltt' or 'crc'.
    coverage_trials: repeat the random split this many times (needs ``calibration_fraction``).
    allow_train_calibration: let risk control calibrate on the training split.
    stage_macs, plain_macs: override the manifest (or the article's numbers).
    chunk_rows, num_threads, show_progress: reading.
    out: stream for the printed tables.

  Returns:
    The thresholds.json content (dict).

  Raises:
    DumpError: bad flags, refused calibration images, damaged or missing dumps.
  """
  modes = [m for m in MODES if m in modes]
  if not modes:
    raise DumpError(f'no mode to run; choose from {MODES}')
  eps = {m: check_epsilons(epsilons if epsilons is not None else DEFAULT_EPSILONS[m])
         for m in modes}
  risk_controlled = accuracy_drops is not None or calibration_fraction is not None
  if risk_controlled:
    accuracy_drops = check_risk_control(
        DEFAULT_ACCURACY_DROPS if accuracy_drops is None else accuracy_drops, delta,
        risk_control_method, coverage_trials)
  if chunk_rows <= 0:
    raise DumpError(f'--chunk_rows must be positive, got {chunk_rows}')
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise DumpError(f'--output_dir {output_dir} is a file; choose a folder')
  dumps = find_dumps(softmax_dir, dataset_path)
  calibration_split, evaluation_split = choose_splits(dumps, calibration_split, evaluation_split)
  # Before the slow reading: a refused request costs nothing.
  check_calibration(calibration_split, evaluation_split, calibration_fraction, risk_controlled,
                    coverage_trials, allow_train_calibration)
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
  images = choose_images(stats, calibration_split, evaluation_split, calibration_fraction,
                         calibration_seed)

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
      'calibration_fraction': images.fraction,
      'calibration_seed': images.seed,
      'calibration_images': images.num_calibration,
      'evaluation_images': images.num_evaluation,
      'measured_on': images.measured_on,
      'num_images': {split: int(v.size) for split, v in labels.items()},
      'never_exit_threshold': NEVER_EXIT_THRESHOLD,
      'exit_accuracy': accuracies,
      'evaluation_exit_accuracy': exit_statistics.exit_accuracies(images.evaluation),
      'source': {'softmax_dir': os.path.abspath(softmax_dir), 'layout': dumps.layout,
                 **{k: manifest[k] for k in ('model', 'checkpoint', 'global_step', 'dataset')
                    if k in manifest}},
      'global_threshold': {},
  }
  start = time.perf_counter()
  sort_residual_curves(images.calibration, images.evaluation, modes, num_threads)
  for mode in modes:
    report[mode] = cascade_curve(images.calibration, images.evaluation, mode, eps[mode],
                                 stage_macs, plain_macs)
    report['global_threshold'][mode] = global_threshold_curve(images.evaluation, mode,
                                                              stage_macs, plain_macs)
    print('', file=out)
    print(cascade_report.format_cascade_table(report[mode], mode, images.measured_on), file=out)
  logging.info('Thresholds and cascades in %.1f s.', time.perf_counter() - start)
  if risk_controlled:
    start = time.perf_counter()
    add_risk_control(report, images, stats, modes, accuracy_drops, delta, risk_control_method,
                     coverage_trials, calibration_seed, stage_macs, plain_macs, show_progress,
                     out)
    logging.info('Risk-controlled thresholds in %.1f s.', time.perf_counter() - start)
  start = time.perf_counter()
  files = cascade_report.write_report(report, images.evaluation, images.calibration, output_dir)
  logging.info('Wrote %s to %s in %.1f s.', ', '.join(files), output_dir,
               time.perf_counter() - start)
  return report


def add_risk_control(report, images, stats, modes, accuracy_drops, delta, method,
                     coverage_trials, seed, stage_macs, plain_macs, show_progress=False,
                     out=sys.stdout):
  """Adds report['risk_controlled'] (and coverage), printing the tables; see run_analysis.

  ``seed`` (--calibration_seed) also picks the candidates' share of the calibration images when
  there are no training dumps to take them from.
  """
  # Training images make candidates only when they are no image of the other two roles.
  train = stats.get('train') if 'train' not in (images.calibration_split,
                                                 images.evaluation_split) else None
  roles = risk_images(images.calibration, images.evaluation, train, seed)
  report['risk_controlled'] = []
  for mode in modes:
    entries = control_risk(roles, mode, accuracy_drops, delta, method, stage_macs, plain_macs)
    if coverage_trials:
      summaries = run_coverage_trials(stats[images.evaluation_split], train, mode,
                                      images.fraction, seed, coverage_trials, accuracy_drops,
                                      delta, method, stage_macs, plain_macs, show_progress)
      for entry, summary in zip(entries, summaries, strict=True):
        entry['coverage'] = summary
    # One set of calibration losses per mode: the violations are the same for every D.
    violations = entries[0].get('monotonicity_violations', {'count': 0})
    if violations['count']:
      logging.warning('%s: the calibration risk decreases %d times along the candidates (by up '
                      'to %.4f): crc assumes it does not, so its guarantee is approximate here; '
                      '--risk_control ltt needs no such assumption.', mode, violations['count'],
                      violations['max_decrease'])
    report['risk_controlled'] += entries
    print('', file=out)
    print(cascade_report.format_risk_table(report, mode), file=out)
    if coverage_trials:
      print('', file=out)
      print(cascade_report.format_coverage_table(report, mode), file=out)


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
  flags.DEFINE_list('epsilons', None, 'The article\'s epsilons, as fractions, e.g. 0,0.01,0.05: '
                    'allowed drops of each exit\'s residual accuracy on the calibration images, '
                    'not the accuracy a user loses (see --accuracy_drop) (default: 0..0.20 for '
                    'top-1, the article\'s list for top-5).')
  flags.DEFINE_enum('calibration_split', 'train', dump_layout.SPLITS,
                    'Split the thresholds are tuned on (the article: train).')
  flags.DEFINE_enum('eval_split', 'validation', dump_layout.SPLITS,
                    'Split the cascade is evaluated on.')
  flags.DEFINE_float('calibration_fraction', None,
                     'With --calibration_split validation: a random share F of the validation '
                     'images tunes the thresholds and the cascade is reported on the other 1 - F '
                     '(disjoint). Without it, validation calibration tunes and reports on the '
                     'same images.')
  flags.DEFINE_integer('calibration_seed', 0, 'Seed of the --calibration_fraction split.')
  flags.DEFINE_list('accuracy_drop', None,
                    'Risk-controlled thresholds for these allowed accuracy drops against the '
                    'plain network, as fractions (0.01: one percentage point). Default '
                    f'{",".join(f"{d:g}" for d in DEFAULT_ACCURACY_DROPS)} whenever '
                    '--calibration_fraction holds calibration images out.')
  flags.DEFINE_float('delta', DEFAULT_DELTA, 'ltt: the drop exceeds --accuracy_drop with '
                     'probability at most delta, over the draw of the calibration images.')
  flags.DEFINE_enum('risk_control', 'ltt', cascade_thresholds.RISK_CONTROL_METHODS,
                    'ltt: Learn then Test, P(drop <= D) >= 1 - delta; crc: conformal risk '
                    'control, expected drop <= D.')
  flags.DEFINE_integer('coverage_trials', 0, 'Repeat the random --calibration_fraction split this '
                       'many times and report how often the drop kept within --accuracy_drop.',
                       lower_bound=0)
  flags.DEFINE_boolean('allow_train_calibration', False,
                       'Let --accuracy_drop calibrate on the training split (no guarantee: the '
                       'network was fitted on those images).')
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
    accuracy_drops = None
    if f.accuracy_drop is not None:
      accuracy_drops = _parse_numbers(f.accuracy_drop, float, 'accuracy_drop')
    elif any(f[name].present for name in ('delta', 'risk_control', 'coverage_trials',
                                           'allow_train_calibration')):
      # Any risk-control flag asks for risk control, so that it is checked, not ignored.
      accuracy_drops = list(DEFAULT_ACCURACY_DROPS)
    run_analysis(
        softmax_dir, output_dir=f.output_dir, dataset_path=f.dataset_path,
        modes=('top5',) if f.top5 else MODES,
        epsilons=_parse_numbers(f.epsilons, float, 'epsilons') if f.epsilons else None,
        calibration_split=f.calibration_split, evaluation_split=f.eval_split,
        calibration_fraction=f.calibration_fraction, calibration_seed=f.calibration_seed,
        accuracy_drops=accuracy_drops, delta=f.delta, risk_control_method=f.risk_control,
        coverage_trials=f.coverage_trials, allow_train_calibration=f.allow_train_calibration,
        stage_macs=_parse_numbers(f.stage_macs, int, 'stage_macs') if f.stage_macs else None,
        plain_macs=f.plain_macs, chunk_rows=f.chunk_rows, num_threads=f.num_threads)
  except DumpError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
