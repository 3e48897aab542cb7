"""Helpers shared by the run-loop tests: small Fashion-MNIST data, flag parsing, checkpoints.

The jobs run through ``cifar10_main.run_cifar`` with a fresh ``absl.flags.FlagValues`` each,
exactly as the command line would, or through ``python cifar10_main.py`` in a subprocess when a
job needs a fresh TensorFlow runtime (logical CPU devices) or has to be killed.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from absl import flags

import cifar10_main
import prepare_fashion_mnist

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_SCRIPT = os.path.join(REPO_DIR, 'cifar10_main.py')


def require_fashion_mnist():
  """The Fashion-MNIST source folder, or a skip that says how to install it."""
  folder = prepare_fashion_mnist.DEBIAN_DIR
  if prepare_fashion_mnist._missing_files(folder):
    pytest.skip(f'Fashion-MNIST is not in {folder}: apt-get install '
                f'{prepare_fashion_mnist.DEBIAN_PACKAGE}')
  return folder


def prepare_data(tmp_path_factory, train_limit, test_limit):
  """Writes the first Fashion-MNIST images in the CIFAR-10 binary format; returns data_dir."""
  source = require_fashion_mnist()
  data_dir = str(tmp_path_factory.mktemp('fashion_cifar'))
  prepare_fashion_mnist.prepare(data_dir, fashion_mnist_dir=source, train_limit=train_limit,
                                test_limit=test_limit, allow_install=False)
  return data_dir


def parse_cifar_flags(args):
  """A fresh FlagValues with the CIFAR flags, parsed from ``args`` (without the program name)."""
  flag_values = flags.FlagValues()
  cifar10_main.define_cifar_flags(flag_values)
  flag_values(['cifar10_main.py'] + [str(a) for a in args])
  return flag_values


def run_cifar(*args):
  """Runs one job in this process, as ``python cifar10_main.py <args>`` would."""
  return cifar10_main.run_cifar(parse_cifar_flags(args))


def run_cifar_subprocess(*args, timeout=300):
  """Runs ``python cifar10_main.py <args>`` in a fresh process; returns the CompletedProcess."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=REPO_DIR)
  return subprocess.run([sys.executable, MAIN_SCRIPT] + [str(a) for a in args], cwd=REPO_DIR,
                        env=env, capture_output=True, text=True, timeout=timeout, check=False)


def read_labels(data_dir, split):
  """The labels of a split read straight from its batch files, in record order: int32 [N]."""
  files = cifar10_main.get_filenames(split, data_dir)
  records = np.concatenate([np.fromfile(path, np.uint8) for path in files])
  return records.reshape(-1, cifar10_main.RECORD_BYTES)[:, 0].astype(np.int32)


def read_images(data_dir, split, count):
  """The first ``count`` images of a split, decoded and standardised as for evaluation.

  Returns:
    float32 [count, 32, 32, 3].
  """
  path = cifar10_main.get_filenames(split, data_dir)[0]
  raw = np.fromfile(path, np.uint8).reshape(-1, cifar10_main.RECORD_BYTES)[:count]
  with tf.Graph().as_default():
    records = tf.constant([row.tobytes() for row in raw])
    images = tf.map_fn(lambda r: cifar10_main.parse_record(r, False)[0], records,
                       fn_output_signature=tf.float32)
    with tf.Session() as sess:
      return sess.run(images)


def checkpoint_values(path):
  """Every variable of a checkpoint (prefix, or folder with a latest checkpoint) as numpy."""
  if os.path.isdir(path):
    path = tf.train.latest_checkpoint(path)
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def write_random_checkpoint(prefix, resnet_size=8, resnet_version=2, exits=(2,),
                            num_classes=cifar10_main.NUM_CLASSES, global_step=1234, seed=0):
  """Saves a CIFAR ResNet whose every variable holds random values (BN moving statistics too).

  Args:
    prefix: checkpoint prefix; the files are ``<prefix>-<global_step>.*``.
    resnet_size, resnet_version, exits, num_classes: the model and exits to build.
    global_step: the step recorded in the checkpoint.
    seed: random seed of the values.

  Returns:
    (the checkpoint prefix written, dict variable name -> numpy value).
  """
  rng = np.random.default_rng(seed)
  model = cifar10_main.Cifar10Model(resnet_size, resnet_version, 'channels_last',
                                    num_classes=num_classes)
  with tf.Graph().as_default():
    model(tf.zeros([1, cifar10_main.HEIGHT, cifar10_main.WIDTH, cifar10_main.NUM_CHANNELS]),
          training=True, exits=exits)
    step = tf.train.get_or_create_global_step()
    values = {}
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      for var in tf.global_variables():
        name = var.op.name
        shape = var.shape.as_list()
        if var is step:
          value = np.int64(global_step)
        elif name.endswith(('moving_variance', 'gamma')):
          # Positive, and far from the initial value 1 so a fresh variable cannot pass for it.
          value = rng.uniform(0.5, 3.0, shape).astype(np.float32)
        else:
          value = rng.normal(0.0, 0.3, shape).astype(np.float32)
        var.load(value, sess)
        values[name] = value
      path = tf.train.Saver().save(sess, prefix, global_step=global_step)
  return path, values


def local_tf_configs(count):
  """The TF_CONFIG of each worker of a ``count``-worker cluster on free ports of 127.0.0.1."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  workers = [f'127.0.0.1:{s.getsockname()[1]}' for s in sockets]
  for s in sockets:
    s.close()
  return [json.dumps({'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': i}})
          for i in range(count)]
