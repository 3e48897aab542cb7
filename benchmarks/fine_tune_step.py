"""Time of one head fine-tuning step versus one full-network training step, on the CPU.

Builds the training graph of ``model_fn.resnet_model_fn`` as ``imagenet_main`` configures
it (ImageNet ResNet v2, 1001 classes, channels_last, fp32, momentum, weight decay, the article's
learning-rate schedules) for each contender and runs its ``train_op`` in a plain ``tf.Session``
(not through the Estimator, so that the input pipeline, hooks and checkpointing are not timed):

* ``ft0``: ``--fine_tune --classifier_id 0``: builds the stem, block groups 1-2 and exit 0's
  head; only the head trains and the backbone's BNs run in inference mode;
* ``ft1``, ``ftall``: the same for exit 1, and for both early heads at once;
* ``full``: no fine-tuning, ``--classifier_id 2``: the whole network trains.

The batch is a fixed synthetic one held in a variable (no input pipeline). Every contender runs
``--warmup_steps`` untimed steps first (graph optimisation, memory pools); then the contenders
take turns for ``--repetitions`` rounds of ``--timed_steps`` steps, and the table gives the median
wall-clock and CPU time (of this process, all threads) per step. The target is ft0 / full <= 0.35.

Usage::

    .venv/bin/python benchmarks/fine_tune_step.py [--batch_size=32] [--contenders=ft0,full]
"""

import os
import statistics
import sys
import time
import types

from absl import app, flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_REPO]

import numpy as np  # noqa: E402
import tensorflow.compat.v1 as tf  # noqa: E402

import imagenet_main  # noqa: E402
import model_fn  # noqa: E402
import resnet_model  # noqa: E402

CONTENDERS = {  # name -> (--fine_tune, --classifier_id)
    'ft0': (True, '0'),
    'ft1': (True, '1'),
    'ftall': (True, 'all'),
    'full': (False, '2'),
}

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 32, 'Images per training step.')
flags.DEFINE_integer('image_size', 224, 'Side of the square images.')
flags.DEFINE_integer('resnet_size', 50, 'ResNet depth.')
flags.DEFINE_integer('warmup_steps', 2, 'Untimed steps per contender before timing.')
flags.DEFINE_integer('timed_steps', 3, 'Timed steps per contender and repetition.')
flags.DEFINE_integer('repetitions', 3, 'Interleaved repetitions.')
flags.DEFINE_list('contenders', ['ft0', 'full'], f'Which of {sorted(CONTENDERS)} to time; the '
                  'ratios are against the last one.')
flags.DEFINE_integer('intra', 0, 'intra_op_parallelism_threads (0: TF default).')
flags.DEFINE_integer('inter', 0, 'inter_op_parallelism_threads (0: TF default).')


class Contender:
  """One training graph and its session, with the batch already in place."""

  def __init__(self, name, images, labels):
    fine_tune, classifier_id = CONTENDERS[name]
    self.name = name
    self.graph = tf.Graph()
    batch_size = images.shape[0]

    model = resnet_model.imagenet_model(FLAGS.resnet_size, 2, imagenet_main.NUM_CLASSES,
                                        'channels_last')
    schedule = imagenet_main.learning_rate_fn(
        types.SimpleNamespace(fine_tune=fine_tune, lr_schedule='step', warmup_epochs=None),
        batch_size)
    params = model_fn.RunParams(
        model=model, plan=model_fn.ExitPlan.parse(classifier_id, model.num_exits,
                                                         fine_tune),
        learning_rate_fn=schedule)
    with self.graph.as_default():
      # Outside the model scope and not trainable: no variable group, never updated.
      image_var = tf.Variable(tf.zeros(images.shape), trainable=False, name='bench_images')
      label_var = tf.Variable(tf.zeros(labels.shape, tf.int32), trainable=False,
                              name='bench_labels')
      spec = model_fn.resnet_model_fn(image_var, label_var, tf.estimator.ModeKeys.TRAIN,
                                             params)
      self.train_op = spec.train_op
      self.num_trainable = _trained_parameter_count()
      self.sess = tf.Session(config=tf.ConfigProto(
          intra_op_parallelism_threads=FLAGS.intra, inter_op_parallelism_threads=FLAGS.inter))
      self.sess.run(tf.global_variables_initializer())
      image_var.load(images, self.sess)
      label_var.load(labels, self.sess)
    self.step_seconds = []       # wall seconds per step, one entry per repetition
    self.step_cpu_seconds = []   # CPU seconds per step

  def steps(self, count):
    """Runs ``count`` steps; returns (wall seconds, CPU seconds of this process) per step."""
    start = time.perf_counter(), time.process_time()
    for _ in range(count):
      self.sess.run(self.train_op)
    end = time.perf_counter(), time.process_time()
    return tuple((b - a) / max(count, 1) for a, b in zip(start, end, strict=True))


def _trained_parameter_count():
  """Parameters the optimizer updates in the current graph: those with a Momentum slot."""
  names = {v.op.name for v in tf.global_variables()}
  return sum(int(np.prod(v.shape.as_list())) for v in tf.global_variables()
             if v.op.name + '/Momentum' in names)


def main(_):
  tf.get_logger().setLevel('ERROR')
  logging.set_verbosity(logging.WARNING)
  unknown = [c for c in FLAGS.contenders if c not in CONTENDERS]
  if unknown or len(FLAGS.contenders) < 2:
    raise ValueError(f'--contenders must name at least two of {sorted(CONTENDERS)}, '
                     f'got {FLAGS.contenders}')
  rng = np.random.default_rng(0)
  shape = (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3)
  images = np.clip(rng.normal(0.0, 60.0, shape), -125, 130).astype(np.float32)
  labels = rng.integers(1, imagenet_main.NUM_CLASSES, FLAGS.batch_size).astype(np.int32)
  contenders = []
  for name in FLAGS.contenders:
    start = time.perf_counter()
    contender = Contender(name, images, labels)
    contender.steps(FLAGS.warmup_steps)
    print(f'  {name}: built and warmed up in {time.perf_counter() - start:.0f} s, '
          f'{contender.num_trainable:,} trained parameters', flush=True)
    contenders.append(contender)
  for rep in range(FLAGS.repetitions):
    for contender in contenders:
      wall, cpu = contender.steps(FLAGS.timed_steps)
      contender.step_seconds.append(wall)
      contender.step_cpu_seconds.append(cpu)
      print(f'  repetition {rep + 1}: {contender.name}: {wall:.2f} s/step, {cpu:.2f} CPU-s/step',
            flush=True)
  baseline = statistics.median(contenders[-1].step_seconds)
  cpu_baseline = statistics.median(contenders[-1].step_cpu_seconds)
  print(f'\nResNet-{FLAGS.resnet_size} v2, {FLAGS.image_size}x{FLAGS.image_size}, batch '
        f'{FLAGS.batch_size}, CPU, train_op of resnet_model_fn in a tf.Session; medians of '
        f'{FLAGS.repetitions} interleaved repetitions of {FLAGS.timed_steps} steps after '
        f'{FLAGS.warmup_steps} warm-up steps')
  versus = 'vs ' + contenders[-1].name
  print(f'{"contender":<10} {"fine_tune":>9} {"clf":>4} {"s/step":>8} {"images/s":>9} '
        f'{versus:>9} {"best s":>7} {"CPU-s/step":>10} {versus:>9}')
  for contender in contenders:
    fine_tune, classifier_id = CONTENDERS[contender.name]
    seconds = statistics.median(contender.step_seconds)
    cpu = statistics.median(contender.step_cpu_seconds)
    print(f'{contender.name:<10} {str(fine_tune):>9} {classifier_id:>4} {seconds:8.2f} '
          f'{FLAGS.batch_size / seconds:9.1f} {seconds / baseline:9.3f} '
          f'{min(contender.step_seconds):7.2f} {cpu:10.2f} {cpu / cpu_baseline:9.3f}')
  first = statistics.median(contenders[0].step_seconds)
  first_cpu = statistics.median(contenders[0].step_cpu_seconds)
  print(f'ratio {contenders[0].name} / {contenders[-1].name} step time = {first / baseline:.3f} '
        f'wall, {first_cpu / cpu_baseline:.3f} CPU (target <= 0.35)')
  for contender in contenders:
    contender.sess.close()


if __name__ == '__main__':
  app.run(main)
