"""End-to-end tests of imagenet_main on a miniature ImageNet made of real photos.

The README's ImageNet command lines are read from the README itself and run through
``imagenet_main.run_imagenet`` with a fresh ``FlagValues`` each, as ``python imagenet_main.py``
would run them, with only what a CPU test needs changed: local paths, ``--num_gpus 0``,
``-rs 18``, ``--image_size 64``, one short training cycle. The pretrained checkpoint is a plain
ResNet-18 v2 (1001 classes, no exit heads, like the official one) whose every variable holds a
random value.
"""

import dataclasses
import io
import logging as py_logging
import os
import shlex
import shutil

import imagenet_fixtures
import numpy as np
import pytest
import run_helpers
import tensorflow.compat.v1 as tf
from absl import flags
from absl import logging as absl_logging
from PIL import Image

import dump_layout
import imagenet_main
import imagenet_preprocessing
import resnet_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 64
RESNET_SIZE = 18
BATCH_SIZE = 8           # Several batches per split, so dumps are stitched from batches.
TRAIN_STEPS = 2
PRETRAINED_STEP = 4321
VALIDATION_SHARDS, TRAIN_SHARDS = 3, 2
OFFICIAL_CHECKPOINT = 'checkpoints/resnet_imagenet_v2_fp32_20181001'


###############################################################################
# Helpers
###############################################################################
def run_imagenet(*args):
  """Runs one job in this process, as ``python imagenet_main.py <args>`` would."""
  flag_values = flags.FlagValues()
  imagenet_main.define_imagenet_flags(flag_values)
  flag_values(['imagenet_main.py'] + [str(a) for a in args])
  return imagenet_main.run_imagenet(flag_values)


def readme_imagenet_commands():
  """The README's ImageNet reproduction lines (those that start from -pmcp), as argument lists.

  These are step 3 (evaluate and dump clf2), step 4 (fine-tune clf0, clf1) and the
  ``--classifier_id all`` line, in the README's order.
  """
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  section = readme.split('## Reproducing the ImageNet results', 1)[1].split('\n## ', 1)[0]
  lines = [line.strip() for line in section.splitlines()
           if line.strip().startswith('python imagenet_main.py')]
  commands = [shlex.split(line)[2:] for line in lines]
  return [argv for argv in commands if '-pmcp' in argv]


def adapt_for_cpu_test(argv, data_dir, pretrained, work_dir):
  """A README command line with local paths, a CPU and a small model, as an argument list.

  Returns:
    (argv, model_dir).
  """
  replacements = {'--num_gpus': '0', '-rs': str(RESNET_SIZE), '--te': '1',
                  '--data_dir': data_dir, '-pmcp': pretrained}
  adapted, model_dir = [], None
  args = iter(argv)
  for arg in args:
    if arg in replacements or arg in ('-md', '--model_dir'):
      value = next(args)
      if arg in ('-md', '--model_dir'):
        model_dir = os.path.join(work_dir, os.path.basename(value))
        value = model_dir
      elif arg == '-pmcp':
        assert value == OFFICIAL_CHECKPOINT, 'the README should use the official checkpoint'
      adapted += [arg, replacements.get(arg, value)]
    else:
      adapted.append(arg)
  if '--te' in adapted:
    adapted += ['--max_train_steps', TRAIN_STEPS]
  adapted += ['--image_size', IMAGE_SIZE, '--batch_size', BATCH_SIZE]
  return adapted, model_dir


def pipeline_order(shards, cycle_length=10):
  """Rows of a non-training pass: shards in groups of ``cycle_length``, one record each in turn.

  This is the order of the original's dumps (original_system.md 3.2), written out by hand for
  shards of equal size.
  """
  rows = []
  for start in range(0, len(shards), cycle_length):
    group = shards[start:start + cycle_length]
    for i in range(max(len(s) for s in group)):
      rows.extend(s[i] for s in group if i < len(s))
  return rows


def write_random_checkpoint(folder, resnet_size=RESNET_SIZE, seed=0):
  """Saves a plain ImageNet ResNet v2 (1001 classes) whose every variable is random.

  Kernels are He-scaled normals, BN gammas and moving variances uniform in [0.5, 3], betas and
  moving means normal. The final dense kernel is then scaled so that the logits spread by a few
  units: random BN statistics leave the features far from normalised, and unscaled logits would
  make every softmax one-hot, which would hide differences between two computations.

  Returns:
    (checkpoint prefix, dict variable name -> value).
  """
  rng = np.random.default_rng(seed)
  model = resnet_model.imagenet_model(resnet_size, 2, imagenet_main.NUM_CLASSES, 'channels_last')
  with tf.Graph().as_default() as graph:
    images = tf.random.normal([8, IMAGE_SIZE, IMAGE_SIZE, 3], stddev=60.0, seed=1)
    model(images, training=False, exits=[2])
    features = graph.get_tensor_by_name('resnet_model/final_reduce_mean:0')   # [8, 1, 1, 512]
    step = tf.train.get_or_create_global_step()
    values = {}
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      for var in tf.global_variables():
        name, shape = var.op.name, var.shape.as_list()
        if var is step:
          value = np.int64(PRETRAINED_STEP)
        elif name.endswith(('moving_variance', 'gamma')):
          value = rng.uniform(0.5, 3.0, shape)
        elif name.endswith('kernel'):
          value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        else:
          value = rng.normal(0.0, 0.3, shape)
        var.load(np.asarray(value, var.dtype.base_dtype.as_numpy_dtype), sess)
        values[name] = value
      spread = sess.run(features).std()
      dense = [v for v in tf.global_variables() if v.op.name == 'resnet_model/dense/kernel'][0]
      kernel = rng.normal(0.0, 2.0 / (spread * np.sqrt(dense.shape[0])), dense.shape.as_list())
      dense.load(kernel.astype(np.float32), sess)
      values[dense.op.name] = kernel
      prefix = tf.train.Saver().save(sess, os.path.join(folder, 'model.ckpt'),
                                     global_step=PRETRAINED_STEP)
  return prefix, {k: np.asarray(v, np.float32) if k != 'global_step' else v
                  for k, v in values.items()}


def direct_probabilities(checkpoint, jpeg_buffers, exits=(2,)):
  """Softmax of a model restored from ``checkpoint`` on eval-preprocessed JPEGs.

  Builds the model in a plain session, without the Estimator or the input pipeline.

  Returns:
    dict exit -> float32 [len(jpeg_buffers), 1001].
  """
  model = resnet_model.imagenet_model(RESNET_SIZE, 2, imagenet_main.NUM_CLASSES, 'channels_last')
  with tf.Graph().as_default():
    buffers = tf.placeholder(tf.string, [None])
    images = tf.map_fn(
        lambda b: imagenet_preprocessing.preprocess_image(
            b, tf.zeros([1, 0, 4]), IMAGE_SIZE, IMAGE_SIZE, 3, is_training=False),
        buffers, fn_output_signature=tf.float32)                  # [n, 64, 64, 3]
    probabilities = {k: tf.nn.softmax(v) for k, v in model(images, training=False,
                                                                  exits=exits).items()}
    saver = tf.train.Saver(tf.global_variables())
    with tf.Session() as sess:
      saver.restore(sess, checkpoint)
      return sess.run(probabilities, {buffers: list(jpeg_buffers)})


def load_dump(softmax_dir, split, exit_id):
  return np.load(dump_layout.probabilities_path(softmax_dir, split, exit_id))


class _LogRecords(py_logging.Handler):
  def __init__(self):
    super().__init__(level=py_logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


###############################################################################
# Fixtures: data, pretrained checkpoint, the README runs (each built once)
###############################################################################
@dataclasses.dataclass
class Data:
  data_dir: str
  mini: imagenet_fixtures.MiniatureImageNet
  rows: dict          # split -> record dicts in the order every non-training pass reads them


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('imagenet')
  mini = imagenet_fixtures.make_miniature_imagenet(
      str(root / 'downloads'), train_per_class=6, validation_per_class=4)
  data_dir = str(root / 'tf_records')
  summaries = imagenet_fixtures.convert_miniature(
      mini, data_dir, train_shards=TRAIN_SHARDS, validation_shards=VALIDATION_SHARDS,
      num_workers=1)
  rows = {}
  for split, summary in summaries.items():
    shards = [imagenet_fixtures.read_examples([p], decode=False) for p in summary.shard_paths]
    # pipeline_order spells out the order for shards of equal size only.
    assert len({len(s) for s in shards}) == 1
    rows[split] = pipeline_order(shards)
  return Data(data_dir, mini, rows)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('resnet_imagenet_v2_fp32'))
  prefix, values = write_random_checkpoint(folder)
  return folder, prefix, values


@dataclasses.dataclass
class ReadmeRuns:
  argv: dict          # model_dir name -> argument list run
  results: dict       # model_dir name -> run_imagenet's result
  model_dirs: dict    # model_dir name -> path
  softmax_dirs: dict  # model_dir name -> softmax_dir
  warnings: list      # absl warnings logged during the runs


@pytest.fixture(scope='module')
def readme_runs(data, pretrained, tmp_path_factory):
  """Runs the README's step 3, step 4 and ``--classifier_id all`` lines, in the README's order.

  The first three share one dump folder, as the README has them; step 3 dumps the training split
  too, the others skip it (--nodump_train).
  """
  work = str(tmp_path_factory.mktemp('checkpoints'))
  commands = readme_imagenet_commands()
  model_dirs = [argv[argv.index('-md') + 1] for argv in commands]
  assert model_dirs == [f'checkpoints/{n}' for n in ('clf2', 'clf0', 'clf1', 'cascade')]
  handler = _LogRecords()
  absl_logging.get_absl_logger().addHandler(handler)
  runs = ReadmeRuns({}, {}, {}, {}, handler.messages)
  try:
    for i, command in enumerate(commands):
      argv, model_dir = adapt_for_cpu_test(command, data.data_dir, pretrained[0], work)
      name = os.path.basename(model_dir)
      softmax_dir = os.path.join(work, 'output_softmax' if name != 'cascade' else 'cascade_dumps')
      argv += ['--softmax_dir', softmax_dir] + (['--nodump_train'] if i else [])
      runs.argv[name] = argv
      runs.model_dirs[name] = model_dir
      runs.softmax_dirs[name] = softmax_dir
      runs.results[name] = run_imagenet(*argv)
  finally:
    absl_logging.get_absl_logger().removeHandler(handler)
  return runs


###############################################################################
# The README's command lines
###############################################################################
def test_readme_lines_parse_and_run_on_a_cpu(readme_runs, data):
  assert sorted(readme_runs.results) == ['cascade', 'clf0', 'clf1', 'clf2']
  for argv in readme_runs.argv.values():
    assert argv[argv.index('--data_format') + 1] == 'channels_first'
  # TensorFlow's CPU kernels cannot run this model channels_first: the runs only finish because
  # they fell back to channels_last, and they say so.
  fallbacks = [m for m in readme_runs.warnings if 'channels_first needs a GPU' in m]
  assert len(fallbacks) == 4
  num_validation = len(data.mini.validation)
  for result in readme_runs.results.values():
    assert result['dumped']['validation'] == num_validation
  assert readme_runs.results['clf2']['dumped']['train'] == len(data.mini.train)
  # Eval only: nothing trained, nothing evaluated; the fine-tuning runs evaluated once.
  assert readme_runs.results['clf2']['eval'] is None
  for name in ('clf0', 'clf1', 'cascade'):
    assert readme_runs.results[name]['eval']['global_step'] == TRAIN_STEPS


def test_shared_dump_folder_holds_every_exit_in_record_order(readme_runs, data):
  softmax_dir = readme_runs.softmax_dirs['clf2']
  manifest = dump_layout.read_manifest(softmax_dir)
  assert manifest['num_classes'] == imagenet_main.NUM_CLASSES == 1001
  assert manifest['model']['resnet_size'] == RESNET_SIZE
  assert manifest['model']['image_size'] == [IMAGE_SIZE, IMAGE_SIZE]
  assert manifest['pretrained_global_step'] == PRETRAINED_STEP
  assert manifest['splits']['validation'] == {'num_images': len(data.mini.validation),
                                              'exits': [0, 1, 2]}
  assert manifest['splits']['train'] == {'num_images': len(data.mini.train), 'exits': [2]}
  for split, images in (('validation', data.mini.validation), ('train', data.mini.train)):
    rows = data.rows[split]
    labels = np.load(dump_layout.labels_path(softmax_dir, split))
    assert labels.dtype == np.int32 and labels.shape == (len(images),)
    np.testing.assert_array_equal(labels, [r['class/label'] for r in rows])
    # ...which are the labels of the photos in those files (the cat is 286, ...).
    np.testing.assert_array_equal(labels, [images[r['filename']].label for r in rows])
    exits = [0, 1, 2] if split == 'validation' else [2]
    for exit_id in exits:
      probabilities = load_dump(softmax_dir, split, exit_id)
      assert probabilities.dtype == np.float32
      assert probabilities.shape == (len(images), imagenet_main.NUM_CLASSES)
      np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
  assert not [f for _, _, files in os.walk(softmax_dir) for f in files if f.endswith('.partial')]


def test_eval_only_dumps_equal_the_pretrained_model_computed_directly(readme_runs, data,
                                                                      pretrained):
  _, prefix, _ = pretrained
  softmax_dir = readme_runs.softmax_dirs['clf2']
  for split in ('validation', 'train'):
    expected = direct_probabilities(prefix, [r['encoded'] for r in data.rows[split]])[2]
    # A random network that still spreads its bets: the comparison below is not one of
    # one-hot rows.
    assert expected.max() < 0.9
    np.testing.assert_allclose(load_dump(softmax_dir, split, 2), expected, atol=1e-4, rtol=0)


def test_fine_tuning_leaves_the_backbone_and_final_classifier_as_pretrained(readme_runs,
                                                                            pretrained):
  _, _, pretrained_values = pretrained
  trained_heads = {'clf0': {0}, 'clf1': {1}, 'cascade': {0, 1}}
  for name, heads in trained_heads.items():
    model_dir = readme_runs.model_dirs[name]
    final = run_helpers.checkpoint_values(model_dir)
    start = run_helpers.checkpoint_values(os.path.join(model_dir, 'model.ckpt-0'))
    assert final['global_step'] == TRAIN_STEPS and start['global_step'] == 0
    for var_name, value in pretrained_values.items():
      if var_name == 'global_step':
        continue
      # Every variable of the pretrained network, BN moving statistics and the final dense
      # layer included, bit for bit.
      np.testing.assert_array_equal(final[var_name], value, err_msg=f'{name}: {var_name}')
    for exit_id in (0, 1):
      prefix = resnet_model.exit_head_prefix(exit_id)
      head = sorted(n for n in final if n.startswith(prefix) and '/Momentum' not in n)
      assert head
      changed = [n for n in head if not np.array_equal(final[n], start[n])]
      if exit_id in heads:
        kernels = [n for n in head if n.endswith('/kernel')]
        assert set(kernels) <= set(changed), f'{name}: exit {exit_id} did not train'
        assert any(n.endswith('moving_mean') for n in changed)
      else:
        assert changed == [], f'{name}: exit {exit_id} changed'


@pytest.fixture(scope='module')
def single_exit_dumps(readme_runs, data, tmp_path_factory):
  """Eval-only dumps of exits 0, 1 and 2 one at a time from the fine-tuned cascade model_dir."""
  model_dir = readme_runs.model_dirs['cascade']
  dumps = {}
  for exit_id in (0, 1, 2):
    softmax_dir = str(tmp_path_factory.mktemp(f'single_clf{exit_id}'))
    run_imagenet('--eval_only', '--classifier_id', exit_id, '-rv', 2, '-rs', RESNET_SIZE,
                 '-md', model_dir, '--data_dir', data.data_dir, '--num_gpus', 0,
                 '--image_size', IMAGE_SIZE, '--batch_size', BATCH_SIZE, '--softmax_dir',
                 softmax_dir, '--nodump_train')
    dumps[exit_id] = softmax_dir
  return dumps


def test_all_exits_in_one_pass_equal_three_single_exit_passes(readme_runs, single_exit_dumps):
  all_dir = readme_runs.softmax_dirs['cascade']
  manifest = dump_layout.read_manifest(all_dir)
  assert manifest['splits']['validation']['exits'] == [0, 1, 2]
  for exit_id, single_dir in single_exit_dumps.items():
    single_manifest = dump_layout.read_manifest(single_dir)
    assert single_manifest['global_step'] == manifest['global_step'] == TRAIN_STEPS
    assert single_manifest['splits']['validation']['exits'] == [exit_id]
    assert not os.path.exists(dump_layout.split_dir(single_dir, 'train'))
    np.testing.assert_array_equal(
        np.load(dump_layout.labels_path(single_dir, 'validation')),
        np.load(dump_layout.labels_path(all_dir, 'validation')))
    np.testing.assert_allclose(load_dump(single_dir, 'validation', exit_id),
                               load_dump(all_dir, 'validation', exit_id), atol=1e-6, rtol=0)


###############################################################################
# Export
###############################################################################
def _jpeg(rgb):
  out = io.BytesIO()
  Image.fromarray(rgb).save(out, format='JPEG', quality=90)
  return out.getvalue()


def test_exported_model_classifies_jpeg_bytes(readme_runs, data, tmp_path):
  export_dir = str(tmp_path / 'export')
  model_dir = readme_runs.model_dirs['cascade']
  run_imagenet('--eval_only', '--classifier_id', 'all', '-rv', 2, '-rs', RESNET_SIZE,
               '-md', model_dir, '--data_dir', data.data_dir, '--num_gpus', 0,
               '--image_size', IMAGE_SIZE, '--softmax_dir', '', '--export_dir', export_dir,
               '--image_bytes_as_serving_input')
  [version] = os.listdir(export_dir)
  saved_model = os.path.join(export_dir, version)
  rows = data.rows['validation']
  photo = _jpeg(imagenet_fixtures.real_photos()['chelsea'])   # a whole photo, 300x451
  jpegs = [r['encoded'] for r in rows] + [photo]
  with tf.Graph().as_default(), tf.Session() as sess:
    meta_graph = tf.saved_model.loader.load(sess, [tf.saved_model.tag_constants.SERVING],
                                            saved_model)
    signature = meta_graph.signature_def['serving_default']
    assert list(signature.inputs) == ['image_bytes']
    outputs = {k: v.name for k, v in signature.outputs.items() if k.endswith('probabilities')}
    assert sorted(outputs) == [f'clf{k}_probabilities' for k in range(3)]
    served = sess.run(outputs, {signature.inputs['image_bytes'].name: jpegs})
  all_dir = readme_runs.softmax_dirs['cascade']
  for exit_id in range(3):
    probabilities = served[f'clf{exit_id}_probabilities']
    assert probabilities.shape == (len(jpegs), imagenet_main.NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities[:-1], load_dump(all_dir, 'validation', exit_id),
                               atol=1e-4, rtol=0)


###############################################################################
# Bad input: one clear error, nothing written
###############################################################################
def _eval_args(data_dir, model_dir, pretrained, *extra):
  return ['--eval_only', '-rv', 2, '-md', model_dir, '-pmcp', pretrained, '--data_dir', data_dir,
          '--num_gpus', 0, '--image_size', IMAGE_SIZE, '--nodump_train', *extra]


def test_missing_records_name_the_converter(pretrained, tmp_path):
  model_dir = str(tmp_path / 'model')
  empty = tmp_path / 'tf_records'
  (empty / 'validation').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='preprocess_imagenet.sh'):
    run_imagenet(*_eval_args(str(empty), model_dir, pretrained[0], '-rs', RESNET_SIZE))
  assert not os.path.exists(model_dir)


def _damaged_copy(data, tmp_path, damage):
  """A copy of the converted records whose first validation shard ``damage`` rewrites.

  Returns:
    (data_dir of the copy, path of the damaged shard).
  """
  data_dir = str(tmp_path / 'tf_records')
  shutil.copytree(data.data_dir, data_dir)
  shard = imagenet_main.get_filenames('validation', data_dir)[0]
  with open(shard, 'rb') as f:
    content = f.read()
  with open(shard, 'wb') as f:
    f.write(damage(content))
  return data_dir, shard


def _without_last_record(content):
  """The shard cut at its last record boundary (a TFRecord: length, CRC, data, CRC)."""
  position, ends = 0, []
  while position < len(content):
    position += 16 + int.from_bytes(content[position:position + 8], 'little')
    ends.append(position)
  return content[:ends[-2]]


def _dump_files(softmax_dir):
  return sorted(os.path.relpath(os.path.join(d, f), softmax_dir)
                for d, _, files in os.walk(softmax_dir) for f in files)


@pytest.mark.parametrize('extra', [(), ('--evaluate_in_eval_only',)], ids=['dump', 'evaluate'])
def test_shard_cut_at_a_record_boundary_stops_the_run(data, pretrained, tmp_path, extra):
  data_dir, shard = _damaged_copy(data, tmp_path, _without_last_record)
  softmax_dir = str(tmp_path / 'softmax')
  total = len(data.mini.validation)
  what = 'evaluated' if extra else 'dumped'
  with pytest.raises(ValueError) as error:
    run_imagenet(*_eval_args(data_dir, str(tmp_path / 'model'), pretrained[0], '-rs',
                             RESNET_SIZE, '--softmax_dir', softmax_dir, *extra))
  message = str(error.value)
  assert message.startswith(f'{what} {total - 1} validation images, but ')
  assert f'conversion_manifest.json lists {total}' in message
  assert f'{shard} holds ' in message and 'delete it and rerun the converter' in message
  # Nothing of the short dump is left: no files, no manifest entry.
  assert _dump_files(softmax_dir) == []


def test_corrupt_record_names_its_shard(data, pretrained, tmp_path):
  def flip_a_byte(content):
    middle = len(content) // 2
    return content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1:]
  data_dir, shard = _damaged_copy(data, tmp_path, flip_a_byte)
  with pytest.raises(ValueError, match=r'the validation data in --data_dir .* is damaged') as error:
    run_imagenet(*_eval_args(data_dir, str(tmp_path / 'model'), pretrained[0], '-rs',
                             RESNET_SIZE, '--softmax_dir', str(tmp_path / 'softmax')))
  assert f'{shard} has a corrupt record after record ' in str(error.value)


def test_partial_shards_of_a_killed_conversion_are_never_read(data, tmp_path):
  data_dir = str(tmp_path / 'tf_records')
  shutil.copytree(data.data_dir, data_dir)
  complete = imagenet_main.get_filenames('validation', data_dir)
  # A killed converter leaves the shard it was writing as <name>.partial.
  shutil.copy(complete[0], complete[0] + '.partial')
  shutil.copy(complete[0], complete[0] + '.tmp')
  assert imagenet_main.get_filenames('validation', data_dir) == complete
  assert imagenet_main.count_images('validation', data_dir)[0] == len(data.mini.validation)


def test_checkpoint_of_another_depth_names_the_resnet_size_flag(data, pretrained, tmp_path):
  model_dir = str(tmp_path / 'model')
  softmax_dir = str(tmp_path / 'dumps')
  with pytest.raises(ValueError, match=r'-rs\b') as error:
    run_imagenet(*_eval_args(data.data_dir, model_dir, pretrained[0], '-rs', 34,
                             '--softmax_dir', softmax_dir))
  assert 'does not fit the model' in str(error.value)
  assert not tf.train.latest_checkpoint(model_dir) and not os.path.exists(softmax_dir)


@pytest.mark.parametrize('image_size', [100, 0])
def test_image_size_the_heads_cannot_pool_is_refused(data, pretrained, tmp_path, image_size):
  model_dir = str(tmp_path / 'model')
  args = _eval_args(data.data_dir, model_dir, pretrained[0], '-rs', RESNET_SIZE)
  args[args.index('--image_size') + 1] = image_size
  with pytest.raises(ValueError, match=f'--image_size {image_size}'):
    run_imagenet(*args)
  assert not os.path.exists(model_dir)


###############################################################################
# Image counts and learning-rate schedules
###############################################################################
def test_image_counts_come_from_the_manifest_or_the_records(data, tmp_path):
  count, source = imagenet_main.count_images('validation', data.data_dir)
  assert count == len(data.mini.validation)
  assert source.endswith(os.path.join('validation', 'conversion_manifest.json'))
  assert imagenet_main.count_images('train', data.data_dir)[0] == len(data.mini.train)
  # The upstream flat layout, without the converter's manifest: the records are counted.
  flat = tmp_path / 'flat'
  flat.mkdir()
  for path in imagenet_main.get_filenames('validation', data.data_dir):
    shutil.copy(path, flat)
  count, source = imagenet_main.count_images('validation', str(flat))
  assert count == len(data.mini.validation) and source.startswith(f'the records of {flat}')


def _learning_rates(flag_args, batch_size, steps):
  flag_values = flags.FlagValues()
  imagenet_main.define_imagenet_flags(flag_values)
  flag_values(['imagenet_main.py', '--batch_size', str(batch_size)] + flag_args)
  with tf.Graph().as_default():
    step = tf.placeholder(tf.int64, [])
    rate = imagenet_main.learning_rate_fn(flag_values, batch_size)(step)
    with tf.Session() as sess:
      return [float(sess.run(rate, {step: s})) for s in steps]


# Worked by hand for the full training set (1,281,167 images). Batch 32: 40,036.47 steps per
# epoch, so epoch e ends at step int(40036.46875 * e); the rate changes after that step.
FINE_TUNE_32 = [  # 0.01 * 32 / 256 = 0.00125, x0.1 at epochs 10, 20, 30, 40; no warm-up.
    (0, 0.00125), (400364, 0.00125), (400365, 0.000125), (800729, 0.000125),
    (800730, 1.25e-5), (1201094, 1.25e-5), (1201095, 1.25e-6), (1601458, 1.25e-6),
    (1601459, 1.25e-7), (4000000, 1.25e-7)]
FULL_32 = [  # 0.128 * 32 / 256 = 0.016, linear from 0 over 5 epochs (200,182 steps).
    (0, 0.0), (100091, 0.008), (200181, 0.016 * 200181 / 200182), (200182, 0.016),
    (1201094, 0.016), (1201095, 0.0016), (2402188, 0.0016), (2402189, 0.00016),
    (3202917, 0.00016), (3202918, 1.6e-5), (3603282, 1.6e-5), (3603283, 1.6e-6)]
# Batch 256: 5,004.56 steps per epoch; 0.01 and 0.128 are the rates for that batch.
FINE_TUNE_256 = [(0, 0.01), (50045, 0.01), (50046, 0.001), (200182, 1e-5),
                 (200183, 1e-6)]
FULL_256 = [(12511, 0.128 * 12511 / 25022), (25022, 0.128), (150136, 0.128),
            (150137, 0.0128), (450410, 0.128 * 1e-3), (450411, 0.128 * 1e-4)]


@pytest.mark.parametrize('flag_args,batch_size,expected', [
    (['--fine_tune'], 32, FINE_TUNE_32),
    ([], 32, FULL_32),
    (['-ft'], 256, FINE_TUNE_256),
    ([], 256, FULL_256),
])
def test_learning_rate_schedules(flag_args, batch_size, expected):
  steps = [s for s, _ in expected]
  rates = _learning_rates(flag_args, batch_size, steps)
  np.testing.assert_allclose(rates, [r for _, r in expected], rtol=1e-6, atol=0)

