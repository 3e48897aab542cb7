"""Warm start: find a pretrained checkpoint, check that it fits the model, and materialise it.

A run whose ``--model_dir`` holds no checkpoint starts from ``--pretrained_model_checkpoint_path``:
every backbone variable (BN moving statistics included) and the final dense layer, plus an exit
head when the checkpoint has all of its variables. The warm start is written into ``model_dir``
as a step-0 checkpoint of the whole model, after checking every variable's name and shape, so
that training, evaluation, prediction and every distribution strategy restore the same values the
same way, and the official rule holds: once ``model_dir`` has a checkpoint, it wins.
"""

import os

import tensorflow.compat.v1 as tf
from absl import logging

import resnet_model


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


def read_checkpoint(checkpoint, fix):
  """Opens a checkpoint and reads every tensor once, so a damaged file fails now, by name.

  A truncated or corrupt ``.data`` file otherwise fails deep inside a restore, with an
  OutOfRangeError that names neither the file nor the fix. Reading a ResNet-50 checkpoint (100 MB)
  takes well under a second.

  Args:
    checkpoint: a checkpoint prefix.
    fix: what the user should do, for the message.

  Returns:
    The CheckpointReader.
  """
  try:
    reader = tf.train.load_checkpoint(checkpoint)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  # The reader reports a short file as IndexError ("Read less bytes than requested") or as
  # TensorFlow's OutOfRange/DataLoss errors, depending on where the file ends.
  except (tf.errors.OpError, IndexError) as e:
    files = sorted(tf.io.gfile.glob(checkpoint + '.*'))
    reason = (getattr(e, 'message', None) or str(e)).splitlines()[0]
    raise ValueError('the checkpoint {} ({}) is damaged: {}; {}'.format(
        checkpoint, ', '.join(files) or 'no files', reason, fix)) from None
  return reader


# tf.train.ExponentialMovingAverage keeps the average of variable v as v/ExponentialMovingAverage.
MOVING_AVERAGE_SUFFIX = '/ExponentialMovingAverage'


def moving_average_scope(checkpoint):
  """A variable scope in which the model reads the moving averages of ``checkpoint``'s variables.

  Every variable whose average the checkpoint holds is replaced by that average's variable
  (``<name>/ExponentialMovingAverage``, restored by the ordinary saver under its own name); the
  others (BN statistics, a frozen backbone's variables) are themselves. Evaluation, dumps and
  exports of a run with ``--moving_average_decay`` build their graph inside it.

  Raises:
    ValueError: the checkpoint holds no moving averages.
  """
  names = set(tf.train.load_checkpoint(checkpoint).get_variable_to_shape_map()) if checkpoint \
      else set()
  averaged = {n[:-len(MOVING_AVERAGE_SUFFIX)] for n in names if n.endswith(MOVING_AVERAGE_SUFFIX)}
  if not averaged:
    raise ValueError(f'--moving_average_decay: the checkpoint {checkpoint} holds no moving '
                     'averages; train with --moving_average_decay first, or drop the flag to use '
                     'the weights themselves')

  def getter(next_getter, name, *args, **kwargs):
    return next_getter(name + MOVING_AVERAGE_SUFFIX if name in averaged else name, *args,
                       **kwargs)
  return tf.variable_scope(tf.get_variable_scope(), custom_getter=getter)


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


def warm_start_model_dir(model_dir, pretrained_path, model_fn, whole_model_params, image_shape):
  """Writes a step-0 checkpoint of the full model, initialised from a pretrained checkpoint.

  Args:
    model_dir: the folder to write into.
    pretrained_path: --pretrained_model_checkpoint_path (a prefix or a folder).
    model_fn: the Estimator model function.
    whole_model_params: its params for training every exit with every variable trainable
      (``params.model`` is the model), so that the graph creates everything any later run on
      this model_dir restores: all exits, every optimizer slot, the global step.
    image_shape: (height, width, channels).

  Returns:
    The global step recorded in the pretrained checkpoint (for the manifest), or None.
  """
  checkpoint = resolve_checkpoint(pretrained_path)
  reader = read_checkpoint(checkpoint, 'download and unpack the pretrained model again')
  checkpoint_shapes = reader.get_variable_to_shape_map()
  graph = tf.Graph()
  with graph.as_default():
    # A run that builds only exit 0 later still keeps the later stages and the final classifier.
    images = tf.zeros([1] + list(image_shape), tf.float32)
    labels = tf.zeros([1], tf.int32)
    model_fn(images, labels, tf.estimator.ModeKeys.TRAIN, whole_model_params)
    variables = tf.global_variables()
    num_exits = whole_model_params.model.num_exits
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
    # A checkpoint trained with --moving_average_decay was evaluated, dumped and exported with
    # its averages: those are its model, so they are what the new run starts from.
    source = {name: name + MOVING_AVERAGE_SUFFIX if name + MOVING_AVERAGE_SUFFIX in
              checkpoint_shapes else name for name in wanted}
    averaged = sum(source[name] != name for name in wanted)
    if averaged:
      logging.info('The pretrained checkpoint holds moving averages: %d variables start from '
                   'them', averaged)
    tf.train.init_from_checkpoint(checkpoint, {source[name]: name for name in wanted})
    # Moving averages (--moving_average_decay) start at the values they average.
    by_name = {v.op.name: v for v in variables}
    start_averages = [v.assign(by_name[v.op.name[:-len(MOVING_AVERAGE_SUFFIX)]])
                      for v in variables if v.op.name.endswith(MOVING_AVERAGE_SUFFIX)
                      and v.op.name[:-len(MOVING_AVERAGE_SUFFIX)] in by_name]
    step = reader.get_tensor('global_step') if reader.has_tensor('global_step') else None
    tf.io.gfile.makedirs(model_dir)
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      sess.run(start_averages)
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
  checkpoint_shapes = read_checkpoint(
      checkpoint, 'delete it (all its files) from --model_dir to fall back to the checkpoint '
      'before it, or start over with --clean').get_variable_to_shape_map()
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
