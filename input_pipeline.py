"""Input pipeline pieces the dataset mains share: records to batches, and synthetic input."""

import tensorflow.compat.v1 as tf


def process_record_dataset(dataset, is_training, batch_size, shuffle_buffer, parse_record_fn,
                           num_epochs=1, dtype=tf.float32, datasets_num_private_threads=None,
                           drop_remainder=False, skip_records=0, take_records=None, seed=None):
  """Turns a dataset of serialized records into batches of (image, label).

  Args:
    dataset: tf.data.Dataset of serialized records, in the order they should be read.
    is_training: shuffle, repeat ``num_epochs`` times and augment.
    batch_size: examples per batch (per input pipeline).
    shuffle_buffer: records in the shuffle buffer (training only).
    parse_record_fn: (record, is_training, dtype, augment_seed=None) -> (image, label);
      ``augment_seed`` (int64 [2], or None for TensorFlow's stateful random ops) seeds the
      training augmentation of that one record.
    num_epochs: repetitions when training; evaluation always reads each record once.
    dtype: image dtype.
    datasets_num_private_threads: size of a private thread pool for tf.data, or None.
    drop_remainder: drop the final partial batch (never for evaluation: every image counts).
    skip_records: records to leave out at the start, before they are decoded (a resumed dump
      skips the images it had written); evaluation order only.
    take_records: read only this many records (after the skipped ones; None: all), e.g. one
      worker's part of a sharded dump.
    seed: training only: seeds the shuffle and every record's augmentation, so the stream of
      batches is the same in every run and every process (None: unseeded, as officially).

  Returns:
    A dataset of ([batch, height, width, channels] images, [batch] int32 labels).
  """
  if (skip_records or take_records is not None) and is_training:
    raise ValueError('skip_records and take_records are for the fixed order of evaluation')
  if skip_records:
    dataset = dataset.skip(skip_records)
  if take_records is not None:
    dataset = dataset.take(take_records)
  dataset = dataset.prefetch(buffer_size=batch_size)
  if is_training:
    dataset = dataset.shuffle(buffer_size=shuffle_buffer, seed=seed)
    dataset = dataset.repeat(num_epochs)
  if is_training and seed is not None:
    # A key per record, in stream order, drawn from its own seeded sequence: the augmentation
    # then depends on the record's place in the stream, not on which thread decodes it first.
    keys = tf.data.Dataset.random(seed=seed)
    dataset = tf.data.Dataset.zip((dataset, keys)).map(
        lambda record, key: parse_record_fn(
            record, is_training, dtype, augment_seed=tf.stack([key, tf.constant(seed, tf.int64)])),
        num_parallel_calls=tf.data.experimental.AUTOTUNE, deterministic=True)
  else:
    dataset = dataset.map(lambda record: parse_record_fn(record, is_training, dtype),
                          num_parallel_calls=tf.data.experimental.AUTOTUNE,
                          deterministic=not is_training)
  dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
  dataset = dataset.prefetch(buffer_size=tf.data.experimental.AUTOTUNE)
  if datasets_num_private_threads:
    options = tf.data.Options()
    options.threading.private_threadpool_size = datasets_num_private_threads
    dataset = dataset.with_options(options)
  return dataset


def get_synth_input_fn(height, width, num_channels, num_classes, dtype=tf.float32):
  """An input function of random images, to measure the model without the input pipeline."""
  def input_fn(is_training, data_dir, batch_size, num_epochs=1, dtype=dtype, split=None,
               **unused_kwargs):
    del is_training, data_dir, num_epochs, split
    images = tf.random.truncated_normal([batch_size, height, width, num_channels], dtype=dtype,
                                        mean=127, stddev=60, name='synthetic_inputs')
    labels = tf.random.uniform([batch_size], minval=0, maxval=num_classes - 1, dtype=tf.int32,
                               name='synthetic_labels')
    return tf.data.Dataset.from_tensors((images, labels)).repeat()
  return input_fn
