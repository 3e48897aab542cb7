"""Training and dumps across machines: two workers on 127.0.0.1, as two boxes would run them.

Each worker is ``python cifar10_main.py ... --distribution_strategy multi_worker_mirrored`` in a
process of its own, with its own ``TF_CONFIG`` (free local ports). Two workers with one CPU
replica each must train like one process with two CPU replicas and the same global batch, their
sharded dumps must join into exactly the one-process dump, a worker that dies must stop the other
with one clear error, and a rerun must resume. The training input is seeded (``--seed``), so
both set-ups read the same batches in the same order.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import run_helpers
import tensorflow.compat.v1 as tf

import cifar10_main
import distribution
import dump_layout

NUM_TRAIN, NUM_VALIDATION = 256, 100
MODEL_FLAGS = ('-rs', 8, '-rv', 2, '--classifier_id', 'all', '--batch_norm_decay', 0.9)
CLUSTER_FLAGS = ('--distribution_strategy', 'multi_worker_mirrored',
                 '--rendezvous_timeout_seconds', 120, '--collective_timeout_seconds', 60)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return run_helpers.prepare_data(tmp_path_factory, NUM_TRAIN, NUM_VALIDATION)


@pytest.fixture(scope='module')
def start_checkpoint(tmp_path_factory):
  """A ResNet-8 at its initializers' values: the one starting point of every run."""
  prefix = str(tmp_path_factory.mktemp('start') / 'model.ckpt')
  model = cifar10_main.Cifar10Model(8, 2, 'channels_last')
  with tf.Graph().as_default(), tf.Session() as sess:
    model(tf.zeros([1, 32, 32, 3]), training=True)
    tf.train.get_or_create_global_step()
    sess.run(tf.global_variables_initializer())
    return tf.train.Saver().save(sess, prefix, global_step=0)


def _start(args, tf_config=None, log=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=run_helpers.REPO_DIR)
  env.pop('TF_CONFIG', None)
  if tf_config:
    env['TF_CONFIG'] = tf_config
  return subprocess.Popen([sys.executable, run_helpers.MAIN_SCRIPT] + [str(a) for a in args],
                          cwd=run_helpers.REPO_DIR, env=env, stdout=subprocess.DEVNULL,
                          stderr=log, text=True)


def _run_cluster(args, tmp_path, name, timeout=300):
  """Runs one command on every worker of a 2-worker cluster; returns their (rc, stderr)."""
  logs = [open(tmp_path / f'{name}{i}.log', 'w+') for i in range(2)]   # noqa: SIM115
  configs = run_helpers.local_tf_configs(2)
  workers = [_start(args, config, log) for config, log in zip(configs, logs, strict=True)]
  try:
    for worker in workers:
      worker.wait(timeout=timeout)
  finally:
    for worker in workers:
      worker.kill()
      worker.wait()
  results = []
  for worker, log in zip(workers, logs, strict=True):
    log.seek(0)
    results.append((worker.returncode, log.read()))
    log.close()
  return results


def _model_values(path):
  return {name: value for name, value in run_helpers.checkpoint_values(path).items()
          if name.startswith('resnet_model/') and '/Momentum' not in name}


def _dump_bytes(softmax_dir, split='validation'):
  names = [dump_layout.labels_path(softmax_dir, split)] + [
      dump_layout.probabilities_path(softmax_dir, split, k) for k in range(3)]
  contents = {}
  for name in names:
    with open(name, 'rb') as f:
      contents[os.path.basename(name)] = f.read()
  return contents


def test_two_workers_train_evaluate_and_dump_like_one_machine(data_dir, start_checkpoint,
                                                              tmp_path):
  steps = 3
  common = ['-dd', data_dir, *MODEL_FLAGS, '-bs', 16, '-te', 1, '--max_train_steps', steps,
            '--seed', 7, '-pmcp', start_checkpoint, '--nodump_train', '--hooks=',
            '--evaluate_in_eval_only']
  two_workers = tmp_path / 'cluster'
  results = _run_cluster(common + ['-md', two_workers / 'model', '--softmax_dir',
                                   two_workers / 'softmax', *CLUSTER_FLAGS], tmp_path, 'train')
  for rc, log in results:
    assert rc == 0, log[-3000:]
  assert 'global batch 16: 8 per replica, 2 replica(s) on 2 machines' in results[0][1]
  one = tmp_path / 'one'
  done = run_helpers.run_cifar_subprocess(*common, '-md', one / 'model', '--softmax_dir',
                                          one / 'softmax', '--cpu_replicas', 2)
  assert done.returncode == 0, done.stderr[-3000:]

  cluster_values = _model_values(str(two_workers / 'model'))
  one_values = _model_values(str(one / 'model'))
  assert set(cluster_values) == set(one_values)
  assert tf.train.latest_checkpoint(str(two_workers / 'model')).endswith(f'-{steps}')
  # The same training, up to float rounding (which BN over 8 images amplifies a little): the
  # two runs differ by a thousandth of what training changed.
  start = _model_values(start_checkpoint)
  update = math.sqrt(sum(float(np.sum((v - start[n]) ** 2)) for n, v in one_values.items()))
  difference = math.sqrt(sum(float(np.sum((cluster_values[n] - v) ** 2))
                             for n, v in one_values.items()))
  assert update > 0.1 and difference < 1e-3 * update, (difference, update)
  for name, value in one_values.items():
    np.testing.assert_allclose(cluster_values[name], value, atol=1e-4, rtol=1e-3, err_msg=name)

  # The chief evaluated once; a one-process evaluation of its checkpoint gives the same numbers.
  chief_eval = _evaluation(results[0][1])
  assert 'evaluation after cycle' not in results[1][1]
  reference = tmp_path / 'reference'
  check = run_helpers.run_cifar(*common[:-1], '-md', two_workers / 'model', '--eval_only',
                                '--evaluate_in_eval_only', '--softmax_dir', reference)
  for name in ('clf0/accuracy', 'clf1/accuracy', 'clf2/accuracy', 'clf2/accuracy_top_5'):
    assert chief_eval[name] == pytest.approx(float(check['eval'][name]), abs=1e-4)
  # Each worker dumped half of the validation split; the joined files are the one-process dump.
  assert _dump_bytes(str(two_workers / 'softmax')) == _dump_bytes(str(reference))
  manifest = dump_layout.read_manifest(str(two_workers / 'softmax'))
  assert manifest['exit_sources']['validation']['0']['made_of_parts'] == 2
  assert not os.path.exists(two_workers / 'softmax' / '.parts')


def _evaluation(log):
  line = [line for line in log.splitlines() if 'evaluation after cycle' in line][-1]
  return {k: float(v) for k, v in (kv.split('=') for kv in line.split(': ', 1)[1].split(', '))}


def test_independent_processes_dump_parts_that_join_into_the_one_process_dump(
    data_dir, start_checkpoint, tmp_path):
  model_dir = tmp_path / 'model'
  common = ['-dd', data_dir, *MODEL_FLAGS, '-bs', 10, '--eval_only', '-md', model_dir,
            '-pmcp', start_checkpoint, '--nodump_train']
  run_helpers.run_cifar(*common, '--softmax_dir', tmp_path / 'whole')
  parts = tmp_path / 'parts'
  # Three parts of 10 batches: 3 + 3 + 4; the middle one runs last and joins them.
  for index in (0, 2, 1):
    result = run_helpers.run_cifar(*common, '--softmax_dir', parts, '--num_workers', 3,
                                   '--worker_index', index)
    assert result['dumped']['validation'] == (NUM_VALIDATION if index == 1 else None)
  assert _dump_bytes(str(parts)) == _dump_bytes(str(tmp_path / 'whole'))
  # A rerun finds the split done.
  again = run_helpers.run_cifar(*common, '--softmax_dir', parts, '--num_workers', 3,
                                '--worker_index', 0)
  assert again['dumped']['validation'] == NUM_VALIDATION


def test_a_worker_that_dies_stops_the_other_and_a_rerun_resumes(data_dir, start_checkpoint,
                                                                tmp_path):
  model_dir = tmp_path / 'model'
  final_step = 40
  args = ['-dd', data_dir, *MODEL_FLAGS, '-bs', 16, '-te', 10, '--max_train_steps',
          final_step, '--seed', 3, '-pmcp', start_checkpoint, '--softmax_dir=', '--hooks=',
          '-md', model_dir, '--save_checkpoints_steps', 5, *CLUSTER_FLAGS]
  logs = [open(tmp_path / f'worker{i}.log', 'w+') for i in range(2)]   # noqa: SIM115
  configs = run_helpers.local_tf_configs(2)
  workers = [_start(args, config, log) for config, log in zip(configs, logs, strict=True)]
  try:
    deadline = time.time() + 240
    while time.time() < deadline and workers[1].poll() is None:
      latest = tf.train.latest_checkpoint(str(model_dir))
      if latest and int(latest.rsplit('-', 1)[1]) >= 5:
        workers[1].send_signal(signal.SIGKILL)
        break
      time.sleep(0.05)
    killed = time.time()
    rc = workers[0].wait(timeout=90)
    stopped_after = time.time() - killed
  finally:
    for worker in workers:
      worker.kill()
      worker.wait()
  logs[0].seek(0)
  chief_log = logs[0].read()
  for log in logs:
    log.close()
  assert rc == 1, chief_log[-3000:]
  last = chief_log.strip().splitlines()[-1]
  assert last.startswith('error: training across machines stopped: a worker of the cluster '), last
  assert "rerun every worker's command to resume from" in last
  assert stopped_after < 90
  resumed_from = int(tf.train.latest_checkpoint(str(model_dir)).rsplit('-', 1)[1])
  assert 5 <= resumed_from < final_step

  results = _run_cluster(args, tmp_path, 'rerun')
  for rc, log in results:
    assert rc == 0, log[-3000:]
  assert tf.train.latest_checkpoint(str(model_dir)).endswith(f'-{final_step}')


def test_a_worker_whose_peers_never_start_gives_up_in_time(data_dir, tmp_path):
  config = run_helpers.local_tf_configs(2)[0]
  start = time.time()
  log = open(tmp_path / 'alone.log', 'w+')   # noqa: SIM115
  with log:
    worker = _start(['-dd', data_dir, *MODEL_FLAGS, '-md', tmp_path / 'model', '-te', 1,
                     *CLUSTER_FLAGS, '--rendezvous_timeout_seconds', 3], config, log)
    rc = worker.wait(timeout=120)
    log.seek(0)
    text = log.read()
  assert rc == 1 and time.time() - start < 100
  assert text.strip().splitlines()[-1].startswith(
      'error: task 0 of the cluster: task(s) [1] (127.0.0.1:'), text[-2000:]
  assert 'did not start within --rendezvous_timeout_seconds 3' in text


@pytest.mark.parametrize('tf_config, extra, message', [
    ('{"cluster": ', (), 'TF_CONFIG is not valid JSON'),
    ('{"cluster": {"worker": ["127.0.0.1:2222"]}, "task": {"type": "worker", "index": 5}}', (),
     r"TF_CONFIG: this task's index 5 is outside the cluster's 1 worker task\(s\) \(0..0\)"),
    ('{"cluster": {"worker": ["127.0.0.1:2222"]}, "task": {"type": "ps", "index": 0}}', (),
     r"this task's type 'ps' is not a job of the cluster"),
    ('{"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}', (),
     r'must be a list of "host:port" strings'),
    ('{"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}, '
     '"task": {"type": "worker", "index": 0}}', ('--num_workers', 3),
     r'--num_workers 3 but TF_CONFIG has 2 tasks'),
    ('{"cluster": {"worker": ["127.0.0.1:2222"]}, "task": {"type": "worker", "index": 0}}',
     ('--cpu_replicas', 2), r'--cpu_replicas splits one machine'),
])
def test_bad_tf_config_is_one_clear_error_before_any_work(data_dir, tmp_path, monkeypatch,
                                                          tf_config, extra, message):
  monkeypatch.setenv('TF_CONFIG', tf_config)
  with pytest.raises(ValueError, match=message):
    run_helpers.run_cifar('-dd', data_dir, *MODEL_FLAGS, '-md', tmp_path / 'model',
                          *CLUSTER_FLAGS, *extra)
  assert not (tmp_path / 'model').exists()


def test_tf_config_without_the_strategy_flag_is_refused(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv('TF_CONFIG', run_helpers.local_tf_configs(2)[0])
  with pytest.raises(ValueError, match='pass --distribution_strategy multi_worker_mirrored'):
    run_helpers.run_cifar('-dd', data_dir, *MODEL_FLAGS, '-md', tmp_path / 'model')


def test_parts_without_a_cluster_need_eval_only_and_both_flags(data_dir, tmp_path):
  with pytest.raises(ValueError, match='--num_workers and --worker_index go together'):
    run_helpers.run_cifar('-dd', data_dir, *MODEL_FLAGS, '-md', tmp_path / 'm', '--eval_only',
                          '--num_workers', 2)
  with pytest.raises(ValueError, match='add --eval_only'):
    run_helpers.run_cifar('-dd', data_dir, *MODEL_FLAGS, '-md', tmp_path / 'm',
                          '--num_workers', 2, '--worker_index', 1)
  with pytest.raises(ValueError, match='--worker_index 2 must be below --num_workers 2'):
    run_helpers.run_cifar('-dd', data_dir, *MODEL_FLAGS, '-md', tmp_path / 'm', '--eval_only',
                          '--num_workers', 2, '--worker_index', 2)


def test_slurm_environment_becomes_the_cluster(monkeypatch):
  for name, value in {'SLURM_PROCID': '3', 'SLURM_STEP_NUM_TASKS': '4',
                      'SLURM_STEP_NODELIST': 'node[01-02]', 'SLURM_STEP_TASKS_PER_NODE': '2(x2)'
                      }.items():
    monkeypatch.setenv(name, value)
  cluster = distribution.read_tf_config(distribution.slurm_tf_config(port_base=9000))
  assert cluster.addresses == ['node01:9000', 'node01:9001', 'node02:9000', 'node02:9001']
  assert cluster.rank == 3 and not cluster.is_chief
  monkeypatch.delenv('SLURM_STEP_NODELIST')
  with pytest.raises(ValueError, match='SLURM_STEP_NODELIST not set; start every worker with '
                                       'srun'):
    distribution.slurm_tf_config(9000)


def test_cluster_ranks_put_the_chief_first():
  cluster = distribution.read_tf_config(json.dumps({
      'cluster': {'chief': ['a:1'], 'worker': ['b:2', 'c:3']},
      'task': {'type': 'worker', 'index': 1}}))
  assert cluster.addresses == ['a:1', 'b:2', 'c:3'] and cluster.rank == 2
