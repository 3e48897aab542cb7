"""Tests of the training-recipe options: each does what it says, and each is off by default.

Label smoothing, gradient clipping, decoupled weight decay and the exponential moving average are
checked on the model function's own training graph (a CIFAR ResNet-8 in a plain session) against
hand computations; the schedules at chosen steps; bfloat16 by the dtypes in the graph and by a
short run; the moving average end to end, from the warm start to the dump.
"""

import math
import os

import numpy as np
import pytest
import run_helpers
import tensorflow.compat.v1 as tf
from absl import flags

import cifar10_main
import distribution
import dump_layout
import imagenet_main
import model_fn
import warm_start

tf.disable_eager_execution()

BATCH = 4


def _params(**overrides):
  model = overrides.pop('model', None) or cifar10_main.Cifar10Model(8, 2, 'channels_last')
  fields = {'model': model, 'plan': model_fn.ExitPlan.parse('2', model.num_exits),
            'learning_rate_fn': lambda step: tf.constant(0.1)}
  fields.update(overrides)
  return model_fn.RunParams(**fields)


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  return (rng.normal(0, 1, [BATCH, 32, 32, 3]).astype(np.float32),
          rng.randint(0, 10, BATCH).astype(np.int32))


class Graph:
  """The model function's graph on a fixed batch, with its session and seeded variables.

  The variables get values from a seeded numpy generator (TF's dense initializers ignore the
  graph seed), so two graphs of the same model start from the same point.
  """

  def __init__(self, params, mode=tf.estimator.ModeKeys.TRAIN, seed=0):
    self.graph = tf.Graph()
    with self.graph.as_default():
      images, labels = _batch(seed)
      self.spec = model_fn.resnet_model_fn(tf.constant(images), tf.constant(labels), mode,
                                                  params)
      self.sess = tf.Session()
      self.sess.run(tf.global_variables_initializer())
      rng = np.random.RandomState(seed)
      averages = {v.op.name: v for v in tf.global_variables()
                  if v.op.name.endswith(warm_start.MOVING_AVERAGE_SUFFIX)}
      for v in tf.trainable_variables():
        shape = v.shape.as_list()
        if v.op.name.endswith('/kernel'):
          value = rng.normal(0, math.sqrt(2 / np.prod(shape[:-1])), shape)
        elif v.op.name.endswith('/gamma'):
          value = rng.uniform(0.8, 1.2, shape)
        else:
          value = rng.normal(0, 0.05, shape)
        v.load(value.astype(np.float32), self.sess)
        average = averages.get(v.op.name + warm_start.MOVING_AVERAGE_SUFFIX)
        if average is not None:   # an average starts at the value it averages
          average.load(value.astype(np.float32), self.sess)

  def tensor(self, name):
    return self.graph.get_tensor_by_name(name)

  def values(self, variables):
    return dict(zip([v.op.name for v in variables], self.sess.run(variables), strict=True))

  def trainable(self):
    with self.graph.as_default():
      return tf.trainable_variables()


def test_label_smoothing_equals_the_hand_computed_loss():
  smoothing = 0.2
  graph = Graph(_params(label_smoothing=smoothing, weight_decay=0.0),
                mode=tf.estimator.ModeKeys.EVAL)
  logits, loss = graph.sess.run([graph.tensor('resnet_model/final_dense:0'), graph.spec.loss])
  _, labels = _batch()
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  target = np.full(logits.shape, smoothing / 10)
  target[np.arange(BATCH), labels] += 1 - smoothing
  assert loss == pytest.approx(float(np.mean(-(target * log_p).sum(1))), rel=1e-5)
  plain = Graph(_params(weight_decay=0.0), mode=tf.estimator.ModeKeys.EVAL)
  logits, plain_loss = plain.sess.run([plain.tensor('resnet_model/final_dense:0'),
                                       plain.spec.loss])
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  assert plain_loss == pytest.approx(float(np.mean(-log_p[np.arange(BATCH), labels])), rel=1e-5)
  assert abs(loss - plain_loss) > 1e-3


def _one_step_change(params):
  """(gradient norm before clipping, {name: (before, after)}) of one training step."""
  graph = Graph(params)
  trainable = graph.trainable()
  before = graph.values(trainable)
  fetches = [graph.spec.train_op]
  if params.gradient_clip_norm:
    fetches.append(graph.tensor('gradient_norm:0'))
  norm_value = graph.sess.run(fetches)[1:] or [None]
  norm_value = norm_value[0]
  after = graph.values(trainable)
  return norm_value, {name: (before[name], after[name]) for name in before}


def test_clipped_gradients_have_the_clip_norm():
  clip = 1e-3
  norm, change = _one_step_change(_params(gradient_clip_norm=clip, weight_decay=0.0))
  assert norm > 10 * clip
  # The first momentum step moves each variable by -lr * gradient: the steps' global norm / lr
  # is the (clipped) gradients' global norm.
  step_norm = math.sqrt(sum(float(np.sum((a - b) ** 2)) for b, a in change.values())) / 0.1
  assert step_norm == pytest.approx(clip, rel=1e-3)


def test_decoupled_weight_decay_shrinks_the_kernels_after_the_step():
  decay = 0.05
  _, plain = _one_step_change(_params(weight_decay=0.0))
  _, decoupled = _one_step_change(_params(weight_decay=decay, decoupled_weight_decay=True))
  for name, (before, after) in decoupled.items():
    stepped = plain[name][1]   # the same step without decay (same start, same gradients)
    np.testing.assert_array_equal(before, plain[name][0])
    if name.endswith('/kernel'):
      np.testing.assert_allclose(after, stepped * (1 - 0.1 * decay), rtol=1e-5, atol=1e-7)
    else:   # BN parameters and biases are not decayed
      np.testing.assert_allclose(after, stepped, rtol=1e-6, atol=1e-7)


def test_default_weight_decay_covers_exactly_the_kernels():
  graph = Graph(_params())
  decayed = model_fn.decayed_variables(graph.trainable(),
                                              model_fn.WEIGHT_DECAY_EXCLUDE)
  assert {v.op.name for v in decayed} == {v.op.name for v in graph.trainable()
                                          if v.op.name.endswith('/kernel')}


def test_moving_average_after_known_steps():
  decay, steps = 0.8, 3
  graph = Graph(_params(moving_average_decay=decay))
  trainable = graph.trainable()
  with graph.graph.as_default():
    by_name = {v.op.name: v for v in tf.global_variables()}
  shadows = {v.op.name: by_name[v.op.name + warm_start.MOVING_AVERAGE_SUFFIX] for v in trainable}
  values = [graph.values(trainable)]
  for _ in range(steps):
    graph.sess.run(graph.spec.train_op)
    values.append(graph.values(trainable))
  averages = graph.sess.run(shadows)
  for name, average in averages.items():
    expected = values[0][name]          # the average starts at the variable's initial value
    for step in range(1, steps + 1):
      expected = decay * expected + (1 - decay) * values[step][name]
    np.testing.assert_allclose(average, expected, rtol=1e-5, atol=1e-6, err_msg=name)
  moved = [n for n in averages if not np.allclose(values[-1][n], values[0][n])]
  assert moved and any(not np.allclose(averages[n], values[-1][n]) for n in moved)


def _rates(flag_args, steps, num_images=1000, batch_size=100):
  flag_values = flags.FlagValues()
  cifar10_main.define_cifar_flags(flag_values)
  flag_values(['cifar10_main.py', *[str(a) for a in flag_args]])
  schedule = cifar10_main.learning_rate_fn(flag_values, batch_size, num_images)
  with tf.Graph().as_default():
    step = tf.placeholder(tf.int64, [])
    rate = schedule(step)
    with tf.Session() as sess:
      return [float(sess.run(rate, {step: s})) for s in steps]


def test_cosine_schedule_with_warmup_at_chosen_steps():
  # 10 steps per epoch, 10 epochs, 2 warm-up epochs; initial rate 0.1 * 100 / 128.
  initial = 0.1 * 100 / 128
  rates = _rates(['--lr_schedule', 'cosine', '--warmup_epochs', 2, '-te', 10],
                 [0, 10, 20, 60, 100, 150])
  expected = [0.0, initial / 2, initial, initial / 2, 0.0, 0.0]
  np.testing.assert_allclose(rates, expected, atol=1e-7)


def test_step_schedule_stays_the_default_and_takes_a_warmup():
  initial = 0.1 * 100 / 128
  # CIFAR: divided by 10 at 50% and 75% of --train_epochs, no warm-up by default.
  np.testing.assert_allclose(_rates(['-te', 10], [0, 50, 51, 76]),
                             [initial, initial, initial / 10, initial / 100], rtol=1e-6)
  np.testing.assert_allclose(_rates(['-te', 10, '--warmup_epochs', 1], [0, 5, 10, 49]),
                             [0.0, initial / 2, initial, initial], rtol=1e-6)


def test_imagenet_full_training_keeps_its_five_warmup_epochs():
  flag_values = flags.FlagValues()
  imagenet_main.define_imagenet_flags(flag_values)
  flag_values(['imagenet_main.py'])
  schedule = imagenet_main.learning_rate_fn(flag_values, 256, num_train_images=2560)
  with tf.Graph().as_default(), tf.Session() as sess:
    step = tf.placeholder(tf.int64, [])
    rates = [float(sess.run(schedule(step), {step: s})) for s in (0, 25, 50, 300, 301)]
  np.testing.assert_allclose(rates, [0.0, 0.064, 0.128, 0.128, 0.0128], rtol=1e-6)


def test_bfloat16_computes_in_bfloat16_with_float32_variables():
  model = cifar10_main.Cifar10Model(8, 2, 'channels_last', dtype=tf.bfloat16)
  graph = Graph(_params(model=model, plan=model_fn.ExitPlan.parse('all', 3)))
  with graph.graph.as_default():
    assert {v.dtype.base_dtype for v in tf.global_variables()
            if v.op.name != 'global_step'} == {tf.float32}
    ops = graph.graph.get_operations()
  convs = [op for op in ops if op.type == 'Conv2D']
  norms = [op for op in ops if op.type == 'FusedBatchNormV3']
  assert convs and {op.get_attr('T') for op in convs} == {tf.bfloat16}
  # Batch norm: bfloat16 activations, float32 parameters and statistics.
  assert norms and {(op.get_attr('T'), op.get_attr('U')) for op in norms} == {
      (tf.bfloat16, tf.float32)}
  assert graph.spec.loss.dtype == tf.float32
  loss_before = graph.sess.run(graph.spec.loss)
  for _ in range(3):
    graph.sess.run(graph.spec.train_op)
  assert np.isfinite(graph.sess.run(graph.spec.loss)) and np.isfinite(loss_before)


def test_bfloat16_on_a_device_that_cannot_run_it_is_one_clear_error():
  with pytest.raises(ValueError, match=r'--dtype bf16: TensorFlow cannot run bfloat16 .* on '
                                       r'/device:GPU:7 .*use --dtype fp32'):
    distribution.check_bfloat16_runs('/device:GPU:7')


@pytest.mark.parametrize('flag, value', [('--moving_average_decay', 1.0),
                                         ('--moving_average_decay', 0.0),
                                         ('--label_smoothing', 1.0),
                                         ('--gradient_clip_norm', 0.0)])
def test_recipe_flags_outside_their_range_are_refused_by_name(flag, value):
  with pytest.raises(flags.IllegalFlagValueError, match=f'{flag} must be'):
    run_helpers.parse_cifar_flags([flag, value])


###############################################################################
# The moving average end to end: warm start, training, dump, evaluation
###############################################################################
@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return run_helpers.prepare_data(tmp_path_factory, 120, 40)


def _initial_checkpoint(prefix):
  """A ResNet-8 v2 at its initializers' values (softmax far from one-hot), saved."""
  model = cifar10_main.Cifar10Model(8, 2, 'channels_last')
  with tf.Graph().as_default(), tf.Session() as sess:
    model(tf.zeros([1, 32, 32, 3]), training=False)
    step = tf.train.get_or_create_global_step()
    sess.run(tf.global_variables_initializer())
    path = tf.train.Saver().save(sess, prefix, global_step=step)
  return path, run_helpers.checkpoint_values(path)


def test_moving_average_from_warm_start_to_dump(data_dir, tmp_path):
  pretrained, values = _initial_checkpoint(str(tmp_path / 'pre' / 'model.ckpt'))
  model_dir = str(tmp_path / 'model')
  softmax_dir = str(tmp_path / 'softmax')
  common = ('-dd', data_dir, '-md', model_dir, '-rs', 8, '-rv', 2, '--classifier_id', 2,
            '-bs', 20, '--hooks=', '--moving_average_decay', 0.5)
  run_helpers.run_cifar(*common, '-pmcp', pretrained, '-te', 1, '--max_train_steps', 4,
                        '--softmax_dir=', '--save_checkpoints_steps', 1)
  step0 = run_helpers.checkpoint_values(os.path.join(model_dir, 'model.ckpt-0'))
  suffix = warm_start.MOVING_AVERAGE_SUFFIX
  # The warm start sets each average to the pretrained value it averages.
  for name in ('resnet_model/conv2d/kernel', 'resnet_model/dense/bias'):
    np.testing.assert_array_equal(step0[name + suffix], values[name])
  final = run_helpers.checkpoint_values(model_dir)
  name = 'resnet_model/conv2d/kernel'
  assert not np.allclose(final[name + suffix], final[name])
  # Dumps and evaluation use the averages: the dump equals the model computed with them.
  result = run_helpers.run_cifar(*common, '--eval_only', '--softmax_dir', softmax_dir,
                                 '--nodump_train', '--evaluate_in_eval_only')
  dumped = np.load(dump_layout.probabilities_path(softmax_dir, 'validation', 2))
  images = run_helpers.read_images(data_dir, 'validation', 40)
  averaged = {n[:-len(suffix)]: v for n, v in final.items() if n.endswith(suffix)}
  expected = _probabilities(images, {**final, **averaged})
  raw = _probabilities(images, final)
  np.testing.assert_allclose(dumped, expected, atol=1e-5)
  assert np.abs(dumped - raw).max() > 1e-4
  labels = np.load(dump_layout.labels_path(softmax_dir, 'validation'))
  assert result['eval']['accuracy'] == pytest.approx(np.mean(dumped.argmax(1) == labels),
                                                     abs=1e-6)
  # A run warm-started from this checkpoint starts from its averages: they are its model.
  second = str(tmp_path / 'second')
  run_helpers.run_cifar('-dd', data_dir, '-md', second, '-rs', 8, '-rv', 2, '--classifier_id', 2,
                        '--eval_only', '-pmcp', model_dir, '--softmax_dir=')
  started = run_helpers.checkpoint_values(second)
  for name in ('resnet_model/conv2d/kernel', 'resnet_model/dense/bias'):
    np.testing.assert_array_equal(started[name], final[name + suffix])


def _probabilities(images, values):
  """The final exit's softmax of a ResNet-8 v2 whose variables hold ``values``."""
  model = cifar10_main.Cifar10Model(8, 2, 'channels_last')
  with tf.Graph().as_default(), tf.Session() as sess:
    logits = model(tf.constant(images), training=False, exits=[2])[2]
    for v in tf.global_variables():
      v.load(values[v.op.name], sess)
    return sess.run(tf.nn.softmax(logits))
