"""The map from the profile's predicted drop to the user's measured score drop, fitted on measured trials.

The sensitivity profile predicts an output-fidelity drop per layer and format, and those add up: a
policy's *fidelity* `x` is the sum of its layers' profile drops. The user's score (accuracy, top-k
agreement, BLEU) is a monotone function of fidelity, but neither linear nor smooth: near a tight budget
a small perturbation already flips discrete decisions, so one scale fitted on the all-int8 trial, far
beyond the budget, predicts drops several times too small there. So the map `drop = g(x)` is fitted on
every measured trial of one default dtype as they come:

- isotonic (pool adjacent violators) on the measured drops, so `g` is monotone whatever the noise;
- through (0, 0) for the fp32 default (the reference itself); for another default D nothing below the
  all-D trial is known, so `g` stays flat (at the lowest fitted drop) below its lowest point: a default
  whose own uniform trial misses the budget is never planned on until trials of it say otherwise;
- between fitted points interpolated in log-log (a local power law); below the lowest, from the origin,
  with the power of the lowest two (at most 1; while there is one, a prior by the score's kind: 0.5 for a
  count of decisions, 1 for a continuous score, see `prior_power`); beyond the highest, with
  the power over the whole range (at most 1): one plan measured near the budget (with the all-int8 point far
  beyond) gives the curvature, so the next plan lands near the budget instead of creeping to it.

The score's granularity is estimated from the scores themselves (`score_granularity`): a score that is
a count over N samples lies on a lattice of 1/N, and re-measuring fp32 shows the evaluation's noise.
Plans aim at `max_drop - margin`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_MIN_POWER, _MAX_POWER = 0.2, 4.0  # power-law exponents believed between points: clamps a noisy slope
# Below the only measured point (in practice the all-int8 trial, far beyond the budget) the power is
# not measured, but the score's kind tells it. Fidelity (1 - cosine) and continuous losses move with the
# square of a small perturbation, as the profile's drops do: power 1. A count of discrete decisions
# (accuracy, top-k agreement) flips in proportion to the perturbation itself, its square root in
# fidelity terms: power 0.5. A wrong prior costs one plan (the refit then has the measured power).
PRIOR_POWER = 0.5  # a score on a lattice (a count over N samples)
CONTINUOUS_PRIOR_POWER = 1.0

_MAX_DENOMINATOR = 100_000
_LATTICE_VALUES = 16  # distinct scores tested against a lattice (enough to rule out chance fits)


@dataclass(frozen=True)
class Granularity:
    """The score's resolution and noise, as seen in the scores measured so far.

    `step`: 1/N when every score is a multiple of 1/N (a count over N samples), else 0.
    `noise`: the largest |score of the fp32 policy re-measured - reference score| (0: deterministic).
    """

    step: float = 0.0
    noise: float = 0.0
    denominator: int | None = None

    @property
    def margin(self) -> float:
        """Plans aim this far under max_drop: half a step (a continuous prediction lands on the lattice
        within half a step of where the fitted map puts it) and twice the evaluation's noise."""
        return 0.5 * self.step + 2.0 * self.noise

    def to_json(self) -> dict[str, float | int | None]:
        return {"step": self.step, "noise": self.noise, "denominator": self.denominator, "margin": self.margin}


def prior_power(granularity: Granularity) -> float:
    """The power believed below the only measured point: 0.5 for a count of decisions, 1 for a continuous score."""
    return PRIOR_POWER if granularity.step > 0 else CONTINUOUS_PRIOR_POWER


def _lattice(values: Sequence[float]) -> int | None:
    """The smallest N such that every value is k/N (as a double, or a float32 rounding of it), else None.

    Two distinct values are tested up to N = 10^4, three or more up to 10^5: a continuous score fits
    some lattice by chance with probability under about 1e-6 and 1e-3 x 1e-6 respectively."""
    distinct = sorted(set(float(v) for v in values if math.isfinite(v)))[:_LATTICE_VALUES]
    if len(distinct) < 2:
        return None
    limit = _MAX_DENOMINATOR if len(distinct) >= 3 else _MAX_DENOMINATOR // 10
    v = np.array(distinct, dtype=np.float64)[:, None]
    n = np.arange(1, limit + 1, dtype=np.float64)[None, :]
    nearest = np.round(v * n) / n
    tol = 1e-12 * np.maximum(1.0, np.abs(v))
    fits = (np.abs(v - nearest) <= tol) | (nearest.astype(np.float32).astype(np.float64) == v)
    ok = np.flatnonzero(fits.all(axis=0))
    return int(ok[0]) + 1 if ok.size else None


def score_granularity(reference_score: float, scores: Iterable[float], fp32_scores: Iterable[float] = ()) -> Granularity:
    """The granularity of a score from the reference, every measured score and the fp32 re-measures."""
    scores = [s for s in scores if s is not None and math.isfinite(s)]
    denominator = _lattice([reference_score, *scores])
    noise = max((abs(s - reference_score) for s in fp32_scores if s is not None and math.isfinite(s)), default=0.0)
    return Granularity(step=1.0 / denominator if denominator else 0.0, noise=noise, denominator=denominator)


def isotonic(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """Non-decreasing least-squares fit (pool adjacent violators) of ys over xs; equal xs pooled first.
    Returns the distinct xs ascending and the fitted values."""
    pairs = sorted(zip(xs, ys))
    blocks: list[list[float]] = []  # [x, sum of y, count]
    for x, y in pairs:
        if blocks and blocks[-1][0] == x:
            blocks[-1][1] += y
            blocks[-1][2] += 1
        else:
            blocks.append([x, y, 1])
    # pool: each stack entry is [first block index, sum, count]
    stack: list[list[float]] = []
    for i, (_, total, count) in enumerate(blocks):
        stack.append([i, total, count])
        while len(stack) > 1 and stack[-2][1] / stack[-2][2] > stack[-1][1] / stack[-1][2]:
            top = stack.pop()
            stack[-1][1] += top[1]
            stack[-1][2] += top[2]
    fitted = [0.0] * len(blocks)
    for j, (start, total, count) in enumerate(stack):
        end = stack[j + 1][0] if j + 1 < len(stack) else len(blocks)
        for i in range(int(start), int(end)):
            fitted[i] = total / count
    return [b[0] for b in blocks], fitted


def _power(x0: float, y0: float, x1: float, y1: float) -> float:
    if min(x0, y0, x1, y1) <= 0 or x0 == x1 or y0 == y1:
        return 1.0
    return min(_MAX_POWER, max(_MIN_POWER, math.log(y1 / y0) / math.log(x1 / x0)))


@dataclass
class DropModel:
    """g: fidelity drop x -> score drop, monotone, fitted on (x, measured drop) of one default dtype."""

    knots_x: list[float]
    knots_y: list[float]
    anchored: bool  # through (0, 0): the fp32 default
    prior: float = PRIOR_POWER  # the power from the origin while one point is measured (prior_power)

    @classmethod
    def fit(cls, points: Iterable[tuple[float, float]], anchored: bool, prior: float = PRIOR_POWER) -> "DropModel":
        """`points`: (fidelity x, measured score drop); negative drops (noise) count as 0, non-finite x
        are left out."""
        clean = [(float(x), max(0.0, float(y))) for x, y in points if math.isfinite(x) and math.isfinite(y)]
        if anchored:
            clean = [(0.0, 0.0)] + [(max(x, 0.0), y) for x, y in clean]
        if not clean:
            return cls([], [], anchored, prior)
        xs, ys = isotonic([p[0] for p in clean], [p[1] for p in clean])
        if anchored and xs[0] == 0.0:
            ys[0] = 0.0  # the reference: noise at x = 0 is the granularity's business, not g's
            for i in range(1, len(ys)):
                ys[i] = max(ys[i], ys[i - 1])
        return cls(xs, ys, anchored, prior)

    @property
    def empty(self) -> bool:
        return not self.knots_x

    def predict(self, x: float) -> float:
        """The score drop predicted for a policy of fidelity drop x (inf when nothing is known)."""
        xs, ys = self.knots_x, self.knots_y
        if not xs or not math.isfinite(x):
            return math.inf
        if x <= xs[0]:
            return ys[0] if not self.anchored or x >= 0 else 0.0
        if x >= xs[-1]:
            return self._beyond(x)
        i = int(np.searchsorted(xs, x, side="right"))  # xs[i-1] < x < xs[i]
        (x0, y0), (x1, y1) = (xs[i - 1], ys[i - 1]), (xs[i], ys[i])
        if y0 == y1:
            return y0
        if x0 > 0 and y0 > 0:
            return y0 * (x / x0) ** (math.log(y1 / y0) / math.log(x1 / x0))
        if i == 1 and x0 == 0 and y0 == 0:  # from the origin: the power of the next two points
            p = _power(x1, y1, xs[i + 1], ys[i + 1]) if i + 1 < len(xs) else self.prior
            return y1 * (x / x1) ** min(p, 1.0)
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    def _beyond(self, x: float) -> float:
        xs, ys = self.knots_x, self.knots_y
        x1, y1 = xs[-1], ys[-1]
        if y1 <= 0 or x1 <= 0:
            return y1 + x - x1  # nothing lost yet, or nothing known but x = 0: the score moves like fidelity
        positive = [(a, b) for a, b in zip(xs, ys) if a > 0 and b > 0]
        # the power over the whole measured range (the last two points may sit on one step's plateau),
        # at most 1: a score's drop does not grow faster than its fidelity's far from where it was measured
        p = _power(*positive[0], *positive[-1]) if len(positive) >= 2 else 1.0
        return y1 * (x / x1) ** min(p, 1.0)

    def inverse(self, target: float, ceiling: float = math.inf) -> float:
        """The largest x (up to `ceiling`) whose predicted drop is <= target; 0 when none, or only x = 0."""
        if self.empty or target < 0:
            return 0.0
        lo, hi = 0.0, max(self.knots_x[-1], 1e-30)
        if self.predict(lo if self.anchored else self.knots_x[0]) > target:
            return 0.0
        while self.predict(hi) <= target and hi < ceiling:
            hi *= 2.0
            if hi > 1e6:
                return min(hi, ceiling)
        hi = min(hi, ceiling)
        if self.predict(hi) <= target:
            return hi
        for _ in range(100):  # bisection on a monotone function
            mid = 0.5 * (lo + hi)
            if self.predict(mid) <= target:
                lo = mid
            else:
                hi = mid
        return lo


def loo_error(points: Sequence[tuple[float, float]], anchored: bool, prior: float = PRIOR_POWER) -> list[tuple[float, float]]:
    """(predicted, measured) for every point, each predicted by the model fitted on all the others
    (leave one out: no trial grades itself). Points whose prediction is unknown are skipped, and so is
    x = 0 on an anchored model (the fp32 policy: exact by construction, it would flatter the median)."""
    out = []
    for i, (x, y) in enumerate(points):
        if anchored and x <= 0:
            continue  # the fp32 policy itself: the anchor predicts it exactly
        model = DropModel.fit(list(points[:i]) + list(points[i + 1:]), anchored, prior)
        predicted = model.predict(x)
        if math.isfinite(predicted) and math.isfinite(y):
            out.append((predicted, max(0.0, y)))
    return out


def error_summary(pairs: Sequence[tuple[float, float]], granularity: Granularity) -> dict[str, float | int | None]:
    """Median and worst |predicted - measured| drop over (predicted, measured) pairs, with the granularity."""
    errors = [abs(p - m) for p, m in pairs]
    worst = max(range(len(errors)), key=errors.__getitem__) if errors else None
    return {"trials": len(errors),
            "drop_abs_median": statistics.median(errors) if errors else None,
            "drop_abs_max": errors[worst] if errors else None,
            "worst_predicted": pairs[worst][0] if errors else None,
            "worst_measured": pairs[worst][1] if errors else None,
            **granularity.to_json()}
