"""Tests of analyze_imagenet_labels.py: thresholds, cascade, report, layouts, errors, end to end."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_ROOT, os.path.join(_ROOT, 'tests')):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import synthetic_dumps as sd  # noqa: E402

import analyze_imagenet_labels as ail  # noqa: E402
import cascade_report  # noqa: E402
import cascade_rules as rules  # noqa: E402
import cascade_thresholds  # noqa: E402
import dump_layout  # noqa: E402
import legacy_dumps  # noqa: E402

SCRIPT = os.path.join(_ROOT, 'analyze_imagenet_labels.py')


def run_script(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        cwd=_ROOT, timeout=300)


def small_splits(seed=0, train=600, validation=400, num_classes=sd.IMAGENET_CLASSES):
  """Article-like arrays: split -> (labels [N], [probabilities [N, C]] * 3)."""
  rng = np.random.default_rng(seed)
  splits = {}
  for split, n in (('train', train), ('validation', validation)):
    labels = sd.synthetic_labels(rng, n, num_classes)
    ease = rng.standard_normal(n).astype(np.float32)
    splits[split] = (labels, [sd.synthetic_probabilities(rng, labels, ease, s, num_classes)
                              for s in sd.ARTICLE_LIKE_STRENGTHS])
  return splits


def quick(softmax_dir, output_dir, **kwargs):
  kwargs.setdefault('show_progress', False)
  kwargs.setdefault('out', open(os.devnull, 'w'))  # noqa: SIM115
  return ail.run_analysis(str(softmax_dir), str(output_dir), **kwargs)


# -------------------------------------------------------------------------------------------------
# Thresholds against a brute-force reference.


def brute_force_thresholds(conf, correct, epsilons):
  """The rule of the module docstring, spelled out in O(N^2)."""
  conf = np.asarray(conf)
  correct = np.asarray(correct, bool)
  candidates = sorted(set(conf.tolist()))
  alpha = [int(np.sum(correct[conf >= d])) / int(np.sum(conf >= d)) for d in candidates]
  best = max(alpha)
  out = []
  for eps in epsilons:
    chosen = cascade_thresholds.NEVER_EXIT_THRESHOLD
    for d, a in zip(candidates, alpha, strict=True):
      if a >= best - eps and a > 0:
        chosen = d
        break
    out.append(chosen)
  return out


EPSILONS = [0.0, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.999, 1.0]


@pytest.mark.parametrize('seed', range(6))
def test_thresholds_match_brute_force_on_random_dumps(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 400))
  levels = int(rng.integers(2, 50))     # few levels: many ties
  conf = (rng.integers(0, levels, n) / levels).astype(np.float32)
  correct = rng.random(n) < conf * 0.9 + 0.05
  got = rules.find_thresholds(conf, correct, EPSILONS)
  assert got.tolist() == brute_force_thresholds(conf, correct, EPSILONS)


@pytest.mark.parametrize('case', ['ties', 'all_correct', 'all_wrong', 'one_correct', 'one_wrong',
                                  'non_monotone', 'tie_group_straddles'])
def test_thresholds_match_brute_force_on_adversarial_dumps(case):
  conf, correct = {
      'ties': ([0.5] * 7, [1, 0, 1, 1, 0, 1, 0]),
      'all_correct': ([0.1, 0.3, 0.3, 0.9], [1, 1, 1, 1]),
      'all_wrong': ([0.1, 0.3, 0.3, 0.9], [0, 0, 0, 0]),
      'one_correct': ([0.7], [1]),
      'one_wrong': ([0.7], [0]),
      # alpha goes up and down: the first qualifying value must win, not the last
      'non_monotone': ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1, 0, 1, 1, 0, 1]),
      # a tie group at 0.4 mixes right and wrong answers: it is in or out as a whole
      'tie_group_straddles': ([0.2, 0.4, 0.4, 0.4, 0.9], [0, 1, 0, 1, 1]),
  }[case]
  conf = np.asarray(conf, np.float32)
  correct = np.asarray(correct, bool)
  got = rules.find_thresholds(conf, correct, EPSILONS)
  assert got.tolist() == brute_force_thresholds(conf, correct, EPSILONS)


def test_threshold_special_cases():
  # all wrong: the exit never takes anything, and that is a plain JSON number above 1
  assert rules.find_thresholds(np.float32([0.2, 0.9]), [0, 0], [0.0, 1.0]).tolist() == [2.0, 2.0]
  # all correct: alpha is 1 everywhere, the smallest confidence qualifies
  assert rules.find_thresholds(np.float32([0.2, 0.9]), [1, 1], [0.0]).tolist() == [np.float32(0.2)]
  # the best alpha is reached only above the last wrong answer
  conf = np.float32([0.1, 0.2, 0.3, 0.4])
  assert rules.find_thresholds(conf, [1, 1, 0, 1], [0.0]).tolist() == [np.float32(0.4)]
  # alpha = 3/4, 2/3, 1/2, 1: epsilon 0.25 reaches down to 0.1; with 0.2499 nothing below 0.4
  # qualifies, although 2/3 at 0.2 and 1/2 at 0.3 lie between
  assert rules.find_thresholds(conf, [1, 1, 0, 1], [0.25, 0.2499, 0.34]).tolist() == [
      np.float32(0.1), np.float32(0.4), np.float32(0.1)]
  # alpha = 1/4, 1/3, 0, 0: target 1/3 - 0.05 skips 0.1; a target below 0 takes everything
  assert rules.find_thresholds(conf, [0, 1, 0, 0], [0.05, 0.5]).tolist() == [
      np.float32(0.2), np.float32(0.1)]


def test_thresholds_never_increase_with_epsilon():
  rng = np.random.default_rng(7)
  conf = rng.random(5000).astype(np.float32)
  correct = rng.random(5000) < conf
  got = rules.find_thresholds(conf, correct, np.linspace(0, 1, 101))
  assert np.all(np.diff(got) <= 0)


# -------------------------------------------------------------------------------------------------
# Cascade.


def test_cascade_exit_index_rule():
  conf = np.array([[0.9, 0.5, 0.49, 0.1, 0.5],
                   [0.0, 0.0, 0.7, 0.69, 1.0],
                   [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
  # >= at the threshold itself; the last exit takes the rest even with zero confidence. The
  # comparison is in float32, as in the exported model: 0.7 means float32(0.7) on both sides.
  assert rules.cascade_exit_index(conf, [0.5, 0.7]).tolist() == [0, 0, 1, 2, 0]
  assert rules.cascade_exit_index(conf.astype(np.float64), [0.5, 0.7]).tolist() == [0, 0, 1, 2, 0]
  assert rules.cascade_exit_index(conf, [2.0, 2.0]).tolist() == [2, 2, 2, 2, 2]
  with pytest.raises(ValueError, match='thresholds'):
    rules.cascade_exit_index(conf, [0.5, 0.7, 0.1])


def test_evaluate_cascade_hand_computed():
  # 4 images, 3 exits with stage costs 10, 20, 30 (cumulative 10, 30, 60), plain net 50.
  conf = np.array([[0.9, 0.2, 0.3, 0.8],
                   [0.1, 0.95, 0.4, 0.1],
                   [0.5, 0.5, 0.5, 0.5]])
  correct = np.array([[1, 0, 0, 0],
                      [0, 1, 1, 0],
                      [1, 1, 1, 1]], bool)
  # thresholds 0.8 / 0.9: image 0 -> exit 0 (right), 1 -> exit 1 (right), 2 -> exit 2 (right),
  # 3 -> exit 0 at exactly 0.8 (wrong). Accuracy 3/4; MACs (10 + 30 + 60 + 10) / 4 = 27.5.
  result = rules.evaluate_cascade(conf, correct, [0.8, 0.9], [10, 20, 30], 50)
  assert result['accuracy'] == 0.75
  assert result['mean_macs'] == 27.5
  assert result['speedup'] == pytest.approx(50 / 27.5)
  assert result['mac_reduction'] == pytest.approx(1 - 27.5 / 50)
  assert result['exit_shares'] == [0.5, 0.25, 0.25]


# -------------------------------------------------------------------------------------------------
# Printed block.


def test_exit_accuracy_block_matches_the_original_readme():
  accuracies = {
      'train': [{'exit': 0, 'top1': 0.52081, 'top5': 0.74860},
                {'exit': 1, 'top1': 0.692549, 'top5': 0.88500001}],
      'validation': [{'exit': 0, 'top1': 0.46680, 'top5': 0.7022},
                     {'exit': 1, 'top1': 0.62840, 'top5': 0.8431}],
  }
  assert cascade_report.format_exit_accuracies(accuracies) == (
      'Classifier 0:\n Train top-1:0.5208\n Train top-5:0.7486\n Test top-1:0.4668\n'
      ' Test top-5:0.7022\n'
      'Classifier 1:\n Train top-1:0.6925\n Train top-5:0.885\n Test top-1:0.6284\n'
      ' Test top-5:0.8431')
  only_validation = {'validation': [{'exit': 0, 'top1': 1.0, 'top5': 1.0}]}
  assert cascade_report.format_exit_accuracies(only_validation) == (
      'Classifier 0:\n Test top-1:1.0\n Test top-5:1.0')


# -------------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope='module')
def article_like(tmp_path_factory):
  """Article-shaped synthetic dumps written the way the run loop writes them, and the report."""
  root = tmp_path_factory.mktemp('article_like')
  dumps = root / 'output_softmax'
  sd.write_synthetic_dumps(str(dumps), {'train': 6000, 'validation': 5000}, block_rows=2500)
  result = run_script('--softmax_dir', str(dumps), '--output_dir', str(root / 'report'),
                      '--chunk_rows', '1000')
  assert result.returncode == 0, result.stderr
  return dumps, root / 'report', result.stdout


def test_end_to_end_writes_the_report(article_like):
  _, report_dir, stdout = article_like
  assert sorted(os.listdir(report_dir)) == [
      'accuracy_vs_gmacs_top1.png', 'accuracy_vs_gmacs_top5.png', 'cascade.csv',
      'reliability.png', 'thresholds.json']
  for name in os.listdir(report_dir):
    if name.endswith('.png'):
      with open(report_dir / name, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  lines = stdout.splitlines()
  assert lines[:5][0] == 'Classifier 0:'
  assert [line.split(':')[0] for line in lines[1:5]] == [
      ' Train top-1', ' Train top-5', ' Test top-1', ' Test top-5']
  assert ('Cascade, top1 confidence: evaluated on validation (5,000 images), thresholds from '
          'train (6,000 images)') in stdout
  assert 'Cascade, top5 confidence' in stdout
  with open(report_dir / 'cascade.csv') as f:
    rows = f.read().splitlines()
  report = json.loads((report_dir / 'thresholds.json').read_text())
  assert len(rows) == 1 + len(report['top1']) + len(report['top5']) + 2 * 101


def test_end_to_end_has_the_article_shape(article_like):
  _, report_dir, stdout = article_like
  report = json.loads((report_dir / 'thresholds.json').read_text())
  top1 = [a['top1'] for a in report['exit_accuracy']['validation']]
  assert top1 == pytest.approx([0.47, 0.63, 0.77], abs=0.03)
  assert f'Test top-1:{top1[0]:.4}' in stdout
  assert report['calibration_split'] == 'train'
  assert report['stage_macs'] == list(legacy_dumps.ARTICLE_STAGE_MACS)
  for mode in ('top1', 'top5'):
    entries = report[mode]
    assert [e['epsilon'] for e in entries] == list(ail.DEFAULT_EPSILONS[mode])
    macs = [e['mean_macs'] for e in entries]
    assert all(b <= a for a, b in zip(macs, macs[1:], strict=False))   # savings grow with eps
    for e in entries:
      assert len(e['thresholds']) == 2
      assert sum(e['exit_shares']) == pytest.approx(1.0)
      assert e['speedup'] == pytest.approx(report['plain_macs'] / e['mean_macs'])
    # at epsilon 0 almost every image runs the whole network, at the largest a good share exits
    assert entries[0]['mac_reduction'] < entries[-1]['mac_reduction'] - 0.1
    assert entries[0]['accuracy'] >= report['exit_accuracy']['validation'][-1][mode] - 0.01
  assert report['top1'][-1]['accuracy'] < report['top1'][0]['accuracy']
  glob = report['global_threshold']['top1']
  assert glob[0]['threshold'] == 0.0 and glob[0]['exit_shares'][0] == 1.0


def test_thresholds_reproduce_the_cascade_from_raw_probabilities(article_like):
  """The exporter's view (cascade_thresholds, confidence, cascade_exit_index) == the report."""
  dumps, report_dir, _ = article_like
  labels = np.load(dump_layout.labels_path(str(dumps), 'validation'))
  probs = [np.load(dump_layout.probabilities_path(str(dumps), 'validation', k))
           for k in range(3)]
  report = json.loads((report_dir / 'thresholds.json').read_text())
  for mode, eps in (('top1', 0.05), ('top5', 0.051)):
    thresholds = cascade_thresholds.read(str(report_dir / 'thresholds.json')).thresholds(
        mode, eps + 1e-9)
    conf = np.stack([ail.confidence(p, mode) for p in probs])
    exits = rules.cascade_exit_index(conf, thresholds)
    chosen = np.stack(probs)[exits, np.arange(labels.size)]
    rank = (chosen > chosen[np.arange(labels.size), labels][:, None]).sum(axis=1)
    correct = rank < (1 if mode == 'top1' else 5)
    entry = next(e for e in report[mode] if e['epsilon'] == eps)
    assert correct.mean() == pytest.approx(entry['accuracy'], abs=1e-12)
    shares = np.bincount(exits, minlength=3) / labels.size
    assert shares.tolist() == pytest.approx(entry['exit_shares'], abs=1e-12)


def test_thresholds_file_lookup_errors(article_like):
  _, report_dir, _ = article_like
  path = str(report_dir / 'thresholds.json')
  with pytest.raises(ValueError, match=r'no top1 thresholds for epsilon 0\.033; available: 0, '
                                       r'0\.01, 0\.02'):
    cascade_thresholds.read(path).thresholds('top1', 0.033)
  with pytest.raises(ValueError, match='mode'):
    cascade_thresholds.read(path).thresholds('top2', 0.0)
  assert len(cascade_thresholds.read(path).thresholds('top1', 0.0)) == 2


def test_chunking_and_threads_do_not_change_the_result(tmp_path):
  write = small_splits(seed=4, train=300, validation=257)
  sd.write_current_dumps(str(tmp_path / 'd'), write)
  a = quick(tmp_path / 'd', tmp_path / 'a', chunk_rows=1_000_000, num_threads=1)
  b = quick(tmp_path / 'd', tmp_path / 'b', chunk_rows=7, num_threads=3)
  assert a == b


def test_only_top5_and_custom_epsilons(tmp_path):
  sd.write_current_dumps(str(tmp_path / 'd'), small_splits(train=200, validation=200))
  report = quick(tmp_path / 'd', tmp_path / 'r', modes=('top5',), epsilons=[0.05, 0.0, 0.05])
  assert 'top1' not in report and [e['epsilon'] for e in report['top5']] == [0.0, 0.05]
  assert sorted(os.listdir(tmp_path / 'r')) == [
      'accuracy_vs_gmacs_top5.png', 'cascade.csv', 'reliability.png', 'thresholds.json']
  with pytest.raises(ValueError, match='without --top5'):
    cascade_thresholds.read(str(tmp_path / 'r' / 'thresholds.json')).thresholds('top1', 0.0)


def test_costs_come_from_the_manifest(tmp_path):
  sd.write_current_dumps(str(tmp_path / 'd'), small_splits(train=40, validation=40),
                         stage_macs=(10, 20, 30), plain_macs=55)
  report = quick(tmp_path / 'd', tmp_path / 'r', epsilons=[0.0, 1.0])
  assert report['stage_macs'] == [10, 20, 30] and report['plain_macs'] == 55
  for entry in report['top1']:
    shares = entry['exit_shares']
    assert entry['mean_macs'] == pytest.approx(10 * shares[0] + 30 * shares[1] + 60 * shares[2])
    assert entry['speedup'] == pytest.approx(55 / entry['mean_macs'])
  # epsilon 1 sets exit 0's threshold at the lowest train confidence: most images leave there
  assert report['top1'][-1]['exit_shares'][0] > 0.5


def test_one_split_only_calibrates_on_it(tmp_path, caplog):
  splits = small_splits(train=10, validation=300)
  del splits['train']
  sd.write_current_dumps(str(tmp_path / 'd'), splits)
  report = quick(tmp_path / 'd', tmp_path / 'r', epsilons=[0.0])
  assert report['calibration_split'] == report['evaluation_split'] == 'validation'
  assert 'optimistic' in caplog.text


def test_article_costs_without_manifest_and_flag_override(tmp_path):
  sd.write_current_dumps(str(tmp_path / 'd'), small_splits(train=50, validation=50),
                         manifest=False)
  report = quick(tmp_path / 'd', tmp_path / 'r', epsilons=[0.0])
  assert report['stage_macs'] == list(legacy_dumps.ARTICLE_STAGE_MACS)
  assert report['plain_macs'] == legacy_dumps.ARTICLE_PLAIN_MACS
  result = run_script('--softmax_dir', str(tmp_path / 'd'), '--output_dir', str(tmp_path / 'r2'),
                      '--stage_macs', '1,2,3', '--plain_macs', '5', '--epsilons', '0,0.1')
  assert result.returncode == 0, result.stderr
  report = json.loads((tmp_path / 'r2' / 'thresholds.json').read_text())
  assert report['stage_macs'] == [1, 2, 3] and report['cumulative_macs'] == [1, 3, 6]
  assert [e['epsilon'] for e in report['top1']] == [0.0, 0.1]


# -------------------------------------------------------------------------------------------------
# The original's layout.


def test_original_layout_gives_the_same_report(tmp_path):
  splits = small_splits(seed=5, train=301, validation=200)
  sd.write_current_dumps(str(tmp_path / 'current'), splits, manifest=False)
  sd.write_legacy_dumps(str(tmp_path / 'output_softmax'), str(tmp_path / 'Imagenet_tools'),
                        validation=splits['validation'], train=splits['train'])
  with open(tmp_path / 'output_softmax' / 'clf0_all_probabilities.npy', 'rb') as f:
    assert not f.read(6).startswith(b'\x93NUMPY')     # really pickles, as the original wrote
  # the original's own flag names, single dash
  result = run_script('-softmax_dir_to_validate_against', str(tmp_path / 'output_softmax'),
                      '-dataset_path', str(tmp_path / 'Imagenet_tools'),
                      '--output_dir', str(tmp_path / 'legacy_report'))
  assert result.returncode == 0, result.stderr
  legacy = json.loads((tmp_path / 'legacy_report' / 'thresholds.json').read_text())
  current = quick(tmp_path / 'current', tmp_path / 'current_report')
  assert legacy['source']['layout'] == 'original' and current['source']['layout'] == 'current'
  for key in ('top1', 'top5', 'global_threshold', 'exit_accuracy', 'num_images'):
    assert legacy[key] == current[key]
  assert result.stdout.startswith(cascade_report.format_exit_accuracies(current['exit_accuracy']))


def test_original_layout_without_train_labels_uses_validation(tmp_path, caplog):
  splits = small_splits(seed=6, train=90, validation=120)
  sd.write_legacy_dumps(str(tmp_path / 's'), str(tmp_path / 'l'), validation=splits['validation'],
                        train=splits['train'], labels_in_softmax_dir=True)
  os.remove(tmp_path / 's' / 'train_non_onehot.npy')       # missing from the public original
  report = quick(tmp_path / 's', tmp_path / 'r', epsilons=[0.0])
  assert report['num_images'] == {'validation': 120}
  assert 'train_non_onehot.npy' in caplog.text


def test_original_padding_rows_count_as_correct(tmp_path):
  labels, probs = small_splits(seed=8, train=1, validation=100)['validation']
  labels[-10:] = 0
  for p in probs:
    p[-10:] = 0.0                     # rows the Python-2 converter never wrote
  sd.write_legacy_dumps(str(tmp_path / 's'), str(tmp_path / 'l'), validation=(labels, probs))
  report = quick(tmp_path / 's', tmp_path / 'r', epsilons=[0.0], dataset_path=str(tmp_path / 'l'))
  top1 = [(p[:-10].argmax(axis=1) == labels[:-10]).sum() for p in probs]
  assert [a['top1'] for a in report['exit_accuracy']['validation']] == [
      (t + 10) / 100 for t in top1]


# -------------------------------------------------------------------------------------------------
# Errors: one clear message, nothing left behind.


def assert_no_report(tmp_path, output='r'):
  assert not (tmp_path / output).exists()
  assert not [n for n in os.listdir(tmp_path) if '.partial' in n]


@pytest.fixture
def dumps(tmp_path):
  sd.write_current_dumps(str(tmp_path / 'd'), small_splits(seed=9, train=60, validation=50))
  return tmp_path / 'd'


def test_error_missing_dumps(tmp_path):
  with pytest.raises(ail.DumpError, match='does not exist'):
    quick(tmp_path / 'nothing', tmp_path / 'r')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ail.DumpError, match='no dumps in'):
    quick(tmp_path / 'empty', tmp_path / 'r')
  assert_no_report(tmp_path)


def test_error_missing_exit(dumps, tmp_path):
  os.remove(dump_layout.probabilities_path(str(dumps), 'train', 2))
  with pytest.raises(ail.DumpError, match=r'missing dump .*train/clf2_probabilities\.npy'):
    quick(dumps, tmp_path / 'r')
  os.remove(dump_layout.probabilities_path(str(dumps), 'validation', 1))
  with pytest.raises(ail.DumpError, match=r'clf1 are missing'):
    quick(dumps, tmp_path / 'r')
  assert_no_report(tmp_path)


def test_error_missing_labels_and_partial_file(dumps, tmp_path):
  os.rename(dump_layout.labels_path(str(dumps), 'train'),
            dump_layout.labels_path(str(dumps), 'train') + '.partial')
  with pytest.raises(ail.DumpError, match='still being written'):
    quick(dumps, tmp_path / 'r')
  os.remove(dump_layout.labels_path(str(dumps), 'train') + '.partial')
  with pytest.raises(ail.DumpError, match=r'missing labels .*train/labels\.npy'):
    quick(dumps, tmp_path / 'r')
  assert_no_report(tmp_path)


def test_error_label_files_disagree(dumps, tmp_path):
  labels = np.load(dump_layout.labels_path(str(dumps), 'validation'))
  labels[17] = (labels[17] + 1) % 1001
  (tmp_path / 'tools').mkdir()
  with open(tmp_path / 'tools' / 'validation_non_onehot.npy', 'wb') as f:
    pickle.dump(labels, f)
  with pytest.raises(ail.DumpError, match='label files disagree.*first at row 17'):
    quick(dumps, tmp_path / 'r', dataset_path=str(tmp_path / 'tools'))
  assert_no_report(tmp_path)


def test_error_row_counts_differ(dumps, tmp_path):
  path = dump_layout.probabilities_path(str(dumps), 'validation', 1)
  np.save(path, np.load(path)[:-1])
  with pytest.raises(ail.DumpError, match='49 rows but .* has 50'):
    quick(dumps, tmp_path / 'r')
  assert_no_report(tmp_path)


def test_error_wrong_class_count(dumps, tmp_path):
  path = dump_layout.probabilities_path(str(dumps), 'train', 0)
  np.save(path, np.load(path)[:, :1000])
  with pytest.raises(ail.DumpError, match='has 1000 classes but .*manifest.json has 1001'):
    quick(dumps, tmp_path / 'r')
  assert_no_report(tmp_path)


def test_error_labels_out_of_range(dumps, tmp_path):
  path = dump_layout.labels_path(str(dumps), 'train')
  labels = np.load(path)
  labels[3] = 1001
  np.save(path, labels)
  with pytest.raises(ail.DumpError, match='labels span .*1001 but the probabilities have 1001'):
    quick(dumps, tmp_path / 'r')


def test_error_nan(dumps, tmp_path):
  path = dump_layout.probabilities_path(str(dumps), 'train', 1)
  p = np.load(path)
  p[41, 5] = np.nan
  np.save(path, p)
  with pytest.raises(ail.DumpError, match='NaN probabilities in row 41'):
    quick(dumps, tmp_path / 'r', chunk_rows=16)
  assert_no_report(tmp_path)


@pytest.mark.parametrize('epsilons', [[5.0], [-0.01], [float('nan')], []])
def test_error_epsilons(dumps, tmp_path, epsilons):
  with pytest.raises(ail.DumpError, match='epsilon'):
    quick(dumps, tmp_path / 'r', epsilons=epsilons)
  assert_no_report(tmp_path)


def test_error_output_dir_is_a_file(dumps, tmp_path):
  (tmp_path / 'r').write_text('not a folder')
  with pytest.raises(ail.DumpError, match='is a file'):
    quick(dumps, tmp_path / 'r')
  assert (tmp_path / 'r').read_text() == 'not a folder'


def test_error_from_the_command_line_is_one_line(dumps, tmp_path):
  result = run_script('--softmax_dir', str(dumps), '--output_dir', str(tmp_path / 'r'),
                      '--epsilons', '1,2,5')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      'error: epsilons must be fractions in [0, 1], got [2.0, 5.0]; e.g. --epsilons=0,0.01,0.05 '
      '(0.05 means an accuracy drop of 5%)']
  assert_no_report(tmp_path)


def test_failure_while_writing_leaves_no_partial_report(dumps, tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError('disk full')
  monkeypatch.setattr(cascade_report, 'plot_reliability', broken)
  with pytest.raises(RuntimeError, match='disk full'):
    quick(dumps, tmp_path / 'r')
  assert_no_report(tmp_path)
  # an existing report folder keeps its other files and gets complete new ones
  (tmp_path / 'r').mkdir()
  (tmp_path / 'r' / 'notes.txt').write_text('mine')
  monkeypatch.undo()
  quick(dumps, tmp_path / 'r')
  assert 'notes.txt' in os.listdir(tmp_path / 'r') and 'reliability.png' in os.listdir(
      tmp_path / 'r')


def test_import_does_not_load_tensorflow():
  code = ('import sys; import analyze_imagenet_labels; '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"; '
          'assert "matplotlib" not in sys.modules, "matplotlib imported at import time"')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=_ROOT, timeout=120)
  assert result.returncode == 0, result.stderr


# -------------------------------------------------------------------------------------------------
# Issue #17: rows that are not probabilities, partial files of other jobs, damaged JSON files.


@pytest.mark.parametrize('damage', ['log_probabilities', 'logits', 'inf', 'minus_inf', 'negative',
                                    'scaled', 'above_one', 'zero_row'])
def test_rows_that_are_not_probabilities_are_refused(dumps, tmp_path, damage):
  """Issue #17d: log-probabilities gave a report in which nothing ever exits."""
  path = dump_layout.probabilities_path(str(dumps), 'train', 1)
  p = np.load(path)
  row = p[41].copy()
  if damage == 'log_probabilities':
    p = np.log(p)                         # every row: sums to about -7,000
  elif damage == 'logits':
    p[41] = np.log(row) + 3.0
  elif damage == 'inf':
    p[41, 7] = np.inf
  elif damage == 'minus_inf':
    p[41, 7] = -np.inf
  elif damage == 'negative':              # still sums to 1, still <= 1
    p[41, int(row.argmax())] += 0.25
    p[41, int(row.argmin())] -= 0.25
  elif damage == 'scaled':
    p[41] = row * 1.01
  elif damage == 'above_one':
    p[41] = 0.0
    p[41, 3], p[41, 4] = 1.5, -0.5
  elif damage == 'zero_row':              # only the original's padding may be all zero
    p[41] = 0.0
  np.save(path, p)
  first_bad = 0 if damage == 'log_probabilities' else 41
  with pytest.raises(ail.DumpError,
                     match=rf'{path}: row {first_bad} is not a probability vector .*sum to 1 '
                           r'within 0\.001: dump the softmax'):
    quick(dumps, tmp_path / 'r', chunk_rows=16)
  assert_no_report(tmp_path)


def test_float_rounding_of_probabilities_is_accepted(tmp_path):
  splits = small_splits(seed=11, train=50, validation=50)
  for _, probabilities in splits.values():
    probabilities[0] *= np.float32(1 + 5e-4)           # a float16 dump's worst case
    probabilities[1][::2] *= np.float32(1 - 5e-4)
  sd.write_current_dumps(str(tmp_path / 'd'), splits)
  quick(tmp_path / 'd', tmp_path / 'r', epsilons=[0.0])
  assert (tmp_path / 'r' / 'thresholds.json').exists()


def test_a_split_being_written_is_not_read_when_unused(tmp_path, caplog):
  """Issue #17e: a .partial file was refused even in a split the analysis did not use."""
  splits = small_splits(seed=12, train=40, validation=60)
  del splits['train']
  sd.write_current_dumps(str(tmp_path / 'd'), splits)
  train = tmp_path / 'd' / 'train'
  train.mkdir()
  (train / 'labels.npy.job-7.partial').write_bytes(b'\x93NUMPY')         # another job's dump
  (train / 'clf0_probabilities.npy.job-7.partial').write_bytes(b'\x93NUMPY')
  report = quick(tmp_path / 'd', tmp_path / 'r', epsilons=[0.0], calibration_split='validation')
  assert report['num_images'] == {'validation': 60}
  assert 'Not reading the train split' in caplog.text and 'still being written' in caplog.text
  # Asked for, the split being written is an error that names the file and the way out.
  with pytest.raises(ail.DumpError, match=r'train/clf0_probabilities\.npy is still being '
                     r'written \(clf0_probabilities\.npy\.job-7\.partial, labels\.npy\.job-7\.'
                     r'partial\).*; or pass --calibration_split validation to analyse without it'):
    quick(tmp_path / 'd', tmp_path / 'r2', epsilons=[0.0])


def test_partial_files_of_complete_files_are_ignored(dumps, tmp_path):
  """Other jobs may be re-dumping files the analysis has complete copies of."""
  for split in ('train', 'validation'):
    folder = dumps / split
    (folder / 'labels.npy.1234-abcd.partial').write_bytes(b'')
    (folder / 'clf0_probabilities.npy.1234-abcd.partial').write_bytes(b'')
    (folder / 'clf3_probabilities.npy.job.partial').write_bytes(b'')     # not an exit of these
  report = quick(dumps, tmp_path / 'r', epsilons=[0.0])
  assert report['num_images'] == {'train': 60, 'validation': 50}


def test_damaged_manifest_is_one_error_line(dumps, tmp_path):
  """Issue #17f: a malformed manifest.json gave a JSONDecodeError traceback naming no file."""
  manifest = dump_layout.manifest_path(str(dumps))
  with open(manifest) as f:
    text = f.read()
  with open(manifest, 'w') as f:
    f.write(text[:len(text) // 2])        # cut short, as by a full disk or a kill
  result = run_script('--softmax_dir', str(dumps), '--output_dir', str(tmp_path / 'r'))
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {manifest} is not valid JSON ('), lines
  assert 're-run the dumps into an empty --softmax_dir' in lines[0]
  assert_no_report(tmp_path)


def test_damaged_thresholds_file_names_the_file_and_the_fix(article_like, tmp_path):
  """Issue #17f: a malformed thresholds file gave 'Expecting value: line 2 column 1'."""
  _, report_dir, _ = article_like
  path = tmp_path / 'thresholds.json'
  path.write_text((report_dir / 'thresholds.json').read_text()[:200])
  with pytest.raises(ValueError, match=rf'{path} is not valid JSON \(.*line \d+, column \d+\): it '
                                       r'is damaged or was cut short; re-run '
                                       r'analyze_imagenet_labels\.py'):
    cascade_thresholds.read(str(path)).thresholds('top1', 0.05)
