"""Runs the cascaded ResNet on ImageNet: evaluate the official network, fine-tune the exit heads,
dump every exit's softmax.

Reads the TFRecords written by ``Imagenet_tools/imagenet_to_tfrecords.py``:
``<data_dir>/train/train-%05d-of-01024`` and ``<data_dir>/validation/validation-%05d-of-00128``
(the flat upstream layout ``<data_dir>/train-*`` works too). Labels are 1..1000 with 0 the unused
background class, as in the official checkpoints, hence 1001 classes.

Example (the original README's evaluation of the final classifier)::

    python imagenet_main.py --eval_only --is_cascaded --classifier_id 2 \\
        --data_format channels_first -rv 2 -rs 50 -md checkpoints/clf2 \\
        -pmcp checkpoints/resnet_imagenet_v2_fp32_20181001 --data_dir $IMAGENET_HOME/tf_records \\
        --num_gpus 4
"""

import functools
import json
import os
import re

import tensorflow.compat.v1 as tf
from absl import app, flags, logging

import imagenet_preprocessing
import input_pipeline
import resnet_flags
import resnet_model
import resnet_run_loop
import user_errors
from Imagenet_tools import imagenet_to_tfrecords

DEFAULT_IMAGE_SIZE = 224
NUM_CHANNELS = 3
NUM_CLASSES = 1001   # 1000 ImageNet classes + background (label 0), as the official checkpoints.
NUM_IMAGES = {
    'train': 1281167,
    'validation': 50000,
}
SPLITS = tuple(NUM_IMAGES)
NUM_SHARDS = {'train': imagenet_to_tfrecords.DEFAULT_TRAIN_SHARDS,
              'validation': imagenet_to_tfrecords.DEFAULT_VALIDATION_SHARDS}
DATASET_NAME = 'ImageNet'
_SHUFFLE_BUFFER = 10000
# Shards read at once: enough to keep the decoder busy; the interleave is deterministic outside
# training, so every dump sees the same row order.
_CYCLE_LENGTH = 10


###############################################################################
# Files and records
###############################################################################
def get_filenames(split, data_dir):
  """The TFRecord shards of a split, sorted by shard index.

  Only complete shards count: the converter writes a shard as ``<name>.partial`` and renames it
  when it is done, so ``*.partial`` (and any other name) is never an input.

  Args:
    split: 'train' or 'validation'.
    data_dir: the converter's output folder (``$IMAGENET_HOME/tf_records``).

  Returns:
    A list of paths.

  Raises:
    FileNotFoundError: no shards; the message says how to make them.
  """
  if split not in SPLITS:
    raise ValueError('unknown split {!r}: expected one of {}'.format(split, SPLITS))
  shard = re.compile(r'{}-\d+-of-\d+'.format(split))
  pattern_nested = os.path.join(data_dir, split, '{}-*-of-*'.format(split))
  pattern_flat = os.path.join(data_dir, '{}-*-of-*'.format(split))
  for pattern in (pattern_nested, pattern_flat):
    files = sorted(f for f in tf.io.gfile.glob(pattern) if shard.fullmatch(os.path.basename(f)))
    if files:
      return files
  raise FileNotFoundError(
      'no {} TFRecords in --data_dir {} (looked for {}); convert ImageNet first with '
      '`bash Imagenet_tools/preprocess_imagenet.sh` and pass its output folder '
      '($IMAGENET_HOME/tf_records)'.format(split, data_dir, pattern_nested))


def count_images(split, data_dir):
  """The images of a split, and whether every pass over it must read exactly that many.

  The converter's manifest (``<split>/conversion_manifest.json``) lists each shard's image count
  when this project's converter wrote the shards: that count is a fact. A full set of shards
  from another tool has the official count, which is nominal. A partial set without a manifest is
  counted from the records' length headers.

  Returns:
    (count, source): ``source`` names what the count comes from when it is a fact (the dumps and
    evaluations stop if they read another number), or None when it is nominal.
  """
  files = get_filenames(split, data_dir)
  counted = _manifest_counts(files)
  if counted is not None:
    manifests = sorted({os.path.join(os.path.dirname(f), imagenet_to_tfrecords.MANIFEST_NAME)
                        for f in files})
    return counted, ' and '.join(manifests)
  if len(files) == NUM_SHARDS[split]:
    return NUM_IMAGES[split], None
  return (sum(imagenet_to_tfrecords.count_records(f) for f in files),
          'the records of {} ({} shards)'.format(os.path.dirname(files[0]), len(files)))


def _manifest_entries(files):
  """The converter manifest's entry of each of ``files``, or None if any is not listed."""
  entries = []
  manifests = {}
  for path in files:
    directory, name = os.path.split(path)
    if directory not in manifests:
      manifest_file = os.path.join(directory, imagenet_to_tfrecords.MANIFEST_NAME)
      try:
        with tf.io.gfile.GFile(manifest_file) as f:
          manifests[directory] = json.load(f).get('shards', {})
      except (tf.errors.NotFoundError, ValueError, AttributeError):
        manifests[directory] = {}
    entry = manifests[directory].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get('images'), int):
      return None
    entries.append(entry)
  return entries


def _manifest_counts(files):
  """Sum of the converter manifest's image counts of ``files``, or None if it lacks any."""
  entries = _manifest_entries(files)
  return None if entries is None else sum(entry['images'] for entry in entries)


def damaged_shards(split, data_dir):
  """Says which shards of a split are damaged: unreadable records, or fewer than listed.

  Reads every shard (on an error path only): corrupt records are found by TensorFlow's reader,
  which checks each record's CRC, and the record counts are compared with the manifest.

  Returns:
    A sentence naming the damaged shards and the fix, or '' if none is found.
  """
  files = get_filenames(split, data_dir)
  listed = _manifest_entries(files) or [None] * len(files)
  problems = []
  for path, entry in zip(files, listed, strict=True):
    records = 0
    try:
      for _ in tf.io.tf_record_iterator(path):
        records += 1
    except tf.errors.DataLossError:
      problems.append(f'{path} has a corrupt record after record {records}')
      continue
    if entry is not None and records != entry['images']:
      problems.append(f'{path} holds {records} records but its manifest lists '
                      f'{entry["images"]}')
  if not problems:
    return ''
  return '{}: delete {} and rerun the converter (it writes the missing shards again)'.format(
      '; '.join(problems), 'them' if len(problems) > 1 else 'it')


def parse_example_proto(example_serialized):
  """Parses one tf.train.Example written by the converter.

  Returns:
    image_buffer: scalar string, the JPEG bytes.
    label: int32 scalar, 1..1000.
    bbox: float32 [1, num_boxes, 4] boxes as (ymin, xmin, ymax, xmax), possibly no boxes.
  """
  feature_map = {
      'image/encoded': tf.io.FixedLenFeature([], tf.string, default_value=''),
      'image/class/label': tf.io.FixedLenFeature([], tf.int64, default_value=-1),
  }
  box_keys = ['image/object/bbox/' + k for k in ('ymin', 'xmin', 'ymax', 'xmax')]
  feature_map.update({k: tf.io.VarLenFeature(tf.float32) for k in box_keys})
  features = tf.io.parse_single_example(example_serialized, feature_map)
  coords = [tf.expand_dims(features[k].values, 0) for k in box_keys]
  bbox = tf.expand_dims(tf.transpose(tf.concat(coords, 0), [1, 0]), 0)   # [1, boxes, 4]
  return features['image/encoded'], tf.cast(features['image/class/label'], tf.int32), bbox


def parse_record(raw_record, is_training, dtype, image_size=DEFAULT_IMAGE_SIZE,
                 augment_seed=None):
  """Record -> ([image_size, image_size, 3] preprocessed image of dtype, int32 label).

  ``augment_seed`` (int64 [2]) makes the training crop and flip reproducible (None: random).
  """
  image_buffer, label, bbox = parse_example_proto(raw_record)
  image = imagenet_preprocessing.preprocess_image(
      image_buffer=image_buffer, bbox=bbox, output_height=image_size, output_width=image_size,
      num_channels=NUM_CHANNELS, is_training=is_training, augment_seed=augment_seed)
  return tf.cast(image, dtype), label


def input_fn(is_training, data_dir, batch_size, num_epochs=1, dtype=tf.float32, split=None,
             datasets_num_private_threads=None, input_context=None,
             image_size=DEFAULT_IMAGE_SIZE, skip_records=0, take_records=None, seed=None):
  """Batches of (images, labels) for training, evaluation or a softmax dump.

  Args:
    is_training: shuffle shards and records, augment, repeat.
    data_dir: the converter's output folder.
    batch_size: images per batch.
    num_epochs: repetitions when training (None: forever).
    dtype: image dtype.
    split: 'train' or 'validation'; default 'train' when training, else 'validation' (the
      training split is read in a fixed order with eval preprocessing for its dump).
    datasets_num_private_threads: private tf.data thread pool size.
    input_context: tf.distribute.InputContext; several input pipelines read disjoint shards.
    image_size: side of the square images the model sees.
    skip_records: images to leave out at the start (evaluation order; a resumed dump).
    take_records: read only this many images after those (None: all; a part of a dump).
    seed: seeds the training shuffle and augmentation (reproducible runs), or None.

  Returns:
    A dataset of ([batch, image_size, image_size, 3] images, [batch] int32 labels).
  """
  split = split or ('train' if is_training else 'validation')
  filenames = get_filenames(split, data_dir)
  dataset = tf.data.Dataset.from_tensor_slices(filenames)
  if input_context and input_context.num_input_pipelines > 1:
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  if is_training:
    dataset = dataset.shuffle(buffer_size=len(filenames), seed=seed)
  dataset = dataset.interleave(
      tf.data.TFRecordDataset, cycle_length=min(_CYCLE_LENGTH, len(filenames)),
      num_parallel_calls=tf.data.experimental.AUTOTUNE,
      deterministic=not is_training or seed is not None)
  return input_pipeline.process_record_dataset(
      dataset, is_training, batch_size, _SHUFFLE_BUFFER,
      functools.partial(parse_record, image_size=image_size), num_epochs=num_epochs,
      dtype=dtype, datasets_num_private_threads=datasets_num_private_threads,
      skip_records=skip_records, take_records=take_records, seed=seed)


###############################################################################
# Schedule, flags and main
###############################################################################
def learning_rate_fn(flags_obj, batch_size, num_train_images=NUM_IMAGES['train']):
  """The article's schedules (original_system.md 3.4).

  Head fine-tuning starts from a converged network, so it uses a tenth of the official rate
  without warm-up: 0.01 x B/256, divided by 10 at epochs 10, 20, 30 and 40. Training the whole
  network uses the official 0.128 x B/256 with 5 warm-up epochs and decay at 30, 60, 80, 90.
  """
  if flags_obj.fine_tune:
    base_lr, warmup_epochs, boundaries = 0.01, 0, [10, 20, 30, 40]
  else:
    base_lr, warmup_epochs, boundaries = 0.128, 5, [30, 60, 80, 90]
  return resnet_run_loop.learning_rate_schedule(
      flags_obj, batch_size=batch_size, batch_denom=256, num_images=num_train_images,
      base_lr=base_lr, boundary_epochs=boundaries, decay_rates=[1, 0.1, 0.01, 0.001, 1e-4],
      warmup_epochs=warmup_epochs)


def define_imagenet_flags(flag_values=flags.FLAGS):
  resnet_flags.define_resnet_flags(
      resnet_size_choices=sorted(resnet_model.IMAGENET_BLOCK_SIZES), default_resnet_size='50',
      default_train_epochs=90, num_exits=len(resnet_model.IMAGENET_EXIT_GROUPS) + 1,
      flag_values=flag_values)
  flags.DEFINE_integer('image_size', DEFAULT_IMAGE_SIZE, 'Side of the square images the model '
                       'sees (a multiple of 32; the official checkpoints use 224).',
                       flag_values=flag_values)


def check_image_size(image_size, resnet_size, resnet_version):
  """Raises a ValueError naming --image_size unless the exit heads can pool such images."""
  model = resnet_model.imagenet_model(resnet_size, resnet_version, NUM_CLASSES, 'channels_last')
  if image_size < 32:
    raise ValueError(f'--image_size {image_size} is too small: use a multiple of 32 such as '
                     f'{DEFAULT_IMAGE_SIZE}')
  try:
    model.validate_input_size(image_size, image_size)
  except ValueError as e:
    raise ValueError(f'--image_size {image_size} does not fit the exit heads: {e}; e.g. '
                     f'--image_size {max(32, image_size // 32 * 32)}') from None


def run_imagenet(flags_obj):
  """Evaluates, fine-tunes, dumps and exports as the flags say."""
  resnet_flags.apply_flag_defaults(flags_obj)
  image_size = flags_obj.image_size
  # Before anything reads data or writes a checkpoint.
  check_image_size(image_size, flags_obj.resnet_size, flags_obj.resnet_version)
  if flags_obj.use_synthetic_data:
    input_function = input_pipeline.get_synth_input_fn(image_size, image_size, NUM_CHANNELS,
                                                        NUM_CLASSES)
    num_images, count_sources = dict(NUM_IMAGES), {}
  else:
    input_function = functools.partial(input_fn, image_size=image_size)
    needs_train = not flags_obj.eval_only or (flags_obj.dump_train and flags_obj.softmax_dir)
    counts = {split: count_images(split, flags_obj.data_dir) if split == 'validation' or needs_train
              else (NUM_IMAGES[split], None) for split in SPLITS}
    num_images = {split: count for split, (count, _) in counts.items()}
    count_sources = {split: source for split, (_, source) in counts.items() if source}

  def model_factory(data_format, dtype):
    return resnet_model.imagenet_model(
        flags_obj.resnet_size, flags_obj.resnet_version, NUM_CLASSES, data_format, dtype,
        batch_norm_decay=flags_obj.batch_norm_decay)

  def image_bytes_serving_fn(image_bytes):
    return imagenet_preprocessing.preprocess_image(
        image_bytes, tf.zeros([1, 0, 4]), image_size, image_size, NUM_CHANNELS,
        is_training=False)

  spec = resnet_run_loop.DatasetSpec(
      name=DATASET_NAME, input_fn=input_function, model_factory=model_factory,
      learning_rate_fn=functools.partial(learning_rate_fn, num_train_images=num_images['train']),
      image_shape=(image_size, image_size, NUM_CHANNELS), num_classes=NUM_CLASSES,
      num_images=num_images, count_sources=count_sources,
      damaged_input=functools.partial(damaged_shards, data_dir=flags_obj.data_dir),
      image_bytes_serving_fn=image_bytes_serving_fn)
  return resnet_run_loop.resnet_main(flags_obj, spec)


def main(_):
  user_errors.exit_on_user_error(run_imagenet, flags.FLAGS)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  define_imagenet_flags()
  app.run(main)
