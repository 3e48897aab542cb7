"""The run loop under kills, concurrency, full or read-only folders, damaged files and bad flags.

Every job goes through ``cifar10_main`` on real Fashion-MNIST images, in this process or, where a
job has to be killed, run beside another or must print its one ``error:`` line, as
``python cifar10_main.py`` in a fresh process. The model is a ResNet-8 whose every variable holds
a random value (``run_helpers.write_random_checkpoint``): dumps need no training.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import run_helpers
from absl import flags

import dump_layout
import softmax_dump

NUM_TRAIN, NUM_VALIDATION = 400, 120
MODEL_FLAGS = ('-rs', 8, '-rv', 2)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return run_helpers.prepare_data(tmp_path_factory, NUM_TRAIN, NUM_VALIDATION)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  folder = tmp_path_factory.mktemp('random_model')
  prefix, _ = run_helpers.write_random_checkpoint(str(folder / 'model.ckpt'), exits=None)
  return prefix


def _dump_args(data_dir, model_dir, softmax_dir, checkpoint, *extra):
  return ['-dd', data_dir, '-md', model_dir, *MODEL_FLAGS, '--eval_only', '-pmcp', checkpoint,
          '--classifier_id', 'all', '-bs', 10, '--softmax_dir', softmax_dir, *extra]


def _files(folder):
  """Every file below ``folder``, as paths relative to it."""
  return sorted(os.path.relpath(os.path.join(d, f), folder)
                for d, _, names in os.walk(folder) for f in names)


def _bytes(folder, names):
  result = {}
  for name in names:
    with open(os.path.join(folder, name), 'rb') as f:
      result[name] = f.read()
  return result


def _start(args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=run_helpers.REPO_DIR)
  return subprocess.Popen([sys.executable, run_helpers.MAIN_SCRIPT] + [str(a) for a in args],
                          cwd=run_helpers.REPO_DIR, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


###############################################################################
# Kills: a dump resumes where it stopped
###############################################################################
def test_killed_dump_resumes_and_ends_byte_identical(data_dir, checkpoint, tmp_path):
  reference = str(tmp_path / 'reference')
  run_helpers.run_cifar(*_dump_args(data_dir, str(tmp_path / 'model_ref'), reference, checkpoint))
  names = [n for n in _files(reference) if n.endswith('.npy')]
  assert len(names) == 8   # labels and three exits, for both splits

  softmax_dir = str(tmp_path / 'softmax')
  args = _dump_args(data_dir, str(tmp_path / 'model'), softmax_dir, checkpoint,
                    '--dump_commit_seconds', 0)
  process = _start(args)
  killed_after = None
  try:
    # Kill the job in the middle of the training split, after a few committed batches.
    deadline = time.time() + 240
    train = dump_layout.split_dir(softmax_dir, 'train')
    while time.time() < deadline and process.poll() is None and killed_after is None:
      for name in os.listdir(train) if os.path.isdir(train) else []:
        if name.endswith(dump_layout.PROGRESS_SUFFIX):
          with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(train, name)) as f:
              rows = json.load(f)['rows']
            if rows >= 50:
              process.send_signal(signal.SIGKILL)
              killed_after = rows
      time.sleep(0.02)
  finally:
    process.kill()
    process.wait()
  assert killed_after is not None and killed_after < NUM_TRAIN, 'the dump ended before the kill'
  assert os.path.exists(dump_layout.labels_path(softmax_dir, 'validation'))
  assert not os.path.exists(dump_layout.labels_path(softmax_dir, 'train'))

  done = run_helpers.run_cifar_subprocess(*args)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'were dumped from' in done.stderr and 'skipped' in done.stderr    # validation
  assert 'resuming the train dump' in done.stderr
  resumed = int(done.stderr.split('resuming the train dump')[1].split(' after ')[1].split()[0])
  assert resumed >= killed_after and resumed % 10 == 0   # whole batches, nothing recomputed
  assert _bytes(softmax_dir, names) == _bytes(reference, names)
  assert not [n for n in _files(softmax_dir) if not n.endswith(('.npy', 'manifest.json'))]


def test_rerun_of_a_complete_dump_skips_it(data_dir, checkpoint, tmp_path, caplog):
  softmax_dir = str(tmp_path / 'softmax')
  args = _dump_args(data_dir, str(tmp_path / 'model'), softmax_dir, checkpoint, '--nodump_train')
  run_helpers.run_cifar(*args)
  before = {name: os.stat(os.path.join(softmax_dir, name)).st_mtime_ns
            for name in _files(softmax_dir)}
  result = run_helpers.run_cifar(*args)
  assert result['dumped'] == {'validation': NUM_VALIDATION}
  assert {name: os.stat(os.path.join(softmax_dir, name)).st_mtime_ns
          for name in _files(softmax_dir)} == before


###############################################################################
# Concurrency: two dumps into one folder
###############################################################################
def test_two_dumps_into_one_folder_at_once_both_land(data_dir, checkpoint, tmp_path):
  model_dir = str(tmp_path / 'model')
  softmax_dir = str(tmp_path / 'softmax')
  run_helpers.run_cifar(*_dump_args(data_dir, model_dir, str(tmp_path / 'all'), checkpoint,
                                    '--nodump_train'))
  jobs = []
  for exit_id in (0, 1):
    args = _dump_args(data_dir, model_dir, softmax_dir, checkpoint, '--nodump_train')
    args[args.index('--classifier_id') + 1] = exit_id
    jobs.append(_start(args))
  errors = [job.communicate(timeout=300)[1] for job in jobs]
  assert [job.returncode for job in jobs] == [0, 0], [e[-2000:] for e in errors]
  manifest = dump_layout.read_manifest(softmax_dir)
  assert manifest['splits']['validation'] == {'num_images': NUM_VALIDATION, 'exits': [0, 1]}
  assert _files(softmax_dir) == ['manifest.json', 'validation/clf0_probabilities.npy',
                                 'validation/clf1_probabilities.npy', 'validation/labels.npy']
  together = str(tmp_path / 'all')
  for name in ('labels.npy', 'clf0_probabilities.npy', 'clf1_probabilities.npy'):
    np.testing.assert_allclose(np.load(os.path.join(softmax_dir, 'validation', name)),
                               np.load(os.path.join(together, 'validation', name)), atol=1e-5)


###############################################################################
# Full and read-only folders
###############################################################################
@pytest.fixture
def small_folder(tmp_path):
  """A 48 kB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
  folder = tmp_path / 'small'
  folder.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=48k', 'tmpfs', str(folder)],
                           capture_output=True, check=False)
  if mounted.returncode:
    pytest.skip('cannot mount a small tmpfs here (needs root): ' + mounted.stderr.decode())
  try:
    yield folder
  finally:
    subprocess.run(['umount', '-l', str(folder)], check=False)


def test_full_disk_ends_in_one_error_line_and_leaves_no_partial_file(data_dir, checkpoint,
                                                                     tmp_path, small_folder):
  # The validation dump (120 rows) fits into 48 kB; the training split's 400 rows do not.
  softmax_dir = str(small_folder / 'softmax')
  done = run_helpers.run_cifar_subprocess(
      *_dump_args(data_dir, str(tmp_path / 'model'), softmax_dir, checkpoint))
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith('error: cannot write ') and 'No space left on device' in last, last
  assert 'Traceback' not in done.stderr
  assert not [n for n in _files(softmax_dir) if dump_layout.PARTIAL_SUFFIX in n
              or n.endswith(dump_layout.PROGRESS_SUFFIX)]


def test_read_only_folder_is_refused_before_any_work(data_dir, checkpoint, tmp_path,
                                                     small_folder):
  subprocess.run(['mount', '-o', 'remount,ro', str(small_folder)], check=True)
  done = run_helpers.run_cifar_subprocess(
      *_dump_args(data_dir, str(tmp_path / 'model'), str(small_folder / 'softmax'), checkpoint))
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      f'error: --softmax_dir {small_folder / "softmax"}: cannot write into {small_folder} '
      '(Read-only file system); choose a folder you can write to')
  assert not (tmp_path / 'model').exists()


###############################################################################
# Damaged checkpoints
###############################################################################
def _truncated_copy(prefix, folder):
  """A copy of a checkpoint whose .data file lost its second half."""
  os.makedirs(folder)
  copy = os.path.join(folder, os.path.basename(prefix))
  for name in os.listdir(os.path.dirname(prefix)):
    if name.startswith(os.path.basename(prefix) + '.'):
      shutil.copy(os.path.join(os.path.dirname(prefix), name), folder)
  data = [n for n in os.listdir(folder) if '.data-' in n][0]
  path = os.path.join(folder, data)
  os.truncate(path, os.path.getsize(path) // 2)
  return copy, path


def test_truncated_pretrained_checkpoint_is_named(data_dir, checkpoint, tmp_path):
  damaged, data_file = _truncated_copy(checkpoint, str(tmp_path / 'damaged'))
  model_dir = tmp_path / 'model'
  with pytest.raises(ValueError, match=f'the checkpoint {damaged} .* is damaged') as error:
    run_helpers.run_cifar(*_dump_args(data_dir, str(model_dir), str(tmp_path / 'softmax'),
                                      damaged))
  assert data_file in str(error.value)
  assert 'download and unpack the pretrained model again' in str(error.value)
  assert not model_dir.exists()


def test_truncated_checkpoint_in_model_dir_says_how_to_fall_back(data_dir, checkpoint,
                                                                  tmp_path):
  model_dir = str(tmp_path / 'model')
  args = _dump_args(data_dir, model_dir, '', checkpoint)
  run_helpers.run_cifar(*args)   # warm start: a step-0 checkpoint in model_dir
  latest = [n for n in os.listdir(model_dir) if '.data-' in n][0]
  os.truncate(os.path.join(model_dir, latest), 100)
  with pytest.raises(ValueError, match='is damaged: .*delete it .* from --model_dir'):
    run_helpers.run_cifar(*args)


###############################################################################
# Flags that would do nothing
###############################################################################
@pytest.mark.parametrize('flag, value', [
    ('--train_epochs', 0), ('--train_epochs', -1), ('--te', -1),
    ('--max_train_steps', 0), ('--max_train_steps', -5), ('--epochs_between_evals', 0)])
def test_flags_that_would_do_nothing_are_refused_by_name(flag, value):
  name = flag.lstrip('-').replace('te', 'train_epochs') if flag == '--te' else flag.lstrip('-')
  with pytest.raises(flags.IllegalFlagValueError, match=f'--{name} must be a positive integer'):
    run_helpers.parse_cifar_flags([flag, value])


def test_job_key_depends_on_split_exits_and_checkpoint():
  key = softmax_dump.job_key
  assert key('train', (0, 1), '/m/model.ckpt-5') == key('train', [1, 0], '/m/model.ckpt-5')
  others = {key('validation', (0, 1), '/m/model.ckpt-5'), key('train', (0,), '/m/model.ckpt-5'),
            key('train', (0, 1), '/m/model.ckpt-6')}
  assert key('train', (0, 1), '/m/model.ckpt-5') not in others and len(others) == 3
