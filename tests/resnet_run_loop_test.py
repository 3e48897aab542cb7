"""Tests of the run loop: warm start, fine-tuning, checkpoint checks, replicas, flag errors.

The jobs run through ``cifar10_main.run_cifar`` (a fresh FlagValues each) on a small
Fashion-MNIST subset with a ResNet-8 v2. The pretrained checkpoints are plain ResNet-8s (no exit
heads, like the official ImageNet ones) whose every variable, BN moving statistics included,
holds a random value, so a variable that was not restored cannot pass for one that was.
"""

import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import run_helpers
import tensorflow.compat.v1 as tf
from absl import flags

import cifar10_main
import model_fn
import resnet_model
import resnet_run_loop
import softmax_dump
import warm_start

NUM_TRAIN = 200
NUM_VALIDATION = 60
MODEL_FLAGS = ('-rs', 8, '-rv', 2)
HEADS = ('exit0', 'exit1')


def _group(name):
  return resnet_model.variable_group(name, 3)


def _is_slot(name, names):
  return name in warm_start.optimizer_slot_names(names)


def _model_values(values):
  """The model's variables of a checkpoint (no optimizer slots, no global step)."""
  slots = warm_start.optimizer_slot_names(values)
  return {k: v for k, v in values.items() if _group(k) and k not in slots}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return run_helpers.prepare_data(tmp_path_factory, NUM_TRAIN, NUM_VALIDATION)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A plain ResNet-8 v2 checkpoint with random values: (prefix, values)."""
  folder = tmp_path_factory.mktemp('pretrained')
  return run_helpers.write_random_checkpoint(str(folder / 'model.ckpt'), seed=0)


@pytest.fixture(scope='module')
def warm_started(data_dir, pretrained, tmp_path_factory):
  """A model_dir warm-started from ``pretrained`` by an eval-only run of all exits."""
  model_dir = str(tmp_path_factory.mktemp('warm') / 'model')
  run_helpers.run_cifar('-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--eval_only',
                        '--classifier_id', 'all', '-pmcp', pretrained[0], '--softmax_dir=')
  return model_dir


def _copy(model_dir, tmp_path):
  copy = str(tmp_path / 'model')
  shutil.copytree(model_dir, copy)
  return copy


def _fine_tune(data_dir, model_dir, classifier_id):
  return run_helpers.run_cifar(
      '-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--fine_tune', '--classifier_id',
      classifier_id, '-te', 1, '-bs', 50, '--softmax_dir=', '--hooks=')


###############################################################################
# Warm start
###############################################################################
def test_warm_start_restores_every_backbone_value_exactly(warm_started, pretrained):
  _, source = pretrained
  restored = run_helpers.checkpoint_values(warm_started)
  source_model = _model_values(source)
  assert source_model and all(_group(k) in ('backbone', 'final_dense') for k in source_model)
  assert any(k.endswith('moving_mean') for k in source_model)
  for name, value in source_model.items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)

  # The heads did not come from the checkpoint: they hold their initial values.
  heads = {k: v for k, v in restored.items()
           if _group(k) in HEADS and not _is_slot(k, restored)}
  assert {_group(k) for k in heads} == set(HEADS)
  for name, value in heads.items():
    if name.endswith(('moving_mean', 'beta', 'bias')):
      np.testing.assert_array_equal(value, 0, err_msg=name)
    elif name.endswith(('moving_variance', 'gamma')):
      np.testing.assert_array_equal(value, 1, err_msg=name)
    else:  # a Glorot-uniform kernel
      assert name.endswith('kernel') and np.std(value) > 0, name
      assert np.abs(value).max() <= np.sqrt(6 / sum(value.shape)) + 1e-6, name
  # Momentum starts at zero, not at the pretrained run's.
  slots = [k for k in restored if _is_slot(k, restored)]
  assert slots and all(not np.any(restored[k]) for k in slots)


@pytest.mark.parametrize('with_state_file', [True, False])
def test_pretrained_path_may_be_a_folder(data_dir, pretrained, warm_started, tmp_path,
                                         with_state_file):
  prefix, _ = pretrained
  folder = tmp_path / 'unpacked'
  folder.mkdir()
  for path in tf.io.gfile.glob(prefix + '.*'):
    shutil.copy(path, folder)
  if with_state_file:
    shutil.copy(os.path.join(os.path.dirname(prefix), 'checkpoint'), folder)
  model_dir = str(tmp_path / 'model')
  run_helpers.run_cifar('-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--eval_only',
                        '--classifier_id', '2', '-pmcp', folder, '--softmax_dir=')
  restored = run_helpers.checkpoint_values(model_dir)
  for name, value in _model_values(pretrained[1]).items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_a_checkpoint_in_model_dir_wins_over_the_pretrained_path(data_dir, warm_started,
                                                                 tmp_path, caplog):
  other, other_values = run_helpers.write_random_checkpoint(str(tmp_path / 'other' / 'ckpt'),
                                                            seed=1)
  model_dir = _copy(warm_started, tmp_path)
  before = run_helpers.checkpoint_values(model_dir)
  with caplog.at_level(logging.INFO, logger='absl'):
    run_helpers.run_cifar('-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--eval_only',
                          '--classifier_id', 'all', '-pmcp', other, '--softmax_dir=')
  assert 'already holds a checkpoint' in caplog.text and 'is ignored' in caplog.text
  after = run_helpers.checkpoint_values(model_dir)
  name = 'resnet_model/conv2d/kernel'
  assert not np.array_equal(before[name], other_values[name])
  for name, value in before.items():
    np.testing.assert_array_equal(after[name], value, err_msg=name)


@pytest.mark.parametrize('source, mismatch', [
    ({'resnet_size': 14}, r'resnet_model/conv2d_\d+/kernel has shape'),
    ({'num_classes': 5}, r'resnet_model/dense/kernel has shape \[64, 10\] in the model but '
                         r'\[64, 5\] in the checkpoint'),
], ids=['deeper_network', 'other_class_count'])
def test_mismatching_checkpoint_fails_and_leaves_no_model_dir(data_dir, tmp_path, source,
                                                              mismatch):
  prefix, _ = run_helpers.write_random_checkpoint(str(tmp_path / 'src' / 'ckpt'), **source)
  model_dir = tmp_path / 'model'
  with pytest.raises(ValueError, match='does not fit the model') as error:
    run_helpers.run_cifar('-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--eval_only',
                          '--classifier_id', 'all', '-pmcp', prefix, '--softmax_dir=')
  message = str(error.value)
  assert prefix in message
  assert '--resnet_size (-rs)' in message and '--resnet_version (-rv)' in message
  assert re.search(mismatch, message), message
  assert not model_dir.exists()


def test_missing_pretrained_checkpoint_is_named(data_dir, tmp_path):
  missing = str(tmp_path / 'nope' / 'model.ckpt-5')
  with pytest.raises(FileNotFoundError, match='no such checkpoint'):
    run_helpers.run_cifar('-dd', data_dir, '-md', tmp_path / 'model', *MODEL_FLAGS,
                          '--eval_only', '-pmcp', missing, '--softmax_dir=')
  assert not (tmp_path / 'model').exists()


###############################################################################
# Fine-tuning
###############################################################################
def _assert_changes(before, after, changed_groups):
  """Every model variable of ``changed_groups`` changed, every other one is bit-identical."""
  before, after = _model_values(before), _model_values(after)
  assert set(after) == set(before)
  for name, value in before.items():
    if _group(name) in changed_groups:
      # BN moving statistics of a head and its weights all move with a few steps.
      assert not np.array_equal(after[name], value), name
    else:
      np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_fine_tuning_exit0_changes_only_its_head(data_dir, warm_started, tmp_path):
  model_dir = _copy(warm_started, tmp_path)
  before = run_helpers.checkpoint_values(model_dir)
  result = _fine_tune(data_dir, model_dir, '0')
  assert result['eval']['global_step'] == NUM_TRAIN // 50
  # The final classifier and the stages after exit 0 are not built by this run, yet stay in
  # the checkpoint with their values.
  _assert_changes(before, run_helpers.checkpoint_values(model_dir), {'exit0'})


def test_fine_tuning_all_heads_keeps_backbone_and_final_classifier(data_dir, warm_started,
                                                                   tmp_path, pretrained):
  model_dir = _copy(warm_started, tmp_path)
  before = run_helpers.checkpoint_values(model_dir)
  result = _fine_tune(data_dir, model_dir, 'all')
  assert set(result['eval']) >= {'clf0/accuracy', 'clf1/accuracy', 'clf2/accuracy'}
  after = run_helpers.checkpoint_values(model_dir)
  _assert_changes(before, after, {'exit0', 'exit1'})
  for name, value in _model_values(pretrained[1]).items():
    np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_fine_tuned_model_dir_can_be_evaluated_and_dumped(data_dir, tmp_path):
  """A fine-tuning run saves momentum for what it trains only; evaluation must not need more."""
  model_dir = str(tmp_path / 'model')
  run_helpers.run_cifar('-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--fine_tune',
                        '--classifier_id', 'all', '--max_train_steps', 1, '--softmax_dir=',
                        '--hooks=')
  saved = run_helpers.checkpoint_values(model_dir)
  assert 'resnet_model/conv2d/kernel/Momentum' not in saved
  softmax_dir = str(tmp_path / 'softmax')
  result = run_helpers.run_cifar('-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--eval_only',
                                 '--classifier_id', 'all', '--softmax_dir', softmax_dir,
                                 '--nodump_train', '--evaluate_in_eval_only')
  assert result['dumped'] == {'validation': NUM_VALIDATION}
  assert result['eval']['global_step'] == 1


###############################################################################
# Bad flags and requests this machine cannot serve
###############################################################################
def test_more_gpus_than_the_machine_has(data_dir, tmp_path):
  if tf.config.list_physical_devices('GPU'):
    pytest.skip('this machine has GPUs')
  with pytest.raises(ValueError, match=r'^--num_gpus 4: TensorFlow finds no GPU on this '
                                       r'machine; pass --num_gpus 0 to run on the CPU, or'):
    run_helpers.run_cifar('-dd', data_dir, '-md', tmp_path / 'model', *MODEL_FLAGS,
                          '--num_gpus', 4)
  assert not (tmp_path / 'model').exists()


@pytest.mark.parametrize('value', ['3', '-1', 'two'])
def test_classifier_id_is_validated_when_parsing(value):
  with pytest.raises(flags.IllegalFlagValueError, match="--classifier_id must be 0, 1, 2 or "
                                                        "'all'"):
    run_helpers.parse_cifar_flags(['--classifier_id', value])


def test_eval_only_needs_weights(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r'--eval_only needs trained weights: pass '
                                       r'--pretrained_model_checkpoint_path \(-pmcp\)'):
    run_helpers.run_cifar('-dd', data_dir, '-md', tmp_path / 'model', *MODEL_FLAGS,
                          '--eval_only')
  assert not (tmp_path / 'model').exists()


def test_plain_network_has_only_the_final_classifier(data_dir, tmp_path):
  with pytest.raises(ValueError, match='--nois_cascaded builds the plain network'):
    run_helpers.run_cifar('-dd', data_dir, '-md', tmp_path / 'model', *MODEL_FLAGS,
                          '--nois_cascaded', '--classifier_id', '0')


###############################################################################
# Pieces
###############################################################################
@pytest.mark.parametrize('count, shares', [
    (50, [8, 8, 8, 8, 8, 8, 2, 1]),    # 16, 16, 16, 2: the last global batch fills one share
    (48, [8, 8, 8, 8, 8, 8]),
    (1, [1, 1]),
])
def test_replica_batches_cover_every_image_once_and_none_is_empty(count, shares):
  with tf.Graph().as_default():
    dataset = tf.data.Dataset.range(count).batch(16)
    dataset = dataset.map(lambda x: ({'image': x * 10}, x))
    dataset = softmax_dump.split_into_replica_batches(dataset, 2, 8)
    next_batch = tf.data.make_one_shot_iterator(dataset).get_next()
    batches = []
    with tf.Session() as sess:
      while True:
        try:
          batches.append(sess.run(next_batch))
        except tf.errors.OutOfRangeError:
          break
  # Every global batch gives exactly one batch per replica; a share with no image left holds
  # a copy of the global batch's first image, marked invalid.
  assert [len(labels) for _, labels in batches] == shares
  valid = np.concatenate([features['valid'] for features, _ in batches])
  labels = np.concatenate([labels for _, labels in batches])
  images = np.concatenate([features['image'] for features, _ in batches])
  np.testing.assert_array_equal(labels[valid], np.arange(count))
  np.testing.assert_array_equal(images, labels * 10)
  assert valid.sum() == count and (~valid).sum() == sum(shares) - count
  if (~valid).any():
    assert labels[~valid][0] == count - count % 16   # the first image of the last batch


def test_optimizer_slots_are_told_from_model_variables():
  names = ['resnet_model/conv2d/kernel', 'resnet_model/conv2d/kernel/Momentum',
           'resnet_model/batch_normalization/moving_mean', 'global_step']
  assert warm_start.optimizer_slot_names(names) == {'resnet_model/conv2d/kernel/Momentum'}


def test_train_schedule_cycles():
  schedule = resnet_run_loop.train_schedule
  assert schedule(run_helpers.parse_cifar_flags(['-te', '8', '-ebe', '3'])) == [3, 6, 8]
  assert schedule(run_helpers.parse_cifar_flags(['-te', '8', '--eval_only'])) == []
  plan = model_fn.ExitPlan.parse
  assert plan('all', 3, fine_tune=True).trained == (0, 1)
  assert plan('all', 3, fine_tune=False).trained == (0, 1, 2)
  assert plan('2', 3, fine_tune=True).trained == (2,)
  assert plan('2', 3, fine_tune=True).trained_groups(3) == {'final_dense'}
  assert plan('all', 3, fine_tune=True).trained_groups(3) == {'exit0', 'exit1'}
  assert plan('0', 3).built == (0,) and plan('0', 3).trained_groups(3) is None
  with pytest.raises(ValueError, match=r"--classifier_id must be one of \[0, 1, 2\] or 'all'"):
    plan('3', 3)


def test_tensorflow_log_lines_are_printed_once():
  """The mains log through absl's handler only; TensorFlow's own handler doubled every line."""
  program = ('from absl import app\n'
             'import tensorflow.compat.v1 as tf\n'
             'import user_errors\n'
             'app.run(lambda _: user_errors.exit_on_user_error(\n'
             '    lambda flags_obj: tf.logging.warning("marker %d", 4321), None))\n')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', program], cwd=repo, capture_output=True,
                          text=True, check=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert result.stderr.count('marker 4321') == 1, result.stderr


@pytest.mark.parametrize('classifier_id, fine_tune', [('0', False), ('all', False),
                                                      ('all', True), ('2', True)])
@pytest.mark.parametrize('mode', ['train', 'eval', 'infer'])
def test_model_fn_contract(mode, classifier_id, fine_tune):
  """Per mode and exit plan: prediction keys and dtypes, a scalar loss, the metric names."""
  model = cifar10_main.Cifar10Model(8, 2, 'channels_last')
  plan = model_fn.ExitPlan.parse(classifier_id, model.num_exits, fine_tune)
  params = model_fn.RunParams(model=model, plan=plan,
                                     learning_rate_fn=lambda step: tf.constant(0.1))
  with tf.Graph().as_default():
    images = tf.zeros([4, 32, 32, 3])
    labels = tf.constant([0, 1, 2, 3])
    spec = model_fn.resnet_model_fn(
        {'image': images, 'label': labels} if mode == 'infer' else images,
        None if mode == 'infer' else labels, mode, params)
    trainable = {resnet_model.variable_group(v.op.name) for v in tf.trainable_variables()}
  want = {}
  for k in plan.built:
    want[f'clf{k}_probabilities'] = (tf.float32, [4, 10])
    want[f'clf{k}_classes'] = (tf.int64, [4])
  if mode == 'infer':
    want['label'] = (tf.int32, [4])
  got = {name: (t.dtype, t.shape.as_list()) for name, t in spec.predictions.items()}
  assert got == want
  if mode == 'infer':
    assert spec.loss is None and 'predict' in spec.export_outputs
    return
  assert spec.loss.shape.as_list() == [] and spec.loss.dtype == tf.float32
  metrics = {f'clf{k}/{m}' for k in plan.built for m in ('accuracy', 'accuracy_top_5')}
  assert set(spec.eval_metric_ops) == metrics | {'accuracy', 'accuracy_top_5', 'num_images'}
  assert (spec.train_op is not None) == (mode == 'train')
  # The graph builds exactly the built exits' heads (on the backbone up to the deepest one).
  heads = {resnet_model.head_group(k) for k in plan.built}
  assert trainable - {'backbone'} == heads


def test_synthetic_data_runs_end_to_end_without_data(tmp_path):
  model_dir = tmp_path / 'model'
  results = run_helpers.run_cifar('-md', model_dir, *MODEL_FLAGS, '--use_synthetic_data',
                                  '--classifier_id', 'all', '-bs', 8, '-te', 1,
                                  '--max_train_steps', 3, '--hooks=', '-dd', tmp_path / 'none')
  assert results['eval']['global_step'] == 3
  assert 0.0 <= results['eval']['clf1/accuracy'] <= 1.0
  assert results['dumped'] == {}     # synthetic data is never dumped
  assert tf.train.latest_checkpoint(str(model_dir)).endswith('-3')
