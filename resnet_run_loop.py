"""Generic Estimator run loop for the cascaded ResNets: train, evaluate, dump softmax, export.

Nothing here knows about a data set. A dataset main (``imagenet_main.py``, ``cifar10_main.py``)
passes its input function, its model factory, its learning-rate schedule and its constants in a
``DatasetSpec``, and the parsed flags (``resnet_flags``). ``resnet_main`` then runs these steps:

1. ``check_request``: the flags against the machine, the model and the thresholds file, before
   any work; the exits to build and train and the model function's parameters (``model_fn``);
   the devices and the strategy, on one machine or across a cluster (``distribution``);
2. ``prepare_model_dir``: ``--clean``, then the model_dir's checkpoint (checked against the
   model) or the warm start from ``--pretrained_model_checkpoint_path`` (``warm_start``);
3. ``build_estimator``: the Estimator(s) of the job;
4. ``train_and_evaluate``: cycle by cycle, resumable to the same final global step;
5. ``dump_splits``: every built exit's softmax, validation and training splits, whole or in
   parts (``softmax_dump``);
6. the exports (``exports``): the plain network, the real early-exit cascade, TFLite stages.
"""

import contextlib
import dataclasses
import functools
import math
import shutil
import time
from collections.abc import Callable

import tensorflow.compat.v1 as tf
from absl import logging

import cascade_thresholds
import distribution
import exports
import model_fn
import softmax_dump
import user_errors
import warm_start


################################################################################
# Learning rate.
################################################################################
def _with_warmup(rate_fn, initial_learning_rate, warmup_steps):
  """``rate_fn`` after a linear ramp from 0 over the first ``warmup_steps`` steps."""
  if warmup_steps <= 0:
    return rate_fn

  def learning_rate_fn(global_step):
    warmup_rate = (initial_learning_rate * tf.cast(global_step, tf.float32) /
                   tf.cast(warmup_steps, tf.float32))
    return tf.cond(global_step < warmup_steps, lambda: warmup_rate,
                   lambda: rate_fn(global_step))
  return learning_rate_fn


def learning_rate_with_decay(batch_size, batch_denom, num_images, boundary_epochs, decay_rates,
                             base_lr=0.1, warmup_epochs=0):
  """A piecewise-constant schedule scaled by batch size, with an optional linear warm-up.

  Args:
    batch_size: global batch size; the rate scales as base_lr * batch_size / batch_denom.
    batch_denom: the batch size ``base_lr`` was tuned for.
    num_images: training images per epoch.
    boundary_epochs: epochs at which the rate changes.
    decay_rates: multipliers of the initial rate before, between and after the boundaries.
    base_lr: rate for a batch of ``batch_denom``.
    warmup_epochs: ramp linearly from 0 over this many epochs first (0: no warm-up).

  Returns:
    A function global_step -> learning rate tensor.
  """
  initial_learning_rate = base_lr * batch_size / batch_denom
  batches_per_epoch = num_images / batch_size
  boundaries = [int(batches_per_epoch * epoch) for epoch in boundary_epochs]
  values = [initial_learning_rate * decay for decay in decay_rates]
  return _with_warmup(lambda step: tf.train.piecewise_constant(step, boundaries, values),
                      initial_learning_rate, int(batches_per_epoch * warmup_epochs))


def learning_rate_cosine(batch_size, batch_denom, num_images, train_epochs, base_lr,
                         warmup_epochs=0):
  """Linear warm-up, then a cosine from the initial rate down to 0 at the end of training.

  Args:
    batch_size, batch_denom, num_images, base_lr: as for ``learning_rate_with_decay``.
    train_epochs: the epoch at which the rate reaches 0 (it stays 0 after).
    warmup_epochs: length of the linear ramp from 0 (0: none).

  Returns:
    A function global_step -> learning rate tensor.
  """
  initial_learning_rate = base_lr * batch_size / batch_denom
  batches_per_epoch = num_images / batch_size
  warmup_steps = int(batches_per_epoch * warmup_epochs)
  decay_steps = max(int(batches_per_epoch * train_epochs) - warmup_steps, 1)

  def cosine(global_step):
    progress = tf.minimum(tf.cast(global_step - warmup_steps, tf.float32) / decay_steps, 1.0)
    return initial_learning_rate * 0.5 * (1.0 + tf.cos(math.pi * progress))
  return _with_warmup(cosine, initial_learning_rate, warmup_steps)


def learning_rate_schedule(flags_obj, batch_size, batch_denom, num_images, base_lr,
                           boundary_epochs, decay_rates, warmup_epochs=0):
  """The schedule ``--lr_schedule`` asks for, from a dataset main's step schedule.

  ``step`` is the main's own schedule (``boundary_epochs``, ``decay_rates``); ``cosine`` decays
  from the same initial rate to 0 at ``--train_epochs``. ``--warmup_epochs``, when given,
  replaces the main's warm-up (``warmup_epochs``) in both.
  """
  if flags_obj.warmup_epochs is not None:
    warmup_epochs = flags_obj.warmup_epochs
  if flags_obj.lr_schedule == 'cosine':
    return learning_rate_cosine(batch_size, batch_denom, num_images, flags_obj.train_epochs,
                                base_lr, warmup_epochs)
  return learning_rate_with_decay(batch_size, batch_denom, num_images, boundary_epochs,
                                  decay_rates, base_lr, warmup_epochs)


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
  num_images: dict              # split -> image count
  # split -> where its count comes from, for the splits whose count is a fact (e.g. the
  # converter's manifest): an evaluation or dump that reads another number stops.
  count_sources: dict = dataclasses.field(default_factory=dict)
  damaged_input: Callable = None   # split -> sentence naming its damaged files and the fix
  image_bytes_serving_fn: Callable = None   # serialized JPEG -> preprocessed image


def train_schedule(flags_obj):
  """Epoch at which each train/evaluate cycle ends; empty in --eval_only mode."""
  if flags_obj.eval_only or not flags_obj.train_epochs:
    return []
  cycles = math.ceil(flags_obj.train_epochs / flags_obj.epochs_between_evals)
  return [min((cycle + 1) * flags_obj.epochs_between_evals, flags_obj.train_epochs)
          for cycle in range(cycles)]


@dataclasses.dataclass
class Job:
  """A checked request: the flags, the data set and what follows from them, derived once."""
  flags: object
  spec: DatasetSpec
  devices: list                  # this machine's replicas, e.g. ['/gpu:0', '/gpu:1']
  strategy: object               # over them, or across the cluster's machines
  params: model_fn.RunParams
  schedule: list                 # epoch at which each train/evaluate cycle ends
  cluster: distribution.Cluster = None    # the machines trained across, if several
  dump_part: tuple = None        # (part, parts) of every split this process dumps, if sharded
  pretrained_step: int = None    # global step of the warm-start checkpoint, for the manifest

  @property
  def per_replica_batch(self):
    return self.flags.batch_size // self.strategy.num_replicas_in_sync

  @property
  def is_chief(self):
    """Whether this process evaluates and writes the checkpoints (always, on one machine)."""
    return self.cluster is None or self.cluster.is_chief

  def input_fn(self, is_training, split, num_epochs=1, with_labels_in_features=False,
               skip_records=0, take_records=None):
    """An Estimator input function for ``split``; under a strategy, one call per pipeline."""
    flags_obj, spec = self.flags, self.spec

    def input_fn(input_context=None):
      # Under a strategy the replicas of one input pipeline take its batches in turn, so each
      # batch is one replica's share of the global batch.
      pipelines = input_context.num_input_pipelines if input_context else 1
      replicas = input_context.num_replicas_in_sync if input_context else 1
      local_replicas = replicas // pipelines
      split_for_replicas = local_replicas > 1 and not is_training
      if input_context is None:
        batch = flags_obj.batch_size
      else:
        batch = self.per_replica_batch * (local_replicas if split_for_replicas else 1)
      dataset = spec.input_fn(
          is_training=is_training, data_dir=flags_obj.data_dir, batch_size=batch,
          num_epochs=num_epochs, dtype=self.params.model.dtype, split=split,
          datasets_num_private_threads=flags_obj.datasets_num_private_threads,
          input_context=None, skip_records=skip_records, take_records=take_records,
          seed=flags_obj.seed if is_training else None)
      if pipelines > 1:
        # Every worker reads the whole stream of per-replica batches and keeps its replicas'
        # share: global replica r takes batch r of every num_replicas, as in a one-machine
        # MirroredStrategy over as many replicas, so both train on the same batches.
        worker = input_context.input_pipeline_id
        dataset = dataset.enumerate().filter(
            lambda i, _: tf.equal((i % replicas) // local_replicas, worker)).map(
                lambda _, batch: batch)
      if with_labels_in_features or split_for_replicas:
        dataset = dataset.map(lambda image, label: ({'image': image, 'label': label}, label))
      if split_for_replicas:
        dataset = softmax_dump.split_into_replica_batches(dataset, local_replicas,
                                                          self.per_replica_batch)
      if with_labels_in_features:
        dataset = dataset.map(lambda features, label: features)
      return dataset
    return input_fn


  @contextlib.contextmanager
  def reading(self, split):
    """Turns a corrupt record of ``split`` into one error that names the damaged shard."""
    try:
      yield
    except tf.errors.DataLossError as e:
      found = self.spec.damaged_input(split) if self.spec.damaged_input else ''
      raise ValueError('the {} data in --data_dir {} is damaged ({}); {}'.format(
          split, self.flags.data_dir, e.message.splitlines()[0],
          found or 'convert the data again')) from None

  def check_count(self, split, count, what):
    """Stops when ``count`` images of ``split`` were read but its count is a fact and differs."""
    expected = self.spec.num_images.get(split)
    if expected is None or count == expected:
      return
    source = self.spec.count_sources.get(split)
    if source is None:
      logging.warning('%s %d %s images, but the data set nominally has %d', what, count, split,
                      expected)
      return
    found = self.spec.damaged_input(split) if self.spec.damaged_input else ''
    raise ValueError('{} {} {} images, but {} lists {}; {}'.format(
        what, count, split, source, expected,
        found or 'a file of the split is missing, truncated or replaced: convert it again'))


def check_request(flags_obj, spec):
  """Checks the flags against the machine, the model and the thresholds file, before any work.

  Returns:
    The Job.
  """
  cluster = distribution.cluster_of(flags_obj)
  dump_part = distribution.dump_part(flags_obj, cluster)
  devices = distribution.replica_devices(flags_obj)
  # A CPU worker of a cluster is one replica; GPUs are one replica each.
  replicas = len(devices) * (cluster.num_workers if cluster else 1)
  if flags_obj.batch_size % replicas:
    raise ValueError(
        f'--batch_size {flags_obj.batch_size} does not divide by the {replicas} replicas; '
        f'use a multiple of {replicas}, e.g. '
        f'{replicas * max(1, flags_obj.batch_size // replicas)}')
  data_format = distribution.resolve_data_format(flags_obj.data_format, devices)
  model = spec.model_factory(data_format, model_fn.COMPUTE_DTYPES[flags_obj.dtype])
  plan = model_fn.ExitPlan.parse(flags_obj.classifier_id, model.num_exits, flags_obj.fine_tune)
  if not flags_obj.is_cascaded and plan.built != (model.final_exit,):
    raise ValueError('--nois_cascaded builds the plain network, whose only classifier is '
                     f'--classifier_id {model.final_exit}')
  if flags_obj.export_cascade_dir:
    # Check the thresholds before hours of training, not after.
    if not flags_obj.cascade_thresholds:
      raise ValueError('--export_cascade_dir needs --cascade_thresholds (the thresholds.json '
                       'written by analyze_imagenet_labels.py) and --epsilon or --accuracy_drop')
    cascade_thresholds.read(flags_obj.cascade_thresholds, num_classes=model.num_classes,
                            num_exits=model.num_exits).thresholds_for(
                                flags_obj.cascade_mode, **exports.threshold_choice(flags_obj))
  if flags_obj.export_tflite_dir:
    import tflite_export  # TensorFlow Lite's converter is needed by that export only
    tflite_export.check_variants(flags_obj.tflite_variants)
  for flag in ('model_dir', 'softmax_dir', 'export_dir', 'export_cascade_dir', 'export_tflite_dir'):
    if getattr(flags_obj, flag):
      user_errors.check_writable(getattr(flags_obj, flag), '--' + flag)
  # After the checks: a bad flag should fail the same way whether or not TF has started.
  distribution.configure_cpu_replicas(flags_obj.cpu_replicas)
  # Before any other use of TensorFlow's runtime (MultiWorkerMirroredStrategy needs that).
  strategy = distribution.make_strategy(flags_obj, devices, cluster)
  if model.dtype == tf.bfloat16:
    distribution.check_bfloat16_runs(devices[0])
  params = model_fn.RunParams(
      model=model, plan=plan,
      learning_rate_fn=spec.learning_rate_fn(flags_obj, flags_obj.batch_size),
      loss_scale=flags_obj.loss_scale or (128 if flags_obj.dtype == 'fp16' else 1),
      weight_decay=flags_obj.weight_decay,
      weight_decay_exclude=tuple(flags_obj.weight_decay_exclude or ()),
      decoupled_weight_decay=flags_obj.decoupled_weight_decay,
      label_smoothing=flags_obj.label_smoothing,
      gradient_clip_norm=flags_obj.gradient_clip_norm,
      moving_average_decay=flags_obj.moving_average_decay,
      model_dir=flags_obj.model_dir)
  logging.info('global batch %d: %d per replica, %d replica(s)%s', flags_obj.batch_size,
               flags_obj.batch_size // strategy.num_replicas_in_sync,
               strategy.num_replicas_in_sync,
               f' on {cluster.num_workers} machines' if cluster else '')
  return Job(flags=flags_obj, spec=spec, devices=devices, strategy=strategy, params=params,
             schedule=train_schedule(flags_obj), cluster=cluster, dump_part=dump_part)


def prepare_model_dir(job):
  """--clean, then the model_dir's checkpoint (checked against the model) or the warm start."""
  flags_obj, image_shape = job.flags, job.spec.image_shape
  if flags_obj.clean and tf.io.gfile.exists(flags_obj.model_dir):
    logging.info('--clean: deleting %s', flags_obj.model_dir)
    shutil.rmtree(flags_obj.model_dir)
  if not job.is_chief and flags_obj.pretrained_model_checkpoint_path:
    _wait_for_checkpoint(flags_obj.model_dir, flags_obj.rendezvous_timeout_seconds)
  if tf.train.latest_checkpoint(flags_obj.model_dir):
    if flags_obj.pretrained_model_checkpoint_path:
      logging.info('%s already holds a checkpoint: it is used and '
                   '--pretrained_model_checkpoint_path %s is ignored', flags_obj.model_dir,
                   flags_obj.pretrained_model_checkpoint_path)
    warm_start.check_model_dir_fits(flags_obj.model_dir, model_fn.resnet_model_fn, job.params,
                                    image_shape, training=bool(job.schedule))
  elif flags_obj.pretrained_model_checkpoint_path:
    whole_model = dataclasses.replace(job.params,
                                      plan=model_fn.ExitPlan.every_exit(job.params.model.num_exits))
    job.pretrained_step = warm_start.warm_start_model_dir(
        flags_obj.model_dir, flags_obj.pretrained_model_checkpoint_path, model_fn.resnet_model_fn,
        whole_model, image_shape)
  elif flags_obj.eval_only:
    raise ValueError('--eval_only needs trained weights: pass '
                     '--pretrained_model_checkpoint_path (-pmcp) or a --model_dir (-md) that '
                     'holds a checkpoint')


def _wait_for_checkpoint(model_dir, timeout_seconds):
  """A worker of a cluster waits for the chief's warm start (the chief alone writes it)."""
  deadline = time.monotonic() + timeout_seconds
  while not tf.train.latest_checkpoint(model_dir):
    if time.monotonic() > deadline:
      raise ValueError(f'no checkpoint appeared in --model_dir {model_dir} within '
                       f'{timeout_seconds:g} s: every worker needs the same --model_dir, on a '
                       'file system they share, and the chief writes the warm start into it')
    time.sleep(1)


@dataclasses.dataclass
class Estimators:
  """The job's Estimator for training, and the one of this process for evaluation and dumps.

  They are one and the same on a single machine (replicated over its devices). On a cluster the
  training one spans every machine; evaluation and dumps run on each machine alone (the chief
  evaluates, each worker dumps its part), as a cluster Estimator cannot evaluate or predict.
  """
  training: tf.estimator.Estimator
  local: tf.estimator.Estimator


def build_estimator(job):
  """The job's Estimators (see ``Estimators``)."""
  flags_obj = job.flags
  session_config = tf.ConfigProto(
      inter_op_parallelism_threads=flags_obj.inter_op_parallelism_threads,
      intra_op_parallelism_threads=flags_obj.intra_op_parallelism_threads,
      allow_soft_placement=True)
  checkpoints = {'save_checkpoints_secs': flags_obj.save_checkpoints_secs,
                 'save_checkpoints_steps': None}
  if flags_obj.save_checkpoints_steps or job.cluster:
    # Across machines TensorFlow saves every N steps only (it ignores seconds).
    checkpoints = {'save_checkpoints_secs': None,
                   'save_checkpoints_steps': flags_obj.save_checkpoints_steps or 1000}

  def estimator(strategy):
    run_config = tf.estimator.RunConfig(
        train_distribute=strategy, eval_distribute=None if job.cluster else strategy,
        session_config=session_config, keep_checkpoint_max=5, log_step_count_steps=100,
        **checkpoints)
    return tf.estimator.Estimator(model_fn=model_fn.resnet_model_fn, model_dir=flags_obj.model_dir,
                                  config=run_config, params=job.params)
  training = estimator(job.strategy)
  if not job.cluster:
    return Estimators(training=training, local=training)
  with distribution.without_tf_config():
    return Estimators(training=training, local=estimator(None))


def _train_hooks(job):
  flags_obj = job.flags
  hooks = [ExamplesPerSecondHook(flags_obj.batch_size, flags_obj.log_every_n_steps)]
  if flags_obj.hooks and 'loggingtensorhook' in [h.lower() for h in flags_obj.hooks]:
    tensors = {'learning_rate': 'learning_rate', 'cross_entropy': 'cross_entropy'}
    for exit_id in job.params.plan.trained:
      tensors[f'clf{exit_id}_train_accuracy'] = f'clf{exit_id}_train_accuracy'
    hooks.append(tf.estimator.LoggingTensorHook(tensors=tensors,
                                                every_n_iter=flags_obj.log_every_n_steps))
  return hooks


def train_and_evaluate(estimators, job):
  """Trains and evaluates cycle by cycle, resuming after a kill; returns the last evaluation.

  Across machines the workers train straight to the end, then the chief evaluates.
  """
  flags_obj, plan = job.flags, job.params.plan
  steps_per_epoch = math.ceil(job.spec.num_images['train'] / flags_obj.batch_size)
  # Synthetic input never ends: evaluate a fixed number of batches of it.
  eval_steps = (flags_obj.max_train_steps or 10) if flags_obj.use_synthetic_data else None
  logging.info('%s: %s, exits built %s, trained %s, %d replica(s) on %s, %s, global batch %d',
               job.spec.name, f'{job.schedule[-1]} epochs' if job.schedule else 'eval only',
               list(plan.built), list(plan.trained) if job.schedule else [],
               job.strategy.num_replicas_in_sync, job.devices, job.params.model.data_format,
               flags_obj.batch_size)
  latest = tf.train.latest_checkpoint(flags_obj.model_dir)
  resumed_step = int(tf.train.load_checkpoint(latest).get_tensor('global_step')) if latest else 0
  cycles = []
  for end_epoch in job.schedule:
    max_steps = end_epoch * steps_per_epoch
    if flags_obj.max_train_steps:
      max_steps = min(max_steps, flags_obj.max_train_steps)
    cycles.append((end_epoch, max_steps))
    if flags_obj.max_train_steps and max_steps >= flags_obj.max_train_steps:
      break
  if job.cluster and cycles:
    cycles = cycles[-1:]   # one cycle: evaluations between cycles would stall the cluster
  evaluation = None
  for cycle, (end_epoch, max_steps) in enumerate(cycles):
    if max_steps <= resumed_step and cycle < len(cycles) - 1:
      # A rerun after a kill: this cycle was trained (and evaluated) before.
      logging.info('cycle %d/%d: done before (global step %d >= %d), skipped', cycle + 1,
                   len(cycles), resumed_step, max_steps)
      continue
    logging.info('cycle %d/%d: training to epoch %s (global step %d)', cycle + 1,
                 len(cycles), end_epoch, max_steps)
    # max_steps (not steps) makes a rerun after a kill resume where it stopped and end at the
    # same global step as an uninterrupted run.
    with job.reading('train'):
      if job.cluster:
        _train_across_machines(estimators.training, job, max_steps)
      else:
        estimators.training.train(job.input_fn(True, 'train', num_epochs=None),
                                  hooks=_train_hooks(job), max_steps=max_steps)
    if not job.is_chief:
      return None
    evaluation = evaluate(estimators.local, job, eval_steps)
    logging.info('evaluation after cycle %d: %s', cycle + 1, _format_metrics(evaluation))
    if flags_obj.stop_threshold is not None and (
        evaluation['accuracy'] >= flags_obj.stop_threshold):
      logging.info('accuracy %.4f reached --stop_threshold %.4f', evaluation['accuracy'],
                   flags_obj.stop_threshold)
      break
  if flags_obj.eval_only and flags_obj.evaluate_in_eval_only and job.is_chief:
    evaluation = evaluate(estimators.local, job, eval_steps)
    logging.info('evaluation: %s', _format_metrics(evaluation))
  return evaluation


def _train_across_machines(estimator, job, max_steps):
  """Trains on every worker of the cluster at once; a worker that fails stops all of them."""
  # The Estimator trains across machines only through train_and_evaluate; the chief evaluates
  # afterwards, on its own (an EvalSpec's input is never read under this strategy).
  try:
    tf.estimator.train_and_evaluate(
        estimator, tf.estimator.TrainSpec(job.input_fn(True, 'train', num_epochs=None),
                                          max_steps=max_steps, hooks=_train_hooks(job)),
        tf.estimator.EvalSpec(lambda: None))
  except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
          tf.errors.CancelledError) as e:
    raise ValueError(
        'training across machines stopped: a worker of the cluster failed or stopped answering '
        '({}: {}); rerun every worker\'s command to resume from {}'.format(
            type(e).__name__, e.message.splitlines()[0][:200],
            tf.train.latest_checkpoint(job.flags.model_dir) or 'the start')) from None


def evaluate(estimator, job, steps=None):
  """Estimator.evaluate on the validation split, which must yield all of its images."""
  with job.reading('validation'):
    evaluation = estimator.evaluate(job.input_fn(False, 'validation'), steps=steps)
  if steps is None:
    job.check_count('validation', int(evaluation['num_images']), 'evaluated')
  return evaluation


def dump_splits(estimator, job):
  """Dumps the softmax of every built exit for the validation (and training) split.

  Returns:
    dict split -> rows written.
  """
  flags_obj, spec, model = job.flags, job.spec, job.params.model
  if not flags_obj.softmax_dir:
    return {}
  if flags_obj.use_synthetic_data:
    logging.info('synthetic data: no softmax dumps')
    return {}
  height, width = spec.image_shape[:2]
  common = {
      'dataset': spec.name,
      'model': {'resnet_size': model.resnet_size, 'resnet_version': model.resnet_version,
                'image_size': [height, width]},
      'num_classes': spec.num_classes,
      'num_exits': model.num_exits,
      'stage_macs': model.stage_macs(height, width),
      'plain_macs': model.plain_macs(height, width),
      'checkpoint': tf.train.latest_checkpoint(flags_obj.model_dir),
      'global_step': int(estimator.get_variable_value('global_step')),
  }
  if job.pretrained_step is not None:
    common['pretrained_global_step'] = job.pretrained_step
  dumped = {}
  for split in ['validation'] + (['train'] if flags_obj.dump_train else []):
    def make_input_fn(skip_records, take_records=None, split=split):
      return job.input_fn(False, split, with_labels_in_features=True, skip_records=skip_records,
                          take_records=take_records)
    exits, check = job.params.plan.built, functools.partial(job.check_count, split, what='dumped')
    with job.reading(split):
      if job.dump_part is None:
        dumped[split] = softmax_dump.dump_softmax(
            estimator, make_input_fn, flags_obj.softmax_dir, split, exits, common,
            check_count=check, commit_seconds=flags_obj.dump_commit_seconds)
      else:
        part, parts = job.dump_part
        dumped[split] = softmax_dump.dump_softmax_part(
            estimator, make_input_fn, flags_obj.softmax_dir, split, exits, common, part, parts,
            spec.num_images[split], flags_obj.batch_size, check_count=check,
            commit_seconds=flags_obj.dump_commit_seconds)
  return dumped


def resnet_main(flags_obj, spec):
  """Runs the job described by the flags on the data set described by ``spec``.

  Returns:
    dict with the last evaluation results (if any), the dumped row counts per split and the
    folder of the exported cascade (if any).
  """
  job = check_request(flags_obj, spec)
  prepare_model_dir(job)
  estimators = build_estimator(job)
  results = {'eval': train_and_evaluate(estimators, job),
             'dumped': dump_splits(estimators.local, job)}
  if not job.is_chief:
    return results   # The chief alone exports.
  if flags_obj.export_dir:
    exports.export_model(estimators.local, spec, flags_obj)
  if flags_obj.export_cascade_dir:
    results['cascade_export'] = exports.export_cascade(job)
  if flags_obj.export_tflite_dir:
    results['tflite_export'] = exports.export_tflite(job)
  return results


def _format_metrics(metrics):
  return ', '.join(f'{k}={float(v):.4f}' for k, v in sorted(metrics.items())
                   if k != 'global_step') + ', global_step={}'.format(metrics.get('global_step'))
