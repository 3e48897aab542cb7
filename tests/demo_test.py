"""A short `make demo`: the whole pipeline on a Fashion-MNIST subset, end to end."""

import json
import os
import re
import subprocess
import sys

import numpy as np

import dump_layout
from tests import run_helpers

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_short_demo_trains_dumps_and_reports(tmp_path):
  run_helpers.require_fashion_mnist()
  out = tmp_path / 'demo'
  result = subprocess.run(
      [sys.executable, os.path.join(REPO_DIR, 'demo.py'), '--output_dir', str(out),
       '--train_limit', '3000', '--test_limit', '600', '--train_epochs', '1', '--head_epochs',
       '1', '--batch_size', '32'],
      capture_output=True, text=True, cwd=REPO_DIR, timeout=900, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

  # The per-exit block in the original format, then the cascade tables.
  printed = result.stdout
  for exit_id in range(3):
    assert re.search(r'Classifier {}:\n Train top-1:[0-9.]+\n Train top-5:[0-9.]+\n'
                     r' Test top-1:[0-9.]+\n Test top-5:[0-9.]+'.format(exit_id), printed)
  assert 'Cascade, top1 confidence' in printed and 'Demo finished' in printed

  softmax_dir = out / 'softmax'
  manifest = dump_layout.read_manifest(str(softmax_dir))
  assert manifest['splits']['train'] == {'num_images': 3000, 'exits': [0, 1, 2]}
  assert manifest['splits']['validation'] == {'num_images': 600, 'exits': [0, 1, 2]}
  labels = np.load(dump_layout.labels_path(str(softmax_dir), 'validation'))
  np.testing.assert_array_equal(
      labels, run_helpers.read_labels(str(out / 'data'), 'validation'))
  for exit_id in range(3):
    probabilities = np.load(dump_layout.probabilities_path(str(softmax_dir), 'validation',
                                                           exit_id))
    accuracy = (probabilities.argmax(1) == labels).mean()
    assert accuracy > 0.4, 'exit {} at {:.3f} does not beat chance (0.1) widely'.format(
        exit_id, accuracy)

  report_dir = out / 'report'
  for name in ('thresholds.json', 'cascade.csv', 'reliability.png', 'accuracy_vs_gmacs_top1.png',
               'accuracy_vs_gmacs_top5.png'):
    assert (report_dir / name).stat().st_size > 0, name
  report = json.loads((report_dir / 'thresholds.json').read_text())
  assert report['stage_macs'] == manifest['stage_macs']
  assert report['num_images'] == {'train': 3000, 'validation': 600}
  # At the tightest budget the cascade scores like its exits: well above chance.
  assert 0.4 < report['top1'][0]['accuracy'] <= 1
