"""The cascade's rules, offline: the article's per-exit thresholds, and leaving at the first
confident exit, scored and costed on per-exit statistics (``exit_statistics.ExitStats``).

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

Cascade, on the evaluation images: a sample leaves at the first exit k whose confidence reaches its
threshold (c_k >= delta_k); the last exit takes everything left, unconditionally. A sample leaving
at exit k costs sum(stage_macs[:k + 1]). Reported: accuracy (top-1 accuracy in top-1 mode, top-5
in top-5 mode), mean MACs per image, speedup = plain_macs / mean MACs, MAC reduction =
1 - mean MACs / plain_macs, and the share of images leaving at each exit. The global-threshold
baseline uses one threshold for all early exits, scanned over 0.00, 0.01, ..., 1.00.
"""

import concurrent.futures

import numpy as np

import exit_statistics
from cascade_thresholds import NEVER_EXIT_THRESHOLD

GLOBAL_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(101))


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


