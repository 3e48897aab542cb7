"""End-to-end tests of cifar10_main.py and the run loop on real Fashion-MNIST images.

Every job goes through ``cifar10_main.run_cifar`` with freshly parsed flags, or through
``python cifar10_main.py`` in a subprocess where the job needs its own TensorFlow runtime (two
logical CPU devices) or has to be killed. One module fixture trains a ResNet-8 with all three
exits once; most tests inspect that run (its evaluation, softmax dumps and SavedModel) or start
short jobs from its checkpoint.
"""

import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import run_helpers
import tensorflow.compat.v1 as tf
from absl import flags

import cifar10_main
import dump_layout

NUM_TRAIN = 1000
NUM_VALIDATION = 200
# 1000 steps of 8 images: BN's moving averages (decay 0.997) need about that many steps to
# approach the real statistics, and evaluation uses the moving averages.
TRAIN_BATCH = 8
TRAIN_EPOCHS = 8
TRAIN_STEPS = TRAIN_EPOCHS * NUM_TRAIN // TRAIN_BATCH
MODEL_FLAGS = ('-rs', 8, '-rv', 2)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return run_helpers.prepare_data(tmp_path_factory, NUM_TRAIN, NUM_VALIDATION)


@pytest.fixture(scope='module')
def small_data_dir(tmp_path_factory):
  return run_helpers.prepare_data(tmp_path_factory, 200, 50)


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """Trains all three exits together, dumps both splits and exports a SavedModel."""
  out = tmp_path_factory.mktemp('trained')
  run = {'model_dir': str(out / 'model'), 'softmax_dir': str(out / 'softmax'),
         'export_dir': str(out / 'export')}
  run['result'] = run_helpers.run_cifar(
      '-dd', data_dir, '-md', run['model_dir'], *MODEL_FLAGS, '--classifier_id', 'all',
      '-bs', TRAIN_BATCH, '-te', TRAIN_EPOCHS, '-ebe', TRAIN_EPOCHS, '--hooks=',
      '--softmax_dir', run['softmax_dir'], '--export_dir', run['export_dir'])
  return run


def _load_dumps(softmax_dir, split, exits=(0, 1, 2)):
  labels = np.load(dump_layout.labels_path(softmax_dir, split))
  probabilities = {k: np.load(dump_layout.probabilities_path(softmax_dir, split, k))
                   for k in exits}
  return labels, probabilities


def _folder_bytes(folder):
  """Every file under ``folder`` (relative path -> contents)."""
  contents = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        contents[os.path.relpath(path, folder)] = f.read()
  return contents


def _partial_files(folder):
  return glob.glob(os.path.join(folder, '**', '*.partial'), recursive=True)


def _eval_only(data_dir, model_dir, softmax_dir, *extra):
  return run_helpers.run_cifar('-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--eval_only',
                               '--softmax_dir', softmax_dir, '--nodump_train', *extra)


def _logged_evaluation(log_text, pattern=r'evaluation after cycle \d+: (.*)'):
  """The metrics of the run loop's last evaluation log line: dict name -> float."""
  lines = re.findall(pattern, log_text)
  assert lines, 'no evaluation was logged:\n' + log_text[-3000:]
  metrics = {}
  for item in lines[-1].split(', '):
    name, value = item.rsplit('=', 1)
    metrics[name] = float(value)
  return metrics


###############################################################################
# The trained model: accuracy, dumps, export
###############################################################################
def test_every_exit_beats_chance_on_held_out_images(trained):
  evaluation = trained['result']['eval']
  assert evaluation['global_step'] == TRAIN_STEPS
  for exit_id in range(3):
    # Chance is 10%; a few hundred steps on Fashion-MNIST reach well above 60%.
    assert evaluation[f'clf{exit_id}/accuracy'] > 0.5, evaluation
  assert evaluation['accuracy'] == evaluation['clf2/accuracy']


def test_dumps_have_the_documented_layout(trained, data_dir):
  softmax_dir = trained['softmax_dir']
  assert trained['result']['dumped'] == {'validation': NUM_VALIDATION, 'train': NUM_TRAIN}
  for split, count in (('validation', NUM_VALIDATION), ('train', NUM_TRAIN)):
    labels, probabilities = _load_dumps(softmax_dir, split)
    assert labels.dtype == np.int32 and labels.shape == (count,)
    # Same images, same order as the records on disk.
    np.testing.assert_array_equal(labels, run_helpers.read_labels(data_dir, split))
    for exit_id, probs in probabilities.items():
      assert probs.dtype == np.float32 and probs.shape == (count, 10), exit_id
      assert np.all(probs >= 0)
      np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
  assert not _partial_files(softmax_dir)

  manifest = dump_layout.read_manifest(softmax_dir)
  model = cifar10_main.Cifar10Model(8, 2)
  assert manifest['splits'] == {
      'validation': {'num_images': NUM_VALIDATION, 'exits': [0, 1, 2]},
      'train': {'num_images': NUM_TRAIN, 'exits': [0, 1, 2]}}
  assert manifest['stage_macs'] == model.stage_macs(32, 32)
  assert manifest['plain_macs'] == model.plain_macs(32, 32)
  assert manifest['num_classes'] == 10 and manifest['num_exits'] == 3
  assert manifest['global_step'] == TRAIN_STEPS
  assert manifest['checkpoint'] == tf.train.latest_checkpoint(trained['model_dir'])
  assert manifest['model']['resnet_size'] == 8 and manifest['model']['image_size'] == [32, 32]
  assert manifest['dataset'] == 'cifar10'
  with open(dump_layout.manifest_path(softmax_dir)) as f:
    assert json.load(f) == manifest  # plain JSON, readable without the project


def test_evaluation_counts_every_image_of_the_dumps(trained):
  """The evaluated accuracy is the dumps' accuracy over all validation images."""
  labels, probabilities = _load_dumps(trained['softmax_dir'], 'validation')
  for exit_id, probs in probabilities.items():
    accuracy = np.mean(probs.argmax(axis=1) == labels)
    assert trained['result']['eval'][f'clf{exit_id}/accuracy'] == pytest.approx(accuracy,
                                                                                abs=1e-6)


def test_saved_model_gives_the_dumped_probabilities(trained, data_dir):
  exports = glob.glob(os.path.join(trained['export_dir'], '*', 'saved_model.pb'))
  assert len(exports) == 1, exports
  images = run_helpers.read_images(data_dir, 'validation', 12)
  with tf.Graph().as_default(), tf.Session() as sess:
    meta_graph = tf.saved_model.loader.load(sess, [tf.saved_model.tag_constants.SERVING],
                                            os.path.dirname(exports[0]))
    signature = meta_graph.signature_def['serving_default']
    (image_input,) = signature.inputs.values()
    fetches = {k: signature.outputs[f'clf{k}_probabilities'].name for k in range(3)}
    outputs = sess.run(fetches, {image_input.name: images})
  _, probabilities = _load_dumps(trained['softmax_dir'], 'validation')
  for exit_id in range(3):
    np.testing.assert_allclose(outputs[exit_id], probabilities[exit_id][:12], atol=1e-5)


###############################################################################
# Dumps of single exits, sharing one folder
###############################################################################
def test_single_exit_runs_share_a_folder_and_match_the_all_exit_dump(trained, data_dir,
                                                                     tmp_path):
  shared = str(tmp_path / 'softmax')
  written = {}
  for exit_id in (1, 0, 2):
    _eval_only(data_dir, trained['model_dir'], shared, '--classifier_id', exit_id)
    with open(dump_layout.probabilities_path(shared, 'validation', exit_id), 'rb') as f:
      written[exit_id] = f.read()
  # A later run for another exit leaves the earlier exits' files alone.
  for exit_id, contents in written.items():
    with open(dump_layout.probabilities_path(shared, 'validation', exit_id), 'rb') as f:
      assert f.read() == contents, exit_id
  manifest = dump_layout.read_manifest(shared)
  assert manifest['splits'] == {'validation': {'num_images': NUM_VALIDATION,
                                               'exits': [0, 1, 2]}}
  assert not _partial_files(shared)

  labels, single = _load_dumps(shared, 'validation')
  all_labels, together = _load_dumps(trained['softmax_dir'], 'validation')
  np.testing.assert_array_equal(labels, all_labels)
  for exit_id in range(3):
    np.testing.assert_allclose(single[exit_id], together[exit_id], atol=1e-5)


@pytest.mark.parametrize('change, message', [
    (lambda labels: np.roll(labels, 1), 'differ from image 0 on'),      # other images
    (lambda labels: np.append(labels, labels[:1]), 'differ in number'),  # a longer record set
])
def test_dump_with_other_labels_fails_and_keeps_the_old_files(trained, data_dir, tmp_path,
                                                              change, message):
  softmax_dir = str(tmp_path / 'softmax')
  shutil.copytree(trained['softmax_dir'], softmax_dir)
  labels_path = dump_layout.labels_path(softmax_dir, 'validation')
  np.save(labels_path, change(np.load(labels_path)))
  # Dumps of another run (from the same checkpoint the split would count as done, and skipped).
  manifest = dump_layout.read_manifest(softmax_dir)
  for source in manifest['exit_sources']['validation'].values():
    source['checkpoint'] = '/elsewhere/model.ckpt-1'
  dump_layout.write_manifest(softmax_dir, manifest)
  before = _folder_bytes(softmax_dir)
  with pytest.raises(ValueError, match='already holds labels .* ' + message):
    _eval_only(data_dir, trained['model_dir'], softmax_dir, '--classifier_id', 0)
  assert _folder_bytes(softmax_dir) == before
  assert not _partial_files(softmax_dir)


def test_channels_first_on_cpu_falls_back_and_gives_the_same_dumps(trained, data_dir, tmp_path,
                                                                   caplog):
  softmax_dir = str(tmp_path / 'softmax')
  with caplog.at_level(logging.WARNING, logger='absl'):
    _eval_only(data_dir, trained['model_dir'], softmax_dir, '--classifier_id', 'all',
               '--data_format', 'channels_first')
  assert 'running channels_last' in caplog.text
  _, fallback = _load_dumps(softmax_dir, 'validation')
  _, reference = _load_dumps(trained['softmax_dir'], 'validation')
  for exit_id in range(3):
    np.testing.assert_allclose(fallback[exit_id], reference[exit_id], atol=1e-5)


###############################################################################
# Two replicas (logical CPU devices, hence a fresh process)
###############################################################################
def test_two_replicas_train_evaluate_and_dump_like_one(trained, data_dir, tmp_path):
  model_dir = str(tmp_path / 'model')
  shutil.copytree(trained['model_dir'], model_dir)
  # A few more steps from the trained checkpoint. --train_epochs only has to reach past the
  # checkpoint's step (48 epochs of 21 steps); --max_train_steps stops 4 steps later.
  # Batch 48: 24 images per replica, and the 200 validation images end with a global batch
  # of 8 images, i.e. one replica gets an empty batch.
  extra_steps = 4
  two_dir = str(tmp_path / 'softmax2')
  done = run_helpers.run_cifar_subprocess(
      '-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--classifier_id', 'all', '-bs', 48,
      '-te', 48, '-ebe', 48, '--max_train_steps', TRAIN_STEPS + extra_steps,
      '--softmax_dir', two_dir,
      '--nodump_train', '--cpu_replicas', 2)
  assert done.returncode == 0, done.stderr[-5000:]
  assert "2 replica(s) on ['/cpu:0', '/cpu:1']" in done.stderr
  two = _logged_evaluation(done.stderr)
  assert two['global_step'] == TRAIN_STEPS + extra_steps
  trained_values = run_helpers.checkpoint_values(trained['model_dir'])
  new_values = run_helpers.checkpoint_values(model_dir)
  assert not np.array_equal(new_values['resnet_model/conv2d/kernel'],
                            trained_values['resnet_model/conv2d/kernel'])
  assert all(np.all(np.isfinite(v)) for v in new_values.values())

  one_dir = str(tmp_path / 'softmax1')
  one = _eval_only(data_dir, model_dir, one_dir, '--classifier_id', 'all',
                   '--evaluate_in_eval_only', '-bs', 48)['eval']
  labels, probs_two = _load_dumps(two_dir, 'validation')
  _, probs_one = _load_dumps(one_dir, 'validation')
  for exit_id in range(3):
    name = f'clf{exit_id}/accuracy'
    # Logged with 4 decimals; 200 images make steps of 0.005.
    assert two[name] == pytest.approx(one[name], abs=1e-4)
    assert two[name] == pytest.approx(np.mean(probs_two[exit_id].argmax(1) == labels),
                                      abs=1e-4)
    assert two[f'clf{exit_id}/accuracy_top_5'] == pytest.approx(
        one[f'clf{exit_id}/accuracy_top_5'], abs=1e-4)
    np.testing.assert_allclose(probs_two[exit_id], probs_one[exit_id], atol=1e-5)


def test_two_replicas_need_a_divisible_batch(data_dir, tmp_path):
  model_dir = tmp_path / 'model'
  with pytest.raises(ValueError, match=r'--batch_size 33 does not divide by the 2 replicas'):
    run_helpers.run_cifar('-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '-bs', 33,
                          '--cpu_replicas', 2)
  assert not model_dir.exists()


###############################################################################
# Resuming a killed run
###############################################################################
def test_killed_run_resumes_to_the_same_final_step(small_data_dir, tmp_path, caplog):
  model_dir = str(tmp_path / 'model')
  num_train, batch, epochs = 200, 10, 2
  args = ['-dd', small_data_dir, '-md', model_dir, *MODEL_FLAGS, '--classifier_id', 'all',
          '-bs', batch, '-te', epochs, '-ebe', 1, '--save_checkpoints_steps', 5,
          '--softmax_dir=', '--hooks=']
  final_step = epochs * -(-num_train // batch)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=run_helpers.REPO_DIR)
  process = subprocess.Popen([sys.executable, run_helpers.MAIN_SCRIPT] + [str(a) for a in args],
                             cwd=run_helpers.REPO_DIR, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  killed_at = None
  try:
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
      latest = tf.train.latest_checkpoint(model_dir)
      if latest and int(latest.rsplit('-', 1)[1]) > 0:
        process.send_signal(signal.SIGKILL)
        killed_at = int(latest.rsplit('-', 1)[1])
        break
      time.sleep(0.05)
  finally:
    if process.poll() is None:
      process.kill()
    process.wait()
  assert killed_at is not None, 'the run ended or stalled before its first checkpoint'
  assert process.returncode == -signal.SIGKILL
  assert 0 < killed_at < final_step

  result = run_helpers.run_cifar(*args)
  assert result['eval']['global_step'] == final_step
  assert run_helpers.checkpoint_values(model_dir)['global_step'] == final_step

  # Once more: nothing left to train, and the cycle done before is not evaluated again.
  with caplog.at_level(logging.INFO, logger='absl'):
    result = run_helpers.run_cifar(*args)
  assert result['eval']['global_step'] == final_step
  assert 'cycle 1/2: done before' in caplog.text
  assert 'evaluation after cycle 1:' not in caplog.text
  assert caplog.text.count('evaluation after cycle 2:') == 1


###############################################################################
# Command line and bad input
###############################################################################
def test_readme_command_line_parses_with_the_cifar_flags():
  flag_values = run_helpers.parse_cifar_flags(
      ['-rv', '2', '-rs', '50', '--data_format', 'channels_first', '--eval_only',
       '--is_cascaded', '--classifier_id', '2', '-md', 'X', '-pmcp', 'Y', '--data_dir', 'Z',
       '--num_gpus', '0'])
  assert flag_values.resnet_version == '2' and flag_values.resnet_size == '50'
  assert flag_values.data_format == 'channels_first' and flag_values.eval_only
  assert flag_values.is_cascaded and flag_values.classifier_id == '2'
  assert flag_values.model_dir == 'X' and flag_values.pretrained_model_checkpoint_path == 'Y'
  assert flag_values.data_dir == 'Z' and flag_values.num_gpus == 0
  # The other documented short names.
  short = run_helpers.parse_cifar_flags(['-ft', '-te', '20', '-bs', '32', '-ng', '0', '-ebe',
                                         '2', '-dd', 'D', '-ed', 'E', '-df', 'channels_last'])
  assert short.fine_tune and short.train_epochs == 20 and short.batch_size == 32
  assert short.epochs_between_evals == 2 and short.export_dir == 'E'


def test_resnet_size_must_be_a_cifar_depth():
  with pytest.raises(flags.IllegalFlagValueError):
    run_helpers.parse_cifar_flags(['-rs', '18'])


def test_missing_data_dir_says_how_to_get_the_data(tmp_path):
  missing = tmp_path / 'nothing_here'
  with pytest.raises(FileNotFoundError, match='prepare_fashion_mnist.py') as error:
    run_helpers.run_cifar('-dd', missing, '-md', tmp_path / 'model', *MODEL_FLAGS)
  assert str(missing) in str(error.value)
  assert not (tmp_path / 'model').exists()
