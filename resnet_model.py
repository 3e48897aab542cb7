"""ResNet v1/v2 with early-exit classifier heads, in TF 1.x graph-mode layers, stage by stage.

The backbone is the 2018 TF official ResNet: the same layers in the same creation order, under the
names TensorFlow's automatic numbering gave them (``resnet_model/conv2d_17/kernel``, ...), so the
official ImageNet checkpoints and warm starts map one to one, also for a stage built alone
(``resnet_layers.BackboneLayers`` gives the names explicitly). On top of it the model attaches
exit heads after chosen block groups (ImageNet: after groups 2 and 3; CIFAR: after stages 1 and
2). Exit k is called ``clf<k>``; the network's own classifier is the last exit (``clf2`` with two
early exits).

Each exit head is::

    [BN + ReLU]  (v2 only: the group output is not yet activated in pre-activation ResNets)
    average pool to a fixed grid (2x2 after the first early exit, 1x2 after the second)
    flatten in channels_first order       -> [batch, channels * grid cells]
    dense 1024, BN, ReLU, dense num_classes

The head layers are explicitly named (``cascaded0_bn0``, ``cascaded0_fc0``, ``cascaded0_bn00``,
``cascaded0_fc00``; ``cascaded1_...`` for exit 1), as the head checkpoints of the original
cascaded code.

The module holds the model and its facts (block sizes per depth, where exits attach, stage
boundaries, MAC counts); its layers are ``resnet_layers``'. It reads no flags, builds no
Estimator and opens no file.
"""

import collections

import tensorflow.compat.v1 as tf

import resnet_layers

MODEL_SCOPE = 'resnet_model'
DEFAULT_VERSION = 2
DEFAULT_DTYPE = tf.float32
# Half-precision compute with fp32 variables (cast on read); BN parameters and statistics stay fp32.
CASTABLE_TYPES = (tf.float16, tf.bfloat16)
ALLOWED_TYPES = (DEFAULT_DTYPE,) + CASTABLE_TYPES


# Block groups per ImageNet depth. Sizes >= 50 use bottleneck blocks.
IMAGENET_BLOCK_SIZES = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
    200: [3, 24, 36, 3],
}

# Early exits of the ImageNet model attach after block groups 2 and 3 (0-based indices 1, 2).
IMAGENET_EXIT_GROUPS = (1, 2)
# Average-pool grid (rows, cols) of each early exit; ResNet-50 at 224x224 gives 2048 features.
EXIT_POOL_GRIDS = ((2, 2), (1, 2))
EXIT_HIDDEN_UNITS = 1024


def imagenet_block_sizes(resnet_size):
  """Returns the block counts per group of an ImageNet ResNet of depth ``resnet_size``."""
  try:
    return IMAGENET_BLOCK_SIZES[int(resnet_size)]
  except (KeyError, ValueError, TypeError):
    raise ValueError(f'resnet_size must be one of {sorted(IMAGENET_BLOCK_SIZES)}, '
                     f'got {resnet_size!r}') from None


################################################################################
# Variable sets: the run loop warm-starts and freezes by these.
################################################################################
def exit_head_prefix(exit_id):
  """Name prefix of early exit ``exit_id``'s variables, e.g. 'resnet_model/cascaded0_'."""
  return f'{MODEL_SCOPE}/cascaded{exit_id}_'


FINAL_DENSE_PREFIX = MODEL_SCOPE + '/dense/'


def variable_group(name, num_exits=3):
  """Which part of the network a variable belongs to.

  Args:
    name: a variable name such as 'resnet_model/conv2d_3/kernel:0'.
    num_exits: total number of exits, the final classifier included.

  Returns:
    'exit<k>' for the variables of early-exit head k, 'final_dense' for the final classifier
    (the head of the last exit), 'backbone' for everything else in the model scope (stem,
    block groups and the final pre-activation BN), or None outside the model scope.
  """
  if not name.startswith(MODEL_SCOPE + '/'):
    return None
  for exit_id in range(num_exits - 1):
    if name.startswith(exit_head_prefix(exit_id)):
      return f'exit{exit_id}'
  if name.startswith(FINAL_DENSE_PREFIX):
    return 'final_dense'
  return 'backbone'


def head_group(exit_id, num_exits=3):
  """Name of the variable group that holds exit ``exit_id``'s classifier."""
  return 'final_dense' if exit_id == num_exits - 1 else f'exit{exit_id}'


def variables_of(group, variables, num_exits=3):
  """The members of ``variables`` in ``group`` ('backbone', 'exit<k>' or 'final_dense')."""
  return [v for v in variables if variable_group(v.op.name, num_exits) == group]


################################################################################
# The model.
################################################################################
LayerCost = collections.namedtuple('LayerCost', ['stage', 'name', 'macs'])


class Model:
  """A ResNet with early exits, built stage by stage.

  Stage 0 is the stem and the block groups up to exit 0's attachment point, then exit 0's head;
  stage k > 0 the groups after exit k - 1's point up to exit k's, then exit k's head; the last
  stage the remaining groups and the network's own classifier. ``stage(k, features, ...)``
  builds one stage on the previous one's features (the cascade runs each stage only for the
  images that need it); ``model(images, training, exits=...)`` composes the stages up to the
  deepest exit asked for and builds no head that was not asked for: exit 0 alone builds the stem,
  groups 1-2 and exit 0's head, nothing else.
  """

  def __init__(self, resnet_size, bottleneck, num_classes, num_filters, kernel_size, conv_stride,
               first_pool_size, first_pool_stride, block_sizes, block_strides,
               resnet_version=DEFAULT_VERSION, data_format=None, dtype=DEFAULT_DTYPE,
               exit_groups=(), exit_pool_grids=EXIT_POOL_GRIDS,
               exit_hidden_units=EXIT_HIDDEN_UNITS,
               batch_norm_decay=resnet_layers.BATCH_NORM_DECAY):
    """Creates a model description; no graph is built before ``stage`` or ``__call__``.

    Args:
      resnet_size: depth, used for names and messages only.
      bottleneck: use bottleneck blocks (3 convs) instead of building blocks (2 convs).
      num_classes: logits per exit.
      num_filters: filters of the stem conv and of the first group.
      kernel_size: stem conv kernel size.
      conv_stride: stem conv stride.
      first_pool_size: stem max-pool size, or None for no pool (CIFAR).
      first_pool_stride: stem max-pool stride.
      block_sizes: blocks per group.
      block_strides: stride of each group.
      resnet_version: 1 (v1.5, post-activation) or 2 (pre-activation).
      data_format: 'channels_first', 'channels_last', or None to pick channels_first when a GPU
        build of TensorFlow is running.
      dtype: tf.float32, or tf.float16 / tf.bfloat16 with fp32 variables cast on read.
      exit_groups: 0-based indices of the block groups after which early exits attach, in
        increasing order. The network's own classifier is always the last exit.
      exit_pool_grids: (rows, cols) of the average-pool grid of each early exit.
      exit_hidden_units: width of the heads' hidden dense layer.
      batch_norm_decay: decay of the BN moving averages (0.997 officially; at that value the
        averages need a few thousand steps to forget their initial 0/1, too many for a demo).
    """
    if resnet_version not in (1, 2):
      raise ValueError(f'resnet_version must be 1 or 2, got {resnet_version!r}')
    if dtype not in ALLOWED_TYPES:
      raise ValueError(f'dtype must be one of {ALLOWED_TYPES}, got {dtype}')
    if data_format is None:
      data_format = 'channels_first' if tf.test.is_built_with_cuda() else 'channels_last'
    if data_format not in ('channels_first', 'channels_last'):
      raise ValueError("data_format must be 'channels_first' or 'channels_last', "
                       f'got {data_format!r}')
    exit_groups = tuple(int(g) for g in exit_groups)
    if list(exit_groups) != sorted(set(exit_groups)) or any(
        not 0 <= g < len(block_sizes) - 1 for g in exit_groups):
      raise ValueError('exit_groups must be increasing group indices below '
                       f'{len(block_sizes) - 1}, got {exit_groups}')
    if len(exit_pool_grids) < len(exit_groups):
      raise ValueError(f'need a pool grid for each of the {len(exit_groups)} early exits')

    self.resnet_size = resnet_size
    self.bottleneck = bottleneck
    self.resnet_version = resnet_version
    self.num_classes = num_classes
    self.num_filters = num_filters
    self.kernel_size = kernel_size
    self.conv_stride = conv_stride
    self.first_pool_size = first_pool_size
    self.first_pool_stride = first_pool_stride
    self.block_sizes = list(block_sizes)
    self.block_strides = list(block_strides)
    self.data_format = data_format
    self.dtype = dtype
    self.pre_activation = resnet_version == 2
    self.exit_groups = exit_groups
    self.exit_pool_grids = tuple(tuple(g) for g in exit_pool_grids[:len(exit_groups)])
    self.exit_hidden_units = exit_hidden_units
    self.batch_norm_decay = batch_norm_decay
    self.num_exits = len(exit_groups) + 1
    self.final_exit = self.num_exits - 1
    self.block_fn = resnet_layers.BLOCK_FUNCTIONS[bottleneck, resnet_version]

  # -- variables -----------------------------------------------------------------------------
  def _custom_dtype_getter(self, getter, name, shape=None, dtype=DEFAULT_DTYPE, *args, **kwargs):
    """Keeps variables in fp32 and casts them on read when the model runs in fp16 or bf16.

    Batch norm asks for its parameters in fp32 whatever its input, so they are not cast: its
    statistics are computed and kept in fp32.
    """
    if dtype in CASTABLE_TYPES:
      var = getter(name, shape, tf.float32, *args, **kwargs)
      return tf.cast(var, dtype=dtype, name=name + '_cast')
    return getter(name, shape, dtype, *args, **kwargs)

  def _model_variable_scope(self):
    return tf.variable_scope(MODEL_SCOPE, custom_getter=self._custom_dtype_getter)

  # -- structure -----------------------------------------------------------------------------
  def check_exits(self, exits):
    """The sorted tuple of exit ids ``exits`` (None: every exit); ValueError for a bad id."""
    exits = tuple(range(self.num_exits)) if exits is None else tuple(sorted(set(exits)))
    if not exits or any(not 0 <= e < self.num_exits for e in exits):
      raise ValueError(f'exit ids must be in 0..{self.final_exit}, got {list(exits)}')
    return exits

  def stage_groups(self, stage):
    """The block groups (0-based indices) that stage ``stage`` runs, as a range."""
    if not 0 <= stage < self.num_exits:
      raise ValueError(f'stage must be in 0..{self.final_exit}, got {stage}')
    first = 0 if stage == 0 else self.exit_groups[stage - 1] + 1
    last = self.exit_groups[stage] if stage < self.final_exit else len(self.block_sizes) - 1
    return range(first, last + 1)

  def _layers_before_group(self, group):
    """(convs, BNs) the whole network creates before block group ``group``.

    Each block has as many BNs as convs (2 in building blocks, 3 in bottlenecks); each group's
    first block adds a projection conv, and in v1 the projection's BN; v1 also has a BN after
    the stem conv.
    """
    per_block = 3 if self.bottleneck else 2
    blocks = sum(self.block_sizes[:group])
    convs = 1 + blocks * per_block + group
    batch_norms = blocks * per_block + (0 if self.pre_activation else 1 + group)
    return convs, batch_norms

  # -- geometry ------------------------------------------------------------------------------
  def group_filters(self, group):
    """Output channels of block group ``group``."""
    filters = self.num_filters * (2 ** group)
    return filters * 4 if self.bottleneck else filters

  def feature_sizes(self, height, width):
    """Spatial size (h, w) after the stem and after each block group, for an input size."""
    def down(size, stride):
      # Strided convs pad explicitly (output = ceil(size / stride)); SAME max-pool likewise.
      return -(-size // stride)
    h, w = down(height, self.conv_stride), down(width, self.conv_stride)
    if self.first_pool_size:
      h, w = down(h, self.first_pool_stride), down(w, self.first_pool_stride)
    sizes = [(h, w)]
    for stride in self.block_strides:
      h, w = down(h, stride), down(w, stride)
      sizes.append((h, w))
    return sizes

  def stage_feature_shape(self, stage, height, width):
    """Shape, without the batch, of the features stage ``stage`` hands to the next stage.

    [channels, h, w] for channels_first, [h, w, channels] for channels_last, for input images
    of height x width.
    """
    group = self.stage_groups(stage)[-1]
    h, w = self.feature_sizes(height, width)[1 + group]
    channels = self.group_filters(group)
    return [channels, h, w] if self.data_format == 'channels_first' else [h, w, channels]

  def validate_input_size(self, height, width):
    """Raises ValueError if the heads of this model cannot pool inputs of this size."""
    sizes = self.feature_sizes(height, width)
    for exit_id, group in enumerate(self.exit_groups):
      feature_h, feature_w = sizes[1 + group]
      resnet_layers.check_grid_divides(f'exit {exit_id} (for {height}x{width} inputs)',
                         feature_h, feature_w, self.exit_pool_grids[exit_id])

  # -- graph ---------------------------------------------------------------------------------
  def _exit_head(self, inputs, exit_id, training):
    """Early-exit classifier on a block group's output.

    Args:
      inputs: [batch, C, H, W] or [batch, H, W, C] group output.
      exit_id: which early exit (0-based).
      training: whether the head's BNs run in training mode.

    Returns:
      [batch, num_classes] logits.
    """
    tag = f'{exit_id}{exit_id}'
    if self.pre_activation:
      inputs = resnet_layers.batch_norm(inputs, training, self.data_format, self.batch_norm_decay,
                          name=f'cascaded{exit_id}_bn{exit_id}')
      inputs = tf.nn.relu(inputs)
    inputs = resnet_layers.grid_average_pool(inputs, self.exit_pool_grids[exit_id],
                                             self.data_format, f'exit {exit_id}')
    inputs = tf.layers.dense(inputs, self.exit_hidden_units,
                             name=f'cascaded{exit_id}_fc{exit_id}')
    inputs = resnet_layers.batch_norm(inputs, training, self.data_format, self.batch_norm_decay,
                        name=f'cascaded{exit_id}_bn{tag}')
    inputs = tf.nn.relu(inputs)
    logits = tf.layers.dense(inputs, self.num_classes, name=f'cascaded{exit_id}_fc{tag}')
    return tf.identity(logits, f'clf{exit_id}_logits')

  def _final_classifier(self, inputs, training, layers):
    """The network's own head: [v2: BN + ReLU], global average pool, dense -> logits."""
    if self.pre_activation:
      inputs = tf.nn.relu(layers.batch_norm(inputs, training))
    axes = [2, 3] if self.data_format == 'channels_first' else [1, 2]
    # A mean over the spatial axes equals average pooling over the whole map, and is faster.
    inputs = tf.reduce_mean(inputs, axes, keepdims=True)
    inputs = tf.identity(inputs, 'final_reduce_mean')
    inputs = tf.squeeze(inputs, axes)
    inputs = tf.layers.dense(inputs, self.num_classes)
    return tf.identity(inputs, 'final_dense')

  def _stem(self, images, training, layers):
    height, width = images.shape.as_list()[1:3]
    if height is not None and width is not None:
      self.validate_input_size(height, width)
    inputs = images
    if self.data_format == 'channels_first':
      # Inputs arrive NHWC; NCHW is faster on GPUs.
      inputs = tf.transpose(inputs, [0, 3, 1, 2])
    inputs = layers.conv(inputs, self.num_filters, self.kernel_size, self.conv_stride)
    inputs = tf.identity(inputs, 'initial_conv')
    # v1 activates the stem here; v2 leaves it to the first block's pre-activation.
    if not self.pre_activation:
      inputs = tf.nn.relu(layers.batch_norm(inputs, training))
    if self.first_pool_size:
      inputs = tf.layers.max_pooling2d(inputs, self.first_pool_size, self.first_pool_stride,
                                       padding='SAME', data_format=self.data_format)
      inputs = tf.identity(inputs, 'initial_max_pool')
    return inputs

  def _build_stage(self, stage, inputs, training, backbone_training, head):
    if backbone_training is None:
      backbone_training = training
    groups = self.stage_groups(stage)
    # Stage 0 starts with the stem, i.e. with the first conv (and in v1 the first BN).
    first = (0, 0) if stage == 0 else self._layers_before_group(groups[0])
    layers = resnet_layers.BackboneLayers(self.data_format, self.batch_norm_decay, *first)
    if stage == 0:
      inputs = self._stem(inputs, backbone_training, layers)
    for group in groups:
      inputs = resnet_layers.block_layer(
          inputs, self.num_filters * (2 ** group), self.bottleneck, self.block_fn,
          self.block_sizes[group], self.block_strides[group], backbone_training,
          f'resnet_layers.block_layer{group + 1}', layers)
    if stage == self.final_exit:
      return None, self._final_classifier(inputs, backbone_training, layers)
    return inputs, self._exit_head(inputs, stage, training) if head else None

  def stage(self, stage, inputs, training, backbone_training=None, head=True):
    """Builds stage ``stage`` alone, on the previous stage's features.

    Args:
      stage: 0..final_exit.
      inputs: stage 0: [batch, height, width, channels] images (always channels_last); later
        stages: the features the previous stage returned ([batch, C, H, W] or [batch, H, W, C]
        by data_format, see ``stage_feature_shape``).
      training: whether the head's BNs run in training mode.
      backbone_training: the same for the backbone's BNs; defaults to ``training``.
      head: build the stage's exit head (early stages only; the last stage always has its
        classifier).

    Returns:
      (features, logits): the stage's last block group output, which feeds the next stage
      (None after the last stage), and the exit's [batch, num_classes] logits in the model's
      dtype (None without the head).
    """
    with self._model_variable_scope():
      return self._build_stage(stage, inputs, training, backbone_training, head)

  def __call__(self, inputs, training, backbone_training=None, exits=None):
    """Builds the stages up to the deepest requested exit, with only the requested heads.

    Args:
      inputs: [batch, height, width, channels] images (always channels_last on input).
      training: whether the heads' BNs run in training mode (batch statistics, moving
        averages updated).
      backbone_training: the same for the backbone's BNs; defaults to ``training``. Head
        fine-tuning passes False so a frozen backbone keeps its statistics.
      exits: exit ids to build; None for every exit. ``[model.final_exit]`` is the plain
        network of the official checkpoints.

    Returns:
      dict exit_id -> [batch, num_classes] logits (in the model's dtype).
    """
    exits = self.check_exits(exits)
    logits = {}
    # One variable scope for every stage keeps the graph names of the whole network under
    # resnet_model/ (block_layer3, clf1_logits, final_dense, ...).
    with self._model_variable_scope():
      features = inputs
      for stage in range(max(exits) + 1):
        features, stage_logits = self._build_stage(stage, features, training,
                                                   backbone_training, head=stage in exits)
        if stage in exits:
          logits[stage] = stage_logits
    return logits

  # -- compute cost --------------------------------------------------------------------------
  def layer_costs(self, height, width):
    """Multiply-accumulates of every layer, walking the same description the graph is built from.

    Counting rule: a conv costs k*k*H_out*W_out*C_in*C_out MACs and a dense layer
    in*out (bias adds are not multiplies and are not counted); an average pool (exit heads and
    the final spatial mean) costs one accumulate per input element; BN, ReLU, residual adds and
    max pooling are free.

    For ResNet-50 v2 at 224x224 this agrees with the article's spreadsheet to 0.01% on stages 0
    and 1 (the sheet also adds C_out per layer for biases, even on bias-free convs, and counts
    two pools at half). On the last stage the sheet is 51,380,224 MACs short: exactly one
    7x7x512x2048 1x1 conv of block group 4. The count here has that conv, and its plain-network
    total (4.089 G) agrees with the usual ResNet-50 figure of 4.09 GMACs.

    Args:
      height: input image height.
      width: input image width.

    Returns:
      A list of LayerCost(stage, name, macs), in build order (see the class docstring for
      what each stage holds).
    """
    self.validate_input_size(height, width)
    costs = []
    sizes = self.feature_sizes(height, width)
    group_stage = {group: stage for stage in range(self.num_exits)
                   for group in self.stage_groups(stage)}

    def conv(stage, name, k, out_hw, c_in, c_out):
      costs.append(LayerCost(stage, name, k * k * out_hw[0] * out_hw[1] * c_in * c_out))

    stem_hw = (-(-height // self.conv_stride), -(-width // self.conv_stride))
    conv(0, 'initial_conv', self.kernel_size, stem_hw, 3, self.num_filters)
    channels = self.num_filters
    for group, num_blocks in enumerate(self.block_sizes):
      stage = group_stage[group]
      filters = self.num_filters * (2 ** group)
      out_channels = self.group_filters(group)
      out_hw = sizes[group + 1]
      in_hw = sizes[group]
      for block in range(num_blocks):
        prefix = f'resnet_layers.block_layer{group + 1}/block{block + 1}'
        c_in = channels if block == 0 else out_channels
        if block == 0:
          conv(stage, prefix + '/projection', 1, out_hw, c_in, out_channels)
        if self.bottleneck:
          # The stride sits on the 3x3 conv, so the first 1x1 runs at the input resolution.
          first_hw = in_hw if block == 0 else out_hw
          conv(stage, prefix + '/conv1x1_a', 1, first_hw, c_in, filters)
          conv(stage, prefix + '/conv3x3', 3, out_hw, filters, filters)
          conv(stage, prefix + '/conv1x1_b', 1, out_hw, filters, out_channels)
        else:
          conv(stage, prefix + '/conv3x3_a', 3, out_hw, c_in, filters)
          conv(stage, prefix + '/conv3x3_b', 3, out_hw, filters, filters)
      channels = out_channels
      if group in self.exit_groups:
        exit_id = self.exit_groups.index(group)
        rows, cols = self.exit_pool_grids[exit_id]
        head = f'cascaded{exit_id}'
        costs.append(LayerCost(stage, head + '/avg_pool', out_hw[0] * out_hw[1] * channels))
        costs.append(LayerCost(stage, head + '/fc', rows * cols * channels *
                               self.exit_hidden_units))
        costs.append(LayerCost(stage, head + '/fc_out', self.exit_hidden_units *
                               self.num_classes))
    final_hw = sizes[-1]
    costs.append(LayerCost(self.final_exit, 'final_reduce_mean',
                           final_hw[0] * final_hw[1] * channels))
    costs.append(LayerCost(self.final_exit, 'final_dense', channels * self.num_classes))
    return costs

  def stage_macs(self, height, width):
    """MACs of each stage (see ``layer_costs``); exit k costs sum(stage_macs[:k + 1])."""
    totals = [0] * self.num_exits
    for cost in self.layer_costs(height, width):
      totals[cost.stage] += cost.macs
    return totals

  def plain_macs(self, height, width):
    """MACs of the network without early-exit heads: the speedup baseline."""
    return sum(c.macs for c in self.layer_costs(height, width)
               if not c.name.startswith('cascaded'))


def imagenet_model(resnet_size, resnet_version, num_classes, data_format=None, dtype=DEFAULT_DTYPE,
                   batch_norm_decay=resnet_layers.BATCH_NORM_DECAY):
  """The ImageNet ResNet of the 2018 official code, with exits after block groups 2 and 3.

  ``num_classes`` is the data set's (imagenet_main.NUM_CLASSES: 1001 for the official
  checkpoints, whose class 0 is the unused background).
  """
  resnet_size = int(resnet_size)
  return Model(
      resnet_size=resnet_size,
      bottleneck=resnet_size >= 50,
      num_classes=num_classes,
      num_filters=64,
      kernel_size=7,
      conv_stride=2,
      first_pool_size=3,
      first_pool_stride=2,
      block_sizes=imagenet_block_sizes(resnet_size),
      block_strides=[1, 2, 2, 2],
      resnet_version=int(resnet_version),
      data_format=data_format,
      dtype=dtype,
      exit_groups=IMAGENET_EXIT_GROUPS,
      batch_norm_decay=batch_norm_decay)
