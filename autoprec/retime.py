"""Which front members the final re-time pass re-times, within a time budget.

Re-timing the whole front side by side costs as much as measuring it did (13 minutes of a 33-minute
search on an AVX2 host, shared/facts/cpu-avx2.md). A user picks from the ends of the front within
their drop: the fastest policy, or the smallest. So the pass re-times members in the order
fastest, smallest, second fastest, second smallest, ..., each that still fits the budget (its
cost: what timing it took when it was measured), and marks the rest "not re-timed". The fastest
member is always re-timed: it is the one a user most often exports.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

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
