"""Where the cascade's no-exit overhead goes: the exit heads, or the early-exit machinery.

With no early exit the cascade computes what the plain network computes plus the two exit heads
(BN and ReLU on a feature map, a grid pool, dense 2048 -> 1024, BN, ReLU, dense 1024 -> 1001) and
the decisions between stages (a confidence, a ``tf.cond`` per stage, gathers and a scatter). The
heads add 0.17% MACs but 6.3 M weights, a fifth of the cascade's: at batch 1 each weight is used
once per image, so their cost follows the bytes read rather than the MACs. This script times, on
the same weights and batch, alternately:

* plain: the final exit only (the exported ``full`` signature);
* heads: every exit in one pass, no decisions (what the heads cost by themselves);
* cascade: the exported cascade with thresholds no image reaches.

    python benchmarks/exit_head_cost.py [--batch_sizes 1,32] [--reps 50]
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
flags.DEFINE_list('batch_sizes', ['1', '32'], 'Batch sizes to measure.')
flags.DEFINE_integer('reps', 50, 'Timed calls per graph at batch 1 (fewer at larger batches).')
flags.DEFINE_integer('chunk_size', None, 'Chunk size of the cascade and the plain network '
                     '(default: what an export on this machine uses).')


def head_parameters(model):
  """Weights of the exit heads and of the whole model (counts), from the built graph."""
  heads = total = 0
  for variable in tf.global_variables():
    count = int(np.prod(variable.shape.as_list()))
    total += count
    if (resnet_model.variable_group(variable.op.name, model.num_exits) or '').startswith('exit'):
      heads += count
  return heads, total


def main(_):
  tf.disable_eager_execution()
  size = FLAGS.image_size
  chunk = cascade_export.default_chunk_size() if FLAGS.chunk_size is None else FLAGS.chunk_size
  model = resnet_model.imagenet_model(FLAGS.resnet_size, 2, imagenet_main.NUM_CLASSES,
                                      'channels_last')
  graph = tf.Graph()
  with graph.as_default():
    images = tf.placeholder(tf.float32, [None, size, size, 3])
    never = [2.0] * (model.num_exits - 1)   # No confidence reaches 2: every image goes on.
    cascade, full = cascade_export.build_signatures(model, images, never, 'top1', chunk)
    with tf.variable_scope(tf.get_variable_scope(), reuse=True):
      every_exit = model(images, training=False)
    fetches = {
        'plain': full['probabilities'],
        'heads': [tf.nn.softmax(logits) for logits in every_exit.values()],
        'cascade': cascade['probabilities'],
    }
    heads, total = head_parameters(model)
    sess = tf.Session()
    sess.run(tf.global_variables_initializer())

  print(machine.describe())
  print('ResNet-{} v2, {}x{}, chunk {}; exit heads {:.2f} M of {:.2f} M weights ({:.0%})'.format(
      FLAGS.resnet_size, size, size, chunk or 'whole', heads / 1e6, total / 1e6, heads / total))
  print('{:>5} {:>9} {:>9} {:>11} {:>14} {:>16}'.format(
      'batch', 'plain ms', 'heads ms', 'cascade ms', 'heads / plain', 'cascade / plain'))
  rng = np.random.RandomState(0)
  lines = []
  for batch in [int(b) for b in FLAGS.batch_sizes]:
    feed = {images: rng.normal(0, 1, [batch, size, size, 3]).astype(np.float32)}
    times = {name: [] for name in fetches}
    for fetch in fetches.values():   # Warm-up: buffers and kernels for the new shape.
      sess.run(fetch, feed)
    for _ in range(max(3, FLAGS.reps // batch)):
      for name, fetch in fetches.items():   # Interleaved, so load changes hit all three.
        start = time.perf_counter()
        sess.run(fetch, feed)
        times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    heads_overhead = ms['heads'] / ms['plain'] - 1
    cascade_overhead = ms['cascade'] / ms['plain'] - 1
    print('{:>5} {:>9.2f} {:>9.2f} {:>11.2f} {:>14} {:>16}'.format(
        batch, ms['plain'], ms['heads'], ms['cascade'], f'{heads_overhead:+.1%}',
        f'{cascade_overhead:+.1%}'), flush=True)
    lines.append(f'batch {batch}: cascade {cascade_overhead:+.1%}, of it the heads alone '
                 f'{heads_overhead:+.1%}')
  print('summary: no-exit overhead against the plain network: ' + '; '.join(lines))


if __name__ == '__main__':
  app.run(main)
