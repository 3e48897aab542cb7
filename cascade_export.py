"""Real early exit: a SavedModel that stops computing for the images an early exit is sure of.

The serving graph runs the stem and the block groups up to exit 0 on every image, keeps the
images whose exit-0 confidence reaches exit 0's threshold, sends only the others through the next
group and exit 1, only the rest of those through the last group and the final classifier, and
scatters every image's result back to its place in the batch. Thresholds and the confidence rule
are those of ``analyze_imagenet_labels.py`` (``thresholds.json``, ``>=``, last exit takes all),
so the exported model takes the exits the offline simulation predicts.

Signatures of the SavedModel (tags ``serve``):

* ``serving_default``: the cascade.
* ``full``: the plain network (final classifier on every image, no exit heads), for measuring the
  speedup on the same machine.

Both take ``images`` (float32 [batch, height, width, channels], preprocessed as for evaluation),
or ``image_bytes`` (string [batch], JPEG) when exported with ``--image_bytes_as_serving_input``,
and return per image: ``probabilities`` [batch, num_classes] float32, ``classes`` [batch] int64,
``top5_classes`` [batch, min(5, num_classes)] int32, ``exit`` [batch] int32 (the exit taken) and
``macs`` [batch] int64 (multiply-accumulates spent on the image).

Both signatures classify a batch in consecutive chunks of ``chunk_size`` images, or the whole
batch at once (0). Which is faster depends on TensorFlow's CPU kernels (``default_chunk_size``):
without oneDNN the early, large feature maps of a big batch overflow the caches and chunks of 8
make the plain ResNet-50 22% faster at batch 32 (35% at batch 256); oneDNN's kernels are faster
on whole batches (7-12% at batch 256), and so are GPUs.

A ``cascade_info.json`` beside ``saved_model.pb`` records the data set, input kind, image shape,
mode, epsilon, thresholds and MAC counts for ``cascade_predict.py``.
"""

import contextlib
import json
import os
import time

import numpy as np
import tensorflow.compat.v1 as tf

import cascade_thresholds
import warm_start

CASCADE_INFO = 'cascade_info.json'
TOP_K = cascade_thresholds.TOP_K
# Images per chunk where chunks pay (TensorFlow's own CPU kernels, see default_chunk_size).
CPU_CHUNK_SIZE = 8
# dtype of each per-image output; _per_image_outputs builds them, in_chunks collects them.
OUTPUT_DTYPES = {'probabilities': tf.float32, 'classes': tf.int64, 'top5_classes': tf.int32,
                 'exit': tf.int32, 'macs': tf.int64}


def onednn_enabled():
  """Whether this process runs TensorFlow's oneDNN CPU kernels (TF_ENABLE_ONEDNN_OPTS or default).

  TensorFlow 2.15 turns them on by default on CPUs with AVX512_VNNI, AVX512_BF16 or AMX.
  """
  from tensorflow.python.util import _pywrap_util_port
  return bool(_pywrap_util_port.IsMklEnabled())


def default_chunk_size():
  """The chunk size the cascade is exported with when none is asked for: 0 or CPU_CHUNK_SIZE.

  Measured with benchmarks/cascade_speedup.py (ResNet-50 v2, 224x224, AMD EPYC with AVX-512; the
  README's table): with oneDNN on, whole batches are faster than chunks of 8 (plain network
  10.3-10.8 s vs 11.1-11.7 s at batch 256) and the cascade keeps more of its MAC-predicted speedup;
  with TensorFlow's own kernels chunks of 8 are faster (1.6-1.9 s vs 1.9-2.2 s at batch 32,
  12.4-14.5 s vs 19.8-22.6 s at batch 256). The choice follows the exporting
  process, which is why cascade_info.json records it: export on the kind of machine that serves.
  GPUs get whole batches too.
  """
  if onednn_enabled() or tf.config.list_physical_devices('GPU'):
    return 0
  return CPU_CHUNK_SIZE


def confidence(probabilities, mode):
  """Per-row confidence of a [batch, num_classes] float32 probability tensor.

  top1: the largest probability. top5: the sum of the 5 largest, added smallest first
  (((p5 + p4) + p3) + p2) + p1 in float32, the order ``exit_statistics.confidence`` uses,
  so both give bit-identical numbers for the same probabilities.
  """
  if mode == 'top1':
    return tf.reduce_max(probabilities, axis=1)
  if mode != 'top5':
    raise ValueError("mode must be 'top1' or 'top5', got {!r}".format(mode))
  k = min(TOP_K, probabilities.shape.as_list()[1])
  largest = tf.math.top_k(probabilities, k=k, sorted=True).values   # descending
  total = largest[:, k - 1]
  for i in range(k - 2, -1, -1):
    total = total + largest[:, i]
  return total


def _per_image_outputs(probabilities, exit_taken, cumulative_macs):
  num_classes = probabilities.shape.as_list()[1]
  return {
      'probabilities': probabilities,
      'classes': tf.argmax(probabilities, axis=1, output_type=OUTPUT_DTYPES['classes']),
      'top5_classes': tf.math.top_k(probabilities, k=min(TOP_K, num_classes)).indices,
      'exit': exit_taken,
      'macs': tf.gather(tf.constant(cumulative_macs, OUTPUT_DTYPES['macs']), exit_taken),
  }


def run_if_any(count, build, empty):
  """``build()`` when ``count`` > 0, else ``empty()``, in the graph (a ``tf.cond``).

  No kernel of the cascade ever sees an empty batch: oneDNN's fused conv and batch-norm kernels
  (TensorFlow's default on Intel Xeons with AVX512_VNNI or AMX) fail on zero images, and a stage
  no image needs costs nothing.
  """
  return tf.cond(count > 0, build, empty)


def build_cascade(model, images, thresholds, mode):
  """Builds the early-exit graph, one stage at a time.

  Stage k runs only on the images still in the network, and only if there is at least one; the
  model's variables must exist already (``build_signatures`` creates them), since the stages are
  built inside ``tf.cond`` branches.

  Args:
    model: a resnet_model.Model.
    images: [batch, height, width, channels] float tensor.
    thresholds: one threshold per early exit (floats, or a float32 [num_exits - 1] tensor); an
      image leaves exit k if its confidence >= thresholds[k].
    mode: 'top1' or 'top5' confidence.

  Returns:
    dict of per-image outputs (see the module docstring).
  """
  if isinstance(thresholds, (list, tuple)) and len(thresholds) != model.num_exits - 1:
    raise ValueError('{} thresholds for a model with {} early exits'.format(
        len(thresholds), model.num_exits - 1))
  height, width = images.shape.as_list()[1:3]
  cumulative_macs = np.cumsum(model.stage_macs(height, width)).tolist()
  batch = tf.shape(images)[0]
  rows = tf.range(batch)      # Batch positions of the images still in the network.
  features = images           # Their input to the next stage.
  left = []                   # (rows, probabilities, exit id) per exit

  for stage in range(model.num_exits):
    final = stage == model.final_exit

    def run(stage=stage, features=features):
      next_features, logits = model.stage(stage, features, training=False)
      probabilities = tf.nn.softmax(tf.cast(logits, tf.float32))
      return probabilities if next_features is None else (next_features, probabilities)

    def skip(stage=stage, dtype=features.dtype):
      probabilities = tf.zeros([0, model.num_classes])
      if stage == model.final_exit:
        return probabilities
      return tf.zeros([0] + model.stage_feature_shape(stage, height, width), dtype), probabilities

    outputs = run_if_any(tf.shape(rows)[0], run, skip)
    if final:
      left.append((rows, outputs, stage))
      break
    next_features, probabilities = outputs
    leaves = confidence(probabilities, mode) >= thresholds[stage]
    left.append((tf.boolean_mask(rows, leaves), tf.boolean_mask(probabilities, leaves), stage))
    stays = tf.logical_not(leaves)
    everyone_stays = tf.reduce_all(stays)

    def keep(tensor, stays=stays, everyone_stays=everyone_stays):
      # Copying the whole feature map to keep every row would be wasted work.
      return tf.cond(everyone_stays, lambda: tensor, lambda: tf.boolean_mask(tensor, stays))
    rows = keep(rows)
    # Only the images that did not leave go on through the next stage.
    features = keep(next_features)

  positions = tf.expand_dims(tf.concat([r for r, _, _ in left], axis=0), 1)
  probabilities = tf.scatter_nd(positions, tf.concat([p for _, p, _ in left], axis=0),
                                tf.stack([batch, model.num_classes]))
  exits = tf.concat([tf.fill(tf.shape(r), k) for r, _, k in left], axis=0)
  exit_taken = tf.scatter_nd(positions, tf.cast(exits, tf.int32), tf.expand_dims(batch, 0))
  return _per_image_outputs(probabilities, exit_taken, cumulative_macs)


def in_chunks(build, images, chunk_size):
  """Applies ``build`` to consecutive chunks of the batch, one after the other.

  Args:
    build: [n, height, width, channels] images -> dict of per-image outputs (OUTPUT_DTYPES keys,
      first dimension n); it must only reuse variables, as it is called inside a loop, and must
      answer an empty chunk (an empty batch makes one).
    images: [batch, height, width, channels] float tensor.
    chunk_size: images per chunk (the last one may be smaller); 0 or None: the whole batch.

  Returns:
    the outputs of ``build`` for the whole batch, in input order.
  """
  if not chunk_size:
    return build(images)
  batch = tf.shape(images)[0]
  # An empty batch still makes one (empty) chunk: a TensorArray of no elements cannot concat.
  num_chunks = tf.maximum((batch + chunk_size - 1) // chunk_size, 1)
  arrays = {key: tf.TensorArray(dtype, size=num_chunks, infer_shape=False)
            for key, dtype in OUTPUT_DTYPES.items()}
  static_shapes = {}

  def body(i, arrays):
    outputs = build(images[i * chunk_size:(i + 1) * chunk_size])
    static_shapes.update({key: value.shape for key, value in outputs.items()})
    return i + 1, {key: arrays[key].write(i, outputs[key]) for key in arrays}

  # parallel_iterations=1: chunks run one at a time, which is the point of chunking.
  _, arrays = tf.while_loop(lambda i, _: i < num_chunks, body, [0, arrays],
                            parallel_iterations=1)
  results = {}
  for key, array in arrays.items():
    results[key] = array.concat()
    results[key].set_shape(static_shapes[key])
  return results


def build_full(model, images):
  """The plain network on every image, with outputs shaped like the cascade's."""
  height, width = images.shape.as_list()[1:3]

  def run():
    logits = model(images, training=False, exits=[model.final_exit])[model.final_exit]
    return tf.nn.softmax(tf.cast(logits, tf.float32))
  probabilities = run_if_any(tf.shape(images)[0], run,
                             lambda: tf.zeros([0, model.num_classes]))
  exit_taken = tf.fill(tf.shape(probabilities)[:1], model.final_exit)
  plain = model.plain_macs(height, width)
  macs = [plain] * model.num_exits   # Every image pays the plain network's cost.
  return _per_image_outputs(probabilities, exit_taken, macs)


def build_signatures(model, images, thresholds, mode, chunk_size):
  """The cascade and the plain network on ``images``, both in chunks of ``chunk_size``.

  Args:
    model: resnet_model.Model; the plain network is its final exit without the exit heads.
    images, thresholds, mode: as for build_cascade.
    chunk_size: see in_chunks.

  Returns:
    (cascade outputs, plain network outputs), dicts of per-image tensors.
  """
  # The stages run inside tf.cond branches (and loop bodies), which may only reuse variables:
  # they are created once here, by a whole-model call whose ops never run.
  images = tf.cast(images, model.dtype)
  model(images[:1], training=False)
  with tf.variable_scope(tf.get_variable_scope(), reuse=True):
    cascade = in_chunks(lambda part: build_cascade(model, part, thresholds, mode), images,
                        chunk_size)
    full = in_chunks(lambda part: build_full(model, part), images, chunk_size)
  return cascade, full


def export_cascade(checkpoint, model_factory, image_shape, thresholds_file, epsilon, mode,
                   export_dir_base, dataset, data_format='channels_last',
                   image_bytes_fn=None, chunk_size=None, dtype=tf.float32,
                   moving_averages=False, accuracy_drop=None):
  """Writes the cascade SavedModel into a new timestamped folder under ``export_dir_base``.

  Args:
    checkpoint: checkpoint prefix holding every exit's variables.
    model_factory: (data_format, dtype) -> resnet_model.Model.
    image_shape: (height, width, channels) the model sees.
    thresholds_file: ``thresholds.json`` written by analyze_imagenet_labels.py.
    epsilon: the article's accuracy budget whose thresholds to use (must be in the file), or
      None with ``accuracy_drop``.
    mode: 'top1' or 'top5'.
    export_dir_base: parent folder of the export.
    dataset: data set name, recorded for cascade_predict.py.
    data_format: layout of the activations in the exported graph.
    image_bytes_fn: JPEG bytes -> preprocessed image; when given, the model takes JPEG bytes.
    chunk_size: images the SavedModel classifies at a time (see the module docstring); 0: the
      whole batch; None: default_chunk_size().
    dtype: compute precision of the exported graph (tf.float32, or tf.bfloat16 / tf.float16
      with the same fp32 variables); its inputs and outputs are float32 whatever it is.
    moving_averages: compute with the checkpoint's moving averages of the variables (a run
      with --moving_average_decay).
    accuracy_drop: instead of ``epsilon``, the guaranteed drop whose risk-controlled
      thresholds to use (must be in the file).

  Returns:
    The folder of the SavedModel.
  """
  if chunk_size is None:
    chunk_size = default_chunk_size()
  model = model_factory(data_format, dtype)
  report = cascade_thresholds.read(thresholds_file, model.num_classes, model.num_exits)
  choice = {'epsilon': epsilon, 'accuracy_drop': accuracy_drop}
  thresholds = report.thresholds_for(mode, **choice)
  if not tf.train.checkpoint_exists(checkpoint or ''):
    raise FileNotFoundError('no checkpoint {!r} to export; train the exit heads first '
                            '(--fine_tune --classifier_id all)'.format(checkpoint))
  height, width, channels = image_shape
  export_dir = os.path.join(export_dir_base, str(int(time.time())))
  graph = tf.Graph()
  with graph.as_default():
    if image_bytes_fn is not None:
      inputs = tf.placeholder(tf.string, [None], name='image_bytes')
      images = tf.map_fn(image_bytes_fn, inputs, fn_output_signature=tf.float32)
      images.set_shape([None, height, width, channels])
      input_key = 'image_bytes'
    else:
      inputs = tf.placeholder(tf.float32, [None, height, width, channels], name='images')
      images = inputs
      input_key = 'images'
    averaged = (warm_start.moving_average_scope(checkpoint) if moving_averages
                else contextlib.nullcontext())
    with averaged:
      cascade, full = build_signatures(model, images, thresholds, mode, chunk_size)
    signatures = {
        name: tf.saved_model.signature_def_utils.predict_signature_def(
            inputs={input_key: inputs}, outputs=outputs)
        for name, outputs in (('serving_default', cascade), ('full', full))}
    with tf.Session() as sess:
      tf.train.Saver().restore(sess, checkpoint)
      builder = tf.saved_model.Builder(export_dir)
      builder.add_meta_graph_and_variables(sess, [tf.saved_model.tag_constants.SERVING],
                                           signature_def_map=signatures)
      builder.save()
  info = {
      'dataset': dataset,
      'input': input_key,
      'image_shape': list(image_shape),
      'mode': mode,
      'epsilon': None if epsilon is None else float(epsilon),
      'accuracy_drop': None if accuracy_drop is None else float(accuracy_drop),
      'thresholds': thresholds,
      'chunk_size': chunk_size or 0,
      'onednn_at_export': onednn_enabled(),
      'dtype': model.dtype.name,
      'moving_averages': bool(moving_averages),
      'num_classes': model.num_classes,
      'num_exits': model.num_exits,
      'stage_macs': model.stage_macs(height, width),
      'plain_macs': model.plain_macs(height, width),
      'offline_estimate': report.offline_estimate(mode, **choice),
      'checkpoint': checkpoint,
  }
  with open(os.path.join(export_dir, CASCADE_INFO), 'w') as f:
    json.dump(info, f, indent=2)
  tf.logging.info('exported the cascade (%s, %s, thresholds %s) to %s', mode,
                  f'accuracy drop {accuracy_drop}' if accuracy_drop is not None
                  else f'epsilon {epsilon}', thresholds, export_dir)
  return export_dir
