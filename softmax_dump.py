"""Softmax dumps: every requested exit's probabilities for a whole split, from one forward pass.

Writes the layout of ``dump_layout`` (labels and per-exit probabilities, row i the same image in
every file) on one device with ``Estimator.predict``, or on every replica of a MirroredStrategy at
once (``predict_with_strategy``: ``Estimator.predict`` has no strategies), with each global batch
cut into one non-empty share per replica (``split_into_replica_batches``). A dump checks its
labels against the dumps already in the folder, batch by batch; it resumes after a kill and skips
a split already dumped from the same checkpoint (``dump_writer.SplitDump``); and it can be one
part of a split sharded over several workers (``dump_softmax_part``).
"""

import hashlib
import inspect
import os
import time

import numpy as np
import tensorflow.compat.v1 as tf
from absl import logging

import dump_layout
import dump_writer


def split_into_replica_batches(dataset, num_replicas, per_replica_batch):
  """Splits every (features dict, labels) batch into one share per replica, none of them empty.

  A finite evaluation under MirroredStrategy (graph mode) feeds the replicas the batches in
  turn and gives up on the step in which one replica finds none left: the images another
  replica already holds are then counted or dropped depending on which op runs first. Cutting
  each global batch into exactly one share per replica makes every step complete, so every
  image is evaluated exactly once. A share that would hold no image (the last global batch
  may be short) holds a copy of the batch's first image instead, marked ``features['valid']``
  False: the metrics give it no weight and the dumps drop it. No replica ever runs an empty
  batch, which oneDNN's kernels (TensorFlow's default on Intel Xeons) cannot.

  Args:
    dataset: (features dict, labels) batches of up to ``num_replicas * per_replica_batch``
      images, every tensor batched in its first dimension.
    num_replicas: replicas fed by this pipeline.
    per_replica_batch: images per replica and step.

  Returns:
    A dataset with ``num_replicas`` times as many batches, of 1 to ``per_replica_batch``
    images each; their features carry ``valid`` (bool [n]).
  """
  def split(features, labels):
    count = tf.shape(labels)[0]
    starts = tf.minimum(tf.range(num_replicas) * per_replica_batch, count)
    ends = tf.minimum(starts + per_replica_batch, count)
    padding = ends <= starts
    starts = tf.where(padding, tf.zeros_like(starts), starts)
    ends = tf.where(padding, tf.ones_like(ends), ends)

    def share(start, end, padding):
      part_features, part_labels = tf.nest.map_structure(lambda t: t[start:end],
                                                         (features, labels))
      part_features = dict(part_features, valid=tf.fill([end - start],
                                                        tf.logical_not(padding)))
      return part_features, part_labels
    return tf.data.Dataset.from_tensor_slices((starts, ends, padding)).map(share)
  return dataset.flat_map(split)


def predict_with_strategy(strategy, model_fn, input_fn, checkpoint, session_config=None):
  """Predicts on every replica of ``strategy`` at once (graph mode), batch by batch.

  ``Estimator.predict`` ignores distribution strategies and predicts on one device; this
  builds the PREDICT graph once per replica under ``strategy`` instead, restores
  ``checkpoint`` and runs the replicas side by side until the input ends.

  Args:
    strategy: a tf.compat.v1 distribution strategy, e.g. MirroredStrategy over N devices.
    model_fn: (features, labels, mode) -> EstimatorSpec whose ``predictions`` is a dict of
      [batch, ...] tensors.
    input_fn: (input_context) -> dataset of feature batches that hands the replicas their
      batches in turn, so every step gives each replica exactly one batch (see
      ``split_into_replica_batches``; rows whose prediction ``valid`` is False are padding and
      are dropped). With a dataset that ends in mid-step, the replicas still holding a batch in
      that step would drop it.
    checkpoint: the checkpoint prefix to restore.
    session_config: tf.ConfigProto of the session, or None.

  Returns:
    (devices, batches): the device of each replica's predictions, in replica order; and a
    generator that restores the checkpoint when first advanced, then yields per step a pair
    (dict name -> numpy [global batch, ...] with replica 0's rows first, i.e. in input order,
    as ``Estimator.predict(yield_single_examples=False)`` gives; the number of rows of each
    replica).
  """
  graph = tf.Graph()
  with graph.as_default(), strategy.scope():
    iterator = strategy.make_input_fn_iterator(input_fn)
    features = iterator.get_next()

    def replica_fn(replica_features):
      return model_fn(replica_features, None, tf.estimator.ModeKeys.PREDICT).predictions
    per_replica = strategy.extended.call_for_each_replica(replica_fn, args=(features,))
    # One dict per replica, in replica order. Fetching them apart and concatenating in numpy
    # (not with tf.concat on one device) adds no cross-device copy and counts each replica's rows.
    replica_outputs = [dict(zip(per_replica, values, strict=True)) for values in zip(
        *(strategy.experimental_local_results(t) for t in per_replica.values()), strict=True)]
    devices = [next(iter(outputs.values())).device for outputs in replica_outputs]
    saver = tf.train.Saver()
    initializer = iterator.initialize()
  graph.finalize()

  def batches():
    with tf.Session(graph=graph, config=session_config) as sess:
      saver.restore(sess, checkpoint)
      sess.run(initializer)
      while True:
        try:
          outputs = sess.run(replica_outputs)
        except tf.errors.OutOfRangeError:
          return
        # Padding images (features['valid'] False) are dropped here, replica by replica.
        outputs = [_real_rows(o) for o in outputs]
        rows = [len(next(iter(o.values()))) for o in outputs]
        yield {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}, rows
  return devices, batches()


def _real_rows(outputs):
  """A replica's prediction dict without its padding rows (and without the ``valid`` mask)."""
  outputs = dict(outputs)
  valid = outputs.pop('valid', None)
  if valid is None:
    return outputs
  return {name: value[valid] for name, value in outputs.items()}


def _predict_batches(estimator, input_fn, split):
  """The estimator's prediction batches, on every replica of its evaluation strategy.

  Yields:
    dicts name -> numpy [batch, ...], in input order.
  """
  strategy = estimator.config.eval_distribute
  if strategy is None or strategy.num_replicas_in_sync == 1:
    # Estimator.predict places the graph by TF's default: the first GPU if there is one.
    default_device = '/gpu:0' if tf.config.list_logical_devices('GPU') else '/cpu:0'
    logging.info('dump %s: predicting on one device (Estimator.predict, %s)', split,
                 default_device)
    yield from estimator.predict(input_fn, yield_single_examples=False)
    return
  checkpoint = tf.train.latest_checkpoint(estimator.model_dir)
  if not checkpoint:
    raise ValueError(f'{estimator.model_dir} holds no checkpoint to dump the softmax of; train '
                     'first or pass --pretrained_model_checkpoint_path')
  if 'input_context' not in inspect.signature(input_fn).parameters:
    raise TypeError('a dump over several replicas needs an input_fn(input_context) that splits '
                    'each global batch into one batch per replica (split_into_replica_batches)')

  def model_fn(features, labels, mode):
    return estimator.model_fn(features, labels, mode, estimator.config)
  devices, batches = predict_with_strategy(strategy, model_fn, input_fn, checkpoint,
                                           estimator.config.session_config)
  logging.info('dump %s: predicting with %s on %d replicas: %s', split,
               type(strategy).__name__, len(devices), ', '.join(devices))
  replica_rows = [0] * len(devices)
  for batch, rows in batches:
    replica_rows = [total + new for total, new in zip(replica_rows, rows, strict=True)]
    yield batch
  logging.info('dump %s: images predicted per replica: %s', split,
               ', '.join(f'{device}: {count}'
                         for device, count in zip(devices, replica_rows, strict=True)))


# A killed dump resumes from its last commit: every minute, a kill loses at most that much work.
COMMIT_SECONDS = 60


def job_key(split, exits, checkpoint):
  """The name of a dump job's files: the same split, exits and checkpoint give the same name.

  A rerun of a killed job finds its partial files by it; two jobs for different exits into the
  same folder (e.g. one process per exit) never share a file.
  """
  digest = hashlib.sha1(os.path.abspath(checkpoint).encode()).hexdigest()[:10]
  return '{}-clf{}-{}'.format(split, '_'.join(str(e) for e in sorted(exits)), digest)


def dump_softmax(estimator, make_input_fn, softmax_dir, split, exits, manifest_common,
                 check_count=None, commit_seconds=COMMIT_SECONDS):
  """Writes ``split``'s labels and every exit's probabilities, all from one forward pass.

  Resumable and safe beside other dumps into the same folder (``dump_writer.SplitDump``): a
  split already dumped from the same checkpoint is skipped; a killed dump continues after the
  rows it had committed, and the files it finishes are byte for byte those of an uninterrupted
  dump (the skipped images are whole global batches, so every later batch is the same). On an
  error, nothing of this job is left behind.

  Args:
    estimator: the Estimator; its model_dir's latest checkpoint is used, on every replica of
      its evaluation strategy (``Estimator.predict`` when there is one replica).
    make_input_fn: skip_records -> input_fn(input_context=None) -> dataset of {'image',
      'label'} batches, fixed order, each image once, leaving out the first ``skip_records``;
      over several replicas, one batch per replica and step (see ``predict_with_strategy``).
    softmax_dir: the dump folder (see dump_layout).
    split: 'validation' or 'train'.
    exits: exit ids to write.
    manifest_common: split-independent manifest fields (``checkpoint`` among them).
    check_count: optional rows -> None that raises ValueError when the split should hold
      another number of images; called before anything is published.
    commit_seconds: seconds between commits, the points a killed dump resumes from.

  Returns:
    The number of rows of the split's dump.
  """
  checkpoint = manifest_common['checkpoint']
  done = dump_layout.completed_exits(softmax_dir, split, checkpoint)
  if set(exits) <= done:
    rows = dump_layout.read_manifest(softmax_dir)['splits'][split]['num_images']
    logging.info('dump %s: exits %s were dumped from %s before (%d images); skipped', split,
                 list(exits), checkpoint, rows)
    return rows
  dump = dump_writer.SplitDump(softmax_dir, split, exits, manifest_common['num_classes'],
                               job_key(split, exits, checkpoint))
  resumed = rows = dump.rows_done
  labels_check = _LabelsCheck(softmax_dir, split, resumed)
  start = last_commit = time.time()
  try:
    for batch in _predict_batches(estimator, make_input_fn(resumed), split):
      labels_check.next_batch(batch['label'])
      dump.write(batch['label'], {e: batch[f'clf{e}_probabilities'] for e in exits})
      rows += len(batch['label'])
      if time.time() - last_commit >= commit_seconds:
        dump.commit()
        last_commit = time.time()
        logging.info('dump %s: %d images, %.1f images/s', split, rows,
                     (rows - resumed) / (last_commit - start))
    labels_check.finish()
    if check_count is not None:
      check_count(rows)
  except (KeyboardInterrupt, SystemExit):
    dump.commit()   # Interrupted, not failed: a rerun continues from here.
    raise
  except OSError as e:
    dump.abort()
    # A full or read-only disk: say which folder (a failed write names no file).
    raise OSError(e.errno, e.strerror,
                  e.filename or dump_layout.split_dir(softmax_dir, split)) from e
  except BaseException:
    dump.abort()
    raise
  rows = dump.finish(manifest_common)
  logging.info('dumped %s: %d images, exits %s, into %s (%.1f images/s)', split, rows,
               list(exits), dump_layout.split_dir(softmax_dir, split),
               (rows - resumed) / max(time.time() - start, 1e-9))
  return rows


class _LabelsCheck:
  """A dump must describe the same images, in the same order, as the dumps already there.

  Checked batch by batch, so a dump over another data set stops at its first batch rather than
  after the whole split.
  """

  def __init__(self, softmax_dir, split, first_row=0):
    self._where = dump_layout.split_dir(softmax_dir, split)
    path = dump_layout.labels_path(softmax_dir, split)
    self._existing = np.load(path, mmap_mode='r') if os.path.exists(path) else None
    self._rows = first_row   # a resumed dump starts after the rows it had written

  def next_batch(self, labels):
    if self._existing is None:
      return
    expected = self._existing[self._rows:self._rows + len(labels)]
    self._rows += len(labels)
    if not np.array_equal(expected, labels):
      self._fail('from image {} on'.format(self._rows - len(labels)))

  def finish(self):
    if self._existing is not None and self._rows != len(self._existing):
      self._fail('in number')

  def _fail(self, how):
    raise ValueError(
        f'{self._where} already holds labels for {len(self._existing)} images that differ {how} '
        'from the images of this run (another data set, split order or record set?); dump into '
        'another --softmax_dir or delete the old dumps')


def dump_softmax_part(estimator, make_input_fn, softmax_dir, split, exits, manifest_common,
                      part, num_parts, num_images, batch_size, check_count=None,
                      commit_seconds=COMMIT_SECONDS):
  """Dumps part ``part`` of ``num_parts`` of a split; the worker finishing last joins the parts.

  Each worker of a cluster (or each independent process of e.g. a SLURM array) predicts a
  disjoint, contiguous run of whole global batches (``dump_writer.part_rows``), resumably, into
  a part folder of its own; the joined files equal a one-process dump, row for row and byte for
  byte. A rerun after a killed worker redoes only its unfinished part.

  Args:
    make_input_fn: (skip_records, take_records) -> input_fn of the split's batches from record
      ``skip_records`` on, ``take_records`` of them (None: to the end).
    num_images: the split's image count (where the parts start); batch_size: the global batch.
    Others: as for ``dump_softmax``.

  Returns:
    The split's rows once joined, or None while other parts are missing.
  """
  checkpoint = manifest_common['checkpoint']
  if set(exits) <= dump_layout.completed_exits(softmax_dir, split, checkpoint):
    rows = dump_layout.read_manifest(softmax_dir)['splits'][split]['num_images']
    logging.info('dump %s: exits %s were dumped from %s before (%d images); skipped', split,
                 list(exits), checkpoint, rows)
    return rows
  key = job_key(split, exits, checkpoint)
  start, end = dump_writer.part_rows(num_images, batch_size, part, num_parts)
  logging.info('dump %s: part %d of %d, images %d to %s', split, part, num_parts, start,
               'the end' if end is None else end - 1)

  def make_part_input_fn(skip_records):
    take = None if end is None else end - start - skip_records
    return make_input_fn(start + skip_records, take)
  dump_softmax(estimator, make_part_input_fn, dump_writer.part_dir(softmax_dir, key, part,
                                                                   num_parts),
               split, exits, manifest_common, commit_seconds=commit_seconds)
  return dump_writer.join_parts(softmax_dir, split, exits, key, num_parts, manifest_common,
                                check_count)
