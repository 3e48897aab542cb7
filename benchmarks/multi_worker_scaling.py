"""Scaling across machines, on one box: two workers pinned to one core each against one worker.

Each worker is ``python cifar10_main.py`` pinned with ``taskset`` to its own core, with
single-threaded TensorFlow pools, on Fashion-MNIST in the CIFAR-10 format:

* dumps: the validation split's softmax of every exit of a CIFAR ResNet, by one process, and by
  two independent processes each dumping half (``--num_workers 2 --worker_index k``, the same
  code a cluster runs); throughput = images / the slower worker's dump time (target >= 1.8x);
* training: steps/s of one worker, and of a two-worker MultiWorkerMirroredStrategy cluster on
  127.0.0.1 with the same global batch (reported as measured: every step waits for an
  all-reduce over the loopback network, which a real cluster runs over its own).

Times come from the jobs' own log lines (the dump's images/s, the training hook's examples/s),
so TensorFlow's start-up is not counted. The first line names the machine.

    python benchmarks/multi_worker_scaling.py [--resnet_size 20] [--train_steps 60]
"""

import os
import re
import subprocess
import sys
import tempfile

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_REPO, os.path.join(_REPO, 'tests')]

import run_helpers  # noqa: E402

import prepare_fashion_mnist  # noqa: E402
from benchmarks import machine  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('resnet_size', 20, 'CIFAR ResNet depth (6n+2).')
flags.DEFINE_integer('batch_size', 64, 'Global batch size (dumps and training).')
flags.DEFINE_integer('validation_images', 10000, 'Images of the dumped split.')
flags.DEFINE_integer('train_steps', 60, 'Training steps per measurement.')
flags.DEFINE_string('work_dir', None, 'Scratch folder (default: a temporary folder).')

_DUMP_RATE = re.compile(r'dumped validation: (\d+) images, .*\(([\d.]+) images/s\)')
_TRAIN_RATE = re.compile(r'global step (\d+): ([\d.]+) examples/s')


def _run(args, core, tf_config=None):
  """Starts one job pinned to ``core``; returns the Popen (stderr captured)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=_REPO)
  env.pop('TF_CONFIG', None)
  if tf_config:
    env['TF_CONFIG'] = tf_config
  command = ['taskset', '-c', str(core), sys.executable, os.path.join(_REPO, 'cifar10_main.py'),
             '--intra_op_parallelism_threads', '1', '--inter_op_parallelism_threads', '1']
  return subprocess.Popen(command + [str(a) for a in args], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, cwd=_REPO)


def _finish(processes):
  logs = []
  for process in processes:
    _, log = process.communicate(timeout=1800)
    if process.returncode:
      sys.exit(f'a benchmark job failed:\n{log[-3000:]}')
    logs.append(log)
  return logs


def _dump_seconds(log):
  images, rate = map(float, _DUMP_RATE.search(log).groups())
  return images, images / rate


def _steps_per_second(log):
  """Median training rate after the first log interval (start-up excluded), in steps/s."""
  rates = [float(rate) for _, rate in _TRAIN_RATE.findall(log)][1:]
  if not rates:
    sys.exit('no training rate in the log: raise --train_steps')
  rates.sort()
  return rates[len(rates) // 2] / FLAGS.batch_size


def main(_):
  print(machine.describe())
  print(f'load average before: {os.getloadavg()[0]:.1f}')
  with tempfile.TemporaryDirectory(dir=FLAGS.work_dir) as root:
    data_dir = os.path.join(root, 'data')
    prepare_fashion_mnist.prepare(data_dir, fashion_mnist_dir=prepare_fashion_mnist.DEBIAN_DIR,
                                  train_limit=20 * FLAGS.batch_size,
                                  test_limit=FLAGS.validation_images, allow_install=False)
    model = ['-dd', data_dir, '-rs', FLAGS.resnet_size, '-rv', 2, '--classifier_id', 'all',
             '-bs', FLAGS.batch_size, '--hooks=', '--batch_norm_decay', 0.9]
    # A model to dump: a few training steps on one core.
    model_dir = os.path.join(root, 'model')
    _finish([_run(model + ['-md', model_dir, '-te', 1, '--max_train_steps', 5,
                           '--softmax_dir='], 0)])

    dump = model + ['-md', model_dir, '--eval_only', '--nodump_train']
    one_images, one_seconds = _dump_seconds(_finish([_run(
        dump + ['--softmax_dir', os.path.join(root, 'one')], 0)])[0])
    logs = _finish([_run(dump + ['--softmax_dir', os.path.join(root, 'two'), '--num_workers', 2,
                                 '--worker_index', k], k) for k in (0, 1)])
    parts = [_dump_seconds(log) for log in logs]
    two_seconds = max(seconds for _, seconds in parts)
    one_rate, two_rate = one_images / one_seconds, sum(i for i, _ in parts) / two_seconds

    train = model + ['-te', 100, '--max_train_steps', FLAGS.train_steps,
                     '--log_every_n_steps', 10, '--softmax_dir=', '--seed', 1]
    one_steps = _steps_per_second(_finish([_run(
        train + ['-md', os.path.join(root, 'train1')], 0)])[0])
    configs = run_helpers.local_tf_configs(2)
    logs = _finish([_run(train + ['-md', os.path.join(root, 'train2'),
                                  '--distribution_strategy', 'multi_worker_mirrored'], k,
                         configs[k]) for k in (0, 1)])
    two_steps = _steps_per_second(logs[0])
  print(f'load average after: {os.getloadavg()[0]:.1f}')
  print(f'CIFAR ResNet-{FLAGS.resnet_size} v2, all exits, global batch {FLAGS.batch_size}, '
        'one core per worker')
  print(f'{"":28} {"1 worker":>10} {"2 workers":>10} {"ratio":>7}')
  print(f'{"dump, images/s":28} {one_rate:10.1f} {two_rate:10.1f} {two_rate / one_rate:7.2f}')
  print(f'{"training, steps/s":28} {one_steps:10.2f} {two_steps:10.2f} '
        f'{two_steps / one_steps:7.2f}')
  print(f'summary: dumps {two_rate / one_rate:.2f}x with 2 workers (target >= 1.8x); training '
        f'{two_steps / one_steps:.2f}x')


if __name__ == '__main__':
  app.run(main)
