"""The final re-time pass: the ends of the front first, within a share of the search's time."""

from __future__ import annotations

from autoprec.search.retime import FrontMember, plan_retime, priority, retime_budget

# a front: faster members lose more score and weigh more (int8 packed vs bf16 halves)
FRONT = [
    FrontMember(trial=1, drop=0.0, latency_ms=100.0, memory_bytes=100.0, cost_s=10.0),  # fp32
    FrontMember(trial=2, drop=0.002, latency_ms=80.0, memory_bytes=70.0, cost_s=10.0),
    FrontMember(trial=3, drop=0.004, latency_ms=60.0, memory_bytes=65.0, cost_s=10.0),
    FrontMember(trial=4, drop=0.008, latency_ms=50.0, memory_bytes=60.0, cost_s=10.0),  # fastest
    FrontMember(trial=5, drop=0.001, latency_ms=500.0, memory_bytes=50.0, cost_s=40.0),  # smallest, 5x slow
    FrontMember(trial=6, drop=0.02, latency_ms=40.0, memory_bytes=55.0, cost_s=10.0),  # over the drop
]


def test_priority_alternates_fastest_and_smallest():
    assert [m.trial for m in priority(FRONT[:5])] == [4, 5, 3, 2, 1]


def test_the_plan_fits_the_budget_and_marks_the_rest():
    plan = plan_retime(FRONT, max_drop=0.01, budget_s=35.0)
    assert plan.retime == [4, 3, 2] and plan.not_retimed == [5, 1]  # the smallest costs 40 s: skipped
    assert plan.planned_s == 30.0 <= plan.budget_s
    assert 6 not in plan.retime + plan.not_retimed  # over the drop: no one picks it
    everything = plan_retime(FRONT, max_drop=0.01, budget_s=1e9)
    assert everything.retime == [4, 5, 3, 2, 1] and everything.not_retimed == []


def test_the_fastest_is_re_timed_even_past_the_budget():
    plan = plan_retime(FRONT, max_drop=0.01, budget_s=1.0)
    assert plan.retime == [4] and plan.not_retimed == [5, 3, 2, 1]
    assert plan_retime([], max_drop=0.01, budget_s=10.0).retime == []


def test_budget_is_a_share_of_the_search_time():
    assert retime_budget(600.0) == 90.0
