"""Dumping all three exits in one pass versus three single-exit passes, on the CPU.

The data are real-photo JPEGs of ImageNet-like size (longer side 300-500 pixels, crops of the
scikit-image / scikit-learn / matplotlib photos) written as a miniature validation split by the
project's converter, read back through ``imagenet_main.input_fn`` (TFRecord reading, JPEG
decoding, evaluation preprocessing to 224x224). The model is a cascaded ImageNet ResNet v2 with
random weights, saved once as a checkpoint that every run restores.

Each contender is one call of ``softmax_dump.dump_softmax`` on an Estimator built as
``imagenet_main`` builds it, timed end to end (graph building, checkpoint restore, input pipeline,
forward passes, writing the .npy files), i.e. what a user waits for:

* ``all``: ``--classifier_id all``, one pass that writes clf0, clf1 and clf2;
* ``0``, ``1``, ``2``: ``--classifier_id k``, one pass per exit; ``0`` and ``1`` build only the
  network up to their exit.

After ``--warmup_rounds`` untimed rounds, the contenders take turns (all, 0, 1, 2, all, ...)
for ``--repetitions`` rounds; the table gives the median and best wall-clock times and the
median CPU time of this process, and the ratio of the one pass to the sum of the three (target
<= 0.5). The dumps of the two ways are compared too.

Usage::

    .venv/bin/python benchmarks/dump_passes.py [--num_images=96] [--batch_size=32]
"""

import functools
import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_REPO, os.path.join(_REPO, 'tests')]

import imagenet_fixtures  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow.compat.v1 as tf  # noqa: E402

import dump_layout  # noqa: E402
import imagenet_main  # noqa: E402
import model_fn  # noqa: E402
import resnet_model  # noqa: E402
import softmax_dump  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_images', 96, 'Validation images (rounded up to a multiple of 6).')
flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
flags.DEFINE_integer('image_size', 224, 'Side of the square images the model sees.')
flags.DEFINE_integer('resnet_size', 50, 'ResNet depth.')
flags.DEFINE_integer('repetitions', 5, 'Interleaved repetitions.')
flags.DEFINE_integer('warmup_rounds', 1, 'Untimed rounds of every contender before timing '
                     '(the first Estimator and input pipeline of a process pay one-off costs).')
flags.DEFINE_integer('intra', 0, 'intra_op_parallelism_threads (0: TF default).')
flags.DEFINE_integer('inter', 0, 'inter_op_parallelism_threads (0: TF default).')
flags.DEFINE_string('work_dir', None, 'Scratch folder (default: a temporary folder).')

CONTENDERS = ('all', '0', '1', '2')


def model_factory(data_format, dtype):
  return resnet_model.imagenet_model(FLAGS.resnet_size, 2, imagenet_main.NUM_CLASSES,
                                     data_format, dtype)


def make_records(root):
  """Writes the miniature validation split; returns (data_dir, image count)."""
  per_class = -(-FLAGS.num_images // len(imagenet_fixtures.PHOTO_CLASSES))
  mini = imagenet_fixtures.make_miniature_imagenet(
      os.path.join(root, 'imagenet'), train_per_class=1, validation_per_class=per_class,
      long_side=(300, 500), quality=(90, 95), special_files=False, with_boxes=False)
  data_dir = os.path.join(root, 'tf_records')
  imagenet_fixtures.convert_miniature(mini, data_dir, splits=('validation',),
                                      validation_shards=2, num_workers=1)
  return data_dir, len(mini.validation)


def write_checkpoint(model_dir):
  """Random weights for every exit, saved as a step-0 checkpoint."""
  with tf.Graph().as_default():
    model_factory('channels_last', tf.float32)(
        tf.zeros([1, FLAGS.image_size, FLAGS.image_size, 3]), training=False)
    step = tf.train.get_or_create_global_step()
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      tf.train.Saver().save(sess, os.path.join(model_dir, 'model.ckpt'), global_step=step)


def estimator_for(classifier_id, model_dir):
  model = model_factory('channels_last', tf.float32)
  params = model_fn.RunParams(
      model=model, plan=model_fn.ExitPlan.parse(classifier_id, model.num_exits))
  config = tf.estimator.RunConfig(session_config=tf.ConfigProto(
      intra_op_parallelism_threads=FLAGS.intra, inter_op_parallelism_threads=FLAGS.inter))
  return tf.estimator.Estimator(model_fn.resnet_model_fn, model_dir=model_dir,
                                config=config, params=params)


def main(_):
  tf.get_logger().setLevel('ERROR')
  logging.set_verbosity(logging.WARNING)
  with tempfile.TemporaryDirectory(dir=FLAGS.work_dir) as root:
    start = time.perf_counter()
    data_dir, num_images = make_records(root)
    model_dir = os.path.join(root, 'model')
    write_checkpoint(model_dir)
    print(f'  {num_images} validation JPEGs converted and checkpoint written in '
          f'{time.perf_counter() - start:.0f} s', flush=True)

    def make_input_fn(skip_records):
      def input_fn():
        dataset = imagenet_main.input_fn(False, data_dir, FLAGS.batch_size,
                                         image_size=FLAGS.image_size, skip_records=skip_records)
        return dataset.map(lambda image, label: {'image': image, 'label': label})
      return input_fn

    common = {'dataset': imagenet_main.DATASET_NAME, 'num_classes': imagenet_main.NUM_CLASSES,
              'checkpoint': tf.train.latest_checkpoint(model_dir)}
    seconds = {c: [] for c in CONTENDERS}       # wall seconds per dump
    cpu_seconds = {c: [] for c in CONTENDERS}   # CPU seconds of this process per dump
    for rep in range(-FLAGS.warmup_rounds, FLAGS.repetitions):
      for contender in CONTENDERS:
        exits = model_fn.ExitPlan.parse(contender, 3).built
        softmax_dir = os.path.join(root, f'dump_{contender}')
        # A split already dumped from the same checkpoint would be skipped: start afresh.
        shutil.rmtree(softmax_dir, ignore_errors=True)
        dump = functools.partial(softmax_dump.dump_softmax, estimator_for(contender, model_dir),
                                 make_input_fn, softmax_dir, 'validation', exits, common)
        start, start_cpu = time.perf_counter(), time.process_time()
        rows = dump()
        elapsed = time.perf_counter() - start
        elapsed_cpu = time.process_time() - start_cpu
        if rows != num_images:
          raise RuntimeError(f'dumped {rows} rows, expected {num_images}')
        if rep >= 0:
          seconds[contender].append(elapsed)
          cpu_seconds[contender].append(elapsed_cpu)
        print(f'  {"repetition " + str(rep + 1) if rep >= 0 else "warm-up"}: classifier_id '
              f'{contender}: {elapsed:.1f} s, {elapsed_cpu:.1f} CPU-s', flush=True)

    worst = max(
        float(np.abs(np.load(dump_layout.probabilities_path(root + '/dump_all', 'validation', k))
                     - np.load(dump_layout.probabilities_path(root + f'/dump_{k}', 'validation',
                                                              k))).max())
        for k in range(3))

  median = {c: statistics.median(s) for c, s in seconds.items()}
  best = {c: min(s) for c, s in seconds.items()}
  cpu = {c: statistics.median(s) for c, s in cpu_seconds.items()}
  median['0 + 1 + 2'], best['0 + 1 + 2'], cpu['0 + 1 + 2'] = (
      sum(d[c] for c in ('0', '1', '2')) for d in (median, best, cpu))
  print(f'\nDumps of {num_images} real-photo JPEGs (miniature validation TFRecords, decoding and '
        f'eval preprocessing included), ResNet-{FLAGS.resnet_size} v2 cascade, '
        f'{FLAGS.image_size}x{FLAGS.image_size}, batch {FLAGS.batch_size}, CPU; wall time of '
        f'dump_softmax (graph, restore, pass, files), medians of {FLAGS.repetitions} '
        f'interleaved repetitions after {FLAGS.warmup_rounds} warm-up round(s)')
  print(f'{"classifier_id":<16} {"seconds":>8} {"images/s":>9} {"best s":>7} {"CPU-s":>7}')
  for contender in median:
    print(f'{contender:<16} {median[contender]:8.1f} {num_images / median[contender]:9.1f} '
          f'{best[contender]:7.1f} {cpu[contender]:7.1f}')
  print(f'largest |p_all - p_single| over the three exits: {worst:.2e}')
  ratios = {name: d['all'] / d['0 + 1 + 2'] for name, d in
            (('median wall', median), ('best wall', best), ('median CPU', cpu))}
  print('ratio one pass (all) / three single passes: ' +
        ', '.join(f'{r:.3f} ({name})' for name, r in ratios.items()) + ' (target <= 0.5)')


if __name__ == '__main__':
  app.run(main)
