"""Command-line flags of the dataset mains, in groups: base, training, dump and export.

The flags are those of the original README and of the 2018 official ResNet scripts (long names,
short names and defaults kept), plus this project's. A dataset main calls ``define_resnet_flags``
and then only changes defaults (``flag_values.set_default``). Values that depend on the machine
(``--num_gpus``) are filled in by ``apply_flag_defaults`` once the flags are parsed.
"""

import functools

import tensorflow.compat.v1 as tf
from absl import flags

import cascade_export
import model_fn
import resnet_layers
import softmax_dump


def _definer(flag_values):
  """DEFINE_<kind> functions bound to ``flag_values``: define('integer')(name, default, help)."""
  def define(kind):
    return functools.partial(getattr(flags, 'DEFINE_' + kind), flag_values=flag_values)
  return define


def _positive(flag_values, name):
  flags.register_validator(name, lambda v: v is None or v > 0, flag_values=flag_values,
                           message=f'--{name} must be a positive integer')


def define_base_flags(resnet_size_choices, default_resnet_size, num_exits, flag_values):
  """Data, model, devices and the exits the run builds (of ``num_exits``, the final included)."""
  define = _definer(flag_values)
  define('string')('data_dir', '/tmp', 'Folder of the input data.', short_name='dd')
  define('string')('model_dir', '/tmp/resnet_model', 'Folder of checkpoints and summaries.',
                   short_name='md')
  define('boolean')('clean', False, 'Delete --model_dir before starting.')
  define('integer')('batch_size', 32, 'Global batch size, split over the replicas.',
                    short_name='bs')
  define('integer')('num_gpus', None, 'GPUs to use: 0 runs on the CPU, N > 1 replicates '
                    'with MirroredStrategy, -1 takes all. Default: 1 if a GPU is visible, '
                    'else 0.', short_name='ng')
  define('integer')('cpu_replicas', 0, 'Split the CPU into this many logical devices and '
                    'replicate over them (to exercise multi-replica code without GPUs).')
  define('integer')('inter_op_parallelism_threads', 0, 'TF inter-op threads (0: automatic).',
                    short_name='inter')
  define('integer')('intra_op_parallelism_threads', 0, 'TF intra-op threads (0: automatic).',
                    short_name='intra')
  define('boolean')('use_synthetic_data', False, 'Random images instead of --data_dir, to '
                    'measure the model alone.', short_name='synth')
  define('integer')('datasets_num_private_threads', None, 'Private thread pool size of the '
                    'input pipeline.')
  define('enum')('dtype', 'fp32', ['fp16', 'bf16', 'fp32'], 'Compute precision: variables, BN '
                 'statistics and losses stay fp32; bf16 needs no loss scaling and is fast on '
                 'CPUs with AVX512_BF16 or AMX (and on recent GPUs).', short_name='dt')
  define('enum')('data_format', None, ['channels_first', 'channels_last'], 'Layout of the '
                 'activations; channels_first is faster on GPUs. Default: channels_first if '
                 'a GPU is used.', short_name='df')
  define('enum')('resnet_version', '1', ['1', '2'], 'ResNet v1 (v1.5) or v2 '
                 '(pre-activation).', short_name='rv')
  define('enum')('resnet_size', default_resnet_size, [str(s) for s in resnet_size_choices],
                 'Network depth.', short_name='rs')
  define('float')('batch_norm_decay', resnet_layers.BATCH_NORM_DECAY, 'Decay of the BN moving '
                  'averages (official: 0.997; short runs such as the CPU demo need less, e.g. '
                  '0.9, or evaluation sees unconverged statistics).')
  define('string')('pretrained_model_checkpoint_path', None, 'Pretrained checkpoint (prefix or '
                   'folder) to warm-start an empty --model_dir from.', short_name='pmcp')
  define('boolean')('is_cascaded', True, 'Build the cascaded model (--nois_cascaded: the '
                    'plain network, classifier 2 only).')
  exit_ids = ', '.join(str(k) for k in range(num_exits))
  define('string')('classifier_id', str(num_exits - 1), f'Exit to build, train, evaluate and '
                   f"dump: {exit_ids}, or 'all' (every exit from one pass; with --fine_tune the "
                   'early heads train together).')
  define('boolean')('eval_only', False, 'Skip training: only dump (and, with '
                    '--evaluate_in_eval_only, evaluate).')
  define('boolean')('evaluate_in_eval_only', False, 'Also run Estimator.evaluate in '
                    '--eval_only mode (the dumps already give every accuracy).')

  def classifier_id_is_valid(value):
    try:
      model_fn.ExitPlan.parse(value, num_exits)
    except ValueError:
      return False
    return True
  flags.register_validator('classifier_id', classifier_id_is_valid, flag_values=flag_values,
                           message=f"--classifier_id must be {exit_ids} or 'all'")
  flags.register_validator('batch_size', lambda v: v is not None and v > 0,
                           flag_values=flag_values,
                           message='--batch_size must be a positive integer')


def define_distribution_flags(flag_values):
  """One device, several (MirroredStrategy), or several machines (MultiWorkerMirroredStrategy)."""
  define = _definer(flag_values)
  define('enum')('distribution_strategy', 'default', ['default', 'mirrored',
                                                      'multi_worker_mirrored'],
                 'default: one device, or MirroredStrategy over --num_gpus / --cpu_replicas; '
                 'mirrored: MirroredStrategy even over one device; multi_worker_mirrored: every '
                 'machine of the cluster in TF_CONFIG (or SLURM\'s, see --cluster_resolver) with '
                 'its own --num_gpus, --batch_size global across all of them.')
  define('enum')('cluster_resolver', 'tf_config', ['tf_config', 'slurm'], 'Where '
                 'multi_worker_mirrored finds the cluster: the TF_CONFIG variable, or the '
                 'environment of srun (one task per worker).')
  define('integer')('slurm_port_base', 8888, 'First port of the workers under '
                    '--cluster_resolver slurm (one per task on a node).')
  define('float')('collective_timeout_seconds', 600, 'multi_worker_mirrored: a worker that '
                  'stops answering for this long ends every worker with one error (rerun every '
                  "worker's command to resume).")
  define('float')('rendezvous_timeout_seconds', 600, 'multi_worker_mirrored: how long each '
                  'worker waits for the others to start.')
  define('integer')('num_workers', None, 'Dump only part --worker_index of this many parts of '
                    'each split (independent processes, e.g. a SLURM array); the process '
                    'finishing last joins the parts. With a cluster: its size.')
  define('integer')('worker_index', None, 'This process\'s part, 0..--num_workers-1.')
  _positive(flag_values, 'num_workers')
  flags.register_validator('worker_index', lambda v: v is None or v >= 0,
                           flag_values=flag_values,
                           message='--worker_index must be 0 or more, below --num_workers')


def define_training_flags(default_train_epochs, flag_values):
  """How long and how to train, and how often to evaluate and save."""
  define = _definer(flag_values)
  define('integer')('train_epochs', default_train_epochs, 'Epochs to train.', short_name='te')
  define('integer')('epochs_between_evals', 1, 'Epochs between evaluations.',
                    short_name='ebe')
  define('float')('stop_threshold', None, 'Stop training once the evaluated top-1 accuracy '
                  'reaches this value.', short_name='st')
  define('integer')('max_train_steps', None, 'Stop training at this global step.',
                    short_name='mts')
  define('boolean')('fine_tune', False, 'Train only the chosen classifier head(s); the '
                    'backbone is frozen, its BN statistics included.', short_name='ft')
  define('integer')('loss_scale', None, 'Loss scale for fp16 gradients (default 128 for '
                    'fp16, 1 otherwise).', short_name='ls')
  define('integer')('seed', None, 'Seed the training input (the shuffle and every image\'s '
                    'augmentation), so that its batches are the same in every run and on every '
                    'worker; default: unseeded, as the official code.')
  define('enum')('lr_schedule', 'step', ['step', 'cosine'], 'Learning-rate schedule: the data '
                 "set's steps (the article's), or a cosine from the same initial rate to 0 at "
                 '--train_epochs.')
  define('float')('warmup_epochs', None, 'Linear warm-up from 0 over this many epochs (default: '
                  "the data set's: 5 when ImageNet trains the whole network, else none).")
  define('float')('label_smoothing', 0.0, 'Label smoothing of the cross-entropy: the target puts '
                  '1 - s + s/C on the true class and s/C on the others.')
  define('float')('moving_average_decay', None, 'Keep an exponential moving average of the '
                  'trained variables (in the checkpoint, under ExponentialMovingAverage names) '
                  'and evaluate, dump and export with it.')
  define('float')('gradient_clip_norm', None, 'Clip the gradients to this global norm.')
  define('float')('weight_decay', model_fn.WEIGHT_DECAY, 'Weight decay of the trained '
                  'variables but those --weight_decay_exclude matches.')
  define('list')('weight_decay_exclude', list(model_fn.WEIGHT_DECAY_EXCLUDE),
                 'Regular expressions; trained variables whose name one of them matches are not '
                 'decayed (default: BN parameters and biases).')
  define('boolean')('decoupled_weight_decay', False, 'Decay the weights in the update (w -= lr '
                    '* weight_decay * w) instead of adding an L2 term to the loss.')
  define('list')('hooks', ['LoggingTensorHook'], 'Training hooks: LoggingTensorHook logs '
                 'learning rate, cross-entropy and train accuracy.', short_name='hk')
  define('integer')('log_every_n_steps', 100, 'Steps between training log lines.')
  define('integer')('save_checkpoints_secs', 600, 'Seconds between checkpoints while '
                    'training (a rerun resumes from the latest one).')
  define('integer')('save_checkpoints_steps', None, 'Steps between checkpoints (overrides '
                    '--save_checkpoints_secs).')
  for name in ('train_epochs', 'epochs_between_evals', 'max_train_steps'):
    _positive(flag_values, name)
  checks = {
      'moving_average_decay': (lambda v: 0 < v < 1, 'a decay strictly between 0 and 1, e.g. '
                               '0.9999'),
      'label_smoothing': (lambda v: 0 <= v < 1, 'in [0, 1), e.g. 0.1'),
      'gradient_clip_norm': (lambda v: v > 0, 'a positive norm, e.g. 5'),
      'weight_decay': (lambda v: v >= 0, 'zero or positive'),
      'warmup_epochs': (lambda v: v >= 0, 'zero or positive'),
  }
  for name, (check, what) in checks.items():
    flags.register_validator(name, lambda v, check=check: v is None or check(v),
                             flag_values=flag_values, message=f'--{name} must be {what}')


def define_dump_flags(flag_values):
  """Where the softmax dumps go and which splits they cover."""
  define = _definer(flag_values)
  define('string')('softmax_dir', 'output_softmax', 'Dump folder for the softmax outputs '
                   "('' to skip dumping).")
  define('boolean')('dump_train', True, 'Also dump the training split (in a fixed order, '
                    'eval preprocessing); --nodump_train skips it.')
  define('integer')('dump_commit_seconds', softmax_dump.COMMIT_SECONDS, 'Seconds between the '
                    'points a killed dump resumes from (rerun the same command).', lower_bound=0)


def define_export_flags(flag_values):
  """The SavedModel of the plain network and the real early-exit cascade."""
  define = _definer(flag_values)
  define('string')('export_dir', None, 'Export a SavedModel here at the end.', short_name='ed')
  define('boolean')('image_bytes_as_serving_input', False, 'Export a SavedModel that takes '
                    'JPEG bytes instead of a float image batch.')
  define('string')('export_cascade_dir', None, 'Export the real early-exit cascade (a '
                   'SavedModel that skips the layers confident images do not need) here.')
  define('string')('cascade_thresholds', None, 'thresholds.json from analyze_imagenet_labels.py '
                   'for --export_cascade_dir.')
  define('float')('epsilon', None, 'The article\'s accuracy budget whose thresholds the exported '
                  'cascade uses (a fraction listed in --cascade_thresholds; default 0.05 unless '
                  '--accuracy_drop is given).')
  define('float')('accuracy_drop', None, 'Instead of --epsilon: the guaranteed accuracy drop '
                  'whose risk-controlled thresholds the exported cascade uses (a fraction listed '
                  'in --cascade_thresholds, from analyze_imagenet_labels.py --accuracy_drop).')
  define('enum')('cascade_mode', 'top1', ['top1', 'top5'], 'Confidence of the exported cascade: '
                 'largest probability (top1) or sum of the five largest (top5).')
  define('integer')('cascade_chunk_size', None, 'The exported cascade (and its plain `full` '
                    'signature) classifies a batch this many images at a time; 0: the whole batch '
                    'at once. Default: 0 where TensorFlow\'s oneDNN kernels are on (Intel Xeons, '
                    'recent AMD EPYCs) or on GPUs, {} on other CPUs, whose caches the early '
                    'feature maps of a big batch overflow.'.format(cascade_export.CPU_CHUNK_SIZE),
                    lower_bound=0)
  define('string')('export_tflite_dir', None, 'Export one TensorFlow Lite model per stage of the '
                   'cascade here (for cascade_predict.py --tflite), in each of --tflite_variants.')
  define('list')('tflite_variants', ['float32', 'dynamic_int8', 'int8'], 'TFLite variants: '
                 'float32, dynamic_int8 (int8 weights) and int8 (full integer, calibrated on '
                 '--tflite_calibration_images training images).')
  define('integer')('tflite_calibration_images', 500, 'Training images (evaluation '
                    'preprocessing, in their fixed order) the int8 variant is calibrated on.',
                    lower_bound=1)


def define_resnet_flags(resnet_size_choices, default_resnet_size='50', default_train_epochs=90,
                        num_exits=3, flag_values=flags.FLAGS):
  """Defines every flag group.

  Args:
    resnet_size_choices: allowed --resnet_size values.
    default_resnet_size: default --resnet_size.
    default_train_epochs: default --train_epochs.
    num_exits: exits of the data set's model, the final classifier included.
    flag_values: the FlagValues to define them in (tests use a fresh one per run).
  """
  define_base_flags(resnet_size_choices, default_resnet_size, num_exits, flag_values)
  define_distribution_flags(flag_values)
  define_training_flags(default_train_epochs, flag_values)
  define_dump_flags(flag_values)
  define_export_flags(flag_values)


def apply_flag_defaults(flags_obj):
  """Fills flags whose default depends on the machine."""
  if flags_obj.num_gpus is None:
    flags_obj.num_gpus = 1 if tf.config.list_physical_devices('GPU') else 0
