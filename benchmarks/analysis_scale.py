"""Wall time and peak memory of analyze_imagenet_labels.py on ImageNet-sized dumps.

Writes synthetic dumps (tests/synthetic_dumps.py) of the full ImageNet size by default,
3 exits x (1,281,167 train + 50,000 validation) x 1001 float32 = 15.6 GB, then:

1. times one plain read of every dump byte (16 MB ``readinto`` calls): the floor any analysis
   pays. The files were just written, so much of it may come from the page cache rather than
   the disk (caches cannot be dropped without root). It reads them again after the analysis,
   when they are surely cached, and compares the analysis with both reads.
2. runs the analysis command line in a child process and reports its wall time and peak resident
   memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which includes the pages of the memory-mapped
   chunks while they are mapped).

Targets at full size: peak RSS under 2 GB, wall time under 3 x the read time. The dumps are
deleted at the end (unless --keep).

    python benchmarks/analysis_scale.py                  # full size, ~16 GB in /tmp
    python benchmarks/analysis_scale.py --small          # a tenth
    python benchmarks/analysis_scale.py --dir /big/disk --train_rows 400000
"""

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from tqdm import tqdm

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, 'tests')]

import synthetic_dumps  # noqa: E402

FULL_TRAIN_ROWS = 1_281_167
FULL_VALIDATION_ROWS = 50_000
RSS_TARGET_BYTES = 2 * 1024**3
READ_BLOCK = 16 * 1024**2

flags.DEFINE_string('dir', None, 'Parent folder for the dumps (default: the system temp folder).')
flags.DEFINE_integer('train_rows', FULL_TRAIN_ROWS, 'Train images per exit.')
flags.DEFINE_integer('validation_rows', FULL_VALIDATION_ROWS, 'Validation images per exit.')
flags.DEFINE_integer('num_classes', synthetic_dumps.IMAGENET_CLASSES, 'Classes.')
flags.DEFINE_boolean('small', False, 'A tenth of the full size (overrides the row counts).')
flags.DEFINE_boolean('keep', False, 'Keep the dumps and the report.')
flags.DEFINE_integer('chunk_rows', None, 'Passed to the analysis (default: its own).')
flags.DEFINE_integer('num_threads', None, 'Passed to the analysis (default: its own).')

FLAGS = flags.FLAGS


def dump_bytes(train_rows, validation_rows, num_classes, num_exits=3):
  return (train_rows + validation_rows) * (num_exits * num_classes * 4 + 4)


def read_once(folder):
  """Reads every file under ``folder`` once with plain 16 MB reads; returns (bytes, seconds)."""
  paths = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
  buffer = bytearray(READ_BLOCK)
  total = 0
  start = time.perf_counter()
  for path in paths:
    with open(path, 'rb', buffering=0) as f:
      while True:
        got = f.readinto(buffer)
        if not got:
          break
        total += got
  return total, time.perf_counter() - start


def main(argv):
  del argv
  train_rows, validation_rows = FLAGS.train_rows, FLAGS.validation_rows
  if FLAGS.small:
    train_rows, validation_rows = FULL_TRAIN_ROWS // 10, FULL_VALIDATION_ROWS // 10
  parent = FLAGS.dir or tempfile.gettempdir()
  needed = dump_bytes(train_rows, validation_rows, FLAGS.num_classes)
  free = shutil.disk_usage(parent).free
  if free < needed + 2 * 1024**3:
    sys.exit(f'error: {parent} has {free / 1e9:.1f} GB free but the dumps need '
             f'{needed / 1e9:.1f} GB (+2 GB margin); use --small, fewer --train_rows, or '
             '--dir on a bigger disk')
  work = tempfile.mkdtemp(prefix='analysis_scale_', dir=parent)
  try:
    softmax_dir = os.path.join(work, 'output_softmax')
    print(f'Writing {needed / 1e9:.2f} GB of synthetic dumps ({train_rows:,} train + '
          f'{validation_rows:,} validation rows x 3 exits x {FLAGS.num_classes}) to {work}')
    start = time.perf_counter()
    with tqdm(total=train_rows + validation_rows, unit='rows', unit_scale=True) as bar:
      synthetic_dumps.write_synthetic_dumps(
          softmax_dir, {'validation': validation_rows, 'train': train_rows},
          num_classes=FLAGS.num_classes, progress=bar.update)
    write_seconds = time.perf_counter() - start

    read_bytes, read_seconds = read_once(softmax_dir)

    command = [sys.executable, os.path.join(_ROOT, 'analyze_imagenet_labels.py'),
               '--softmax_dir', softmax_dir, '--output_dir', os.path.join(work, 'report')]
    if FLAGS.chunk_rows:
      command += ['--chunk_rows', str(FLAGS.chunk_rows)]
    if FLAGS.num_threads:
      command += ['--num_threads', str(FLAGS.num_threads)]
    log_path = os.path.join(work, 'analysis.log')
    start = time.perf_counter()
    with open(log_path, 'w') as log:
      result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=_ROOT)
    analysis_seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_rss = usage.ru_maxrss * 1024                          # KiB on Linux
    cpu_seconds = usage.ru_utime + usage.ru_stime
    load = os.getloadavg()[0]
    with open(log_path) as log:
      output = log.read()
    if result.returncode:
      print(output[-5000:])
      sys.exit(f'error: the analysis failed with exit code {result.returncode}')
    read_again_bytes, read_again_seconds = read_once(softmax_dir)

    # Progress bars redraw with carriage returns: keep the last state of each line.
    lines = [line.split('\r')[-1] for line in output.splitlines()]
    print('\nAnalysis output (first lines):')
    print('\n'.join([line for line in lines if line.strip() and 'rows/s' not in line][:14]))
    ratio = analysis_seconds / read_seconds
    hot_ratio = analysis_seconds / read_again_seconds
    print(f'\ndump size            {read_bytes / 1e9:.2f} GB in {len(os.listdir(softmax_dir))} '
          'entries')
    print(f'write (generate)     {write_seconds:.1f} s')
    print(f'read once, 16 MB     {read_seconds:.1f} s  ({read_bytes / read_seconds / 1e9:.2f} '
          f'GB/s; after the analysis: {read_again_seconds:.1f} s, '
          f'{read_again_bytes / read_again_seconds / 1e9:.2f} GB/s)')
    print(f'analysis wall time   {analysis_seconds:.1f} s  = {ratio:.2f} x the first read, '
          f'{hot_ratio:.2f} x the read after it (target < 3: '
          f'{"met" if ratio < 3 else "NOT met"} / {"met" if hot_ratio < 3 else "NOT met"})')
    print(f'analysis CPU time    {cpu_seconds:.1f} s (user + system, all threads); load average '
          f'{load:.1f} on {os.cpu_count()} cores at the end (other jobs slow the wall time)')
    print(f'analysis peak RSS    {peak_rss / 1024**3:.2f} GiB (target < 2 GiB: '
          f'{"met" if peak_rss < RSS_TARGET_BYTES else "NOT met"})')
  finally:
    if FLAGS.keep:
      print(f'Kept {work}')
    else:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
