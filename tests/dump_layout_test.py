"""Tests of dump_layout: streamed .npy files, resumable split dumps, concurrent dumps, manifest."""

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import dump_layout
import dump_writer

NUM_CLASSES = 7
COMMON = {'num_classes': NUM_CLASSES, 'num_exits': 3, 'stage_macs': [1, 2, 3], 'plain_macs': 5,
          'checkpoint': 'model/ckpt-10', 'global_step': 10}


def _batches(seed=0, sizes=(5, 3, 8, 1, 6)):
  """Deterministic dump batches: [(labels int32 [n], {exit: float32 [n, C]})]."""
  rng = np.random.RandomState(seed)
  out = []
  for n in sizes:
    probabilities = {}
    for e in range(3):
      p = rng.rand(n, NUM_CLASSES).astype(np.float32)
      probabilities[e] = p / p.sum(axis=1, keepdims=True)
    out.append((rng.randint(0, NUM_CLASSES, n).astype(np.int32), probabilities))
  return out


def _only(probabilities, exits):
  return {e: probabilities[e] for e in exits}


def _folder_bytes(folder):
  contents = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        contents[os.path.relpath(path, folder)] = f.read()
  return contents


def _straight_dump(folder, exits=(0, 1, 2), batches=None):
  dump = dump_writer.SplitDump(folder, 'validation', exits, NUM_CLASSES, 'job')
  for labels, probabilities in batches or _batches():
    dump.write(labels, _only(probabilities, exits))
  return dump.finish(COMMON)


# -------------------------------------------------------------------------------------------------
# NpyRowWriter.


def test_rows_streamed_in_blocks_make_a_real_npy_file(tmp_path):
  path = str(tmp_path / 'validation' / 'clf0_probabilities.npy')
  writer = dump_writer.NpyRowWriter(path, np.float32, (3,))
  blocks = [np.random.RandomState(i).rand(n, 3) for i, n in enumerate((4, 0, 7))]
  for block in blocks:
    writer.write(block)
  assert not os.path.exists(path) and os.path.exists(writer.partial_path)
  assert dump_layout.partial_target(os.path.basename(writer.partial_path)) == os.path.basename(
      path)
  writer.close()
  loaded = np.load(path, mmap_mode='r')
  assert loaded.shape == (11, 3) and loaded.dtype == np.float32
  np.testing.assert_array_equal(loaded, np.concatenate(blocks).astype(np.float32))
  assert os.listdir(tmp_path / 'validation') == ['clf0_probabilities.npy']


def test_aborted_writer_leaves_nothing(tmp_path):
  path = str(tmp_path / 'labels.npy')
  writer = dump_writer.NpyRowWriter(path, np.int32)
  writer.write(np.arange(5))
  writer.abort()
  assert os.listdir(tmp_path) == []


def test_wrong_row_shape_is_refused(tmp_path):
  writer = dump_writer.NpyRowWriter(str(tmp_path / 'x.npy'), np.float32, (10,))
  with pytest.raises(ValueError, match=r'expected rows of shape \(10,\)'):
    writer.write(np.zeros((2, 11)))
  writer.abort()


def test_partial_names_map_to_the_file_they_become():
  target = dump_layout.partial_target
  assert target('labels.npy.partial') == 'labels.npy'
  assert target('labels.npy.4711-ab12cd34.partial') == 'labels.npy'
  assert target('clf2_probabilities.npy.job-3.a.partial') == 'clf2_probabilities.npy'
  assert target('manifest.json.x1y2.partial') == 'manifest.json'
  assert target('labels.npy') is None and target('job.lock') is None


def test_two_writers_of_one_file_do_not_clash(tmp_path):
  """Issue #17a: both wrote labels.npy.partial and the second close() found it gone."""
  path = str(tmp_path / 'labels.npy')
  first = dump_writer.NpyRowWriter(path, np.int32)
  second = dump_writer.NpyRowWriter(path, np.int32)
  first.write(np.arange(3))
  second.write(np.arange(10, 15))
  first.close()
  np.testing.assert_array_equal(np.load(path), [0, 1, 2])
  second.close()
  np.testing.assert_array_equal(np.load(path), [10, 11, 12, 13, 14])
  assert os.listdir(tmp_path) == ['labels.npy']


class _FullDisk:
  """A file whose writes and close fail with ENOSPC, as on a full disk (close really closes)."""

  def __init__(self, real):
    self._real = real

  def __getattr__(self, name):
    return getattr(self._real, name)

  def write(self, data):
    raise OSError(errno.ENOSPC, 'No space left on device')

  def flush(self):
    raise OSError(errno.ENOSPC, 'No space left on device')

  def close(self):
    self._real.close()
    raise OSError(errno.ENOSPC, 'No space left on device')


def test_abort_removes_the_partial_file_when_closing_fails(tmp_path):
  """Issue #17b: abort() called close(), which raised ENOSPC again before os.remove."""
  writer = dump_writer.NpyRowWriter(str(tmp_path / 'labels.npy'), np.int32)
  writer._file = _FullDisk(writer._file)
  with pytest.raises(OSError, match='No space left'):
    writer.write(np.arange(5))
  writer.abort()   # must not raise
  assert os.listdir(tmp_path) == []


def test_close_on_a_full_disk_leaves_nothing(tmp_path):
  writer = dump_writer.NpyRowWriter(str(tmp_path / 'labels.npy'), np.int32)
  writer.write(np.arange(5))
  writer._file = _FullDisk(writer._file)
  with pytest.raises(OSError, match='No space left'):
    writer.close()
  assert os.listdir(tmp_path) == []


def test_split_dump_on_a_full_disk_leaves_nothing(tmp_path):
  dump = dump_writer.SplitDump(str(tmp_path), 'validation', [0, 1], NUM_CLASSES, 'job')
  labels, probabilities = _batches()[0]
  dump.write(labels, _only(probabilities, [0, 1]))
  for writer in dump._writers.values():
    writer._file = _FullDisk(writer._file)
  with pytest.raises(OSError, match='No space left'):
    dump.finish(COMMON)
  dump.abort()   # again, as a caller's except clause would: never raises
  assert os.listdir(tmp_path / 'validation') == []
  assert not os.path.exists(dump_layout.manifest_path(str(tmp_path)))


@pytest.fixture
def tiny_disk(tmp_path):
  """A 64 KiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
  mount_point = tmp_path / 'tiny'
  mount_point.mkdir()
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(mount_point)],
                          capture_output=True, text=True, check=False)
  if result.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')
  try:
    yield mount_point
  finally:
    subprocess.run(['umount', str(mount_point)], check=False)


def test_a_really_full_disk_leaves_no_partial_file(tiny_disk):
  writer = dump_writer.NpyRowWriter(str(tiny_disk / 'labels.npy'), np.int32)
  with pytest.raises(OSError) as raised:
    for _ in range(100_000):
      writer.write(np.arange(100))   # 400 bytes at a time: the buffer holds some when it fails
  assert raised.value.errno == errno.ENOSPC
  writer.abort()
  assert os.listdir(tiny_disk) == []


# -------------------------------------------------------------------------------------------------
# The manifest.


def test_manifest_keeps_every_exit_and_the_run_that_wrote_it(tmp_path):
  folder = str(tmp_path)
  model = {'num_classes': 1001, 'stage_macs': [1, 2, 3]}
  dump_layout.merge_manifest(folder, 'validation', 50, [2],
                             dict(model, checkpoint='clf2/ckpt-0', global_step=0,
                                  pretrained_global_step=7))
  manifest = dump_layout.merge_manifest(folder, 'validation', 50, [0],
                                        dict(model, checkpoint='clf0/ckpt-9', global_step=9))
  assert manifest == dump_layout.read_manifest(folder)
  assert manifest['splits'] == {'validation': {'num_images': 50, 'exits': [0, 2]}}
  assert manifest['exit_sources']['validation'] == {
      '2': {'checkpoint': 'clf2/ckpt-0', 'global_step': 0, 'pretrained_global_step': 7},
      '0': {'checkpoint': 'clf0/ckpt-9', 'global_step': 9}}
  # The top level describes the latest run only; nothing of the older run lingers there.
  assert manifest['checkpoint'] == 'clf0/ckpt-9'
  assert 'pretrained_global_step' not in manifest
  assert os.listdir(folder) == ['manifest.json']   # no lock or temporary file stays
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(dump_layout.manifest_path(folder)).st_mode & 0o777 == 0o666 & ~umask


def _merge_one_exit(folder, exit_id, barrier):
  barrier.wait()
  dump_layout.merge_manifest(folder, 'validation', 20, [exit_id],
                             dict(COMMON, checkpoint=f'clf{exit_id}'))


def test_concurrent_manifest_merges_lose_no_exit(tmp_path):
  """Issue #17a: two processes merging at once lost one exit in 40 of 40 trials."""
  context = multiprocessing.get_context('fork')
  writers = 6
  for trial in range(25):
    folder = str(tmp_path / f'trial{trial}')
    os.makedirs(folder)
    barrier = context.Barrier(writers)
    processes = [context.Process(target=_merge_one_exit, args=(folder, e, barrier))
                 for e in range(writers)]
    for p in processes:
      p.start()
    for p in processes:
      p.join(60)
    assert [p.exitcode for p in processes] == [0] * writers, f'trial {trial}: a merge failed'
    manifest = dump_layout.read_manifest(folder)
    assert manifest['splits']['validation']['exits'] == list(range(writers)), f'trial {trial}'
    assert sorted(manifest['exit_sources']['validation']) == [str(e) for e in range(writers)]
    assert os.listdir(folder) == ['manifest.json']


def test_malformed_manifest_is_one_clear_error(tmp_path):
  path = dump_layout.manifest_path(str(tmp_path))
  with open(path, 'w') as f:
    f.write('{"splits": {"validation": \n')
  with pytest.raises(dump_layout.DumpError, match=rf'{path} is not valid JSON .*line 2.*: it is '
                                                 r'damaged.*re-run the dumps'):
    dump_layout.read_manifest(str(tmp_path))
  with open(path, 'w') as f:
    f.write('[1, 2]')
  with pytest.raises(dump_layout.DumpError, match='holds a JSON list, not the manifest'):
    dump_layout.merge_manifest(str(tmp_path), 'validation', 1, [0], COMMON)


# -------------------------------------------------------------------------------------------------
# SplitDump: resumable, and safe beside other dumps.


def test_split_dump_writes_the_layout(tmp_path):
  folder = str(tmp_path)
  batches = _batches()
  assert _straight_dump(folder, batches=batches) == 23
  labels = np.load(dump_layout.labels_path(folder, 'validation'))
  np.testing.assert_array_equal(labels, np.concatenate([b[0] for b in batches]))
  for e in range(3):
    np.testing.assert_array_equal(np.load(dump_layout.probabilities_path(folder, 'validation', e)),
                                  np.concatenate([b[1][e] for b in batches]))
  assert sorted(os.listdir(tmp_path / 'validation')) == [
      'clf0_probabilities.npy', 'clf1_probabilities.npy', 'clf2_probabilities.npy', 'labels.npy']
  manifest = dump_layout.read_manifest(folder)
  assert manifest['splits'] == {'validation': {'num_images': 23, 'exits': [0, 1, 2]}}


def test_killed_dump_resumes_byte_identical(tmp_path):
  """Issue #17c: a killed dump redid everything; now it continues after the committed rows."""
  batches = _batches()
  _straight_dump(str(tmp_path / 'straight'), batches=batches)

  folder = str(tmp_path / 'resumed')
  dump = dump_writer.SplitDump(folder, 'validation', [0, 1, 2], NUM_CLASSES, 'job')
  assert dump.rows_done == 0
  for labels, probabilities in batches[:2]:
    dump.write(labels, probabilities)
  dump.commit()
  assert dump.rows_done == 8
  dump.write(*batches[2])        # written, never committed: lost with the kill
  del dump                       # the kill: no finish(), no abort()

  dump = dump_writer.SplitDump(folder, 'validation', [0, 1, 2], NUM_CLASSES, 'job')
  assert dump.rows_done == 8
  for labels, probabilities in batches[2:]:
    dump.write(labels, probabilities)
  assert dump.finish(COMMON) == 23
  assert _folder_bytes(folder) == _folder_bytes(str(tmp_path / 'straight'))


_KILLED_CHILD = '''
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
sys.path.insert(0, {root!r})
import dump_writer
import dump_layout_test as t
batches = t._batches()
dump = dump_writer.SplitDump({folder!r}, 'validation', [0, 2], t.NUM_CLASSES, 'job-a')
for labels, probabilities in batches[:3]:
  dump.write(labels, t._only(probabilities, [0, 2]))
dump.commit()
dump.write(batches[3][0], t._only(batches[3][1], [0, 2]))
os.kill(os.getpid(), signal.SIGKILL)
'''


def test_sigkill_after_commit_keeps_every_committed_row(tmp_path):
  folder = str(tmp_path / 'resumed')
  tests = os.path.dirname(os.path.abspath(__file__))
  code = _KILLED_CHILD.format(tests=tests, root=os.path.dirname(tests), folder=folder)
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == -signal.SIGKILL, result.stderr
  assert any(n.endswith('.partial') for n in os.listdir(os.path.join(folder, 'validation')))

  dump = dump_writer.SplitDump(folder, 'validation', [0, 2], NUM_CLASSES, 'job-a')
  assert dump.rows_done == 16    # the killed process held the lock: the kernel released it
  for labels, probabilities in _batches()[3:]:
    dump.write(labels, _only(probabilities, [0, 2]))
  dump.finish(COMMON)
  _straight_dump(str(tmp_path / 'straight'), exits=(0, 2))
  assert _folder_bytes(folder) == _folder_bytes(str(tmp_path / 'straight'))


def test_resume_with_damaged_partial_files_starts_again(tmp_path):
  folder = str(tmp_path)
  dump = dump_writer.SplitDump(folder, 'validation', [1], NUM_CLASSES, 'job')
  dump.write(_batches()[0][0], _only(_batches()[0][1], [1]))
  dump.commit()
  del dump
  partial = dump_layout.probabilities_path(folder, 'validation', 1) + '.job.partial'
  with open(partial, 'r+b') as f:
    f.truncate(200)              # fewer bytes than the 5 committed rows
  dump = dump_writer.SplitDump(folder, 'validation', [1], NUM_CLASSES, 'job')
  assert dump.rows_done == 0
  dump.abort()
  assert os.listdir(tmp_path / 'validation') == []


def test_the_same_job_twice_at_once_is_refused_naming_the_pid(tmp_path):
  first = dump_writer.SplitDump(str(tmp_path), 'train', [0], NUM_CLASSES, 'job')
  with pytest.raises(dump_layout.DumpError,
                     match=rf'another process \(pid {os.getpid()}\) is running the dump job job'):
    dump_writer.SplitDump(str(tmp_path), 'train', [0], NUM_CLASSES, 'job')
  first.abort()
  dump_writer.SplitDump(str(tmp_path), 'train', [0], NUM_CLASSES, 'job').abort()
  assert os.listdir(tmp_path / 'train') == []


def test_a_job_key_reused_for_other_exits_is_refused(tmp_path):
  dump = dump_writer.SplitDump(str(tmp_path), 'train', [0], NUM_CLASSES, 'job')
  dump.commit()
  del dump
  with pytest.raises(dump_layout.DumpError, match=r'started for exits \[0\] .* not exits \[1\]'):
    dump_writer.SplitDump(str(tmp_path), 'train', [1], NUM_CLASSES, 'job')
  with pytest.raises(ValueError, match='job_key'):
    dump_writer.SplitDump(str(tmp_path), 'train', [1], NUM_CLASSES, '../escape')


def test_two_dumps_of_one_split_interleaved(tmp_path):
  folder = str(tmp_path)
  batches = _batches()
  dumps = {e: dump_writer.SplitDump(folder, 'validation', [e], NUM_CLASSES, f'job{e}')
           for e in (0, 1)}
  for labels, probabilities in batches:
    for e, dump in dumps.items():
      dump.write(labels, _only(probabilities, [e]))
  for e, dump in dumps.items():
    dump.finish(dict(COMMON, checkpoint=f'clf{e}'))
  assert dump_layout.read_manifest(folder)['splits']['validation']['exits'] == [0, 1]
  assert sorted(os.listdir(tmp_path / 'validation')) == [
      'clf0_probabilities.npy', 'clf1_probabilities.npy', 'labels.npy']


def _dump_one_exit(folder, exit_id, barrier):
  dump = dump_writer.SplitDump(folder, 'validation', [exit_id], NUM_CLASSES, f'job{exit_id}')
  barrier.wait()
  for labels, probabilities in _batches():
    dump.write(labels, _only(probabilities, [exit_id]))
    dump.commit()
  barrier.wait()
  dump.finish(dict(COMMON, checkpoint=f'clf{exit_id}'))


def test_two_processes_dumping_one_split_at_once(tmp_path):
  """Issue #17a: --classifier_id 0 and 1 at once into one --softmax_dir."""
  context = multiprocessing.get_context('fork')
  for trial in range(5):
    folder = str(tmp_path / f'trial{trial}')
    barrier = context.Barrier(2)
    processes = [context.Process(target=_dump_one_exit, args=(folder, e, barrier))
                 for e in (0, 1)]
    for p in processes:
      p.start()
    for p in processes:
      p.join(60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert sorted(os.listdir(os.path.join(folder, 'validation'))) == [
        'clf0_probabilities.npy', 'clf1_probabilities.npy', 'labels.npy']
    assert dump_layout.completed_exits(folder, 'validation', 'clf0') == {0}
    assert dump_layout.completed_exits(folder, 'validation', 'clf1') == {1}
    batches = _batches()
    for e in (0, 1):
      np.testing.assert_array_equal(
          np.load(dump_layout.probabilities_path(folder, 'validation', e)),
          np.concatenate([b[1][e] for b in batches]))


def test_completed_exits_checks_files_rows_and_checkpoint(tmp_path):
  folder = str(tmp_path)
  assert dump_layout.completed_exits(folder, 'validation', COMMON['checkpoint']) == set()
  _straight_dump(folder)
  assert dump_layout.completed_exits(folder, 'validation', COMMON['checkpoint']) == {0, 1, 2}
  assert dump_layout.completed_exits(folder, 'validation', 'model/ckpt-11') == set()
  assert dump_layout.completed_exits(folder, 'train', COMMON['checkpoint']) == set()
  path = dump_layout.probabilities_path(folder, 'validation', 1)
  np.save(path, np.load(path)[:-1])                           # a row short
  os.remove(dump_layout.probabilities_path(folder, 'validation', 2))
  assert dump_layout.completed_exits(folder, 'validation', COMMON['checkpoint']) == {0}
  with open(dump_layout.manifest_path(folder)) as f:
    manifest = json.load(f)
  manifest['splits']['validation']['num_images'] = 99
  dump_layout.write_manifest(folder, manifest)
  assert dump_layout.completed_exits(folder, 'validation', COMMON['checkpoint']) == set()


def test_split_exits_lists_final_files_only(tmp_path):
  folder = str(tmp_path)
  assert dump_layout.split_exits(folder, 'validation') == []
  os.makedirs(tmp_path / 'validation')
  for name in ('clf2_probabilities.npy', 'clf0_probabilities.npy',
               'clf1_probabilities.npy.job.partial', 'labels.npy'):
    (tmp_path / 'validation' / name).write_bytes(b'')
  assert dump_layout.split_exits(folder, 'validation') == [0, 2]


def test_commit_after_an_interrupted_write_keeps_the_rows_every_file_holds(tmp_path):
  folder = str(tmp_path)
  batches = _batches()
  dump = dump_writer.SplitDump(folder, 'validation', [0, 1, 2], NUM_CLASSES, 'job')
  dump.write(*batches[0])
  labels, probabilities = batches[1]
  dump._labels.write(labels)               # Ctrl-C after the labels, before the probabilities
  dump._writers[dump_layout.probabilities_path(folder, 'validation', 0)].write(probabilities[0])
  dump.commit()
  assert dump.rows_done == 5
  with pytest.raises(dump_layout.DumpError, match='different row counts'):
    dump.finish(COMMON)
  assert os.listdir(tmp_path / 'validation') == []
