"""Tests of risk_control.py: p-values, exits, selection rules against brute force, coverage."""

import math
import os
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import risk_control as rc  # noqa: E402

SKILLS = (0.0, 0.8, 1.5)  # exit k answers images of difficulty z right with sigmoid(1.5 (s_k - z))


def synthetic_cascade(rng, n, nested=False):
  """Confidences float32 [3, n] and correctness bool [3, n] of a 3-exit cascade.

  Harder images (larger z) are less often right and get lower confidences. nested=True draws one
  uniform per image for all exits, so an image an exit gets right every later exit gets right too:
  then each image's loss can only grow as it leaves earlier (CRC's monotonicity holds exactly)
  and no loss is -1. Otherwise each exit draws its own, and early exits sometimes fix the last.
  """
  z = rng.standard_normal(n)
  shared = rng.random(n)
  confidences, correct = [], []
  for skill in SKILLS:
    p = 1.0 / (1.0 + np.exp(-1.5 * (skill - z)))
    u = shared if nested else rng.random(n)
    correct.append(u < p)
    confidences.append(np.clip(p + 0.1 * rng.standard_normal(n), 0.0, 1.0))
  return np.array(confidences, np.float32), np.array(correct)


# ---------------------------------------------------------------------------------------------
# Independent references (plain Python, no numpy vectorisation, no scipy).


def reference_pvalue(risk_hat, n, target):
  """Hoeffding-Bentkus p-value and its two parts, from math only."""
  a = min(risk_hat, target)
  h = 0.0
  if a > 0:
    h += a * math.log(a / target)
  if a < 1:
    h += (1 - a) * math.log((1 - a) / (1 - target))
  p_hoeffding = math.exp(-n * h)
  k = math.ceil(round(n * risk_hat, 9))
  cdf = sum(math.comb(n, i) * target**i * (1 - target)**(n - i) for i in range(min(k, n) + 1))
  p_bentkus = math.e * cdf
  return min(1.0, p_hoeffding, p_bentkus), p_hoeffding, p_bentkus


def reference_exit(conf_column, thresholds):
  for k, t in enumerate(thresholds):
    if np.float32(conf_column[k]) >= np.float32(t):
      return k
  return len(conf_column) - 1


def reference_losses(confidences, correct, candidates):
  """[J][N] nested lists of final_correct - cascade_correct, by explicit loops."""
  num_exits, num_images = len(confidences), len(confidences[0])
  rows = []
  for thresholds in candidates:
    row = []
    for i in range(num_images):
      e = reference_exit([confidences[k][i] for k in range(num_exits)], thresholds)
      row.append(int(bool(correct[-1][i])) - int(bool(correct[e][i])))
    rows.append(row)
  return rows


def reference_ltt(rows, target, delta):
  index = -1
  for j, row in enumerate(rows):
    n = len(row)
    risk = sum(max(v, 0) for v in row) / n
    if reference_pvalue(risk, n, target)[0] > delta:
      break
    index = j
  return index


def reference_crc(rows, target):
  index = -1
  for j, row in enumerate(rows):
    n = len(row)
    risk = sum(max(v, 0) for v in row) / n
    if n / (n + 1) * risk + 1 / (n + 1) > target:
      break
    index = j
  return index


def reference_empirical(rows, target):
  index = -1
  for j, row in enumerate(rows):
    if sum(row) / len(row) <= target:
      index = j
  return index


# ---------------------------------------------------------------------------------------------
# hoeffding_bentkus_pvalue


PVALUE_CASES = [  # (risk_hat, n, target)
    (0.0, 500, 0.01),
    (0.0, 50, 0.2),
    (0.0123, 1000, 0.05),
    (0.02, 1000, 0.03),
    (0.04, 2000, 0.05),
    (0.05, 200, 0.1),
    (0.3, 30, 0.5),
    (0.087, 1000, 0.1),
    (0.1, 100, 0.1),
    (0.6, 40, 0.5),
    (1.0, 10, 0.5),
]


@pytest.mark.parametrize('risk_hat, n, target', PVALUE_CASES)
def test_pvalue_matches_hand_computation(risk_hat, n, target):
  expected = reference_pvalue(risk_hat, n, target)[0]
  got = rc.hoeffding_bentkus_pvalue(risk_hat, n, target)
  assert isinstance(got, float)
  assert got == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_pvalue_cases_exercise_both_bounds_and_agree_vectorised():
  parts = [reference_pvalue(*case) for case in PVALUE_CASES]
  assert any(p_h < p_b and p < 1 for p, p_h, p_b in parts)   # Hoeffding decides some
  assert any(p_b < p_h and p < 1 for p, p_h, p_b in parts)   # Bentkus decides others
  risks = np.array([[0.0, 0.01], [0.02, 0.05]])
  got = rc.hoeffding_bentkus_pvalue(risks, 800, 0.04)
  assert got.shape == (2, 2)
  for index in np.ndindex(2, 2):
    assert got[index] == pytest.approx(reference_pvalue(risks[index], 800, 0.04)[0], rel=1e-9)


def test_pvalue_of_a_count_is_not_pushed_up_by_rounding():
  # count / n * n can exceed count by an ulp (7 / 3000 * 3000 = 7.000000000000001); the binomial
  # tail must still stop at the count.
  counts = range(0, 150)
  assert any(count / 3000 * 3000 > count for count in counts)
  for count in counts:
    risk = count / 3000
    expected = reference_pvalue(risk, 3000, 0.05)[0]
    assert rc.hoeffding_bentkus_pvalue(risk, 3000, 0.05) == pytest.approx(expected, rel=1e-9)


def test_pvalue_is_monotone_and_one_at_or_above_the_target():
  for n, target in ((100, 0.1), (2000, 0.03), (37, 0.5)):
    risks = np.linspace(0.0, 1.0, 1001)
    p = rc.hoeffding_bentkus_pvalue(risks, n, target)
    assert np.all(np.diff(p) >= 0)
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(p[risks >= target] == pytest.approx(1.0))
    assert p[0] < 1e-2                                           # zero failures: strong evidence
  assert rc.hoeffding_bentkus_pvalue(0.0, 1000, 0.05) < 1e-20
  assert not np.isnan(rc.hoeffding_bentkus_pvalue(np.array([0.0, 1.0]), 1, 0.999)).any()


@pytest.mark.parametrize('kwargs', [
    {'risk_hat': 0.1, 'n': 10, 'target': 0.0},
    {'risk_hat': 0.1, 'n': 10, 'target': 1.0},
    {'risk_hat': 0.1, 'n': 10, 'target': -0.2},
    {'risk_hat': 0.1, 'n': 10, 'target': 1.5},
    {'risk_hat': 0.1, 'n': 0, 'target': 0.5},
    {'risk_hat': 0.1, 'n': 2.5, 'target': 0.5},
    {'risk_hat': 1.2, 'n': 10, 'target': 0.5},
    {'risk_hat': -0.5, 'n': 10, 'target': 0.5},
    {'risk_hat': float('nan'), 'n': 10, 'target': 0.5},
])
def test_pvalue_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    rc.hoeffding_bentkus_pvalue(**kwargs)


# ---------------------------------------------------------------------------------------------
# exits_for_candidates and cascade_losses


@pytest.mark.parametrize('max_block_elements', [1, 700, 1 << 22])
def test_exits_match_a_per_image_loop(max_block_elements):
  rng = np.random.default_rng(3)
  confidences, _ = synthetic_cascade(rng, 300)
  candidates = rng.uniform(0.2, 1.0, size=(25, 2))
  candidates[3] = confidences[:2, 17]          # ties: the image leaves (>=)
  candidates[4] = [2.0, 2.0]                   # nobody leaves early
  candidates[5] = [0.0, 2.0]                   # everybody leaves at exit 0
  got = rc.exits_for_candidates(confidences, candidates, max_block_elements=max_block_elements)
  assert got.dtype == np.int64 and got.shape == (25, 300)
  for j in range(25):
    for i in range(300):
      assert got[j, i] == reference_exit(confidences[:, i], candidates[j]), (j, i)
  assert got[3, 17] == 0
  assert np.all(got[4] == 2) and np.all(got[5] == 0)


def test_exits_compare_in_float32():
  confidences = np.array([[0.7, 0.69999], [0.1, 0.1], [0.0, 0.0]], np.float32)
  # float32(0.7) < float64 0.7, so a float64 comparison would keep image 0 from leaving.
  got = rc.exits_for_candidates(confidences, np.array([[0.7, 0.5]]))
  np.testing.assert_array_equal(got, [[0, 2]])
  # 0.69999998 rounds to float32(0.7) but is below it in float64: still leaves at exit 0.
  as_float64 = rc.exits_for_candidates(np.array([[0.69999998], [0.0], [0.0]]), [[0.7, 0.5]])
  np.testing.assert_array_equal(as_float64, [[0]])
  single_exit = rc.exits_for_candidates(np.ones((1, 4)), np.zeros((3, 0)))
  np.testing.assert_array_equal(single_exit, np.zeros((3, 4)))


def test_exits_reject_mismatched_shapes():
  with pytest.raises(ValueError, match='reshape'):
    rc.exits_for_candidates(np.zeros((3, 5)), np.zeros(2))
  with pytest.raises(ValueError, match=r'\[num_candidates, 2\]'):
    rc.exits_for_candidates(np.zeros((3, 5)), np.zeros((4, 3)))
  with pytest.raises(ValueError):
    rc.exits_for_candidates(np.zeros(5), np.zeros((4, 0)))


def test_cascade_losses_by_hand():
  correct = np.array([[1, 0, 1, 0],
                      [0, 1, 1, 0],
                      [1, 1, 0, 0]], bool)
  exits = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2], [1, 0, 2, 0]])
  expected = [[0, 1, -1, 0], [1, 0, -1, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
  got = rc.cascade_losses(exits, correct)
  assert got.dtype == np.int8
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(rc.cascade_losses(exits[3], correct), expected[3])
  with pytest.raises(ValueError, match=r'\[0, 2\]'):
    rc.cascade_losses(np.array([0, 3, 0, 0]), correct)
  with pytest.raises(ValueError):
    rc.cascade_losses(np.zeros((2, 5), int), correct)
  with pytest.raises(ValueError, match='integer'):
    rc.cascade_losses(np.zeros(4), correct)


# ---------------------------------------------------------------------------------------------
# Selection rules against brute force


@pytest.fixture(scope='module')
def brute_force_problem():
  """200 images, 3 exits, all 225 threshold pairs of a 15-value grid, and loop-computed losses.

  Order (fixed, safe to aggressive): by t_0 + t_1 descending, then t_0 descending. Along it the
  empirical risk is not monotone, so the walk-and-stop rules differ from "largest passing".
  """
  rng = np.random.default_rng(11)
  confidences, correct = synthetic_cascade(rng, 200)
  grid = [round(1.0 - 0.05 * g, 2) for g in range(15)]           # 1.00, 0.95, ..., 0.30
  pairs = sorted(((a, b) for a in grid for b in grid), key=lambda p: (-(p[0] + p[1]), -p[0]))
  candidates = np.array(pairs)
  rows = reference_losses(confidences.tolist(), correct.tolist(), pairs)
  return confidences, correct, candidates, rows


def test_vectorised_losses_match_the_loops(brute_force_problem):
  confidences, correct, candidates, rows = brute_force_problem
  losses = rc.cascade_losses(rc.exits_for_candidates(confidences, candidates), correct)
  np.testing.assert_array_equal(losses, np.array(rows))
  assert (losses == -1).any() and (losses == 1).any()


@pytest.mark.parametrize('target, delta', [(0.02, 0.1), (0.05, 0.1), (0.05, 0.01), (0.1, 0.2),
                                           (0.15, 0.05), (0.001, 0.1)])
def test_selections_match_brute_force(brute_force_problem, target, delta):
  _, _, _, rows = brute_force_problem
  losses = np.array(rows, np.int8)
  ltt = rc.ltt_select(losses, target, delta)
  crc = rc.crc_select(losses, target)
  empirical = rc.empirical_select(losses, target)
  assert ltt.index == reference_ltt(rows, target, delta)
  assert crc.index == reference_crc(rows, target)
  assert empirical.index == reference_empirical(rows, target)
  assert ltt.method == 'ltt' and ltt.num_samples == 200 and ltt.scores.shape == (225,)
  for j in (0, 57, 224):
    risk = sum(max(v, 0) for v in rows[j]) / 200
    assert ltt.risks[j] == pytest.approx(risk)
    assert ltt.scores[j] == pytest.approx(reference_pvalue(risk, 200, target)[0], rel=1e-9)
    assert empirical.risks[j] == pytest.approx(sum(rows[j]) / 200)
  if ltt.index >= 0:
    assert ltt.passed[:ltt.index + 1].all()
  if ltt.index + 1 < 225:
    assert not ltt.passed[ltt.index + 1]


def test_brute_force_problem_is_not_trivial(brute_force_problem):
  _, _, _, rows = brute_force_problem
  picks = {(t, d): (reference_ltt(rows, t, d), reference_crc(rows, t),
                    reference_empirical(rows, t))
           for t, d in [(0.02, 0.1), (0.05, 0.1), (0.1, 0.2), (0.15, 0.05)]}
  for method in range(3):
    assert any(0 <= p[method] < 224 for p in picks.values())  # interior picks for every rule
  assert any(p[1] != p[2] for p in picks.values())            # CRC stops before a later dip
  assert rc.ltt_select(np.array(rows), 0.001, 0.1).index == -1
  assert rc.monotonicity_violations(np.array(rows)).count > 0


def test_ltt_and_crc_clip_negative_losses_and_reject_unbounded():
  rng = np.random.default_rng(5)
  losses = rng.integers(-1, 2, size=(30, 400)).astype(np.int8)
  losses[:, :300] = np.minimum(losses[:, :300], 0)                # low risks
  clipped = np.maximum(losses, 0)
  assert rc.ltt_select(losses, 0.3, 0.1).index == rc.ltt_select(clipped, 0.3, 0.1).index
  np.testing.assert_array_equal(rc.ltt_select(losses, 0.3, 0.1).scores,
                                rc.ltt_select(clipped, 0.3, 0.1).scores)
  np.testing.assert_array_equal(rc.crc_select(losses, 0.3).scores,
                                rc.crc_select(clipped, 0.3).scores)
  with pytest.raises(ValueError, match='<= 1'):
    rc.ltt_select(losses * 2, 0.3, 0.1)
  with pytest.raises(ValueError, match='<= 1'):
    rc.crc_select(losses.astype(float) + 0.5, 0.3)
  with pytest.raises(ValueError, match='delta'):
    rc.ltt_select(losses, 0.3, 1.0)
  with pytest.raises(ValueError, match='target'):
    rc.crc_select(losses, 0.0)
  with pytest.raises(ValueError):
    rc.empirical_select(losses[0], 0.1)
  with pytest.raises(ValueError, match='method'):
    rc.select('bonferroni', losses, 0.1, 0.1)


def test_crc_bound_and_float_losses():
  losses = np.array([[0.0, 0.0, 0.0, 0.0],
                     [0.0, 0.5, 0.0, 0.0],
                     [2.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, 0.0, 0.0]])
  selection = rc.crc_select(losses, 0.6, bound=2.0)
  # n = 4: 0.8 * risk + 0.4 -> 0.4, 0.5, 0.8, 0.4; the walk stops at candidate 2.
  np.testing.assert_allclose(selection.scores, [0.4, 0.5, 0.8, 0.4])
  assert selection.index == 1
  assert rc.crc_select(losses, 0.3, bound=2.0).index == -1
  assert rc.empirical_select(losses, 0.3).index == 3


def test_monotonicity_violations_by_hand():
  n = 10
  risks = [0.1, 0.3, 0.2, 0.2, 0.0]
  losses = np.zeros((5, n), np.int8)
  for j, r in enumerate(risks):
    losses[j, :round(r * n)] = 1
  losses[3, -3:] = -1        # the drop of row 3 decreases, its bounded risk does not
  report = rc.monotonicity_violations(losses)
  np.testing.assert_array_equal(report.indices, [2, 4])
  np.testing.assert_allclose(report.decreases, [0.1, 0.2])
  assert report.count == 2 and report.max_decrease == pytest.approx(0.2)
  assert rc.monotonicity_violations(np.sort(losses.clip(0), axis=0)).count == 0


# ---------------------------------------------------------------------------------------------
# calibration_split


def test_calibration_split_partitions_and_is_seeded():
  calibration, evaluation = rc.calibration_split(1000, 0.3, seed=7)
  assert calibration.dtype == np.int64 and evaluation.dtype == np.int64
  assert calibration.size == 300 and evaluation.size == 700
  assert np.all(np.diff(calibration) > 0) and np.all(np.diff(evaluation) > 0)
  assert np.intersect1d(calibration, evaluation).size == 0
  np.testing.assert_array_equal(np.union1d(calibration, evaluation), np.arange(1000))
  again = rc.calibration_split(1000, 0.3, seed=7)
  np.testing.assert_array_equal(again[0], calibration)
  np.testing.assert_array_equal(again[1], evaluation)
  other = rc.calibration_split(1000, 0.3, seed=8)
  assert not np.array_equal(other[0], calibration)
  assert calibration[:300].max() > 500         # random, not the first 300 images
  tiny = rc.calibration_split(2, 0.5, seed=0)
  assert tiny[0].size == 1 and tiny[1].size == 1


@pytest.mark.parametrize('num_images, fraction', [(100, 0.0), (100, 1.0), (100, -0.1),
                                                  (100, 1.5), (10, 0.01), (10, 0.99), (1, 0.5),
                                                  (0, 0.5)])
def test_calibration_split_errors_name_the_flag(num_images, fraction):
  with pytest.raises(ValueError, match='--calibration_fraction'):
    rc.calibration_split(num_images, fraction, seed=0)


# ---------------------------------------------------------------------------------------------
# coverage_trials


@pytest.fixture(scope='module')
def trial_problem():
  rng = np.random.default_rng(21)
  confidences, correct = synthetic_cascade(rng, 3000)
  ts = np.linspace(1.0, 0.3, 40)
  candidates = np.stack([ts, ts], axis=1)
  return rc.exits_for_candidates(confidences, candidates), correct


@pytest.mark.parametrize('method', rc.METHODS)
def test_coverage_trials_reproduce_each_trial(trial_problem, method):
  exit_taken, correct = trial_problem
  cumulative, plain = [2.0, 3.0, 4.5], 4.0
  result = rc.coverage_trials(exit_taken, correct, cumulative, plain, target=0.03, delta=0.1,
                              method=method, fraction=0.4, trials=12, seed=3)
  assert result['trials'] == 12 and result['method'] == method
  assert result['drops'].shape == (12,) and result['exit_shares'].shape == (12, 3)
  for r in range(12):
    calibration, evaluation = rc.calibration_split(3000, 0.4, int(result['seeds'][r]))
    losses = rc.cascade_losses(exit_taken[:, calibration], correct[:, calibration])
    index = rc.select(method, losses, 0.03, 0.1).index
    assert result['indices'][r] == index
    exits = exit_taken[index, evaluation] if index >= 0 else np.full(evaluation.size, 2)
    loop_drop = sum(int(correct[2, i]) - int(correct[e, i])
                    for i, e in zip(evaluation, exits, strict=True)) / evaluation.size
    assert result['drops'][r] == pytest.approx(loop_drop)
    shares = np.bincount(exits, minlength=3) / evaluation.size
    np.testing.assert_allclose(result['exit_shares'][r], shares)
    mean_macs = sum(cumulative[e] for e in exits) / evaluation.size
    assert result['mac_reductions'][r] == pytest.approx(1 - mean_macs / plain)
  assert result['share_within'] == pytest.approx(np.mean(result['drops'] <= 0.03))
  assert result['mean_drop'] == pytest.approx(result['drops'].mean())
  assert result['mean_mac_reduction'] == pytest.approx(result['mac_reductions'].mean())
  assert result['never_exit_share'] == pytest.approx(np.mean(result['indices'] == -1))
  np.testing.assert_allclose(result['mean_exit_shares'], result['exit_shares'].mean(axis=0))
  again = rc.coverage_trials(exit_taken, correct, cumulative, plain, 0.03, 0.1, method, 0.4, 12,
                             seed=3)
  np.testing.assert_array_equal(again['drops'], result['drops'])


def test_coverage_trials_aggressiveness_and_never_exit(trial_problem):
  exit_taken, correct = trial_problem
  common = {'cumulative_macs': [2.0, 3.0, 4.5], 'plain_macs': 4.0, 'fraction': 0.5,
            'trials': 10, 'seed': 0}
  ltt = rc.coverage_trials(exit_taken, correct, target=0.05, delta=0.1, method='ltt', **common)
  naive = rc.coverage_trials(exit_taken, correct, target=0.05, delta=None, method='empirical',
                             **common)
  assert naive['mean_mac_reduction'] > ltt['mean_mac_reduction'] > 0
  assert np.all(naive['indices'] >= ltt['indices'])
  never = rc.coverage_trials(exit_taken, correct, target=1e-4, delta=0.1, method='ltt', **common)
  assert never['never_exit_share'] == 1.0 and never['mean_drop'] == 0.0
  assert never['share_within'] == 1.0
  np.testing.assert_allclose(never['mean_exit_shares'], [0.0, 0.0, 1.0])
  assert never['mean_mac_reduction'] == pytest.approx(1 - 4.5 / 4.0)
  no_costs = rc.coverage_trials(exit_taken, correct, None, None, 0.05, 0.1, 'crc', 0.5, 3, 0)
  assert no_costs['mean_mac_reduction'] is None and no_costs['mac_reductions'] is None
  with pytest.raises(ValueError, match='method'):
    rc.coverage_trials(exit_taken, correct, None, None, 0.05, 0.1, 'naive', 0.5, 3, 0)
  with pytest.raises(ValueError, match='plain_macs'):
    rc.coverage_trials(exit_taken, correct, [1, 2, 3], None, 0.05, 0.1, 'crc', 0.5, 3, 0)
  with pytest.raises(ValueError, match='delta'):
    rc.coverage_trials(exit_taken, correct, None, None, 0.05, None, 'ltt', 0.5, 3, 0)
  with pytest.raises(ValueError, match='--calibration_fraction'):
    rc.coverage_trials(exit_taken, correct, None, None, 0.05, 0.1, 'crc', 1.0, 3, 0)


# ---------------------------------------------------------------------------------------------
# Coverage against the true risk of a known population


def test_guarantees_hold_against_the_true_drop():
  """200 calibration draws of 2000 images, i.i.d. from a fixed population of 50,000.

  Drawing with replacement makes the population the exact distribution, so each candidate's true
  drop is its population mean. The population is nested (see synthetic_cascade), so CRC's
  monotonicity assumption holds exactly and max(L, 0) = L: LTT is tested where it is tight.
  """
  rng = np.random.default_rng(2024)
  confidences, correct = synthetic_cascade(rng, 50_000, nested=True)
  ts = np.linspace(1.0, 0.3, 141)
  losses = rc.cascade_losses(rc.exits_for_candidates(confidences, np.stack([ts, ts], 1)), correct)
  assert losses.min() == 0 and rc.monotonicity_violations(losses).count == 0
  true_drop = np.append(losses.mean(axis=1), 0.0)                  # index -1: never exit
  target, delta, draws = 0.03, 0.1, 200
  assert true_drop[0] < target < true_drop[-2]                     # the target is reachable
  chosen = {method: np.empty(draws, np.int64) for method in rc.METHODS}
  for r in range(draws):
    sample = losses[:, rng.integers(0, losses.shape[1], size=2000)]
    for method in rc.METHODS:
      chosen[method][r] = rc.select(method, sample, target, delta).index
  drops = {method: true_drop[index] for method, index in chosen.items()}
  failures = {method: float(np.mean(d > target)) for method, d in drops.items()}
  assert failures['ltt'] <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
  crc = drops['crc']
  assert crc.mean() <= target + 3 * crc.std() / math.sqrt(draws)
  assert failures['empirical'] > 0.2
  assert failures['empirical'] > failures['ltt'] + 0.15
  # Power: the guarantees cost aggressiveness, in this order.
  assert np.all(chosen['ltt'] <= chosen['empirical'])
  assert np.median(chosen['ltt']) < np.median(chosen['crc']) <= np.median(chosen['empirical'])
  assert np.mean(chosen['ltt'] == -1) < 0.05                       # but LTT still exits early
