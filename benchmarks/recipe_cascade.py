"""Training-recipe options against the cascade: per-exit accuracy, calibration and MAC savings.

Role: benchmark. On Fashion-MNIST (prepared once with prepare_fashion_mnist.py) it trains the
demo's network (CIFAR ResNet-8 v2, BN decay 0.9: configs/demo_backbone.flags and
configs/demo_heads.flags) on a reduced budget, once per configuration and seed: the baseline and
each recipe option alone, applied to both training steps (backbone, then heads on the frozen
backbone):

  baseline         the demo's recipe (step schedule, no smoothing, no average, fp32)
  label_smoothing  --label_smoothing 0.1
  ema              --moving_average_decay 0.99 (see --ema_decay); the heads warm-start from the
                   backbone's averaged weights and the dump uses the heads' averages
  cosine_warmup    --lr_schedule cosine, --warmup_epochs 0.2 (backbone) / 0.1 (heads)
  bf16             --dtype bf16 (training and dump; variables stay fp32)

Every step is a `python cifar10_main.py ...` subprocess (as demo.py runs them) into
--work_dir/<config>/seed<k>/; the heads' run dumps the softmax of all exits (train and test), and
`python analyze_imagenet_labels.py` calibrates the thresholds on the train dump. From the test
dump and thresholds.json it reports per-exit top-1, the expected calibration error (ECE: 15
equal-width bins of the top-1 confidence) and the cascade's top-1 and MAC reduction at epsilon 1%
and 5%; the mean and spread over the seeds, the differences from the baseline and which of them
are within noise. Results go to <work_dir>/recipe_cascade.json and .csv. A finished run is not
repeated (delete its folder to redo it). A run took 2-4 minutes (3.3 on average) on the shared
2-core development machine.

Seeds: each seed is passed to cifar10_main as --seed when it defines that flag (it seeds the
training input: shuffle and augmentation); without it a seed only labels an independent
repetition. Either way training is not bit-reproducible run to run (thread scheduling), so the
seeds mostly control the data order, and the spread over seeds is the noise the options must beat.

    python benchmarks/recipe_cascade.py                   # 5 configurations x 2 seeds, ~35 min
    python benchmarks/recipe_cascade.py --seeds 1,2,3 --configs baseline,ema --work_dir /tmp/rc
    python benchmarks/recipe_cascade.py --train_epochs 1 --head_epochs 1 --train_limit 6000
"""

import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import dump_layout  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('work_dir', None, 'Folder for data, models, dumps, reports and results '
                    '(default: a new temporary folder, kept).')
flags.DEFINE_list('configs', ['baseline', 'label_smoothing', 'ema', 'cosine_warmup', 'bf16'],
                  'Configurations to run.')
flags.DEFINE_list('seeds', ['1', '2'], 'Seeds (labels of independent repetitions).')
flags.DEFINE_integer('train_epochs', 3, 'Backbone epochs (the demo: 5).')
flags.DEFINE_integer('head_epochs', 1, 'Head fine-tuning epochs (the demo: 2).')
flags.DEFINE_integer('train_limit', None, 'Use only the first N training images.')
flags.DEFINE_integer('test_limit', None, 'Use only the first N test images.')
flags.DEFINE_float('label_smoothing', 0.1, 'Smoothing of the label_smoothing configuration.')
# About 1,400 backbone steps and 470 head steps at the default budget: an average over the last
# ~1/(1-decay) = 100 steps forgets its starting point (0.99^470 < 1%: the heads' random
# initialisation), where ImageNet's 0.9999 would still be mostly the initial weights.
flags.DEFINE_float('ema_decay', 0.99, 'Decay of the ema configuration.')
flags.DEFINE_list('epsilons', ['0.01', '0.05'], 'Epsilons (fractions) to report.')
flags.DEFINE_string('fashion_mnist_dir', None, 'Folder of the Fashion-MNIST idx files (default: '
                    'the Debian package dataset-fashion-mnist).')

CONFIGS = {
    'baseline': ([], []),
    'label_smoothing': (['--label_smoothing={ls}'], ['--label_smoothing={ls}']),
    'ema': (['--moving_average_decay={ema}'], ['--moving_average_decay={ema}']),
    'cosine_warmup': (['--lr_schedule=cosine', '--warmup_epochs=0.2'],
                      ['--lr_schedule=cosine', '--warmup_epochs=0.1']),
    'bf16': (['--dtype=bf16'], ['--dtype=bf16']),
}
SEED_FLAGS = ('seed', 'random_seed', 'tf_random_seed')
ECE_BINS = 15
NUM_EXITS = 3
RATE_RE = re.compile(r'global step \d+: ([0-9.]+) examples/s')


def load():
  """The 1-minute load average and the cores, e.g. '1.93 (2 cores)'."""
  return '{:.2f} ({} cores)'.format(os.getloadavg()[0], os.cpu_count())


def run_step(name, argv, log_dir):
  """Runs ``python <argv>`` from the repository root; returns (seconds, log path)."""
  os.makedirs(log_dir, exist_ok=True)
  log_path = os.path.join(log_dir, name + '.log')
  print('  $ python ' + ' '.join(argv), flush=True)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '2'))
  start = time.time()
  with open(log_path, 'w') as log:
    result = subprocess.run([sys.executable] + argv, cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, check=False)
  if result.returncode:
    with open(log_path) as log:
      tail = ''.join(log.readlines()[-15:])
    sys.exit(f'{tail}step {name} failed (exit code {result.returncode}); log: {log_path}')
  return time.time() - start, log_path


def training_rate(log_path):
  """Median training examples/s that ExamplesPerSecondHook logged, or None."""
  with open(log_path) as log:
    rates = [float(m.group(1)) for m in RATE_RE.finditer(log.read())]
  return statistics.median(rates) if rates else None


def seed_flag():
  """The seed flag cifar10_main defines, if any."""
  import cifar10_main  # TensorFlow: only when asked
  flag_values = flags.FlagValues()
  cifar10_main.define_cifar_flags(flag_values)
  return next((name for name in SEED_FLAGS if name in flag_values), None)


def write_averaged_checkpoint(model_dir, out_dir):
  """Copies model_dir's latest checkpoint with every averaged variable replaced by its average.

  The warm start takes a checkpoint's raw weights and treats the averages like optimizer slots,
  so heads trained on an averaged backbone need this copy (slots and averages left out).
  """
  import tensorflow.compat.v1 as tf

  import warm_start
  checkpoint = tf.train.latest_checkpoint(model_dir)
  reader = tf.train.load_checkpoint(checkpoint)
  names = reader.get_variable_to_shape_map()
  slots = warm_start.optimizer_slot_names(names)
  suffix = warm_start.MOVING_AVERAGE_SUFFIX
  averaged = 0
  with tf.Graph().as_default():
    variables = {}
    for index, name in enumerate(sorted(n for n in names if n not in slots)):
      source = name + suffix if name + suffix in names else name
      averaged += source != name
      variables[name] = tf.Variable(reader.get_tensor(source), name=f'v{index}')
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      step = int(reader.get_tensor('global_step'))
      tf.train.Saver(variables).save(sess, os.path.join(out_dir, 'model.ckpt'),
                                     global_step=step)
  if not averaged:
    sys.exit(f'{checkpoint} holds no moving averages')
  return averaged


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
  """ECE of the top-1 confidence: sum over equal-width bins (lo, hi] of |accuracy - confidence|
  weighted by the bin's share of the images."""
  confidence = probabilities.max(axis=1)
  correct = probabilities.argmax(axis=1) == labels
  edges = np.linspace(0.0, 1.0, bins + 1)
  index = np.clip(np.searchsorted(edges, confidence, side='left') - 1, 0, bins - 1)
  gap = 0.0
  for b in range(bins):
    members = index == b
    gap += abs(float(correct[members].sum()) - float(confidence[members].sum()))
  return gap / labels.size


def measure(softmax_dir, report_dir, epsilons):
  """Per-exit test top-1 and ECE from the dump, cascade figures from thresholds.json."""
  labels = np.load(dump_layout.labels_path(softmax_dir, 'validation'))
  result = {}
  for k in range(NUM_EXITS):
    probabilities = np.load(dump_layout.probabilities_path(softmax_dir, 'validation', k))
    result[f'exit{k}_top1'] = float(np.mean(probabilities.argmax(1) == labels))
    result[f'exit{k}_ece'] = expected_calibration_error(probabilities, labels)
  with open(os.path.join(report_dir, 'thresholds.json')) as f:
    report = json.load(f)
  entries = {round(e['epsilon'], 6): e for e in report['top1']}
  for eps in epsilons:
    entry = entries[round(eps, 6)]
    tag = f'{100 * eps:g}'
    result[f'cascade_top1@{tag}%'] = entry['accuracy']
    result[f'mac_reduction@{tag}%'] = entry['mac_reduction']
    result[f'exit_shares@{tag}%'] = entry['exit_shares']
  return result


def run_configuration(config, seed, data_dir, work_dir, seed_name):
  """Trains, dumps and analyses one configuration and seed; returns its result dict."""
  run_dir = os.path.join(work_dir, config, f'seed{seed}')
  result_path = os.path.join(run_dir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      print(f'== {config}, seed {seed}: done before ({result_path})', flush=True)
      return json.load(f)
  print(f'== {config}, seed {seed} (load {load()})', flush=True)
  values = {'ls': FLAGS.label_smoothing, 'ema': FLAGS.ema_decay}
  backbone_extra, heads_extra = ([a.format(**values) for a in args] for args in CONFIGS[config])
  seed_args = [f'--{seed_name}={seed}'] if seed_name else []
  backbone_dir, cascade_dir = (os.path.join(run_dir, 'model', n) for n in ('backbone', 'cascade'))
  softmax_dir, report_dir, log_dir = (os.path.join(run_dir, n) for n in ('softmax', 'report',
                                                                          'logs'))
  loads = [os.getloadavg()[0]]
  start = time.time()
  seconds = {}
  epochs = str(FLAGS.train_epochs)
  seconds['backbone'], backbone_log = run_step('backbone', [
      'cifar10_main.py', '--flagfile=configs/demo_backbone.flags', '-dd', data_dir,
      '-md', backbone_dir, '-te', epochs, '-ebe', epochs]
      + backbone_extra + seed_args, log_dir)
  pretrained = backbone_dir
  if config == 'ema':
    pretrained = os.path.join(run_dir, 'model', 'backbone_averaged')
    write_averaged_checkpoint(backbone_dir, pretrained)
  loads.append(os.getloadavg()[0])
  seconds['heads_and_dump'], heads_log = run_step('heads_and_dump', [
      'cifar10_main.py', '--flagfile=configs/demo_heads.flags', '-dd', data_dir,
      '-md', cascade_dir, '-pmcp', pretrained, '-te', str(FLAGS.head_epochs),
      '-ebe', str(FLAGS.head_epochs), '--softmax_dir', softmax_dir]
      + heads_extra + seed_args, log_dir)
  loads.append(os.getloadavg()[0])
  seconds['analysis'], _ = run_step('analysis', [
      'analyze_imagenet_labels.py', '--softmax_dir', softmax_dir, '--output_dir', report_dir,
      '--epsilons', ','.join(['0'] + FLAGS.epsilons)], log_dir)
  result = {'config': config, 'seed': seed,
            **measure(softmax_dir, report_dir, [float(e) for e in FLAGS.epsilons]),
            'backbone_images_per_s': training_rate(backbone_log),
            'heads_images_per_s': training_rate(heads_log),
            'seconds': {k: round(v, 1) for k, v in seconds.items()},
            'minutes': round((time.time() - start) / 60, 2),
            'load_1min': [round(v, 2) for v in loads + [os.getloadavg()[0]]]}
  with open(result_path, 'w') as f:
    json.dump(result, f, indent=1)
  print('   {:.1f} min; exits {}; cascade@1% {:.2%}, {:.1%} fewer MACs'.format(
      result['minutes'], ' / '.join('{:.2%}'.format(result[f'exit{k}_top1'])
                                    for k in range(NUM_EXITS)),
      result['cascade_top1@1%'], result['mac_reduction@1%']), flush=True)
  return result


def metric_names():
  names = [f'exit{k}_top1' for k in range(NUM_EXITS)]
  for eps in FLAGS.epsilons:
    tag = f'{100 * float(eps):g}'
    names += [f'cascade_top1@{tag}%', f'mac_reduction@{tag}%']
  return names + [f'exit{k}_ece' for k in range(NUM_EXITS)] + ['backbone_images_per_s']


def spread(values):
  """(mean, half the range): with 2 seeds the range is all there is to say about noise."""
  return statistics.mean(values), (max(values) - min(values)) / 2


def summarize(results):
  """Per configuration: mean and half-range of every metric; differences from the baseline.

  A difference counts as within noise when it is no larger than the sum of the two
  configurations' half-ranges (their seed intervals overlap).
  """
  by_config = {}
  for r in results:
    by_config.setdefault(r['config'], []).append(r)
  summary = {}
  for config, runs in by_config.items():
    summary[config] = {name: spread([r[name] for r in runs if r[name] is not None] or [0.0])
                       for name in metric_names()}
  differences = {}
  base = summary.get('baseline')
  if base:
    for config, stats in summary.items():
      if config == 'baseline':
        continue
      differences[config] = {}
      for name, (mean, half) in stats.items():
        delta = mean - base[name][0]
        differences[config][name] = (delta, abs(delta) <= half + base[name][1])
  return by_config, summary, differences


def _cell(name, value):
  if name.endswith('images_per_s'):
    return f'{value:.0f}'
  if 'ece' in name:
    return f'{value:.4f}'
  return f'{100 * value:.2f}'


def _delta_cell(name, delta):
  if name.endswith('images_per_s'):
    return f'{delta:+.0f}'
  if 'ece' in name:
    return f'{delta:+.4f}'
  return f'{100 * delta:+.2f}'


def print_tables(summary, differences, runs_per_config):
  names = metric_names()
  short = [n.replace('cascade_top1', 'casc').replace('mac_reduction', 'MACred')
           .replace('_top1', '').replace('_images_per_s', ' img/s') for n in names]
  print('\nmean +- half-range over seeds (top-1 and MAC reduction in %, ECE as a fraction)')
  print(f'{"config":<16} {"n":>2} ' + ' '.join(f'{s:>15}' for s in short))
  for config, stats in summary.items():
    cells = [f'{_cell(n, stats[n][0])}+-{_cell(n, stats[n][1])}' for n in names]
    print(f'{config:<16} {runs_per_config[config]:>2} ' + ' '.join(f'{c:>15}' for c in cells))
  if differences:
    print('\ndifference from the baseline (~ : within noise, i.e. no larger than the two '
          'half-ranges together)')
    print(f'{"config":<16}    ' + ' '.join(f'{s:>15}' for s in short))
    for config, diffs in differences.items():
      cells = [_delta_cell(n, d) + (' ~' if noise else '  ') for n, (d, noise) in diffs.items()]
      print(f'{config:<16}    ' + ' '.join(f'{c:>15}' for c in cells))


def write_results(work_dir, results, summary, differences, header):
  base = os.path.join(work_dir, 'recipe_cascade')
  with open(base + '.json', 'w') as f:
    json.dump({'machine': header, 'runs': results,
               'summary': {c: {n: {'mean': m, 'half_range': h} for n, (m, h) in s.items()}
                           for c, s in summary.items()},
               'difference_from_baseline': {
                   c: {n: {'delta': d, 'within_noise': w} for n, (d, w) in s.items()}
                   for c, s in differences.items()}}, f, indent=1)
  names = metric_names()
  with open(base + '.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['config', 'seed'] + names + ['minutes', 'load_1min'])
    for r in results:
      writer.writerow([r['config'], r['seed']] + [r[n] for n in names]
                      + [r['minutes'], ' '.join(str(v) for v in r['load_1min'])])
  return base


def main(_):
  unknown = [c for c in FLAGS.configs if c not in CONFIGS]
  if unknown:
    sys.exit(f'unknown --configs {unknown}: choose from {list(CONFIGS)}')
  from benchmarks import machine
  work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix='recipe_cascade_')
  os.makedirs(work_dir, exist_ok=True)
  header = machine.describe()
  print(header)
  seed_name = seed_flag()
  print('work dir {}; backbone {} epoch(s), heads {} epoch(s), batch 128, ResNet-8 v2, BN decay '
        '0.9; seeds {} ({}); load at start {}'.format(
            work_dir, FLAGS.train_epochs, FLAGS.head_epochs, ','.join(FLAGS.seeds),
            f'passed as --{seed_name}' if seed_name else 'no seed flag in cifar10_main: '
            'independent repetitions', load()), flush=True)
  data_dir = os.path.join(work_dir, 'data')
  if not os.path.isdir(os.path.join(data_dir, 'cifar-10-batches-bin')):
    prepare = ['prepare_fashion_mnist.py', '--output_dir', data_dir]
    for name in ('fashion_mnist_dir', 'train_limit', 'test_limit'):
      if getattr(FLAGS, name):
        prepare += [f'--{name}', str(getattr(FLAGS, name))]
    run_step('prepare', prepare, os.path.join(work_dir, 'logs'))
  start = time.time()
  results = []
  # Seed-major order: a load change on the shared machine then hits every configuration.
  for seed in FLAGS.seeds:
    for config in FLAGS.configs:
      results.append(run_configuration(config, seed, data_dir, work_dir, seed_name))
  by_config, summary, differences = summarize(results)
  print(f'\n{header}')
  print_tables(summary, differences, {c: len(r) for c, r in by_config.items()})
  loads = [v for r in results for v in r['load_1min']]
  print('\n{} runs in {:.1f} min; 1-minute load average during the runs {:.2f}-{:.2f} (median '
        '{:.2f}) on {} cores; at the end {}'.format(
            len(results), (time.time() - start) / 60, min(loads), max(loads),
            statistics.median(loads), os.cpu_count(), load()))
  print('results: {}.json and .csv'.format(write_results(work_dir, results, summary,
                                                          differences, header)))


if __name__ == '__main__':
  app.run(main)
