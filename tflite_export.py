"""TensorFlow Lite stage models of the cascade: one ``.tflite`` per variant, a signature per stage.

``export_stages`` writes, into a new timestamped folder under ``--export_tflite_dir``::

    <variant>.tflite     signatures stage0, stage1, ... (one per exit), for batch 1:
                           stage0: input [1, H, W, C] images -> features, logits
                           stage k: input = stage k-1's features -> features, logits
                           last stage: input -> logits
    cascade_info.json    data set, image shape, classes, exits, per-stage inputs, MACs, variants
                         (file, bytes, sha256), calibration images, checkpoint, thresholds

All stages of a variant live in one file so that one interpreter (one XNNPACK thread pool) runs
the whole cascade: several interpreters on a 2-core CPU fight over the cores. The stages return
logits, not probabilities: an int8 softmax is quantised to steps of 1/256 and saturates at
0.996, so confidence thresholds above it could never be reached. ``cascade_predict.py --tflite``
takes the softmax of the float logits in numpy.

Variants (``--tflite_variants``):

* ``float32``: the network as it is.
* ``dynamic_int8``: int8 weights, float activations.
* ``int8``: int8 weights and activations, calibrated on the first ``--tflite_calibration_images``
  training images in their fixed order with evaluation preprocessing (stage k > 0 on the float
  features the float stage k - 1 gives for the same images); float32 inputs and outputs, so the
  runner hands the features from stage to stage as floats. The calibration set is pinned and
  recorded: exit 0 is the exit whose accuracy the choice moves most.

The conversion goes through a TF1 SavedModel (one signature per stage, each stage's graph built
by ``Model.stage`` and restored from the checkpoint) and ``tf.lite.TFLiteConverter
.from_saved_model``. It must run in a process with eager execution on (TensorFlow's default):
after ``tf.disable_eager_execution()`` the converter silently drops the signatures, which is
checked here.
"""

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time

import tensorflow as tf2
import tensorflow.compat.v1 as tf
from absl import logging

import resnet_model
import warm_start

VARIANTS = ('float32', 'dynamic_int8', 'int8')
INFO_NAME = 'cascade_info.json'   # the name cascade_export gives its info file, too
FORMAT = 'tflite_cascade'
FORMAT_VERSION = 1
INPUT_KEY = 'input'
FEATURES_KEY = 'features'
LOGITS_KEY = 'logits'
BATCH = 1   # stage models are for batch-1 inference on a device; static shapes convert best
_FIX_EXPORT = 're-export with --export_tflite_dir'


class ExportError(ValueError):
  """A TFLite export that cannot be made or used; the message names the file and the fix."""


def signature_key(stage):
  """The signature of stage ``stage`` in every variant's model: 'stage0', 'stage1', ..."""
  return f'stage{int(stage)}'


def model_file(variant):
  """File name of a variant's model in the export folder, e.g. 'int8.tflite'."""
  return f'{variant}.tflite'


def check_variants(variants):
  """The variants asked for, in the order given, each once; ExportError for an unknown one.

  Args:
    variants: a list of names (``--tflite_variants``) or one comma-separated string.
  """
  if isinstance(variants, str):
    variants = variants.split(',')
  chosen = []
  for variant in variants:
    variant = variant.strip()
    if variant not in VARIANTS:
      raise ExportError(f'unknown TFLite variant {variant!r} in --tflite_variants; choose from '
                        f'{", ".join(VARIANTS)}')
    if variant not in chosen:
      chosen.append(variant)
  if not chosen:
    raise ExportError(f'--tflite_variants is empty; choose from {", ".join(VARIANTS)}')
  return tuple(chosen)


def check_checkpoint(checkpoint, model, image_shape):
  """Raises a clear error unless ``checkpoint`` holds every variable of every stage.

  The stage models need all exit heads: a checkpoint of the plain network (or of one head) is
  refused with the fine-tuning command, not with a restore error deep inside the export.
  """
  fix_heads = ('fine-tune the exit heads first (--fine_tune --classifier_id all), or export the '
               'plain network with --export_dir')
  if not checkpoint or not tf.train.checkpoint_exists(checkpoint):
    raise FileNotFoundError(f'no checkpoint {checkpoint!r} to export as TFLite stage models; '
                            'train the model and its exit heads first (--fine_tune '
                            '--classifier_id all)')
  shapes = tf.train.load_checkpoint(checkpoint).get_variable_to_shape_map()
  height, width, channels = image_shape
  with tf.Graph().as_default():
    model(tf.zeros([1, height, width, channels]), training=False)
    variables = {v.op.name: v.shape.as_list() for v in tf.global_variables()}
  problems = warm_start.checkpoint_mismatches(variables, shapes)
  if not problems:
    return
  heads = sorted({resnet_model.variable_group(name, model.num_exits) for name in variables
                  if name not in shapes} - {'backbone', 'final_dense', None})
  if heads:
    raise ExportError(f'the checkpoint {checkpoint} has no exit heads ({", ".join(heads)} '
                      f'missing, e.g. {problems[0]}): the stage models need every exit; '
                      f'{fix_heads}')
  raise ExportError(f'the checkpoint {checkpoint} does not fit the model ({len(problems)} '
                    f'problems, e.g. {problems[0]}); export with the --resnet_size and '
                    '--resnet_version it was trained with')


# -------------------------------------------------------------------------------------------------
# Graphs.


def stage_input_shapes(model, image_shape, batch=BATCH):
  """The input shape of every stage: [batch, H, W, C] images, then each stage's features."""
  height, width, channels = image_shape
  shapes = [[batch, height, width, channels]]
  for stage in range(model.num_exits - 1):
    shapes.append([batch] + model.stage_feature_shape(stage, height, width))
  return shapes


def build_stages(model, image_shape, batch=BATCH):
  """Builds every stage on a placeholder of its own, in the default graph.

  The model must be channels_last (TFLite kernels are NHWC). Each stage creates its own
  variables under the whole model's names (``Model.stage``), so one saver restores all of them.

  Args:
    model: a resnet_model.Model.
    image_shape: (height, width, channels).
    batch: the static batch size of the placeholders (None: any).

  Returns:
    list of dicts, one per stage: 'input' (float32 placeholder, see stage_input_shapes),
    'features' (the next stage's input; None for the last stage), 'logits' [batch, classes].
  """
  stages = []
  for stage, shape in enumerate(stage_input_shapes(model, image_shape, batch)):
    inputs = tf.placeholder(tf.float32, shape, name=f'{signature_key(stage)}_input')
    features, logits = model.stage(stage, inputs, training=False)
    stages.append({'input': inputs, 'features': features,
                   'logits': tf.cast(logits, tf.float32)})
  return stages


def _variables_of(checkpoint, moving_averages):
  """The scope to build in: the checkpoint's moving averages (--moving_average_decay) or not."""
  return (warm_start.moving_average_scope(checkpoint) if moving_averages
          else contextlib.nullcontext())


def write_saved_model(export_dir, model, image_shape, checkpoint, moving_averages=False):
  """A TF1 SavedModel with one predict signature per stage, restored from ``checkpoint``.

  Returns:
    The signature keys, in stage order.
  """
  keys = []
  with tf.Graph().as_default():
    with _variables_of(checkpoint, moving_averages):
      stages = build_stages(model, image_shape)
    signatures = {}
    for stage, parts in enumerate(stages):
      outputs = {LOGITS_KEY: parts['logits']}
      if parts['features'] is not None:
        outputs[FEATURES_KEY] = parts['features']
      keys.append(signature_key(stage))
      signatures[keys[-1]] = tf.saved_model.signature_def_utils.predict_signature_def(
          inputs={INPUT_KEY: parts['input']}, outputs=outputs)
    with tf.Session() as sess:
      tf.train.Saver().restore(sess, checkpoint)
      builder = tf.saved_model.Builder(export_dir)
      builder.add_meta_graph_and_variables(sess, [tf.saved_model.tag_constants.SERVING],
                                           signature_def_map=signatures)
      builder.save()
  return keys


class CalibrationImages:
  """The int8 calibration set: the first N images of ``calibration_input_fn``'s dataset.

  Each call yields, image by image, (signature key, {'input': x}) for every stage: the image for
  stage 0, and for stage k > 0 the float features the float stage k - 1 gives for that image
  (computed by TensorFlow from the checkpoint, a batch of images at a time), so every stage is
  calibrated on what it sees in the float cascade. ``count`` is the number of images the last
  pass yielded (fewer than asked if the split is smaller).

  Args:
    calibration_input_fn: () -> dataset of ([batch, H, W, C] images, [batch] labels) (or of
      {'image': ...} features), in a fixed order; called inside a graph of this object's own.
    num_images: how many images, from the first.
    model: the resnet_model.Model (channels_last) whose float stages give the features.
    image_shape: (height, width, channels).
    checkpoint: the checkpoint the float stages are restored from.
    moving_averages: use its moving averages of the variables.
  """

  def __init__(self, calibration_input_fn, num_images, model, image_shape, checkpoint,
               moving_averages=False):
    self.num_images = int(num_images)
    self.count = 0
    self._graph = tf.Graph()
    with self._graph.as_default():
      dataset = calibration_input_fn()
      self._iterator = tf.data.make_initializable_iterator(dataset)
      element = self._iterator.get_next()
      images = element[0] if isinstance(element, (tuple, list)) else element
      if isinstance(images, dict):
        images = images['image']
      height, width, channels = image_shape
      images = tf.cast(images, tf.float32)
      images.set_shape([None, height, width, channels])
      # The float cascade: each stage on the previous one's features.
      self._stage_inputs = [images]
      with _variables_of(checkpoint, moving_averages):
        for stage in range(model.num_exits - 1):
          features, _ = model.stage(stage, self._stage_inputs[-1], training=False, head=False)
          self._stage_inputs.append(tf.cast(features, tf.float32))
      self._session = tf.Session()
      tf.train.Saver().restore(self._session, checkpoint)

  def __call__(self):
    self._session.run(self._iterator.initializer)
    self.count = 0
    while self.count < self.num_images:
      try:
        inputs = self._session.run(self._stage_inputs)
      except tf.errors.OutOfRangeError:
        logging.warning('the calibration split has only %d images; calibrating on those, not '
                        'on %d', self.count, self.num_images)
        return
      for i in range(min(len(inputs[0]), self.num_images - self.count)):
        for stage, values in enumerate(inputs):
          yield signature_key(stage), {INPUT_KEY: values[i:i + 1]}
        self.count += 1

  def close(self):
    self._session.close()


def convert(saved_model_dir, signature_keys, variant, representative_dataset=None):
  """One .tflite (bytes) holding ``signature_keys`` of a SavedModel, in one variant.

  Args:
    saved_model_dir: a SavedModel with float32 signatures.
    signature_keys: the signatures to convert, each becomes a signature of the model.
    variant: one of VARIANTS.
    representative_dataset: for 'int8': a callable yielding (signature key, {input name: array})
      per sample.

  Returns:
    The flatbuffer bytes.
  """
  converter = tf2.lite.TFLiteConverter.from_saved_model(saved_model_dir,
                                                        signature_keys=list(signature_keys))
  if variant != 'float32':
    converter.optimizations = [tf2.lite.Optimize.DEFAULT]
  if variant == 'int8':
    if representative_dataset is None:
      raise ExportError('the int8 variant needs calibration images (calibration_input_fn)')
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf2.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # Inputs and outputs stay float32 (the default): the runner takes the softmax of float
    # logits and passes float features on; a quantised softmax would saturate at 0.996.
  content = converter.convert()
  found = sorted(tf2.lite.Interpreter(model_content=content).get_signature_list())
  if found != sorted(signature_keys):
    # TensorFlow converts a SavedModel without its signatures after disable_eager_execution().
    raise RuntimeError(f'the {variant} TFLite model has signatures {found}, not '
                       f'{list(signature_keys)}: convert in a process with eager execution on '
                       '(do not call tf.disable_eager_execution() before exporting)')
  return content


def file_digest(path):
  """sha256 of a file, in hex."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _write_json(path, content):
  temporary = f'{path}.{os.getpid()}-{secrets.token_hex(4)}.partial'
  with open(temporary, 'w') as f:
    json.dump(content, f, indent=2)
    f.write('\n')
  os.replace(temporary, path)


def _publish(partial_dir, export_dir_base):
  """Renames the finished export to a new timestamped folder; returns its path."""
  stamp = int(time.time())
  while True:
    target = os.path.join(export_dir_base, str(stamp))
    if not os.path.exists(target):
      try:
        os.rename(partial_dir, target)
        return target
      except OSError:
        if not os.path.exists(target):
          raise
    stamp += 1   # Another export took this second.


def export_stages(checkpoint, model_factory, image_shape, export_dir_base, dataset,
                  calibration_input_fn=None, num_calibration_images=500,
                  variants=VARIANTS, moving_averages=False, calibration_split='train',
                  thresholds=None):
  """Writes the TFLite stage models into a new timestamped folder under ``export_dir_base``.

  Args:
    checkpoint: checkpoint prefix holding every exit's variables.
    model_factory: (data_format, dtype) -> resnet_model.Model.
    image_shape: (height, width, channels) the model sees.
    export_dir_base: parent folder of the export.
    dataset: data set name, recorded for cascade_predict.py.
    calibration_input_fn: () -> tf.data dataset of ([batch, H, W, C] images, [batch] labels) of
      the calibration split in a fixed order with evaluation preprocessing; called inside a
      graph. Needed for the int8 variant.
    num_calibration_images: the first this many images calibrate the int8 variant.
    variants: names of VARIANTS (a list or a comma-separated string).
    moving_averages: use the checkpoint's moving averages of the variables (a run with
      --moving_average_decay).
    calibration_split: the split calibration_input_fn reads, for the record.
    thresholds: optional {variant: {'mode', 'epsilon' or 'accuracy_drop', 'thresholds',
      'source'}} recorded for the runner (see record_thresholds).

  Returns:
    The export folder.

  Raises:
    ExportError: an unknown variant, a checkpoint without the exit heads, int8 without
      calibration images.
    FileNotFoundError: no checkpoint.
  """
  variants = check_variants(variants)
  if 'int8' in variants and calibration_input_fn is None:
    raise ExportError('the int8 TFLite variant needs calibration images: pass '
                      'calibration_input_fn, or drop int8 from --tflite_variants')
  model = model_factory('channels_last', tf.float32)
  check_checkpoint(checkpoint, model, image_shape)
  if moving_averages:
    _variables_of(checkpoint, True)   # Raises now if the checkpoint holds no averages.
  height, width, _ = image_shape
  os.makedirs(export_dir_base, exist_ok=True)
  partial_dir = os.path.join(export_dir_base,
                             f'.tflite-{os.getpid()}-{secrets.token_hex(4)}.partial')
  os.makedirs(partial_dir)
  calibration = None
  try:
    saved_model_dir = os.path.join(partial_dir, 'saved_model')
    keys = write_saved_model(saved_model_dir, model, image_shape, checkpoint, moving_averages)
    files = {}
    for variant in variants:
      start = time.time()
      representative = None
      if variant == 'int8':
        calibration = CalibrationImages(calibration_input_fn, num_calibration_images, model,
                                        image_shape, checkpoint, moving_averages)
        representative = calibration
      content = convert(saved_model_dir, keys, variant, representative)
      path = os.path.join(partial_dir, model_file(variant))
      with open(path, 'wb') as f:
        f.write(content)
      files[variant] = {'file': model_file(variant), 'bytes': len(content),
                        'sha256': hashlib.sha256(content).hexdigest()}
      logging.info('TFLite %s: %d signatures, %.1f MB, converted in %.1f s', variant, len(keys),
                   len(content) / 1e6, time.time() - start)
    shutil.rmtree(saved_model_dir)
    info = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'export_id': f'{int(time.time())}-{secrets.token_hex(4)}',
        'dataset': dataset,
        'image_shape': [int(d) for d in image_shape],
        'num_classes': model.num_classes,
        'num_exits': model.num_exits,
        'model': {'resnet_size': model.resnet_size, 'resnet_version': model.resnet_version,
                  'image_size': [height, width]},
        'signatures': keys,
        'stage_inputs': stage_input_shapes(model, image_shape),
        'outputs': 'logits (softmax in the runner)',
        'variants': files,
        'stage_macs': model.stage_macs(height, width),
        'plain_macs': model.plain_macs(height, width),
        'calibration': None if calibration is None else {
            'images': calibration.count, 'requested': calibration.num_images,
            'split': calibration_split,
            'order': f'the first {calibration.count} {calibration_split} images in the fixed '
                     'evaluation order, evaluation preprocessing',
        },
        'checkpoint': checkpoint,
        'moving_averages': bool(moving_averages),
        'thresholds': thresholds or {},
    }
    _write_json(os.path.join(partial_dir, INFO_NAME), info)
    export_dir = _publish(partial_dir, export_dir_base)
  except BaseException:
    shutil.rmtree(partial_dir, ignore_errors=True)
    raise
  finally:
    if calibration is not None:
      calibration.close()
  logging.info('exported TFLite stage models (%s) to %s', ', '.join(variants), export_dir)
  return export_dir


# -------------------------------------------------------------------------------------------------
# Finding and checking an export (for cascade_predict.py).


def is_export(folder):
  """Whether ``folder`` holds a TFLite export's info file."""
  path = os.path.join(folder, INFO_NAME)
  if not os.path.isfile(path):
    return False
  with contextlib.suppress(OSError, ValueError, AttributeError), open(path) as f:
    return json.load(f).get('format') == FORMAT
  return True   # A damaged info file: read_info names it.


def find_export(path):
  """The export folder: ``path`` itself, or its newest timestamped export."""
  if path and is_export(path):
    return path
  if path and os.path.isdir(path):
    stamps = sorted(int(d) for d in os.listdir(path)
                     if d.isdigit() and is_export(os.path.join(path, d)))
    if stamps:
      return os.path.join(path, str(stamps[-1]))
  raise FileNotFoundError(f'--tflite {path!r} holds no TFLite export ({INFO_NAME} with the '
                          f'stage models); export one with --export_tflite_dir (see README)')


def read_info(export_dir):
  """The checked ``cascade_info.json`` of a TFLite export."""
  path = os.path.join(export_dir, INFO_NAME)
  try:
    with open(path) as f:
      info = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f'{path} is missing: {export_dir} holds no TFLite export; '
                            f'{_FIX_EXPORT}') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ExportError(f'{path} is not valid JSON ({e}): it is damaged or was cut short; '
                      f'{_FIX_EXPORT}') from e
  if not isinstance(info, dict) or info.get('format') != FORMAT:
    raise ExportError(f'{path} does not describe TFLite stage models (it is another kind of '
                      'export: a SavedModel cascade runs with --saved_model); ' + _FIX_EXPORT)
  missing = [k for k in ('image_shape', 'num_classes', 'num_exits', 'signatures', 'stage_inputs',
                         'variants', 'stage_macs', 'plain_macs') if k not in info]
  if missing:
    raise ExportError(f'{path} lacks {", ".join(missing)}; {_FIX_EXPORT}')
  if info.get('format_version') != FORMAT_VERSION:
    raise ExportError(f'{path} has format version {info.get("format_version")}, this code reads '
                      f'{FORMAT_VERSION}; {_FIX_EXPORT}')
  return info


def variant_path(export_dir, info, variant):
  """The checked model file of ``variant``: listed in the info, present, and the very file.

  Raises:
    ExportError: the export has no such variant, or the file is not the one the info describes
      (size or sha256 differ: copied from another export, or changed).
    FileNotFoundError: the file is missing.
  """
  if variant not in info['variants']:
    have = ', '.join(info['variants']) or 'none'
    raise ExportError(f'--variant {variant}: the export {export_dir} has no {variant} model (it '
                      f'has {have}); export it with --tflite_variants {variant}, or choose one '
                      'of those')
  entry = info['variants'][variant]
  path = os.path.join(export_dir, entry['file'])
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing although {os.path.join(export_dir, INFO_NAME)} '
                            f'lists it; copy the whole export folder, or {_FIX_EXPORT}')
  fix = ('it comes from another export or was changed: keep each export folder whole (the '
         f'.tflite files with their {INFO_NAME}), or {_FIX_EXPORT}')
  size = os.path.getsize(path)
  if size != entry.get('bytes'):
    raise ExportError(f'{path} is not the model {INFO_NAME} describes ({size} bytes, not '
                      f'{entry.get("bytes")}): {fix}')
  if file_digest(path) != entry.get('sha256'):
    raise ExportError(f'{path} is not the model {INFO_NAME} describes (its sha256 differs): '
                      f'{fix}')
  return path


def record_thresholds(export_dir, variant, entry):
  """Records thresholds for ``variant`` in the export's info, for runs without a thresholds file.

  Args:
    export_dir: a TFLite export folder.
    variant: the variant whose own dumps the thresholds were tuned on.
    entry: {'mode': 'top1' or 'top5', 'epsilon' or 'accuracy_drop': float,
      'thresholds': num_exits - 1 floats, 'source': the thresholds.json}.
  """
  info = read_info(export_dir)
  variant_path(export_dir, info, variant)
  if len(entry['thresholds']) != info['num_exits'] - 1:
    raise ExportError(f'{len(entry["thresholds"])} thresholds for a model with '
                      f'{info["num_exits"] - 1} early exits')
  info.setdefault('thresholds', {})[variant] = entry
  _write_json(os.path.join(export_dir, INFO_NAME), info)


def info_checks(info, export_dir):
  """The info's own consistency: one signature and one input shape per exit."""
  path = os.path.join(export_dir, INFO_NAME)
  num_exits = info['num_exits']
  if (info['signatures'] != [signature_key(k) for k in range(num_exits)]
      or len(info['stage_inputs']) != num_exits):
    raise ExportError(f'{path} lists signatures {info["signatures"]} and '
                      f'{len(info["stage_inputs"])} stage inputs for {num_exits} exits; '
                      f'{_FIX_EXPORT}')
  if list(info['stage_inputs'][0][1:]) != list(info['image_shape']):
    raise ExportError(f'{path}: stage 0 takes {info["stage_inputs"][0][1:]} but the image shape '
                      f'is {info["image_shape"]}; {_FIX_EXPORT}')

