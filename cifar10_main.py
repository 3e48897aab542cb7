"""Runs a ResNet model on CIFAR-10, or on any data set written in the CIFAR-10 binary format.

Data layout. A folder ``cifar-10-batches-bin/`` holds the training batches ``data_batch_1.bin``
.. ``data_batch_5.bin`` (every ``data_batch_*.bin`` is read, in numeric order) and the
validation batch ``test_batch.bin``. Each file is a plain concatenation of fixed-size records::

    1 byte      label, 0 .. NUM_CLASSES - 1
    3072 bytes  the 32x32 image, channel-major: 1024 red bytes, then 1024 green, then 1024 blue,
                each plane row by row

The number of records per file is taken from the file size, so files of any length work (the
Fashion-MNIST subsets written by ``prepare_fashion_mnist.py`` are smaller than CIFAR-10's).
``cifar10_download_and_extract.py`` fetches the real CIFAR-10 where there is internet access;
``prepare_fashion_mnist.py`` writes Fashion-MNIST in the same format without it.
"""

import functools
import os
import re

import tensorflow as tf2
import tensorflow.compat.v1 as tf
from absl import app, flags, logging

import input_pipeline
import resnet_flags
import resnet_layers
import resnet_model
import resnet_run_loop
import user_errors

HEIGHT = 32
WIDTH = 32
NUM_CHANNELS = 3
NUM_CLASSES = 10

LABEL_BYTES = 1
IMAGE_BYTES = HEIGHT * WIDTH * NUM_CHANNELS
# Every record is a label byte followed by the image: 3073 bytes.
RECORD_BYTES = LABEL_BYTES + IMAGE_BYTES

# The folder the CIFAR-10 binary tarball extracts to, and the file names inside it.
BATCHES_DIR = 'cifar-10-batches-bin'
TRAIN_FILE_FORMAT = 'data_batch_{}.bin'
VALIDATION_FILE = 'test_batch.bin'
META_FILE = 'batches.meta.txt'

# The sizes of the real CIFAR-10 splits. The input functions do not rely on them: they count the
# records actually present with `count_records`.
NUM_IMAGES = {
    'train': 50000,
    'validation': 10000,
}
SPLITS = tuple(NUM_IMAGES)

# A shuffle buffer this large holds all of CIFAR-10's training set (150 MB of raw records), so
# every epoch is a uniform permutation of the training images.
_SHUFFLE_BUFFER = 50000

_TRAIN_FILE_RE = re.compile(r'^data_batch_(\d+)\.bin$')

_HOW_TO_GET_DATA = (
    'Get the data with `python cifar10_download_and_extract.py --data_dir={data_dir}` (needs '
    'internet access) or write Fashion-MNIST in the same format with '
    '`python prepare_fashion_mnist.py --output_dir={data_dir}`.')


###############################################################################
# File names and record counts
###############################################################################
def _batches_dir(data_dir):
  """The folder holding the batch files: `data_dir` itself or its `cifar-10-batches-bin/`.

  Raises:
    FileNotFoundError: neither `data_dir/cifar-10-batches-bin/` nor any batch file in `data_dir`.
  """
  nested = os.path.join(data_dir, BATCHES_DIR)
  if os.path.isdir(nested):
    return nested
  if os.path.isdir(data_dir):
    names = os.listdir(data_dir)
    if VALIDATION_FILE in names or any(_TRAIN_FILE_RE.match(name) for name in names):
      return data_dir
  raise FileNotFoundError(
      f'No CIFAR-10 binary data in --data_dir={data_dir}: expected the folder '
      f'{nested}/ (or data_batch_*.bin and {VALIDATION_FILE} directly in {data_dir}). '
      + _HOW_TO_GET_DATA.format(data_dir=data_dir))


def _check_split(split):
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}: expected one of {SPLITS}.')


def get_filenames(split, data_dir):
  """The batch files of one split, in the order their records are read.

  Args:
    split: 'train' (every `data_batch_<i>.bin`, sorted by i) or 'validation' (`test_batch.bin`).
    data_dir: the folder that contains `cifar-10-batches-bin/`, or that folder itself.

  Returns:
    A list of file paths.

  Raises:
    ValueError: an unknown split.
    FileNotFoundError: the folder or the split's files are missing; the message says how to get
      them.
  """
  _check_split(split)
  batches_dir = _batches_dir(data_dir)
  if split == 'train':
    numbered = []
    for name in os.listdir(batches_dir):
      match = _TRAIN_FILE_RE.match(name)
      if match:
        numbered.append((int(match.group(1)), name))
    if not numbered:
      raise FileNotFoundError(
          f'No training batches (data_batch_*.bin) in {batches_dir}. '
          + _HOW_TO_GET_DATA.format(data_dir=data_dir))
    # Numeric order, so that data_batch_10.bin comes after data_batch_9.bin.
    return [os.path.join(batches_dir, name) for _, name in sorted(numbered)]

  path = os.path.join(batches_dir, VALIDATION_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'No validation batch {VALIDATION_FILE} in {batches_dir}. '
        + _HOW_TO_GET_DATA.format(data_dir=data_dir))
  return [path]


def records_in_file(path):
  """The number of records in one batch file, from its size.

  Raises:
    ValueError: the file is empty or its size is not a whole number of records, i.e. it is
      truncated or not a CIFAR-10 binary batch.
  """
  size = os.path.getsize(path)
  if size == 0 or size % RECORD_BYTES:
    raise ValueError(
        f'Corrupt CIFAR-10 batch file {path}: its size, {size} bytes, is not a positive multiple '
        f'of the {RECORD_BYTES}-byte record ({LABEL_BYTES} label byte + {NUM_CHANNELS}x{HEIGHT}x'
        f'{WIDTH} pixels), so the file is truncated or in another format. Delete it and get the '
        f'data again with cifar10_download_and_extract.py or prepare_fashion_mnist.py.')
  return size // RECORD_BYTES


def count_records(data_dir, split):
  """The number of images of a split actually on disk (summed over its batch files).

  Args:
    data_dir: the folder that contains `cifar-10-batches-bin/`, or that folder itself.
    split: 'train' or 'validation'.

  Returns:
    An int.

  Raises:
    FileNotFoundError, ValueError: as `get_filenames` and `records_in_file`.
  """
  return sum(records_in_file(path) for path in get_filenames(split, data_dir))


###############################################################################
# Record parsing and preprocessing
###############################################################################
def decode_record(raw_record):
  """Splits one raw record into its image and label, without any preprocessing.

  Args:
    raw_record: scalar string tensor of RECORD_BYTES bytes.

  Returns:
    image: uint8 tensor [HEIGHT, WIDTH, NUM_CHANNELS] (channels last).
    label: int32 scalar tensor.
  """
  record = tf.io.decode_raw(raw_record, tf.uint8)
  label = tf.cast(record[0], tf.int32)
  # The file stores the image channel-major: [channels, height, width].
  depth_major = tf.reshape(record[LABEL_BYTES:RECORD_BYTES], [NUM_CHANNELS, HEIGHT, WIDTH])
  image = tf.transpose(depth_major, [1, 2, 0])
  return image, label


def preprocess_image(image, is_training, augment_seed=None):
  """The CIFAR-10 preprocessing: augmentation when training, standardisation always.

  Training uses the augmentation of the original ResNet paper: zero-pad by 4 pixels on each
  side, take a random 32x32 crop and flip left-right with probability 1/2.

  Args:
    image: float32 tensor [HEIGHT, WIDTH, NUM_CHANNELS], pixel values 0..255.
    is_training: whether to augment.
    augment_seed: int64 [2] seed of a stateless (reproducible) augmentation, or None.

  Returns:
    float32 tensor [HEIGHT, WIDTH, NUM_CHANNELS] with zero mean and unit variance per image.
  """
  if is_training:
    image = tf.image.resize_image_with_crop_or_pad(image, HEIGHT + 8, WIDTH + 8)
    if augment_seed is None:
      image = tf.image.random_crop(image, [HEIGHT, WIDTH, NUM_CHANNELS])
      image = tf.image.random_flip_left_right(image)
    else:
      image = tf2.image.stateless_random_crop(image, [HEIGHT, WIDTH, NUM_CHANNELS], augment_seed)
      image = tf2.image.stateless_random_flip_left_right(image, augment_seed + [0, 1])
  # Standardised per image (not with data-set statistics) so that any data set written in this
  # format, e.g. Fashion-MNIST, needs no statistics of its own.
  return tf.image.per_image_standardization(image)


def parse_record(raw_record, is_training, dtype=tf.float32, augment_seed=None):
  """Decodes and preprocesses one record.

  Args:
    raw_record: scalar string tensor of RECORD_BYTES bytes.
    is_training: whether to augment the image.
    dtype: the image's data type, e.g. tf.float32 or tf.float16.
    augment_seed: int64 [2] seed of a reproducible augmentation, or None.

  Returns:
    image: tensor [HEIGHT, WIDTH, NUM_CHANNELS] of `dtype`, standardised per image.
    label: int32 scalar tensor.
  """
  image, label = decode_record(raw_record)
  image = preprocess_image(tf.cast(image, tf.float32), is_training, augment_seed)
  return tf.cast(image, dtype), label


###############################################################################
# Input function
###############################################################################
def input_fn(is_training, data_dir, batch_size, num_epochs=1, dtype=tf.float32, split=None,
             datasets_num_private_threads=None, drop_remainder=False, input_context=None,
             skip_records=0, take_records=None, seed=None):
  """The input function for training, evaluation and softmax dumps.

  Training reads the shuffled records `num_epochs` times (each epoch a fresh permutation).
  Evaluation reads every image exactly once, in file order then record order, and keeps the
  final partial batch: the softmax dumps rely on one row per image in this order.

  Args:
    is_training: augment, shuffle and repeat.
    data_dir: the folder that contains `cifar-10-batches-bin/`, or that folder itself.
    batch_size: the number of images per batch.
    num_epochs: how many times to read the training split (None: forever); ignored otherwise.
    dtype: the images' data type.
    split: 'train' or 'validation'; defaults to 'train' when training, else 'validation'
      (the training split is read without augmentation for its softmax dump).
    datasets_num_private_threads: if set, the size of a thread pool used by this pipeline only.
    drop_remainder: whether to drop the final partial batch when training (static batch shapes).
    input_context: a tf.distribute.InputContext; with more than one input pipeline each reads
      its own shard of the records.
    skip_records: images to leave out at the start (evaluation order; a resumed dump).
    take_records: read only this many images after those (None: all; a part of a dump).
    seed: seeds the training shuffle and augmentation (reproducible runs), or None.

  Returns:
    A dataset of ([batch, 32, 32, 3] images of `dtype`, [batch] int32 labels).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if is_training and num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be positive, got {num_epochs}.')
  split = split or ('train' if is_training else 'validation')
  filenames = get_filenames(split, data_dir)
  # Checking every file's size here turns a truncated file into a clear error now, instead of
  # a failure deep inside a session hours into training.
  num_records = sum(records_in_file(path) for path in filenames)

  dataset = tf.data.FixedLengthRecordDataset(filenames, RECORD_BYTES)
  if input_context and input_context.num_input_pipelines > 1:
    tf.logging.info('Sharding the CIFAR-10 %s records: pipeline %d of %d.', split,
                    input_context.input_pipeline_id, input_context.num_input_pipelines)
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  return input_pipeline.process_record_dataset(
      dataset, is_training, batch_size, min(num_records, _SHUFFLE_BUFFER), parse_record,
      num_epochs=num_epochs, dtype=dtype,
      datasets_num_private_threads=datasets_num_private_threads,
      drop_remainder=drop_remainder and is_training, skip_records=skip_records,
      take_records=take_records, seed=seed)


###############################################################################
# Model, schedule, flags and main
###############################################################################
# CIFAR ResNets have 6n + 2 layers: 3 stages of n blocks of 2 convs, the stem and the classifier.
RESNET_SIZE_CHOICES = [6 * n + 2 for n in range(1, 34)]
# Early exits after stages 1 and 2 (the final classifier follows stage 3).
EXIT_GROUPS = (0, 1)
# The official schedule: 0.1 for a batch of 128, divided by 10 at 50% and 75% of training
# (epochs 91 and 136 of 182).
_BASE_LR = 0.1
_BATCH_DENOM = 128
_DECAY_FRACTIONS = (0.5, 0.75)


class Cifar10Model(resnet_model.Model):
  """The CIFAR ResNet: 3x3 stem, no max-pool, stages of 16/32/64 filters, exits after 1 and 2."""

  def __init__(self, resnet_size, resnet_version=resnet_model.DEFAULT_VERSION, data_format=None,
               dtype=resnet_model.DEFAULT_DTYPE, num_classes=NUM_CLASSES,
               batch_norm_decay=resnet_layers.BATCH_NORM_DECAY):
    resnet_size = int(resnet_size)
    if resnet_size % 6 != 2 or resnet_size < 8:
      raise ValueError('CIFAR ResNets have 6n+2 layers (8, 14, 20, 26, 32, 44, 56, 110, ...), '
                       'got --resnet_size {}'.format(resnet_size))
    num_blocks = (resnet_size - 2) // 6
    super().__init__(
        resnet_size=resnet_size, bottleneck=False, num_classes=num_classes, num_filters=16,
        kernel_size=3, conv_stride=1, first_pool_size=None, first_pool_stride=None,
        block_sizes=[num_blocks] * 3, block_strides=[1, 2, 2], resnet_version=int(resnet_version),
        data_format=data_format, dtype=dtype, exit_groups=EXIT_GROUPS,
        batch_norm_decay=batch_norm_decay)


def learning_rate_fn(flags_obj, batch_size, num_train_images):
  """The official CIFAR schedule with its decay points placed relative to --train_epochs."""
  epochs = max(flags_obj.train_epochs, 1)
  # Heads fine-tune after the backbone's run, whose global step they continue: keep the full
  # rate until the last tenth of --train_epochs.
  fractions = (0.9,) if flags_obj.fine_tune else _DECAY_FRACTIONS
  return resnet_run_loop.learning_rate_schedule(
      flags_obj, batch_size=batch_size, batch_denom=_BATCH_DENOM, num_images=num_train_images,
      base_lr=_BASE_LR, boundary_epochs=[epochs * f for f in fractions],
      decay_rates=[1, 0.1, 0.01][:len(fractions) + 1])


def define_cifar_flags(flag_values=flags.FLAGS):
  resnet_flags.define_resnet_flags(
      resnet_size_choices=RESNET_SIZE_CHOICES, default_resnet_size='56',
      default_train_epochs=182, num_exits=len(EXIT_GROUPS) + 1, flag_values=flag_values)
  flag_values.set_default('data_dir', '/tmp/cifar10_data')
  flag_values.set_default('model_dir', '/tmp/cifar10_model')
  flag_values.set_default('batch_size', 128)


def _count_or_none(data_dir, split):
  try:
    return count_records(data_dir, split)
  except FileNotFoundError:
    return None


def run_cifar(flags_obj):
  """Trains, evaluates, dumps and exports a CIFAR ResNet as the flags say."""
  resnet_flags.apply_flag_defaults(flags_obj)
  if flags_obj.use_synthetic_data:
    input_function = input_pipeline.get_synth_input_fn(HEIGHT, WIDTH, NUM_CHANNELS, NUM_CLASSES)
    num_images = dict(NUM_IMAGES)
  else:
    input_function = input_fn
    num_images = {split: _count_or_none(flags_obj.data_dir, split) for split in SPLITS}
    if num_images['validation'] is None:
      get_filenames('validation', flags_obj.data_dir)  # Raises the explanatory error.
    if num_images['train'] is None and not flags_obj.eval_only:
      get_filenames('train', flags_obj.data_dir)

  def model_factory(data_format, dtype):
    return Cifar10Model(flags_obj.resnet_size, flags_obj.resnet_version, data_format, dtype,
                        batch_norm_decay=flags_obj.batch_norm_decay)

  spec = resnet_run_loop.DatasetSpec(
      name='cifar10', input_fn=input_function, model_factory=model_factory,
      learning_rate_fn=functools.partial(learning_rate_fn,
                                         num_train_images=num_images['train'] or 1),
      image_shape=(HEIGHT, WIDTH, NUM_CHANNELS), num_classes=NUM_CLASSES, num_images=num_images)
  return resnet_run_loop.resnet_main(flags_obj, spec)


def main(_):
  user_errors.exit_on_user_error(run_cifar, flags.FLAGS)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  define_cifar_flags()
  app.run(main)
