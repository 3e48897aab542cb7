"""The layers of the ResNets: batch norm, convs with fixed padding, the exit heads' grid pool, and
the residual blocks, created in the order (and under the names) of the 2018 official code.
"""

import tensorflow.compat.v1 as tf

BATCH_NORM_DECAY = 0.997   # The official value; short runs (the CPU demo) need a smaller one.
_BATCH_NORM_EPSILON = 1e-5


################################################################################
# Layers shared by the backbone and the heads.
################################################################################
def batch_norm(inputs, training, data_format, decay=BATCH_NORM_DECAY, name=None):
  """BN with the official ResNet constants; ``data_format`` only picks the channel axis."""
  rank = inputs.shape.ndims
  axis = 1 if (data_format == 'channels_first' or rank == 2) else 3
  return tf.layers.batch_normalization(
      inputs=inputs, axis=axis, momentum=decay, epsilon=_BATCH_NORM_EPSILON, center=True,
      scale=True, training=training, fused=(rank == 4), name=name)


def fixed_padding(inputs, kernel_size, data_format):
  """Pads the spatial dimensions so that a strided conv does not depend on the input size.

  Args:
    inputs: [batch, channels, height, width] or [batch, height, width, channels].
    kernel_size: the conv's kernel size.
    data_format: 'channels_first' or 'channels_last'.

  Returns:
    The padded tensor, with (kernel_size - 1) rows/columns added in total.
  """
  pad_total = kernel_size - 1
  pad_beg = pad_total // 2
  pad_end = pad_total - pad_beg
  spatial = [[pad_beg, pad_end], [pad_beg, pad_end]]
  if data_format == 'channels_first':
    return tf.pad(inputs, [[0, 0], [0, 0]] + spatial)
  return tf.pad(inputs, [[0, 0]] + spatial + [[0, 0]])


def conv2d_fixed_padding(inputs, filters, kernel_size, strides, data_format, name=None):
  """Bias-free conv; explicit padding when strided, so the output size is input / stride."""
  if strides > 1:
    inputs = fixed_padding(inputs, kernel_size, data_format)
  return tf.layers.conv2d(
      inputs=inputs, filters=filters, kernel_size=kernel_size, strides=strides,
      padding=('SAME' if strides == 1 else 'VALID'), use_bias=False,
      kernel_initializer=tf.variance_scaling_initializer(), data_format=data_format, name=name)


def layer_name(kind, index):
  """TensorFlow's automatic name of the ``index``-th layer of a kind: 'conv2d', 'conv2d_1', ..."""
  return kind if index == 0 else f'{kind}_{index}'


class BackboneLayers:
  """Creates the backbone's convs and BNs under the names of the official checkpoints.

  The official code let TensorFlow number its layers in creation order (``conv2d``,
  ``conv2d_1``, ..., ``batch_normalization_48``). A stage built on its own (the cascade builds
  each stage in a branch of its own; a TFLite stage model holds one stage) would restart that
  count, so the names are given explicitly, counting on from the layers the earlier stages make.
  """

  def __init__(self, data_format, batch_norm_decay, first_conv, first_batch_norm):
    self.data_format = data_format
    self.batch_norm_decay = batch_norm_decay
    self._next = {'conv2d': first_conv, 'batch_normalization': first_batch_norm}

  def _name(self, kind):
    index = self._next[kind]
    self._next[kind] += 1
    return layer_name(kind, index)

  def conv(self, inputs, filters, kernel_size, strides):
    return conv2d_fixed_padding(inputs, filters, kernel_size, strides, self.data_format,
                                name=self._name('conv2d'))

  def batch_norm(self, inputs, training):
    return batch_norm(inputs, training, self.data_format, self.batch_norm_decay,
                      name=self._name('batch_normalization'))


def check_grid_divides(what, height, width, grid):
  """Raises ValueError unless a height x width map splits into a grid of equal cells."""
  rows, cols = grid
  if height is None or width is None or height % rows or width % cols:
    raise ValueError(
        f'{what} cannot average-pool a {height}x{width} feature map to a {rows}x{cols} grid; '
        'use an input size whose feature maps divide evenly '
        '(for ImageNet ResNets any multiple of 32, e.g. 224)')


def grid_average_pool(inputs, grid, data_format, what='the head'):
  """Averages a feature map over a rows x cols grid of equal cells and flattens the result.

  Equivalent to a VALID average pool whose window equals its stride, written as a reshape and a
  mean so that it also runs channels_first on CPUs (TensorFlow's CPU pooling kernels are
  channels_last only). The result is flattened in channels_first order whatever the data format,
  so one set of head weights serves both formats.

  Args:
    inputs: [batch, C, H, W] (channels_first) or [batch, H, W, C] (channels_last).
    grid: (rows, cols); H must divide by rows and W by cols.
    data_format: 'channels_first' or 'channels_last'.
    what: name used in the error message.

  Returns:
    [batch, C * rows * cols], feature index = c * rows * cols + row * cols + col.
  """
  rows, cols = grid
  shape = inputs.shape.as_list()
  if data_format == 'channels_first':
    channels, height, width = shape[1:]
  else:
    height, width, channels = shape[1:]
  check_grid_divides(what, height, width, grid)
  cell_h, cell_w = height // rows, width // cols
  # Two single-axis means, not one over both cell axes: TensorFlow's CPU reduction over two
  # non-adjacent axes is 8-15x slower, which made the heads cost ~2% of a ResNet-50 pass.
  if data_format == 'channels_first':
    cells = tf.reshape(inputs, [-1, channels, rows, cell_h, cols, cell_w])
    pooled = tf.reduce_mean(tf.reduce_mean(cells, axis=5), axis=3)    # [batch, C, rows, cols]
  else:
    cells = tf.reshape(inputs, [-1, rows, cell_h, cols, cell_w, channels])
    pooled = tf.reduce_mean(tf.reduce_mean(cells, axis=4), axis=2)    # [batch, rows, cols, C]
    pooled = tf.transpose(pooled, [0, 3, 1, 2])
  return tf.reshape(pooled, [-1, channels * rows * cols])


################################################################################
# Residual blocks. Layer creation order inside each block is what fixes the official names.
################################################################################
def building_block_v1(inputs, filters, training, projection_shortcut, strides, layers):
  shortcut = inputs
  if projection_shortcut is not None:
    shortcut = layers.batch_norm(projection_shortcut(inputs), training)
  inputs = layers.conv(inputs, filters, 3, strides)
  inputs = tf.nn.relu(layers.batch_norm(inputs, training))
  inputs = layers.conv(inputs, filters, 3, 1)
  inputs = layers.batch_norm(inputs, training)
  return tf.nn.relu(inputs + shortcut)


def building_block_v2(inputs, filters, training, projection_shortcut, strides, layers):
  shortcut = inputs
  inputs = tf.nn.relu(layers.batch_norm(inputs, training))
  # The projection sees the activated input: in v2 the shortcut branch is pre-activated too.
  if projection_shortcut is not None:
    shortcut = projection_shortcut(inputs)
  inputs = layers.conv(inputs, filters, 3, strides)
  inputs = tf.nn.relu(layers.batch_norm(inputs, training))
  inputs = layers.conv(inputs, filters, 3, 1)
  return inputs + shortcut


def bottleneck_block_v1(inputs, filters, training, projection_shortcut, strides, layers):
  shortcut = inputs
  if projection_shortcut is not None:
    shortcut = layers.batch_norm(projection_shortcut(inputs), training)
  inputs = layers.conv(inputs, filters, 1, 1)
  inputs = tf.nn.relu(layers.batch_norm(inputs, training))
  # v1.5: the stride sits on the 3x3 conv, not on the first 1x1.
  inputs = layers.conv(inputs, filters, 3, strides)
  inputs = tf.nn.relu(layers.batch_norm(inputs, training))
  inputs = layers.conv(inputs, 4 * filters, 1, 1)
  inputs = layers.batch_norm(inputs, training)
  return tf.nn.relu(inputs + shortcut)


def bottleneck_block_v2(inputs, filters, training, projection_shortcut, strides, layers):
  shortcut = inputs
  inputs = tf.nn.relu(layers.batch_norm(inputs, training))
  if projection_shortcut is not None:
    shortcut = projection_shortcut(inputs)
  inputs = layers.conv(inputs, filters, 1, 1)
  inputs = tf.nn.relu(layers.batch_norm(inputs, training))
  inputs = layers.conv(inputs, filters, 3, strides)
  inputs = tf.nn.relu(layers.batch_norm(inputs, training))
  inputs = layers.conv(inputs, 4 * filters, 1, 1)
  return inputs + shortcut


# (bottleneck, resnet version) -> block function.
BLOCK_FUNCTIONS = {(False, 1): building_block_v1, (False, 2): building_block_v2,
                   (True, 1): bottleneck_block_v1, (True, 2): bottleneck_block_v2}


def block_layer(inputs, filters, bottleneck, block_fn, blocks, strides, training, name, layers):
  """One group of residual blocks; the first one changes resolution/width via a projection.

  Args:
    inputs: [batch, channels, height, width] or [batch, height, width, channels].
    filters: filters of the blocks' inner convs (the output has 4x that for bottlenecks).
    bottleneck: whether ``block_fn`` is a bottleneck block.
    block_fn: one of the ``*_block_v*`` functions.
    blocks: number of blocks in the group.
    strides: stride of the group's first block.
    training: whether BN runs in training mode.
    name: graph name of the group's output.
    layers: the BackboneLayers that create (and name) the convs and BNs.

  Returns:
    The group's output, spatially ``strides`` times smaller than ``inputs``.
  """
  filters_out = filters * 4 if bottleneck else filters

  def projection_shortcut(x):
    return layers.conv(x, filters_out, 1, strides)

  inputs = block_fn(inputs, filters, training, projection_shortcut, strides, layers)
  for _ in range(1, blocks):
    inputs = block_fn(inputs, filters, training, None, 1, layers)
  return tf.identity(inputs, name)
