"""The final re-time pass: which front members it re-times within a time budget, and the pass itself.

Re-timing the whole front side by side costs as much as measuring it did (13 minutes of a 33-minute
search on an AVX2-only AMD EPYC). A user picks from the ends of the front within
their drop: the fastest policy, or the smallest. So the pass re-times members in the order
fastest, smallest, second fastest, second smallest, ..., each that still fits the budget (its
cost: what timing it took when it was measured), and marks the rest "not re-timed". The fastest
member is always re-timed: it is the one a user most often exports.

A re-timing noisier than the search's own measurement of a member (its confidence interval, hi / lo,
wider) does not replace the search's ratio: it is kept, marked ``wider``, and shown as too noisy
(a busy machine during the pass gave 0.30-5.26 around a ratio the search had measured as 1.32).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import optuna

from autoprec.measure.evaluator import Evaluator
from autoprec.store import schema
from autoprec.store.schema import policy_from_params

RETIME_SHARE = 0.15  # of the search's time so far


@dataclass(frozen=True)
class FrontMember:
    trial: int
    drop: float
    latency_ms: float
    memory_bytes: float
    cost_s: float  # what re-timing it is expected to cost (the seconds its own timing took)


@dataclass
class RetimePlan:
    retime: list[int] = field(default_factory=list)  # trial numbers, in the order to re-time them
    not_retimed: list[int] = field(default_factory=list)  # within the drop, past the budget
    budget_s: float = 0.0
    planned_s: float = 0.0


def priority(members: Iterable[FrontMember]) -> list[FrontMember]:
    """Fastest, smallest, second fastest, second smallest, ...: each member once."""
    members = list(members)
    by_latency = sorted(members, key=lambda m: (m.latency_ms, m.memory_bytes, m.trial))
    by_memory = sorted(members, key=lambda m: (m.memory_bytes, m.latency_ms, m.trial))
    order: list[FrontMember] = []
    seen: set[int] = set()
    for pair in zip(by_latency, by_memory):
        for m in pair:
            if m.trial not in seen:
                seen.add(m.trial)
                order.append(m)
    return order


def plan_retime(members: Iterable[FrontMember], max_drop: float, budget_s: float) -> RetimePlan:
    """The members within `max_drop` to re-time, in priority order, their summed cost within `budget_s`
    (the first, the fastest, always); the others within the drop are `not_retimed`."""
    plan = RetimePlan(budget_s=budget_s)
    for member in priority(m for m in members if m.drop <= max_drop):
        if not plan.retime or plan.planned_s + member.cost_s <= budget_s:
            plan.retime.append(member.trial)
            plan.planned_s += member.cost_s
        else:
            plan.not_retimed.append(member.trial)
    return plan


def retime_budget(search_seconds: float, share: float = RETIME_SHARE) -> float:
    return share * search_seconds


def retime_front(study: optuna.Study, evaluator: Evaluator, max_drop: float, search_seconds: float) -> dict[str, Any]:
    """Re-time the front beside the fp32 model in one pass, so their ratios compare: the members a
    user picks from first (fastest, smallest, ...), within a share of this run's time
    (autoprec.search.retime); the rest are recorded as not re-timed."""
    from autoprec.results.frames import pareto_front, trials_frame

    front = pareto_front(trials_frame(study))
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    members = [FrontMember(int(r.trial), float(r.score_drop), float(r.latency_ms), float(r.memory_bytes),
                           _timing_cost(schema.TrialRecord.of(by_number[int(r.trial)])))
               for r in front.itertuples()]
    plan = plan_retime(members, max_drop, retime_budget(search_seconds))
    reference = evaluator.reference_latency_ms
    ratios = {m.trial: m.latency_ms / reference for m in members}
    timings = {}
    for number in plan.retime:
        # placed against fp32 and the other members: a member far from all of them settles early
        neighbours = (1.0, *(r for n, r in ratios.items() if n != number))
        timing = evaluator.retime(policy_from_params(by_number[number].params), neighbours)
        if timing is not None:
            entry = {"latency_ms": timing.ratio * reference, "ratio": timing.ratio, "spread": timing.ratio_spread,
                     "lo": timing.ratio_lo, "hi": timing.ratio_hi, "rounds": timing.rounds}
            search_width = interval_width(schema.TrialRecord.of(by_number[number]).measurement)
            width = interval_width({"latency_ratio_lo": timing.ratio_lo, "latency_ratio_hi": timing.ratio_hi})
            if width is not None and search_width is not None and width > search_width:
                entry["wider"] = True  # noisier than the search's own number: that one stands
            timings[str(number)] = entry
    # a member this pass left out keeps the re-timing an earlier pass gave it (a short resume has a
    # small budget; its earlier side-by-side ratio is still the better number than none)
    earlier = schema.retimed(study)
    kept = {str(n): {**earlier[str(n)], "earlier": True} for n in plan.not_retimed if str(n) in earlier}
    return schema.write_retimed(study, time.strftime("%Y-%m-%dT%H:%M:%S%z"), {**kept, **timings},
                                [n for n in plan.not_retimed if str(n) not in kept], plan.budget_s)


def interval_width(measurement: dict[str, Any]) -> float | None:
    """hi / lo of a measured latency ratio's confidence interval (None where it was not recorded)."""
    lo, hi = measurement.get("latency_ratio_lo"), measurement.get("latency_ratio_hi")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > 0:
        return hi / lo
    ci = measurement.get("latency_ci")
    return float(ci) if isinstance(ci, (int, float)) and ci >= 1 else None


def _timing_cost(trial: schema.TrialRecord) -> float:
    """Seconds its timing took when it was measured (estimated for trials from before that was kept)."""
    m = trial.measurement
    if m.get("latency_seconds"):
        return float(m["latency_seconds"])
    return 2 * (m.get("latency_runs") or 0) * (m.get("candidate_ms") or 0) / 1000
