"""Tests of the real early-exit model: agreement with the offline simulation, errors, predict."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import analyze_imagenet_labels as analysis
import cascade_export
import cascade_rules as rules
import cascade_thresholds
import cifar10_main
import resnet_layers
import resnet_model
from tests import run_helpers

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def fashion(tmp_path_factory):
  """A briefly trained CIFAR ResNet-8 on Fashion-MNIST with dumps, thresholds and an export."""
  data_dir = run_helpers.prepare_data(tmp_path_factory, train_limit=1500, test_limit=400)
  root = tmp_path_factory.mktemp('cascade')
  model_dir, softmax_dir = str(root / 'model'), str(root / 'softmax')
  # A fast BN decay: with the official 0.997 a 60-step run evaluates with unconverged
  # statistics and its exits can give one constant confidence for every image.
  run_helpers.run_cifar('-dd', data_dir, '-md', model_dir, '-rs', '8', '-rv', '2', '-bs', '50',
                        '-te', '2', '--classifier_id', 'all', '--softmax_dir', softmax_dir,
                        '--num_gpus', '0', '--batch_norm_decay', '0.9')
  report_dir = str(root / 'report')
  analysis.run_analysis(softmax_dir, report_dir)
  thresholds_file = os.path.join(report_dir, 'thresholds.json')
  with open(thresholds_file) as f:
    report = json.load(f)
  # A briefly trained network may send nothing to exit 1 at any epsilon; add an entry whose
  # thresholds (quantiles of the test confidences) split the images three ways, so the check
  # covers every path through the cascade.
  _, confidences, _ = _offline(softmax_dir, 'validation', [2.0, 2.0], 'top1')
  assert all(len(np.unique(c)) > 100 for c in confidences[:2]), 'degenerate exit confidences'
  first = _split_point(confidences[0], 2 / 3)
  second = _split_point(confidences[1][confidences[0] < first], 1 / 2)
  epsilon = 0.5
  report['top1'].append({'epsilon': epsilon, 'thresholds': [first, second]})
  with open(thresholds_file, 'w') as f:
    json.dump(report, f)

  def factory(data_format, dtype):
    return cifar10_main.Cifar10Model(8, 2, data_format, dtype)

  export_dir = cascade_export.export_cascade(
      tf.train.latest_checkpoint(model_dir), factory, (32, 32, 3), thresholds_file, epsilon,
      'top1', str(root / 'export'), 'cifar10')
  return {'data_dir': data_dir, 'softmax_dir': softmax_dir, 'thresholds': thresholds_file,
          'epsilon': epsilon, 'export_dir': export_dir, 'factory': factory,
          'model_dir': model_dir, 'root': root}


def _split_point(values, fraction):
  """A threshold near the ``fraction`` quantile, midway across the widest nearby gap."""
  ordered = np.unique(values)
  middle = int(fraction * (len(ordered) - 1))
  low, high = max(middle - 20, 0), min(middle + 20, len(ordered) - 1)
  gaps = np.diff(ordered[low:high + 1])
  i = low + int(np.argmax(gaps))
  return float((ordered[i] + ordered[i + 1]) / 2)


def _run_saved_model(export_dir, images, signature='serving_default'):
  """Runs a signature of the SavedModel in a fresh graph; returns its outputs as numpy."""
  with tf.Graph().as_default(), tf.Session() as sess:
    meta = tf.saved_model.loader.load(sess, ['serve'], export_dir)
    sig = meta.signature_def[signature]
    feed = {sig.inputs['images'].name: images}
    names = sorted(sig.outputs)
    values = sess.run([sig.outputs[n].name for n in names], feed)
  return dict(zip(names, values, strict=True))


def _offline(softmax_dir, split, thresholds, mode):
  probabilities = [np.load(os.path.join(softmax_dir, split, 'clf{}_probabilities.npy'.format(k)))
                   for k in range(3)]
  confidences = np.stack([analysis.confidence(p, mode) for p in probabilities])
  return probabilities, confidences, rules.cascade_exit_index(confidences, thresholds)


def test_exported_cascade_takes_the_exits_the_offline_simulation_predicts(fashion):
  images = run_helpers.read_images(fashion['data_dir'], 'validation', 400)
  outputs = _run_saved_model(fashion['export_dir'], images)
  thresholds = cascade_thresholds.read(fashion['thresholds']).thresholds('top1',
                                                                    fashion['epsilon'])
  probabilities, confidences, offline_exit = _offline(fashion['softmax_dir'], 'validation',
                                                      thresholds, 'top1')
  # Every exit is used, so the comparison covers the gather/scatter of all three paths.
  assert set(np.unique(outputs['exit'])) == {0, 1, 2}
  # The dump and the cascade compute the same probabilities in differently sized batches; an
  # image whose confidence sits within float noise of a threshold may go either way.
  near = np.zeros(len(images), bool)
  for k, threshold in enumerate(thresholds):
    near |= np.abs(confidences[k] - threshold) < 1e-6
  assert near.sum() <= 2
  np.testing.assert_array_equal(outputs['exit'][~near], offline_exit[~near])
  chosen = np.stack(probabilities)[outputs['exit'], np.arange(len(images))]
  np.testing.assert_allclose(outputs['probabilities'], chosen, atol=1e-5)
  np.testing.assert_array_equal(outputs['classes'][~near], chosen.argmax(1)[~near])
  stage_macs = cifar10_main.Cifar10Model(8, 2).stage_macs(32, 32)
  np.testing.assert_array_equal(outputs['macs'], np.cumsum(stage_macs)[outputs['exit']])
  np.testing.assert_array_equal(outputs['top5_classes'][:, 0], outputs['classes'])


def test_full_signature_is_the_plain_network(fashion):
  images = run_helpers.read_images(fashion['data_dir'], 'validation', 64)
  outputs = _run_saved_model(fashion['export_dir'], images, 'full')
  final = np.load(os.path.join(fashion['softmax_dir'], 'validation', 'clf2_probabilities.npy'))
  np.testing.assert_allclose(outputs['probabilities'], final[:64], atol=1e-5)
  assert (outputs['exit'] == 2).all()
  assert (outputs['macs'] == cifar10_main.Cifar10Model(8, 2).plain_macs(32, 32)).all()


def test_top5_confidence_is_bit_identical_to_the_analysis():
  rng = np.random.RandomState(0)
  logits = rng.normal(0, 3, [500, 1001]).astype(np.float32)
  probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  probabilities = probabilities.astype(np.float32)
  with tf.Graph().as_default(), tf.Session() as sess:
    ours = sess.run({m: cascade_export.confidence(tf.constant(probabilities), m)
                     for m in ('top1', 'top5')})
  for mode in ('top1', 'top5'):
    np.testing.assert_array_equal(ours[mode], analysis.confidence(probabilities, mode))


def test_thresholds_of_another_model_are_refused(fashion, tmp_path):
  with open(fashion['thresholds']) as f:
    report = json.load(f)
  report['num_classes'] = 1001
  wrong = tmp_path / 'thresholds.json'
  wrong.write_text(json.dumps(report))
  with pytest.raises(ValueError, match='1001 classes .the model has 10.'):
    cascade_export.export_cascade(
        tf.train.latest_checkpoint(fashion['model_dir']), fashion['factory'], (32, 32, 3),
        str(wrong), fashion['epsilon'], 'top1', str(tmp_path / 'export'), 'cifar10')
  report['num_classes'], report['num_exits'] = 10, 4
  wrong.write_text(json.dumps(report))
  with pytest.raises(ValueError, match='4 exits'):
    cascade_export.export_cascade(
        tf.train.latest_checkpoint(fashion['model_dir']), fashion['factory'], (32, 32, 3),
        str(wrong), fashion['epsilon'], 'top1', str(tmp_path / 'export'), 'cifar10')
  assert not (tmp_path / 'export').exists()


def test_epsilon_not_in_the_file_lists_the_available_ones(fashion, tmp_path):
  with pytest.raises(ValueError, match='no top1 thresholds for epsilon 0.333; available: 0,'):
    cascade_export.export_cascade(
        tf.train.latest_checkpoint(fashion['model_dir']), fashion['factory'], (32, 32, 3),
        fashion['thresholds'], 0.333, 'top1', str(tmp_path / 'export'), 'cifar10')


def _cascade_predict(*args):
  """Runs cascade_predict.py in a fresh (eager) process; returns the CompletedProcess."""
  return subprocess.run(
      [sys.executable, os.path.join(REPO_DIR, 'cascade_predict.py')] + [str(a) for a in args],
      capture_output=True, text=True, cwd=REPO_DIR, timeout=300, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))


def test_cascade_predict_reports_a_corrupt_jpeg_and_classifies_the_rest(fashion, tmp_path):
  from PIL import Image
  raw = np.fromfile(cifar10_main.get_filenames('validation', fashion['data_dir'])[0], np.uint8)
  records = raw.reshape(-1, cifar10_main.RECORD_BYTES)[:3]
  folder = tmp_path / 'photos'
  folder.mkdir()
  for i, record in enumerate(records):
    image = record[1:].reshape(3, 32, 32).transpose(1, 2, 0)
    Image.fromarray(image).save(folder / 'good{}.png'.format(i))
  (folder / 'broken.jpg').write_bytes((folder / 'good0.png').read_bytes()[:60])
  # The parent folder of the timestamped export works too: the newest export is used.
  result = _cascade_predict('--saved_model', os.path.dirname(fashion['export_dir']),
                            '--compare_full', '--batch_size', 2, folder)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'skipping {}: not a decodable image'.format(folder / 'broken.jpg') in result.stderr
  for i in range(3):
    assert re.search(r'good{}\.png: exit [012], top-5: '.format(i), result.stdout)
  assert re.search(r'^3 images, epsilon ', result.stdout, re.M)
  assert 'measured speedup' in result.stdout


def test_cascade_predict_command_line_names_the_bad_file(fashion, tmp_path):
  (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  result = _cascade_predict('--saved_model', fashion['export_dir'], tmp_path / 'bad.jpg')
  assert result.returncode != 0
  assert 'skipping {}: not a decodable image'.format(tmp_path / 'bad.jpg') in result.stderr
  assert 'no image could be classified' in result.stderr


@pytest.mark.parametrize('chunk_size', [0, 5])
def test_imagenet_layout_cascade_gathers_and_scatters_in_input_order(chunk_size):
  """A small ImageNet ResNet with thresholds that split the batch three ways.

  With chunk size 5 the 24 images go through the cascade as 4 chunks of 5 and one of 4.
  """
  model = resnet_model.imagenet_model(18, 2, 1001, 'channels_last')
  rng = np.random.RandomState(1)
  images = rng.normal(0, 1, [24, 64, 64, 3]).astype(np.float32)
  with tf.Graph().as_default(), tf.Session() as sess:
    placeholder = tf.placeholder(tf.float32, [None, 64, 64, 3])
    thresholds = tf.placeholder(tf.float32, [2])
    cascade, full = cascade_export.build_signatures(model, placeholder, thresholds, 'top5',
                                                    chunk_size)
    num_variables = len(tf.global_variables())
    with tf.variable_scope(tf.get_variable_scope(), reuse=True):
      every = model(placeholder, training=False)
    # The loop bodies and the plain network reused the one set of variables.
    assert num_variables == len(tf.global_variables())
    with tf.Graph().as_default():
      model(tf.zeros([1, 64, 64, 3]), training=False)
      assert num_variables == len(tf.global_variables())
    sess.run(tf.global_variables_initializer())
    probabilities = sess.run({k: tf.nn.softmax(v) for k, v in every.items()},
                             {placeholder: images})
    confidences = np.stack([analysis.confidence(probabilities[k], 'top5') for k in range(3)])
    # Thresholds between confidences: about a third leave at exit 0, a third at exit 1.
    t0 = float(np.sort(confidences[0])[16]) - 1e-7
    stay = confidences[0] < t0
    t1 = float(np.sort(confidences[1][stay])[stay.sum() // 2]) - 1e-7
    outputs, plain = sess.run([cascade, full], {placeholder: images, thresholds: [t0, t1]})
    nothing = sess.run([cascade, full], {placeholder: images[:0], thresholds: [t0, t1]})
  for signature in nothing:   # An empty batch is answered with empty outputs.
    assert signature['probabilities'].shape == (0, 1001)
    assert signature['exit'].shape == (0,)
  assert outputs['probabilities'].shape == (24, 1001)
  np.testing.assert_allclose(plain['probabilities'], probabilities[2], atol=1e-5)
  expected_exit = rules.cascade_exit_index(confidences, [t0, t1])
  assert sorted(set(expected_exit)) == [0, 1, 2]
  np.testing.assert_array_equal(outputs['exit'], expected_exit)
  expected = np.stack([probabilities[k] for k in range(3)])[expected_exit, np.arange(24)]
  np.testing.assert_allclose(outputs['probabilities'], expected, atol=1e-5)


_CONV_OP = re.compile(r'= \w*Conv2D\w*\((.*)\)')
_KERNEL = re.compile(r'resnet_model/(conv2d(?:_\d+)?)/Conv2D/ReadVariableOp')


def _executed_convs(sess, fetches, feed):
  """Names of the conv layers whose convolutions ran in one ``sess.run``.

  Read from the step statistics: each executed op's label names its inputs, and a convolution
  (plain, or fused by oneDNN with its neighbours) takes its layer's kernel as one of them.
  """
  metadata = tf.RunMetadata()
  sess.run(fetches, feed, options=tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE),
           run_metadata=metadata)
  labels = [n.timeline_label for d in metadata.step_stats.dev_stats for n in d.node_stats]
  return {kernel for label in labels if (op := _CONV_OP.search(label))
          for kernel in _KERNEL.findall(op.group(1))}


@pytest.mark.parametrize('chunk_size', [0, 3])
def test_a_stage_no_image_needs_does_not_run(chunk_size):
  """Everyone leaving at exit 0 runs stage 0's convs only; an empty batch runs none."""
  model = resnet_model.imagenet_model(18, 2, 1001, 'channels_last')
  images = np.random.RandomState(2).normal(0, 1, [5, 64, 64, 3]).astype(np.float32)
  stage0 = {resnet_layers.layer_name('conv2d', i) for i in range(11)}   # stem + groups 1-2
  every = {resnet_layers.layer_name('conv2d', i) for i in range(21)}
  with tf.Graph().as_default(), tf.Session() as sess:
    placeholder = tf.placeholder(tf.float32, [None, 64, 64, 3])
    thresholds = tf.placeholder(tf.float32, [2])
    cascade, full = cascade_export.build_signatures(model, placeholder, thresholds, 'top1',
                                                    chunk_size)
    sess.run(tf.global_variables_initializer())
    # top-1 confidences are > 0: a threshold of 0 lets every image leave at exit 0.
    assert _executed_convs(sess, cascade, {placeholder: images, thresholds: [0, 0]}) == stage0
    assert _executed_convs(sess, cascade, {placeholder: images, thresholds: [2, 2]}) == every
    assert _executed_convs(sess, full, {placeholder: images}) == every
    for fetches in (cascade, full):
      assert _executed_convs(sess, fetches, {placeholder: images[:0], thresholds: [2, 2]}) == set()
    outputs = sess.run(cascade, {placeholder: images, thresholds: [0, 0]})
  np.testing.assert_array_equal(outputs['exit'], np.zeros(5))


def test_export_with_a_guaranteed_accuracy_drop_uses_its_risk_controlled_thresholds(fashion,
                                                                                    tmp_path):
  with open(fashion['thresholds']) as f:
    report = json.load(f)
  chosen = [0.95, 0.9]
  report['risk_controlled'] = [{
      'mode': 'top1', 'accuracy_drop': 0.01, 'delta': 0.1, 'method': 'ltt',
      'thresholds': chosen, 'calibration_images': 200,
      'evaluation': {'accuracy': 0.8, 'mean_macs': 1.0, 'exit_shares': [0.5, 0.2, 0.3]}}]
  path = tmp_path / 'thresholds.json'
  path.write_text(json.dumps(report))
  export_dir = cascade_export.export_cascade(
      tf.train.latest_checkpoint(fashion['model_dir']), fashion['factory'], (32, 32, 3),
      str(path), None, 'top1', str(tmp_path / 'export'), 'cifar10', accuracy_drop=0.01)
  with open(os.path.join(export_dir, cascade_export.CASCADE_INFO)) as f:
    info = json.load(f)
  assert info['thresholds'] == chosen and info['accuracy_drop'] == 0.01
  assert info['epsilon'] is None and info['offline_estimate']['accuracy'] == 0.8
  # No chunk size asked for: whole batches under oneDNN's kernels, chunks of 8 under TensorFlow's.
  forced = os.environ.get('TF_ENABLE_ONEDNN_OPTS')
  onednn = cascade_export.onednn_enabled() if forced is None else forced == '1'
  assert info['onednn_at_export'] is onednn
  assert info['chunk_size'] == (0 if onednn else cascade_export.CPU_CHUNK_SIZE)
  with pytest.raises(ValueError, match='no top1 .*0.02'):
    cascade_export.export_cascade(
        tf.train.latest_checkpoint(fashion['model_dir']), fashion['factory'], (32, 32, 3),
        str(path), None, 'top1', str(tmp_path / 'export2'), 'cifar10', accuracy_drop=0.02)


def test_epsilon_and_accuracy_drop_together_are_refused(fashion, tmp_path):
  with pytest.raises(ValueError, match='give --epsilon .* or --accuracy_drop .*, not both'):
    run_helpers.run_cifar('-dd', fashion['data_dir'], '-md', fashion['model_dir'], '-rs', 8,
                          '-rv', 2, '--eval_only', '--classifier_id', 'all', '--softmax_dir=',
                          '--export_cascade_dir', tmp_path / 'export', '--cascade_thresholds',
                          fashion['thresholds'], '--epsilon', 0.05, '--accuracy_drop', 0.01)
  assert not (tmp_path / 'export').exists()
