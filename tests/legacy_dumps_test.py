"""Tests of legacy_dumps: finding and loading the original repository's pickled dumps."""

import os
import pickle
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_ROOT, os.path.join(_ROOT, 'tests')):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import synthetic_dumps as sd  # noqa: E402

import dump_layout  # noqa: E402
import legacy_dumps  # noqa: E402


def _arrays(n, seed=0, exits=3, num_classes=20):
  rng = np.random.default_rng(seed)
  labels = sd.synthetic_labels(rng, n, num_classes)
  return labels, [sd.synthetic_probabilities(rng, labels, np.zeros(n, np.float32), 2.0,
                                             num_classes) for _ in range(exits)]


def test_finds_both_splits_with_train_in_three_chunks_in_order(tmp_path):
  softmax, tools = str(tmp_path / 'output_softmax'), str(tmp_path / 'Imagenet_tools')
  sd.write_legacy_dumps(softmax, tools, validation=_arrays(30), train=_arrays(31, seed=1))
  dumps = legacy_dumps.find_legacy(softmax, tools)
  assert dumps.layout == 'original' and dumps.num_exits == 3 and dumps.manifest is None
  assert sorted(dumps.splits) == ['train', 'validation']
  assert [os.path.basename(p) for p in dumps.splits['train'].exits[1]] == [
      f'clf1_train_{i}of3_all_probabilities.npy' for i in (1, 2, 3)]
  assert dumps.splits['validation'].label_paths == [
      os.path.join(tools, legacy_dumps.LABEL_FILES['validation'])]
  labels = legacy_dumps.load_array(dumps.splits['train'].label_paths[0], allow_mmap=True)
  np.testing.assert_array_equal(labels, _arrays(31, seed=1)[0])


def test_missing_train_chunk_and_missing_exit_are_named(tmp_path):
  softmax, tools = str(tmp_path / 's'), str(tmp_path / 'l')
  sd.write_legacy_dumps(softmax, tools, validation=_arrays(10), train=_arrays(12))
  os.remove(os.path.join(softmax, 'clf2_train_2of3_all_probabilities.npy'))
  with pytest.raises(dump_layout.DumpError, match='train chunks of clf2 are incomplete'):
    legacy_dumps.find_legacy(softmax, tools)
  for i in (1, 3):
    os.remove(os.path.join(softmax, f'clf2_train_{i}of3_all_probabilities.npy'))
  os.remove(os.path.join(softmax, 'clf1_all_probabilities.npy'))
  with pytest.raises(dump_layout.DumpError, match='probabilities of clf1 are missing'):
    legacy_dumps.find_legacy(softmax, tools)


def test_load_array_reads_pickles_and_npy_and_names_a_corrupt_file(tmp_path):
  values = np.arange(6, dtype=np.int32)
  with open(tmp_path / 'pickled.npy', 'wb') as f:
    pickle.dump(values, f, protocol=3)
  np.save(tmp_path / 'real.npy', values)
  for name in ('pickled.npy', 'real.npy'):
    np.testing.assert_array_equal(legacy_dumps.load_array(str(tmp_path / name), True), values)
  (tmp_path / 'broken.npy').write_bytes(b'\x80\x03garbage')
  with pytest.raises(dump_layout.DumpError, match='broken.npy: neither an .npy file nor a'):
    legacy_dumps.load_array(str(tmp_path / 'broken.npy'), False)
