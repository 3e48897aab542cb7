"""What a benchmark ran on: the CPU, its vector and matrix extensions, and TensorFlow's kernels.

Figures of different machines, or of oneDNN on and off, are not comparable; every benchmark
prints this line first.
"""

import os
import platform

import cascade_export

# Extensions that decide TensorFlow's CPU speed and its oneDNN default (/proc/cpuinfo names).
_FEATURES = ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_int8')


def cpu_model():
  """The CPU's model name and the listed extensions it has, e.g. ('AMD EPYC', ['avx2', ...])."""
  name, flags = platform.processor() or platform.machine(), set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name' and name in ('', platform.machine()):
          name = value.strip()
        elif key.strip() == 'flags':
          flags = set(value.split())
  except OSError:
    pass
  return name, [feature for feature in _FEATURES if feature in flags]


def describe():
  """One line: CPU, extensions, cores, and the oneDNN setting with where it came from."""
  name, features = cpu_model()
  forced = os.environ.get('TF_ENABLE_ONEDNN_OPTS')
  source = f'TF_ENABLE_ONEDNN_OPTS={forced}' if forced is not None else 'TensorFlow default'
  return '{}, {} core(s), {}; oneDNN {} ({})'.format(
      name, os.cpu_count(), ' '.join(features) or 'no AVX2/AVX-512/AMX',
      'on' if cascade_export.onednn_enabled() else 'off', source)
