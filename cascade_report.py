"""The report: printed tables, cascade.csv, the figures, and writing them all at once.

``write_report`` puts ``thresholds.json`` (through ``cascade_thresholds.write``), ``cascade.csv``,
``accuracy_vs_gmacs_<mode>.png`` and ``reliability.png`` into the report folder, all or nothing.
matplotlib is imported only when a figure is drawn, so importing this module stays light.
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


def format_cascade_table(entries, mode, calibration_split, evaluation_split):
  """A printable table of one mode's cascade entries."""
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
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
  title = (f'Cascade, {mode} confidence: evaluated on {evaluation_split}, thresholds from '
           f'{calibration_split}')
  lines = [title, '  '.join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
  lines += ['  '.join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
  return '\n'.join(lines)


def write_cascade_csv(report, path):
  """One row per (mode, scheme, epsilon or global threshold)."""
  num_exits = report['num_exits']
  fields = (['mode', 'scheme', 'epsilon', 'global_threshold']
            + [f'threshold_{k}' for k in range(num_exits - 1)]
            + ['accuracy', 'mean_macs', 'mean_gmacs', 'speedup', 'mac_reduction']
            + [f'exit_share_{k}' for k in range(num_exits)])
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(fields)
    for mode in MODES:
      if mode not in report:
        continue
      scheme_rows = [('classifier_specific', e, e['epsilon'], '', e['thresholds'])
                     for e in report[mode]]
      scheme_rows += [('global', e, '', e['threshold'], [e['threshold']] * (num_exits - 1))
                      for e in report['global_threshold'][mode]]
      for scheme, e, eps, global_t, thresholds in scheme_rows:
        writer.writerow([mode, scheme, eps, global_t] + list(thresholds)
                        + [e['accuracy'], e['mean_macs'], e['mean_macs'] / 1e9, e['speedup'],
                           e['mac_reduction']] + list(e['exit_shares']))


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
  evaluation = report['exit_accuracy'][report['evaluation_split']]
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
  ax.set_ylabel(f'{"top-1" if mode == "top1" else "top-5"} accuracy ({report["evaluation_split"]})')
  ax.set_title(f'Cascade, {mode} confidence, thresholds from {report["calibration_split"]}',
               fontsize=10)
  ax.grid(True, ls=':')
  ax.legend(fontsize=8, loc='lower right')
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
    top.plot(edges[:-1], alpha, color=color, lw=1.5,
             label=f'exit {k}, {report["evaluation_split"]}')
    if not same:
      _, alpha_cal, _ = reliability_curves(calibration_stats[k], mode)
      top.plot(edges[:-1], alpha_cal, color=color, lw=1, ls='--',
               label=f'exit {k}, {report["calibration_split"]}')
    bottom.stairs(freq, edges, color=color, fill=True, alpha=0.35, label=f'exit {k}')
  top.set_ylabel('residual accuracy alpha(delta)')
  top.set_title(f'Reliability of each exit ({mode} confidence)', fontsize=10)
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
    plot_reliability(report, evaluation_stats, calibration_stats, modes[0],
                     os.path.join(staging, RELIABILITY_PNG))
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(os.listdir(staging)):
      os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return sorted(os.listdir(output_dir))
