"""The quantised cascade for the edge: accuracy of each TFLite variant, and its batch-1 latency.

Two models, every variant of ``--variants`` (float32, dynamic_int8, int8) exported by
``tflite_export`` and run by ``cascade_predict.py``'s runner (ai-edge-litert, one interpreter,
``--num_threads`` XNNPACK threads, one image at a time):

* The demo model (Fashion-MNIST, CIFAR ResNet-8 v2): trained here as ``demo.py`` does (backbone
  and final classifier, then both heads on the frozen backbone; shorter) unless ``--model_dir``
  names a trained one, exported through ``cifar10_main.py --eval_only --export_tflite_dir`` (int8
  calibrated on the first ``--calibration_images`` training images). Each variant dumps its own
  softmax (all 10,000 test images, and the first ``--threshold_images`` training images to tune
  the thresholds on), the analysis picks its thresholds at ``--epsilon``, and the runner then
  classifies the test images with them. Reported: per-exit test top-1, cascade top-1 and MAC
  reduction, whether the runner took exactly the exits the analysis predicted, and the mean
  batch-1 latency of the cascade and of the plain network (a TFLite model of its own) over the
  test images.
* ResNet-50 v2 at 224x224 with random weights (BN statistics from one training-mode pass over
  synthetic images, so the activations keep ImageNet-like ranges), for latency: per-exit batch-1
  latency (the runner forced to leave at exit k), the plain network, and the cascade at the demo
  model's exit shares (sum over k of share_k x latency of exit k). The reference is the float32
  SavedModel cascade of ``cascade_export`` (the graph ``export_cascade`` writes, run in a
  session, chunk sizes 0 and 8) on the same machine, with TensorFlow's oneDNN setting as
  configured (the first line says which).

Timings are medians of blocks of calls interleaved across the models; as the machine may be
shared, the block with the least CPU use by other processes counts (its share is printed).
Targets: int8 per-exit top-1 within 1 pp of float32; int8 batch-1 cascade latency <= 0.5 x the
float32 SavedModel cascade's (the faster chunk size). The first line describes the machine, the
last one sums up::

    worst int8 per-exit top-1 drop vs float32: X pp; int8 / float32 batch-1 cascade latency: Y

    python benchmarks/tflite_cascade.py                                   # ~10 min on 2 cores
    python benchmarks/tflite_cascade.py --model_dir demo_output/model/cascade \\
        --data_dir demo_output/data
"""

import contextlib
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import tensorflow.compat.v1 as tf
from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import analyze_imagenet_labels  # noqa: E402
import cascade_export  # noqa: E402
import cascade_predict  # noqa: E402
import cifar10_main  # noqa: E402
import image_inputs  # noqa: E402
import imagenet_main  # noqa: E402
import prepare_fashion_mnist  # noqa: E402
import resnet_model  # noqa: E402
import tflite_export  # noqa: E402
from benchmarks import machine  # noqa: E402

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string('work_dir', '/tmp/tflite_cascade_benchmark', 'Data, models, exports, dumps '
                    'and logs go here.')
flags.DEFINE_string('data_dir', None, 'Fashion-MNIST in the CIFAR-10 binary format (default: '
                    '<work_dir>/data, written if missing).')
flags.DEFINE_string('model_dir', None, 'A trained demo model with both exit heads (e.g. '
                    'demo_output/model/cascade); default: train one into <work_dir>/model.')
flags.DEFINE_integer('train_epochs', 2, 'Epochs of the demo backbone and final classifier.')
flags.DEFINE_integer('head_epochs', 1, 'Epochs of the demo exit heads (frozen backbone).')
flags.DEFINE_list('variants', list(tflite_export.VARIANTS), 'TFLite variants to compare (float32 '
                  'and int8 are needed for the summary).')
flags.DEFINE_integer('calibration_images', 500, 'Demo int8: training images it is calibrated on.')
flags.DEFINE_integer('threshold_images', 10000, 'Demo: training images each variant dumps to '
                     'tune its thresholds on (0: all 60,000).', lower_bound=0)
flags.DEFINE_float('epsilon', 0.01, 'The epsilon of the reported cascades (a fraction).')
flags.DEFINE_integer('resnet50_calibration_images', 100, 'ResNet-50 int8: synthetic images it is '
                     'calibrated on (its accuracy is not measured).')
flags.DEFINE_integer('latency_images', 2000, 'Demo: the first this many test images time the '
                     'cascade and the plain network (a timing block is one pass over them).',
                     lower_bound=1)
flags.DEFINE_integer('num_threads', 2, 'TFLite interpreter threads.')
flags.DEFINE_integer('rounds', 8, 'Timing blocks per model and setting.')
flags.DEFINE_integer('reps', 10, 'Calls per timing block (ResNet-50).')
flags.DEFINE_integer('tries', 3, 'A timing block during which other processes used 5% of the '
                     'machine or more is repeated up to this many times in all.', lower_bound=1)
flags.DEFINE_boolean('resnet50', True, 'Measure ResNet-50 too.')

IMAGE_SHAPE = (cifar10_main.HEIGHT, cifar10_main.WIDTH, cifar10_main.NUM_CHANNELS)
RESNET50_SHAPE = (224, 224, 3)
# Forces the runner to leave at exit k: thresholds 0 take every image, 2.0 none (top-1).
FORCED_EXIT = {0: [0.0, 0.0], 1: [2.0, 0.0], 2: [2.0, 2.0]}
QUIET_LOAD = 0.05


def log(text=''):
  print(text, flush=True)


@contextlib.contextmanager
def stderr_to(path):
  """Sends this process's file descriptor 2 (the TFLite converter's C++ chatter) to a file."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, 'a') as f:
    os.dup2(f.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def run_step(name, argv, log_dir):
  """Runs ``python <argv>`` from the repository, its output into <log_dir>/<name>.log."""
  os.makedirs(log_dir, exist_ok=True)
  path = os.path.join(log_dir, f'{name}.log')
  log(f'$ python {" ".join(argv)}')
  start = time.time()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  with open(path, 'w') as out:
    result = subprocess.run([sys.executable] + argv, cwd=REPO_DIR, env=env, stdout=out,
                            stderr=subprocess.STDOUT, check=False)
  if result.returncode:
    with open(path) as f:
      tail = ''.join(f.readlines()[-15:])
    sys.exit(f'{tail}error: step {name} failed (exit code {result.returncode}); log: {path}')
  log(f'   {time.time() - start:.0f} s (log: {path})')


# -------------------------------------------------------------------------------------------------
# Timing on a shared machine.


def _busy_seconds():
  """CPU seconds every process of the machine has used so far (/proc/stat)."""
  with open('/proc/stat') as f:
    values = [int(v) for v in f.readline().split()[1:]]
  return (sum(values[:8]) - values[3] - values[4]) / os.sysconf('SC_CLK_TCK')


def _own_seconds():
  times = os.times()
  return times.user + times.system


def time_interleaved(calls, rounds, reps, warmup=3, tries=None):
  """Batch-1 latency of each call: (median ms, foreign CPU share) of its quietest block.

  Args:
    calls: name -> function of no arguments.
    rounds: blocks per call; the blocks of the calls alternate, so load changes hit all alike.
    reps: calls per block.
    warmup: untimed calls first.
    tries: a block during which other processes used QUIET_LOAD of the machine or more is
      repeated (after a pause) up to this many times in all (default --tries).

  Returns:
    name -> (median milliseconds, share of the machine other processes used meanwhile).
  """
  tries = FLAGS.tries if tries is None else tries
  for call in calls.values():
    for _ in range(warmup):
      call()

  def block(call):
    busy, own, start = _busy_seconds(), _own_seconds(), time.perf_counter()
    seconds = []
    for _ in range(reps):
      begin = time.perf_counter()
      call()
      seconds.append(time.perf_counter() - begin)
    wall = time.perf_counter() - start
    foreign = max(0.0, (_busy_seconds() - busy) - (_own_seconds() - own)) / (
        wall * os.cpu_count())
    return 1000 * statistics.median(seconds), foreign

  blocks = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      attempts = [block(call)]
      while attempts[-1][1] >= QUIET_LOAD and len(attempts) < tries:
        time.sleep(0.5)
        attempts.append(block(call))
      blocks[name].append(min(attempts, key=lambda b: b[1]))
  chosen = {}
  for name, found in blocks.items():
    quiet = [b for b in found if b[1] < QUIET_LOAD]
    chosen[name] = min(quiet) if quiet else min(found, key=lambda b: b[1])
  return chosen


# -------------------------------------------------------------------------------------------------
# Models.


def plain_tflite(checkpoint, model, image_shape, variants, calibration, folder):
  """The plain network (no exit heads) as TFLite models, one per variant: {variant: path}.

  ``calibration`` is the export's tflite_export.CalibrationImages (its stage-0 images, i.e. the
  same first training images, calibrate the int8 plain network).
  """
  saved_model = os.path.join(folder, 'plain_saved_model')
  with tf.Graph().as_default():
    images = tf.placeholder(tf.float32, [1] + list(image_shape))
    logits = model(images, training=False, exits=[model.final_exit])[model.final_exit]
    signature = tf.saved_model.signature_def_utils.predict_signature_def(
        inputs={tflite_export.INPUT_KEY: images}, outputs={tflite_export.LOGITS_KEY: logits})
    with tf.Session() as sess:
      tf.train.Saver().restore(sess, checkpoint)
      builder = tf.saved_model.Builder(saved_model)
      builder.add_meta_graph_and_variables(sess, [tf.saved_model.tag_constants.SERVING],
                                           signature_def_map={'plain': signature})
      builder.save()

  def representative():
    for key, inputs in calibration():
      if key == tflite_export.signature_key(0):
        yield 'plain', inputs

  paths = {}
  for variant in variants:
    content = tflite_export.convert(saved_model, ['plain'], variant,
                                    representative if variant == 'int8' else None)
    paths[variant] = os.path.join(folder, f'plain_{variant}.tflite')
    with open(paths[variant], 'wb') as f:
      f.write(content)
  return paths


class PlainTFLite:
  """The plain network's TFLite model in one interpreter: logits of one image."""

  def __init__(self, path, num_threads):
    interpreter, _ = cascade_predict.interpreter_class()
    self._interpreter = interpreter(model_path=path, num_threads=num_threads)
    self._interpreter.allocate_tensors()
    self._runner = self._interpreter.get_signature_runner('plain')

  def __call__(self, image):
    return cascade_predict.softmax(self._runner(input=image[None])['logits'])[0]


def tf_cascade_latency(model, checkpoint, image, rounds, reps, chunk_sizes=(0, 8)):
  """Batch-1 latency of the float32 SavedModel cascade's graph, per forced exit and plain.

  The graph is ``cascade_export.build_signatures``, as ``export_cascade`` writes it, with the
  thresholds fed, so one graph leaves at each exit in turn.

  Returns:
    {chunk: {'exit': [ms at exit 0, 1, 2], 'plain': ms, 'load': worst foreign share}}.
  """
  graph = tf.Graph()
  with graph.as_default():
    images = tf.placeholder(tf.float32, [None] + list(image.shape))
    thresholds = tf.placeholder(tf.float32, [model.num_exits - 1])
    model(images, training=False)   # Creates the variables the signatures reuse.
    signatures = {}
    with tf.variable_scope(tf.get_variable_scope(), reuse=True):
      for chunk in chunk_sizes:
        signatures[chunk] = cascade_export.build_signatures(model, images, thresholds, 'top1',
                                                            chunk)
    sess = tf.Session()
    tf.train.Saver().restore(sess, checkpoint)
  calls = {}
  for chunk, (cascade, full) in signatures.items():
    for exit_id, forced in FORCED_EXIT.items():
      feed = {images: image[None], thresholds: forced}
      fetch = [cascade['probabilities'], cascade['exit']]
      exits = sess.run(fetch, feed)[1]
      assert list(exits) == [exit_id], (exits, exit_id)
      calls[(chunk, exit_id)] = lambda fetch=fetch, feed=feed: sess.run(fetch, feed)
    calls[(chunk, 'plain')] = (lambda full=full, feed={images: image[None]}:
                               sess.run(full['probabilities'], feed))
  timed = time_interleaved(calls, rounds, reps)
  sess.close()
  return {chunk: {'exit': [timed[(chunk, k)][0] for k in FORCED_EXIT],
                  'plain': timed[(chunk, 'plain')][0],
                  'load': max(t[1] for key, t in timed.items() if key[0] == chunk)}
          for chunk in chunk_sizes}


def tflite_latency(stages, plain, image, rounds, reps):
  """Batch-1 latency of the TFLite runner per forced exit, and of the plain network's model."""
  calls = {k: (lambda forced=forced: stages.classify(image, forced, 'top1'))
           for k, forced in FORCED_EXIT.items()}
  for k, forced in FORCED_EXIT.items():
    assert stages.classify(image, forced, 'top1')[1] == k
  calls['plain'] = lambda: plain(image)
  timed = time_interleaved(calls, rounds, reps)
  return {'exit': [timed[k][0] for k in FORCED_EXIT], 'plain': timed['plain'][0],
          'load': max(t[1] for t in timed.values())}


def at_shares(per_exit_ms, shares):
  """Expected cascade latency when shares[k] of the images leave at exit k."""
  return float(np.dot(per_exit_ms, shares))


# -------------------------------------------------------------------------------------------------
# The demo model.


def demo_model(data_dir, work_dir):
  """The trained demo model's folder: --model_dir, or one trained like demo.py does."""
  if FLAGS.model_dir:
    return FLAGS.model_dir
  backbone_dir = os.path.join(work_dir, 'model', 'backbone')
  cascade_dir = os.path.join(work_dir, 'model', 'cascade')
  common = ['-dd', data_dir, '-rv', '2', '-rs', '8', '-bs', '128', '--num_gpus', '0',
            '--batch_norm_decay', '0.9', '--softmax_dir', '']
  logs = os.path.join(work_dir, 'logs')
  run_step('train_backbone', ['cifar10_main.py', '-md', backbone_dir] + common + [
      '--classifier_id', '2', '-te', str(FLAGS.train_epochs), '-ebe', str(FLAGS.train_epochs)],
      logs)
  run_step('train_heads', ['cifar10_main.py', '-md', cascade_dir, '-pmcp', backbone_dir] +
           common + ['--classifier_id', 'all', '--fine_tune', '-te', str(FLAGS.head_epochs)],
           logs)
  return cascade_dir


def demo(data_dir, work_dir, variants):
  """Exports, dumps, analyses and runs every variant of the demo model; returns its rows."""
  model_dir = demo_model(data_dir, work_dir)
  export_base = os.path.join(work_dir, 'exports', 'demo')
  run_step('export_demo', [
      'cifar10_main.py', '-dd', data_dir, '-md', model_dir, '-rv', '2', '-rs', '8', '-bs', '100',
      '--num_gpus', '0', '--eval_only', '--classifier_id', 'all', '--softmax_dir', '',
      '--export_tflite_dir', export_base, '--tflite_variants', ','.join(variants),
      '--tflite_calibration_images', str(FLAGS.calibration_images)], os.path.join(work_dir,
                                                                                  'logs'))
  export_dir = tflite_export.find_export(export_base)
  info = tflite_export.read_info(export_dir)
  log(f'export {export_dir}: calibration {info["calibration"]}')
  checkpoint = info['checkpoint']
  model = cifar10_main.Cifar10Model(8, 2, 'channels_last')
  calibration = tflite_export.CalibrationImages(
      lambda: cifar10_main.input_fn(False, data_dir, 100, split='train'),
      FLAGS.calibration_images, model, IMAGE_SHAPE, checkpoint)
  with stderr_to(os.path.join(work_dir, 'logs', 'convert_demo_plain.log')):
    plain_paths = plain_tflite(checkpoint, model, IMAGE_SHAPE, variants, calibration,
                               export_dir)
  calibration.close()
  test_images, test_labels = [], []
  for batch in image_inputs.data_batches(data_dir, 'validation', 500):
    test_images.append(batch.images)
    test_labels.append(batch.labels)
  test_images, test_labels = np.concatenate(test_images), np.concatenate(test_labels)
  rows, runners = {}, {}
  devnull = open(os.devnull, 'w')  # noqa: SIM115 -- kept for the run's printed tables
  for variant in variants:
    start = time.time()
    stages = cascade_predict.TFLiteStages(export_dir, variant, FLAGS.num_threads)
    softmax_dir = os.path.join(work_dir, 'softmax', os.path.basename(export_dir), variant)
    for split, limit in (('validation', None), ('train', FLAGS.threshold_images or None)):
      cascade_predict.dump_tflite(
          stages, lambda skip, split=split: image_inputs.data_batches(data_dir, split, 500,
                                                                         skip),
          softmax_dir, split, max_images=limit, out=devnull)
    report = analyze_imagenet_labels.run_analysis(
        softmax_dir, os.path.join(softmax_dir, 'report'), modes=('top1',),
        epsilons=[FLAGS.epsilon], show_progress=False, out=devnull)
    entry = report['top1'][0]
    batches = image_inputs.data_batches(data_dir, 'validation', 500)
    summary = cascade_predict.run_tflite(stages, batches, entry['thresholds'], 'top1',
                                         print_limit=0, out=devnull)
    # The runner's exits against the analysis' prediction on this variant's own dumps.
    probabilities = [np.load(os.path.join(softmax_dir, 'validation',
                                          f'clf{k}_probabilities.npy')) for k in range(3)]
    confidences = np.stack([analyze_imagenet_labels.confidence(p, 'top1')
                            for p in probabilities])
    predicted = analyze_imagenet_labels.cascade_exit_index(confidences, entry['thresholds'])
    runners[variant] = (stages, PlainTFLite(plain_paths[variant], FLAGS.num_threads),
                        entry['thresholds'])
    rows[variant] = {
        'bytes': info['variants'][variant]['bytes'],
        'exit_top1': [a['top1'] for a in report['exit_accuracy']['validation']],
        'cascade_top1': summary['accuracy'], 'offline_top1': entry['accuracy'],
        'mac_reduction': entry['mac_reduction'], 'shares': entry['exit_shares'],
        'runner_shares': summary['exit_shares'],
        'agrees': bool(np.array_equal(summary['exits'], predicted)),
        'latency_shares': (np.bincount(summary['exits'][:FLAGS.latency_images], minlength=3)
                           / min(FLAGS.latency_images, len(summary['exits']))).tolist(),
    }
    log(f'{variant}: dumps, thresholds and runs in {time.time() - start:.0f} s')
  devnull.close()
  # Latency: one block is one pass over the same images, for each model in turn.
  subset = test_images[:FLAGS.latency_images]
  calls = {}
  for variant, (stages, plain, thresholds) in runners.items():
    calls[(variant, 'cascade')] = (lambda stages=stages, thresholds=thresholds:
                                   [stages.classify(x, thresholds, 'top1') for x in subset])
    calls[(variant, 'plain')] = lambda plain=plain: [plain(x) for x in subset]
  timed = time_interleaved(calls, FLAGS.rounds, reps=1, warmup=1)
  for variant, row in rows.items():
    row['cascade_ms'] = timed[(variant, 'cascade')][0] / len(subset)
    row['plain_ms'] = timed[(variant, 'plain')][0] / len(subset)
    row['load'] = max(timed[(variant, kind)][1] for kind in ('cascade', 'plain'))
  return rows, export_dir, checkpoint, test_images


def print_demo(rows, tf_rows, num_images):
  log(f'\nDemo model, Fashion-MNIST test images ({num_images:,}), CIFAR ResNet-8 v2; cascade at '
      f'epsilon {FLAGS.epsilon:g} (top-1), thresholds from each variant\'s own dumps; batch-1 '
      f'latency: mean over the first {FLAGS.latency_images:,} test images')
  head = ('| model | size | top-1 exit 0 / 1 / 2 | vs float32 (pp) | cascade top-1 | MAC '
          'reduction | exit shares | runner = analysis | plain ms | cascade ms | other load |')
  log(head)
  log('|' + ' --- |' * (head.count('|') - 1))
  reference = rows.get('float32')
  for variant, row in rows.items():
    drops = ' / '.join(f'{100 * (a - r):+.2f}' for a, r in zip(
        row['exit_top1'], reference['exit_top1'], strict=True)) if reference else '-'
    log(f'| TFLite {variant} | {row["bytes"] / 1e6:.2f} MB | '
        + ' / '.join(f'{100 * a:.2f}%' for a in row['exit_top1'])
        + f' | {drops} | {100 * row["cascade_top1"]:.2f}% | {100 * row["mac_reduction"]:.1f}% | '
        + '/'.join(f'{s:.2f}' for s in row['runner_shares'])
        + f' | {"yes" if row["agrees"] else "NO"} | {row["plain_ms"]:.3f} | '
        f'{row["cascade_ms"]:.3f} | {row["load"]:.2f} |')
  for chunk, row in tf_rows.items():
    log(f'| TF SavedModel float32, chunk {chunk} | | | | | | | | {row["plain"]:.3f} | '
        f'{row["cascade"]:.3f} | {row["load"]:.2f} |')


# -------------------------------------------------------------------------------------------------
# ResNet-50.


def synthetic_images(count, shape, seed=0):
  """Smooth random colour images, mean-subtracted as imagenet_preprocessing does: [n, H, W, 3]."""
  rng = np.random.default_rng(seed)
  height, width, _ = shape
  means = np.array([123.68, 116.78, 103.94], np.float32)
  images = np.empty((count,) + tuple(shape), np.float32)
  for i in range(count):
    coarse = np.kron(rng.uniform(0, 255, (height // 16, width // 16, 3)), np.ones((16, 16, 1)))
    middle = np.kron(rng.normal(0, 30, (height // 4, width // 4, 3)), np.ones((4, 4, 1)))
    image = coarse + middle + rng.normal(0, 10, shape)
    images[i] = np.clip(image, 0, 255) - means
  return images


def resnet50_checkpoint(prefix, images):
  """Random ResNet-50 v2 weights with every exit; BN statistics of one training-mode pass."""
  if tf.train.checkpoint_exists(prefix):
    return prefix
  model = resnet_model.imagenet_model(50, 2, imagenet_main.NUM_CLASSES, 'channels_last',
                                      batch_norm_decay=0.0)
  with tf.Graph().as_default():
    tf.set_random_seed(0)
    inputs = tf.placeholder(tf.float32, [None] + list(RESNET50_SHAPE))
    model(inputs, training=True)
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      # Decay 0: every BN's moving statistics become those of these images' activations.
      sess.run(tf.get_collection(tf.GraphKeys.UPDATE_OPS), {inputs: images[:16]})
      return tf.train.Saver().save(sess, prefix)


def resnet50(work_dir, variants, demo_rows):
  """Latency of every variant and of the SavedModel cascade; returns (rows, tf rows)."""
  folder = os.path.join(work_dir, 'resnet50')
  images = synthetic_images(max(FLAGS.resnet50_calibration_images, 16), RESNET50_SHAPE)
  checkpoint = resnet50_checkpoint(os.path.join(folder, 'model.ckpt'), images)

  def factory(data_format, dtype):
    return resnet_model.imagenet_model(50, 2, imagenet_main.NUM_CLASSES, data_format, dtype)

  def calibration_input_fn():
    count = FLAGS.resnet50_calibration_images
    return tf.data.Dataset.from_tensor_slices(
        (images[:count], np.zeros(count, np.int32))).batch(25)

  model = factory('channels_last', tf.float32)
  start = time.time()
  with stderr_to(os.path.join(work_dir, 'logs', 'convert_resnet50.log')):
    export_dir = tflite_export.export_stages(
        checkpoint, factory, RESNET50_SHAPE, os.path.join(work_dir, 'exports', 'resnet50'),
        'ImageNet', calibration_input_fn, FLAGS.resnet50_calibration_images, variants)
    calibration = tflite_export.CalibrationImages(
        calibration_input_fn, FLAGS.resnet50_calibration_images, model, RESNET50_SHAPE,
        checkpoint)
    plain_paths = plain_tflite(checkpoint, model, RESNET50_SHAPE, variants, calibration,
                               export_dir)
    calibration.close()
  log(f'\nResNet-50 exported ({", ".join(variants)}, plain networks too) in '
      f'{time.time() - start:.0f} s: {export_dir}')
  info = tflite_export.read_info(export_dir)
  image = images[0]
  rows = {}
  for variant in variants:
    stages = cascade_predict.TFLiteStages(export_dir, variant, FLAGS.num_threads)
    plain = PlainTFLite(plain_paths[variant], FLAGS.num_threads)
    rows[variant] = tflite_latency(stages, plain, image, FLAGS.rounds, FLAGS.reps)
    rows[variant]['bytes'] = info['variants'][variant]['bytes']
    rows[variant]['shares'] = demo_rows[variant]['runner_shares']
    rows[variant]['cascade'] = at_shares(rows[variant]['exit'], rows[variant]['shares'])
    del stages, plain
  tf_rows = tf_cascade_latency(model, checkpoint, image, FLAGS.rounds, FLAGS.reps)
  variables = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                  if '.data-' in f)
  for row in tf_rows.values():
    # The float SavedModel cascade leaves where the float model does: float32's demo shares.
    row['shares'] = demo_rows['float32']['runner_shares']
    row['cascade'] = at_shares(row['exit'], row['shares'])
    row['bytes'] = variables
  return rows, tf_rows


def print_resnet50(rows, tf_rows, reference):
  log('\nResNet-50 v2, 224x224, random weights, batch 1 (ms); cascade at the demo model\'s exit '
      'shares; "vs SavedModel": cascade latency / the float32 SavedModel cascade\'s (chunk '
      f'{reference[0]}: {reference[1]:.1f} ms)')
  head = ('| model | size | exit 0 | exit 1 | exit 2 | plain | exit shares | cascade | vs '
          'SavedModel | other load |')
  log(head)
  log('|' + ' --- |' * (head.count('|') - 1))
  named = [(f'TFLite {v}', r) for v, r in rows.items()] + [
      (f'TF SavedModel float32, chunk {c}', r) for c, r in tf_rows.items()]
  for name, row in named:
    log(f'| {name} | {row["bytes"] / 1e6:.1f} MB | '
        + ' | '.join(f'{ms:.2f}' for ms in row['exit'])
        + f' | {row["plain"]:.2f} | ' + '/'.join(f'{s:.2f}' for s in row['shares'])
        + f' | {row["cascade"]:.2f} | {row["cascade"] / reference[1]:.3f} | '
        f'{row.get("load", 0):.2f} |')


def main(_):
  total = time.time()
  # The tables are the output: no progress logs or tf.layers deprecation warnings between them.
  logging.set_verbosity(logging.WARNING)
  tf.get_logger().setLevel('ERROR')
  warnings.filterwarnings('ignore', category=UserWarning)
  log(machine.describe())
  variants = tflite_export.check_variants(FLAGS.variants)
  if not {'float32', 'int8'} <= set(variants):
    sys.exit('error: --variants must include float32 and int8 (the summary compares them)')
  work_dir = FLAGS.work_dir
  os.makedirs(os.path.join(work_dir, 'logs'), exist_ok=True)
  data_dir = FLAGS.data_dir or os.path.join(work_dir, 'data')
  if not FLAGS.data_dir:
    prepare_fashion_mnist.prepare(data_dir)
  rows, _, checkpoint, test_images = demo(data_dir, work_dir, variants)
  demo_tf = tf_cascade_latency(cifar10_main.Cifar10Model(8, 2, 'channels_last'), checkpoint,
                               test_images[0], FLAGS.rounds, 200)
  for row in demo_tf.values():
    row['cascade'] = at_shares(row['exit'], rows['float32']['latency_shares'])
  print_demo(rows, demo_tf, len(test_images))
  drops = [100 * (r - a) for a, r in zip(rows['int8']['exit_top1'], rows['float32']['exit_top1'],
                                         strict=True)]
  ratio_text = 'not measured (--noresnet50)'
  if FLAGS.resnet50:
    r50, r50_tf = resnet50(work_dir, variants, rows)
    reference = min(((c, r['cascade']) for c, r in r50_tf.items()), key=lambda x: x[1])
    print_resnet50(r50, r50_tf, reference)
    ratio_text = f'{r50["int8"]["cascade"] / reference[1]:.3f}'
  log(f'\nint8 calibration: the first {FLAGS.calibration_images} Fashion-MNIST training images '
      f'(demo); TFLite runtime {cascade_predict.interpreter_class()[1]}, {FLAGS.num_threads} '
      f'threads; total {(time.time() - total) / 60:.1f} min')
  log(f'worst int8 per-exit top-1 drop vs float32: {max(drops):.2f} pp; int8 / float32 batch-1 '
      f'cascade latency: {ratio_text}')


if __name__ == '__main__':
  app.run(main)
