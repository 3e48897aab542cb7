"""Devices and distribution strategies: what a run replicates over, checked against the machine.

One device (a GPU if there is one), ``MirroredStrategy`` over several GPUs, or over logical
devices split off the CPU (``--cpu_replicas``) to exercise the multi-replica code without GPUs;
or ``MultiWorkerMirroredStrategy`` over the machines of a cluster (``TF_CONFIG``, or SLURM's
environment), each with its own devices.
"""

import contextlib
import dataclasses
import json
import os
import re
import socket
import threading
import time

import tensorflow as tf2
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


def distribution_strategy(devices, force_mirrored=False):
  """OneDeviceStrategy for one device (unless ``force_mirrored``), else MirroredStrategy."""
  if len(devices) == 1 and not force_mirrored:
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


################################################################################
# Several machines: MultiWorkerMirroredStrategy over the cluster of TF_CONFIG (or SLURM).
################################################################################
@dataclasses.dataclass(frozen=True)
class Cluster:
  """This process's place in a multi-worker cluster, as TF_CONFIG describes it."""
  jobs: dict          # 'chief' / 'worker' -> list of 'host:port', as in TF_CONFIG
  task_type: str      # this process's job
  task_index: int     # its index in that job

  @property
  def addresses(self):
    """Every task's address, in rank order: the chief (if any) first, then the workers."""
    return list(self.jobs.get('chief', [])) + list(self.jobs.get('worker', []))

  @property
  def num_workers(self):
    return len(self.addresses)

  @property
  def rank(self):
    """0..num_workers-1; rank 0 (the chief, or worker 0 without one) writes checkpoints."""
    chiefs = len(self.jobs.get('chief', []))
    return self.task_index if self.task_type == 'chief' else chiefs + self.task_index

  @property
  def is_chief(self):
    return self.rank == 0


def read_tf_config(text, source='TF_CONFIG'):
  """Parses and checks a TF_CONFIG, before TensorFlow does (its errors name neither the variable
  nor the fix, and some mistakes it accepts silently).

  Args:
    text: the JSON text.
    source: where it came from, for the messages.

  Returns:
    The Cluster.
  """
  fix = ('e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": '
         '"worker", "index": 0}}, the same cluster on every machine and each its own index')
  try:
    config = json.loads(text)
  except ValueError as e:
    raise ValueError(f'{source} is not valid JSON ({e}); set it to {fix}') from None
  cluster, task = (config.get('cluster'), config.get('task')) if isinstance(config, dict) \
      else (None, None)
  if not isinstance(cluster, dict) or not isinstance(task, dict):
    raise ValueError(f'{source} needs a "cluster" and a "task": {fix}')
  unknown = sorted(set(cluster) - {'chief', 'worker'})
  if unknown or not cluster.get('worker') and not cluster.get('chief'):
    raise ValueError(f'{source}: multi_worker_mirrored needs "worker" tasks (and at most one '
                     f'"chief"), got jobs {sorted(cluster)}; {fix}')
  for job, addresses in cluster.items():
    if not isinstance(addresses, list) or not all(
        isinstance(a, str) and re.fullmatch(r'\[?[\w.:-]+\]?:\d+', a) for a in addresses):
      raise ValueError(f'{source}: the {job} tasks must be a list of "host:port" strings, got '
                       f'{addresses!r}')
  if len(cluster.get('chief', [])) > 1:
    raise ValueError(f'{source}: at most one "chief", got {len(cluster["chief"])}')
  task_type, task_index = task.get('type'), task.get('index')
  if task_type not in cluster:
    raise ValueError(f'{source}: this task\'s type {task_type!r} is not a job of the cluster '
                     f'({sorted(cluster)}); set "task": {{"type": "worker", "index": N}}')
  if not isinstance(task_index, int) or not 0 <= task_index < len(cluster[task_type]):
    raise ValueError(f'{source}: this task\'s index {task_index!r} is outside the cluster\'s '
                     f'{len(cluster[task_type])} {task_type} task(s) (0..'
                     f'{len(cluster[task_type]) - 1})')
  return Cluster(jobs={job: list(a) for job, a in cluster.items()}, task_type=task_type,
                 task_index=task_index)


def slurm_tf_config(port_base):
  """The TF_CONFIG of this SLURM task (srun's environment), one worker per task.

  Uses TensorFlow's SlurmClusterResolver, which reads SLURM_PROCID, SLURM_STEP_NUM_TASKS,
  SLURM_STEP_NODELIST and SLURM_STEP_TASKS_PER_NODE (it calls no SLURM command). It is told one
  "GPU" per task so that it neither runs nvidia-smi nor hides devices: each worker still uses its
  own --num_gpus.
  """
  from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver
  missing = [v for v in ('SLURM_PROCID', 'SLURM_STEP_NUM_TASKS', 'SLURM_STEP_NODELIST',
                         'SLURM_STEP_TASKS_PER_NODE') if v not in os.environ]
  if missing:
    raise ValueError(f'--cluster_resolver slurm: {", ".join(missing)} not set; start every '
                     'worker with srun (one task per worker), or use --cluster_resolver tf_config')
  tasks_per_node = max(slurm_cluster_resolver.expand_tasks_per_node(
      os.environ['SLURM_STEP_TASKS_PER_NODE']))
  resolver = slurm_cluster_resolver.SlurmClusterResolver(
      port_base=port_base, gpus_per_node=tasks_per_node, gpus_per_task=1, auto_set_gpu=False)
  return json.dumps({'cluster': resolver.cluster_spec().as_dict(),
                     'task': {'type': resolver.task_type, 'index': resolver.task_id}})


def _host_port(address):
  host, _, port = address.rpartition(':')
  return host.strip('[]'), int(port)


def rendezvous(cluster, timeout_seconds):
  """Waits until every task of the cluster has started, or stops with one clear error.

  MultiWorkerMirroredStrategy() waits forever, inside TensorFlow and beyond the reach of signals
  and timers, for a worker that never starts. So before it, each task listens on its own
  TF_CONFIG port with a plain socket and knocks on every other task's; it goes on once it has
  reached every peer and every peer has reached it. Then it closes the port for TensorFlow.
  """
  addresses, me = cluster.addresses, cluster.rank
  peers = set(range(len(addresses))) - {me}
  if not peers:
    return
  listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    listener.bind(('', _host_port(addresses[me])[1]))
  except OSError as e:
    raise ValueError(f'task {me} of TF_CONFIG cannot listen on its address {addresses[me]} ({e}): '
                     'another process holds the port, or the address is another machine\'s') from e
  listener.listen(len(addresses))
  listener.settimeout(0.2)
  knocked_by, reached = set(), set()
  done = threading.Event()

  def answer():
    while not done.is_set():
      try:
        connection, _ = listener.accept()
      except TimeoutError:
        continue
      except OSError:
        return
      with connection, contextlib.suppress(OSError, ValueError):
        connection.settimeout(5)
        peer = int(connection.makefile().readline())
        connection.sendall(b'ok\n')
        connection.recv(1)   # the knocker closes first: no TIME_WAIT on this port
        knocked_by.add(peer)

  thread = threading.Thread(target=answer, daemon=True)
  thread.start()
  deadline = time.monotonic() + timeout_seconds
  try:
    while not (reached >= peers and knocked_by >= peers):
      for peer in sorted(peers - reached):
        with contextlib.suppress(OSError), socket.create_connection(
            _host_port(addresses[peer]), timeout=1) as connection:
          connection.sendall(f'{me}\n'.encode())
          connection.settimeout(5)
          if connection.recv(3).startswith(b'ok'):
            reached.add(peer)
      if time.monotonic() > deadline:
        missing = sorted(peers - (reached & knocked_by))
        where = ', '.join(addresses[m] for m in missing)
        raise ValueError(
            f'task {me} of the cluster: task(s) {missing} ({where}) did not start within '
            f'--rendezvous_timeout_seconds {timeout_seconds:g}; start every worker\'s command '
            '(each with its own TF_CONFIG task), or check the addresses')
      time.sleep(0.1)
  finally:
    done.set()
    thread.join()
    listener.close()
  logging.info('cluster: all %d tasks are up', len(addresses))


def multi_worker_strategy(timeout_seconds):
  """MultiWorkerMirroredStrategy whose collectives give up after ``timeout_seconds``.

  Must be the first thing that starts TensorFlow's runtime in the process. A worker that dies
  makes the others' next all-reduce fail; the Estimator's session would treat that as a
  preemption and wait for the cluster to come back forever, so such errors are made fatal here,
  and the run loop turns them into one clear error (rerun every worker to resume).
  """
  from tensorflow.python.training import monitored_session
  monitored_session._PREEMPTION_ERRORS = ()   # noqa: SLF001 -- no public switch in TF 2.15
  # TensorFlow 2's class: the compat.v1 one has no communication options (no timeout).
  options = tf2.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
  return tf2.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def cluster_of(flags_obj):
  """The cluster a run trains across (None for one machine), checked against the flags.

  Checked before any work: a TF_CONFIG that does not parse, names this task outside the cluster,
  or disagrees with the flags is one clear error.
  """
  text = os.environ.get('TF_CONFIG')
  if flags_obj.distribution_strategy != 'multi_worker_mirrored':
    if text:
      raise ValueError(f'TF_CONFIG is set (a cluster) but --distribution_strategy is '
                       f'{flags_obj.distribution_strategy}: pass --distribution_strategy '
                       'multi_worker_mirrored to train across its machines, or unset TF_CONFIG')
    return None
  if flags_obj.cluster_resolver == 'slurm':
    if text:
      raise ValueError('--cluster_resolver slurm builds TF_CONFIG from SLURM\'s environment, '
                       'but TF_CONFIG is set too: unset it, or use --cluster_resolver tf_config')
    text = slurm_tf_config(flags_obj.slurm_port_base)
    os.environ['TF_CONFIG'] = text   # The Estimator reads the cluster from it, too.
  elif not text:
    raise ValueError('--distribution_strategy multi_worker_mirrored needs the cluster in '
                     'TF_CONFIG (see README: "Several machines"), or --cluster_resolver slurm '
                     'under srun')
  cluster = read_tf_config(text)
  problems = []
  if flags_obj.cpu_replicas > 1:
    problems.append('--cpu_replicas splits one machine; each worker of a cluster runs one CPU '
                    'replica (or its --num_gpus GPUs)')
  if flags_obj.num_workers is not None and flags_obj.num_workers != cluster.num_workers:
    problems.append(f'--num_workers {flags_obj.num_workers} but TF_CONFIG has '
                    f'{cluster.num_workers} tasks')
  if flags_obj.worker_index is not None and flags_obj.worker_index != cluster.rank:
    problems.append(f'--worker_index {flags_obj.worker_index} but this is task {cluster.rank} '
                    'of TF_CONFIG')
  if flags_obj.stop_threshold is not None:
    problems.append('--stop_threshold needs evaluations between training cycles, and the '
                    'workers of a cluster train straight to the end')
  if flags_obj.clean:
    problems.append('--clean would let one worker delete the folder the others write: delete '
                    '--model_dir before starting the workers')
  if problems:
    raise ValueError('multi_worker_mirrored: ' + '; '.join(problems))
  return cluster


def dump_part(flags_obj, cluster):
  """(part, number of parts) of the dumps this process writes, or None for a whole dump."""
  if cluster is not None:
    return (cluster.rank, cluster.num_workers) if cluster.num_workers > 1 else None
  if flags_obj.num_workers is None and flags_obj.worker_index is None:
    return None
  if flags_obj.num_workers is None or flags_obj.worker_index is None:
    raise ValueError('--num_workers and --worker_index go together: process k of n dumps part k '
                     'of each split, e.g. --num_workers 4 --worker_index $SLURM_ARRAY_TASK_ID')
  if not flags_obj.worker_index < flags_obj.num_workers:
    raise ValueError(f'--worker_index {flags_obj.worker_index} must be below --num_workers '
                     f'{flags_obj.num_workers}')
  if not flags_obj.eval_only:
    raise ValueError('--num_workers/--worker_index without a cluster shard the dumps of '
                     'independent processes: add --eval_only (to train across machines use '
                     '--distribution_strategy multi_worker_mirrored)')
  return flags_obj.worker_index, flags_obj.num_workers


def make_strategy(flags_obj, devices, cluster):
  """The run's distribution strategy, created once: over ``devices``, or across the cluster."""
  if cluster is None:
    return distribution_strategy(devices, force_mirrored=(
        flags_obj.distribution_strategy == 'mirrored'))
  gpus = tf.config.list_physical_devices('GPU')
  if gpus:
    # Each worker replicates over its own --num_gpus GPUs, not over all it has.
    tf.config.set_visible_devices(gpus[:sum('gpu' in d for d in devices)], 'GPU')
  rendezvous(cluster, flags_obj.rendezvous_timeout_seconds)
  strategy = multi_worker_strategy(flags_obj.collective_timeout_seconds)
  logging.info('cluster: task %d of %d (%s), %d replicas in all', cluster.rank,
               cluster.num_workers, 'chief' if cluster.is_chief else 'worker',
               strategy.num_replicas_in_sync)
  return strategy


@contextlib.contextmanager
def without_tf_config():
  """Hides TF_CONFIG while building a RunConfig for this process alone (evaluation, dumps)."""
  saved = os.environ.pop('TF_CONFIG', None)
  try:
    yield
  finally:
    if saved is not None:
      os.environ['TF_CONFIG'] = saved


def check_bfloat16_runs(device):
  """Raises one clear error if ``device`` cannot run the model's ops in bfloat16."""
  with tf.Graph().as_default(), tf.device(device):
    images = tf.ones([1, 8, 8, 3], tf.bfloat16)
    features = tf.nn.conv2d(images, tf.ones([3, 3, 3, 4], tf.bfloat16), 1, 'SAME')
    features, _, _ = tf.nn.fused_batch_norm(features, tf.ones([4]), tf.zeros([4]),
                                            tf.zeros([4]), tf.ones([4]), is_training=False)
    logits = tf.matmul(tf.reshape(features, [1, -1]), tf.ones([256, 2], tf.bfloat16))
    try:
      with tf.Session() as sess:
        sess.run(logits)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
            tf.errors.UnimplementedError) as e:
      raise ValueError(f'--dtype bf16: TensorFlow cannot run bfloat16 convolutions, batch norms '
                       f'or matrix products on {device} ({e.message.splitlines()[0]}); use '
                       '--dtype fp32 (or fp16 on a GPU)') from None
