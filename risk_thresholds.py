"""Risk-controlled thresholds of the cascade: the candidates, their losses on the calibration
images, the choice per allowed accuracy drop, and coverage trials.

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

import dataclasses
import math
import sys

import numpy as np
from absl import logging
from tqdm import tqdm

import cascade_report
import cascade_rules
import cascade_thresholds
import exit_statistics
import risk_control
from cascade_thresholds import NEVER_EXIT_THRESHOLD
from dump_layout import DumpError

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


def split_rows(num_images, fraction, seed):
  """risk_control.calibration_split, with its errors as DumpError (they name the flag)."""
  try:
    return risk_control.calibration_split(num_images, fraction, seed)
  except ValueError as e:
    raise DumpError(str(e)) from e


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
  table = cascade_rules.calibrate(stats, mode, epsilons)            # [len(epsilons), K - 1]
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
  return RiskImages(exit_statistics.subset_stats(calibration, candidate_rows), 'calibration_part',
                    exit_statistics.subset_stats(calibration, test_rows), evaluation, calibration)


def _never_exit(num_thresholds):
  return np.full(num_thresholds, NEVER_EXIT_THRESHOLD)


def baseline_thresholds(images, mode, accuracy_drops, candidates, losses):
  """The rules risk control is compared with, per D: rule name -> float64 [len(D), K - 1].

  epsilon_rule: the article's rule with epsilon = D, tuned on all the calibration images (as the
  run's epsilon table); epsilon_rule_train: the same tuned on the training split, the article's
  own setting (only when the training split is no image of the other roles); empirical_rule:
  the most aggressive candidate whose calibration drop is <= D (no guarantee).
  """
  rules = {'epsilon_rule': cascade_rules.calibrate(images.all_calibration, mode, accuracy_drops)}
  if images.train is not None:
    rules['epsilon_rule_train'] = cascade_rules.calibrate(images.train, mode, accuracy_drops)
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
  conf, correct = cascade_rules.stacked(images.calibration, mode)
  losses = candidate_losses(candidates, conf, correct)                 # int8 [J, n]
  drops = losses.sum(axis=1, dtype=np.int64) / losses.shape[1]          # [J]
  eval_conf, eval_correct = cascade_rules.stacked(images.evaluation, mode)

  def evaluation(thresholds):
    return {'images': int(eval_conf.shape[1]),
            **cascade_rules.evaluate_cascade(eval_conf, eval_correct, thresholds, stage_macs,
                                             plain_macs)}

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
    images = risk_images(exit_statistics.subset_stats(split_stats, calibration_rows),
                         exit_statistics.subset_stats(split_stats, evaluation_rows), train,
                         int(trial_seed))
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
