"""ImageNet image preprocessing of the official TF ResNet models (the 2018 recipe).

Evaluation: decode the JPEG, resize with the aspect ratio kept so that the shorter side is
RESIZE_MIN (256 for a 224x224 output), crop the central output_height x output_width window and
subtract the per-channel RGB means. Training: crop a random window drawn by
``sample_distorted_bounding_box`` around the record's boxes (or the whole image), flip left-right
at random, resize to output_height x output_width, subtract the means. No scaling by a standard
deviation: the official checkpoints were trained on mean-subtracted 0..255 pixels.

Resizing uses the TF 1.x bilinear kernel (no half-pixel centres, corners not aligned), the one
the official checkpoints were trained with; TF 2's ``tf.image.resize`` shifts the sampling grid
by half a pixel and would feed them slightly different pixels.

All functions build graph ops (``tensorflow.compat.v1``) and work inside ``tf.data`` ``map``.
"""

import tensorflow as tf2
import tensorflow.compat.v1 as tf

# Per-channel RGB means of the ImageNet training set, subtracted from 0..255 pixels.
CHANNEL_MEANS = [123.68, 116.78, 103.94]
# Shorter side after the evaluation resize, for a 224x224 crop (the ratio 256/224 is kept for
# other output sizes, see eval_resize_min).
RESIZE_MIN = 256
_RESIZE_MIN_OUTPUT_SIZE = 224

# Random crop of the training path: the window covers at least 10 % of the object box, has an
# aspect ratio between 3:4 and 4:3 and 5 % to 100 % of the image area; after 100 failed draws
# sample_distorted_bounding_box falls back to the whole image.
_MIN_OBJECT_COVERED = 0.1
_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_AREA_RANGE = (0.05, 1.0)
_MAX_ATTEMPTS = 100


def eval_resize_min(output_height, output_width):
  """Shorter side the evaluation path resizes to before its central crop.

  RESIZE_MIN (256) belongs to a 224x224 output. For other sizes it scales by the same ratio,
  rounded to whole pixels and taken from the larger output side, so that small test sizes crop
  the same share of the image as the real one (32x32 -> 37) and the crop always fits.

  Args:
    output_height, output_width: python ints, the size of the crop.

  Returns:
    python int.
  """
  size = max(output_height, output_width)
  return (RESIZE_MIN * size + _RESIZE_MIN_OUTPUT_SIZE // 2) // _RESIZE_MIN_OUTPUT_SIZE


def _resize_bilinear(image, height, width):
  """TF 1.x bilinear resize of a [h, w, c] image to [height, width, c] float32."""
  resized = tf.image.resize_bilinear(tf.expand_dims(image, 0), tf.stack([height, width]),
                                     align_corners=False, half_pixel_centers=False)
  return tf.squeeze(resized, [0])


def _smallest_size_at_least(height, width, resize_min):
  """New (height, width), aspect ratio kept, with the shorter side equal to resize_min.

  The scaled sides are computed in float32 and truncated to int32, as the official code did.

  Args:
    height, width: int32 scalar tensors, the current size.
    resize_min: python int or int32 scalar tensor.

  Returns:
    (new_height, new_width) int32 scalar tensors.
  """
  height_f = tf.cast(height, tf.float32)
  width_f = tf.cast(width, tf.float32)
  scale = tf.cast(resize_min, tf.float32) / tf.minimum(height_f, width_f)
  return tf.cast(height_f * scale, tf.int32), tf.cast(width_f * scale, tf.int32)


def _aspect_preserving_resize(image, resize_min):
  """Resizes a [h, w, c] image so its shorter side is resize_min; returns float32."""
  shape = tf.shape(image)
  new_height, new_width = _smallest_size_at_least(shape[0], shape[1], resize_min)
  return _resize_bilinear(image, new_height, new_width)


def _central_crop(image, crop_height, crop_width):
  """The central [crop_height, crop_width, c] window of a [h, w, c] image.

  When the margin is odd, the extra row / column is left at the bottom / right.
  """
  shape = tf.shape(image)
  top = (shape[0] - crop_height) // 2
  left = (shape[1] - crop_width) // 2
  return tf.slice(image, [top, left, 0], [crop_height, crop_width, -1])


def _mean_image_subtraction(image, means):
  """Subtracts per-channel means from a float32 [h, w, len(means)] image."""
  return image - tf.constant(means, dtype=image.dtype, shape=[1, 1, len(means)])


def distorted_crop_window(image_buffer, bbox, seed=None):
  """Draws the training crop window for one encoded image.

  Args:
    image_buffer: scalar string tensor, the JPEG bytes.
    bbox: float32 [1, num_boxes, 4] tensor of (ymin, xmin, ymax, xmax) in [0, 1]; with
      num_boxes == 0 the whole image is the object.
    seed: int64 [2] seed of a reproducible (stateless) draw, or None for a random one.

  Returns:
    int32 [4] tensor (offset_y, offset_x, height, width) in pixels of the encoded image.
  """
  shape = tf.image.extract_jpeg_shape(image_buffer)
  options = dict(bounding_boxes=bbox, min_object_covered=_MIN_OBJECT_COVERED,
                 aspect_ratio_range=list(_ASPECT_RATIO_RANGE), area_range=list(_AREA_RANGE),
                 max_attempts=_MAX_ATTEMPTS, use_image_if_no_bounding_boxes=True)
  if seed is None:
    begin, size, _ = tf.image.sample_distorted_bounding_box(shape, **options)
  else:
    begin, size, _ = tf2.image.stateless_sample_distorted_bounding_box(shape, seed=seed,
                                                                       **options)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def preprocess_image(image_buffer, bbox, output_height, output_width, num_channels,
                     is_training=False, augment_seed=None):
  """Decodes and preprocesses one ImageNet image.

  Evaluation resizes the shorter side to ``eval_resize_min(output_height, output_width)``:
  RESIZE_MIN (256) for the usual 224x224, and the same 256/224 ratio for other sizes (e.g. 37
  for 32x32), so that tests on small images crop like the real pipeline.

  Args:
    image_buffer: scalar string tensor, the JPEG bytes (``image/encoded``).
    bbox: float32 [1, num_boxes, 4] tensor of (ymin, xmin, ymax, xmax) in [0, 1]; used only in
      training, and num_boxes may be 0 (then the whole image).
    output_height, output_width: python ints, the output size.
    num_channels: python int, must be 3 (RGB means).
    is_training: training augmentation instead of the evaluation crop.
    augment_seed: int64 [2] seed of a reproducible training augmentation, or None (random).

  Returns:
    float32 [output_height, output_width, num_channels] tensor: mean-subtracted pixels on the
    0..255 scale.
  """
  if num_channels != len(CHANNEL_MEANS):
    raise ValueError(f'num_channels={num_channels}, but ImageNet preprocessing subtracts '
                     f'{len(CHANNEL_MEANS)} RGB channel means; use num_channels=3.')
  if is_training:
    # Named so that tests can fetch the window a run used.
    window = tf.identity(distorted_crop_window(image_buffer, bbox, augment_seed),
                         name='crop_window')
    image = tf.image.decode_and_crop_jpeg(image_buffer, window, channels=num_channels)
    if augment_seed is None:
      image = tf.image.random_flip_left_right(image)
    else:
      image = tf2.image.stateless_random_flip_left_right(image, augment_seed + [0, 1])
    image = _resize_bilinear(image, output_height, output_width)
  else:
    image = tf.image.decode_jpeg(image_buffer, channels=num_channels)
    image = _aspect_preserving_resize(image, eval_resize_min(output_height, output_width))
    image = _central_crop(image, output_height, output_width)
  image.set_shape([output_height, output_width, num_channels])
  return _mean_image_subtraction(image, CHANNEL_MEANS)
