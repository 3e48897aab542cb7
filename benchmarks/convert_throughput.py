"""Throughput of the ImageNet converter and of the evaluation input pipeline.

Builds a training tarball of a few thousand real-photo JPEGs of ImageNet-like size (longer side
400-500 pixels, about 85 KiB each; crops of the scikit-image / scikit-learn / matplotlib
photos), then prints:

* converter: images/s of the streaming index pass, and of a whole conversion with 1 and with 2
  writer processes (index + write; no image needs re-encoding, as for all but ~23 ImageNet files);
* evaluation input pipeline: images/s of TFRecord reading + JPEG decoding + eval preprocessing
  (224x224), on one core and on all cores.

Usage::

    .venv/bin/python benchmarks/convert_throughput.py [--num_images=3000] [--work_dir=DIR]
"""

import os
import sys
import tempfile
import time

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_REPO, os.path.join(_REPO, 'tests')]

import imagenet_fixtures  # noqa: E402  (needs the paths above)

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_images', 3000, 'Training images in the generated tarball.')
flags.DEFINE_string('work_dir', None, 'Where to build the tarball (default: a temporary folder).')
flags.DEFINE_integer('eval_batches', 40, 'Batches of 32 timed in the input-pipeline benchmark.')


def _time(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def bench_converter(root):
  per_class = -(-FLAGS.num_images // len(imagenet_fixtures.PHOTO_CLASSES))
  mini, seconds = _time(lambda: imagenet_fixtures.make_miniature_imagenet(
      os.path.join(root, 'imagenet'), train_per_class=per_class, validation_per_class=1,
      long_side=(400, 500), quality=(98, 100), special_files=False, with_boxes=False))
  num = len(mini.train)
  mean_kb = sum(len(im.data) for im in mini.train.values()) / num / 1024
  print(f'tarball: {num} JPEGs, mean {mean_kb:.0f} KiB, '
        f'{os.path.getsize(mini.train_archive) / 2**20:.0f} MiB (built in {seconds:.0f} s)')

  # Start the writer pool's server once (it imports TensorFlow), so that it is not timed.
  imagenet_fixtures.convert_miniature(mini, os.path.join(root, 'warmup'), splits=('validation',),
                                      validation_shards=1, num_workers=1)
  shards = max(2, num // 250)
  for workers in (1, 2):
    summaries, seconds = _time(lambda w=workers: imagenet_fixtures.convert_miniature(
        mini, os.path.join(root, f'out{w}'), splits=('train',), train_shards=shards,
        num_workers=w))
    summary = summaries['train']
    assert summary.num_written == num
    write_rate = num / summary.write_seconds
    print(f'converter, {workers} writer process(es): {num / seconds:6.0f} images/s overall '
          f'(index pass {num / summary.index_seconds:.0f} images/s in 1 process; write pass '
          f'{write_rate:.0f} images/s = {write_rate / workers:.0f} per writer process)')
  return summaries['train'].shard_paths


def bench_eval_pipeline(shard_paths):
  import tensorflow.compat.v1 as tf

  import imagenet_preprocessing

  def parse(record):
    features = tf.io.parse_single_example(record, {
        'image/encoded': tf.io.FixedLenFeature([], tf.string),
        'image/class/label': tf.io.FixedLenFeature([], tf.int64)})
    image = imagenet_preprocessing.preprocess_image(
        features['image/encoded'], tf.zeros([1, 0, 4]), 224, 224, 3, is_training=False)
    return image, features['image/class/label']

  for threads in (1, os.cpu_count()):
    with tf.Graph().as_default():
      dataset = tf.data.TFRecordDataset(shard_paths).repeat().map(
          parse, num_parallel_calls=threads).batch(32)
      options = tf.data.Options()
      options.threading.private_threadpool_size = threads
      dataset = dataset.with_options(options)
      images, _ = tf.data.make_one_shot_iterator(dataset).get_next()
      config = tf.ConfigProto(intra_op_parallelism_threads=threads,
                              inter_op_parallelism_threads=threads)
      with tf.Session(config=config) as sess:
        for _ in range(3):
          sess.run(images)
        start = time.perf_counter()
        for _ in range(FLAGS.eval_batches):
          sess.run(images)
        seconds = time.perf_counter() - start
    rate = FLAGS.eval_batches * 32 / seconds
    print(f'eval input pipeline, {threads} thread(s):   {rate:8.0f} images/s '
          f'({rate / threads:.0f} per core)')


def main(argv):
  del argv
  print(f'{os.cpu_count()} CPUs')
  with tempfile.TemporaryDirectory(dir=FLAGS.work_dir) as root:
    shard_paths = bench_converter(root)
    bench_eval_pipeline(shard_paths)


if __name__ == '__main__':
  app.run(main)
