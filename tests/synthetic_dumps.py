"""Synthetic softmax dumps for tests and benchmarks (numpy only, no TensorFlow).

The probabilities come from a simple generative model shaped like the article's ResNet-50 exits:
each image has an "ease" shared by all exits; exit k adds ``strength[k] + EASE_SCALE * ease`` to
the true class's logit on top of independent unit-normal logits for all classes, and applies a
softmax at ``TEMPERATURE``. With ``ARTICLE_LIKE_STRENGTHS`` the exits score about 47 / 63 / 77 %
top-1 on 1001 classes (the article: 46.7 / 62.8 / 76.5 %), and confident answers are more often
right, so cascades behave like the real ones.

Writers:
  * ``write_current_dumps``: given arrays, the layout of ``dump_layout.py`` plus a manifest.
  * ``write_synthetic_dumps``: generated rows streamed block by block (any size, little memory).
  * ``write_legacy_dumps``: the original repository's pickled files.
"""

import os
import pickle

import numpy as np

import dump_layout
import dump_writer
from legacy_dumps import ARTICLE_PLAIN_MACS, ARTICLE_STAGE_MACS

ARTICLE_LIKE_STRENGTHS = (3.1, 3.85, 4.6)
EASE_SCALE = 1.5
TEMPERATURE = 2.0
IMAGENET_CLASSES = 1001


def synthetic_labels(rng, num_images, num_classes=IMAGENET_CLASSES):
  """ImageNet-style labels 1..num_classes-1 (0 is the unused background class): int32 [N]."""
  return rng.integers(1, num_classes, size=num_images).astype(np.int32)


def synthetic_probabilities(rng, labels, ease, strength, num_classes=IMAGENET_CLASSES):
  """Softmax outputs of one exit.

  Args:
    rng: np.random.Generator.
    labels: int [n] true classes.
    ease: float [n] per-image ease, shared by the exits of one image.
    strength: how far the true class's logit is pushed up (higher = more accurate exit).
    num_classes: C.

  Returns:
    float32 [n, C], rows summing to 1.
  """
  n = labels.shape[0]
  logits = rng.standard_normal((n, num_classes), dtype=np.float32)
  logits[np.arange(n), labels] += np.float32(strength) + np.float32(EASE_SCALE) * ease
  logits *= np.float32(TEMPERATURE)
  logits -= logits.max(axis=1, keepdims=True)
  np.exp(logits, out=logits)
  logits /= logits.sum(axis=1, keepdims=True)
  return logits


def synthetic_split(rng, num_images, num_classes=IMAGENET_CLASSES,
                    strengths=ARTICLE_LIKE_STRENGTHS, nested=False):
  """One split in memory: (labels int32 [N], [probabilities float32 [N, C]] one per exit).

  Every call draws new images from the same distribution, so two calls are independent samples
  of it (what the coverage tests of risk control need).

  With ``nested`` every exit of an image shares one draw of the class logits (and strengths
  must ascend): an image an exit gets right, every later exit gets right too (its true class
  only gains), so an early exit never fixes a mistake of the last and the cascade's loss is 0 or
  1, never -1. Risk control's bound max(L, 0) is then exact: the setting where it is tight.
  """
  labels = synthetic_labels(rng, num_images, num_classes)
  ease = rng.standard_normal(num_images).astype(np.float32)
  if not nested:
    return labels, [synthetic_probabilities(rng, labels, ease, s, num_classes) for s in strengths]
  if list(strengths) != sorted(strengths):
    raise ValueError(f'nested exits need ascending strengths, got {strengths}')
  state = rng.bit_generator.state
  probabilities = []
  for s in strengths:
    rng.bit_generator.state = state      # the same logits for every exit
    probabilities.append(synthetic_probabilities(rng, labels, ease, s, num_classes))
  return labels, probabilities


def manifest_common(num_classes, num_exits, stage_macs=None, plain_macs=None):
  """The split-independent manifest fields the run loop records (costs: the article's)."""
  return {
      'model': 'synthetic', 'checkpoint': 'none', 'global_step': 0, 'dataset': 'synthetic',
      'num_classes': int(num_classes), 'num_exits': int(num_exits),
      'stage_macs': list(stage_macs or ARTICLE_STAGE_MACS[:num_exits]),
      'plain_macs': int(plain_macs or ARTICLE_PLAIN_MACS),
  }


def write_current_dumps(softmax_dir, splits, manifest=True, stage_macs=None, plain_macs=None):
  """Writes given arrays in the current layout.

  Args:
    softmax_dir: target folder.
    splits: split name -> (labels int [N], list of float [N, C] probabilities, one per exit).
    manifest: also write manifest.json (as the run loop does).
    stage_macs, plain_macs: manifest costs (default: the article's).
  """
  for split, (labels, probabilities) in splits.items():
    os.makedirs(dump_layout.split_dir(softmax_dir, split), exist_ok=True)
    np.save(dump_layout.labels_path(softmax_dir, split), np.asarray(labels, np.int32))
    for k, p in enumerate(probabilities):
      np.save(dump_layout.probabilities_path(softmax_dir, split, k), np.asarray(p, np.float32))
    if manifest:
      common = manifest_common(np.shape(probabilities[0])[1], len(probabilities), stage_macs,
                               plain_macs)
      dump_layout.merge_manifest(softmax_dir, split, len(labels), range(len(probabilities)),
                                 common)


def write_synthetic_dumps(softmax_dir, num_images, num_classes=IMAGENET_CLASSES,
                          strengths=ARTICLE_LIKE_STRENGTHS, seed=0, block_rows=65536,
                          progress=None):
  """Generates article-like dumps block by block, so any size fits in memory.

  Args:
    softmax_dir: target folder.
    num_images: split name -> number of rows.
    num_classes: C.
    strengths: one per exit (see synthetic_probabilities).
    seed: random seed.
    block_rows: rows generated at a time.
    progress: optional callable(rows_done) called after each block.

  Returns:
    split name -> int32 [N] labels written.
  """
  rng = np.random.default_rng(seed)
  written = {}
  for split, total in num_images.items():
    writers = [dump_writer.NpyRowWriter(dump_layout.probabilities_path(softmax_dir, split, k),
                                        np.float32, (num_classes,))
               for k in range(len(strengths))]
    label_writer = dump_writer.NpyRowWriter(dump_layout.labels_path(softmax_dir, split), np.int32)
    try:
      for start in range(0, total, block_rows):
        n = min(block_rows, total - start)
        labels = synthetic_labels(rng, n, num_classes)
        ease = rng.standard_normal(n, dtype=np.float32)
        label_writer.write(labels)
        for writer, strength in zip(writers, strengths, strict=True):
          writer.write(synthetic_probabilities(rng, labels, ease, strength, num_classes))
        if progress:
          progress(n)
    except BaseException:
      for w in writers + [label_writer]:
        w.abort()
      raise
    for w in writers + [label_writer]:
      w.close()
    written[split] = total
    dump_layout.merge_manifest(softmax_dir, split, total, range(len(strengths)),
                               manifest_common(num_classes, len(strengths)))
  return written


def write_legacy_dumps(softmax_dir, dataset_path, validation=None, train=None, train_chunks=3,
                       labels_in_softmax_dir=False):
  """Writes the original repository's layout: pickles with .npy names.

  Args:
    softmax_dir: folder for clf<k>_all_probabilities.npy and clf<k>_train_<i>of<m>_....npy.
    dataset_path: folder for validation_non_onehot.npy / train_non_onehot.npy (label pickles).
    validation, train: (labels int [N], list of float [N, C] per exit), or None to skip.
    train_chunks: how many files the train rows are split into (the original: 3).
    labels_in_softmax_dir: write the label pickles into softmax_dir instead.
  """
  os.makedirs(softmax_dir, exist_ok=True)
  os.makedirs(dataset_path, exist_ok=True)
  label_dir = softmax_dir if labels_in_softmax_dir else dataset_path

  def dump(obj, path):
    with open(path, 'wb') as f:
      pickle.dump(obj, f, protocol=3)

  if validation is not None:
    labels, probabilities = validation
    dump(np.asarray(labels, np.int32), os.path.join(label_dir, 'validation_non_onehot.npy'))
    for k, p in enumerate(probabilities):
      dump(np.asarray(p, np.float32), os.path.join(softmax_dir, f'clf{k}_all_probabilities.npy'))
  if train is not None:
    labels, probabilities = train
    dump(np.asarray(labels, np.int32), os.path.join(label_dir, 'train_non_onehot.npy'))
    for k, p in enumerate(probabilities):
      for i, rows in enumerate(np.array_split(np.arange(len(labels)), train_chunks)):
        name = f'clf{k}_train_{i + 1}of{train_chunks}_all_probabilities.npy'
        dump(np.asarray(p, np.float32)[rows], os.path.join(softmax_dir, name))
