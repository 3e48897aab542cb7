"""Measured wall-clock speedup of the real early-exit cascade over the plain network, on a CPU.

For each batch size and each threshold setting, the cascade graph (``cascade_export``) and the
plain network (same variables) classify the same batch, alternately, and the median times are
compared with the speedup the MAC counts predict for the exit shares that actually occurred:

    predicted = plain_macs / mean over images of (MACs up to the exit taken)

The weights are random, so the thresholds of each setting are placed at quantiles of the exit
confidences measured on the batch itself, to make a chosen share of images leave at exits 0 and 1
('none' never exits early, 'all' sends every image out at exit 0). Targets: measured >= 0.9 x
predicted at batch 32 and 256; with no early exit, the cascade takes at most 1.03 x the plain
network's time.

Both models run at each chunk size of --chunk_sizes: 0 classifies the whole batch at once, N > 0
in consecutive chunks of N images, as the exported SavedModel does by default (cascade_export).
The first line names the CPU and whether TensorFlow's oneDNN kernels ran (TF_ENABLE_ONEDNN_OPTS=1
or 0 forces either); the last line sums up the targets.

    python benchmarks/cascade_speedup.py                      # ResNet-50 v2, 224x224
    python benchmarks/cascade_speedup.py --image_size 128 --reps 3
"""

import os
import statistics
import sys
import time

import numpy as np
import tensorflow.compat.v1 as tf
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import cascade_export  # noqa: E402
import imagenet_main  # noqa: E402
import resnet_model  # noqa: E402
from benchmarks import machine  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('resnet_size', 50, 'ImageNet ResNet depth.')
flags.DEFINE_integer('image_size', 224, 'Image side (a multiple of 32).')
flags.DEFINE_list('batch_sizes', ['1', '32', '256'], 'Batch sizes to measure.')
flags.DEFINE_integer('reps', 5, 'Timed calls per model, setting and batch size (batch 1: x10).')
flags.DEFINE_list('chunk_sizes', ['0', str(cascade_export.CPU_CHUNK_SIZE)],
                  'Chunk sizes of both models (0: the whole batch at once).')
flags.DEFINE_string('settings', 'none:0:0,all:1:0,quarter:0.25:0.25,half:0.5:0.2,most:0.7:0.2',
                    'name:share leaving at exit 0:share of the rest leaving at exit 1, ...')


def summary(rows):
  """The closing line: worst measured / predicted at batch 32 and 256, no-exit overheads.

  Settings where images leave at several exits ('quarter', 'half', 'most') and the one where
  every image leaves at exit 0 ('all': only stage 0 runs, so the ratio is that stage's cost per
  MAC against the whole network's) are reported apart, each at its best chunk size.
  """
  parts = []
  for label, names in (('mixed exits', ('quarter', 'half', 'most')),
                       ('every image at exit 0', ('all',))):
    chosen = [r for r in rows if r['batch'] in (32, 256) and r['name'] in names]
    if not chosen:
      continue
    by_chunk = {}
    for r in chosen:
      by_chunk.setdefault(r['chunk'], []).append(r['ratio'])
    chunk, ratios = max(by_chunk.items(), key=lambda item: min(item[1]))
    parts.append('worst measured/predicted at batch 32 and 256, {}: {:.3f} at chunk {} '
                 '(target >= 0.9)'.format(label, min(ratios), chunk or 'whole'))
  overheads = ['batch {} chunk {}: {:+.1%}'.format(r['batch'], r['chunk'] or 'whole',
                                                     r['cascade_ms'] / r['plain_ms'] - 1)
               for r in rows if r['name'] == 'none']
  if overheads:
    parts.append('no-exit overhead (target <= +3%): ' + ', '.join(overheads))
  return 'summary: ' + '; '.join(parts)


def main(_):
  tf.disable_eager_execution()
  size = FLAGS.image_size
  model = resnet_model.imagenet_model(FLAGS.resnet_size, 2, imagenet_main.NUM_CLASSES,
                                      'channels_last')
  stage = model.stage_macs(size, size)
  cumulative = np.cumsum(stage)
  plain_macs = model.plain_macs(size, size)
  chunk_sizes = [int(c) for c in FLAGS.chunk_sizes]
  graph = tf.Graph()
  with graph.as_default():
    images = tf.placeholder(tf.float32, [None, size, size, 3])
    thresholds = tf.placeholder(tf.float32, [2])
    every_exit = model(images, training=False)   # Creates the variables; gives the confidences.
    confidences = [cascade_export.confidence(tf.nn.softmax(every_exit[k]), 'top1')
                   for k in (0, 1)]
    signatures = {}
    with tf.variable_scope(tf.get_variable_scope(), reuse=True):
      for chunk in chunk_sizes:
        signatures[chunk] = cascade_export.build_signatures(model, images, thresholds, 'top1',
                                                            chunk)
    sess = tf.Session()
    sess.run(tf.global_variables_initializer())

  def timed(fetch, feed):
    start = time.perf_counter()
    result = sess.run(fetch, feed)
    return time.perf_counter() - start, result

  settings = []
  for item in FLAGS.settings.split(','):
    name, share0, share1 = item.split(':')
    settings.append((name, float(share0), float(share1)))

  print(machine.describe())
  print('ResNet-{} v2, {}x{}, stage MACs {}, plain {}'.format(
      FLAGS.resnet_size, size, size, stage, plain_macs))
  print('{:>5} {:>5} {:>8} {:>14} {:>10} {:>10} {:>9} {:>9} {:>7}'.format(
      'batch', 'chunk', 'setting', 'exit shares', 'plain ms', 'cascade ms', 'predicted',
      'measured', 'ratio'))
  rng = np.random.RandomState(0)
  rows = []
  for batch in [int(b) for b in FLAGS.batch_sizes]:
    # Unit-scale inputs keep the random network's softmax unsaturated, so the confidences are
    # distinct and their quantiles give the wanted exit shares.
    data = rng.normal(0, 1, [batch, size, size, 3]).astype(np.float32)
    conf0, conf1 = sess.run(confidences, {images: data})
    reps = FLAGS.reps * (10 if batch == 1 else 1)
    for name, share0, share1 in settings:
      # Thresholds at quantiles of this batch's confidences give the wanted exit shares.
      t0 = np.quantile(conf0, 1 - share0) if share0 > 0 else 2.0
      stays = conf0 < t0
      t1 = (np.quantile(conf1[stays], 1 - share1) if share1 > 0 and stays.any() else 2.0)
      feed = {images: data, thresholds: [t0, t1]}
      for chunk in chunk_sizes:
        cascade, full = signatures[chunk]
        plain_fetch = full['probabilities']
        # Fetch the probabilities too: the exit taken alone does not need the last group.
        cascade_fetch = [cascade['probabilities'], cascade['exit']]
        # Warm-up: the first calls with new shapes allocate buffers and pick kernels.
        sess.run(plain_fetch, feed)
        sess.run(cascade_fetch, feed)
        plain_times, cascade_times = [], []
        for _ in range(reps):   # Alternate, so load changes hit both alike.
          plain_times.append(timed(plain_fetch, feed)[0])
          seconds, (_, exit_taken) = timed(cascade_fetch, feed)
          cascade_times.append(seconds)
        shares = np.bincount(exit_taken, minlength=3) / batch
        predicted = plain_macs / float(np.mean(cumulative[exit_taken]))
        row = {'batch': batch, 'chunk': chunk, 'name': name,
               'plain_ms': 1000 * statistics.median(plain_times),
               'cascade_ms': 1000 * statistics.median(cascade_times)}
        measured = row['plain_ms'] / row['cascade_ms']
        row['ratio'] = measured / predicted
        rows.append(row)
        print('{:>5} {:>5} {:>8} {:>14} {:>10.1f} {:>10.1f} {:>9.3f} {:>9.3f} {:>7.3f}'.format(
            batch, chunk or 'whole', name, '/'.join('{:.2f}'.format(s) for s in shares),
            row['plain_ms'], row['cascade_ms'], predicted, measured, row['ratio']), flush=True)
  print(summary(rows))


if __name__ == '__main__':
  app.run(main)
