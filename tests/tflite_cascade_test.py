"""Tests of the TFLite stage models: the export through the command line, the runner against the
offline analysis on the quantised model's own dumps, float32 against TensorFlow, and the errors.

The model is a CIFAR ResNet-8 with random weights whose BN statistics come from one training-mode
pass over real Fashion-MNIST images, so its exits give spread-out confidences (the fully random
checkpoints of ``run_helpers`` saturate every softmax at 1.0). Conversions and the runner run in
fresh processes (``python cifar10_main.py``, ``python cascade_predict.py``): the TFLite converter
needs eager execution, which other test modules switch off in the process they share under
pytest-xdist.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import analyze_imagenet_labels as analysis
import cifar10_main
import dump_layout
import tflite_export
from tests import run_helpers

NUM_TRAIN, NUM_VALIDATION = 120, 100
NUM_CALIBRATION = 60
MODEL_FLAGS = ('-rs', 8, '-rv', 2)
_LINE = re.compile(r'^(test_batch\.bin:\d+): exit (\d), top-5: (\d)', re.M)


def _factory(data_format, dtype):
  return cifar10_main.Cifar10Model(8, 2, data_format, dtype)


def _checkpoint(prefix, data_dir, exits=None):
  """Random weights; BN moving statistics of one training-mode pass (decay 0) over images."""
  images = run_helpers.read_images(data_dir, 'train', NUM_TRAIN)
  model = cifar10_main.Cifar10Model(8, 2, 'channels_last', batch_norm_decay=0.0)
  with tf.Graph().as_default():
    tf.set_random_seed(0)
    inputs = tf.placeholder(tf.float32, [None, 32, 32, 3])
    model(inputs, training=True, exits=exits)
    tf.train.get_or_create_global_step()
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      sess.run(tf.get_collection(tf.GraphKeys.UPDATE_OPS), {inputs: images})
      return tf.train.Saver().save(sess, prefix, global_step=5)


def _python(*args, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=run_helpers.REPO_DIR)
  return subprocess.run([sys.executable, *[str(a) for a in args]], cwd=run_helpers.REPO_DIR,
                        env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _predict(*args):
  """``python cascade_predict.py <args>`` in a fresh process."""
  return _python(os.path.join(run_helpers.REPO_DIR, 'cascade_predict.py'), *args)


def _error_line(result):
  assert result.returncode != 0, result.stdout[-2000:]
  return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return run_helpers.prepare_data(tmp_path_factory, NUM_TRAIN, NUM_VALIDATION)


@pytest.fixture(scope='module')
def export(data_dir, tmp_path_factory):
  """Dumps (TensorFlow) and the three TFLite variants, from one --eval_only command."""
  root = tmp_path_factory.mktemp('tflite')
  checkpoint = _checkpoint(str(root / 'random' / 'model.ckpt'), data_dir)
  model_dir, softmax_dir = root / 'model', root / 'softmax_tf'
  result = run_helpers.run_cifar_subprocess(
      '-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--eval_only', '-pmcp', checkpoint,
      '--classifier_id', 'all', '-bs', 20, '--softmax_dir', softmax_dir, '--nodump_train',
      '--export_tflite_dir', root / 'exports', '--tflite_calibration_images', NUM_CALIBRATION)
  assert result.returncode == 0, result.stderr[-3000:]
  exports = os.listdir(root / 'exports')
  assert len(exports) == 1 and exports[0].isdigit(), exports   # nothing partial left behind
  return {'root': root, 'base': str(root / 'exports'),
          'dir': str(root / 'exports' / exports[0]), 'softmax_tf': str(softmax_dir),
          'checkpoint': tf.train.latest_checkpoint(str(model_dir))}


@pytest.fixture(scope='module')
def other_export(export):
  """A float32-only export of the same network for 64x64 images, made by export_stages."""
  code = ('import cifar10_main, tflite_export; tflite_export.export_stages('
          f'{export["checkpoint"]!r}, lambda f, d: cifar10_main.Cifar10Model(8, 2, f, d), '
          f'(64, 64, 3), {str(export["root"] / "other")!r}, "cifar10", variants=["float32"])')
  result = _python('-c', code)
  assert result.returncode == 0, result.stderr[-3000:]
  return tflite_export.find_export(str(export['root'] / 'other'))


def _dump(export, data_dir, variant, folder):
  result = _predict('--tflite', export['base'], '--variant', variant, '--data_dir', data_dir,
                    '--split', 'validation', '--dump_softmax_dir', folder)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _probabilities(softmax_dir, split='validation'):
  return np.stack([np.load(dump_layout.probabilities_path(softmax_dir, split, k))
                   for k in range(3)])


def test_export_through_the_command_line_records_what_it_holds(export):
  info = tflite_export.read_info(export['dir'])
  assert info['checkpoint'] == export['checkpoint']
  assert sorted(os.listdir(export['dir'])) == sorted(
      ['cascade_info.json', 'float32.tflite', 'dynamic_int8.tflite', 'int8.tflite'])
  for variant, entry in info['variants'].items():
    assert entry['file'] == f'{variant}.tflite'
    assert entry['bytes'] == os.path.getsize(os.path.join(export['dir'], entry['file']))
  # Quantised weights take about a quarter of the float32 file.
  assert info['variants']['int8']['bytes'] < 0.5 * info['variants']['float32']['bytes']
  model = _factory('channels_last', tf.float32)
  assert info['stage_macs'] == model.stage_macs(32, 32)
  assert info['plain_macs'] == model.plain_macs(32, 32)
  assert info['stage_inputs'] == [[1, 32, 32, 3], [1, 32, 32, 16], [1, 16, 16, 32]]
  assert (info['num_classes'], info['num_exits'], info['image_shape']) == (10, 3, [32, 32, 3])
  assert info['calibration']['images'] == NUM_CALIBRATION
  assert info['calibration']['split'] == 'train'
  assert 'first 60 train images' in info['calibration']['order']
  assert info['moving_averages'] is False and info['thresholds'] == {}


def test_float32_stages_give_the_model_s_probabilities(export, data_dir, tmp_path):
  folder = str(tmp_path / 'float32')
  result = _dump(export, data_dir, 'float32', folder)
  assert 'top-1 per exit: exit 0' in result.stdout
  ours, reference = _probabilities(folder), _probabilities(export['softmax_tf'])
  assert ours.shape == reference.shape == (3, NUM_VALIDATION, 10)
  np.testing.assert_allclose(ours, reference, atol=2e-5)
  np.testing.assert_array_equal(np.load(dump_layout.labels_path(folder, 'validation')),
                                np.load(dump_layout.labels_path(export['softmax_tf'],
                                                                'validation')))


def test_runner_takes_the_exits_the_analysis_predicts_on_the_int8_dumps(export, data_dir,
                                                                         tmp_path):
  softmax_dir = str(tmp_path / 'int8')
  _dump(export, data_dir, 'int8', softmax_dir)
  manifest = dump_layout.read_manifest(softmax_dir)
  assert manifest['tflite_variant'] == 'int8'
  assert manifest['checkpoint'] == os.path.join(os.path.abspath(export['dir']), 'int8.tflite')
  assert manifest['stage_macs'] == tflite_export.read_info(export['dir'])['stage_macs']
  report_dir = str(tmp_path / 'report')
  report = analysis.run_analysis(softmax_dir, report_dir, show_progress=False)
  assert report['source']['checkpoint'] == manifest['checkpoint']
  probabilities = _probabilities(softmax_dir)
  confidences = np.stack([analysis.confidence(p, 'top1') for p in probabilities])
  # Thresholds at quantiles of the int8 confidences split the images three ways, so every path
  # through the cascade is compared; the analysis' own 1% entry is compared as it is.
  first = float(np.quantile(confidences[0], 2 / 3))
  second = float(np.quantile(confidences[1][confidences[0] < first], 1 / 2))
  report['top1'].append({'epsilon': 0.5, 'thresholds': [first, second]})
  thresholds_file = os.path.join(report_dir, 'thresholds.json')
  with open(thresholds_file, 'w') as f:
    json.dump(report, f)
  for epsilon in (0.01, 0.5):
    thresholds = [e for e in report['top1'] if e['epsilon'] == epsilon][0]['thresholds']
    expected = analysis.cascade_exit_index(confidences, thresholds)
    result = _predict('--tflite', export['dir'], '--variant', 'int8', '--data_dir', data_dir,
                      '--cascade_thresholds', thresholds_file, '--epsilon', epsilon,
                      '--print_limit', -1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'tuned on the dumps of' not in result.stderr
    lines = _LINE.findall(result.stdout)
    assert [name for name, _, _ in lines] == [f'test_batch.bin:{i}'
                                              for i in range(NUM_VALIDATION)]
    exits = np.array([int(e) for _, e, _ in lines])
    np.testing.assert_array_equal(exits, expected)
    classes = np.array([int(c) for _, _, c in lines])
    np.testing.assert_array_equal(classes, probabilities[exits, np.arange(NUM_VALIDATION)]
                                  .argmax(axis=1))
    if epsilon == 0.5:
      assert set(exits) == {0, 1, 2}
    assert f'{NUM_VALIDATION} images, epsilon {epsilon:g} (top1)' in result.stdout
    assert 'TFLite int8 (ai-edge-litert, 2 threads), batch 1:' in result.stdout


def test_thresholds_of_the_float_model_are_flagged_on_the_int8_model(export, data_dir,
                                                                    tmp_path):
  """Thresholds recorded in the export are used without a file; a file of other dumps warns."""
  softmax_dir = str(tmp_path / 'float_dumps')
  shutil.copytree(export['softmax_tf'], softmax_dir)
  report = analysis.run_analysis(softmax_dir, str(tmp_path / 'report'), show_progress=False)
  copy = str(tmp_path / 'export')
  shutil.copytree(export['dir'], copy)
  tflite_export.record_thresholds(copy, 'int8', {'mode': 'top1', 'epsilon': 0.02,
                                                 'thresholds': [0.3, 0.3], 'source': 'test'})
  result = _predict('--tflite', copy, '--variant', 'int8', '--data_dir', data_dir,
                    '--max_images', 10)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '10 images, epsilon 0.02 (top1, recorded in the export)' in result.stdout
  result = _predict('--tflite', copy, '--variant', 'int8', '--data_dir', data_dir,
                    '--max_images', 10, '--cascade_thresholds',
                    os.path.join(str(tmp_path / 'report'), 'thresholds.json'), '--epsilon',
                    report['top1'][1]['epsilon'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tuned on the dumps of' in result.stderr


def test_a_variant_the_export_lacks_is_one_error_line(other_export, data_dir):
  last = _error_line(_predict('--tflite', other_export, '--variant', 'int8', '--data_dir',
                              data_dir, '--cascade_thresholds', 'unused.json'))
  assert last.startswith(f'error: --variant int8: the export {other_export} has no int8 model '
                         '(it has float32); export it with --tflite_variants int8'), last


def test_a_model_of_another_export_is_one_error_line(export, other_export, data_dir, tmp_path):
  mixed = str(tmp_path / 'mixed')
  shutil.copytree(export['dir'], mixed)
  shutil.copy(os.path.join(other_export, 'float32.tflite'), os.path.join(mixed, 'float32.tflite'))
  last = _error_line(_predict('--tflite', mixed, '--variant', 'float32', '--data_dir', data_dir,
                              '--max_images', 3, '--cascade_thresholds', 'unused.json'))
  assert last.startswith(f'error: {mixed}/float32.tflite is not the model cascade_info.json '
                         'describes'), last
  assert 'comes from another export' in last
  # Same size, other bytes: the digest tells.
  path = pathlib.Path(mixed) / 'int8.tflite'
  content = bytearray(path.read_bytes())
  content[len(content) // 2] ^= 0xFF
  path.write_bytes(bytes(content))
  info = tflite_export.read_info(mixed)
  with pytest.raises(tflite_export.ExportError, match='its sha256 differs'):
    tflite_export.variant_path(mixed, info, 'int8')


def test_images_of_another_size_are_one_error_line(other_export, data_dir, tmp_path):
  softmax_dir = tmp_path / 'dump'
  last = _error_line(_predict('--tflite', other_export, '--variant', 'float32', '--data_dir',
                              data_dir, '--dump_softmax_dir', softmax_dir))
  assert last.startswith(f'error: --data_dir {data_dir} (CIFAR-10 binary format) holds 32x32x3 '
                         f'images, but {os.path.abspath(other_export)}/float32.tflite takes '
                         '64x64x3 images'), last
  assert not softmax_dir.exists()


def test_a_checkpoint_without_heads_and_an_unknown_variant_are_refused(data_dir, tmp_path):
  plain = _checkpoint(str(tmp_path / 'plain' / 'model.ckpt'), data_dir, exits=[2])
  with pytest.raises(tflite_export.ExportError, match=r'has no exit heads \(exit0, exit1 '
                     r'missing.*--fine_tune --classifier_id all'):
    tflite_export.export_stages(plain, _factory, (32, 32, 3), str(tmp_path / 'out'), 'cifar10',
                                variants=['float32'])
  with pytest.raises(tflite_export.ExportError, match="unknown TFLite variant 'int4' in "
                     '--tflite_variants; choose from float32, dynamic_int8, int8'):
    tflite_export.export_stages(plain, _factory, (32, 32, 3), str(tmp_path / 'out'), 'cifar10',
                                variants=['float32', 'int4'])
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    tflite_export.export_stages(str(tmp_path / 'none'), _factory, (32, 32, 3),
                                str(tmp_path / 'out'), 'cifar10', variants=['float32'])
  assert not (tmp_path / 'out').exists()
