"""Tests of imagenet_preprocessing on real photos, against independent numpy computations."""

import fractions
import io

import imagenet_fixtures
import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from PIL import Image

import imagenet_preprocessing as ip


def _jpeg(name, quality=90):
  out = io.BytesIO()
  Image.fromarray(imagenet_fixtures.real_photos()[name]).save(out, format='JPEG', quality=quality)
  return out.getvalue()


def _run(fetches_fn):
  """Builds fetches in a fresh graph and evaluates them once."""
  with tf.Graph().as_default(), tf.Session() as sess:
    return sess.run(fetches_fn())


def _decode(buffer):
  # The pixels every path starts from; the JPEG decoder itself is not under test.
  return _run(lambda: tf.io.decode_jpeg(buffer, channels=3))


def _np_bilinear(image, out_h, out_w, half_pixel_centers=False):
  """Bilinear resize of a [h, w, c] array, written out from the sampling rule.

  TF 1.x (half_pixel_centers=False) samples output pixel i at input coordinate i * in / out;
  the TF 2 rule samples at (i + 0.5) * in / out - 0.5.
  """
  image = image.astype(np.float64)

  def axis(out_size, in_size):
    scale = in_size / out_size
    pos = np.arange(out_size) * scale
    if half_pixel_centers:
      pos = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    low = np.floor(pos).astype(int)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, pos - low

  y0, y1, fy = axis(out_h, image.shape[0])
  x0, x1, fx = axis(out_w, image.shape[1])
  fx = fx[None, :, None]
  top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
  bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
  return top * (1 - fy[:, None, None]) + bottom * fy[:, None, None]


def _np_eval(pixels, out_h, out_w, half_pixel_centers=False):
  """The evaluation recipe in numpy: short side to 256 * out / 224, central crop, means."""
  height, width = pixels.shape[:2]
  resize_min = round(fractions.Fraction(256 * max(out_h, out_w), 224))
  # The official code scales in float32 and truncates.
  scale = np.float32(resize_min) / np.float32(min(height, width))
  new_h, new_w = int(np.float32(height) * scale), int(np.float32(width) * scale)
  top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
  resized = _np_bilinear(pixels, new_h, new_w, half_pixel_centers)
  crop = resized[top:top + out_h, left:left + out_w]
  return crop - np.array([123.68, 116.78, 103.94])


def test_constants():
  assert ip.CHANNEL_MEANS == [123.68, 116.78, 103.94]
  assert ip.RESIZE_MIN == 256


@pytest.mark.parametrize('out_h, out_w, expected', [(224, 224, 256), (32, 32, 37), (24, 40, 46),
                                                    (299, 299, 342)])
def test_eval_resize_min_keeps_the_256_to_224_ratio(out_h, out_w, expected):
  assert ip.eval_resize_min(out_h, out_w) == expected
  assert expected == round(fractions.Fraction(256, 224) * max(out_h, out_w))


@pytest.mark.parametrize('photo, out_h, out_w', [('chelsea', 224, 224), ('grace_hopper', 32, 32),
                                                 ('coffee', 24, 40)])
def test_eval_matches_numpy_recipe(photo, out_h, out_w):
  buffer = _jpeg(photo)
  pixels = _decode(buffer)
  empty_bbox = np.zeros([1, 0, 4], np.float32)
  result = _run(lambda: ip.preprocess_image(tf.constant(buffer), tf.constant(empty_bbox), out_h,
                                            out_w, 3, is_training=False))
  assert result.shape == (out_h, out_w, 3) and result.dtype == np.float32
  np.testing.assert_allclose(result, _np_eval(pixels, out_h, out_w), atol=1e-2)
  # (Sampling positions in float32 vs float64 explain the tolerance.) The comparison can tell
  # the TF 1.x resize from the TF 2 one on real photos.
  assert np.abs(result - _np_eval(pixels, out_h, out_w, half_pixel_centers=True)).max() > 1.0


def _box_fraction(window, box, height, width):
  """Share of a normalised (ymin, xmin, ymax, xmax) box covered by a pixel window."""
  y, x, h, w = window
  ymin, xmin, ymax, xmax = box[0] * height, box[1] * width, box[2] * height, box[3] * width
  overlap = max(0.0, min(y + h, ymax) - max(y, ymin)) * max(0.0, min(x + w, xmax) - max(x, xmin))
  return overlap / ((ymax - ymin) * (xmax - xmin))


@pytest.mark.parametrize('box', [None, (0.5, 0.55, 1.0, 1.0)])
def test_training_crop_windows_follow_the_sampling_rules(box):
  buffer = _jpeg('chelsea')
  height, width = 300, 451
  bbox = np.zeros([1, 0, 4], np.float32) if box is None else np.array([[box]], np.float32)

  with tf.Graph().as_default(), tf.Session() as sess:
    tf.set_random_seed(2)
    window = ip.distorted_crop_window(tf.constant(buffer), tf.constant(bbox))
    drawn = np.array([sess.run(window) for _ in range(300)])
  whole = np.array([0, 0, height, width])
  sampled = drawn[~np.all(drawn == whole, axis=1)]  # the rest fell back to the whole image
  assert len(sampled) > 250
  y, x, h, w = sampled.T
  assert np.all((y >= 0) & (x >= 0) & (y + h <= height) & (x + w <= width))
  area = h * w / (height * width)
  assert area.min() >= 0.05 - 0.01 and area.max() <= 1.0
  # Integer pixel sizes bend the aspect ratio a little on small windows.
  aspect = w / h
  assert aspect.min() >= 0.75 * (1 - 2 / h.min()) and aspect.max() <= 4 / 3 * (1 + 2 / h.min())
  assert len({tuple(d) for d in sampled}) > 100
  if box is not None:
    covered = [_box_fraction(d, box, height, width) for d in sampled]
    assert min(covered) >= 0.1 - 0.02
  else:
    assert area.max() - area.min() > 0.5


def test_training_output_is_the_flipped_or_plain_crop_of_the_window():
  buffer = _jpeg('coffee')
  means = np.array(ip.CHANNEL_MEANS)
  flips = set()
  with tf.Graph().as_default() as graph, tf.Session() as sess:
    tf.set_random_seed(1)  # a fixed draw sequence: the test cannot flake
    output = ip.preprocess_image(tf.constant(buffer), tf.zeros([1, 0, 4]), 40, 48, 3,
                                 is_training=True)
    window = graph.get_tensor_by_name('crop_window:0')
    # Reference crop pixels from the same cropping decoder (at the crop's edge its chroma
    # upsampling differs by a few levels from decoding the whole image and slicing).
    given_window = tf.placeholder(tf.int32, [4])
    decoded_crop = tf.image.decode_and_crop_jpeg(buffer, given_window, channels=3)
    for _ in range(12):
      result, drawn = sess.run([output, window])
      assert result.shape == (40, 48, 3) and result.dtype == np.float32
      crop = sess.run(decoded_crop, {given_window: drawn})
      assert crop.shape[:2] == tuple(drawn[2:])
      plain = _np_bilinear(crop, 40, 48) - means
      flipped = _np_bilinear(crop[:, ::-1], 40, 48) - means
      errors = (np.abs(result - plain).max(), np.abs(result - flipped).max())
      assert min(errors) < 1e-2, errors
      flips.add(int(np.argmin(errors)))
  assert flips == {0, 1}


def test_works_inside_tf_data_map_with_boxes_and_without():
  buffers = [_jpeg(name) for name in ('chelsea', 'rocket', 'grace_hopper')]
  boxes = [np.zeros([1, 0, 4], np.float32), np.array([[[0.1, 0.2, 0.6, 0.9]]], np.float32),
           np.zeros([1, 0, 4], np.float32)]

  def pipeline(is_training):
    def gen():
      yield from zip(buffers, boxes, strict=True)

    dataset = tf.data.Dataset.from_generator(
        gen, (tf.string, tf.float32), (tf.TensorShape([]), tf.TensorShape([1, None, 4])))
    dataset = dataset.map(
        lambda b, box: ip.preprocess_image(b, box, 16, 16, 3, is_training=is_training)).batch(3)
    return tf.data.make_one_shot_iterator(dataset).get_next()

  for is_training in (False, True):
    batch = _run(lambda is_training=is_training: pipeline(is_training))
    assert batch.shape == (3, 16, 16, 3) and np.all(np.isfinite(batch))
    # Mean-subtracted 0..255 pixels.
    assert batch.min() >= -124 and batch.max() <= 256 - 103


def test_rejects_non_rgb_channel_count():
  with tf.Graph().as_default(), pytest.raises(ValueError, match='num_channels=3'):
    ip.preprocess_image(tf.constant(_jpeg('chelsea')), tf.zeros([1, 0, 4]), 8, 8, 1)
