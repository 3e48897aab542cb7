"""Turns the softmax dumps into the article's results: exit accuracies, thresholds, cascade curves.

Usage::

    python analyze_imagenet_labels.py --softmax_dir output_softmax --output_dir cascade_report
    python analyze_imagenet_labels.py -softmax_dir_to_validate_against output_softmax \\
        -dataset_path Imagenet_tools            # the original's command line, old dumps
    python analyze_imagenet_labels.py --softmax_dir output_softmax --calibration_split validation \\
        --calibration_fraction 0.5 --accuracy_drop 0.005,0.01 --coverage_trials 100
                                                # thresholds that keep an accuracy-drop promise

Needs numpy, scipy, matplotlib, tqdm and absl only (no TensorFlow), and reads the 15 GB of ImageNet
train dumps in row chunks, keeping only a few numbers per image, so it runs in well under 2 GB of
RAM.

The analysis, in the order it runs (``run_analysis``):

1. Load: find the dumps, in the layout of ``dump_layout.py`` (``<softmax_dir>/<split>/labels.npy``,
   ``<split>/clf<k>_probabilities.npy``, ``manifest.json`` with per-stage MACs) or in the original
   repository's (``legacy_dumps.py``: pickles, labels in ``-dataset_path``, costed with the
   article's MAC counts).
2. Per-exit statistics (``exit_statistics.py``): every exit's confidences and correctness per row,
   printed as the original's accuracy block.
3. Images: which calibrate and which evaluate (below).
4. Thresholds, per exit, on the calibration images (below).
5. Cascade, on the evaluation images (below).
6. Risk-controlled thresholds, when asked for (below).
7. Report (``cascade_report.py``): the tables, and ``thresholds.json`` (its format:
   ``cascade_thresholds.py``, which the early-exit exporter reads), ``cascade.csv`` and figures.

Images. The article tunes on the training split and reports on the validation split
(``--calibration_split train``, the default). ``--calibration_split validation`` alone tunes and
reports on the same validation images (optimistic; logged). With ``--calibration_fraction F``
a random F of the ``--eval_split`` images (``--calibration_seed``) calibrate and the other 1 - F,
disjoint from them, are where every cascade figure is measured. Every table and figure names its
images (``measured_on`` in thresholds.json).

The threshold rule and the cascade are ``cascade_rules.py``'s; the risk-controlled thresholds
``risk_thresholds.py``'s (which uses the statistics of ``risk_control.py``).
"""

import dataclasses
import math
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

import cascade_report
import cascade_rules
import cascade_thresholds
import dump_layout
import exit_statistics
import legacy_dumps
import risk_thresholds

# The cascade's offline rule, for those who check an exported model against the analysis.
from cascade_rules import cascade_exit_index  # noqa: F401
from cascade_thresholds import MODES, NEVER_EXIT_THRESHOLD
from dump_layout import DumpError
from exit_statistics import confidence  # noqa: F401

# Epsilon grids of the article, as fractions (the original's defaults 0..20 were wrong units).
DEFAULT_EPSILONS = {
    'top1': tuple(round(0.01 * i, 2) for i in range(21)),
    'top5': (0.0, 0.01, 0.016, 0.017, 0.018, 0.019, 0.02, 0.025, 0.026, 0.027, 0.028, 0.03, 0.04,
             0.051, 0.052, 0.053, 0.054, 0.06, 0.07),
}

# -------------------------------------------------------------------------------------------------
# Load.


def find_dumps(softmax_dir, dataset_path=None):
  """Finds the dump files of every split and checks that the set is complete.

  Args:
    softmax_dir: folder of the dumps, in the current layout or the original's.
    dataset_path: optional folder with the original's label pickles
      (``validation_non_onehot.npy``, ``train_non_onehot.npy``).

  Returns:
    A ``dump_layout.Dumps``. Row and class counts are checked later, by
    ``exit_statistics.inspect_dumps``; splits still being written are in ``pending``.

  Raises:
    DumpError: missing folder, files or exits.
  """
  if not os.path.isdir(softmax_dir):
    raise DumpError(f'--softmax_dir {softmax_dir} does not exist; point it at the folder the run '
                    'loop wrote (default output_softmax)')
  if dataset_path and not os.path.isdir(dataset_path):
    raise DumpError(f'-dataset_path {dataset_path} does not exist')
  manifest = dump_layout.read_manifest(softmax_dir)
  # The original's label pickles, if given, must agree with the labels the dumps carry.
  extra_labels = {s: legacy_dumps.label_paths(s, None, dataset_path) for s in dump_layout.SPLITS}
  dumps = dump_layout.find_current(softmax_dir, manifest, extra_labels)
  if not dumps.splits and not dumps.pending:
    dumps = legacy_dumps.find_legacy(softmax_dir, dataset_path)
    dumps.manifest = manifest
    if not dumps.splits and dumps.num_exits is not None:
      raise DumpError(f'{softmax_dir} holds the original\'s dumps but no labels for them: pass '
                      '-dataset_path with validation_non_onehot.npy (Imagenet_tools/)')
  if not dumps.splits and not dumps.pending:
    raise DumpError(
        f'no dumps in {softmax_dir}: expected <split>/{dump_layout.LABELS_NAME} and '
        f'<split>/{dump_layout.probabilities_name(0)}, ... (written by the run loop) or the '
        f'original\'s clf0_all_probabilities.npy')
  return dumps


def resolve_costs(dumps, stage_macs=None, plain_macs=None):
  """Returns (stage_macs tuple, plain_macs): flags first, then the manifest, then the article."""
  manifest = dumps.manifest or {}
  if stage_macs is None:
    stage_macs = manifest.get('stage_macs')
    if stage_macs is None:
      stage_macs = legacy_dumps.ARTICLE_STAGE_MACS
      logging.info('No per-stage MACs in the dumps: using the article\'s ResNet-50 counts %s.',
                   stage_macs)
  if plain_macs is None:
    plain_macs = manifest.get('plain_macs', legacy_dumps.ARTICLE_PLAIN_MACS)
  stage_macs = tuple(int(m) for m in stage_macs)
  if len(stage_macs) != dumps.num_exits:
    raise DumpError(f'{len(stage_macs)} stage MAC counts for {dumps.num_exits} exits; pass '
                    f'--stage_macs with {dumps.num_exits} comma-separated integers')
  if min(stage_macs) <= 0 or int(plain_macs) <= 0:
    raise DumpError(f'MAC counts must be positive: stage_macs={stage_macs}, '
                    f'plain_macs={plain_macs}')
  return stage_macs, int(plain_macs)


def choose_splits(dumps, calibration_split, evaluation_split):
  """The (calibration, evaluation) splits to use; falls back, with a log line, to what exists.

  A split another dump is still writing (``dumps.pending``) is an error if it is one of the two,
  and skipped with a log line otherwise: only the splits the analysis reads must be complete.
  """
  for name in (calibration_split, evaluation_split):
    if name not in dump_layout.SPLITS:
      raise DumpError(f'unknown split {name!r}; choose one of {dump_layout.SPLITS}')
  available = dumps.splits
  roles = ((calibration_split, '--calibration_split'), (evaluation_split, '--eval_split'))
  for name, flag in roles:
    if name in dumps.pending:
      others = [s for s in available if s != name]
      hint = f'; or pass {flag} {others[0]} to analyse without it' if others else ''
      raise DumpError(dumps.pending[name] + hint)
  for split, why in dumps.pending.items():
    logging.warning('Not reading the %s split: %s.', split, why)
  if not available:
    raise DumpError(f'no complete dumps in {dumps.softmax_dir}: '
                    + '; '.join(dumps.pending.values()))
  if evaluation_split not in available:
    other = next(s for s in dump_layout.SPLITS if s in available)
    logging.warning('No %s dumps: evaluating the cascade on %s instead.', evaluation_split, other)
    evaluation_split = other
  if calibration_split not in available:
    logging.warning('No %s dumps: tuning the thresholds on %s instead.', calibration_split,
                    evaluation_split)
    calibration_split = evaluation_split
  return calibration_split, evaluation_split


# -------------------------------------------------------------------------------------------------
# Images: which calibrate the thresholds, which evaluate the cascade.


def check_calibration(calibration_split, evaluation_split, fraction=None, risk_controlled=False,
                      coverage_trials=0, allow_train_calibration=False):
  """Refuses calibration images that cannot do what they are asked for; see the module docstring.

  Args:
    calibration_split, evaluation_split: the splits ``choose_splits`` settled on.
    fraction: --calibration_fraction, or None.
    risk_controlled: whether risk-controlled thresholds are asked for.
    coverage_trials: --coverage_trials.
    allow_train_calibration: --allow_train_calibration.

  Raises:
    DumpError: naming the flags and what to type instead.
  """
  if fraction is not None:
    if not 0.0 < fraction < 1.0:      # NaN fails too
      raise DumpError(f'--calibration_fraction must be in (0, 1), got {fraction}; e.g. '
                      f'--calibration_fraction 0.5 calibrates on a random half of the '
                      f'{evaluation_split} images and reports the cascade on the other half')
    if calibration_split != evaluation_split:
      raise DumpError(f'--calibration_fraction {fraction:g} holds a share of the --eval_split '
                      f'{evaluation_split} images out for calibration, but --calibration_split is '
                      f'{calibration_split}: add --calibration_split {evaluation_split}')
  if coverage_trials and fraction is None:
    raise DumpError('--coverage_trials repeats the random calibration/evaluation split of '
                    '--calibration_fraction: add --calibration_split validation '
                    '--calibration_fraction 0.5')
  if not risk_controlled:
    return
  if calibration_split == 'train' and not allow_train_calibration:
    raise DumpError(
        '--accuracy_drop with --calibration_split train: the network was fitted on its training '
        'images, so their losses are not exchangeable with those of new images and the promised '
        'drop would not hold. Calibrate on held-out images: --calibration_split validation '
        '--calibration_fraction 0.5 (or pass --allow_train_calibration to use train anyway)')
  if calibration_split == evaluation_split and fraction is None:
    raise DumpError(f'--accuracy_drop needs calibration images disjoint from the evaluation '
                    f'images, but both would be all the {evaluation_split} images: add '
                    f'--calibration_fraction 0.5 (a random half calibrates, the other evaluates)')


@dataclasses.dataclass
class Images:
  """The calibration and evaluation images of a run, as per-exit statistics.

  Attributes:
    calibration, evaluation: lists of ExitStats, one per exit (the very same list when one split
      is tuned and evaluated on without --calibration_fraction).
    calibration_split, evaluation_split: their split names.
    fraction, seed: --calibration_fraction and --calibration_seed, None without a fraction.
    measured_on: {'calibration': text, 'evaluation': text} naming the images, for the tables,
      figures and thresholds.json.
  """
  calibration: list
  evaluation: list
  calibration_split: str
  evaluation_split: str
  fraction: float | None
  seed: int | None
  measured_on: dict

  @property
  def num_calibration(self):
    return int(self.calibration[0].max_prob.size)

  @property
  def num_evaluation(self):
    return int(self.evaluation[0].max_prob.size)


def choose_images(stats, calibration_split, evaluation_split, fraction=None, seed=0):
  """The run's Images: whole splits, or a seeded random ``fraction`` of one split held out.

  Args:
    stats: split name -> list of ExitStats.
    calibration_split, evaluation_split: split names (equal when ``fraction`` is given).
    fraction: share of the evaluation split's images that calibrate, or None.
    seed: seed of that split (``risk_control.calibration_split``).
  """
  if fraction is None:
    calibration, evaluation = stats[calibration_split], stats[evaluation_split]
    n_cal, n_eval = calibration[0].max_prob.size, evaluation[0].max_prob.size
    measured_on = {'calibration': f'{calibration_split} ({n_cal:,} images)',
                   'evaluation': f'{evaluation_split} ({n_eval:,} images)'}
    if calibration_split == evaluation_split:
      measured_on['evaluation'] += ', the calibration images themselves'
      logging.warning('Thresholds are tuned and evaluated on the same %s images: the cascade '
                      'figures are optimistic (--calibration_fraction 0.5 holds half of them '
                      'out).', evaluation_split)
    return Images(calibration, evaluation, calibration_split, evaluation_split, None, None,
                  measured_on)
  split = stats[evaluation_split]
  total = split[0].max_prob.size
  calibration_rows, evaluation_rows = risk_thresholds.split_rows(total, fraction, seed)
  measured_on = {
      'calibration': f'{calibration_rows.size:,} random {evaluation_split} images (of {total:,}; '
                     f'--calibration_fraction {fraction:g}, --calibration_seed {seed})',
      'evaluation': f'the other {evaluation_rows.size:,} {evaluation_split} images',
  }
  return Images(exit_statistics.subset_stats(split, calibration_rows),
                exit_statistics.subset_stats(split, evaluation_rows),
                evaluation_split, evaluation_split, float(fraction), int(seed), measured_on)


# -------------------------------------------------------------------------------------------------
# The whole analysis.


def check_epsilons(epsilons):
  """Returns the epsilons as sorted unique floats; raises DumpError outside [0, 1]."""
  values = [float(e) for e in epsilons]
  bad = [e for e in values if not 0.0 <= e <= 1.0 or math.isnan(e)]
  if bad:
    raise DumpError(f'epsilons must be fractions in [0, 1], got {bad}; e.g. --epsilons=0,0.01,'
                    '0.05 (0.05 means an accuracy drop of 5%)')
  if not values:
    raise DumpError('--epsilons is empty; give at least one value, e.g. --epsilons=0.05')
  return sorted(set(values))


def run_analysis(softmax_dir, output_dir='cascade_report', dataset_path=None, modes=MODES,
                 epsilons=None, calibration_split='train', evaluation_split='validation',
                 calibration_fraction=None, calibration_seed=0, accuracy_drops=None,
                 delta=risk_thresholds.DEFAULT_DELTA, risk_control_method='ltt', coverage_trials=0,
                 allow_train_calibration=False, stage_macs=None, plain_macs=None,
                 chunk_rows=16384, num_threads=2, show_progress=True, out=sys.stdout):
  """Runs everything: reads the dumps, prints the tables, writes the report.

  Args:
    softmax_dir: dump folder. dataset_path: optional folder with the original's label pickles.
    output_dir: report folder. modes: subset of MODES.
    epsilons: list of fractions for every mode, or None for DEFAULT_EPSILONS.
    calibration_split, evaluation_split: 'train' or 'validation'.
    calibration_fraction: None, or the share of the evaluation split's images that calibrate
      (then ``calibration_split`` must equal ``evaluation_split``); ``calibration_seed`` seeds it.
    accuracy_drops: allowed drops D for risk-controlled thresholds; None:
      risk_thresholds.DEFAULT_ACCURACY_DROPS
      when ``calibration_fraction`` holds calibration images out, else no risk control.
    delta, risk_control_method: LTT's error probability; 'ltt' or 'crc'.
    coverage_trials: repeat the random split this many times (needs ``calibration_fraction``).
    allow_train_calibration: let risk control calibrate on the training split.
    stage_macs, plain_macs: override the manifest (or the article's numbers).
    chunk_rows, num_threads, show_progress: reading.
    out: stream for the printed tables.

  Returns:
    The thresholds.json content (dict).

  Raises:
    DumpError: bad flags, refused calibration images, damaged or missing dumps.
  """
  modes = [m for m in MODES if m in modes]
  if not modes:
    raise DumpError(f'no mode to run; choose from {MODES}')
  eps = {m: check_epsilons(epsilons if epsilons is not None else DEFAULT_EPSILONS[m])
         for m in modes}
  risk_controlled = accuracy_drops is not None or calibration_fraction is not None
  if risk_controlled:
    accuracy_drops = risk_thresholds.check_risk_control(
        risk_thresholds.DEFAULT_ACCURACY_DROPS if accuracy_drops is None else accuracy_drops, delta,
        risk_control_method, coverage_trials)
  if chunk_rows <= 0:
    raise DumpError(f'--chunk_rows must be positive, got {chunk_rows}')
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise DumpError(f'--output_dir {output_dir} is a file; choose a folder')
  dumps = find_dumps(softmax_dir, dataset_path)
  calibration_split, evaluation_split = choose_splits(dumps, calibration_split, evaluation_split)
  # Before the slow reading: a refused request costs nothing.
  check_calibration(calibration_split, evaluation_split, calibration_fraction, risk_controlled,
                    coverage_trials, allow_train_calibration)
  stage_macs, plain_macs = resolve_costs(dumps, stage_macs, plain_macs)
  parts, num_classes = exit_statistics.inspect_dumps(dumps)
  logging.info('Reading %s dumps (%s layout) of %d exits from %s.',
               ', '.join(dumps.splits), dumps.layout, dumps.num_exits, softmax_dir)
  labels, stats = {}, {}
  for split in dump_layout.SPLITS:
    if split in dumps.splits:
      start = time.perf_counter()
      labels[split], stats[split], num_classes = exit_statistics.read_split(
          dumps, split, parts[split], num_classes, chunk_rows, num_threads, show_progress)
      logging.info('Read %s: %d exits x %d images in %.1f s.', split, dumps.num_exits,
                   labels[split].size, time.perf_counter() - start)
  accuracies = {split: exit_statistics.exit_accuracies(s) for split, s in stats.items()}
  print(cascade_report.format_exit_accuracies(accuracies), file=out)
  images = choose_images(stats, calibration_split, evaluation_split, calibration_fraction,
                         calibration_seed)

  manifest = dumps.manifest or {}
  report = {
      'format_version': cascade_thresholds.FORMAT_VERSION,
      'num_classes': int(num_classes),
      'num_exits': dumps.num_exits,
      'stage_macs': list(stage_macs),
      'cumulative_macs': [int(c) for c in np.cumsum(stage_macs)],
      'plain_macs': plain_macs,
      'calibration_split': calibration_split,
      'evaluation_split': evaluation_split,
      'calibration_fraction': images.fraction,
      'calibration_seed': images.seed,
      'calibration_images': images.num_calibration,
      'evaluation_images': images.num_evaluation,
      'measured_on': images.measured_on,
      'num_images': {split: int(v.size) for split, v in labels.items()},
      'never_exit_threshold': NEVER_EXIT_THRESHOLD,
      'exit_accuracy': accuracies,
      'evaluation_exit_accuracy': exit_statistics.exit_accuracies(images.evaluation),
      'source': {'softmax_dir': os.path.abspath(softmax_dir), 'layout': dumps.layout,
                 **{k: manifest[k] for k in ('model', 'checkpoint', 'global_step', 'dataset')
                    if k in manifest}},
      'global_threshold': {},
  }
  start = time.perf_counter()
  cascade_rules.sort_residual_curves(images.calibration, images.evaluation, modes, num_threads)
  for mode in modes:
    report[mode] = cascade_rules.cascade_curve(images.calibration, images.evaluation, mode,
                                               eps[mode], stage_macs, plain_macs)
    report['global_threshold'][mode] = cascade_rules.global_threshold_curve(images.evaluation, mode,
                                                              stage_macs, plain_macs)
    print('', file=out)
    print(cascade_report.format_cascade_table(report[mode], mode, images.measured_on), file=out)
  logging.info('Thresholds and cascades in %.1f s.', time.perf_counter() - start)
  if risk_controlled:
    start = time.perf_counter()
    risk_thresholds.add_risk_control(
        report, images, stats, modes, accuracy_drops, delta, risk_control_method,
        coverage_trials, calibration_seed, stage_macs, plain_macs, show_progress,
                     out)
    logging.info('Risk-controlled thresholds in %.1f s.', time.perf_counter() - start)
  start = time.perf_counter()
  files = cascade_report.write_report(report, images.evaluation, images.calibration, output_dir)
  logging.info('Wrote %s to %s in %.1f s.', ', '.join(files), output_dir,
               time.perf_counter() - start)
  return report


# -------------------------------------------------------------------------------------------------
# Command line.


def define_flags():
  flags.DEFINE_string('softmax_dir', 'output_softmax', 'Folder of the softmax dumps.')
  flags.DEFINE_string('softmax_dir_to_validate_against', None,
                      'The original\'s name for --softmax_dir.')
  flags.DEFINE_string('dataset_path', None,
                      'Folder with the original\'s label pickles validation_non_onehot.npy / '
                      'train_non_onehot.npy (needed for the original\'s dumps only).')
  flags.DEFINE_string('output_dir', 'cascade_report', 'Where the report goes.')
  flags.DEFINE_boolean('top5', False, 'Only the top-5 mode (default: top-1 and top-5).')
  flags.DEFINE_list('epsilons', None, 'The article\'s epsilons, as fractions, e.g. 0,0.01,0.05: '
                    'allowed drops of each exit\'s residual accuracy on the calibration images, '
                    'not the accuracy a user loses (see --accuracy_drop) (default: 0..0.20 for '
                    'top-1, the article\'s list for top-5).')
  flags.DEFINE_enum('calibration_split', 'train', dump_layout.SPLITS,
                    'Split the thresholds are tuned on (the article: train).')
  flags.DEFINE_enum('eval_split', 'validation', dump_layout.SPLITS,
                    'Split the cascade is evaluated on.')
  flags.DEFINE_float('calibration_fraction', None,
                     'With --calibration_split validation: a random share F of the validation '
                     'images tunes the thresholds and the cascade is reported on the other 1 - F '
                     '(disjoint). Without it, validation calibration tunes and reports on the '
                     'same images.')
  flags.DEFINE_integer('calibration_seed', 0, 'Seed of the --calibration_fraction split.')
  flags.DEFINE_list('accuracy_drop', None,
                    'Risk-controlled thresholds for these allowed accuracy drops against the '
                    'plain network, as fractions (0.01: one percentage point). Default '
                    f'{",".join(f"{d:g}" for d in risk_thresholds.DEFAULT_ACCURACY_DROPS)} '
                    'whenever '
                    '--calibration_fraction holds calibration images out.')
  flags.DEFINE_float('delta', risk_thresholds.DEFAULT_DELTA,
                     'ltt: the drop exceeds --accuracy_drop with '
                     'probability at most delta, over the draw of the calibration images.')
  flags.DEFINE_enum('risk_control', 'ltt', cascade_thresholds.RISK_CONTROL_METHODS,
                    'ltt: Learn then Test, P(drop <= D) >= 1 - delta; crc: conformal risk '
                    'control, expected drop <= D.')
  flags.DEFINE_integer('coverage_trials', 0, 'Repeat the random --calibration_fraction split this '
                       'many times and report how often the drop kept within --accuracy_drop.',
                       lower_bound=0)
  flags.DEFINE_boolean('allow_train_calibration', False,
                       'Let --accuracy_drop calibrate on the training split (no guarantee: the '
                       'network was fitted on those images).')
  flags.DEFINE_list('stage_macs', None, 'Incremental MACs of each stage, e.g. 1817092009,'
                    '1467571177,759970793 (default: the manifest, else the article\'s).')
  flags.DEFINE_integer('plain_macs', None, 'MACs of the plain network (speedup baseline).')
  flags.DEFINE_integer('chunk_rows', 16384, 'Rows read at a time per thread.', lower_bound=1)
  flags.DEFINE_integer('num_threads', min(4, os.cpu_count() or 1),
                       'Chunks processed in parallel.', lower_bound=1)


def _parse_numbers(values, kind, flag):
  try:
    return [kind(v) for v in values]
  except ValueError as e:
    raise DumpError(f'--{flag}: cannot read {values} as {kind.__name__}s ({e})') from e


def main(argv):
  del argv
  f = flags.FLAGS
  softmax_dir = f.softmax_dir
  if f.softmax_dir_to_validate_against:
    if f['softmax_dir'].present and f.softmax_dir != f.softmax_dir_to_validate_against:
      sys.exit('error: --softmax_dir and -softmax_dir_to_validate_against disagree; give one')
    softmax_dir = f.softmax_dir_to_validate_against
  try:
    accuracy_drops = None
    if f.accuracy_drop is not None:
      accuracy_drops = _parse_numbers(f.accuracy_drop, float, 'accuracy_drop')
    elif any(f[name].present for name in ('delta', 'risk_control', 'coverage_trials',
                                           'allow_train_calibration')):
      # Any risk-control flag asks for risk control, so that it is checked, not ignored.
      accuracy_drops = list(risk_thresholds.DEFAULT_ACCURACY_DROPS)
    run_analysis(
        softmax_dir, output_dir=f.output_dir, dataset_path=f.dataset_path,
        modes=('top5',) if f.top5 else MODES,
        epsilons=_parse_numbers(f.epsilons, float, 'epsilons') if f.epsilons else None,
        calibration_split=f.calibration_split, evaluation_split=f.eval_split,
        calibration_fraction=f.calibration_fraction, calibration_seed=f.calibration_seed,
        accuracy_drops=accuracy_drops, delta=f.delta, risk_control_method=f.risk_control,
        coverage_trials=f.coverage_trials, allow_train_calibration=f.allow_train_calibration,
        stage_macs=_parse_numbers(f.stage_macs, int, 'stage_macs') if f.stage_macs else None,
        plain_macs=f.plain_macs, chunk_rows=f.chunk_rows, num_threads=f.num_threads)
  except DumpError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
