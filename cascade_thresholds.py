"""The thresholds file: the one contract between the analysis and the early-exit exporter.

``analyze_imagenet_labels.py`` writes it with ``write``; ``cascade_export.py`` (through
``--cascade_thresholds``) and the run loop's early flag check read it with ``read``, which checks
the whole file once and then hands out the thresholds of one (mode, epsilon) or, for thresholds
with a guaranteed accuracy drop, one (mode, accuracy_drop): ``Thresholds.thresholds_for``. Like
``dump_layout.py`` for the dumps, this module needs neither numpy nor TensorFlow.

``thresholds.json``::

    {
      "format_version": 2,
      "num_classes": 1001, "num_exits": 3,
      "stage_macs": [s0, s1, s2],          # incremental MACs of each stage (int)
      "cumulative_macs": [s0, s0+s1, ...], # cost of leaving at each exit
      "plain_macs": 4037883817,            # the network without exit heads: speedup baseline
      "calibration_split": "train", "evaluation_split": "validation",
      "calibration_fraction": null,        # or F: a random F of the evaluation split calibrates,
      "calibration_seed": null,            #   the other 1 - F evaluates (seeded, disjoint)
      "calibration_images": N, "evaluation_images": M,
      "measured_on": {"calibration": "train (N images)", "evaluation": "validation (M images)"},
      "num_images": {"train": N, "validation": M},
      "never_exit_threshold": 2.0,
      "exit_accuracy": {"validation": [{"exit": 0, "top1": a, "top5": b}, ...], "train": [...]},
      "evaluation_exit_accuracy": [{"exit": 0, "top1": a, "top5": b}, ...],  # evaluation images
      "top1": [                            # the article's rule: one entry per epsilon, ascending
        {"epsilon": 0.05,
         "thresholds": [delta_0, delta_1], # one per early exit (not the last), compare with >=
         "accuracy": 0.7590, "drop": 0.0057, "mean_macs": 3.49e9, "speedup": 1.158,
         "mac_reduction": 0.136,
         "exit_shares": [f0, f1, f2]},     # fractions of images leaving at each exit
        ...],                              # "top5" alike
      "global_threshold": {"top1": [{"threshold": t, "accuracy": ..., "mean_macs": ...,
                                     "speedup": ..., "mac_reduction": ..., "exit_shares": [...]},
                                    ...], "top5": [...]},
      "risk_controlled": [                 # thresholds with a guaranteed drop (may be absent)
        {"mode": "top1", "accuracy_drop": 0.01, "delta": 0.1, "method": "ltt",
         "thresholds": [t_0, t_1],
         "calibration_images": n, "candidates_from": "train", "candidate_images": N,
         "num_candidates": J, "candidate_index": j, "candidate_epsilon": e,
         "calibration": {"drop": ..., "bounded_risk": ..., "score": ...},
         "evaluation": {"images": m, "accuracy": ..., "drop": ..., "mean_macs": ...,
                        "speedup": ..., "mac_reduction": ..., "exit_shares": [...]},
         "baselines": {"epsilon_rule": {"thresholds": [...], "evaluation": {...}},
                       "epsilon_rule_train": ..., "empirical_rule": ...},  # no promise kept
         "monotonicity_violations": {"count": c, "max_decrease": m},      # crc only
         "coverage": {"trials": R, "share_within": ..., "mean_mac_reduction": ..., ...}},
                                           # only with --coverage_trials
        ...],
      "source": {"softmax_dir": ..., "layout": "current" or "original", "model": ..., ...}
    }

A report made with ``--top5`` has no ``top1`` key. Thresholds are float32 confidences written as
exact decimal expansions; confidences and thresholds are compared in float32, offline as in the
exported model. A sample leaves early exit k when its confidence >= thresholds[k]; the last exit
takes every sample left.

Versions: 1 had neither ``risk_controlled`` nor the calibration fields; it is still read (its
epsilon thresholds mean the same), it just has no accuracy-drop entries.
"""

import json
import math
import os
import secrets

FILE_NAME = 'thresholds.json'
FORMAT_VERSION = 2
# Version 2 only added keys (risk_controlled, the calibration fields), so a version-1 file still
# means what it meant.
READABLE_VERSIONS = (1, 2)
# top1: the confidence is the largest probability; top5: the sum of the TOP_K largest.
MODES = ('top1', 'top5')
TOP_K = 5
# A threshold no confidence reaches (a top-5 sum can exceed 1.0 by rounding, never 2.0), for an
# exit that must never take a sample; a plain number keeps the JSON portable.
NEVER_EXIT_THRESHOLD = 2.0
# Epsilons and accuracy drops are matched within this distance: 0.05 typed on a command line is
# 0.05 in the file.
EPSILON_TOLERANCE = 1e-6
# How the risk-controlled thresholds were chosen (analyze_imagenet_labels.py --risk_control).
RISK_CONTROL_METHODS = ('ltt', 'crc')

_REWRITE = 're-run analyze_imagenet_labels.py to write it again'


class ThresholdsError(ValueError):
  """A thresholds file that cannot serve the request; the message names the file and the fix."""


class MalformedThresholdsError(ThresholdsError):
  """Not JSON, or not the layout of the module docstring (damaged, cut short, hand-edited)."""


class WrongModelError(ThresholdsError):
  """Made for a model with another class or exit count."""


class MissingEntryError(ThresholdsError):
  """The file has no thresholds for the requested mode or epsilon."""


def _is_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write(report, path):
  """Writes ``report`` (the dict of the module docstring) to ``path`` atomically.

  The JSON goes to a uniquely named temporary file beside ``path`` and is renamed over it, so a
  reader never sees half a file and two writers never share a temporary.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f'{path}.{os.getpid()}-{secrets.token_hex(4)}.partial'
  # O_EXCL: never another writer's file; mode 0o666 less the umask, as open() would give.
  handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(handle, 'w') as f:
      json.dump(report, f, indent=2)
      f.write('\n')
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def read(path, num_classes=None, num_exits=None):
  """Reads and checks a thresholds file once.

  Args:
    path: a thresholds.json written by analyze_imagenet_labels.py.
    num_classes: the model's class count, or None not to check it.
    num_exits: the model's exit count, or None not to check it.

  Returns:
    A ``Thresholds``.

  Raises:
    FileNotFoundError: no such file.
    MalformedThresholdsError: not JSON, another format version, or entries of the wrong shape.
    WrongModelError: made for a model with another class or exit count.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no thresholds file {path}; analyze_imagenet_labels.py writes one '
                            f'(<--output_dir>/{FILE_NAME}) from the softmax dumps')
  try:
    with open(path) as f:
      report = json.load(f)
  except json.JSONDecodeError as e:
    raise MalformedThresholdsError(
        f'{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): it is damaged '
        f'or was cut short; {_REWRITE}') from e
  except UnicodeDecodeError as e:
    raise MalformedThresholdsError(f'{path} is not a text file ({e.reason}); {_REWRITE}') from e
  if not isinstance(report, dict):
    raise MalformedThresholdsError(f'{path} holds a JSON {type(report).__name__}, not the '
                                   f'thresholds object; {_REWRITE}')
  version = report.get('format_version')
  if version not in READABLE_VERSIONS or isinstance(version, bool):
    readable = ' and '.join(str(v) for v in READABLE_VERSIONS)
    raise MalformedThresholdsError(f'{path} has format version {version}, this code reads '
                                   f'versions {readable}; {_REWRITE}')
  for key in ('num_classes', 'num_exits'):
    if not isinstance(report.get(key), int) or isinstance(report.get(key), bool):
      raise MalformedThresholdsError(f'{path}: "{key}" must be an integer, got '
                                     f'{report.get(key)!r}; {_REWRITE}')
  problems = []
  if num_classes is not None and report['num_classes'] != num_classes:
    problems.append(f'{report["num_classes"]} classes (the model has {num_classes})')
  if num_exits is not None and report['num_exits'] != num_exits:
    problems.append(f'{report["num_exits"]} exits (the model has {num_exits})')
  if problems:
    raise WrongModelError(f'--cascade_thresholds {path} was made for another model: '
                          f'{" and ".join(problems)}; run analyze_imagenet_labels.py on this '
                          'model\'s dumps')
  modes = [m for m in MODES if m in report]
  if not modes:
    raise MalformedThresholdsError(f'{path} holds no thresholds (neither of {MODES}); {_REWRITE}')
  for mode in modes:
    entries = report[mode]
    if not isinstance(entries, list):
      raise MalformedThresholdsError(f'{path}: "{mode}" must be a list of entries; {_REWRITE}')
    for i, entry in enumerate(entries):
      thresholds = entry.get('thresholds') if isinstance(entry, dict) else None
      if (not isinstance(entry, dict) or not _is_number(entry.get('epsilon'))
          or not isinstance(thresholds, list) or len(thresholds) != report['num_exits'] - 1
          or not all(_is_number(t) for t in thresholds)):
        raise MalformedThresholdsError(
            f'{path}: entry {i} of "{mode}" needs a numeric "epsilon" and '
            f'{report["num_exits"] - 1} numeric "thresholds" (one per early exit), got '
            f'{entry!r:.200}; {_REWRITE}')
  _check_risk_controlled(path, report)
  return Thresholds(path, report)


def _check_risk_controlled(path, report):
  """Checks the optional "risk_controlled" list: shapes, and one entry per (mode, drop)."""
  entries = report.get('risk_controlled', [])
  if not isinstance(entries, list):
    raise MalformedThresholdsError(f'{path}: "risk_controlled" must be a list of entries; '
                                   f'{_REWRITE}')
  seen = []
  for i, entry in enumerate(entries):
    thresholds = entry.get('thresholds') if isinstance(entry, dict) else None
    drop = entry.get('accuracy_drop') if isinstance(entry, dict) else None
    if (not isinstance(entry, dict) or entry.get('mode') not in MODES
        or not _is_number(drop) or not 0 < drop < 1
        or not isinstance(thresholds, list) or len(thresholds) != report['num_exits'] - 1
        or not all(_is_number(t) for t in thresholds)):
      raise MalformedThresholdsError(
          f'{path}: entry {i} of "risk_controlled" needs a "mode" of {MODES}, an "accuracy_drop" '
          f'in (0, 1) and {report["num_exits"] - 1} numeric "thresholds" (one per early exit), '
          f'got {entry!r:.200}; {_REWRITE}')
    for mode, other in seen:
      if mode == entry['mode'] and abs(other - drop) <= EPSILON_TOLERANCE:
        raise MalformedThresholdsError(
            f'{path}: "risk_controlled" holds two {mode} entries for accuracy drop {drop:g}; '
            f'{_REWRITE}')
    seen.append((entry['mode'], drop))


def _listed(values):
  return ', '.join(f'{v:g}' for v in values) or 'none'


class Thresholds:
  """A checked thresholds file: the report and lookups by (mode, epsilon) or (mode, drop)."""

  def __init__(self, path, report):
    self.path = path
    self.report = report
    self.num_classes = report['num_classes']
    self.num_exits = report['num_exits']
    self.modes = tuple(m for m in MODES if m in report)

  def entry(self, mode, epsilon):
    """The entry of ``mode`` whose epsilon is within EPSILON_TOLERANCE of ``epsilon``.

    Returns:
      dict with epsilon, thresholds (num_exits - 1 floats) and, when the analysis wrote it, the
      offline accuracy, mean_macs, speedup, mac_reduction and exit_shares.

    Raises:
      ValueError: ``mode`` is not one of MODES.
      MissingEntryError: the file lacks the mode, or the epsilon (the message lists those it has).
    """
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if mode not in self.report:
      raise MissingEntryError(f'{self.path} has no {mode} thresholds (modes present: '
                              f'{list(self.modes)}); re-run the analysis without --top5')
    for entry in self.report[mode]:
      if abs(entry['epsilon'] - float(epsilon)) <= EPSILON_TOLERANCE:
        return entry
    available = ', '.join(f'{e["epsilon"]:g}' for e in self.report[mode])
    raise MissingEntryError(f'{self.path}: no {mode} thresholds for epsilon {epsilon:g}; '
                            f'available: {available} (epsilon is a fraction: 0.05 means 5%)')

  def thresholds(self, mode, epsilon):
    """num_exits - 1 floats: a sample leaves exit k if its confidence >= thresholds[k].

    NEVER_EXIT_THRESHOLD (2.0) means the exit never takes a sample.
    """
    return [float(t) for t in self.entry(mode, epsilon)['thresholds']]

  def epsilons(self, mode):
    """The epsilons of the article's rule the file has for ``mode`` (empty if none)."""
    return [float(e['epsilon']) for e in self.report.get(mode, [])]

  def accuracy_drops(self, mode):
    """The accuracy drops with risk-controlled thresholds for ``mode`` (empty if none)."""
    return [float(e['accuracy_drop']) for e in self.report.get('risk_controlled', [])
            if e['mode'] == mode]

  def risk_controlled(self, mode, accuracy_drop):
    """The risk-controlled entry of ``mode`` for an allowed drop within EPSILON_TOLERANCE.

    Args:
      mode: 'top1' or 'top5'.
      accuracy_drop: the allowed accuracy drop D as a fraction (0.01: one percentage point).

    Returns:
      dict with mode, accuracy_drop, delta, method, thresholds (num_exits - 1 floats),
      calibration_images, candidates_from, and the offline "evaluation" (and "coverage") figures.

    Raises:
      ValueError: ``mode`` is not one of MODES.
      MissingEntryError: the file has no risk-controlled thresholds, none for ``mode``, or none
        for ``accuracy_drop`` (the message lists those it has and how to make others).
    """
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    entries = self.report.get('risk_controlled', [])
    remake = ('re-run analyze_imagenet_labels.py with --calibration_split validation '
              f'--calibration_fraction 0.5 --accuracy_drop {float(accuracy_drop):g}')
    if not entries:
      raise MissingEntryError(f'{self.path} has no risk-controlled thresholds (no accuracy drop '
                              f'is guaranteed by its epsilon thresholds); {remake}')
    for entry in entries:
      if entry['mode'] == mode and abs(entry['accuracy_drop'] - float(accuracy_drop)) <= (
          EPSILON_TOLERANCE):
        return entry
    drops = self.accuracy_drops(mode)
    if not drops:
      present = sorted({e['mode'] for e in entries})
      raise MissingEntryError(f'{self.path} has no {mode} risk-controlled thresholds (modes '
                              f'present: {present}); {remake}'
                              + ('' if mode == 'top5' else ' without --top5'))
    raise MissingEntryError(f'{self.path}: no {mode} risk-controlled thresholds for accuracy drop '
                            f'{float(accuracy_drop):g}; available: {_listed(drops)} (a fraction: '
                            f'0.01 means one percentage point); or {remake}')

  def entry_for(self, mode, epsilon=None, accuracy_drop=None):
    """The entry for exactly one of ``epsilon`` (the article's rule) and ``accuracy_drop``.

    Raises:
      ValueError: both or neither given (the message lists what the file has), or a bad mode.
      MissingEntryError: as ``entry`` and ``risk_controlled``.
    """
    if (epsilon is None) == (accuracy_drop is None):
      given = 'both' if epsilon is not None else 'neither'
      raise ValueError(
          f'give exactly one of epsilon (--epsilon, the article\'s rule) and accuracy_drop '
          f'(--accuracy_drop, a guaranteed drop), got {given}; {self.path} has {mode} epsilons '
          f'{_listed(self.epsilons(mode))} and accuracy drops '
          f'{_listed(self.accuracy_drops(mode))}')
    if epsilon is not None:
      return self.entry(mode, epsilon)
    return self.risk_controlled(mode, accuracy_drop)

  def thresholds_for(self, mode, epsilon=None, accuracy_drop=None):
    """num_exits - 1 floats for exactly one of ``epsilon`` and ``accuracy_drop``; see entry_for.

    A sample leaves exit k if its confidence >= thresholds[k]; NEVER_EXIT_THRESHOLD (2.0) means
    the exit never takes a sample (risk control may choose that for every early exit when no
    candidate keeps the promise).
    """
    return [float(t) for t in self.entry_for(mode, epsilon, accuracy_drop)['thresholds']]

  def offline_estimate(self, mode, epsilon=None, accuracy_drop=None):
    """What the analysis measured for these thresholds on its evaluation images.

    Returns:
      dict with those of accuracy, mean_macs, speedup and exit_shares the file holds (for either
      kind of entry), to compare with what the exported model measures.
    """
    entry = self.entry_for(mode, epsilon, accuracy_drop)
    figures = entry.get('evaluation', {}) if accuracy_drop is not None else entry
    return {k: figures[k] for k in ('accuracy', 'mean_macs', 'speedup', 'exit_shares')
            if k in figures}
