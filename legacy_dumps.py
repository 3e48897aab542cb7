"""The original repository's dumps: finding and loading its pickled layout, for the analysis.

The original (Berestizshevsky & Even's ``Cascaded_Inference``) wrote, with ``pickle.dump``
despite the ``.npy`` suffix, into its ``output_softmax/``::

    clf<k>_all_probabilities.npy                  float32 [50000, 1001]  validation
    clf<k>_train_<i>of3_all_probabilities.npy     float32 [~400000, 1001] train rows, in 3 chunks

and kept the labels apart, as pickled int32 arrays in ``Imagenet_tools/`` (``-dataset_path``):
``validation_non_onehot.npy`` and ``train_non_onehot.npy`` (the latter missing from the public
copy). Its dumps carry no manifest, so the analysis costs them with the article's MAC counts
(``ARTICLE_STAGE_MACS``). Numpy only.
"""

import os
import pickle
import re

import numpy as np
from absl import logging

from dump_layout import DumpError, Dumps, SplitDumps, contiguous_exits

# The article's ResNet-50 v2 costs (MAC_count_calculations.xlsx, sheet "Imagenet"), used when the
# dumps carry no manifest (the original's dumps): incremental MACs of the three stages (stem to
# exit 0, group 3 and exit-1 head, group 4 and final layer) and of the plain network.
ARTICLE_STAGE_MACS = (1_817_092_009, 1_467_571_177, 759_970_793)
ARTICLE_PLAIN_MACS = 4_037_883_817

LABEL_FILES = {'validation': 'validation_non_onehot.npy', 'train': 'train_non_onehot.npy'}
_VALIDATION_RE = re.compile(r'^clf(\d+)_all_probabilities\.npy$')
_TRAIN_RE = re.compile(r'^clf(\d+)_train_(\d+)of(\d+)_all_probabilities\.npy$')


def label_paths(split, softmax_dir, dataset_path):
  """The original's label pickle of ``split`` found in ``dataset_path`` and/or ``softmax_dir``."""
  name = LABEL_FILES[split]
  folders = [d for d in (dataset_path, softmax_dir) if d]
  return [os.path.join(d, name) for d in folders if os.path.isfile(os.path.join(d, name))]


def find_legacy(softmax_dir, dataset_path):
  """Finds the original's dump files and checks that the set is complete.

  Args:
    softmax_dir: folder of the original's pickles.
    dataset_path: folder of its label pickles (or None: looked for in softmax_dir only).

  Returns:
    Dumps with layout 'original'. A split whose labels are nowhere is left out with a warning;
    ``num_exits`` is None if there are no dumps at all.
  """
  names = os.listdir(softmax_dir)
  validation = {int(m.group(1)): name for name in names if (m := _VALIDATION_RE.match(name))}
  train = {}
  for name in names:
    m = _TRAIN_RE.match(name)
    if m:
      train.setdefault(int(m.group(1)), []).append((int(m.group(2)), int(m.group(3)), name))
  files = {'validation': validation, 'train': train}
  splits = {}
  num_exits = None
  for split in ('validation', 'train'):
    if not files[split]:
      continue
    k = contiguous_exits(set(files[split]), f'{softmax_dir} ({split}, original layout)')
    if num_exits is not None and k != num_exits:
      raise DumpError(f'{softmax_dir}: {num_exits} exits for validation but {k} for train; '
                      'dump every exit for both splits')
    num_exits = k
    labels = label_paths(split, softmax_dir, dataset_path)
    if not labels:
      logging.warning('Skipping the %s split: its labels %s are neither in -dataset_path (%s) '
                      'nor in %s (the public original lacks train_non_onehot.npy).', split,
                      LABEL_FILES[split], dataset_path, softmax_dir)
      continue
    exits = []
    for e in range(k):
      if split == 'validation':
        exits.append([os.path.join(softmax_dir, validation[e])])
        continue
      chunks = sorted(train[e])
      total = chunks[0][1]
      if [c[0] for c in chunks] != list(range(1, total + 1)) or any(c[1] != total for c in chunks):
        raise DumpError(f'{softmax_dir}: train chunks of clf{e} are incomplete or mixed: '
                        f'{", ".join(c[2] for c in chunks)}; expected 1of{total}..{total}of'
                        f'{total}')
      exits.append([os.path.join(softmax_dir, c[2]) for c in chunks])
    splits[split] = SplitDumps(name=split, label_paths=labels, exits=exits)
  return Dumps(softmax_dir=softmax_dir, layout='original', manifest=None, num_exits=num_exits,
               splits=splits)


def load_array(path, allow_mmap):
  """Loads a real .npy file, or one of the original's pickles (trusted files only).

  Args:
    path: the file.
    allow_mmap: memory-map a real .npy file instead of reading it (pickles are always read).

  Raises:
    DumpError: neither a readable .npy file nor a readable pickle.
  """
  try:
    return np.load(path, mmap_mode='r' if allow_mmap else None)
  except ValueError as e:
    if 'pickle' not in str(e):
      raise DumpError(f'{path}: not a readable .npy file ({e})') from e
  except OSError as e:
    raise DumpError(f'{path}: cannot read it ({e})') from e
  try:
    with open(path, 'rb') as f:
      # The original wrote its arrays with pickle.dump despite the .npy suffix.
      return np.asarray(pickle.load(f))
  except Exception as e:  # noqa: BLE001 -- any unpickling failure means a corrupt file
    raise DumpError(f'{path}: neither an .npy file nor a readable pickle ({e})') from e
