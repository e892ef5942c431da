"""Sequential proposals: the next policy to measure, given every trial measured so far.

`next_proposal` is a pure function of the measured trials, the profile and max_drop, so the search
loop asks it for one proposal at a time (measure, refit, re-plan) and any worker asks the same question
of the same store. For each default dtype the plannable ones are:

1. converge: the fastest policy (exact knapsack on the cost model's latency) whose fidelity drop fits
   the budget the drop model (dropmodel.py) gives for `0.95 max_drop - margin` (the margin from the
   score's granularity), kept strictly inside the
   bracket of what was measured (above the largest feasible fidelity, below the smallest infeasible
   one): an overshoot shrinks the next plan's budget, an undershoot relaxes it. Where the fitted map
   says nothing above the largest feasible fidelity holds, but a policy measured near that fidelity lost
   at most half the target (a scattered score: the map's "no further" is in doubt), the next plan probes
   above it instead (PROBE_STEP, or halfway into the bracket in log), within the same proposal count;
2. once that converges (its plan was already measured, or the bracket is closed): the smallest policy
   within the largest feasible budget, and the fastest at fractions of it, to fill the front.

A policy already measured is never proposed again, nor one that is at least as damaging as a policy
seen to miss the budget (every layer's profile drop >= that policy's, same default), nor a superset of
a policy that could not run, nor, for speed, a plan the cost model predicts no faster than the measured
fp32 policy. Returns None when there is nothing left worth measuring.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autoprec.guided.cost_model import CostModel
from autoprec.guided.drop_model import (PRIOR_POWER, DropModel, Granularity, error_summary, loo_error, prior_power,
                                score_granularity)
from autoprec.guided.sensitivity import Profile

MAX_CONVERGE = 6  # proposals spent closing in on the budget, per default dtype
SPREAD_FRACTIONS = (0.5, 0.2)  # of the largest feasible fidelity budget, once converged
BRACKET_CLOSED = 1.02  # x_hi / x_lo under which the bracket is closed
PROBE_STEP = 1.5  # how far above the largest feasible fidelity a probe plans, at most
ROOM_NEAR = 0.8  # a feasible policy at >= this x the largest feasible fidelity counts as "measured near it"
ROOM_SHARE = 0.5  # ... and shows room above it when it lost at most this share of the target
MAX_PROPOSALS = 12
PLAN_SHARE = 0.95  # of max_drop, before the granularity margin: the fitted map's own error near the budget


@dataclass(frozen=True)
class Measured:
    """One trial as the planner sees it. `score` None: the candidate could not run."""

    default: str
    layers: Mapping[str, str]
    score: float | None
    latency_ms: float | None = None
    memory_bytes: float | None = None
    uniform: str | None = None  # the format of a uniform trial
    proposed: bool = False  # made by this planner
    pending: bool = False  # enqueued or running, not measured yet: not proposed again, not fitted on
    number: int | None = None  # the trial's number, where it came from a study


@dataclass(frozen=True)
class Proposal:
    default: str
    layers: dict[str, str]
    why: str
    predicted: dict[str, float]  # drop (score), fidelity, latency_ms, memory_bytes
    budget_fidelity: float
    target_drop: float


@dataclass
class _Default:
    """What is known for one default dtype."""

    model: DropModel
    feasible: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (fidelity, drop) within max_drop
    x_hi: float = math.inf  # smallest fidelity measured over it
    proposals: int = 0

    @property
    def x_lo(self) -> float:
        """The largest fidelity measured within max_drop (0: the fp32 anchor)."""
        return max((x for x, _ in self.feasible), default=0.0)


# `autoprec profile` calls the score unpredictable from fidelity where, over at least this many trials
# near the budget, the drop model's median error is at least this share of max_drop
UNPREDICTABLE_TRIALS = 3
UNPREDICTABLE_SHARE = 0.5


def fidelity(profile: Profile, default: str, layers: Mapping[str, str]) -> float:
    """A policy's predicted fidelity drop: the sum of its layers' profile drops (a listed layer in the
    default dtype counts, a layer not listed takes the default's)."""
    total = 0.0
    for name, by_fmt in profile.layers.items():
        fmt = layers.get(name, default)
        total += by_fmt.get(fmt, {}).get("drop", 0.0) if fmt != "fp32" else 0.0
    return total


def granularity_of(trials: Sequence[Measured], reference_score: float) -> Granularity:
    return score_granularity(reference_score, [t.score for t in trials if t.score is not None],
                             [t.score for t in trials if t.uniform == "fp32" and t.score is not None])


def drop_points(profile: Profile, trials: Sequence[Measured], reference_score: float,
                default: str) -> list[tuple[float, float]]:
    """(fidelity, measured drop) of every trial of `default` that ran."""
    return [(fidelity(profile, default, t.layers), reference_score - t.score)
            for t in trials if t.default == default and t.score is not None and not t.pending]


def calibrated_cost(profile: Profile, choices: dict[str, tuple[str, ...]], trials: Sequence[Measured],
                    reference_score: float) -> CostModel:
    """The latency and memory model: rest terms from the uniform trials, rest latency re-fitted on every
    trial as they come; drops left in fidelity units (scale 1, no rest term): the drop model maps them."""
    model = CostModel(profile, choices)
    ran = [t for t in trials if t.score is not None and t.latency_ms is not None]
    model.calibrate({t.uniform: (t.default, dict(t.layers), _measurement(t, reference_score))
                     for t in ran if t.uniform})
    model.refit_rest_latency([(t.default, dict(t.layers), _measurement(t, reference_score)) for t in ran])
    return dataclasses.replace(model, drop_scale={}, rest_drop={d: 0.0 for d in model.rest_latency})


def _measurement(t: Measured, reference_score: float) -> dict[str, float]:
    return {"drop": reference_score - t.score, "latency_ms": t.latency_ms, "memory_bytes": t.memory_bytes}


def _key(default: str, layers: Mapping[str, str]) -> tuple:
    return default, tuple(sorted(layers.items()))


class _Excluded:
    """Policies not worth measuring: measured ones, and ones at least as damaging as a miss or a failure."""

    def __init__(self, profile: Profile, trials: Sequence[Measured], reference_score: float, max_drop: float,
                 names: Sequence[str]) -> None:
        self.profile, self.names = profile, list(names)
        self.reference_score = reference_score
        self.seen = {_key(t.default, t.layers) for t in trials}
        self.missed = [t for t in trials if t.score is not None and reference_score - t.score > max_drop]
        self.failed = [t for t in trials if t.score is None and not t.pending]

    def _drop(self, name: str, fmt: str) -> float:
        return 0.0 if fmt == "fp32" else self.profile.layers[name].get(fmt, {}).get("drop", 0.0)

    def __call__(self, default: str, layers: Mapping[str, str]) -> bool:
        return _key(default, layers) in self.seen or self.why(default, layers) is not None

    def why(self, default: str, layers: Mapping[str, str]) -> tuple[str, Measured] | None:
        """("miss", the miss) when the policy is at least as damaging, layer by layer, as a measured miss
        (the least damaging such miss); ("failed", the failure) when it changes every layer a policy that
        could not run changed, as that one did; else None. Measured or not: a twin of a miss is a miss."""
        misses = [t for t in self.missed if t.default == default and all(
            self._drop(n, layers.get(n, default)) >= self._drop(n, t.layers.get(n, default)) for n in self.names)]
        if misses:
            return "miss", min(misses, key=lambda t: self.reference_score - t.score)
        for t in self.failed:
            changed = {n: f for n, f in t.layers.items() if f != "fp32"}
            if t.default == default and changed and all(layers.get(n) == f for n, f in changed.items()):
                return "failed", t
        return None


def _state(profile: Profile, trials: Sequence[Measured], reference_score: float, max_drop: float,
           default: str, grain: Granularity) -> _Default:
    points = drop_points(profile, trials, reference_score, default)
    state = _Default(DropModel.fit(points, anchored=default == "fp32", prior=prior_power(grain)))
    for x, drop in points:
        if drop <= max_drop:
            state.feasible.append((x, drop))
        else:
            state.x_hi = min(state.x_hi, x)
    state.proposals = sum(1 for t in trials if t.proposed and t.default == default)
    return state


def _predict(cost: CostModel, drops: DropModel, default: str, layers: dict[str, str]) -> dict[str, float]:
    p = cost.predict(default, layers) or {}
    x = fidelity(cost.profile, default, layers)
    return {"drop": drops.predict(x), "fidelity": x, "latency_ms": p.get("latency_ms", math.nan),
            "memory_bytes": p.get("memory_bytes", math.nan)}


def _converge_budgets(state: _Default, target: float) -> list[tuple[float, str]]:
    """The fidelity budgets of the next converging plan, inside the open bracket (x_lo, x_hi), each with
    what it is, to try in turn: the drop model's budget for the target, then, where a policy measured
    near x_lo lost far less than the target (the map's "no further" is in doubt), a probe above x_lo
    (bisecting the bracket once a probe has missed). Empty when the bracket is closed."""
    bounded = math.isfinite(state.x_hi)
    if target <= 0 or (bounded and state.x_hi <= state.x_lo * BRACKET_CLOSED):
        return []
    budgets = []
    budget = state.model.inverse(target, ceiling=state.x_hi)
    if state.x_lo < budget < state.x_hi:
        budgets.append((budget, "converge"))
    elif budget >= state.x_hi:  # the map, pooled over noisy points, allows the whole bracket: bisect it (in log)
        budgets.append((math.sqrt(state.x_lo * state.x_hi) if state.x_lo > 0 else 0.25 * state.x_hi, "converge"))
    # else what holds is already at the target, as far as the fitted map can tell
    if state.x_lo > 0 and _room_above(state, target):
        probe = min(PROBE_STEP * state.x_lo, math.sqrt(state.x_lo * state.x_hi))
        if not budgets or probe > budgets[0][0]:
            budgets.append((probe, "probe above the largest feasible fidelity"))
    return budgets


def _room_above(state: _Default, target: float) -> bool:
    return any(x >= ROOM_NEAR * state.x_lo and drop <= ROOM_SHARE * target for x, drop in state.feasible)


def next_proposal(profile: Profile, choices: dict[str, tuple[str, ...]], trials: Sequence[Measured],
                  reference_score: float, max_drop: float, defaults: Sequence[str],
                  max_proposals: int = MAX_PROPOSALS) -> Proposal | None:
    """The next policy to measure, or None when nothing is left worth measuring (see the module doc)."""
    if sum(1 for t in trials if t.proposed) >= max_proposals:
        return None
    cost = calibrated_cost(profile, choices, trials, reference_score)
    grain = granularity_of(trials, reference_score)
    target = PLAN_SHARE * max_drop - grain.margin
    excluded = _Excluded(profile, trials, reference_score, max_drop, list(choices))
    fp32_ms = min((t.latency_ms for t in trials if t.uniform == "fp32" and t.latency_ms is not None), default=None)
    plans: list[tuple[int, float, Proposal]] = []  # (stage, predicted latency, proposal)
    for default in defaults:
        if default not in cost.rest_latency:  # no uniform trial of it, or its calibration is unreliable
            continue
        state = _state(profile, trials, reference_score, max_drop, default, grain)
        if state.model.empty:
            continue
        candidates: list[tuple[int, float, str, str]] = []  # (stage, budget, objective, why)
        if state.proposals < MAX_CONVERGE:
            candidates += [(0, budget, "latency_ms", why) for budget, why in _converge_budgets(state, target)]
        if state.x_lo > 0:
            candidates.append((1, state.x_lo, "memory_bytes", "smallest at the largest feasible fidelity"))
            candidates += [(2, f * state.x_lo, "latency_ms", f"fastest at {f:g} x the largest feasible fidelity")
                           for f in SPREAD_FRACTIONS]
        for stage, budget, objective, why in candidates:
            plan = _plan(cost, state, default, budget, objective, excluded)
            if plan is None:
                continue
            layers, used = plan
            predicted = _predict(cost, state.model, default, layers)
            if objective == "latency_ms" and fp32_ms is not None and predicted["latency_ms"] >= fp32_ms:
                continue  # the fastest there is within this budget is no faster than fp32: no trial for speed
            text = (f"sequential {why}: {'fastest' if objective == 'latency_ms' else 'smallest'} within "
                    f"fidelity {used:.3g} (predicted drop {predicted['drop']:.3g}, aiming at {target:.3g})")
            plans.append((stage, predicted["latency_ms"], Proposal(default, layers, text, predicted, used, target)))
            break
    if not plans:
        return None
    plans.sort(key=lambda p: (p[0], p[1] if math.isfinite(p[1]) else math.inf))
    return plans[0][2]


def _plan(cost: CostModel, state: _Default, default: str, budget: float, objective: str,
          excluded: _Excluded) -> tuple[dict[str, str], float] | None:
    """The knapsack's policy within `budget`, shrinking the budget a few times while what it gives is
    excluded (measured, or as damaging as a miss)."""
    for _ in range(4):
        if budget <= 0:
            return None
        layers = cost.fastest_within(default, budget, objective)
        if layers is None:
            return None
        if not excluded(default, layers):
            return layers, budget
        used = fidelity(cost.profile, default, layers)
        if used <= state.x_lo:
            return None  # the knapsack is back below what is known to hold: nothing new here
        budget = max(used * 0.97, state.x_lo * 1.0001) if used < budget else budget * 0.9
    return None


def drop_model_report(profile: Profile, trials: Sequence[Measured], reference_score: float,
                      defaults: Sequence[str], max_drop: float | None = None) -> dict[str, Any]:
    """The drop model's error on the measured trials (each predicted from the others), with the
    granularity and margin it plans with: what `autoprec profile` prints. With max_drop, also the error
    on the trials that measured at most 2 x max_drop ("near_budget"): where plans are made, away from
    the far extrapolation that predicting the all-int8 trial from the others takes."""
    grain = granularity_of(trials, reference_score)
    power = prior_power(grain)
    pairs: list[tuple[float, float]] = []
    for default in defaults:
        points = drop_points(profile, trials, reference_score, default)
        pairs += loo_error(points, anchored=default == "fp32", prior=power)
    report = error_summary(pairs, grain)
    report["prior_power"] = power
    if max_drop is not None:
        near = error_summary([(p, m) for p, m in pairs if m <= 2 * max_drop], grain)
        report["near_budget"] = {k: near[k] for k in ("trials", "drop_abs_median", "drop_abs_max",
                                                      "worst_predicted", "worst_measured")}
        report["max_drop"] = max_drop
    return report


def describe_drop_model(report: dict[str, Any]) -> list[str]:
    """The lines `autoprec profile` prints for a drop_model_report."""
    if not report.get("trials"):
        return ["drop model: no trial to grade it on yet"]
    lines = [f"drop model (profile drop -> score drop, fitted on the trials) on {report['trials']} trials, each "
             f"predicted from the others: |error| median {report['drop_abs_median']:.2g}, worst "
             f"{report['drop_abs_max']:.2g} (predicted {report['worst_predicted']:.3g}, measured "
             f"{report['worst_measured']:.3g})"]
    near = report.get("near_budget") or {}
    if near.get("trials"):
        lines.append(f"  near the budget (measured drop <= 2 x max_drop, {near['trials']} trials): median "
                     f"{near['drop_abs_median']:.2g}, worst {near['drop_abs_max']:.2g} (predicted "
                     f"{near['worst_predicted']:.3g}, measured {near['worst_measured']:.3g})")
        share = near["drop_abs_median"] / report["max_drop"] if report.get("max_drop") else 0.0
        if near["trials"] >= UNPREDICTABLE_TRIALS and share >= UNPREDICTABLE_SHARE:
            lines.append(f"  the score is hardly predictable from output fidelity here (the median error near the "
                         f"budget is {share:.0%} of max_drop): proposals near the budget are guesses, the "
                         f"measured trials carry the search; a longer search (more sampler trials) helps, a "
                         f"longer profile does not")
    step = (f"steps of 1/{report['denominator']} = {report['step']:.3g}" if report.get("denominator")
            else "no step seen (continuous)")
    prior = ("0.5 (a count of decisions flips with the perturbation)" if report.get("prior_power") == PRIOR_POWER
             else "1 (a continuous score moves with fidelity)")
    lines.append(f"score granularity: {step}, fp32 re-measured within {report['noise']:.2g}; plans aim "
                 f"{report['margin']:.2g} under max_drop (and at 0.95 x it); below the only measured point "
                 f"the drop is believed to grow with fidelity to the power {prior}")
    return lines
