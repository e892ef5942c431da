"""Where a search can still win: the planner's exclusions applied to every candidate, and the verdict
that nothing unmeasured can beat the front.

Two questions the guided search asks of every trial so far (autoprec.search.loop):

- `Exclusion.why(default, layers)`: is a candidate, whoever proposed it (the sampler too), worth a
  measurement? Not when it is at least as damaging, layer by layer, as a measured miss (every layer's
  profile drop >= the miss's, same default: a superset of a set that missed, in the int8 sense), nor
  when it changes every layer a policy that could not run changed, nor when the drop model predicts
  that it misses by a clear margin: its fidelity drop lies beyond the bracket's smallest miss and its
  predicted score drop exceeds max_drop by more than the drop model's own error (its worst
  leave-one-out error on the trials measured near the budget, and at least the score's granularity
  margin). That error is read again from every measured trial, so where predictions miss, the margin
  widens and fewer candidates are skipped.
- `verdict(...)`: once a miss is measured under every default dtype the planner plans on (the budget
  is bracketed), is there a policy below the smallest miss's fidelity, neither measured nor excluded,
  that the cost model predicts faster than the front's fastest member by more than the timing's
  resolution? The knapsack's fastest policy within a fidelity budget bounds from below the predicted
  latency of every policy within it; while that policy is measured or excluded, the budget shrinks
  (as the planner's does) and the next one is asked. When no such policy is left, the verdict is one
  line: what it would take (the smallest miss and its drop), what fits, and which knob would change it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autoprec.guided.cost_model import CostModel
from autoprec.guided.planner import (Measured, _Excluded, _state, calibrated_cost, drop_model_report, fidelity,
                                     granularity_of)
from autoprec.guided.sensitivity import Profile

SKIP_MISS = "as damaging as a measured miss"
SKIP_FAILED = "superset of a policy that could not run"
SKIP_PREDICTED = "predicted to miss"
SKIP_KINDS = (SKIP_MISS, SKIP_FAILED, SKIP_PREDICTED)
NOTHING_CAN_WIN = "nothing can win"
SAMPLER_EXHAUSTED = "sampler exhausted"
VERDICT_TRIES = 16  # knapsack plans looked at below the smallest miss before the answer counts as "unsettled"


@dataclass(frozen=True)
class Skip:
    """Why a candidate is not measured: `kind` (one of SKIP_KINDS), a one-line `text`, and the score
    drop it is believed to lose at least (None: it would not run)."""

    kind: str
    text: str
    drop: float | None


def describe_policy(default: str, layers: Mapping[str, str]) -> str:
    """'2 int8 layers', '3 int8 + 1 bf16 layers (default bf16)', 'all fp32'."""
    counts = Counter(f for f in layers.values() if f != default)
    if not counts:
        return f"all {default}"
    parts = [f"{n} {fmt}" for fmt, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    text = " + ".join(parts) + (" layer" if sum(counts.values()) == 1 else " layers")
    return text if default == "fp32" else f"{text} (default {default})"


def _name(t: Measured) -> str:
    return f"trial {t.number}" if t.number is not None else "a measured policy"


def prediction_margin(profile: Profile, measured: Sequence[Measured], reference_score: float, max_drop: float,
                      defaults: Sequence[str]) -> float:
    """How far over max_drop the drop model must predict a candidate before it is skipped: its worst
    leave-one-out error near the budget (else over every trial), at least the granularity margin; inf
    while no trial grades it."""
    report = drop_model_report(profile, measured, reference_score, defaults, max_drop)
    near = report.get("near_budget") or {}
    if near.get("trials"):
        worst = near["drop_abs_max"]
    elif report.get("trials"):
        worst = report["drop_abs_max"]
    else:
        return math.inf
    return max(float(report.get("margin") or 0.0), float(worst))


class Exclusion:
    """The candidates not worth measuring, given every trial so far (pending ones are left out: a
    candidate is checked against what was measured)."""

    def __init__(self, profile: Profile, choices: Mapping[str, Sequence[str]], trials: Sequence[Measured],
                 reference_score: float, max_drop: float, defaults: Sequence[str]) -> None:
        measured = [t for t in trials if not t.pending]
        self.profile, self.reference_score, self.max_drop = profile, reference_score, max_drop
        self.excluded = _Excluded(profile, measured, reference_score, max_drop, list(choices))
        grain = granularity_of(measured, reference_score)
        self.states = {d: _state(profile, measured, reference_score, max_drop, d, grain) for d in defaults}
        self.margin = prediction_margin(profile, measured, reference_score, max_drop, defaults)

    def why(self, default: str, layers: Mapping[str, str]) -> Skip | None:
        found = self.excluded.why(default, layers)
        if found is not None:
            kind, t = found
            if kind == "miss":
                drop = self.reference_score - t.score
                return Skip(SKIP_MISS, f"as damaging, layer by layer, as {_name(t)} ({describe_policy(t.default, t.layers)}), "
                                       f"which lost {drop:.3g}, over the {self.max_drop:g} budget", drop)
            return Skip(SKIP_FAILED, f"changes every layer {_name(t)} changed as it did, and that one could not run", None)
        state = self.states.get(default)
        if state is None or state.model.empty or not math.isfinite(state.x_hi) or not math.isfinite(self.margin):
            return None
        x = fidelity(self.profile, default, layers)
        if x <= state.x_hi:
            return None
        predicted = state.model.predict(x)
        if not predicted - self.margin > self.max_drop:
            return None
        return Skip(SKIP_PREDICTED, f"predicted to miss: fidelity drop {x:.3g}, beyond the smallest miss's {state.x_hi:.3g}; "
                                    f"predicted drop {predicted:.3g}, over the {self.max_drop:g} budget by more than "
                                    f"the drop model's error {self.margin:.2g}", predicted)


def _can_win(cost: CostModel, default: str, x_hi: float, excluded: _Excluded, threshold: float) -> bool:
    """Whether some policy below fidelity x_hi, neither measured nor excluded, is predicted faster than
    `threshold` (True too when that cannot be settled in VERDICT_TRIES plans)."""
    budget = x_hi * (1 - 1e-9)
    for _ in range(VERDICT_TRIES):
        if budget <= 0:
            return False
        layers = cost.fastest_within(default, budget)
        if layers is None:
            return False
        predicted = cost.predict(default, layers)
        if predicted is None or predicted["latency_ms"] >= threshold:
            return False  # the fastest within the budget is not fast enough: nothing within it is
        if not excluded(default, layers):
            return True
        used = fidelity(cost.profile, default, layers)
        if used <= 0:
            return False
        budget = used * 0.97 if used < budget else budget * 0.9
    return True


def _smallest_miss(profile: Profile, measured: Sequence[Measured], reference_score: float, max_drop: float,
                   default: str) -> Measured | None:
    misses = [t for t in measured if t.default == default and t.score is not None and reference_score - t.score > max_drop]
    return min(misses, key=lambda t: fidelity(profile, default, t.layers), default=None)


def _fastest(measured: Sequence[Measured], reference_score: float, max_drop: float) -> tuple[Measured | None, str]:
    """The front's fastest member (feasible, measured) and how the verdict names it."""
    feasible = [t for t in measured if t.score is not None and t.latency_ms is not None
                and reference_score - t.score <= max_drop]
    if not feasible:
        return None, "nothing"
    fastest = min(feasible, key=lambda t: t.latency_ms)
    if fastest.uniform == "fp32" or (fastest.default == "fp32" and set(fastest.layers.values()) <= {"fp32"}):
        return fastest, "fp32"
    fp32 = [t.latency_ms for t in measured if t.uniform == "fp32" and t.latency_ms]
    ratio = f", {fastest.latency_ms / min(fp32):.3g}x fp32" if fp32 else ""
    return fastest, f"{_name(fastest)} ({describe_policy(fastest.default, fastest.layers)}{ratio})"


def _record(kind: str, line: str, miss: Measured | None, miss_drop: float | None, fastest: Measured | None,
            max_drop: float) -> dict[str, Any]:
    return {"kind": kind, "line": line, "max_drop": max_drop,
            "miss_trial": miss.number if miss else None, "miss_drop": miss_drop,
            "fastest_trial": fastest.number if fastest else None}


def _knobs(miss: Measured | None, drop: float | None, runtime: str) -> str:
    other = "--runtime compiled" if runtime == "eager" else "--runtime eager"
    loosen = f"a looser --max-drop ({drop:.2g} admits {_name(miss)})" if miss and drop is not None else "a looser --max-drop"
    return f"{loosen}, {other} or another --space could change that"


def verdict(profile: Profile, choices: Mapping[str, Sequence[str]], trials: Sequence[Measured], reference_score: float,
            max_drop: float, defaults: Sequence[str], resolution: float, runtime: str = "eager") -> dict[str, Any] | None:
    """The verdict that nothing unmeasured can beat the front (see the module doc), or None while
    something still can, or the budget is not bracketed under every default planned on."""
    measured = [t for t in trials if not t.pending]
    fastest, front = _fastest(measured, reference_score, max_drop)
    if fastest is None:
        return None
    cost = calibrated_cost(profile, dict(choices), measured, reference_score)
    planned = [d for d in defaults if d in cost.rest_latency]
    if not planned:
        return None
    excluded = _Excluded(profile, trials, reference_score, max_drop, list(choices))  # pending ones count as seen
    grain = granularity_of(measured, reference_score)
    threshold = fastest.latency_ms * (1 - resolution)
    misses = []
    for default in planned:
        state = _state(profile, measured, reference_score, max_drop, default, grain)
        if not math.isfinite(state.x_hi) or _can_win(cost, default, state.x_hi, excluded, threshold):
            return None
        misses.append(_smallest_miss(profile, measured, reference_score, max_drop, default))
    miss = min((m for m in misses if m is not None), key=lambda t: reference_score - t.score)
    drop = reference_score - miss.score
    line = (f"nothing left can win: {describe_policy(miss.default, miss.layers)} ({_name(miss)}) lost {drop:.2g}, "
            f"over the {max_drop:g} budget, and nothing faster than {front} fits (no unmeasured policy below that "
            f"miss is predicted faster by more than the timing's {resolution:.0%}); {_knobs(miss, drop, runtime)}")
    return _record(NOTHING_CAN_WIN, line, miss, drop, fastest, max_drop)


def exhausted(profile: Profile, trials: Sequence[Measured], reference_score: float, max_drop: float, skipped: int,
              runtime: str = "eager") -> dict[str, Any]:
    """The verdict when the sampler proposed `skipped` policies in a row that were not worth measuring."""
    measured = [t for t in trials if not t.pending]
    fastest, front = _fastest(measured, reference_score, max_drop)
    misses = [m for m in (_smallest_miss(profile, measured, reference_score, max_drop, d)
                          for d in sorted({t.default for t in measured})) if m is not None]
    miss = min(misses, key=lambda t: reference_score - t.score, default=None)
    drop = reference_score - miss.score if miss else None
    what = (f"; the smallest miss, {describe_policy(miss.default, miss.layers)} ({_name(miss)}), lost {drop:.2g}, over "
            f"the {max_drop:g} budget" if miss else "")
    line = (f"stopped: the sampler's last {skipped} proposals were all skipped (as damaging as a measured miss, "
            f"or predicted to miss){what}; the fastest that fits is {front}; {_knobs(miss, drop, runtime)}")
    return _record(SAMPLER_EXHAUSTED, line, miss, drop, fastest, max_drop)
