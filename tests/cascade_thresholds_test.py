"""Tests of cascade_thresholds: writing, checking once on reading, lookups, errors."""

import json
import os
import subprocess
import sys

import pytest

import cascade_thresholds as ct

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(**changes):
  """A small thresholds report as the analysis writes it (3 exits, 10 classes)."""
  report = {
      'format_version': ct.FORMAT_VERSION, 'num_classes': 10, 'num_exits': 3,
      'stage_macs': [10, 20, 30], 'cumulative_macs': [10, 30, 60], 'plain_macs': 55,
      'never_exit_threshold': ct.NEVER_EXIT_THRESHOLD,
      'top1': [{'epsilon': 0.0, 'thresholds': [0.9, 0.95], 'accuracy': 0.8, 'mean_macs': 50.0,
                'speedup': 1.1, 'exit_shares': [0.1, 0.1, 0.8]},
               {'epsilon': 0.05, 'thresholds': [0.7, ct.NEVER_EXIT_THRESHOLD], 'accuracy': 0.77,
                'mean_macs': 40.0, 'speedup': 1.375, 'exit_shares': [0.5, 0.0, 0.5]}],
      'top5': [{'epsilon': 0.01, 'thresholds': [0.99, 0.999]}],
  }
  report.update(changes)
  return report


def _risk_entry(**changes):
  """One "risk_controlled" entry as the analysis writes it (shortened)."""
  entry = {'mode': 'top1', 'accuracy_drop': 0.01, 'delta': 0.1, 'method': 'ltt',
           'thresholds': [0.8, 0.85], 'calibration_images': 500, 'candidates_from': 'train',
           'evaluation': {'images': 500, 'accuracy': 0.79, 'drop': 0.004, 'mean_macs': 45.0,
                          'speedup': 1.22, 'mac_reduction': 0.18, 'exit_shares': [0.3, 0.1, 0.6]}}
  entry.update(changes)
  return entry


def _risk_report():
  return _report(risk_controlled=[
      _risk_entry(),
      _risk_entry(accuracy_drop=0.05, thresholds=[0.6, ct.NEVER_EXIT_THRESHOLD]),
      _risk_entry(mode='top5', accuracy_drop=0.005, method='crc', delta=None,
                  thresholds=[0.97, 0.98])])


@pytest.fixture
def written(tmp_path):
  path = str(tmp_path / ct.FILE_NAME)
  ct.write(_report(), path)
  return path


def test_write_then_read_gives_the_report(written, tmp_path):
  table = ct.read(written, num_classes=10, num_exits=3)
  assert table.report == _report()
  assert (table.num_classes, table.num_exits, table.modes) == (10, 3, ('top1', 'top5'))
  assert os.listdir(tmp_path) == [ct.FILE_NAME]          # the temporary was renamed
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(written).st_mode & 0o777 == 0o666 & ~umask   # as readable as open() makes it
  with open(written) as f:
    assert json.load(f) == _report()                     # plain JSON, readable without us


def test_lookups_match_epsilon_within_the_tolerance(written):
  table = ct.read(written)
  assert table.thresholds('top1', 0.05) == [0.7, 2.0]
  assert table.thresholds('top1', 0.05 + ct.EPSILON_TOLERANCE / 2) == [0.7, 2.0]
  assert table.entry('top1', 0.0)['accuracy'] == 0.8
  assert table.thresholds('top5', 0.01) == [0.99, 0.999]
  assert all(isinstance(t, float) for t in table.thresholds('top1', 0.0))


def test_missing_epsilon_lists_the_available_ones(written):
  table = ct.read(written)
  with pytest.raises(ct.MissingEntryError, match=r'no top1 thresholds for epsilon 0\.333; '
                                                 r'available: 0, 0\.05 \(epsilon is a fraction: '
                                                 r'0\.05 means 5%\)'):
    table.thresholds('top1', 0.333)
  with pytest.raises(ValueError, match='mode must be one of'):
    table.entry('top3', 0.0)


def test_risk_controlled_lookups(tmp_path):
  path = str(tmp_path / ct.FILE_NAME)
  ct.write(_risk_report(), path)
  table = ct.read(path, num_classes=10, num_exits=3)
  assert table.risk_controlled('top1', 0.01)['thresholds'] == [0.8, 0.85]
  assert table.risk_controlled('top1', 0.05 + ct.EPSILON_TOLERANCE / 2)['accuracy_drop'] == 0.05
  assert table.accuracy_drops('top1') == [0.01, 0.05] and table.accuracy_drops('top5') == [0.005]
  assert table.epsilons('top1') == [0.0, 0.05]
  # Exactly one of the two rules; the same numbers either way.
  assert table.thresholds_for('top1', accuracy_drop=0.05) == [0.6, 2.0]
  assert table.thresholds_for('top1', epsilon=0.05) == table.thresholds('top1', 0.05)
  assert table.thresholds_for('top5', accuracy_drop=0.005) == [0.97, 0.98]
  assert all(isinstance(t, float) for t in table.thresholds_for('top1', accuracy_drop=0.01))
  assert table.offline_estimate('top1', accuracy_drop=0.01) == {
      'accuracy': 0.79, 'mean_macs': 45.0, 'speedup': 1.22, 'exit_shares': [0.3, 0.1, 0.6]}
  assert table.offline_estimate('top1', epsilon=0.0)['accuracy'] == 0.8
  for kwargs, given in (({}, 'neither'), ({'epsilon': 0.05, 'accuracy_drop': 0.01}, 'both')):
    with pytest.raises(ValueError, match=rf'give exactly one of epsilon \(--epsilon, the '
                                         rf'article\'s rule\) and accuracy_drop \(--accuracy_drop, '
                                         rf'a guaranteed drop\), got {given}; .* has top1 '
                                         r'epsilons 0, 0\.05 and accuracy drops 0\.01, 0\.05'):
      table.thresholds_for('top1', **kwargs)


def test_missing_risk_controlled_entries_say_what_there_is(tmp_path, written):
  path = str(tmp_path / 'r.json')
  ct.write(_risk_report(), path)
  table = ct.read(path)
  with pytest.raises(ct.MissingEntryError, match=r'no top1 risk-controlled thresholds for accuracy '
                                                 r'drop 0\.02; available: 0\.01, 0\.05 \(a '
                                                 r'fraction: 0\.01 means one percentage point\)'):
    table.thresholds_for('top1', accuracy_drop=0.02)
  with pytest.raises(ct.MissingEntryError, match=r'no top1 thresholds for epsilon 0\.02'):
    table.thresholds_for('top1', epsilon=0.02)
  with pytest.raises(ValueError, match='mode must be one of'):
    table.risk_controlled('top3', 0.01)
  # A file without risk control (or a version-1 file) says how to make the entries.
  with pytest.raises(ct.MissingEntryError,
                     match=r'has no risk-controlled thresholds .*; re-run analyze_imagenet_labels'
                           r'\.py with --calibration_split validation --calibration_fraction 0\.5 '
                           r'--accuracy_drop 0\.01'):
    ct.read(written).thresholds_for('top1', accuracy_drop=0.01)
  report = _risk_report()
  report['risk_controlled'] = [e for e in report['risk_controlled'] if e['mode'] == 'top5']
  ct.write(report, path)
  with pytest.raises(ct.MissingEntryError, match=r"no top1 risk-controlled thresholds \(modes "
                                                 r"present: \['top5'\]\); .* without --top5"):
    ct.read(path).risk_controlled('top1', 0.01)


def test_version_1_files_are_still_read(tmp_path):
  path = str(tmp_path / 'old.json')
  ct.write(_report(format_version=1), path)
  table = ct.read(path, num_classes=10, num_exits=3)
  assert table.thresholds_for('top1', epsilon=0.05) == [0.7, 2.0]
  assert table.accuracy_drops('top1') == []


def test_missing_mode_says_how_to_get_it(tmp_path):
  path = str(tmp_path / 't.json')
  report = _report()
  del report['top1']
  ct.write(report, path)
  with pytest.raises(ct.MissingEntryError, match=r"no top1 thresholds \(modes present: \['top5'\]"
                                                 r"\); re-run the analysis without --top5"):
    ct.read(path).thresholds('top1', 0.0)


def test_a_file_for_another_model_is_refused(tmp_path):
  path = str(tmp_path / 't.json')
  ct.write(_report(num_classes=1001), path)
  with pytest.raises(ct.WrongModelError,
                     match=rf'--cascade_thresholds {path} was made for another model: 1001 '
                           r'classes \(the model has 10\); run analyze_imagenet_labels.py'):
    ct.read(path, num_classes=10, num_exits=3)
  ct.write(_report(num_exits=4), path)
  with pytest.raises(ValueError, match=r'4 exits \(the model has 3\)'):
    ct.read(path, num_classes=10, num_exits=3)
  with pytest.raises(ct.MalformedThresholdsError, match='entry 0 of "top1" needs'):
    ct.read(path)    # 4 exits but 2 thresholds per entry: not a file the analysis wrote


@pytest.mark.parametrize('text, message', [
    ('{"format_version": 1,\n', r'is not valid JSON \(Expecting .* at line 2, column 1\): it is '
                                r'damaged or was cut short; re-run analyze_imagenet_labels\.py'),
    ('', r'is not valid JSON \(Expecting value at line 1, column 1\)'),
    ('[1, 2]', 'holds a JSON list, not the thresholds object'),
    (json.dumps(_report(format_version=7)),
     'has format version 7, this code reads versions 1 and 2'),
    (json.dumps(_report(format_version=True)), 'has format version True'),
    (json.dumps(_report(risk_controlled={'top1': []})), '"risk_controlled" must be a list'),
    (json.dumps(_report(risk_controlled=[_risk_entry(mode='top3')])),
     'entry 0 of "risk_controlled" needs a "mode"'),
    (json.dumps(_report(risk_controlled=[_risk_entry(accuracy_drop=1.5)])),
     r'entry 0 of "risk_controlled" needs .* an "accuracy_drop" in \(0, 1\)'),
    (json.dumps(_report(risk_controlled=[_risk_entry(thresholds=[0.5])])),
     'entry 0 of "risk_controlled" needs .* 2 numeric "thresholds"'),
    (json.dumps(_report(risk_controlled=[_risk_entry(), _risk_entry(thresholds=[0.1, 0.2])])),
     r'"risk_controlled" holds two top1 entries for accuracy drop 0\.01'),
    (json.dumps(_report(num_classes='10')), '"num_classes" must be an integer'),
    (json.dumps({k: v for k, v in _report().items() if k not in ('top1', 'top5')}),
     'holds no thresholds'),
    (json.dumps(_report(top1=[{'epsilon': 0.0, 'thresholds': [0.5, 'x']}])), 'entry 0 of "top1"'),
    (json.dumps(_report(top5=[{'thresholds': [0.5, 0.6]}])), 'entry 0 of "top5" needs a numeric'),
])
def test_a_malformed_file_is_one_clear_error(tmp_path, text, message):
  path = tmp_path / 't.json'
  path.write_text(text)
  with pytest.raises(ct.MalformedThresholdsError, match=rf'{path}:? .*' + message):
    ct.read(str(path))


def test_a_missing_file_names_where_it_comes_from(tmp_path):
  with pytest.raises(FileNotFoundError, match='no thresholds file .*analyze_imagenet_labels.py'):
    ct.read(str(tmp_path / 'nope.json'))


def test_errors_are_value_errors_for_the_command_lines():
  # The mains turn ValueError and FileNotFoundError into one 'error:' line.
  for error in (ct.MalformedThresholdsError, ct.WrongModelError, ct.MissingEntryError):
    assert issubclass(error, ct.ThresholdsError) and issubclass(error, ValueError)


def test_import_needs_neither_numpy_nor_tensorflow():
  code = ('import sys; import cascade_thresholds; '
          'assert not {"numpy", "tensorflow"} & set(sys.modules), sorted(sys.modules)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=_ROOT, timeout=60, check=False)
  assert result.returncode == 0, result.stderr


def test_cascade_predict_names_a_damaged_info_file(tmp_path):
  """Issue #17f for the exported cascade's info file: one 'error:' line naming it."""
  export = tmp_path / 'export'
  export.mkdir()
  (export / 'saved_model.pb').write_bytes(b'')
  (export / 'cascade_info.json').write_text('{"dataset": "cifar10", ')
  (tmp_path / 'a.jpg').write_bytes(b'')
  result = subprocess.run(
      [sys.executable, os.path.join(_ROOT, 'cascade_predict.py'), '--saved_model', str(export),
       str(tmp_path / 'a.jpg')], capture_output=True, text=True, cwd=_ROOT, timeout=300,
      check=False, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {export / "cascade_info.json"} is not valid JSON'), last
  assert 're-export the cascade with --export_cascade_dir' in last
