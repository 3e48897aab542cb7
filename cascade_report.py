"""The report: printed tables, cascade.csv, the figures, and writing them all at once.

``write_report`` puts ``thresholds.json`` (through ``cascade_thresholds.write``), ``cascade.csv``,
``accuracy_vs_gmacs_<mode>.png``, ``reliability.png`` and, with risk-controlled thresholds,
``drop_vs_gmacs_<mode>.png`` into the report folder, all or nothing. Every table and figure names
the images it was measured on (``report['measured_on']``). matplotlib is imported only when a
figure is drawn, so importing this module stays light.
"""

import csv
import os
import shutil
import tempfile

import numpy as np

import cascade_thresholds
from cascade_thresholds import MODES

CASCADE_CSV = 'cascade.csv'
RELIABILITY_PNG = 'reliability.png'
ACCURACY_PNG = 'accuracy_vs_gmacs_{mode}.png'
DROP_PNG = 'drop_vs_gmacs_{mode}.png'
# The rules risk control is compared with (risk_thresholds.baseline_thresholds).
BASELINE_NAMES = {'epsilon_rule': 'epsilon = D, calibration images',
                  'epsilon_rule_train': 'epsilon = D, train (article)',
                  'empirical_rule': 'calibration drop <= D'}
RELIABILITY_BINS = 200


def format_exit_accuracies(accuracies):
  """The original README's block, e.g. 'Classifier 0:\\n Train top-1:0.5208\\n ...'.

  Args:
    accuracies: split name -> list of {exit, top1, top5}; 'train' prints as Train, 'validation'
      as Test (the original's words), each only if present.
  """
  lines = []
  num_exits = max(len(v) for v in accuracies.values())
  for k in range(num_exits):
    lines.append(f'Classifier {k}:')
    for split, word in (('train', 'Train'), ('validation', 'Test')):
      if split in accuracies:
        lines.append(f' {word} top-1:{float(accuracies[split][k]["top1"]):.4}')
        lines.append(f' {word} top-5:{float(accuracies[split][k]["top5"]):.4}')
  return '\n'.join(lines)


def _table(head, rows):
  """Right-aligned columns, two spaces apart: a header line, then one line per row."""
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
  lines = ['  '.join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
  lines += ['  '.join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
  return lines


def _pp(fraction):
  """An accuracy drop as percentage points, e.g. 0.0123 -> '1.23pp'."""
  return f'{100 * fraction:.2f}pp'


def _mac_unit(report):
  """(scale, name) for MAC counts: giga for ImageNet networks, mega for the demo's ResNet-8."""
  return (1e9, 'GMACs') if report['plain_macs'] >= 1e9 else (1e6, 'MMACs')


def format_cascade_table(entries, mode, measured_on):
  """A printable table of one mode's cascade entries.

  Args:
    entries: the report's entries of ``mode`` (the article's rule, one per epsilon).
    mode: 'top1' or 'top5'.
    measured_on: {'calibration': text, 'evaluation': text} naming the images.
  """
  num_thresholds = len(entries[0]['thresholds']) if entries else 0
  num_exits = len(entries[0]['exit_shares']) if entries else 0
  head = (['epsilon'] + [f'delta_{k}' for k in range(num_thresholds)]
          + [f'{mode}_acc', 'GMACs', 'speedup', 'reduction']
          + [f'exit{k}' for k in range(num_exits)])
  rows = []
  for e in entries:
    rows.append([f'{e["epsilon"]:.3f}'] + [f'{t:.4f}' for t in e['thresholds']]
                + [f'{e["accuracy"]:.4f}', f'{e["mean_macs"] / 1e9:.3f}', f'{e["speedup"]:.3f}',
                   f'{100 * e["mac_reduction"]:.1f}%']
                + [f'{100 * s:.1f}%' for s in e['exit_shares']])
  title = (f'Cascade, {mode} confidence: evaluated on {measured_on["evaluation"]}, thresholds '
           f'from {measured_on["calibration"]}')
  return '\n'.join([title] + _table(head, rows))


def _rule_name(entry):
  method = entry['method']
  return f'{method} (delta {entry["delta"]:g})' if entry.get('delta') is not None else method


def format_risk_table(report, mode):
  """The article's epsilon rule and the risk-controlled thresholds side by side.

  Each row: the rule and its parameter, the thresholds, and on the evaluation images the drop
  against the plain network, mean MACs, MAC reduction and exit shares; with coverage trials also
  the share of trials whose drop kept within D and their mean MAC reduction.
  """
  controlled = [e for e in report.get('risk_controlled', []) if e['mode'] == mode]
  with_trials = any('coverage' in e for e in controlled)
  num_exits = report['num_exits']
  scale, unit = _mac_unit(report)
  head = (['rule', 'target'] + [f'delta_{k}' for k in range(num_exits - 1)]
          + ['drop', unit, 'reduction'] + [f'exit{k}' for k in range(num_exits)])
  if with_trials:
    head += ['trials within D', 'trials reduction']

  def row(rule, promise, thresholds, figures, coverage=None):
    cells = ([rule, promise] + [f'{t:.4f}' for t in thresholds]
             + [_pp(figures['drop']), f'{figures["mean_macs"] / scale:.3f}',
                f'{100 * figures["mac_reduction"]:.1f}%']
             + [f'{100 * s:.1f}%' for s in figures['exit_shares']])
    if with_trials:
      cells += ([f'{100 * coverage["share_within"]:.0f}%',
                 f'{100 * coverage["mean_mac_reduction"]:.1f}%'] if coverage else ['', ''])
    return cells

  rows = [row('epsilon', f'eps {100 * e["epsilon"]:g}%', e['thresholds'], e)
          for e in report[mode]]
  rows += [row(_rule_name(e), f'drop <= {_pp(e["accuracy_drop"])}', e['thresholds'],
               e['evaluation'], e.get('coverage')) for e in controlled]
  first = controlled[0] if controlled else {}
  source = {'train': f'the train split ({first.get("candidate_images", 0):,} images)',
            'calibration_part': f'{first.get("candidate_images", 0):,} of the calibration images, '
                                'set aside'}.get(first.get('candidates_from'), '-')
  title = (f'Accuracy drop against compute, {mode}: measured on '
           f'{report["measured_on"]["evaluation"]}; thresholds from '
           f'{report["measured_on"]["calibration"]}; risk-controlled candidates from {source}, '
           f'tested on {first.get("calibration_images", 0):,} calibration images')
  return '\n'.join([title] + _table(head, rows))


def format_coverage_table(report, mode):
  """Per D, how often the drop kept within D over the coverage trials, for the three rules."""
  controlled = [e for e in report.get('risk_controlled', []) if e['mode'] == mode
                and 'coverage' in e]
  if not controlled:
    return ''
  head = ['D', 'rule', 'within D', 'required', 'mean drop', 'max drop', 'mean reduction']
  rows = []
  for e in controlled:
    c = e['coverage']
    required = c.get('required_share_within')
    rows.append([_pp(e['accuracy_drop']), _rule_name(e), f'{100 * c["share_within"]:.1f}%',
                 f'{100 * required:.0f}%' if required is not None else '-',
                 _pp(c['mean_drop']), _pp(c['max_drop']),
                 f'{100 * c["mean_mac_reduction"]:.1f}%'])
    for key, b in c['baselines'].items():
      rows.append(['', BASELINE_NAMES.get(key, key), f'{100 * b["share_within"]:.1f}%', '-',
                   _pp(b['mean_drop']), _pp(b['max_drop']),
                   f'{100 * b["mean_mac_reduction"]:.1f}%'])
  c = controlled[0]['coverage']
  title = (f'Coverage, {mode}: {c["trials"]} random splits of the {report["evaluation_split"]} '
           f'images ({100 * c["calibration_fraction"]:g}% calibrate, the rest evaluate; seed '
           f'{c["seed"]}); drops measured on each split\'s evaluation images')
  return '\n'.join([title] + _table(head, rows))


def write_cascade_csv(report, path):
  """One row per (mode, scheme, epsilon, global threshold or allowed drop D).

  Schemes: classifier_specific (the article's rule), global, and risk_controlled_<method>; the
  figures are those on the evaluation images (``report['measured_on']``). The columns of the
  first schemes come first, as before risk control; its D and the drops are the last columns.
  """
  num_exits = report['num_exits']
  fields = (['mode', 'scheme', 'epsilon', 'global_threshold']
            + [f'threshold_{k}' for k in range(num_exits - 1)]
            + ['accuracy', 'mean_macs', 'mean_gmacs', 'speedup', 'mac_reduction']
            + [f'exit_share_{k}' for k in range(num_exits)] + ['accuracy_drop', 'drop'])
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(fields)
    for mode in MODES:
      if mode not in report:
        continue
      scheme_rows = [('classifier_specific', e, e['epsilon'], '', e['thresholds'], '')
                     for e in report[mode]]
      scheme_rows += [('global', e, '', e['threshold'], [e['threshold']] * (num_exits - 1), '')
                      for e in report['global_threshold'][mode]]
      scheme_rows += [(f'risk_controlled_{e["method"]}', e['evaluation'], '', '', e['thresholds'],
                       e['accuracy_drop'])
                      for e in report.get('risk_controlled', []) if e['mode'] == mode]
      for scheme, e, eps, global_t, thresholds, target in scheme_rows:
        writer.writerow([mode, scheme, eps, global_t] + list(thresholds)
                        + [e['accuracy'], e['mean_macs'], e['mean_macs'] / 1e9, e['speedup'],
                           e['mac_reduction']] + list(e['exit_shares'])
                        + [target, e.get('drop', '')])


def _pyplot():
  import matplotlib  # imported here, when a figure is drawn: importing the module stays light
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_accuracy_vs_gmacs(report, mode, path):
  """Accuracy vs mean GMACs: classifier-specific and global curves, plain net, single exits."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 5))
  cumulative = np.asarray(report['cumulative_macs']) / 1e9
  evaluation = _evaluation_exit_accuracy(report)
  entries = sorted(report[mode], key=lambda e: (e['mean_macs'], e['epsilon']))
  x = [e['mean_macs'] / 1e9 for e in entries]
  y = [e['accuracy'] for e in entries]
  ax.plot(x, y, 'o-', color='red', lw=2, ms=4, label='classifier-specific thresholds')
  baseline = sorted(report['global_threshold'][mode], key=lambda e: e['mean_macs'])
  ax.plot([e['mean_macs'] / 1e9 for e in baseline], [e['accuracy'] for e in baseline], '--',
          color='orange', lw=1.5, label='one global threshold')
  ax.plot([report['plain_macs'] / 1e9], [evaluation[-1][mode]], '*', color='black', ms=12,
          label='plain network')
  ax.plot(cumulative, [a[mode] for a in evaluation], 's', color='tab:blue', ms=6,
          label='single exit')
  for k, (cx, a) in enumerate(zip(cumulative, evaluation, strict=True)):
    ax.annotate(f'exit {k}', (cx, a[mode]), textcoords='offset points', xytext=(5, -10),
                fontsize=8, color='tab:blue')
  # Label the epsilons of the points whose label would not overlap an earlier one.
  (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
  shown = []
  for e, xi, yi in zip(entries, x, y, strict=True):
    if all(abs(xi - a) > 0.06 * (x1 - x0) or abs(yi - b) > 0.04 * (y1 - y0) for a, b in shown):
      ax.annotate(f'{100 * e["epsilon"]:g}%', (xi, yi), textcoords='offset points', xytext=(4, 4),
                  fontsize=7, color='red')
      shown.append((xi, yi))
  ax.set_xlabel('Giga-MACs per image (mean)')
  ax.set_ylabel(f'{"top-1" if mode == "top1" else "top-5"} accuracy (evaluation images)')
  ax.set_title(f'Cascade, {mode} confidence\n{_measured_on(report)}', fontsize=8)
  ax.grid(True, ls=':')
  ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


def _evaluation_exit_accuracy(report):
  """Per-exit accuracies on the evaluation images (version-1 reports: the evaluation split)."""
  return report.get('evaluation_exit_accuracy',
                    report['exit_accuracy'][report['evaluation_split']])


def _measured_on(report):
  """Two lines for a figure's title: where it was measured, where the thresholds came from."""
  where = report.get('measured_on', {'evaluation': report['evaluation_split'],
                                     'calibration': report['calibration_split']})
  return f'evaluated on {where["evaluation"]}\nthresholds from {where["calibration"]}'


def plot_drop_vs_gmacs(report, mode, path):
  """Drop against mean MACs on the evaluation images: the epsilon rule and risk control.

  The article's thresholds (one point per epsilon) and the risk-controlled ones (one per allowed
  drop D, with D as a dotted line) on the same axes, so that what each rule promises can be read
  against what it delivers and saves.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 5))
  scale, unit = _mac_unit(report)
  entries = sorted(report[mode], key=lambda e: (e['mean_macs'], e['epsilon']))
  x = [e['mean_macs'] / scale for e in entries]
  y = [100 * e['drop'] for e in entries]
  ax.plot(x, y, 'o-', color='red', lw=1.5, ms=4,
          label='article\'s epsilon rule, tuned on the calibration images')
  shown = []
  for e, xi, yi in zip(entries, x, y, strict=True):
    # Large epsilons send every image to exit 0: one point, labelled once.
    if all(abs(xi - a) > 0.02 * (x[-1] - x[0] + 1e-12) or abs(yi - b) > 0.3 for a, b in shown):
      ax.annotate(f'eps {100 * e["epsilon"]:g}%', (xi, yi), textcoords='offset points',
                  xytext=(4, 4), fontsize=7, color='red')
      shown.append((xi, yi))
  controlled = [e for e in report.get('risk_controlled', []) if e['mode'] == mode]
  colors = ['tab:blue', 'tab:green', 'tab:purple', 'tab:brown', 'tab:cyan', 'tab:olive']
  for i, e in enumerate(controlled):
    color = colors[i % len(colors)]
    figures = e['evaluation']
    label = f'{_rule_name(e)}, D = {100 * e["accuracy_drop"]:g}pp'
    if 'coverage' in e:
      label += f' (within D in {100 * e["coverage"]["share_within"]:.0f}% of trials)'
    ax.plot([figures['mean_macs'] / scale], [100 * figures['drop']], 'D', color=color, ms=8,
            label=label)
    article = e.get('baselines', {}).get('epsilon_rule_train')
    if article:
      ax.plot([article['evaluation']['mean_macs'] / scale], [100 * article['evaluation']['drop']],
              's', color=color, ms=8, mfc='none', mew=1.5,
              label=f'epsilon = {100 * e["accuracy_drop"]:g}%, tuned on train (the article)')
    ax.axhline(100 * e['accuracy_drop'], color=color, ls=':', lw=1)
  ax.plot([report['plain_macs'] / scale], [0.0], '*', color='black', ms=12, label='plain network')
  if controlled:
    # Large epsilons drop by many points; the scale that matters is that of the promises.
    top = 100 * max(2 * max(e['accuracy_drop'] for e in controlled),
                    max(e['evaluation']['drop'] for e in controlled))
    ax.set_ylim(min(-0.1 * top, min(y)), 1.15 * top)
  ax.set_xlabel(f'{unit} per image (mean)')
  ax.set_ylabel(f'{"top-1" if mode == "top1" else "top-5"} accuracy drop against the plain '
                'network (pp)')
  ax.set_title(f'Accuracy drop against compute, {mode}\n{_measured_on(report)}', fontsize=8)
  ax.grid(True, ls=':')
  ax.legend(fontsize=7, loc='upper right')
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


def reliability_curves(stats, mode, bins=RELIABILITY_BINS):
  """Residual accuracy and confidence histogram of one exit on ``bins`` equal bins of [0, 1].

  Args:
    stats: ExitStats of the exit. mode: 'top1' or 'top5'. bins: number of bins.

  Returns:
    (edges float [bins + 1], alpha float [bins] at each left edge, NaN where no sample reaches
    it, frequency float [bins] share of samples per bin).
  """
  edges = np.linspace(0.0, 1.0, bins + 1)
  values, alpha, _ = stats.residual_curve(mode)
  confidences = stats.confidence(mode)
  index = np.searchsorted(values, edges[:-1], side='left')
  curve = np.full(bins, np.nan)
  inside = index < values.size
  curve[inside] = alpha[index[inside]]
  # Top-5 sums may exceed 1.0 by rounding: count them in the last bin.
  counts, _ = np.histogram(np.clip(confidences, 0.0, 1.0), bins=edges)
  return edges, curve, counts / max(1, len(confidences))


def plot_reliability(report, evaluation_stats, calibration_stats, mode, path):
  """Section 10's figure: alpha_k(delta) per exit (top) and the confidence histogram (bottom)."""
  plt = _pyplot()
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
  colors = ['red', 'orange', 'green', 'blue', 'purple', 'brown']
  same = calibration_stats is evaluation_stats
  for k, stats in enumerate(evaluation_stats):
    color = colors[k % len(colors)]
    edges, alpha, freq = reliability_curves(stats, mode)
    top.plot(edges[:-1], alpha, color=color, lw=1.5, label=f'exit {k}, evaluation images')
    if not same:
      _, alpha_cal, _ = reliability_curves(calibration_stats[k], mode)
      top.plot(edges[:-1], alpha_cal, color=color, lw=1, ls='--',
               label=f'exit {k}, calibration images')
    bottom.stairs(freq, edges, color=color, fill=True, alpha=0.35, label=f'exit {k}')
  top.set_ylabel('residual accuracy alpha(delta)')
  top.set_title(f'Reliability of each exit ({mode} confidence)\n{_measured_on(report)}',
                fontsize=8)
  bottom.set_title('confidence histogram of the evaluation images', fontsize=8)
  top.grid(True, ls=':')
  top.legend(fontsize=7)
  bottom.set_xlabel('confidence delta')
  bottom.set_ylabel('share of images')
  bottom.grid(True, ls=':')
  bottom.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


def write_report(report, evaluation_stats, calibration_stats, output_dir):
  """Writes thresholds.json, cascade.csv and the figures; all or nothing.

  Everything goes to a temporary folder beside ``output_dir`` first; only when every file is
  complete are they moved in (renames on one file system), so an error leaves no partial report
  and other files already in ``output_dir`` are left alone.
  """
  output_dir = os.path.abspath(output_dir)
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(output_dir)}.partial-', dir=parent)
  try:
    cascade_thresholds.write(report, os.path.join(staging, cascade_thresholds.FILE_NAME))
    write_cascade_csv(report, os.path.join(staging, CASCADE_CSV))
    modes = [m for m in MODES if m in report]
    for mode in modes:
      plot_accuracy_vs_gmacs(report, mode, os.path.join(staging, ACCURACY_PNG.format(mode=mode)))
      if any(e['mode'] == mode for e in report.get('risk_controlled', [])):
        plot_drop_vs_gmacs(report, mode, os.path.join(staging, DROP_PNG.format(mode=mode)))
    plot_reliability(report, evaluation_stats, calibration_stats, modes[0],
                     os.path.join(staging, RELIABILITY_PNG))
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(os.listdir(staging)):
      os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return sorted(os.listdir(output_dir))
