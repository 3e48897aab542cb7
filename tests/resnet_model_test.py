"""Tests of resnet_model: official variable layout, exit heads, data formats, MACs, errors."""

import os

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import resnet_layers
import resnet_model

tf.disable_eager_execution()

FIXTURES = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'fixtures')
ARTICLE_STAGE_MACS = (1_817_092_009, 1_467_571_177, 759_970_793)


def read_fixture(name):
  path = os.path.join(FIXTURES, name)
  if not os.path.exists(path):
    pytest.skip(f'fixture {path} not found (expected ../shared beside the repository)')
  with open(path) as f:
    rows = [line.split('\t') for line in f.read().splitlines() if line]
  return {name: tuple(int(d) for d in shape.split('x')) for name, shape in rows}


def build(model, size=224, training=False, **kwargs):
  """Builds ``model`` in a fresh graph; returns (graph, images placeholder, logits dict)."""
  graph = tf.Graph()
  with graph.as_default():
    images = tf.placeholder(tf.float32, [None, size, size, 3], name='images')
    logits = model(images, training=training, **kwargs)
  return graph, images, logits


def variable_shapes(graph):
  with graph.as_default():
    return {v.op.name: tuple(v.shape.as_list()) for v in tf.global_variables()}


def test_plain_resnet50_v2_has_exactly_the_official_checkpoint_variables():
  official = read_fixture('official_resnet50_v2_variables.tsv')
  graph, _, logits = build(resnet_model.imagenet_model(50, 2, 1001, 'channels_last'), exits=[2])
  assert variable_shapes(graph) == official
  assert list(logits) == [2]
  assert logits[2].shape.as_list() == [None, 1001]


def test_all_exits_add_exactly_the_original_head_variables():
  official = read_fixture('official_resnet50_v2_variables.tsv')
  heads = read_fixture('exit_heads_resnet50_v2_variables.tsv')
  graph, _, logits = build(resnet_model.imagenet_model(50, 2, 1001, 'channels_last'))
  assert variable_shapes(graph) == {**official, **heads}
  assert sorted(logits) == [0, 1, 2]


@pytest.mark.parametrize('resnet_size,version', [(18, 1), (18, 2), (50, 1), (50, 2)])
def test_head_names_and_shapes(resnet_size, version):
  model = resnet_model.imagenet_model(resnet_size, version, 1001, 'channels_last')
  graph, _, logits = build(model, size=64)
  shapes = variable_shapes(graph)
  expansion = 4 if resnet_size >= 50 else 1
  for exit_id, group, cells in ((0, 1, 4), (1, 2, 2)):
    channels = 64 * 2 ** group * expansion
    prefix = f'resnet_model/cascaded{exit_id}_'
    twice = f'{exit_id}{exit_id}'
    want = {
        prefix + f'fc{exit_id}/kernel': (channels * cells, 1024),
        prefix + f'fc{exit_id}/bias': (1024,),
        prefix + f'fc{twice}/kernel': (1024, 1001),
        prefix + f'fc{twice}/bias': (1001,),
    }
    for stat in ('gamma', 'beta', 'moving_mean', 'moving_variance'):
      want[prefix + f'bn{twice}/{stat}'] = (1024,)
      if version == 2:  # v2 group outputs are not activated yet, so the head pre-activates.
        want[prefix + f'bn{exit_id}/{stat}'] = (channels,)
    got = {name: shape for name, shape in shapes.items() if name.startswith(prefix)}
    assert got == want
    assert logits[exit_id].shape.as_list() == [None, 1001]


def _subgraph_variables(graph, tensor):
  """Names of the variables a tensor's value depends on."""
  graph_def = tf.graph_util.extract_sub_graph(graph.as_graph_def(), [tensor.op.name])
  return {node.name for node in graph_def.node if node.op in ('VarHandleOp', 'VariableV2')}


def test_exit0_alone_builds_nothing_after_group2():
  plain_graph, _, _ = build(resnet_model.imagenet_model(50, 2, 1001, 'channels_last'), exits=[2])
  plain = list(variable_shapes(plain_graph))
  graph, _, logits = build(resnet_model.imagenet_model(50, 2, 1001, 'channels_last'), size=64,
                           exits=[0])
  names = list(variable_shapes(graph))
  backbone = [n for n in names if resnet_model.variable_group(n) == 'backbone']
  # The stem and groups 1-2 of ResNet-50 hold 1 + 3*3 + 4*3 + 2 convs (with projections)...
  assert sum(n.endswith('/kernel') and 'conv2d' in n for n in backbone) == 1 + 10 + 13
  # ... and are exactly the first variables of the plain model, in the same order.
  assert backbone == plain[:len(backbone)]
  assert not any(resnet_model.variable_group(n) in ('exit1', 'final_dense') for n in names)
  assert list(logits) == [0]
  with graph.as_default():
    assert 'resnet_model/block_layer3' not in [op.name for op in graph.get_operations()]


def test_one_pass_serves_each_exit_with_only_the_layers_it_needs():
  graph, _, logits = build(resnet_model.imagenet_model(50, 2, 1001, 'channels_last'), size=64)
  needs = {k: _subgraph_variables(graph, logits[k]) for k in logits}
  groups = {k: {resnet_model.variable_group(n) for n in needs[k]} for k in needs}
  assert groups == {0: {'backbone', 'exit0'}, 1: {'backbone', 'exit1'},
                    2: {'backbone', 'final_dense'}}
  # The backbone variables are shared, each exit reaching deeper than the one before.
  assert needs[0] & needs[1] == {n for n in needs[0] if 'cascaded0' not in n}
  assert len(needs[0]) < len(needs[1]) < len(needs[2]) + 40


def _run_head(data_format, features_nhwc, seed_values=None):
  """Runs exit 0's head of a ResNet-18 v2 on a given group-2 output."""
  model = resnet_model.imagenet_model(18, 2, 10, data_format)
  graph = tf.Graph()
  with graph.as_default():
    features = tf.constant(features_nhwc)
    if data_format == 'channels_first':
      features = tf.transpose(features, [0, 3, 1, 2])
    with model._model_variable_scope():
      logits = model._exit_head(features, 0, training=False)
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      variables = {v.op.name: v for v in tf.global_variables()}
      if seed_values is None:
        rng = np.random.RandomState(1)
        seed_values = {name: rng.uniform(0.5, 1.5, v.shape.as_list()).astype(np.float32)
                       for name, v in variables.items()}
      for name, value in seed_values.items():
        variables[name].load(value, sess)
      return sess.run(logits), seed_values


def test_heads_give_equal_logits_in_both_data_formats():
  features = np.random.RandomState(0).randn(3, 8, 8, 128).astype(np.float32)
  last, weights = _run_head('channels_last', features)
  first, _ = _run_head('channels_first', features, weights)
  assert last.shape == (3, 10)
  np.testing.assert_allclose(first, last, rtol=1e-5, atol=1e-5)
  assert np.abs(last).max() > 1e-3


def test_grid_pool_equals_tensorflow_average_pool():
  features = np.random.RandomState(2).randn(2, 14, 14, 5).astype(np.float32)
  with tf.Graph().as_default(), tf.Session() as sess:
    ours = resnet_layers.grid_average_pool(tf.constant(features), (1, 2), 'channels_last')
    reference = tf.nn.avg_pool2d(features, (14, 7), (14, 7), 'VALID')   # [2, 1, 2, 5]
    reference = tf.reshape(tf.transpose(reference, [0, 3, 1, 2]), [2, 10])
    ours, reference = sess.run([ours, reference])
  np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)


def test_checkpoint_of_plain_model_restores_into_cascaded_backbone(tmp_path):
  prefix = str(tmp_path / 'plain.ckpt')
  graph, _, _ = build(resnet_model.imagenet_model(50, 2, 1001, 'channels_last'), size=32,
                      exits=[2])
  rng = np.random.RandomState(3)
  with graph.as_default(), tf.Session() as sess:
    saved = {}
    for v in tf.global_variables():
      # Random values everywhere, BN moving statistics included, so nothing passes by default.
      value = rng.uniform(0.1, 2.0, v.shape.as_list()).astype(np.float32)
      v.load(value, sess)
      saved[v.op.name] = value
    tf.train.Saver().save(sess, prefix)

  graph, _, _ = build(resnet_model.imagenet_model(50, 2, 1001, 'channels_last'), size=32)
  with graph.as_default(), tf.Session() as sess:
    variables = tf.global_variables()
    restorable = [v for v in variables
                  if resnet_model.variable_group(v.op.name) in ('backbone', 'final_dense')]
    sess.run(tf.global_variables_initializer())
    tf.train.Saver(var_list=restorable).restore(sess, prefix)
    values = dict(zip([v.op.name for v in variables], sess.run(variables), strict=True))
  assert {v.op.name for v in restorable} == set(saved)
  assert any(name.endswith('moving_variance') for name in saved)
  for name, value in saved.items():
    np.testing.assert_array_equal(values[name], value, err_msg=name)
  # Heads start fresh: BN gammas at one, not restored from anywhere.
  np.testing.assert_array_equal(values['resnet_model/cascaded0_bn00/gamma'], np.ones(1024))


def test_variable_groups():
  group = resnet_model.variable_group
  assert group('resnet_model/conv2d_7/kernel') == 'backbone'
  assert group('resnet_model/batch_normalization_48/moving_mean:0') == 'backbone'
  assert group('resnet_model/cascaded0_fc00/kernel') == 'exit0'
  assert group('resnet_model/cascaded1_bn1/beta') == 'exit1'
  assert group('resnet_model/dense/kernel') == 'final_dense'
  assert group('global_step') is None
  assert resnet_model.head_group(2) == 'final_dense'
  assert resnet_model.head_group(1) == 'exit1'


def test_resnet50_stage_macs_pinned_and_close_to_the_article():
  model = resnet_model.imagenet_model(50, 2, 1001, 'channels_last')
  stages = model.stage_macs(224, 224)
  assert stages == [1_817_084_928, 1_467_659_264, 811_388_928]
  for ours, article in zip(stages[:2], ARTICLE_STAGE_MACS[:2], strict=True):
    assert abs(ours - article) / article < 0.005
  # The article's sheet lacks one 7x7x512x2048 1x1 conv in group 4 (see layer_costs); with it
  # added the last stage agrees too.
  missing_conv = 7 * 7 * 512 * 2048
  assert abs(stages[2] - (ARTICLE_STAGE_MACS[2] + missing_conv)) / ARTICLE_STAGE_MACS[2] < 0.005
  assert model.plain_macs(224, 224) == 4_089_286_656
  # Heads add about 0.16% to the worst case, as in the article (+0.167%).
  assert 0.001 < sum(stages) / model.plain_macs(224, 224) - 1 < 0.002


@pytest.mark.parametrize('resnet_size,version,size', [(50, 2, 224), (18, 1, 96)])
def test_conv_and_dense_macs_agree_with_tensorflow_profiler(resnet_size, version, size):
  model = resnet_model.imagenet_model(resnet_size, version, 1001, 'channels_last')
  graph = tf.Graph()
  with graph.as_default():
    model(tf.placeholder(tf.float32, [1, size, size, 3]), training=False)
    options = tf.profiler.ProfileOptionBuilder.float_operation()
    options['output'] = 'none'
    options['account_type_regexes'] = ['Conv2D', 'MatMul']
    flops = tf.profiler.profile(graph, options=options).total_float_ops
  ours = sum(c.macs for c in model.layer_costs(size, size)
             if not c.name.endswith(('avg_pool', 'reduce_mean')))
  assert ours * 2 == flops


def test_fp16_keeps_fp32_variables():
  model = resnet_model.imagenet_model(18, 2, 10, 'channels_last', dtype=tf.float16)
  graph = tf.Graph()
  with graph.as_default():
    logits = model(tf.placeholder(tf.float16, [None, 64, 64, 3]), training=True)
    assert {v.dtype.base_dtype for v in tf.global_variables()} == {tf.float32}
  assert all(t.dtype == tf.float16 for t in logits.values())


def test_bad_arguments_raise_value_errors_that_say_what_is_allowed():
  with pytest.raises(ValueError, match=r'resnet_size must be one of \[18, 34, 50, 101, 152, 200\]'):
    resnet_model.imagenet_model(51, 2, 1001)
  with pytest.raises(ValueError, match=r'exit ids must be in 0..2, got \[3\]'):
    build(resnet_model.imagenet_model(50, 2, 1001, 'channels_last'), exits=[3])
  with pytest.raises(ValueError, match='multiple of 32'):
    build(resnet_model.imagenet_model(50, 2, 1001, 'channels_last'), size=200)
  with pytest.raises(ValueError, match='multiple of 32'):
    resnet_model.imagenet_model(50, 2, 1001).stage_macs(200, 200)
  with pytest.raises(ValueError, match='resnet_version must be 1 or 2'):
    resnet_model.imagenet_model(50, 3, 1001)
  with pytest.raises(ValueError, match='data_format'):
    resnet_model.imagenet_model(50, 2, 1001, data_format='NHWC')


@pytest.mark.parametrize('resnet_size,version', [(18, 1), (18, 2), (50, 1), (50, 2)])
def test_layer_names_follow_tensorflows_automatic_numbering(resnet_size, version):
  """The explicit names equal what TF's numbering gave the official code: in creation order."""
  graph, _, _ = build(resnet_model.imagenet_model(resnet_size, version, 1001, 'channels_last'),
                      size=64)
  layers = {'conv2d': [], 'batch_normalization': []}
  for name in variable_shapes(graph):   # In creation order.
    layer = name.split('/')[1]
    kind = layer.rsplit('_', 1)[0] if layer[-1].isdigit() else layer
    if kind in layers and layer not in layers[kind]:
      layers[kind].append(layer)
  for kind, names in layers.items():
    assert names == [resnet_layers.layer_name(kind, i) for i in range(len(names))]
  per_block = 3 if resnet_size >= 50 else 2
  blocks = sum(resnet_model.imagenet_block_sizes(resnet_size))
  assert len(layers['conv2d']) == 1 + blocks * per_block + 4
  assert len(layers['batch_normalization']) == blocks * per_block + (1 if version == 2 else 5)


def _stage_by_stage(model, images):
  """Builds the model as the cascade does: every stage on its own, reusing the variables."""
  model(images, training=False)
  outputs = []
  features = images
  with tf.variable_scope(tf.get_variable_scope(), reuse=True):
    for stage in range(model.num_exits):
      features, logits = model.stage(stage, features, training=False)
      outputs.append((features, logits))
  return outputs


@pytest.mark.parametrize('version', [1, 2])
def test_stages_composed_equal_the_whole_model(version):
  model = resnet_model.imagenet_model(18, version, 1001, 'channels_last')
  images = np.random.RandomState(4).normal(0, 1, [3, 64, 64, 3]).astype(np.float32)
  with tf.Graph().as_default(), tf.Session() as sess:
    placeholder = tf.placeholder(tf.float32, [None, 64, 64, 3])
    whole = model(placeholder, training=False)
    count = len(tf.global_variables())
    with tf.variable_scope(tf.get_variable_scope(), reuse=True):
      staged = _stage_by_stage(model, placeholder)
    assert len(tf.global_variables()) == count   # The stages reused every variable.
    for stage, (features, _) in enumerate(staged[:-1]):
      assert features.shape.as_list()[1:] == model.stage_feature_shape(stage, 64, 64)
    assert staged[-1][0] is None
    sess.run(tf.global_variables_initializer())
    rng = np.random.RandomState(5)
    for v in tf.global_variables():   # BN statistics away from 0/1, so each layer counts.
      if v.op.name.endswith(('moving_mean', 'beta')):
        v.load(rng.normal(0, 0.1, v.shape.as_list()).astype(np.float32), sess)
      elif v.op.name.endswith(('moving_variance', 'gamma')):
        v.load(rng.uniform(0.5, 1.5, v.shape.as_list()).astype(np.float32), sess)
    got = sess.run({k: logits for k, (_, logits) in enumerate(staged)}, {placeholder: images})
    want = sess.run(whole, {placeholder: images})
  for k in range(3):
    assert np.all(np.isfinite(want[k])) and np.std(want[k]) > 1e-3
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_a_stage_built_alone_has_the_whole_models_names_for_its_part():
  model = resnet_model.imagenet_model(50, 2, 1001, 'channels_last')
  whole, _, _ = build(model, size=64)
  names = variable_shapes(whole)
  graph = tf.Graph()
  with graph.as_default():
    features = tf.placeholder(tf.float32, [None] + model.stage_feature_shape(0, 64, 64))
    _, logits = model.stage(1, features, training=False)
  alone = variable_shapes(graph)
  # Stage 1 is block group 3 (6 bottlenecks + projection: 19 convs, 18 BNs) and exit 1's head.
  assert sum('conv2d' in n for n in alone) == 19
  assert 'resnet_model/conv2d_24/kernel' in alone and 'resnet_model/conv2d_42/kernel' in alone
  assert 'resnet_model/conv2d_23/kernel' not in alone
  assert all(names[n] == shape for n, shape in alone.items())
  assert {resnet_model.variable_group(n) for n in alone} == {'backbone', 'exit1'}
  assert logits.shape.as_list() == [None, 1001]
