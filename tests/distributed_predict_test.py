"""Softmax dumps over two replicas (MirroredStrategy on two logical CPU devices) against one.

With several replicas ``resnet_run_loop.dump_softmax`` predicts through
``predict_with_strategy`` instead of ``Estimator.predict``. The two-replica job runs in a fresh
process (logical CPU devices have to be configured before TensorFlow starts); the one-replica
job runs here. The model is a ResNet-8 v2 with all three exits whose every variable (BN moving
statistics included) holds a value different from its initial one, so a replica that did not
restore the checkpoint cannot give the same probabilities.
"""

import logging
import re

import numpy as np
import pytest
import run_helpers
import tensorflow.compat.v1 as tf

import cifar10_main
import dump_layout

# Batch 16, 8 images per replica. Validation: 61 = 3 * 16 + 13, so the last step gives the
# replicas 8 and 5 images. Train: 37 = 2 * 16 + 5, so the last step gives 5 and 0 (an empty
# slice for replica 1).
NUM_TRAIN = 37
NUM_VALIDATION = 61
BATCH = 16
REPLICAS = 2
MODEL_FLAGS = ('-rs', 8, '-rv', 2, '--classifier_id', 'all')
EXITS = (0, 1, 2)
GLOBAL_STEP = 77


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return run_helpers.prepare_data(tmp_path_factory, NUM_TRAIN, NUM_VALIDATION)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  """A checkpoint whose every variable is moved away from its initial value.

  Random values on the scale of the initialisers (not arbitrary ones) keep the softmax far
  from one-hot, so every row of a dump differs from every other and a wrong row order shows.
  """
  folder = tmp_path_factory.mktemp('model')
  rng = np.random.default_rng(0)
  model = cifar10_main.Cifar10Model(8, 2, 'channels_last')
  with tf.Graph().as_default():
    model(tf.zeros([1, cifar10_main.HEIGHT, cifar10_main.WIDTH, cifar10_main.NUM_CHANNELS]),
          training=True)
    step = tf.train.get_or_create_global_step()
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      for var in tf.global_variables():
        if var is step:
          continue
        value = sess.run(var)
        if var.op.name.endswith(('kernel', 'gamma')):
          value = value * rng.uniform(0.5, 1.5, value.shape)
        elif var.op.name.endswith('moving_variance'):
          value = rng.uniform(0.5, 2.0, value.shape)
        else:  # beta, moving_mean, bias: all start at zero.
          value = rng.normal(0.0, 0.2, value.shape)
        var.load(value.astype(np.float32), sess)
      step.load(GLOBAL_STEP, sess)
      tf.train.Saver().save(sess, str(folder / 'model.ckpt'), global_step=GLOBAL_STEP)
  return str(folder)


def _replica_shares(num_images, batch, replicas):
  """Images each replica predicts when every global batch is cut into consecutive slices."""
  per_replica = batch // replicas
  shares = [0] * replicas
  for start in range(0, num_images, batch):
    size = min(batch, num_images - start)
    for replica in range(replicas):
      shares[replica] += min(per_replica, max(0, size - replica * per_replica))
  return shares


def _logged_shares(log_text):
  """split -> [(device, images)] from the dump's per-replica log lines."""
  shares = {}
  for split, items in re.findall(r'dump (\w+): images predicted per replica: (.*)', log_text):
    shares[split] = [(device, int(count)) for device, count in
                     (item.rsplit(': ', 1) for item in items.split(', '))]
  return shares


def test_two_replica_dumps_equal_the_one_replica_dumps(data_dir, model_dir, tmp_path, caplog):
  # The cases the data sizes are chosen for: a short last slice, and an empty one.
  assert BATCH // REPLICAS < NUM_VALIDATION % BATCH < BATCH
  assert 0 < NUM_TRAIN % BATCH <= BATCH // REPLICAS
  two_dir = str(tmp_path / 'two')
  one_dir = str(tmp_path / 'one')
  common = ('-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--eval_only', '-bs', BATCH)
  done = run_helpers.run_cifar_subprocess(*common, '--softmax_dir', two_dir,
                                          '--cpu_replicas', REPLICAS)
  assert done.returncode == 0, done.stderr[-5000:]
  with caplog.at_level(logging.INFO, logger='absl'):
    one = run_helpers.run_cifar(*common, '--softmax_dir', one_dir)
  assert one['dumped'] == {'validation': NUM_VALIDATION, 'train': NUM_TRAIN}
  assert caplog.text.count('predicting on one device (Estimator.predict, /cpu:0)') == 2

  # Both logical devices predicted, each its own slice of every global batch.
  assert done.stderr.count(f'predicting with MirroredStrategyV1 on {REPLICAS} replicas') == 2
  shares = _logged_shares(done.stderr)
  assert sorted(shares) == ['train', 'validation']
  for split, count in (('validation', NUM_VALIDATION), ('train', NUM_TRAIN)):
    devices = [device for device, _ in shares[split]]
    assert [d.rsplit('/', 1)[1] for d in devices] == ['device:CPU:0', 'device:CPU:1'], devices
    assert [images for _, images in shares[split]] == _replica_shares(count, BATCH, REPLICAS)

  for split, count in (('validation', NUM_VALIDATION), ('train', NUM_TRAIN)):
    labels_two = np.load(dump_layout.labels_path(two_dir, split))
    labels_one = np.load(dump_layout.labels_path(one_dir, split))
    records = run_helpers.read_labels(data_dir, split)
    assert labels_two.shape == (count,)
    np.testing.assert_array_equal(labels_two, records)
    np.testing.assert_array_equal(labels_one, records)
    rows_one = []
    for exit_id in EXITS:
      probs_two = np.load(dump_layout.probabilities_path(two_dir, split, exit_id))
      probs_one = np.load(dump_layout.probabilities_path(one_dir, split, exit_id))
      assert probs_two.shape == probs_one.shape == (count, cifar10_main.NUM_CLASSES)
      np.testing.assert_allclose(probs_two, probs_one, atol=1e-5, err_msg=f'{split} {exit_id}')
      rows_one.append(probs_one)
    # The comparison can tell any two rows apart: every pair differs by far more than 1e-5.
    rows = np.concatenate(rows_one, axis=1)
    gaps = np.abs(rows[:, None] - rows[None]).max(axis=2)
    np.fill_diagonal(gaps, np.inf)
    assert gaps.min() > 1e-4, split

  manifest_two = dump_layout.read_manifest(two_dir)
  manifest_one = dump_layout.read_manifest(one_dir)
  assert manifest_two['splits'] == manifest_one['splits'] == {
      'validation': {'num_images': NUM_VALIDATION, 'exits': list(EXITS)},
      'train': {'num_images': NUM_TRAIN, 'exits': list(EXITS)}}
  assert manifest_two['global_step'] == manifest_one['global_step'] == GLOBAL_STEP
