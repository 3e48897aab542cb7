"""Tests of the risk-controlled thresholds of analyze_imagenet_labels.py (issue #13), end to end.

risk_control_test.py tests the statistics (p-values, selection rules, splits); this file tests
what the analysis builds from them, through ``run_analysis`` and the command line on synthetic
dump folders: the calibration split, the thresholds against a brute force over every threshold
pair, coverage over independent calibration draws, thresholds.json and its lookups, the figure,
and the refusals.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_ROOT, os.path.join(_ROOT, 'tests')):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import synthetic_dumps as sd  # noqa: E402
from risk_control_test import reference_pvalue  # noqa: E402

import analyze_imagenet_labels as ail  # noqa: E402
import cascade_rules as rules  # noqa: E402
import cascade_thresholds  # noqa: E402
import dump_layout  # noqa: E402
import exit_statistics  # noqa: E402
import risk_control  # noqa: E402
import risk_thresholds as rt  # noqa: E402

SCRIPT = os.path.join(_ROOT, 'analyze_imagenet_labels.py')
NUM_CLASSES = 20          # few classes keep the dumps small; the exits still differ in accuracy
STAGE_MACS, PLAIN_MACS = (10, 20, 30), 55


def run_script(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        cwd=_ROOT, timeout=300)


def quick(softmax_dir, output_dir, **kwargs):
  kwargs.setdefault('show_progress', False)
  kwargs.setdefault('out', open(os.devnull, 'w'))  # noqa: SIM115
  return ail.run_analysis(str(softmax_dir), str(output_dir), **kwargs)


def stats_of(split):
  """ExitStats of an in-memory split (labels, [probabilities per exit])."""
  labels, probabilities = split
  out = []
  for p in probabilities:
    max_prob, top5_sum, top1, top5 = exit_statistics.row_statistics(p, labels)
    out.append(exit_statistics.ExitStats(max_prob, top5_sum, top1, top5))
  return out


def assert_no_report(tmp_path, output='r'):
  assert not (tmp_path / output).exists()
  assert not [n for n in os.listdir(tmp_path) if '.partial' in n]


# -------------------------------------------------------------------------------------------------
# A run with risk control, shared by the report tests.


@pytest.fixture(scope='module')
def controlled(tmp_path_factory):
  """Dumps (3,000 train, 4,000 validation images) and one command-line run with risk control."""
  root = tmp_path_factory.mktemp('controlled')
  rng = np.random.default_rng(0)
  splits = {'train': sd.synthetic_split(rng, 3000, NUM_CLASSES),
            'validation': sd.synthetic_split(rng, 4000, NUM_CLASSES)}
  sd.write_current_dumps(str(root / 'd'), splits, stage_macs=STAGE_MACS, plain_macs=PLAIN_MACS)
  result = run_script('--softmax_dir', str(root / 'd'), '--output_dir', str(root / 'r'),
                      '--calibration_split', 'validation', '--calibration_fraction', '0.5',
                      '--calibration_seed', '3', '--accuracy_drop', '0.01,0.03',
                      '--coverage_trials', '30')
  assert result.returncode == 0, result.stderr
  report = json.loads((root / 'r' / 'thresholds.json').read_text())
  return root, splits, report, result.stdout


def test_the_report_names_its_images_and_draws_the_comparison(controlled):
  root, _, report, stdout = controlled
  assert report['format_version'] == 2
  assert (report['calibration_split'], report['evaluation_split']) == ('validation', 'validation')
  assert (report['calibration_fraction'], report['calibration_seed']) == (0.5, 3)
  assert (report['calibration_images'], report['evaluation_images']) == (2000, 2000)
  calibration = ('2,000 random validation images (of 4,000; --calibration_fraction 0.5, '
                 '--calibration_seed 3)')
  assert report['measured_on'] == {'calibration': calibration,
                                   'evaluation': 'the other 2,000 validation images'}
  assert (f'Cascade, top1 confidence: evaluated on the other 2,000 validation images, thresholds '
          f'from {calibration}') in stdout
  assert 'Accuracy drop against compute, top1: measured on the other 2,000 validation' in stdout
  assert 'risk-controlled candidates from the train split (3,000 images)' in stdout
  assert 'Coverage, top5: 30 random splits of the validation images' in stdout
  assert 'epsilon = D, train (article)' in stdout
  for mode in ('top1', 'top5'):
    with open(root / 'r' / f'drop_vs_gmacs_{mode}.png', 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(root / 'r' / 'cascade.csv') as f:
    rows = f.read().splitlines()
  assert sum(row.startswith('top1,risk_controlled_ltt,') for row in rows) == 2


def test_risk_controlled_entries_have_the_documented_fields(controlled):
  _, _, report, _ = controlled
  entries = report['risk_controlled']
  assert [(e['mode'], e['accuracy_drop']) for e in entries] == [
      ('top1', 0.01), ('top1', 0.03), ('top5', 0.01), ('top5', 0.03)]
  for e in entries:
    assert (e['delta'], e['method'], e['calibration_images']) == (0.1, 'ltt', 2000)
    assert (e['candidates_from'], e['candidate_images']) == ('train', 3000)
    assert 0 <= e['candidate_index'] < e['num_candidates']     # none fell back to never exit
    assert len(e['thresholds']) == 2
    evaluation = e['evaluation']
    assert set(evaluation) == {'images', 'accuracy', 'drop', 'mean_macs', 'speedup',
                               'mac_reduction', 'exit_shares'}
    assert evaluation['images'] == 2000 and sum(evaluation['exit_shares']) == pytest.approx(1)
    assert evaluation['mac_reduction'] > 0.05                  # it does exit early
    assert set(e['baselines']) == {'epsilon_rule', 'epsilon_rule_train', 'empirical_rule'}
    coverage = e['coverage']
    assert (coverage['trials'], coverage['calibration_fraction'], coverage['seed']) == (30, 0.5, 3)
    assert len(coverage['drops']) == len(coverage['trial_seeds']) == 30
    assert coverage['share_within'] == pytest.approx(
        np.mean(np.array(coverage['drops']) <= e['accuracy_drop']))
    assert coverage['required_share_within'] == pytest.approx(0.9)
    # 1 - delta, less three binomial standard deviations of 30 trials
    assert coverage['share_within'] >= 0.9 - 3 * math.sqrt(0.09 / 30)
    assert coverage['mean_mac_reduction'] > 0.05
    assert set(coverage['baselines']) == {'epsilon_rule', 'epsilon_rule_train',
                                          'empirical_rule'}
  # A larger allowed drop never leaves later.
  for mode in ('top1', 'top5'):
    low, high = [e for e in entries if e['mode'] == mode]
    assert high['candidate_index'] >= low['candidate_index']


def test_thresholds_file_serves_exactly_the_risk_controlled_thresholds(controlled):
  root, _, report, _ = controlled
  table = cascade_thresholds.read(str(root / 'r' / 'thresholds.json'), num_classes=NUM_CLASSES,
                                  num_exits=3)
  for e in report['risk_controlled']:
    # As typed on a command line: within the tolerance of the stored value.
    got = table.thresholds_for(e['mode'], accuracy_drop=e['accuracy_drop'] + 1e-9)
    assert got == e['thresholds']
    assert table.risk_controlled(e['mode'], e['accuracy_drop']) == e
  assert table.thresholds_for('top1', epsilon=0.05) == next(
      x['thresholds'] for x in report['top1'] if x['epsilon'] == 0.05)
  with pytest.raises(cascade_thresholds.MissingEntryError, match=r'available: 0\.01, 0\.03'):
    table.thresholds_for('top1', accuracy_drop=0.02)


def test_thresholds_reproduce_the_report_from_raw_probabilities(controlled):
  """Calibration and evaluation images are the seeded split; each figure is measured on its own."""
  _, splits, report, _ = controlled
  labels, probabilities = splits['validation']
  calibration, evaluation = risk_control.calibration_split(4000, 0.5, 3)
  assert np.intersect1d(calibration, evaluation).size == 0
  for mode in ('top1', 'top5'):
    conf = np.stack([ail.confidence(p, mode) for p in probabilities])          # [3, N]
    rank = np.stack([(p > p[np.arange(labels.size), labels][:, None]).sum(axis=1)
                     for p in probabilities])
    correct = rank < (1 if mode == 'top1' else 5)                              # [3, N]
    # The article's thresholds come from the calibration images only ...
    for entry in report[mode][::5]:
      for k in range(2):
        expected = rules.find_thresholds(conf[k, calibration], correct[k, calibration],
                                       [entry['epsilon']])[0]
        assert entry['thresholds'][k] == expected
    # ... and every cascade figure from the evaluation images only.
    for e in [x for x in report['risk_controlled'] if x['mode'] == mode]:
      exits = rules.cascade_exit_index(conf[:, evaluation], e['thresholds'])
      right = correct[exits, evaluation]
      assert e['evaluation']['accuracy'] == pytest.approx(right.mean(), abs=1e-12)
      assert e['evaluation']['drop'] == pytest.approx(correct[2, evaluation].mean()
                                                      - right.mean(), abs=1e-12)
      assert e['evaluation']['exit_shares'] == pytest.approx(
          (np.bincount(exits, minlength=3) / evaluation.size).tolist(), abs=1e-12)
  assert report['evaluation_exit_accuracy'][2]['top1'] == pytest.approx(
      (probabilities[2][evaluation].argmax(axis=1) == labels[evaluation]).mean())


def test_a_coverage_trial_is_one_run_on_its_split(controlled):
  """Trial r is a whole calibration on the split of trial_seeds[r], redone here by hand."""
  _, splits, report, _ = controlled
  train, validation = stats_of(splits['train']), stats_of(splits['validation'])
  entry = report['risk_controlled'][1]                                       # top1, D = 0.03
  candidates, _ = rt.candidate_thresholds(train, 'top1')     # from train: the same every trial
  conf = np.stack([s.max_prob for s in validation])           # [3, 4000]
  correct = np.stack([s.top1_correct for s in validation])
  for r in (0, 17):
    seed = entry['coverage']['trial_seeds'][r]
    calibration, evaluation = risk_control.calibration_split(4000, 0.5, seed)
    exits = risk_control.exits_for_candidates(conf[:, calibration], candidates)
    losses = risk_control.cascade_losses(exits, correct[:, calibration])
    j = risk_control.ltt_select(losses, 0.03, 0.1).index
    assert j >= 0
    chosen = rules.cascade_exit_index(conf[:, evaluation], candidates[j])
    drop = (np.count_nonzero(correct[2, evaluation])
            - np.count_nonzero(correct[chosen, evaluation])) / evaluation.size
    assert entry['coverage']['drops'][r] == pytest.approx(drop, abs=1e-12)


# -------------------------------------------------------------------------------------------------
# Against a brute force over every threshold pair.

LEVELS = np.float32([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


def few_level_split(rng, n, num_classes=4, skills=(0.0, 0.8, 1.6)):
  """A 3-exit split whose top-1 confidences take only the 7 LEVELS (many ties, few pairs).

  Harder images (larger z) are less often right and get lower levels, right answers a level
  higher and wrong ones a level lower; the predicted class gets the level, the others share the
  rest, so a level above 1 / num_classes is the row's maximum.
  """
  z = rng.standard_normal(n)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  probabilities = []
  for skill in skills:
    p_right = 1.0 / (1.0 + np.exp(-2.0 * (skill - z)))
    right = rng.random(n) < p_right
    level = np.clip(np.round(p_right * (len(LEVELS) - 1) + 2.0 * (right - 0.5)
                             + rng.normal(0, 0.7, n)), 0, len(LEVELS) - 1).astype(int)
    c = LEVELS[level]
    predicted = np.where(right, labels, (labels + rng.integers(1, num_classes, n)) % num_classes)
    p = np.repeat(((1 - c) / (num_classes - 1))[:, None], num_classes, axis=1)
    p[np.arange(n), predicted] = c
    probabilities.append(p.astype(np.float32))
  return labels, probabilities


def reference_exit(confidences, i, pair):
  for k, t in enumerate(pair):
    if confidences[k][i] >= np.float32(t):
      return k
  return 2


def reference_candidates(train_conf, train_correct):
  """The article's rule per exit for each CANDIDATE_EPSILON, by enumeration; repeats dropped."""
  vectors, epsilons = [], []
  for eps in rt.CANDIDATE_EPSILONS:
    vector = []
    for conf, correct in zip(train_conf[:2], train_correct[:2], strict=True):
      values = sorted(set(conf.tolist()))
      alpha = [correct[conf >= v].mean() for v in values]
      chosen = cascade_thresholds.NEVER_EXIT_THRESHOLD
      for v, a in zip(values, alpha, strict=True):
        if a >= max(alpha) - eps and a > 0:
          chosen = v
          break
      vector.append(chosen)
    if tuple(vector) not in {tuple(v) for v in vectors}:
      vectors.append(vector)
      epsilons.append(eps)
  return vectors, epsilons


def test_chosen_thresholds_match_a_brute_force_over_every_pair(tmp_path):
  rng = np.random.default_rng(5)
  splits = {'train': few_level_split(rng, 400), 'validation': few_level_split(rng, 1600)}
  sd.write_current_dumps(str(tmp_path / 'd'), splits, stage_macs=STAGE_MACS,
                         plain_macs=PLAIN_MACS)
  drops, delta = [0.02, 0.05, 0.1], 0.2
  report = quick(tmp_path / 'd', tmp_path / 'r', modes=('top1',), calibration_split='validation',
                 calibration_fraction=0.5, calibration_seed=1, accuracy_drops=drops, delta=delta)
  labels, probabilities = splits['validation']
  conf = [p.max(axis=1) for p in probabilities]
  correct = [p[np.arange(labels.size), labels] >= p.max(axis=1) for p in probabilities]
  calibration, evaluation = risk_control.calibration_split(labels.size, 0.5, 1)

  # Every pair of levels (and "never"), each image's loss and each cascade figure by loops.
  grid = sorted(set(LEVELS.tolist())) + [cascade_thresholds.NEVER_EXIT_THRESHOLD]
  cumulative = np.cumsum(STAGE_MACS)
  table = {}
  for pair in [(a, b) for a in grid for b in grid]:
    losses = [int(correct[2][i]) - int(correct[reference_exit(conf, i, pair)][i])
              for i in calibration]
    exits = [reference_exit(conf, i, pair) for i in evaluation]
    table[pair] = {
        'risk': sum(max(v, 0) for v in losses) / len(losses),
        'drop': sum(int(correct[2][i]) - int(correct[e][i])
                    for i, e in zip(evaluation, exits, strict=True)) / len(exits),
        'reduction': 1 - sum(cumulative[e] for e in exits) / len(exits) / PLAIN_MACS,
        'shares': [exits.count(k) / len(exits) for k in range(3)]}

  train_labels, train_p = splits['train']
  train_conf = [p.max(axis=1) for p in train_p]
  train_correct = [p[np.arange(train_labels.size), train_labels] >= p.max(axis=1)
                   for p in train_p]
  candidates, epsilons = reference_candidates(train_conf, train_correct)
  assert all(tuple(c) in table for c in candidates)     # the candidates are among the pairs
  picks = []
  for target, entry in zip(drops, report['risk_controlled'], strict=True):
    index = -1                                            # fixed-sequence test, spelled out
    for j, c in enumerate(candidates):
      if reference_pvalue(table[tuple(c)]['risk'], calibration.size, target)[0] > delta:
        break
      index = j
    picks.append(index)
    assert entry['num_candidates'] == len(candidates)
    assert entry['candidate_index'] == index
    pair = tuple(candidates[index]) if index >= 0 else (2.0, 2.0)
    assert tuple(entry['thresholds']) == pair
    assert entry['candidate_epsilon'] == (epsilons[index] if index >= 0 else None)
    assert entry['calibration']['bounded_risk'] == pytest.approx(table[pair]['risk'])
    assert entry['evaluation']['drop'] == pytest.approx(table[pair]['drop'], abs=1e-12)
    assert entry['evaluation']['mac_reduction'] == pytest.approx(table[pair]['reduction'])
    assert entry['evaluation']['exit_shares'] == pytest.approx(table[pair]['shares'])
    # No pair that keeps the promise on the evaluation images saves more than the best of all.
    best = max(v['reduction'] for v in table.values() if v['drop'] <= target)
    assert entry['evaluation']['mac_reduction'] <= best + 1e-12
  # Interior picks, a different one per D: a wrong walk or p-value would show.
  assert all(0 <= p < len(candidates) - 1 for p in picks) and picks == sorted(set(picks))


# -------------------------------------------------------------------------------------------------
# Coverage: independent calibration draws from a known distribution.


def test_the_promises_hold_over_200_independent_calibration_draws():
  """LTT: P(drop on new images > D) <= delta; CRC: E[drop] <= D; on 60,000 fresh images.

  Every draw is 1,000 new images of the synthetic dumps' generative model; the candidates come
  from one training sample of the same model, as in the analysis. The exits are nested (an early
  exit never fixes the last one's mistake), so max(L, 0) = L and the bounds are tight: LTT's
  drops come close to D. The naive rule on the same draws must fail often, or the test could
  not tell a broken guarantee from a working one.
  """
  rng = np.random.default_rng(13)
  train = stats_of(sd.synthetic_split(rng, 3000, 10, nested=True))
  fresh = stats_of(sd.synthetic_split(rng, 60_000, 10, nested=True))
  assert not (fresh[0].top1_correct & ~fresh[2].top1_correct).any()
  target, delta, draws = 0.02, 0.1, 200
  drops = {'ltt': [], 'crc': [], 'naive': []}
  reductions = []
  for _ in range(draws):
    calibration = stats_of(sd.synthetic_split(rng, 1000, 10, nested=True))
    images = rt.risk_images(calibration, fresh, train)
    [ltt] = rt.control_risk(images, 'top1', [target], delta, 'ltt', STAGE_MACS, PLAIN_MACS)
    [crc] = rt.control_risk(images, 'top1', [target], delta, 'crc', STAGE_MACS, PLAIN_MACS)
    drops['ltt'].append(ltt['evaluation']['drop'])
    drops['crc'].append(crc['evaluation']['drop'])
    drops['naive'].append(ltt['baselines']['empirical_rule']['evaluation']['drop'])
    reductions.append(ltt['evaluation']['mac_reduction'])
    assert crc['monotonicity_violations']['count'] == 0      # nested: CRC's assumption holds
  failures = {rule: float(np.mean(np.array(d) > target)) for rule, d in drops.items()}
  assert failures['ltt'] <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
  assert np.mean(drops['ltt']) > 0.3 * target                 # close enough to D to fail
  crc_drops = np.array(drops['crc'])
  assert crc_drops.mean() <= target + 3 * crc_drops.std() / math.sqrt(draws)
  assert failures['naive'] > 0.25 and failures['naive'] > failures['ltt'] + 0.2
  assert np.mean(reductions) > 0.1                            # and LTT still saves compute


# -------------------------------------------------------------------------------------------------
# Other calibration set-ups.


@pytest.fixture
def small(tmp_path):
  rng = np.random.default_rng(9)
  splits = {'train': sd.synthetic_split(rng, 300, NUM_CLASSES),
            'validation': sd.synthetic_split(rng, 400, NUM_CLASSES)}
  sd.write_current_dumps(str(tmp_path / 'd'), splits)
  return tmp_path / 'd'


def test_default_run_is_the_article_without_risk_control(small, tmp_path):
  report = quick(small, tmp_path / 'r', epsilons=[0.0, 0.05])
  assert 'risk_controlled' not in report and report['calibration_fraction'] is None
  assert report['measured_on'] == {'calibration': 'train (300 images)',
                                   'evaluation': 'validation (400 images)'}
  assert not [n for n in os.listdir(tmp_path / 'r') if n.startswith('drop_vs_gmacs')]


def test_without_train_dumps_candidates_come_from_a_part_of_the_calibration_images(tmp_path):
  rng = np.random.default_rng(4)
  sd.write_current_dumps(str(tmp_path / 'd'),
                         {'validation': sd.synthetic_split(rng, 800, NUM_CLASSES)})
  report = quick(tmp_path / 'd', tmp_path / 'r', epsilons=[0.0], calibration_split='validation',
                 calibration_fraction=0.5, coverage_trials=3, accuracy_drops=[0.05])
  for entry in report['risk_controlled']:
    assert entry['candidates_from'] == 'calibration_part'
    # a quarter of the 400 calibration images set the candidates, the other 300 test them
    assert (entry['candidate_images'], entry['calibration_images']) == (100, 300)
    assert 'epsilon_rule_train' not in entry['baselines']
    assert entry['coverage']['trials'] == 3


def test_train_calibration_only_when_allowed(small, tmp_path):
  with pytest.raises(ail.DumpError, match=r'--accuracy_drop with --calibration_split train: the '
                                          r'network was fitted on its training images.*'
                                          r'--calibration_split validation --calibration_fraction '
                                          r'0\.5 \(or pass --allow_train_calibration'):
    quick(small, tmp_path / 'r', accuracy_drops=[0.01])
  assert_no_report(tmp_path)
  report = quick(small, tmp_path / 'r', epsilons=[0.0], accuracy_drops=[0.05],
                 allow_train_calibration=True)
  entry = report['risk_controlled'][0]
  # train calibrates, so it cannot also make the candidates: a quarter of it does
  assert entry['candidates_from'] == 'calibration_part'
  assert entry['candidate_images'] + entry['calibration_images'] == 300
  assert entry['evaluation']['images'] == 400


def test_crc_reports_monotonicity_and_needs_no_delta(small, tmp_path):
  report = quick(small, tmp_path / 'r', epsilons=[0.0], calibration_split='validation',
                 calibration_fraction=0.5, accuracy_drops=[0.1], risk_control_method='crc')
  entry = report['risk_controlled'][0]
  assert entry['method'] == 'crc' and entry['delta'] is None
  assert set(entry['monotonicity_violations']) == {'count', 'max_decrease'}


@pytest.mark.parametrize('kwargs, message', [
    ({'calibration_split': 'validation', 'accuracy_drops': [0.01]},
     r'disjoint from the evaluation images, but both would be all the validation images: add '
     r'--calibration_fraction 0\.5'),
    ({'calibration_fraction': 0.5}, r'but --calibration_split is train: add --calibration_split '
                                    r'validation'),
    ({'calibration_split': 'validation', 'coverage_trials': 5},
     r'--coverage_trials repeats the random calibration/evaluation split'),
    ({'calibration_split': 'validation', 'calibration_fraction': 1e-4},
     r'--calibration_fraction 0\.0001 of 400 images leaves 0 for calibration'),
] + [({'calibration_split': 'validation', 'calibration_fraction': f},
      r'--calibration_fraction must be in \(0, 1\)') for f in (0.0, 1.0, 1.5, -0.5, math.nan)]
  + [({'calibration_split': 'validation', 'calibration_fraction': 0.5, 'accuracy_drops': d},
      r'--accuracy_drop') for d in ([0.0], [1.0], [-0.01], [1.5], [math.nan], [])]
  + [({'calibration_split': 'validation', 'calibration_fraction': 0.5, 'delta': d},
      r'--delta must be in \(0, 1\)') for d in (0.0, 1.0, -0.1, 2.0)])
def test_refused_requests_name_the_flag_and_leave_no_report(small, tmp_path, kwargs, message):
  with pytest.raises(ail.DumpError, match=message):
    quick(small, tmp_path / 'r', **kwargs)
  assert_no_report(tmp_path)


def test_command_line_refusals_are_one_line(small, tmp_path):
  for args, start in (
      (['--accuracy_drop', '0.01'], 'error: --accuracy_drop with --calibration_split train'),
      (['--delta', '0.2'], 'error: --accuracy_drop with --calibration_split train'),
      (['--calibration_split', 'validation', '--calibration_fraction', '0.5', '--accuracy_drop',
        '0.01,2'], 'error: --accuracy_drop values must be fractions in (0, 1), got [2.0]'),
      (['--calibration_split', 'validation', '--calibration_fraction', '2'],
       'error: --calibration_fraction must be in (0, 1), got 2.0')):
    result = run_script('--softmax_dir', str(small), '--output_dir', str(tmp_path / 'r'), *args)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith('error')]
    assert len(lines) == 1 and lines[0].startswith(start), result.stderr
  assert_no_report(tmp_path)
  assert dump_layout.SPLITS == ('validation', 'train')     # the flags' choices, as documented
