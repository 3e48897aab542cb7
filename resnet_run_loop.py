"""Generic Estimator run loop for the cascaded ResNets: train, evaluate, dump softmax, export.

Nothing here knows about a data set. A dataset main (``imagenet_main.py``, ``cifar10_main.py``)
passes its input function, its model factory, its learning-rate schedule and its constants in a
``DatasetSpec``; this module builds the Estimator and runs the job the flags ask for:

* warm start ``--model_dir`` from ``--pretrained_model_checkpoint_path`` (all backbone variables,
  BN moving statistics included, and the final dense layer), after checking that the checkpoint
  fits the model;
* train (all built exits, or with ``--fine_tune`` only the chosen heads on a frozen backbone),
  resumable to the same final global step;
* evaluate, on one device or with ``MirroredStrategy`` over several;
* dump every requested exit's softmax for the validation and training splits in the layout of
  ``dump_layout``, all exits from one forward pass, on one device or with the same
  ``MirroredStrategy`` (``predict_with_strategy``: ``Estimator.predict`` has no strategies);
* export a SavedModel.
"""

import dataclasses
import functools
import inspect
import math
import os
import shutil
import sys
import time
from collections.abc import Callable

import numpy as np
import tensorflow.compat.v1 as tf
from absl import flags, logging

import analyze_imagenet_labels as analysis
import cascade_export
import dump_layout
import resnet_model

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


################################################################################
# Input pipeline helpers shared by the dataset mains.
################################################################################
def process_record_dataset(dataset, is_training, batch_size, shuffle_buffer, parse_record_fn,
                           num_epochs=1, dtype=tf.float32, datasets_num_private_threads=None,
                           drop_remainder=False):
  """Turns a dataset of serialized records into batches of (image, label).

  Args:
    dataset: tf.data.Dataset of serialized records, in the order they should be read.
    is_training: shuffle, repeat ``num_epochs`` times and augment.
    batch_size: examples per batch (per input pipeline).
    shuffle_buffer: records in the shuffle buffer (training only).
    parse_record_fn: (record, is_training, dtype) -> (image, label).
    num_epochs: repetitions when training; evaluation always reads each record once.
    dtype: image dtype.
    datasets_num_private_threads: size of a private thread pool for tf.data, or None.
    drop_remainder: drop the final partial batch (never for evaluation: every image counts).

  Returns:
    A dataset of ([batch, height, width, channels] images, [batch] int32 labels).
  """
  dataset = dataset.prefetch(buffer_size=batch_size)
  if is_training:
    dataset = dataset.shuffle(buffer_size=shuffle_buffer)
    dataset = dataset.repeat(num_epochs)
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


################################################################################
# Learning rate.
################################################################################
def learning_rate_with_decay(batch_size, batch_denom, num_images, boundary_epochs, decay_rates,
                             base_lr=0.1, warmup=False, warmup_epochs=5):
  """A piecewise-constant schedule scaled by batch size, with an optional linear warm-up.

  Args:
    batch_size: global batch size; the rate scales as base_lr * batch_size / batch_denom.
    batch_denom: the batch size ``base_lr`` was tuned for.
    num_images: training images per epoch.
    boundary_epochs: epochs at which the rate changes.
    decay_rates: multipliers of the initial rate before, between and after the boundaries.
    base_lr: rate for a batch of ``batch_denom``.
    warmup: ramp linearly from 0 over the first ``warmup_epochs`` epochs.
    warmup_epochs: length of the warm-up.

  Returns:
    A function global_step -> learning rate tensor.
  """
  initial_learning_rate = base_lr * batch_size / batch_denom
  batches_per_epoch = num_images / batch_size
  boundaries = [int(batches_per_epoch * epoch) for epoch in boundary_epochs]
  values = [initial_learning_rate * decay for decay in decay_rates]

  def learning_rate_fn(global_step):
    rate = tf.train.piecewise_constant(global_step, boundaries, values)
    if warmup:
      warmup_steps = int(batches_per_epoch * warmup_epochs)
      warmup_rate = (initial_learning_rate * tf.cast(global_step, tf.float32) /
                     tf.cast(warmup_steps, tf.float32))
      return tf.cond(global_step < warmup_steps, lambda: warmup_rate, lambda: rate)
    return rate
  return learning_rate_fn


################################################################################
# Which exits a run builds and trains.
################################################################################
ALL_EXITS = 'all'


def parse_classifier_id(classifier_id, num_exits=3):
  """Turns a classifier id (0..num_exits-1, or 'all') into the sorted tuple of exits to build."""
  if isinstance(classifier_id, str) and classifier_id.strip().lower() == ALL_EXITS:
    return tuple(range(num_exits))
  try:
    exit_id = int(classifier_id)
  except (TypeError, ValueError):
    exit_id = None
  if exit_id is None or not 0 <= exit_id < num_exits:
    raise ValueError(f'classifier_id must be one of {list(range(num_exits))} or '
                     f'{ALL_EXITS!r}, got {classifier_id!r}')
  return (exit_id,)


def built_exits(classifier_id, num_exits):
  """Exits whose logits the graph holds: the chosen one, or all for 'all'."""
  return parse_classifier_id(classifier_id, num_exits)


def trained_exits(classifier_id, num_exits, fine_tune):
  """Exits whose loss is minimised.

  With ``--fine_tune --classifier_id all`` only the early-exit heads train (the final classifier
  is the pretrained one); otherwise every built exit trains.
  """
  exits = built_exits(classifier_id, num_exits)
  if fine_tune and len(exits) > 1:
    exits = tuple(e for e in exits if e != num_exits - 1)
  return exits


def trained_variable_groups(classifier_id, num_exits, fine_tune):
  """Variable groups that receive gradients; None means every trainable variable."""
  if not fine_tune:
    return None
  return {resnet_model.head_group(e, num_exits)
          for e in trained_exits(classifier_id, num_exits, fine_tune)}


################################################################################
# Model function.
################################################################################
def _images_labels_valid(features, labels):
  """Features arrive as an image tensor, or as a dict carrying the labels along (dumps) and a
  mask of the real images (``valid``, under a strategy: see ``split_into_replica_batches``)."""
  if isinstance(features, dict):
    return features['image'], features.get('label', labels), features.get('valid')
  return features, labels, None


def resnet_model_fn(features, labels, mode, params):
  """Estimator model function for the cascaded ResNets.

  ``params`` (all read here, never global flags):
    model_factory: (data_format, dtype) -> resnet_model.Model.
    classifier_id: 0, 1, 2 or 'all' (exits to build; see ``trained_exits`` for training).
    fine_tune: train only the chosen heads; the backbone's BNs stay in inference mode.
    data_format, dtype ('fp32' or 'fp16'), loss_scale, weight_decay, momentum,
    learning_rate_fn: global_step -> rate.
    model_dir (optional): in training graphs, the variables of its latest checkpoint that this
      graph does not build (e.g. the later stages when only exit 0 trains) are carried along,
      so the checkpoints the run writes still hold the whole model.

  Predictions per built exit k: ``clf<k>_probabilities`` [batch, num_classes] float32 and
  ``clf<k>_classes`` [batch] int64; plus ``label`` when the features carry labels.
  """
  images, labels, valid = _images_labels_valid(features, labels)
  dtype = tf.float16 if params['dtype'] == 'fp16' else tf.float32
  model = params['model_factory'](params['data_format'], dtype)
  num_exits = model.num_exits
  images = tf.cast(images, dtype)
  is_training = mode == tf.estimator.ModeKeys.TRAIN
  # While heads fine-tune, the backbone is frozen: its BNs must use (and keep) the pretrained
  # moving statistics, so they run in inference mode even though the heads train.
  backbone_training = is_training and not params['fine_tune']
  exit_logits = model(images, training=is_training, backbone_training=backbone_training,
                      exits=built_exits(params['classifier_id'], num_exits))
  exit_logits = {k: tf.cast(v, tf.float32) for k, v in exit_logits.items()}

  predictions = {}
  for exit_id, logits in exit_logits.items():
    predictions[f'clf{exit_id}_probabilities'] = tf.nn.softmax(
        logits, name=f'clf{exit_id}_softmax')
    predictions[f'clf{exit_id}_classes'] = tf.argmax(logits, axis=1)

  if mode == tf.estimator.ModeKeys.PREDICT:
    export_outputs = {'predict': tf.estimator.export.PredictOutput(dict(predictions))}
    if labels is not None:
      predictions['label'] = tf.identity(labels)
    if valid is not None:
      predictions['valid'] = tf.identity(valid)
    return tf.estimator.EstimatorSpec(mode=mode, predictions=predictions,
                                      export_outputs=export_outputs)

  labels = tf.cast(labels, tf.int32)
  # Padding images (a replica's share of the last batch may be nothing but padding) weigh 0.
  weights = None if valid is None else tf.cast(valid, tf.float32)
  if is_training:
    loss_exits = trained_exits(params['classifier_id'], num_exits, params['fine_tune'])
  else:
    loss_exits = tuple(sorted(exit_logits))
  cross_entropy = {
      k: tf.losses.sparse_softmax_cross_entropy(labels=labels, logits=exit_logits[k],
                                                weights=1.0 if weights is None else weights,
                                                reduction=tf.losses.Reduction.MEAN,
                                                loss_collection=None)
      for k in loss_exits}
  total_cross_entropy = tf.add_n(list(cross_entropy.values()), name='cross_entropy')
  tf.summary.scalar('cross_entropy', total_cross_entropy)

  groups = trained_variable_groups(params['classifier_id'], num_exits, params['fine_tune'])
  trainable = [v for v in tf.trainable_variables()
               if groups is None or resnet_model.variable_group(v.op.name, num_exits) in groups]
  # Weight decay on the kernels that train (not on biases or BN parameters).
  decayed = [v for v in trainable if v.op.name.endswith('/kernel')]
  l2_loss = params['weight_decay'] * tf.add_n(
      [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in decayed] or [tf.constant(0.0)])
  tf.summary.scalar('l2_loss', l2_loss)
  loss = total_cross_entropy + l2_loss

  metrics = {}
  for exit_id in sorted(exit_logits):
    top1 = tf.metrics.accuracy(labels, predictions[f'clf{exit_id}_classes'], weights=weights)
    top5 = tf.metrics.mean(tf.nn.in_top_k(exit_logits[exit_id], labels, 5), weights=weights)
    metrics[f'clf{exit_id}/accuracy'] = top1
    metrics[f'clf{exit_id}/accuracy_top_5'] = top5
  # 'accuracy' is the number --stop_threshold watches: the deepest exit the run evaluates.
  deepest = max(exit_logits)
  metrics['accuracy'] = metrics[f'clf{deepest}/accuracy']
  metrics['accuracy_top_5'] = metrics[f'clf{deepest}/accuracy_top_5']

  train_op = None
  if is_training:
    global_step = tf.train.get_or_create_global_step()
    learning_rate = tf.identity(params['learning_rate_fn'](global_step), name='learning_rate')
    tf.summary.scalar('learning_rate', learning_rate)
    for exit_id in loss_exits:
      # Batch accuracy of each trained head, for the logs and TensorBoard.
      correct = tf.cast(tf.equal(tf.cast(predictions[f'clf{exit_id}_classes'], tf.int32),
                                 labels), tf.float32)
      in_top5 = tf.cast(tf.nn.in_top_k(exit_logits[exit_id], labels, 5), tf.float32)
      tf.identity(tf.reduce_mean(correct), name=f'clf{exit_id}_train_accuracy')
      tf.identity(tf.reduce_mean(in_top5), name=f'clf{exit_id}_train_accuracy_top_5')
      tf.summary.scalar(f'clf{exit_id}/train_accuracy', tf.reduce_mean(correct))
      tf.summary.scalar(f'clf{exit_id}/train_accuracy_top_5', tf.reduce_mean(in_top5))
      tf.summary.scalar(f'clf{exit_id}/cross_entropy', cross_entropy[exit_id])
    optimizer = tf.train.MomentumOptimizer(learning_rate=learning_rate,
                                           momentum=params['momentum'])
    loss_scale = params['loss_scale']
    # fp16 gradients underflow; scale the loss up and the gradients back down.
    grads_and_vars = optimizer.compute_gradients(loss * loss_scale, var_list=trainable)
    if loss_scale != 1:
      grads_and_vars = [(g / loss_scale, v) for g, v in grads_and_vars if g is not None]
    minimize_op = optimizer.apply_gradients(grads_and_vars, global_step)
    # Only BNs in training mode register moving-average updates: the heads', or everyone's
    # when the whole network trains. A frozen backbone has none.
    update_ops = tf.get_collection(tf.GraphKeys.UPDATE_OPS)
    train_op = tf.group(minimize_op, update_ops)
    if params.get('model_dir'):
      carry_unbuilt_variables(tf.train.latest_checkpoint(params['model_dir']))

  return tf.estimator.EstimatorSpec(mode=mode, predictions=predictions, loss=loss,
                                    train_op=train_op, eval_metric_ops=metrics)


################################################################################
# Checkpoints and warm start.
################################################################################
def resolve_checkpoint(path):
  """A checkpoint prefix from a prefix or a directory (as the official tarballs unpack)."""
  if not path:
    return None
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest:
      return latest
    # Tarballs may hold a prefix but no 'checkpoint' state file.
    prefixes = sorted({f[:-len('.index')] for f in tf.io.gfile.listdir(path)
                       if f.endswith('.index')})
    if len(prefixes) == 1:
      return os.path.join(path, prefixes[0])
    raise FileNotFoundError(
        '--pretrained_model_checkpoint_path {} is a folder without a checkpoint ({}); pass the '
        'folder the checkpoint tarball unpacked to, or a prefix such as <dir>/model.ckpt-225207'
        .format(path, 'several found: ' + ', '.join(prefixes) if prefixes else 'no *.index'))
  if tf.io.gfile.exists(path + '.index'):
    return path
  raise FileNotFoundError(
      f'--pretrained_model_checkpoint_path {path}: no such checkpoint (neither a folder nor a '
      f'prefix with {path}.index); download and unpack the pretrained model first (see README)')


def checkpoint_mismatches(model_variables, checkpoint_shapes):
  """Lists the model variables that a checkpoint cannot fill.

  Args:
    model_variables: dict name -> shape (list) of the variables to restore.
    checkpoint_shapes: dict name -> shape of the checkpoint's variables.

  Returns:
    A list of human-readable mismatches (missing names, shape differences), in model order.
  """
  problems = []
  for name, shape in model_variables.items():
    if name not in checkpoint_shapes:
      problems.append(f'{name} {list(shape)} is not in the checkpoint')
    elif list(checkpoint_shapes[name]) != list(shape):
      problems.append(f'{name} has shape {list(shape)} in the model but '
                      f'{list(checkpoint_shapes[name])} in the checkpoint')
  return problems


def optimizer_slot_names(names):
  """The names among ``names`` that are optimizer slots, e.g. 'resnet_model/dense/kernel/Momentum'.

  A slot lives under the name of the variable it belongs to, which no model variable does.
  """
  names = set(names)
  return {name for name in names if name.rpartition('/')[0] in names}


def carry_unbuilt_variables(checkpoint):
  """Re-creates in the current graph the model variables of ``checkpoint`` it does not build.

  A run that builds only part of the model (``--classifier_id 0`` stops after exit 0's stage)
  would otherwise save checkpoints without the rest of the network, and the final classifier
  and later stages restored into ``model_dir`` would be lost. The stand-ins are non-trainable
  and used by no op, so they are restored and saved unchanged.

  Returns:
    The names of the variables created.
  """
  if not checkpoint or tf.get_variable_scope().reuse:
    # Under MirroredStrategy the replicas after the first reuse the first one's variables
    # (their variable scope says so), stand-ins included.
    return []
  built = {v.op.name for v in tf.global_variables()}
  reader = tf.train.load_checkpoint(checkpoint)
  dtypes = reader.get_variable_to_dtype_map()
  carried = []
  for name, shape in sorted(reader.get_variable_to_shape_map().items()):
    if name in built or not name.startswith(resnet_model.MODEL_SCOPE + '/'):
      continue
    tf.get_variable(name, shape, dtypes[name], initializer=tf.zeros_initializer(),
                    trainable=False, collections=[tf.GraphKeys.GLOBAL_VARIABLES])
    carried.append(name)
  return carried


def warm_start_variables(variables, checkpoint_shapes, num_exits):
  """Variables to take from a pretrained checkpoint.

  Every backbone and final-dense variable (BN moving statistics included) must come from it;
  an exit head is taken too when the checkpoint holds all of that head's variables (e.g. heads
  trained by the original cascaded code), otherwise it starts fresh. Optimizer slots (momentum)
  always start fresh: the pretrained run's momentum means nothing to the new training.
  """
  slots = optimizer_slot_names(v.op.name for v in variables)
  variables = [v for v in variables if v.op.name not in slots]
  chosen = [v for v in variables
            if resnet_model.variable_group(v.op.name, num_exits) in ('backbone', 'final_dense')]
  for exit_id in range(num_exits - 1):
    head = resnet_model.variables_of(f'exit{exit_id}', variables, num_exits)
    if head and all(v.op.name in checkpoint_shapes for v in head):
      chosen.extend(head)
  return chosen


def warm_start_model_dir(model_dir, pretrained_path, model_fn, params, image_shape):
  """Writes a step-0 checkpoint of the full model, initialised from a pretrained checkpoint.

  Materialising the warm start as a checkpoint in ``model_dir`` (instead of warm-starting each
  Estimator call) makes training, evaluation, prediction and every distribution strategy
  restore the same values the same way, and keeps the official rule: once ``model_dir`` has a
  checkpoint, it wins.

  Returns:
    The global step recorded in the pretrained checkpoint (for the manifest), or None.
  """
  checkpoint = resolve_checkpoint(pretrained_path)
  reader = tf.train.load_checkpoint(checkpoint)
  checkpoint_shapes = reader.get_variable_to_shape_map()
  graph = tf.Graph()
  with graph.as_default():
    # The training graph of the whole model with every variable trainable creates everything
    # any later run on this model_dir restores: all exits (a run that builds only exit 0 keeps
    # the later stages and the final classifier), every optimizer slot, the global step.
    images = tf.zeros([1] + list(image_shape), tf.float32)
    labels = tf.zeros([1], tf.int32)
    model_fn(images, labels, tf.estimator.ModeKeys.TRAIN,
             dict(params, classifier_id=ALL_EXITS, fine_tune=False))
    variables = tf.global_variables()
    num_exits = params['model_factory'](params['data_format'], tf.float32).num_exits
    chosen = warm_start_variables(variables, checkpoint_shapes, num_exits)
    wanted = {v.op.name: v.shape.as_list() for v in chosen}
    problems = checkpoint_mismatches(wanted, checkpoint_shapes)
    if problems:
      raise ValueError(
          'the pretrained checkpoint {} does not fit the model ({} of {} variables):\n  {}\n'
          'Check --resnet_version (-rv), --resnet_size (-rs) and the class count: the official '
          'ImageNet checkpoints are -rv 2 -rs 50 with 1001 classes for '
          'resnet_imagenet_v2_fp32_20181001.'.format(
              checkpoint, len(problems), len(wanted), '\n  '.join(problems[:10])))
    tf.train.init_from_checkpoint(checkpoint, {name: name for name in wanted})
    step = reader.get_tensor('global_step') if reader.has_tensor('global_step') else None
    tf.io.gfile.makedirs(model_dir)
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      tf.train.Saver().save(sess, os.path.join(model_dir, 'model.ckpt'),
                            global_step=tf.train.get_global_step())
  logging.info('Warm-started %d variables (backbone, BN statistics, final dense%s) from %s into '
               '%s', len(wanted), ', exit heads' if any(
                   resnet_model.variable_group(n, num_exits).startswith('exit') for n in wanted)
               else '', checkpoint, model_dir)
  return None if step is None else int(step)


def check_model_dir_fits(model_dir, model_fn, params, image_shape, training=True):
  """Raises a clear error if model_dir's checkpoint lacks variables this run's model needs.

  A training run needs the optimizer slots of what it trains too; evaluation and dumps (and
  ``training=False``) only the model's variables, so a model_dir written by a fine-tuning run
  (momentum for the heads only) can always be evaluated.
  """
  checkpoint = tf.train.latest_checkpoint(model_dir)
  if not checkpoint:
    return
  checkpoint_shapes = tf.train.load_checkpoint(checkpoint).get_variable_to_shape_map()
  graph = tf.Graph()
  with graph.as_default():
    mode = tf.estimator.ModeKeys.TRAIN if training else tf.estimator.ModeKeys.PREDICT
    model_fn(tf.zeros([1] + list(image_shape)), tf.zeros([1], tf.int32), mode, params)
    wanted = {v.op.name: v.shape.as_list() for v in tf.global_variables()}
  problems = checkpoint_mismatches(wanted, checkpoint_shapes)
  if problems:
    raise ValueError(
        'the checkpoint in --model_dir {} does not fit this run\'s model ({} problems):\n  {}\n'
        'It was written by a run with other --resnet_size/--resnet_version/--classifier_id/'
        '--fine_tune flags: use those flags, another --model_dir, or --clean to start '
        'over.'.format(model_dir, len(problems), '\n  '.join(problems[:10])))


################################################################################
# Hooks.
################################################################################
class ExamplesPerSecondHook(tf.train.SessionRunHook):
  """Logs training throughput (examples/s) every ``every_n_steps`` steps."""

  def __init__(self, batch_size, every_n_steps=100):
    self._batch_size = batch_size
    self._every_n_steps = every_n_steps
    self._last = None

  def begin(self):
    self._global_step = tf.train.get_global_step()

  def before_run(self, run_context):
    return tf.train.SessionRunArgs(self._global_step)

  def after_run(self, run_context, run_values):
    step = run_values.results
    now = time.time()
    if self._last is None:
      self._last = (step, now)
      return
    steps = step - self._last[0]
    if steps >= self._every_n_steps:
      rate = steps * self._batch_size / (now - self._last[1])
      logging.info('global step %d: %.1f examples/s', step, rate)
      self._last = (step, now)


################################################################################
# Softmax dumps.
################################################################################
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


def dump_softmax(estimator, input_fn, softmax_dir, split, exits, manifest_common,
                 expected_images=None):
  """Writes ``split``'s labels and every exit's probabilities, all from one forward pass.

  Args:
    estimator: the Estimator; its model_dir's latest checkpoint is used, on every replica of
      its evaluation strategy (``Estimator.predict`` when there is one replica).
    input_fn: (input_context=None) -> dataset of ({'image', 'label'}) batches, fixed order,
      each image once; over several replicas, one batch per replica and step (see
      ``predict_with_strategy``).
    softmax_dir: the dump folder (see dump_layout).
    split: 'validation' or 'train'.
    exits: exit ids to write.
    manifest_common: split-independent manifest fields.
    expected_images: the split's nominal size, to warn when the records hold another count.

  Returns:
    The number of rows written.
  """
  writers = {'label': dump_layout.NpyRowWriter(
      dump_layout.labels_path(softmax_dir, split), np.int32)}
  num_classes = manifest_common['num_classes']
  for exit_id in exits:
    writers[exit_id] = dump_layout.NpyRowWriter(
        dump_layout.probabilities_path(softmax_dir, split, exit_id), np.float32, (num_classes,))
  labels_check = _LabelsCheck(softmax_dir, split)
  start = time.time()
  try:
    for batch in _predict_batches(estimator, input_fn, split):
      labels_check.next_batch(batch['label'])
      writers['label'].write(batch['label'])
      for exit_id in exits:
        writers[exit_id].write(batch[f'clf{exit_id}_probabilities'])
      rows = writers['label'].num_rows
      if rows // 10000 != (rows - len(batch['label'])) // 10000:
        logging.info('dump %s: %d images, %.1f images/s', split, rows,
                     rows / (time.time() - start))
    labels_check.finish()
  except BaseException:
    for writer in writers.values():
      writer.abort()
    raise
  for writer in writers.values():
    writer.close()
  rows = writers['label'].num_rows
  if expected_images is not None and rows != expected_images:
    logging.warning('dumped %d %s images, but the data set nominally has %d', rows, split,
                    expected_images)
  dump_layout.merge_manifest(softmax_dir, split, rows, exits, manifest_common)
  logging.info('dumped %s: %d images, exits %s, into %s (%.1f images/s)', split, rows,
               list(exits), dump_layout.split_dir(softmax_dir, split),
               rows / max(time.time() - start, 1e-9))
  return rows


class _LabelsCheck:
  """A dump must describe the same images, in the same order, as the dumps already there.

  Checked batch by batch, so a dump over another data set stops at its first batch rather than
  after the whole split.
  """

  def __init__(self, softmax_dir, split):
    self._where = dump_layout.split_dir(softmax_dir, split)
    path = dump_layout.labels_path(softmax_dir, split)
    self._existing = np.load(path, mmap_mode='r') if os.path.exists(path) else None
    self._rows = 0

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


################################################################################
# The job.
################################################################################
@dataclasses.dataclass
class DatasetSpec:
  """What a dataset main tells the run loop."""
  name: str
  input_fn: Callable            # (is_training, data_dir, batch_size, num_epochs, dtype, split,
                                #  datasets_num_private_threads, input_context) -> dataset
  model_factory: Callable       # (data_format, dtype) -> resnet_model.Model
  learning_rate_fn: Callable    # (flags_obj, global batch size) -> (global_step -> rate)
  image_shape: tuple            # (height, width, channels) the model sees
  num_classes: int
  num_images: dict              # split -> nominal image count
  image_bytes_serving_fn: Callable = None   # serialized JPEG -> preprocessed image


def configure_cpu_replicas(count):
  """Splits the CPU into ``count`` logical devices, so MirroredStrategy can run on a CPU."""
  if count <= 1:
    return
  cpu = tf.config.list_physical_devices('CPU')[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if current is not None and len(current) == count:
    return  # Split by an earlier job of this process.
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
  except RuntimeError as e:
    raise RuntimeError(
        f'--cpu_replicas {count} has to split the CPU before TensorFlow starts its runtime, and '
        f'this process has already started it ({e}); run the job in a fresh process, e.g. '
        f'python cifar10_main.py ... --cpu_replicas {count}') from e


def replica_devices(flags_obj):
  """Devices to replicate over, after checking the request against the machine."""
  gpus = tf.config.list_physical_devices('GPU')
  if flags_obj.cpu_replicas > 1:
    return [f'/cpu:{i}' for i in range(flags_obj.cpu_replicas)]
  num_gpus = len(gpus) if flags_obj.num_gpus == -1 else flags_obj.num_gpus
  if num_gpus > len(gpus):
    raise ValueError(
        f'--num_gpus {flags_obj.num_gpus} asks for more GPUs than this machine has '
        f'({len(gpus)}); pass --num_gpus {len(gpus)} (or 0 for the CPU), or install '
        'tensorflow[and-cuda]==2.15.1 if the GPUs are not found')
  if num_gpus == 0:
    return ['/cpu:0']
  return [f'/gpu:{i}' for i in range(num_gpus)]


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


def distribution_strategy(devices):
  if len(devices) == 1:
    return tf.distribute.OneDeviceStrategy(devices[0])
  cross_device_ops = None
  if not all('gpu' in d for d in devices):
    # MirroredStrategy's default for CPU devices, collective all-reduce, never returns from
    # the first training step of a graph-mode Estimator (TF 2.15, logical CPU devices, even
    # for a one-variable model). Reducing on one device works.
    cross_device_ops = tf.distribute.ReductionToOneDevice()
  return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)


def resolve_data_format(requested, devices):
  """channels_first needs a GPU; fall back to channels_last (same variables) on a CPU."""
  on_gpu = any('gpu' in d for d in devices)
  if requested is None:
    return 'channels_first' if on_gpu else 'channels_last'
  if requested == 'channels_first' and not on_gpu:
    logging.warning('--data_format channels_first needs a GPU; running channels_last on this '
                    'CPU-only run (the variables and results are the same)')
    return 'channels_last'
  return requested


def train_schedule(flags_obj):
  """Epoch at which each train/evaluate cycle ends; empty in --eval_only mode."""
  if flags_obj.eval_only or not flags_obj.train_epochs:
    return []
  cycles = math.ceil(flags_obj.train_epochs / flags_obj.epochs_between_evals)
  return [min((cycle + 1) * flags_obj.epochs_between_evals, flags_obj.train_epochs)
          for cycle in range(cycles)]


def resnet_main(flags_obj, spec):
  """Runs the job described by the flags on the data set described by ``spec``.

  Returns:
    dict with the last evaluation results (if any) and the dumped row counts per split.
  """
  devices = replica_devices(flags_obj)
  num_replicas = len(devices)
  if flags_obj.batch_size % num_replicas:
    raise ValueError(
        f'--batch_size {flags_obj.batch_size} does not divide by the {num_replicas} replicas; '
        f'use a multiple of {num_replicas}, e.g. '
        f'{num_replicas * max(1, flags_obj.batch_size // num_replicas)}')
  num_exits = spec.model_factory('channels_last', tf.float32).num_exits
  if not flags_obj.is_cascaded and flags_obj.classifier_id not in (str(num_exits - 1),):
    raise ValueError('--nois_cascaded builds the plain network, whose only classifier is '
                     f'--classifier_id {num_exits - 1}')
  built_exits(flags_obj.classifier_id, num_exits)  # Validates --classifier_id.
  if flags_obj.export_cascade_dir:
    # Check the thresholds before hours of training, not after.
    if not flags_obj.cascade_thresholds:
      raise ValueError('--export_cascade_dir needs --cascade_thresholds (the thresholds.json '
                       'written by analyze_imagenet_labels.py) and --epsilon')
    cascade_export.check_thresholds_fit(
        flags_obj.cascade_thresholds, spec.model_factory('channels_last', tf.float32))
    analysis.load_thresholds(flags_obj.cascade_thresholds, flags_obj.epsilon,
                             flags_obj.cascade_mode)
  # After the checks: a bad flag should fail the same way whether or not TF has started.
  configure_cpu_replicas(flags_obj.cpu_replicas)
  data_format = resolve_data_format(flags_obj.data_format, devices)

  if flags_obj.clean and tf.io.gfile.exists(flags_obj.model_dir):
    logging.info('--clean: deleting %s', flags_obj.model_dir)
    shutil.rmtree(flags_obj.model_dir)

  params = {
      'model_factory': spec.model_factory,
      'classifier_id': flags_obj.classifier_id,
      'fine_tune': flags_obj.fine_tune,
      'data_format': data_format,
      'dtype': flags_obj.dtype,
      'loss_scale': flags_obj.loss_scale or (128 if flags_obj.dtype == 'fp16' else 1),
      'weight_decay': WEIGHT_DECAY,
      'momentum': MOMENTUM,
      'learning_rate_fn': spec.learning_rate_fn(flags_obj, flags_obj.batch_size),
      'model_dir': flags_obj.model_dir,
  }

  pretrained_step = None
  if tf.train.latest_checkpoint(flags_obj.model_dir):
    if flags_obj.pretrained_model_checkpoint_path:
      logging.info('%s already holds a checkpoint: it is used and '
                   '--pretrained_model_checkpoint_path %s is ignored', flags_obj.model_dir,
                   flags_obj.pretrained_model_checkpoint_path)
    check_model_dir_fits(flags_obj.model_dir, resnet_model_fn, params, spec.image_shape,
                         training=bool(train_schedule(flags_obj)))
  elif flags_obj.pretrained_model_checkpoint_path:
    pretrained_step = warm_start_model_dir(
        flags_obj.model_dir, flags_obj.pretrained_model_checkpoint_path, resnet_model_fn,
        params, spec.image_shape)
  elif flags_obj.eval_only:
    raise ValueError('--eval_only needs trained weights: pass '
                     '--pretrained_model_checkpoint_path (-pmcp) or a --model_dir (-md) that '
                     'holds a checkpoint')

  session_config = tf.ConfigProto(
      inter_op_parallelism_threads=flags_obj.inter_op_parallelism_threads,
      intra_op_parallelism_threads=flags_obj.intra_op_parallelism_threads,
      allow_soft_placement=True)
  strategy = distribution_strategy(devices)
  run_config = tf.estimator.RunConfig(
      train_distribute=strategy, eval_distribute=strategy, session_config=session_config,
      save_checkpoints_secs=flags_obj.save_checkpoints_secs,
      save_checkpoints_steps=None, keep_checkpoint_max=5, log_step_count_steps=100)
  if flags_obj.save_checkpoints_steps:
    run_config = run_config.replace(save_checkpoints_secs=None,
                                    save_checkpoints_steps=flags_obj.save_checkpoints_steps)
  estimator = tf.estimator.Estimator(model_fn=resnet_model_fn, model_dir=flags_obj.model_dir,
                                     config=run_config, params=params)

  per_replica_batch = flags_obj.batch_size // num_replicas
  dtype = tf.float16 if flags_obj.dtype == 'fp16' else tf.float32

  def make_input_fn(is_training, split, num_epochs=1, with_labels_in_features=False):
    def input_fn(input_context=None):
      # Under a strategy the replicas of one input pipeline take its batches in turn, so each
      # batch is one replica's share of the global batch.
      local_replicas = 1
      if input_context:
        local_replicas = (input_context.num_replicas_in_sync //
                          input_context.num_input_pipelines)
      split_for_replicas = local_replicas > 1 and not is_training
      if input_context is None:
        batch = flags_obj.batch_size
      else:
        batch = per_replica_batch * (local_replicas if split_for_replicas else 1)
      dataset = spec.input_fn(
          is_training=is_training, data_dir=flags_obj.data_dir, batch_size=batch,
          num_epochs=num_epochs, dtype=dtype, split=split,
          datasets_num_private_threads=flags_obj.datasets_num_private_threads,
          input_context=input_context)
      if with_labels_in_features or split_for_replicas:
        dataset = dataset.map(lambda image, label: ({'image': image, 'label': label}, label))
      if split_for_replicas:
        dataset = split_into_replica_batches(dataset, local_replicas, per_replica_batch)
      if with_labels_in_features:
        dataset = dataset.map(lambda features, label: features)
      return dataset
    return input_fn

  steps_per_epoch = math.ceil(spec.num_images['train'] / flags_obj.batch_size)
  trained = trained_exits(flags_obj.classifier_id, num_exits, flags_obj.fine_tune)
  train_hooks = [ExamplesPerSecondHook(flags_obj.batch_size, flags_obj.log_every_n_steps)]
  if flags_obj.hooks and 'loggingtensorhook' in [h.lower() for h in flags_obj.hooks]:
    tensors = {'learning_rate': 'learning_rate', 'cross_entropy': 'cross_entropy'}
    for exit_id in trained:
      tensors[f'clf{exit_id}_train_accuracy'] = f'clf{exit_id}_train_accuracy'
    train_hooks.append(tf.estimator.LoggingTensorHook(
        tensors=tensors,
        every_n_iter=flags_obj.log_every_n_steps))

  results = {'eval': None, 'dumped': {}}
  # Synthetic input never ends: evaluate a fixed number of batches of it.
  eval_steps = (flags_obj.max_train_steps or 10) if flags_obj.use_synthetic_data else None
  schedule = train_schedule(flags_obj)
  logging.info('%s: %s, exits built %s, trained %s, %d replica(s) on %s, %s, global batch %d',
               spec.name, 'eval only' if not schedule else f'{schedule[-1]} epochs',
               list(built_exits(flags_obj.classifier_id, num_exits)),
               list(trained) if schedule else [], num_replicas, devices, data_format,
               flags_obj.batch_size)
  latest = tf.train.latest_checkpoint(flags_obj.model_dir)
  resumed_step = int(tf.train.load_checkpoint(latest).get_tensor('global_step')) if latest else 0
  for cycle, end_epoch in enumerate(schedule):
    max_steps = end_epoch * steps_per_epoch
    if flags_obj.max_train_steps:
      max_steps = min(max_steps, flags_obj.max_train_steps)
    last_cycle = cycle == len(schedule) - 1 or (
        flags_obj.max_train_steps and max_steps >= flags_obj.max_train_steps)
    if max_steps <= resumed_step and not last_cycle:
      # A rerun after a kill: this cycle was trained (and evaluated) before.
      logging.info('cycle %d/%d: done before (global step %d >= %d), skipped', cycle + 1,
                   len(schedule), resumed_step, max_steps)
      continue
    logging.info('cycle %d/%d: training to epoch %s (global step %d)', cycle + 1,
                 len(schedule), end_epoch, max_steps)
    # max_steps (not steps) makes a rerun after a kill resume where it stopped and end at the
    # same global step as an uninterrupted run.
    estimator.train(make_input_fn(True, 'train', num_epochs=None), hooks=train_hooks,
                    max_steps=max_steps)
    results['eval'] = estimator.evaluate(make_input_fn(False, 'validation'), steps=eval_steps)
    logging.info('evaluation after cycle %d: %s', cycle + 1, _format_metrics(results['eval']))
    if flags_obj.stop_threshold is not None and (
        results['eval']['accuracy'] >= flags_obj.stop_threshold):
      logging.info('accuracy %.4f reached --stop_threshold %.4f', results['eval']['accuracy'],
                   flags_obj.stop_threshold)
      break
    if flags_obj.max_train_steps and max_steps >= flags_obj.max_train_steps:
      break

  if flags_obj.eval_only and flags_obj.evaluate_in_eval_only:
    results['eval'] = estimator.evaluate(make_input_fn(False, 'validation'), steps=eval_steps)
    logging.info('evaluation: %s', _format_metrics(results['eval']))

  if flags_obj.softmax_dir and flags_obj.use_synthetic_data:
    logging.info('synthetic data: no softmax dumps')
  elif flags_obj.softmax_dir:
    exits = built_exits(flags_obj.classifier_id, num_exits)
    model = spec.model_factory(data_format, tf.float32)
    height, width = spec.image_shape[:2]
    checkpoint = tf.train.latest_checkpoint(flags_obj.model_dir)
    common = {
        'dataset': spec.name,
        'model': {'resnet_size': model.resnet_size, 'resnet_version': model.resnet_version,
                  'image_size': [height, width]},
        'num_classes': spec.num_classes,
        'num_exits': num_exits,
        'stage_macs': model.stage_macs(height, width),
        'plain_macs': model.plain_macs(height, width),
        'checkpoint': checkpoint,
        'global_step': int(estimator.get_variable_value('global_step')),
    }
    if pretrained_step is not None:
      common['pretrained_global_step'] = pretrained_step
    splits = ['validation'] + (['train'] if flags_obj.dump_train else [])
    for split in splits:
      results['dumped'][split] = dump_softmax(
          estimator, make_input_fn(False, split, with_labels_in_features=True),
          flags_obj.softmax_dir, split, exits, common, spec.num_images.get(split))

  if flags_obj.export_dir:
    export_model(estimator, spec, flags_obj)
  if flags_obj.export_cascade_dir:
    results['cascade_export'] = cascade_export.export_cascade(
        tf.train.latest_checkpoint(flags_obj.model_dir), spec.model_factory, spec.image_shape,
        flags_obj.cascade_thresholds, flags_obj.epsilon, flags_obj.cascade_mode,
        flags_obj.export_cascade_dir, spec.name, data_format,
        spec.image_bytes_serving_fn if flags_obj.image_bytes_as_serving_input else None,
        flags_obj.cascade_chunk_size)
  return results


def exit_on_user_error(job, flags_obj):
  """The mains' entry: runs ``job(flags_obj)``; a bad flag, file or checkpoint ends in one 'error:'
  line, and TensorFlow's log lines are printed once, by absl's handler.

  Such errors are the user's to fix and their messages say how, so the traceback only goes to
  the debug log (``--verbosity=1`` shows it).
  """
  # TensorFlow gave its logger a handler of its own before absl put one on the root logger, so
  # each of its lines came out twice; absl's handler alone prints them, in absl's format.
  tf_logger = tf.get_logger()
  for handler in list(tf_logger.handlers):
    tf_logger.removeHandler(handler)
  try:
    return job(flags_obj)
  except (ValueError, FileNotFoundError) as e:
    logging.debug('traceback of the error below', exc_info=True)
    sys.exit('error: {}'.format(e))


def _format_metrics(metrics):
  return ', '.join(f'{k}={float(v):.4f}' for k, v in sorted(metrics.items())
                   if k != 'global_step') + ', global_step={}'.format(metrics.get('global_step'))


def export_model(estimator, spec, flags_obj):
  """Exports a SavedModel taking a float batch, or JPEG bytes with --image_bytes_as_serving_input.

  Returns:
    The path of the SavedModel written.
  """
  height, width, channels = spec.image_shape
  if flags_obj.image_bytes_as_serving_input:
    if spec.image_bytes_serving_fn is None:
      raise ValueError(f'--image_bytes_as_serving_input is not supported for {spec.name}')

    def receiver_fn():
      image_bytes = tf.placeholder(tf.string, [None], name='image_bytes')
      images = tf.map_fn(spec.image_bytes_serving_fn, image_bytes, back_prop=False,
                         fn_output_signature=tf.float32)
      return tf.estimator.export.TensorServingInputReceiver(images, {'image_bytes': image_bytes})
  else:
    def receiver_fn():
      images = tf.placeholder(tf.float32, [None, height, width, channels], name='images')
      return tf.estimator.export.TensorServingInputReceiver(images, images)
  path = estimator.export_saved_model(flags_obj.export_dir, receiver_fn)
  path = path.decode() if isinstance(path, bytes) else path
  logging.info('exported SavedModel to %s', path)
  return path


################################################################################
# Flags.
################################################################################
def define_resnet_flags(resnet_size_choices, default_resnet_size='50', default_train_epochs=90,
                        flag_values=flags.FLAGS):
  """Defines the flags of the original README and of the 2018 official ResNet scripts.

  Args:
    resnet_size_choices: allowed --resnet_size values.
    default_resnet_size: default --resnet_size.
    default_train_epochs: default --train_epochs.
    flag_values: the FlagValues to define them in (tests use a fresh one per run).
  """
  def define(kind):
    return functools.partial(getattr(flags, 'DEFINE_' + kind), flag_values=flag_values)
  define('string')('data_dir', '/tmp', 'Folder of the input data.', short_name='dd')
  define('string')('model_dir', '/tmp/resnet_model', 'Folder of checkpoints and summaries.',
                      short_name='md')
  define('boolean')('clean', False, 'Delete --model_dir before starting.')
  define('integer')('train_epochs', default_train_epochs, 'Epochs to train.', short_name='te')
  define('integer')('epochs_between_evals', 1, 'Epochs between evaluations.',
                       short_name='ebe')
  define('float')('stop_threshold', None, 'Stop training once the evaluated top-1 accuracy '
                     'reaches this value.', short_name='st')
  define('integer')('batch_size', 32, 'Global batch size, split over the replicas.',
                       short_name='bs')
  define('integer')('num_gpus', None, 'GPUs to use: 0 runs on the CPU, N > 1 replicates '
                       'with MirroredStrategy, -1 takes all. Default: 1 if a GPU is visible, '
                       'else 0.', short_name='ng')
  define('integer')('cpu_replicas', 0, 'Split the CPU into this many logical devices and '
                       'replicate over them (to exercise multi-replica code without GPUs).')
  define('list')('hooks', ['LoggingTensorHook'], 'Training hooks: LoggingTensorHook logs '
                    'learning rate, cross-entropy and train accuracy.', short_name='hk')
  define('integer')('log_every_n_steps', 100, 'Steps between training log lines.')
  define('string')('export_dir', None, 'Export a SavedModel here at the end.',
                      short_name='ed')
  define('integer')('inter_op_parallelism_threads', 0, 'TF inter-op threads (0: automatic).',
                       short_name='inter')
  define('integer')('intra_op_parallelism_threads', 0, 'TF intra-op threads (0: automatic).',
                       short_name='intra')
  define('boolean')('use_synthetic_data', False, 'Random images instead of --data_dir, to '
                       'measure the model alone.', short_name='synth')
  define('integer')('max_train_steps', None, 'Stop training at this global step.',
                       short_name='mts')
  define('enum')('dtype', 'fp32', ['fp16', 'fp32'], 'Compute precision (variables stay '
                    'fp32).', short_name='dt')
  define('integer')('loss_scale', None, 'Loss scale for fp16 gradients (default 128 for '
                       'fp16, 1 for fp32).', short_name='ls')
  define('integer')('datasets_num_private_threads', None, 'Private thread pool size of the '
                       'input pipeline.')
  define('integer')('save_checkpoints_secs', 600, 'Seconds between checkpoints while '
                       'training (a rerun resumes from the latest one).')
  define('integer')('save_checkpoints_steps', None, 'Steps between checkpoints (overrides '
                       '--save_checkpoints_secs).')
  define('enum')('data_format', None, ['channels_first', 'channels_last'], 'Layout of the '
                    'activations; channels_first is faster on GPUs. Default: channels_first if '
                    'a GPU is used.', short_name='df')
  define('enum')('resnet_version', '1', ['1', '2'], 'ResNet v1 (v1.5) or v2 '
                    '(pre-activation).', short_name='rv')
  define('enum')('resnet_size', default_resnet_size, [str(s) for s in resnet_size_choices],
                    'Network depth.', short_name='rs')
  define('boolean')('fine_tune', False, 'Train only the chosen classifier head(s); the '
                       'backbone is frozen, its BN statistics included.', short_name='ft')
  define('string')('pretrained_model_checkpoint_path', None, 'Pretrained checkpoint (prefix or '
                      'folder) to warm-start an empty --model_dir from.', short_name='pmcp')
  define('boolean')('eval_only', False, 'Skip training: only dump (and, with '
                       '--evaluate_in_eval_only, evaluate).')
  define('boolean')('evaluate_in_eval_only', False, 'Also run Estimator.evaluate in '
                       '--eval_only mode (the dumps already give every accuracy).')
  define('boolean')('image_bytes_as_serving_input', False, 'Export a SavedModel that takes '
                       'JPEG bytes instead of a float image batch.')
  define('boolean')('is_cascaded', True, 'Build the cascaded model (--nois_cascaded: the '
                       'plain network, classifier 2 only).')
  define('string')('classifier_id', '2', "Exit to build, train, evaluate and dump: 0, 1, 2, "
                      "or 'all' (all three from one pass; with --fine_tune both early heads "
                      'train together).')
  define('string')('softmax_dir', 'output_softmax', 'Dump folder for the softmax outputs '
                      "('' to skip dumping).")
  define('boolean')('dump_train', True, 'Also dump the training split (in a fixed order, '
                       'eval preprocessing); --nodump_train skips it.')
  define('float')('batch_norm_decay', resnet_model.BATCH_NORM_DECAY, 'Decay of the BN moving '
                  'averages (official: 0.997; short runs such as the CPU demo need less, e.g. '
                  '0.9, or evaluation sees unconverged statistics).')
  define('string')('export_cascade_dir', None, 'Export the real early-exit cascade (a '
                   'SavedModel that skips the layers confident images do not need) here.')
  define('string')('cascade_thresholds', None, 'thresholds.json from analyze_imagenet_labels.py '
                   'for --export_cascade_dir.')
  define('float')('epsilon', 0.05, 'Accuracy budget whose thresholds the exported cascade uses '
                  '(a fraction listed in --cascade_thresholds).')
  define('enum')('cascade_mode', 'top1', ['top1', 'top5'], 'Confidence of the exported cascade: '
                 'largest probability (top1) or sum of the five largest (top5).')
  define('integer')('cascade_chunk_size', cascade_export.DEFAULT_CHUNK_SIZE, 'The exported '
                    'cascade (and its plain `full` signature) classifies a batch this many images '
                    'at a time: faster on CPUs, whose caches the early feature maps of a big batch '
                    'overflow. 0: the whole batch at once (for GPUs).', lower_bound=0)

  def classifier_id_is_valid(value):
    try:
      parse_classifier_id(value)
    except ValueError:
      return False
    return True
  flags.register_validator('classifier_id', classifier_id_is_valid, flag_values=flag_values,
                           message="--classifier_id must be 0, 1, 2 or 'all'")
  flags.register_validator('batch_size', lambda v: v is not None and v > 0,
                           flag_values=flag_values,
                           message='--batch_size must be a positive integer')
  flags.register_validator(
      'epochs_between_evals', lambda v: v is not None and v > 0, flag_values=flag_values,
      message='--epochs_between_evals must be a positive integer')


def apply_flag_defaults(flags_obj):
  """Fills flags whose default depends on the machine."""
  if flags_obj.num_gpus is None:
    flags_obj.num_gpus = 1 if tf.config.list_physical_devices('GPU') else 0

