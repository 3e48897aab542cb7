"""Tests of dump_layout: streamed .npy files and the manifest merge."""

import os

import numpy as np
import pytest

import dump_layout


def test_rows_streamed_in_blocks_make_a_real_npy_file(tmp_path):
  path = str(tmp_path / 'validation' / 'clf0_probabilities.npy')
  writer = dump_layout.NpyRowWriter(path, np.float32, (3,))
  blocks = [np.random.RandomState(i).rand(n, 3) for i, n in enumerate((4, 0, 7))]
  for block in blocks:
    writer.write(block)
  assert not os.path.exists(path) and os.path.exists(path + '.partial')
  writer.close()
  loaded = np.load(path, mmap_mode='r')
  assert loaded.shape == (11, 3) and loaded.dtype == np.float32
  np.testing.assert_array_equal(loaded, np.concatenate(blocks).astype(np.float32))
  assert not os.path.exists(path + '.partial')


def test_aborted_writer_leaves_nothing(tmp_path):
  path = str(tmp_path / 'labels.npy')
  writer = dump_layout.NpyRowWriter(path, np.int32)
  writer.write(np.arange(5))
  writer.abort()
  assert os.listdir(tmp_path) == []


def test_wrong_row_shape_is_refused(tmp_path):
  writer = dump_layout.NpyRowWriter(str(tmp_path / 'x.npy'), np.float32, (10,))
  with pytest.raises(ValueError, match=r'expected rows of shape \(10,\)'):
    writer.write(np.zeros((2, 11)))
  writer.abort()


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
