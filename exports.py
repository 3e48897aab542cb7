"""What a job exports at its end: the plain network as a SavedModel, the real early-exit cascade,
and the cascade's stages as TensorFlow Lite models.
"""

import tensorflow.compat.v1 as tf
from absl import logging

import cascade_export


def threshold_choice(flags_obj):
  """{'epsilon': ..., 'accuracy_drop': ...} of the exported cascade: exactly one is set."""
  if flags_obj.epsilon is not None and flags_obj.accuracy_drop is not None:
    raise ValueError('give --epsilon (the article\'s rule) or --accuracy_drop (a guaranteed '
                     'drop), not both')
  if flags_obj.accuracy_drop is not None:
    return {'epsilon': None, 'accuracy_drop': flags_obj.accuracy_drop}
  return {'epsilon': 0.05 if flags_obj.epsilon is None else flags_obj.epsilon,
          'accuracy_drop': None}


def export_cascade(job):
  """The real early-exit cascade of the model_dir's latest checkpoint, as a SavedModel."""
  flags_obj, spec = job.flags, job.spec
  return cascade_export.export_cascade(
      tf.train.latest_checkpoint(flags_obj.model_dir), spec.model_factory, spec.image_shape,
      flags_obj.cascade_thresholds, threshold_choice(flags_obj)['epsilon'], flags_obj.cascade_mode,
      flags_obj.export_cascade_dir, spec.name, job.params.model.data_format,
      spec.image_bytes_serving_fn if flags_obj.image_bytes_as_serving_input else None,
      flags_obj.cascade_chunk_size, dtype=job.params.model.dtype,
      moving_averages=bool(job.params.moving_average_decay),
      accuracy_drop=threshold_choice(flags_obj)['accuracy_drop'])


def export_tflite(job):
  """One TensorFlow Lite model per stage of the model_dir's latest checkpoint, per variant."""
  import tflite_export  # TensorFlow Lite's converter is needed by this step only
  flags_obj, spec = job.flags, job.spec
  return tflite_export.export_stages(
      checkpoint=tf.train.latest_checkpoint(flags_obj.model_dir),
      model_factory=spec.model_factory, image_shape=spec.image_shape,
      export_dir_base=flags_obj.export_tflite_dir, dataset=spec.name,
      calibration_input_fn=job.input_fn(False, 'train'),
      num_calibration_images=flags_obj.tflite_calibration_images,
      variants=flags_obj.tflite_variants,
      moving_averages=bool(job.params.moving_average_decay))


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
