"""The Estimator model function of the cascaded ResNets, and what it reads: the exit plan and
the run's parameters (``RunParams``, the Estimator's ``params``; never global flags).
"""

import contextlib
import dataclasses
import re
from collections.abc import Callable

import tensorflow.compat.v1 as tf

import resnet_model
import warm_start

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
# --dtype: the compute precision (variables stay fp32).
COMPUTE_DTYPES = {'fp32': tf.float32, 'fp16': tf.float16, 'bf16': tf.bfloat16}
# Not decayed: BN parameters (backbone and heads) and biases, i.e. only kernels are.
WEIGHT_DECAY_EXCLUDE = (r'batch_normalization', r'_bn\d', r'/bias$')


################################################################################
# What a run builds and trains.
################################################################################
ALL_EXITS = 'all'


@dataclasses.dataclass(frozen=True)
class ExitPlan:
  """``--classifier_id`` and ``--fine_tune``, parsed once: the exits a run builds and trains."""
  built: tuple              # exit ids whose logits the graph holds (and the dumps write)
  trained: tuple            # exit ids whose loss training minimises
  frozen_backbone: bool     # only the trained heads change; the backbone's BNs stay in inference

  @classmethod
  def parse(cls, classifier_id, num_exits, fine_tune=False):
    """The plan for an exit id (0..num_exits-1) or 'all'; ValueError naming --classifier_id.

    With ``--fine_tune --classifier_id all`` only the early heads train: the final classifier
    is the pretrained one. Otherwise every built exit trains.
    """
    if isinstance(classifier_id, str) and classifier_id.strip().lower() == ALL_EXITS:
      built = tuple(range(num_exits))
    else:
      try:
        built = (int(classifier_id),)
      except (TypeError, ValueError):
        built = ()
      if not built or not 0 <= built[0] < num_exits:
        raise ValueError(f'--classifier_id must be one of {list(range(num_exits))} or '
                         f'{ALL_EXITS!r}, got {classifier_id!r}')
    trained = built
    if fine_tune and len(built) > 1:
      trained = tuple(e for e in built if e != num_exits - 1)
    return cls(built=built, trained=trained, frozen_backbone=bool(fine_tune))

  @classmethod
  def every_exit(cls, num_exits):
    """Every exit built and trained, every variable trainable (the warm start's graph)."""
    exits = tuple(range(num_exits))
    return cls(built=exits, trained=exits, frozen_backbone=False)

  def trained_groups(self, num_exits):
    """Variable groups that get gradients (resnet_model.variable_group); None: every one."""
    if not self.frozen_backbone:
      return None
    return {resnet_model.head_group(e, num_exits) for e in self.trained}


@dataclasses.dataclass(frozen=True)
class RunParams:
  """Everything the model function reads (never global flags): the Estimator's ``params``."""
  model: resnet_model.Model          # the network description; its dtype is the compute dtype
  plan: ExitPlan
  learning_rate_fn: Callable = None  # global_step -> learning rate tensor (training only)
  loss_scale: float = 1              # fp16 gradients underflow: the loss is scaled up by this
  weight_decay: float = WEIGHT_DECAY
  weight_decay_exclude: tuple = WEIGHT_DECAY_EXCLUDE   # regexes of variables not decayed
  decoupled_weight_decay: bool = False   # decay in the update, not as an L2 term of the loss
  momentum: float = MOMENTUM
  label_smoothing: float = 0.0
  gradient_clip_norm: float = None   # clip the gradients to this global norm
  # Train an exponential moving average of the trained variables, and evaluate, dump and
  # export with it (tf.train.ExponentialMovingAverage's shadow variables, in the checkpoint).
  moving_average_decay: float = None
  # In training graphs, the variables of this folder's latest checkpoint that the graph does
  # not build (the later stages when only exit 0 trains) are carried along, so the checkpoints
  # the run writes still hold the whole model.
  model_dir: str = None


################################################################################
# Model function.
################################################################################
def _images_labels_valid(features, labels):
  """Features arrive as an image tensor, or as a dict carrying the labels along (dumps) and a
  mask of the real images (``valid``, under a strategy: see ``split_into_replica_batches``)."""
  if isinstance(features, dict):
    return features['image'], features.get('label', labels), features.get('valid')
  return features, labels, None


def _cross_entropy(labels, logits, weights, label_smoothing):
  """Mean cross-entropy of one exit (padding weighs 0); with label smoothing s the target is
  1 - s + s / C for the true class and s / C for the others."""
  weights = 1.0 if weights is None else weights
  if not label_smoothing:
    return tf.losses.sparse_softmax_cross_entropy(labels=labels, logits=logits, weights=weights,
                                                  reduction=tf.losses.Reduction.MEAN,
                                                  loss_collection=None)
  return tf.losses.softmax_cross_entropy(
      tf.one_hot(labels, logits.shape[-1]), logits, weights=weights,
      label_smoothing=label_smoothing, reduction=tf.losses.Reduction.MEAN, loss_collection=None)


def _metrics(exit_logits, predictions, labels, weights):
  """Top-1 and top-5 accuracy per exit ('accuracy': the deepest exit's, for --stop_threshold)
  and the number of images evaluated."""
  metrics = {}
  for exit_id in sorted(exit_logits):
    metrics[f'clf{exit_id}/accuracy'] = tf.metrics.accuracy(
        labels, predictions[f'clf{exit_id}_classes'], weights=weights)
    metrics[f'clf{exit_id}/accuracy_top_5'] = tf.metrics.mean(
        tf.nn.in_top_k(exit_logits[exit_id], labels, 5), weights=weights)
  deepest = max(exit_logits)
  metrics['accuracy'] = metrics[f'clf{deepest}/accuracy']
  metrics['accuracy_top_5'] = metrics[f'clf{deepest}/accuracy_top_5']
  # The images evaluated (padding excluded), checked against the split's known size: counted
  # as "true positives" of an always-true prediction, a count metric that handles replicas.
  everyone = tf.ones_like(labels, tf.bool)
  metrics['num_images'] = tf.metrics.true_positives(everyone, everyone, weights=weights)
  return metrics


def _training_summaries(exit_logits, predictions, labels, cross_entropy):
  """Batch accuracy of each trained head, as named tensors (for the logs) and in TensorBoard."""
  for exit_id in cross_entropy:
    correct = tf.cast(tf.equal(tf.cast(predictions[f'clf{exit_id}_classes'], tf.int32),
                               labels), tf.float32)
    in_top5 = tf.cast(tf.nn.in_top_k(exit_logits[exit_id], labels, 5), tf.float32)
    tf.identity(tf.reduce_mean(correct), name=f'clf{exit_id}_train_accuracy')
    tf.identity(tf.reduce_mean(in_top5), name=f'clf{exit_id}_train_accuracy_top_5')
    tf.summary.scalar(f'clf{exit_id}/train_accuracy', tf.reduce_mean(correct))
    tf.summary.scalar(f'clf{exit_id}/train_accuracy_top_5', tf.reduce_mean(in_top5))
    tf.summary.scalar(f'clf{exit_id}/cross_entropy', cross_entropy[exit_id])


def variable_name(variable):
  """A variable's name without ':0'. Under MirroredStrategy the copy of replica k > 0 has an op
  name of its own ('.../kernel/replica_1'); this is the name every replica shares."""
  return variable.name.split(':')[0]


def decayed_variables(variables, exclude):
  """The members of ``variables`` whose names no regular expression of ``exclude`` matches."""
  patterns = [re.compile(p) for p in exclude]
  return [v for v in variables if not any(p.search(variable_name(v)) for p in patterns)]


def _train_op(loss, trainable, decayed, params):
  """Momentum SGD on ``trainable``, the BN moving-average updates, and the optional extras.

  Extras (each off by default): clipping the gradients to a global norm, decoupled weight decay
  of ``decayed`` (w -= lr * weight_decay * w after the step), and the exponential moving average
  of ``trainable`` after the step.
  """
  global_step = tf.train.get_or_create_global_step()
  learning_rate = tf.identity(params.learning_rate_fn(global_step), name='learning_rate')
  tf.summary.scalar('learning_rate', learning_rate)
  optimizer = tf.train.MomentumOptimizer(learning_rate=learning_rate, momentum=params.momentum)
  # fp16 gradients underflow; scale the loss up and the gradients back down.
  grads_and_vars = optimizer.compute_gradients(loss * params.loss_scale, var_list=trainable)
  grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
  if params.loss_scale != 1:
    grads_and_vars = [(g / params.loss_scale, v) for g, v in grads_and_vars]
  if params.gradient_clip_norm:
    clipped, norm = tf.clip_by_global_norm([g for g, _ in grads_and_vars],
                                           params.gradient_clip_norm)
    tf.identity(norm, name='gradient_norm')   # before clipping
    tf.summary.scalar('gradient_norm', norm)
    grads_and_vars = list(zip(clipped, [v for _, v in grads_and_vars], strict=True))
  step_op = optimizer.apply_gradients(grads_and_vars, global_step)
  after_step = []
  with tf.control_dependencies([step_op]):
    if params.decoupled_weight_decay and params.weight_decay:
      after_step += [v.assign_sub(learning_rate * params.weight_decay * v) for v in decayed]
    if params.moving_average_decay:
      with tf.control_dependencies(after_step):
        average = tf.train.ExponentialMovingAverage(params.moving_average_decay)
        after_step.append(average.apply(trainable))
  # Only BNs in training mode register moving-average updates: the heads', or everyone's when
  # the whole network trains. A frozen backbone has none.
  return tf.group(step_op, *after_step, tf.get_collection(tf.GraphKeys.UPDATE_OPS))


def resnet_model_fn(features, labels, mode, params):
  """Estimator model function for the cascaded ResNets.

  Args:
    features: [batch, height, width, channels] images, or a dict with 'image', and 'label'
      (dumps) and 'valid' (padding mask under a strategy).
    labels: [batch] int labels (None when predicting).
    mode: a tf.estimator.ModeKeys.
    params: a RunParams.

  Returns:
    An EstimatorSpec. Predictions per built exit k: ``clf<k>_probabilities`` [batch,
    num_classes] float32 and ``clf<k>_classes`` [batch] int64; plus ``label`` and ``valid``
    when the features carry them.
  """
  images, labels, valid = _images_labels_valid(features, labels)
  model, plan = params.model, params.plan
  is_training = mode == tf.estimator.ModeKeys.TRAIN
  # While heads fine-tune, the backbone is frozen: its BNs must use (and keep) the pretrained
  # moving statistics, so they run in inference mode even though the heads train.
  backbone_training = is_training and not plan.frozen_backbone
  averaged = contextlib.nullcontext()
  if params.moving_average_decay and not is_training:
    # Evaluation, dumps and exports use the averaged weights.
    averaged = warm_start.moving_average_scope(tf.train.latest_checkpoint(params.model_dir))
  with averaged:
    exit_logits = model(tf.cast(images, model.dtype), training=is_training,
                        backbone_training=backbone_training, exits=plan.built)
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
  loss_exits = plan.trained if is_training else tuple(sorted(exit_logits))
  cross_entropy = {k: _cross_entropy(labels, exit_logits[k], weights, params.label_smoothing)
                   for k in loss_exits}
  total_cross_entropy = tf.add_n(list(cross_entropy.values()), name='cross_entropy')
  tf.summary.scalar('cross_entropy', total_cross_entropy)

  groups = plan.trained_groups(model.num_exits)
  trainable = [v for v in tf.trainable_variables() if groups is None
               or resnet_model.variable_group(variable_name(v), model.num_exits) in groups]
  # Weight decay on the trained kernels (by default not on biases or BN parameters).
  decayed = decayed_variables(trainable, params.weight_decay_exclude)
  loss = total_cross_entropy
  if not params.decoupled_weight_decay:
    l2_loss = params.weight_decay * tf.add_n(
        [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in decayed] or [tf.constant(0.0)])
    tf.summary.scalar('l2_loss', l2_loss)
    loss = total_cross_entropy + l2_loss

  train_op = None
  if is_training:
    _training_summaries(exit_logits, predictions, labels, cross_entropy)
    train_op = _train_op(loss, trainable, decayed, params)
    if params.model_dir:
      warm_start.carry_unbuilt_variables(tf.train.latest_checkpoint(params.model_dir))
  return tf.estimator.EstimatorSpec(mode=mode, predictions=predictions, loss=loss,
                                    train_op=train_op,
                                    eval_metric_ops=_metrics(exit_logits, predictions, labels,
                                                             weights))
