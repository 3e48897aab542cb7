"""Devices and distribution strategies: what a run replicates over, checked against the machine.

One device (a GPU if there is one), ``MirroredStrategy`` over several GPUs, or over logical
devices split off the CPU (``--cpu_replicas``) to exercise the multi-replica code without GPUs.
"""

import tensorflow.compat.v1 as tf
from absl import logging


def configure_cpu_replicas(count):
  """Splits the CPU into ``count`` logical devices, so MirroredStrategy can run on a CPU."""
  if count <= 1:
    return
  cpu = tf.config.list_physical_devices('CPU')[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if current is not None and len(current) == count:
    return  # Split by an earlier job of this process.
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
  except RuntimeError as e:
    raise RuntimeError(
        f'--cpu_replicas {count} has to split the CPU before TensorFlow starts its runtime, and '
        f'this process has already started it ({e}); run the job in a fresh process, e.g. '
        f'python cifar10_main.py ... --cpu_replicas {count}') from e


def replica_devices(flags_obj):
  """Devices to replicate over, after checking the request against the machine."""
  gpus = tf.config.list_physical_devices('GPU')
  if flags_obj.cpu_replicas > 1:
    return [f'/cpu:{i}' for i in range(flags_obj.cpu_replicas)]
  num_gpus = len(gpus) if flags_obj.num_gpus == -1 else flags_obj.num_gpus
  if num_gpus > len(gpus):
    if not gpus:
      raise ValueError(
          f'--num_gpus {flags_obj.num_gpus}: TensorFlow finds no GPU on this machine; pass '
          '--num_gpus 0 to run on the CPU, or install tensorflow[and-cuda]==2.15.1 if it has '
          'GPUs')
    raise ValueError(
        f'--num_gpus {flags_obj.num_gpus} asks for more GPUs than this machine has '
        f'({len(gpus)}); pass --num_gpus {len(gpus)}, or --num_gpus 0 to run on the CPU')
  if num_gpus == 0:
    return ['/cpu:0']
  return [f'/gpu:{i}' for i in range(num_gpus)]


def distribution_strategy(devices):
  """OneDeviceStrategy for one device, else MirroredStrategy over ``devices``."""
  if len(devices) == 1:
    return tf.distribute.OneDeviceStrategy(devices[0])
  cross_device_ops = None
  if not all('gpu' in d for d in devices):
    # MirroredStrategy's default for CPU devices, collective all-reduce, never returns from
    # the first training step of a graph-mode Estimator (TF 2.15, logical CPU devices, even
    # for a one-variable model). Reducing on one device works.
    cross_device_ops = tf.distribute.ReductionToOneDevice()
  return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)


def resolve_data_format(requested, devices):
  """channels_first needs a GPU; fall back to channels_last (same variables) on a CPU."""
  on_gpu = any('gpu' in d for d in devices)
  if requested is None:
    return 'channels_first' if on_gpu else 'channels_last'
  if requested == 'channels_first' and not on_gpu:
    logging.warning('--data_format channels_first needs a GPU; running channels_last on this '
                    'CPU-only run (the variables and results are the same)')
    return 'channels_last'
  return requested
