"""Tests of exit_statistics: per-row confidences and correctness, the probability check, reading."""

import os
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_ROOT, os.path.join(_ROOT, 'tests')):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import synthetic_dumps as sd  # noqa: E402

import analyze_imagenet_labels as ail  # noqa: E402
import dump_layout  # noqa: E402
import exit_statistics as es  # noqa: E402


def reference_top_values(p, k=5):
  return np.sort(p, axis=1)[:, -min(k, p.shape[1]):]


@pytest.mark.parametrize('num_classes', [3, 10, 100, 1000, 1001, 1009])
def test_top_values_match_full_sort_with_ties(num_classes):
  rng = np.random.default_rng(num_classes)
  p = rng.random((300, num_classes)).astype(np.float32)
  p[:100] = np.round(p[:100] * 4) / 4          # heavy ties, also across the 5th place
  p[100:110] = 0.0                              # all-zero rows, like the original's padding
  p[110:120] = p[110:120, :1]                   # constant rows
  got = es.top_values(p)
  np.testing.assert_array_equal(got, reference_top_values(p))
  assert got.dtype == np.float32


def test_top_values_of_float16_and_strided_input():
  rng = np.random.default_rng(1)
  wide = rng.random((50, 2002)).astype(np.float32)
  p = wide[:, ::2]                               # non-contiguous rows of 1001 classes
  np.testing.assert_array_equal(es.top_values(p), reference_top_values(p))
  half = rng.random((40, 1001)).astype(np.float16)
  np.testing.assert_array_equal(es.top_values(half), reference_top_values(half))


def test_top_values_mark_rows_with_nan():
  p = np.random.default_rng(2).random((6, 1005)).astype(np.float32)
  p[1, 10] = np.nan          # inside the blocks that give the lower bound
  p[4, 1003] = np.nan        # in the columns left over by the blocks
  got = es.top_values(p)
  assert np.isnan(got).any(axis=1).tolist() == [False, True, False, False, True, False]
  np.testing.assert_array_equal(got[[0, 2, 3, 5]], reference_top_values(p[[0, 2, 3, 5]]))


def test_row_statistics_against_definition():
  rng = np.random.default_rng(2)
  p = np.round(rng.random((500, 1001)) * 8).astype(np.float32) / 8   # many ties
  labels = rng.integers(0, 1001, 500)
  p[np.arange(0, 500, 3), labels[::3]] = 1.0                        # some correct rows
  max_prob, top5_sum, top1, top5 = es.row_statistics(p, labels)
  ordered = np.sort(p, axis=1)
  label_prob = p[np.arange(500), labels]
  np.testing.assert_array_equal(max_prob, ordered[:, -1])
  np.testing.assert_array_equal(top1, label_prob >= ordered[:, -1])
  np.testing.assert_array_equal(top5, label_prob >= ordered[:, -5])
  expected = np.zeros(500, np.float32)
  for j in range(5):          # ascending, float32, left to right: the documented order
    expected = (expected + ordered[:, -5 + j]).astype(np.float32)
  np.testing.assert_array_equal(top5_sum, expected)
  # ties at the top: a label tied with the maximum counts as top-1 correct, as tf.nn.in_top_k
  tied = np.zeros((1, 1001), np.float32)
  tied[0, [3, 7]] = 0.5
  assert es.row_statistics(tied, np.array([7]))[2][0]


def test_confidence_modes():
  rng = np.random.default_rng(3)
  p = sd.synthetic_probabilities(rng, np.arange(1, 65), np.zeros(64, np.float32), 3.0)
  np.testing.assert_array_equal(es.confidence(p, 'top1'), p.max(axis=1))
  top5 = es.confidence(p, 'top5')
  assert top5.dtype == np.float32
  np.testing.assert_allclose(top5, np.sort(p, axis=1)[:, -5:].sum(axis=1), rtol=1e-6)
  assert np.all(top5 >= es.confidence(p, 'top1'))
  with pytest.raises(ValueError, match='mode'):
    es.confidence(p, 'top3')


# -------------------------------------------------------------------------------------------------
# Rows that are not probabilities.


def _probabilities(n=64, num_classes=1001, seed=4):
  rng = np.random.default_rng(seed)
  labels = sd.synthetic_labels(rng, n, num_classes)
  return sd.synthetic_probabilities(rng, labels, np.zeros(n, np.float32), 3.0, num_classes)


def _first_bad(p, allow_zero_rows=False):
  p = np.asarray(p, np.float32)
  return es.first_non_probability(p, p.max(axis=1), allow_zero_rows)


def test_softmax_rows_pass_the_probability_check():
  p = _probabilities()
  assert _first_bad(p) is None
  assert _first_bad(p.astype(np.float16)) is None           # stored in half precision
  assert _first_bad(p[:0]) is None


@pytest.mark.parametrize('row, why', [
    (lambda p: p * (1 + 2 * es.SUM_TOLERANCE), 'sums to more than 1'),
    (lambda p: p * (1 - 2 * es.SUM_TOLERANCE), 'sums to less than 1'),
    (lambda p: np.log(p), 'log-probabilities'),
    (lambda p: np.where(p == p.max(), np.inf, p), 'inf'),
    (lambda p: np.where(p == p.min(), -np.inf, p), '-inf'),
    (lambda p: np.where(p == p.max(), p + 0.2, np.where(p == p.min(), p - 0.2, p)), 'negative'),
    (lambda p: np.zeros_like(p), 'all zero'),
])
def test_the_first_row_that_is_not_a_probability_vector_is_found(row, why):
  p = _probabilities()
  p[37] = row(p[37].copy())
  p[50] = row(p[50].copy())
  found = _first_bad(p)
  assert found is not None and found[0] == 37, why


def test_all_zero_rows_pass_only_where_allowed():
  p = _probabilities()
  p[5] = 0.0
  assert _first_bad(p)[0] == 5
  assert _first_bad(p, allow_zero_rows=True) is None
  p[6] = 0.0
  p[6, 3] = -0.5                    # max 0, but not an all-zero row
  assert _first_bad(p, allow_zero_rows=True)[0] == 6


def test_tolerance_covers_rounding_not_more():
  p = _probabilities()
  p[1] *= np.float32(1 + 0.5 * es.SUM_TOLERANCE)
  p[2] *= np.float32(1 - 0.5 * es.SUM_TOLERANCE)
  assert _first_bad(p) is None
  p[3] *= np.float32(1 + 1.5 * es.SUM_TOLERANCE)
  assert _first_bad(p)[0] == 3


# -------------------------------------------------------------------------------------------------
# Reading whole exits.


def test_exit_statistics_read_in_chunks_match_row_statistics(tmp_path):
  rng = np.random.default_rng(5)
  labels = sd.synthetic_labels(rng, 300, 1001)
  probabilities = [sd.synthetic_probabilities(rng, labels, np.zeros(300, np.float32), s)
                   for s in sd.ARTICLE_LIKE_STRENGTHS]
  sd.write_current_dumps(str(tmp_path), {'validation': (labels, probabilities)})
  dumps = dump_layout.find_current(str(tmp_path), dump_layout.read_manifest(str(tmp_path)))
  parts, num_classes = es.inspect_dumps(dumps)
  assert num_classes == 1001 and parts['validation'][2][0].num_rows == 300
  read, stats, _ = es.read_split(dumps, 'validation', parts['validation'], num_classes,
                                 chunk_rows=7, num_threads=3, show_progress=False)
  np.testing.assert_array_equal(read, labels)
  for k, p in enumerate(probabilities):
    expected = es.row_statistics(p, labels)
    got = (stats[k].max_prob, stats[k].top5_sum, stats[k].top1_correct, stats[k].top5_correct)
    for a, b in zip(got, expected, strict=True):
      np.testing.assert_array_equal(a, b)
  assert es.exit_accuracies(stats)[2]['top1'] == pytest.approx(
      np.mean(probabilities[2].argmax(axis=1) == labels))


def test_residual_accuracy_at_distinct_confidences():
  values, alpha, counts = es.residual_accuracy(np.float32([0.5, 0.2, 0.5, 0.9]), [1, 0, 0, 1])
  assert values.tolist() == [np.float32(0.2), 0.5, np.float32(0.9)]
  assert alpha.tolist() == [0.5, 2 / 3, 1.0] and counts.tolist() == [4, 3, 1]
  with pytest.raises(ail.DumpError, match='zero samples'):
    es.residual_accuracy(np.float32([]), [])
