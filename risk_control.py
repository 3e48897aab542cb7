"""Risk-controlled exit thresholds: pick per-exit thresholds whose accuracy drop is bounded.

A cascade with threshold vector lambda = (t_0, ..., t_{K-2}) answers image i at exit e_i(lambda).
Its loss against the plain network is L_i = final_correct_i - cascade_correct_i in {-1, 0, 1};
the mean of L is the accuracy drop. Given candidates ordered from safe (nobody leaves early) to
aggressive, fixed before the calibration losses are seen, and calibration images exchangeable with
the images the cascade will see later (not the training images), this module picks one candidate:

* ``ltt_select``, Learn then Test (Angelopoulos et al., arXiv 2110.01052): fixed-sequence testing
  of H_j "true drop of candidate j > D" with Hoeffding-Bentkus p-values. With probability at least
  1 - delta over the calibration draw, the chosen thresholds have a true drop <= D.
* ``crc_select``, Conformal Risk Control (Angelopoulos et al., arXiv 2208.02814): the expected
  drop on a new image, over calibration draw and image, is <= D, provided the loss does not
  decrease along the candidate order (``monotonicity_violations`` reports where it does).
* ``empirical_select``: the naive "calibration drop <= D" rule, no guarantee, as a baseline.

Jazbec, Timans et al., "Fast yet Safe: Early-Exiting with Risk Control" (arXiv 2405.20915) apply
both to early-exit networks. Both guarantees need losses in [0, 1], so LTT and CRC use
max(L, 0): the share of images the plain network gets right and the cascade gets wrong. Since
E[L] <= E[max(L, 0)], a bound on the latter bounds the drop too, but images that an early exit
gets right and the last exit gets wrong no longer offset anything, which costs power.

Only numpy and scipy are needed (no TensorFlow). Confidences and thresholds are compared in
float32, as the exported model does; the last exit takes every image left, unconditionally.
"""

import dataclasses
import math

import numpy as np
from scipy import special, stats

METHODS = ('ltt', 'crc', 'empirical')
NEVER_EXIT = -1  # Selection.index when no candidate qualifies: no image leaves early.
# exits_for_candidates works on blocks of candidates of at most this many (candidate, image)
# pairs, so its temporaries stay a few tens of MB whatever the number of candidates.
_BLOCK_ELEMENTS = 1 << 22
# n * risk_hat is a count of failures for 0/1 losses; this absorbs its floating-point rounding
# (a count k stored as k / n * n = k + 1e-13 must not move the binomial tail to k + 1).
_COUNT_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True, eq=False)
class Selection:
  """What a selection rule picked, and the per-candidate numbers it decided on.

  Attributes:
    index: the chosen candidate (row of the loss matrix), or ``NEVER_EXIT`` (-1) when none
      qualifies: then the caller must not let any image leave early.
    method: 'ltt', 'crc' or 'empirical'.
    num_samples: n, the number of calibration images.
    risks: float64 [J], each candidate's empirical mean loss on the calibration images: of
      max(L, 0) for 'ltt' and 'crc', of L itself (the drop) for 'empirical'.
    scores: float64 [J], what is compared with ``level``: p-values for 'ltt', the conformal
      bound n / (n + 1) * risk + bound / (n + 1) for 'crc', ``risks`` for 'empirical'.
    level: delta for 'ltt', the target D for 'crc' and 'empirical'. Candidate j passes iff
      scores[j] <= level.
  """
  index: int
  method: str
  num_samples: int
  risks: np.ndarray
  scores: np.ndarray
  level: float

  @property
  def passed(self):
    """bool [J]: scores <= level, per candidate (whether or not the walk reached it)."""
    return self.scores <= self.level


@dataclasses.dataclass(frozen=True, eq=False)
class MonotonicityViolations:
  """Where the empirical bounded risk decreases along the candidate order.

  Attributes:
    indices: int64 [M], the candidates j >= 1 with risk[j] < risk[j - 1].
    decreases: float64 [M], risk[j - 1] - risk[j] at those candidates (positive).
  """
  indices: np.ndarray
  decreases: np.ndarray

  @property
  def count(self):
    return int(self.indices.size)

  @property
  def max_decrease(self):
    return float(self.decreases.max()) if self.decreases.size else 0.0


def _check_open_interval(value, name, low=0.0, high=1.0):
  value = float(value)
  if not low < value < high:
    raise ValueError(f'{name} must be in ({low:g}, {high:g}), got {value}')
  return value


def exits_for_candidates(confidences, candidates, *, max_block_elements=_BLOCK_ELEMENTS):
  """Which exit each image leaves at, for every candidate threshold vector.

  Args:
    confidences: float [K, N], each exit's confidence per image.
    candidates: float [J, K - 1], one threshold per early exit per candidate.
    max_block_elements: candidates are processed in blocks of about this many (candidate, image)
      pairs, which bounds the temporaries; the result itself is J * N * 8 bytes.

  Returns:
    int64 [J, N]: per candidate j and image i, the first exit k < K - 1 with
    float32(confidences[k, i]) >= float32(candidates[j, k]), else K - 1 (the last exit takes
    everything left). A NaN confidence never leaves early.

  Raises:
    ValueError: if the shapes do not match.
  """
  conf = np.asarray(confidences, dtype=np.float32)
  thresholds = np.asarray(candidates, dtype=np.float32)
  if conf.ndim != 2 or conf.shape[0] < 1:
    raise ValueError(f'confidences must be [num_exits, num_images], got shape {conf.shape}')
  num_exits, num_images = conf.shape
  if thresholds.ndim != 2 or thresholds.shape[1] != num_exits - 1:
    raise ValueError(f'candidates must be [num_candidates, {num_exits - 1}] (one threshold per '
                     f'early exit of the {num_exits}), got shape {thresholds.shape}; reshape a '
                     f'single vector with .reshape(1, -1)')
  num_candidates = thresholds.shape[0]
  exits = np.full((num_candidates, num_images), num_exits - 1, dtype=np.int64)
  block = max(1, int(max_block_elements) // max(1, num_images))
  for start in range(0, num_candidates, block):
    stop = min(start + block, num_candidates)
    out = exits[start:stop]                                               # view [B, N]
    # Later exits first, so an earlier exit that also qualifies overwrites them.
    for k in range(num_exits - 2, -1, -1):
      out[conf[k][None, :] >= thresholds[start:stop, k, None]] = k
  return exits


def cascade_losses(exit_taken, correct):
  """Per-image loss of the cascade against the plain network.

  Args:
    exit_taken: int [J, N] or [N], the exit each image leaves at (per candidate).
    correct: bool [K, N], whether each exit's answer is right, per image.

  Returns:
    int8, the shape of ``exit_taken``: correct[K - 1, i] - correct[exit, i], in {-1, 0, 1}.
    1 where the plain network is right and the cascade wrong, -1 the other way round.

  Raises:
    ValueError: if the shapes do not match or an exit index is out of range.
  """
  correct = np.asarray(correct)
  exit_taken = np.asarray(exit_taken)
  if correct.ndim != 2:
    raise ValueError(f'correct must be [num_exits, num_images], got shape {correct.shape}')
  num_exits, num_images = correct.shape
  if exit_taken.ndim not in (1, 2) or exit_taken.shape[-1] != num_images:
    raise ValueError(f'exit_taken must be [num_candidates, {num_images}] or [{num_images}], got '
                     f'shape {exit_taken.shape}')
  if not np.issubdtype(exit_taken.dtype, np.integer):
    raise ValueError(f'exit_taken must hold integer exit indices, got {exit_taken.dtype}')
  if exit_taken.size and (exit_taken.min() < 0 or exit_taken.max() >= num_exits):
    raise ValueError(f'exit indices must be in [0, {num_exits - 1}], got '
                     f'[{exit_taken.min()}, {exit_taken.max()}]')
  correct = correct.astype(bool)
  cascade = correct[exit_taken, np.arange(num_images)]                  # shape of exit_taken
  return correct[-1].astype(np.int8) - cascade.astype(np.int8)


def hoeffding_bentkus_pvalue(risk_hat, n, target):
  """Hoeffding-Bentkus p-value of H0: true risk > target, for losses in [0, 1].

  p = min(p_H, p_B), clipped to [0, 1], with
  p_H = exp(-n * h(min(risk_hat, target), target)), h(a, b) = a log(a / b) +
  (1 - a) log((1 - a) / (1 - b)) (0 log 0 = 0), and
  p_B = e * BinomCDF(ceil(n * risk_hat); n, target).
  Both are nondecreasing in risk_hat, so p is too; p = 1 once risk_hat >= target.

  Args:
    risk_hat: float scalar or array, empirical mean loss over the n samples, in [0, 1].
    n: number of samples (positive int).
    target: the risk level tested, in (0, 1).

  Returns:
    float for a scalar ``risk_hat``, else float64 array of its shape.

  Raises:
    ValueError: if target is not in (0, 1), n < 1, or a risk_hat is outside [0, 1].
  """
  target = _check_open_interval(target, 'target')
  if int(n) != n or n < 1:
    raise ValueError(f'n must be a positive integer, got {n}')
  n = int(n)
  scalar = np.ndim(risk_hat) == 0
  risk = np.asarray(risk_hat, dtype=np.float64)
  if np.isnan(risk).any():
    raise ValueError('risk_hat must be in [0, 1], got NaN')
  if (risk < -1e-12).any() or (risk > 1 + 1e-12).any():
    raise ValueError('risk_hat must be in [0, 1] (mean of losses bounded in [0, 1]; clip '
                     f'losses with max(L, 0)), got values in [{risk.min()}, {risk.max()}]')
  risk = np.clip(risk, 0.0, 1.0)
  a = np.minimum(risk, target)
  divergence = special.xlogy(a, a / target) + special.xlogy(1 - a, (1 - a) / (1 - target))
  p_hoeffding = np.exp(-n * np.maximum(divergence, 0.0))
  failures = np.ceil(n * risk - _COUNT_TOLERANCE)
  p_bentkus = math.e * stats.binom.cdf(failures, n, target)
  p = np.clip(np.minimum(p_hoeffding, p_bentkus), 0.0, 1.0)
  return float(p) if scalar else p


def _bounded_risks(losses, upper, name='losses'):
  """Empirical means of max(losses, 0) per candidate: float64 [J], and n."""
  losses = np.asarray(losses)
  if losses.ndim != 2 or losses.shape[1] < 1:
    raise ValueError(f'{name} must be [num_candidates, num_images] with at least one image, got '
                     f'shape {losses.shape}')
  if losses.dtype == bool:
    losses = losses.astype(np.int8)
  if not np.issubdtype(losses.dtype, np.number):
    raise ValueError(f'{name} must be numeric, got {losses.dtype}')
  if losses.size and not np.isfinite(losses).all():
    raise ValueError(f'{name} must be finite')
  if losses.size and losses.max() > upper:
    raise ValueError(f'{name} must be <= {upper:g} (the loss bound), got {losses.max()}')
  n = losses.shape[1]
  if np.issubdtype(losses.dtype, np.integer):
    sums = np.maximum(losses, 0).sum(axis=1, dtype=np.int64)
  else:
    sums = np.maximum(losses, 0).sum(axis=1, dtype=np.float64)
  return sums / n, n


def _walk(passed):
  """Index of the last candidate of the leading run of passes, or NEVER_EXIT."""
  failures = np.flatnonzero(~passed)
  return int(failures[0]) - 1 if failures.size else int(passed.size) - 1


def ltt_select(losses, target, delta):
  """Learn then Test with fixed-sequence testing and Hoeffding-Bentkus p-values.

  Walks j = 0, 1, ... in the given (safe to aggressive) order, rejecting H_j "true risk of j >
  target" while p_j <= delta, and stops at the first candidate not rejected. The family-wise
  error is at most delta, so with probability >= 1 - delta the chosen candidate's true risk is
  <= target. The risk is that of max(L, 0), which bounds the drop E[L] from above.

  Args:
    losses: [J, N] per candidate and calibration image, in [0, 1] or the {-1, 0, 1} losses of
      ``cascade_losses``; negative values are clipped to 0 (max(L, 0)) here.
    target: the allowed drop D, in (0, 1).
    delta: the allowed probability of exceeding it, in (0, 1).

  Returns:
    Selection: index = the last rejected candidate, or -1 if H_0 is not rejected; scores are the
    p-values of all J candidates (also those after the stop, for the record).

  Raises:
    ValueError: on a bad shape, losses above 1, or target or delta outside (0, 1).
  """
  target = _check_open_interval(target, 'target')
  delta = _check_open_interval(delta, 'delta')
  risks, n = _bounded_risks(losses, 1.0)
  p_values = np.asarray(hoeffding_bentkus_pvalue(risks, n, target), dtype=np.float64)
  return Selection(index=_walk(p_values <= delta), method='ltt', num_samples=n, risks=risks,
                   scores=p_values, level=delta)


def crc_select(losses, target, bound=1.0):
  """Conformal risk control: E[loss on a new image] <= target.

  The chosen candidate is the largest j such that every j' <= j satisfies
  n / (n + 1) * risk_j' + bound / (n + 1) <= target (the walk stops at the first violation, so a
  dip of the empirical risk further on cannot be picked). The guarantee assumes each image's loss
  does not decrease along the candidate order; check ``monotonicity_violations``.

  Args:
    losses: [J, N] per candidate and calibration image, at most ``bound``; negative values (the
      {-1, 0, 1} losses of ``cascade_losses``) are clipped to 0 (max(L, 0)) here.
    target: the allowed expected drop D, in (0, bound).
    bound: upper bound B of the loss (1 for max(L, 0)).

  Returns:
    Selection: index (-1 if even candidate 0 fails), scores = the conformal bounds of all J.

  Raises:
    ValueError: on a bad shape, losses above ``bound``, or target outside (0, bound).
  """
  bound = float(bound)
  if not bound > 0 or not math.isfinite(bound):
    raise ValueError(f'bound must be positive and finite, got {bound}')
  target = _check_open_interval(target, 'target', 0.0, bound)
  risks, n = _bounded_risks(losses, bound)
  scores = n / (n + 1) * risks + bound / (n + 1)
  return Selection(index=_walk(scores <= target), method='crc', num_samples=n, risks=risks,
                   scores=scores, level=target)


def empirical_select(losses, target):
  """The naive rule: the most aggressive candidate whose calibration drop is <= target.

  No guarantee: at the boundary the true drop exceeds the target about half the time. The drop
  is the plain mean of the losses (L itself, not max(L, 0)), and the largest passing index is
  taken even if candidates before it fail.

  Args:
    losses: [J, N] the {-1, 0, 1} losses of ``cascade_losses`` (or any bounded losses).
    target: the allowed drop D (finite).

  Returns:
    Selection: index = the largest j with mean(losses[j]) <= target, or -1 if none.

  Raises:
    ValueError: on a bad shape or non-finite values.
  """
  target = float(target)
  if not math.isfinite(target):
    raise ValueError(f'target must be finite, got {target}')
  losses = np.asarray(losses)
  if losses.ndim != 2 or losses.shape[1] < 1:
    raise ValueError(f'losses must be [num_candidates, num_images] with at least one image, got '
                     f'shape {losses.shape}')
  if losses.size and not np.isfinite(losses).all():
    raise ValueError('losses must be finite')
  n = losses.shape[1]
  risks = losses.sum(axis=1, dtype=np.float64) / n
  passing = np.flatnonzero(risks <= target)
  index = int(passing[-1]) if passing.size else NEVER_EXIT
  return Selection(index=index, method='empirical', num_samples=n, risks=risks, scores=risks,
                   level=target)


def monotonicity_violations(losses):
  """Where the empirical risk of max(L, 0) decreases from one candidate to the next.

  CRC assumes the loss does not decrease along the candidate order. A decrease of the mean is
  proof that some image's loss does; no decrease of the mean does not prove the opposite.

  Args:
    losses: [J, N] as for ``crc_select``.

  Returns:
    MonotonicityViolations: the candidates j with risk[j] < risk[j - 1], and by how much.
  """
  risks, _ = _bounded_risks(losses, np.inf)
  steps = np.diff(risks)
  indices = np.flatnonzero(steps < 0) + 1
  return MonotonicityViolations(indices=indices.astype(np.int64), decreases=-steps[indices - 1])


def calibration_split(num_images, fraction, seed):
  """A random calibration / evaluation split of the images.

  Args:
    num_images: N.
    fraction: share of the images for calibration, in (0, 1); round(fraction * N) images.
    seed: seed of numpy's default_rng (an int or a SeedSequence).

  Returns:
    (calibration_indices, evaluation_indices): disjoint sorted int64 arrays that together hold
    0 .. N - 1, both non-empty. The same seed gives the same split.

  Raises:
    ValueError: if fraction is not in (0, 1) or leaves one part empty.
  """
  num_images = int(num_images)
  fraction = float(fraction)
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'--calibration_fraction must be in (0, 1), got {fraction}')
  num_calibration = int(round(fraction * num_images))
  if not 0 < num_calibration < num_images:
    raise ValueError(f'--calibration_fraction {fraction} of {num_images} images leaves '
                     f'{num_calibration} for calibration and {num_images - num_calibration} for '
                     f'evaluation; both need at least one: choose a fraction in '
                     f'[{1 / num_images if num_images else 0:.3g}, '
                     f'{1 - 1 / num_images if num_images else 0:.3g}]')
  order = np.random.default_rng(seed).permutation(num_images)
  return (np.sort(order[:num_calibration]).astype(np.int64),
          np.sort(order[num_calibration:]).astype(np.int64))


def select(method, losses, target, delta=None):
  """Dispatches to ``ltt_select`` (needs delta), ``crc_select`` or ``empirical_select``."""
  if method == 'ltt':
    if delta is None:
      raise ValueError("method 'ltt' needs delta")
    return ltt_select(losses, target, delta)
  if method == 'crc':
    return crc_select(losses, target)
  if method == 'empirical':
    return empirical_select(losses, target)
  raise ValueError(f'method must be one of {", ".join(METHODS)}, got {method!r}')


def coverage_trials(exit_taken, correct, cumulative_macs, plain_macs, target, delta, method,
                    fraction, trials, seed):
  """Repeats calibrate-then-evaluate on random splits of one set of images.

  Trial r splits the images with ``calibration_split(N, fraction, seeds[r])``, selects a candidate
  with ``method`` on the calibration part and measures, on the evaluation part, the realised drop
  (mean of the true {-1, 0, 1} loss), the exit shares and the MAC reduction. A trial that selects
  nothing (-1) runs every image to the last exit: drop 0.

  Args:
    exit_taken: int [J, N], ``exits_for_candidates`` of all candidates (computed once).
    correct: bool [K, N], correctness of each exit's answer.
    cumulative_macs: K costs of leaving at each exit, or None (no cost figures).
    plain_macs: cost of the plain network (needed with cumulative_macs).
    target: the allowed drop D.
    delta: LTT's error probability (ignored by 'crc' and 'empirical'; may be None for them).
    method: 'ltt', 'crc' or 'empirical'.
    fraction: calibration share of each split, as for ``calibration_split``.
    trials: number of splits R >= 1.
    seed: seeds the per-trial seeds (numpy default_rng).

  Returns:
    dict with trials (R), method, target, delta, share_within (share of trials with drop <=
    target), mean_drop, never_exit_share (share of trials selecting -1), mean_mac_reduction
    (None without costs), mean_exit_shares (K floats), and per trial: seeds (reproduce a split
    with calibration_split), indices, drops, mac_reductions (None without costs), exit_shares
    [R, K].

  Raises:
    ValueError: on bad shapes, method, trials, costs or fraction.
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {", ".join(METHODS)}, got {method!r}')
  trials = int(trials)
  if trials < 1:
    raise ValueError(f'trials must be >= 1, got {trials}')
  exit_taken = np.asarray(exit_taken)
  correct = np.asarray(correct, dtype=bool)
  if exit_taken.ndim != 2:
    raise ValueError(f'exit_taken must be [num_candidates, num_images], got {exit_taken.shape}')
  losses = cascade_losses(exit_taken, correct)                            # int8 [J, N]
  num_exits, num_images = correct.shape
  if cumulative_macs is not None:
    cumulative = np.asarray(cumulative_macs, dtype=np.float64).reshape(-1)
    if cumulative.size != num_exits:
      raise ValueError(f'{cumulative.size} cumulative MAC counts for {num_exits} exits')
    if plain_macs is None or not float(plain_macs) > 0:
      raise ValueError(f'plain_macs must be positive when cumulative_macs is given, got '
                       f'{plain_macs}')
  seeds = np.random.default_rng(seed).integers(0, 2**63 - 1, size=trials, dtype=np.int64)
  indices = np.empty(trials, np.int64)
  drops = np.empty(trials, np.float64)
  shares = np.empty((trials, num_exits), np.float64)
  for r, trial_seed in enumerate(seeds):
    calibration, evaluation = calibration_split(num_images, fraction, int(trial_seed))
    index = select(method, losses[:, calibration], target, delta).index
    indices[r] = index
    if index == NEVER_EXIT:
      drops[r] = 0.0
      exits = np.full(evaluation.size, num_exits - 1)
    else:
      drops[r] = losses[index, evaluation].sum(dtype=np.int64) / evaluation.size
      exits = exit_taken[index, evaluation]
    shares[r] = np.bincount(exits, minlength=num_exits) / evaluation.size
  mac_reductions = None
  if cumulative_macs is not None:
    mac_reductions = 1.0 - (shares @ cumulative) / float(plain_macs)
  return {
      'trials': trials,
      'method': method,
      'target': float(target),
      'delta': None if delta is None else float(delta),
      'share_within': float(np.mean(drops <= target)),
      'mean_drop': float(drops.mean()),
      'never_exit_share': float(np.mean(indices == NEVER_EXIT)),
      'mean_mac_reduction': None if mac_reductions is None else float(mac_reductions.mean()),
      'mean_exit_shares': [float(s) for s in shares.mean(axis=0)],
      'seeds': seeds,
      'indices': indices,
      'drops': drops,
      'mac_reductions': mac_reductions,
      'exit_shares': shares,
  }
