"""Images to classify, as batches: JPEG/PNG files and folders of them, a split of the ImageNet
TFRecords, or a split of data in the CIFAR-10 binary format (the format recognised from the folder).
"""

import dataclasses
import itertools
import os
import re

import numpy as np
import tensorflow as tf
from absl import logging

_JPEG_SUFFIXES = ('.jpg', '.jpeg', '.png')
_CIFAR_BATCH = re.compile(r'^(data_batch_\d+|test_batch)\.bin$')


@dataclasses.dataclass
class Batch:
  """Images read together: encoded files (``blobs``) or decoded, preprocessed ``images``."""
  names: list
  blobs: list | None = None           # encoded JPEG/PNG bytes, preprocessed by the model's rule
  images: np.ndarray | None = None    # float32 [n, height, width, channels], ready for the model
  labels: np.ndarray | None = None    # int [n], when the source has them
  source: str = ''                    # what the images are, for messages

  def __len__(self):
    return len(self.names)

  def head(self, count):
    """The first ``count`` images."""
    return Batch(self.names[:count], None if self.blobs is None else self.blobs[:count],
                 None if self.images is None else self.images[:count],
                 None if self.labels is None else self.labels[:count], self.source)


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
  """Yields Batches of encoded files (no labels), skipping undecodable ones."""
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
      yield Batch(names, blobs=blobs, source='image files')
      names, blobs = [], []
  if names:
    yield Batch(names, blobs=blobs, source='image files')


def tfrecord_batches(data_dir, split, batch_size, skip=0):
  """Yields Batches (encoded bytes, labels) from the ImageNet TFRecords of a split."""
  import imagenet_main
  features = {'image/encoded': tf.io.FixedLenFeature([], tf.string),
              'image/class/label': tf.io.FixedLenFeature([], tf.int64),
              'image/filename': tf.io.FixedLenFeature([], tf.string, default_value='')}
  dataset = tf.data.TFRecordDataset(imagenet_main.get_filenames(split, data_dir)).skip(skip)
  dataset = dataset.map(lambda r: tf.io.parse_single_example(r, features)).batch(batch_size)
  for batch in dataset:
    yield Batch([n.decode() for n in batch['image/filename'].numpy()],
                blobs=list(batch['image/encoded'].numpy()),
                labels=batch['image/class/label'].numpy(),
                source=f'--data_dir {data_dir} (ImageNet TFRecords)')


def is_cifar_binary(data_dir):
  """Whether ``data_dir`` holds batches in the CIFAR-10 binary format (cifar10_main's layout)."""
  import cifar10_main
  if os.path.isdir(os.path.join(data_dir, cifar10_main.BATCHES_DIR)):
    return True
  return os.path.isdir(data_dir) and any(_CIFAR_BATCH.match(n) for n in os.listdir(data_dir))


def cifar_batches(data_dir, split, batch_size, skip=0):
  """Yields Batches of preprocessed images and labels from CIFAR-10 binary batch files.

  The images are decoded and standardised by ``cifar10_main.parse_record`` in the fixed record
  order, exactly as the run loop evaluates and dumps them. Names are ``<file>:<record>``.
  """
  import cifar10_main
  files = cifar10_main.get_filenames(split, data_dir)
  counts = [cifar10_main.records_in_file(path) for path in files]
  names = itertools.islice((f'{os.path.basename(path)}:{i}'
                            for path, count in zip(files, counts, strict=True)
                            for i in range(count)), skip, None)
  dataset = tf.data.FixedLengthRecordDataset(files, cifar10_main.RECORD_BYTES).skip(skip)
  dataset = dataset.map(lambda r: cifar10_main.parse_record(r, is_training=False))
  source = f'--data_dir {data_dir} (CIFAR-10 binary format)'
  for images, labels in dataset.batch(batch_size):
    images = images.numpy()
    yield Batch(list(itertools.islice(names, len(images))), images=images,
                labels=labels.numpy(), source=source)


def data_batches(data_dir, split, batch_size, skip=0):
  """Batches of a split of ``data_dir``, in its fixed order: CIFAR-10 binary or TFRecords.

  Raises:
    FileNotFoundError: the folder holds neither (now, not at the first batch).
  """
  if is_cifar_binary(data_dir):
    import cifar10_main
    cifar10_main.get_filenames(split, data_dir)   # Raises for a missing split.
    return cifar_batches(data_dir, split, batch_size, skip)
  import imagenet_main
  try:
    imagenet_main.get_filenames(split, data_dir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'--data_dir {data_dir} holds neither CIFAR-10 binary batches '
                            f'(data_batch_*.bin, test_batch.bin) nor ImageNet TFRecords: '
                            f'{e}') from None
  return tfrecord_batches(data_dir, split, batch_size, skip)


def limited(batches, max_images, already=0):
  """The batches cut so that at most ``max_images`` images (``already`` counted) come out."""
  count = already
  for batch in batches:
    if max_images is not None:
      if count >= max_images:
        return
      batch = batch.head(max_images - count)
    count += len(batch)
    yield batch
