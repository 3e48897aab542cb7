"""bfloat16 against float32 evaluation on the CPU: ResNet-50 v2 images/s and how far bf16 is off.

Role: benchmark. ResNet-50 v2 (1001 classes, random weights, 224x224, channels_last) evaluated
in fp32 and in bf16 compute (`--dtype bf16`: the same fp32 variables, cast on read), on the
same unit-normal images (unit scale keeps the random network's softmax unsaturated):

(a) Estimator path, as benchmarks/eval_throughput.py times it: ``Estimator.predict`` with
    ``model_fn.resnet_model_fn`` (classifier 2, as a softmax dump builds it) restoring one
    random-weight checkpoint; images/s between the batches the generator yields, after
    --warmup_batches, one predict call per repetition.
(b) The exported cascade's graph (``cascade_export.build_signatures``, in chunks of
    --chunk_size as the SavedModel runs): the plain network (its `full` signature), the cascade
    with no early exit, and the cascade at demo-like exit shares (--shares: those of the
    Fashion-MNIST demo's cascade at epsilon 1% and 5%). Each dtype's thresholds are searched on
    its own cascade so that both take the same shares and the times compare; the differences
    are those of bf16 run with fp32's thresholds.

fp32 and bf16 alternate within each repetition (the machine is shared); the tables give medians
of images per wall-clock second and per CPU-second of this process, the bf16 speedup (fp32 time
/ bf16 time), the largest absolute difference of the probabilities between bf16 and fp32 (the
final exit's; at the demo-like shares, those of the exit each image took), and the shares of
images whose top-1 class or exit differs. Random weights leave the softmax nearly flat (the
largest probability is a few percent), so close logits swap places easily: with
--trained_model_dir, (c) compares fp32 and bf16 evaluation of a trained CIFAR cascade (the
demo's) on its test images, which says what bf16 does to real answers. The first line names the
CPU, its AVX512_BF16 / AMX support and whether oneDNN runs; run once with TensorFlow's default and
once with it forced off (2 and 3.5 minutes on the 2-core development machine):

    python benchmarks/bf16_speed.py
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/bf16_speed.py
    python benchmarks/bf16_speed.py --trained_model_dir demo_output/model/cascade \
        --data_dir demo_output/data --json bf16.json
    python benchmarks/bf16_speed.py --batch_size 8 --reps 3 --estimator_reps 2
"""

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import tensorflow.compat.v1 as tf  # noqa: E402

import cascade_export  # noqa: E402
import imagenet_main  # noqa: E402
import model_fn  # noqa: E402
import resnet_model  # noqa: E402
from benchmarks import machine  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('resnet_size', 50, 'ImageNet ResNet depth.')
flags.DEFINE_integer('image_size', 224, 'Image side (a multiple of 32).')
flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
flags.DEFINE_integer('chunk_size', None, 'Chunk size of the exported graph (0: the whole batch '
                     'at once); default: what an export on this machine uses.')
flags.DEFINE_integer('reps', 7, 'Timed calls per graph and dtype in part (b).')
flags.DEFINE_integer('estimator_reps', 5, 'Predict calls per dtype in part (a).')
flags.DEFINE_integer('warmup_batches', 1, 'Untimed batches at the start of each predict call.')
flags.DEFINE_integer('timed_batches', 4, 'Timed batches per predict call.')
# The exit shares of the Fashion-MNIST demo's cascade (benchmarks/recipe_cascade.py, baseline)
# at epsilon 1% (0.45/0.10/0.45) and 5% (0.73/0.11/0.16), top-1.
flags.DEFINE_list('shares', ['0.45:0.19', '0.73:0.42'], 'Demo-like settings: share of the images '
                  'leaving at exit 0 : share of the rest leaving at exit 1.')
flags.DEFINE_string('trained_model_dir', None, 'Also compare fp32 and bf16 evaluation of a trained '
                    'CIFAR cascade, e.g. demo_output/model/cascade (random weights leave the '
                    'softmax nearly flat, so their differences say little about a trained one).')
flags.DEFINE_string('data_dir', None, 'CIFAR-format data of --trained_model_dir (its test images '
                    'are used), e.g. demo_output/data.')
flags.DEFINE_integer('trained_resnet_size', 8, 'CIFAR ResNet depth of --trained_model_dir.')
flags.DEFINE_string('json', None, 'Also write the results here.')

DTYPES = {'fp32': tf.float32, 'bf16': tf.bfloat16}


def clock():
  """(wall seconds, CPU seconds of this process, all threads)."""
  return time.perf_counter(), time.process_time()


def bf16_hardware():
  """What the CPU offers bfloat16, from /proc/cpuinfo (machine.cpu_model)."""
  _, features = machine.cpu_model()
  amx, avx = 'amx_bf16' in features, 'avx512_bf16' in features
  if amx:
    what = 'AMX (bf16 tile matrix multiplies) and ' + ('AVX512_BF16' if avx else 'no AVX512_BF16')
  elif avx:
    what = 'AVX512_BF16 (bf16 dot products in AVX-512 registers), no AMX'
  else:
    what = 'neither AVX512_BF16 nor AMX: bf16 is converted to fp32 in software'
  return f'bf16 hardware: {what}'


def load():
  return '{:.2f} (1-min load average, {} cores)'.format(os.getloadavg()[0], os.cpu_count())


def unit_batch():
  rng = np.random.default_rng(0)
  shape = (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3)
  return rng.normal(0.0, 1.0, shape).astype(np.float32)


def imagenet_model(dtype):
  return resnet_model.imagenet_model(FLAGS.resnet_size, 2, imagenet_main.NUM_CLASSES,
                                     'channels_last', dtype)


def model_fn_params(dtype):
  model = imagenet_model(dtype)
  return model_fn.RunParams(model=model, plan=model_fn.ExitPlan.parse('2', model.num_exits))


def write_checkpoint(model_dir):
  """One random-weight checkpoint (fp32 variables) that both dtypes restore."""
  with tf.Graph().as_default():
    model_fn.resnet_model_fn(tf.zeros([1, FLAGS.image_size, FLAGS.image_size, 3]), None,
                                    tf.estimator.ModeKeys.PREDICT, model_fn_params(tf.float32))
    step = tf.train.get_or_create_global_step()
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      tf.train.Saver().save(sess, os.path.join(model_dir, 'model.ckpt'), global_step=step)


def estimator_path(batch, model_dir):
  """Part (a): {dtype: {'rates', 'cpu_rates', 'fixed', 'probabilities'}}."""
  estimators = {name: tf.estimator.Estimator(model_fn.resnet_model_fn,
                                             model_dir=model_dir, params=model_fn_params(dtype))
                for name, dtype in DTYPES.items()}
  warmup, timed = FLAGS.warmup_batches, FLAGS.timed_batches
  results = {name: {'rates': [], 'cpu_rates': [], 'fixed': []} for name in DTYPES}

  def input_fn():
    return tf.data.Dataset.from_tensors(batch).repeat(warmup + timed)
  for rep in range(FLAGS.estimator_reps):
    for name, estimator in estimators.items():
      start, stamps, first = clock(), [], None
      for prediction in estimator.predict(input_fn, yield_single_examples=False):
        stamps.append(clock())
        if first is None:
          first = prediction['clf2_probabilities']
      wall, cpu = (b - a for a, b in zip(stamps[warmup - 1], stamps[-1], strict=True))
      images = timed * FLAGS.batch_size
      entry = results[name]
      entry['rates'].append(images / wall)
      entry['cpu_rates'].append(images / cpu)
      entry['fixed'].append(stamps[0][0] - start[0] - wall / timed)
      entry['probabilities'] = first
      print(f'  (a) repetition {rep + 1}, {name}: {images / wall:.1f} images/s', flush=True)
  return results


def _bisect(count, low, high, target, steps=30):
  """A threshold in [low, high] at which ``count(threshold)`` (non-increasing) equals target."""
  for _ in range(steps):
    middle = (low + high) / 2
    found = count(middle)
    if found == target:
      return middle
    low, high = (middle, high) if found > target else (low, middle)
  return (low + high) / 2


def tune_thresholds(exits_taken, conf0, conf1, share0, share1):
  """Thresholds at which the cascade itself sends ``share0`` of the images out at exit 0 and
  ``share1`` of the rest at exit 1.

  The random weights give no meaningful thresholds, and their confidences lie so close together
  that bf16 rounding (which differs between the cascade's chunked graph and any other) reorders
  them: so each dtype's thresholds are searched on its own cascade, starting from the quantiles
  of ``conf0`` and ``conf1`` (the model's confidences on the whole batch).
  """
  n = conf0.size
  target0 = round(share0 * n)
  # Exit 0's count does not depend on t1; t1 = -1 sends every other image out at exit 1 (fast).
  t0 = _bisect(lambda t: int(np.sum(exits_taken([t, -1.0]) == 0)), float(conf0.min()) - 1e-3,
               float(conf0.max()) + 1e-3, target0)
  target1 = round(share1 * (n - target0))
  t1 = _bisect(lambda t: int(np.sum(exits_taken([t0, t]) == 1)), float(conf1.min()) - 1e-3,
               float(conf1.max()) + 1e-3, target1)
  return [t0, t1]


def cascade_graph(batch):
  """Part (b): times the plain network and the cascade in both dtypes on the same weights."""
  size = FLAGS.image_size
  graph = tf.Graph()
  with graph.as_default():
    images = tf.placeholder(tf.float32, [None, size, size, 3])
    thresholds = tf.placeholder(tf.float32, [2])
    models = {name: imagenet_model(dtype) for name, dtype in DTYPES.items()}
    signatures = {'fp32': cascade_export.build_signatures(models['fp32'], images, thresholds,
                                                          'top1', FLAGS.chunk_size)}
    with tf.variable_scope(tf.get_variable_scope(), reuse=True):
      # The bf16 model reads the same fp32 variables, cast on read.
      signatures['bf16'] = cascade_export.build_signatures(models['bf16'], images, thresholds,
                                                           'top1', FLAGS.chunk_size)
      confidences = {}
      for name, model in models.items():
        every_exit = model(images, training=False)
        confidences[name] = [cascade_export.confidence(
            tf.nn.softmax(tf.cast(every_exit[k], tf.float32)), 'top1') for k in (0, 1)]
    sess = tf.Session()
    sess.run(tf.global_variables_initializer())
  never = [2.0, 2.0]
  settings = [('plain network (full)', 1, {name: never for name in DTYPES}),
              ('cascade, no early exit', 0, {name: never for name in DTYPES})]
  measured = sess.run(confidences, {images: batch})
  for item in FLAGS.shares:
    share0, share1 = (float(s) for s in item.split(':'))
    tuned = {}
    for name in DTYPES:
      def exits_taken(pair, name=name):
        return sess.run(signatures[name][0]['exit'], {images: batch, thresholds: pair})
      tuned[name] = tune_thresholds(exits_taken, *measured[name], share0, share1)
    settings.append((f'cascade, shares {item}', 0, tuned))
  rows = []
  for label, signature, setting_thresholds in settings:
    feeds = {name: {images: batch, thresholds: setting_thresholds[name]} for name in DTYPES}
    fetches = {name: [signatures[name][signature]['probabilities'],
                      signatures[name][signature]['exit']] for name in DTYPES}
    outputs = {name: sess.run(fetches[name], feeds[name]) for name in DTYPES}   # warm-up
    # What bf16 does with fp32's thresholds: the images whose exit or answer changes.
    same = sess.run(fetches['bf16'], feeds['fp32'])
    times = {name: {'wall': [], 'cpu': []} for name in DTYPES}
    for _ in range(FLAGS.reps):
      for name in DTYPES:
        start = clock()
        sess.run(fetches[name], feeds[name])
        wall, cpu = (b - a for a, b in zip(start, clock(), strict=True))
        times[name]['wall'].append(wall)
        times[name]['cpu'].append(cpu)
    shares = {name: (np.bincount(outputs[name][1], minlength=3) / len(batch)).tolist()
              for name in DTYPES}
    reference = outputs['fp32']
    row = {'graph': label, 'exit_shares': shares,
           'thresholds': {n: [float(t) for t in v] for n, v in setting_thresholds.items()},
           'exit_differs': float(np.mean(reference[1] != same[1])),
           'top1_differs': float(np.mean(reference[0].argmax(1) != same[0].argmax(1))),
           'max_abs_probability_difference': float(np.abs(reference[0] - same[0]).max()),
           # The scale of the difference: the random network's largest probability.
           'max_probability': float(reference[0].max())}
    for name in DTYPES:
      row[f'{name}_ms'] = 1000 * statistics.median(times[name]['wall'])
      row[f'{name}_images_per_s'] = len(batch) / statistics.median(times[name]['wall'])
      row[f'{name}_images_per_cpu_s'] = len(batch) / statistics.median(times[name]['cpu'])
    rows.append(row)
    print('  (b) {}: fp32 {:.0f} ms, bf16 {:.0f} ms'.format(label, row['fp32_ms'],
                                                          row['bf16_ms']), flush=True)
  sess.close()
  return rows


def trained_difference(model_dir, data_dir):
  """fp32 against bf16 evaluation of a trained CIFAR cascade (v2) on every test image.

  Returns:
    One dict per exit: both top-1 accuracies, the share of images whose class differs and the
    largest absolute probability difference.
  """
  import cifar10_main
  with tf.Graph().as_default():
    images, labels = tf.data.make_one_shot_iterator(
        cifar10_main.input_fn(False, data_dir, 500)).get_next()
    probabilities = {}
    for name, dtype in DTYPES.items():
      model = cifar10_main.Cifar10Model(FLAGS.trained_resnet_size, 2, 'channels_last', dtype)
      with tf.variable_scope(tf.get_variable_scope(), reuse=name != 'fp32'):
        logits = model(tf.cast(images, dtype), training=False)
      probabilities[name] = {k: tf.nn.softmax(tf.cast(v, tf.float32)) for k, v in logits.items()}
    with tf.Session() as sess:
      tf.train.Saver().restore(sess, tf.train.latest_checkpoint(model_dir))
      batches = []
      while True:
        try:
          batches.append(sess.run([probabilities, labels]))
        except tf.errors.OutOfRangeError:
          break
  truth = np.concatenate([b[1] for b in batches])
  rows = []
  for k in sorted(batches[0][0]['fp32']):
    p = {name: np.concatenate([b[0][name][k] for b in batches]) for name in DTYPES}
    rows.append({'exit': k, 'images': int(truth.size),
                 **{f'{name}_top1': float(np.mean(p[name].argmax(1) == truth)) for name in DTYPES},
                 'class_differs': float(np.mean(p['fp32'].argmax(1) != p['bf16'].argmax(1))),
                 'max_abs_probability_difference': float(np.abs(p['fp32'] - p['bf16']).max())})
  return rows


def main(_):
  if FLAGS.trained_model_dir and not FLAGS.data_dir:
    sys.exit('--trained_model_dir needs --data_dir, the CIFAR-format data it was trained on')
  tf.disable_eager_execution()
  tf.get_logger().setLevel('ERROR')
  logging.set_verbosity(logging.WARNING)
  if FLAGS.chunk_size is None:
    FLAGS.chunk_size = cascade_export.default_chunk_size()
  header = machine.describe()
  print(header)
  print(bf16_hardware())
  print(f'load at start: {load()}', flush=True)
  start = time.time()
  batch = unit_batch()
  with tempfile.TemporaryDirectory() as model_dir:
    write_checkpoint(model_dir)
    estimator = estimator_path(batch, model_dir)
  rows = cascade_graph(batch)
  difference_a = float(np.abs(estimator['fp32']['probabilities'] -
                              estimator['bf16']['probabilities']).max())
  top1_a = float(np.mean(estimator['fp32']['probabilities'].argmax(1) !=
                         estimator['bf16']['probabilities'].argmax(1)))
  scale_a = float(estimator['fp32']['probabilities'].max())

  print(f'\n{header}\n{bf16_hardware()}')
  print(f'ResNet-{FLAGS.resnet_size} v2, {FLAGS.image_size}x{FLAGS.image_size}, batch '
        f'{FLAGS.batch_size}, random weights, unit-normal images; medians')
  print(f'\n(a) Estimator.predict, final classifier ({FLAGS.estimator_reps} calls per dtype, '
        f'{FLAGS.timed_batches} timed batches after {FLAGS.warmup_batches})')
  print(f'{"dtype":<6} {"images/s":>9} {"img/CPU-s":>10} {"fixed s":>8}')
  for name, entry in estimator.items():
    print(f'{name:<6} {statistics.median(entry["rates"]):9.1f} '
          f'{statistics.median(entry["cpu_rates"]):10.2f} {statistics.median(entry["fixed"]):8.1f}')
  ratio_a = statistics.median(estimator['bf16']['rates']) / statistics.median(
      estimator['fp32']['rates'])
  print(f'bf16 speedup {ratio_a:.2f}; largest |p_bf16 - p_fp32| of the final exit '
        f'{difference_a:.2e} (largest fp32 probability {scale_a:.4f}), top-1 differs on '
        f'{top1_a:.1%} of the images')
  chunk = FLAGS.chunk_size or 'the whole batch'
  print(f'\n(b) exported cascade graph, chunks of {chunk} ({FLAGS.reps} calls per dtype)')
  print(f'{"graph":<27} {"exit shares (fp32 | bf16)":<29} {"fp32 ms":>8} {"bf16 ms":>8} '
        f'{"speedup":>8} {"max |dp|":>9} {"max p":>7} {"top-1 differs":>13} {"exit differs":>12}')
  for row in rows:
    shares = ' | '.join('/'.join(f'{s:.2f}' for s in row['exit_shares'][n]) for n in DTYPES)
    print(f'{row["graph"]:<27} {shares:<29} {row["fp32_ms"]:8.0f} {row["bf16_ms"]:8.0f} '
          f'{row["fp32_ms"] / row["bf16_ms"]:8.2f} {row["max_abs_probability_difference"]:9.2e} '
          f'{row["max_probability"]:7.4f} {row["top1_differs"]:13.1%} {row["exit_differs"]:12.1%}')
  trained = None
  if FLAGS.trained_model_dir:
    trained = trained_difference(FLAGS.trained_model_dir, FLAGS.data_dir)
    print(f'\n(c) trained CIFAR ResNet-{FLAGS.trained_resnet_size} v2 cascade '
          f'{FLAGS.trained_model_dir}, {trained[0]["images"]} test images')
    print(f'{"exit":<5} {"fp32 top-1":>10} {"bf16 top-1":>10} {"class differs":>13} '
          f'{"max |dp|":>9}')
    for row in trained:
      print(f'{row["exit"]:<5} {row["fp32_top1"]:10.2%} {row["bf16_top1"]:10.2%} '
            f'{row["class_differs"]:13.2%} {row["max_abs_probability_difference"]:9.2e}')
  print(f'\n{time.time() - start:.0f} s in all; load at the end: {load()}')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': header, 'bf16_hardware': bf16_hardware(),
                 'onednn': cascade_export.onednn_enabled(), 'batch_size': FLAGS.batch_size,
                 'estimator': {n: {k: v for k, v in e.items() if k != 'probabilities'}
                               for n, e in estimator.items()},
                 'estimator_max_abs_probability_difference': difference_a,
                 'estimator_top1_differs': top1_a, 'cascade_graph': rows, 'trained': trained,
                 'seconds': time.time() - start, 'load_at_end': os.getloadavg()[0]}, f,
                indent=1)


if __name__ == '__main__':
  app.run(main)
