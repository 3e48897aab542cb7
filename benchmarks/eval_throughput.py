"""Evaluation throughput of our Estimator path versus Keras' ResNet50V2, on the CPU.

Both networks are ResNet-50 v2 with 1001 classes and random weights, fed the same synthetic
[batch, 224, 224, 3] float32 batch over and over (no input pipeline, no JPEG decoding):

* ours, Estimator: ``Estimator.predict`` with ``model_fn.resnet_model_fn`` and the ImageNet
  model factory of ``imagenet_main`` (classifier 2, channels_last, fp32), as ``imagenet_main``
  builds it for a softmax dump. Images/s are timed between the batches the prediction generator
  yields, after ``--warmup_batches``; building the graph and restoring the checkpoint (once per
  ``predict`` call) is reported separately as the call's fixed cost.
* ours, session: the same model function's PREDICT graph run in a plain ``tf.Session``, to
  separate the model's own speed from the Estimator's per-batch overhead.
* Keras: ``tf.keras.applications.ResNet50V2(weights=None, classes=1001).predict_on_batch`` in
  TensorFlow 2's default (eager, the predict step compiled by tf.function).

Keras runs in a worker process of its own (Keras models stop working in a process that has built
TF 1 layers); only one contender runs at a time. Repetitions are interleaved (ours, session,
Keras, ours, ...) because the machine is shared. The table gives medians of images per wall-clock
second and of images per CPU-second of the process running the model (less disturbed by other
jobs on a shared machine), and each network's multiply-accumulates per image: Keras' ResNet50V2
strides at the end of each stage instead of the start and does 15% fewer than the official
ResNet-50 v2 layout ours keeps for its checkpoints. All three use TensorFlow's default thread
pools unless --intra/--inter are given (then all three use them).

Usage::

    .venv/bin/python benchmarks/eval_throughput.py [--batch_size=32] [--timed_batches=6]
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_REPO]

import numpy as np  # noqa: E402
import tensorflow as tf2  # noqa: E402
import tensorflow.compat.v1 as tf  # noqa: E402

import imagenet_main  # noqa: E402
import model_fn  # noqa: E402
import resnet_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
flags.DEFINE_integer('image_size', 224, 'Side of the square images.')
flags.DEFINE_integer('resnet_size', 50, 'Depth of our ResNet (Keras is always ResNet-50).')
flags.DEFINE_integer('warmup_batches', 2, 'Untimed batches at the start of each repetition.')
flags.DEFINE_integer('timed_batches', 6, 'Timed batches per repetition.')
flags.DEFINE_integer('repetitions', 5, 'Interleaved repetitions of each contender.')
flags.DEFINE_integer('intra', 0, 'intra_op_parallelism_threads for all (0: TF default).')
flags.DEFINE_integer('inter', 0, 'inter_op_parallelism_threads for all (0: TF default).')
flags.DEFINE_boolean('keras_worker', False, 'Internal: run as the Keras worker process.')


def clock():
  """(wall seconds, CPU seconds of this process, all threads)."""
  return time.perf_counter(), time.process_time()


def model_fn_params():
  """The final classifier of ResNet-50 v2, as imagenet_main builds it for a dump."""
  model = resnet_model.imagenet_model(FLAGS.resnet_size, 2, imagenet_main.NUM_CLASSES,
                                      'channels_last')
  return model_fn.RunParams(model=model,
                                   plan=model_fn.ExitPlan.parse('2', model.num_exits))


def session_config():
  return tf.ConfigProto(intra_op_parallelism_threads=FLAGS.intra,
                        inter_op_parallelism_threads=FLAGS.inter)


def write_checkpoint(model_dir):
  """A random-weight checkpoint of our model, so predict restores as in a real dump."""
  with tf.Graph().as_default():
    model_fn.resnet_model_fn(
        tf.zeros([1, FLAGS.image_size, FLAGS.image_size, 3]), None,
        tf.estimator.ModeKeys.PREDICT, model_fn_params())
    step = tf.train.get_or_create_global_step()
    with tf.Session(config=session_config()) as sess:
      sess.run(tf.global_variables_initializer())
      tf.train.Saver().save(sess, os.path.join(model_dir, 'model.ckpt'), global_step=step)


def our_macs():
  """Multiply-accumulates per image of our network (resnet_model's count, pools included)."""
  return model_fn_params().model.plain_macs(FLAGS.image_size, FLAGS.image_size)


class Estimator:
  """ours, Estimator: one predict call per repetition."""
  name = 'ours, Estimator.predict'

  def __init__(self, batch, model_dir):
    self.batch = batch
    config = tf.estimator.RunConfig(session_config=session_config())
    self.estimator = tf.estimator.Estimator(model_fn.resnet_model_fn, model_dir=model_dir,
                                            config=config, params=model_fn_params())
    self.fixed_costs = []

  def run(self, warmup, timed):
    batch = self.batch

    def input_fn():
      return tf.data.Dataset.from_tensors(batch).repeat(warmup + timed)
    start = clock()
    stamps = [clock() for _ in self.estimator.predict(input_fn, yield_single_examples=False)]
    wall, cpu = (b - a for a, b in zip(stamps[warmup - 1], stamps[-1], strict=True))
    # Graph, session and restore, plus the first batch, less a steady batch.
    self.fixed_costs.append(stamps[0][0] - start[0] - wall / timed)
    return wall, cpu


class Session:
  """ours, session: the model function's PREDICT graph in a plain session."""
  name = 'ours, model_fn in tf.Session'

  def __init__(self, batch, model_dir):
    self.graph = tf.Graph()
    with self.graph.as_default():
      images = tf.Variable(tf.zeros(batch.shape), trainable=False)   # [batch, 224, 224, 3]
      spec = model_fn.resnet_model_fn(images, None, tf.estimator.ModeKeys.PREDICT,
                                             model_fn_params())
      self.fetch = spec.predictions['clf2_probabilities']
      self.sess = tf.Session(config=session_config())
      self.sess.run(tf.global_variables_initializer())
      images.load(batch, self.sess)
      saver = tf.train.Saver([v for v in tf.global_variables() if v is not images])
      saver.restore(self.sess, tf.train.latest_checkpoint(model_dir))

  def run(self, warmup, timed):
    for _ in range(warmup):
      self.sess.run(self.fetch)
    start = clock()
    for _ in range(timed):
      self.sess.run(self.fetch)
    return tuple(b - a for a, b in zip(start, clock(), strict=True))


class Keras:
  """Keras, in a worker process of its own.

  Keras models stop working once TF 1 layers have been built in a graph of the same process
  (the Estimator's), so the Keras model lives in a child process that waits for a command on
  stdin, runs it and reports the seconds on stdout; only one contender runs at a time.
  """
  name = 'Keras ResNet50V2.predict_on_batch'

  def __init__(self, batch, model_dir):
    del batch, model_dir
    argv = [sys.executable, os.path.abspath(__file__), '--keras_worker'] + [
        f'--{name}={getattr(FLAGS, name)}' for name in ('batch_size', 'image_size', 'intra',
                                                        'inter')]
    self.worker = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
    ready = self.worker.stdout.readline().split()
    if not ready or ready[0] != 'ready':
      raise RuntimeError('the Keras worker did not start')
    self.macs = int(ready[1])

  def run(self, warmup, timed):
    self.worker.stdin.write(f'{warmup} {timed}\n')
    self.worker.stdin.flush()
    wall, cpu = (float(v) for v in self.worker.stdout.readline().split())
    return wall, cpu

  def close(self):
    self.worker.stdin.close()
    self.worker.wait(timeout=60)


def keras_worker():
  """The Keras side: builds the model, then times ``warmup timed`` requests read from stdin."""
  model = tf2.keras.applications.ResNet50V2(
      weights=None, classes=imagenet_main.NUM_CLASSES,
      input_shape=(FLAGS.image_size, FLAGS.image_size, 3))
  batch = synthetic_batch()
  print(f'ready {keras_macs(model)}', flush=True)
  for line in sys.stdin:
    warmup, timed = (int(v) for v in line.split())
    for _ in range(warmup):
      model.predict_on_batch(batch)
    start = clock()
    for _ in range(timed):
      model.predict_on_batch(batch)
    wall, cpu = (b - a for a, b in zip(start, clock(), strict=True))
    print(wall, cpu, flush=True)


def keras_macs(model):
  """Multiply-accumulates per image of a Keras model's convolutions and dense layers."""
  total = 0
  for layer in model.layers:
    if isinstance(layer, tf2.keras.layers.Conv2D):
      kh, kw, c_in, c_out = layer.kernel.shape
      _, out_h, out_w, _ = layer.output_shape
      total += kh * kw * c_in * c_out * out_h * out_w
    elif isinstance(layer, tf2.keras.layers.Dense):
      total += layer.kernel.shape[0] * layer.kernel.shape[1]
  return int(total)


def synthetic_batch():
  """Mean-subtracted 0..255 pixels, as the ImageNet preprocessing produces: [b, s, s, 3]."""
  rng = np.random.default_rng(0)
  shape = (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3)
  return np.clip(rng.normal(0.0, 60.0, shape), -125, 130).astype(np.float32)


def main(_):
  if FLAGS.intra or FLAGS.inter:
    tf2.config.threading.set_intra_op_parallelism_threads(FLAGS.intra)
    tf2.config.threading.set_inter_op_parallelism_threads(FLAGS.inter)
  if FLAGS.warmup_batches < 1 or FLAGS.timed_batches < 1:
    raise ValueError('--warmup_batches and --timed_batches must be at least 1')
  if FLAGS.keras_worker:
    keras_worker()
    return
  tf.get_logger().setLevel('ERROR')
  logging.set_verbosity(logging.WARNING)
  batch = synthetic_batch()
  with tempfile.TemporaryDirectory() as model_dir:
    write_checkpoint(model_dir)
    contenders = [cls(batch, model_dir) for cls in (Estimator, Session, Keras)]
    rates = {c.name: [] for c in contenders}       # images per wall second
    cpu_rates = {c.name: [] for c in contenders}   # images per CPU second
    images = FLAGS.timed_batches * FLAGS.batch_size
    for rep in range(FLAGS.repetitions):
      for contender in contenders:
        wall, cpu = contender.run(FLAGS.warmup_batches, FLAGS.timed_batches)
        rates[contender.name].append(images / wall)
        cpu_rates[contender.name].append(images / cpu)
        print(f'  repetition {rep + 1}: {contender.name}: {images / wall:.1f} images/s, '
              f'{images / cpu:.1f} images per CPU-second', flush=True)
    contenders[-1].close()
  median = {name: statistics.median(r) for name, r in rates.items()}
  cpu_median = {name: statistics.median(r) for name, r in cpu_rates.items()}
  keras, cpu_keras = median[Keras.name], cpu_median[Keras.name]
  macs = {c.name: getattr(c, 'macs', None) or our_macs() for c in contenders}
  print(f'\nResNet-{FLAGS.resnet_size} v2 (Keras: ResNet-50 v2), {FLAGS.image_size}x'
        f'{FLAGS.image_size}, batch {FLAGS.batch_size}, 1001 classes, CPU, threads '
        f'intra={FLAGS.intra or "default"} inter={FLAGS.inter or "default"}; medians of '
        f'{FLAGS.repetitions} interleaved repetitions of {FLAGS.timed_batches} batches after '
        f'{FLAGS.warmup_batches} warm-up batches')
  print(f'{"contender":<34} {"images/s":>8} {"vs Keras":>8} {"best":>6} {"img/CPU-s":>9} '
        f'{"vs Keras":>8} {"GMAC/img":>8}')
  for name, rate in median.items():
    print(f'{name:<34} {rate:8.1f} {rate / keras:8.2f} {max(rates[name]):6.1f} '
          f'{cpu_median[name]:9.2f} {cpu_median[name] / cpu_keras:8.2f} {macs[name] / 1e9:8.3f}')
  print(f'Estimator.predict fixed cost per call (graph, session, restore): '
        f'{statistics.median(contenders[0].fixed_costs):.1f} s')
  print(f'ratio ours (Estimator) / Keras = {median[Estimator.name] / keras:.2f} images/s, '
        f'{cpu_median[Estimator.name] / cpu_keras:.2f} per CPU-second (target >= 1.0)')

if __name__ == '__main__':
  app.run(main)
