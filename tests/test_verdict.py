"""Where the search can still win: exclusions for any proposal, and the verdict that nothing can."""

from __future__ import annotations

import random

import pytest

from autoprec.guided.planner import Measured, fidelity
from autoprec.guided.sensitivity import Profile
from autoprec.guided.verdict import (NOTHING_CAN_WIN, SKIP_FAILED, SKIP_MISS, SKIP_PREDICTED, Exclusion,
                                     describe_policy, exhausted, verdict)

REFERENCE, MAX_DROP, RESOLUTION = 0.9, 0.002, 0.03
FMTS = ("fp32", "int8")
REST_MS = 2.0


def _profile(int8_ms: float, layers: int = 8) -> Profile:
    """`layers` layers of 1 ms in fp32 and `int8_ms` in int8, int8 drops over two orders of magnitude."""
    rng = random.Random(0)
    profile = Profile()
    for i in range(layers):
        profile.layers[f"l{i}"] = {"fp32": {"drop": 0.0, "memory_bytes": 4000.0, "latency_ms": 1.0},
                                   "int8": {"drop": 10 ** rng.uniform(-4, -2), "memory_bytes": 1100.0,
                                            "latency_ms": int8_ms}}
    profile.latency_by_default = {"fp32": {n: {f: v[f]["latency_ms"] for f in FMTS} for n, v in profile.layers.items()}}
    return profile


class _Study:
    """The case of a tight budget on a discrete metric: one int8 layer holds, the two least damaging
    layers together already miss (drop 0.0042 against 0.002)."""

    def __init__(self, int8_ms: float, second_fp32_ms: float = 1.0) -> None:
        self.profile = _profile(int8_ms)
        self.choices = {n: FMTS for n in self.profile.layers}
        self.order = sorted(self.profile.layers, key=lambda n: self.profile.layers[n]["int8"]["drop"])
        second = self.order[1]  # the second least damaging layer: as slow in fp32 as asked
        self.profile.layers[second]["fp32"]["latency_ms"] = second_fp32_ms
        self.profile.latency_by_default["fp32"][second]["fp32"] = second_fp32_ms
        self.trials: list[Measured] = []
        for drop, int8, kw in ((0.0, [], {"uniform": "fp32"}), (0.09, list(self.choices), {"uniform": "int8"}),
                               (0.0, self.order[:1], {"proposed": True}), (0.0042, self.order[:2], {"proposed": True})):
            self.trials.append(self.measure(drop, int8, **kw))

    def policy(self, int8: list[str]) -> dict[str, str]:
        return {n: "int8" if n in int8 else "fp32" for n in self.choices}

    def measure(self, drop: float | None, int8: list[str], **kw) -> Measured:
        layers = self.policy(int8)
        latency = REST_MS + sum(self.profile.layers[n][f]["latency_ms"] for n, f in layers.items())
        memory = 500 + sum(self.profile.layers[n][f]["memory_bytes"] for n, f in layers.items())
        return Measured("fp32", layers, None if drop is None else REFERENCE - drop, None if drop is None else latency,
                        None if drop is None else memory, number=len(self.trials), **kw)

    def verdict(self):
        return verdict(self.profile, self.choices, self.trials, REFERENCE, MAX_DROP, ("fp32",), RESOLUTION)

    def exclusion(self) -> Exclusion:
        return Exclusion(self.profile, self.choices, self.trials, REFERENCE, MAX_DROP, ("fp32",))


def test_nothing_faster_than_fp32_fits_where_int8_is_no_faster_per_layer():
    study = _Study(int8_ms=1.02)  # int8 no faster than fp32 layer by layer (one layer measured 1.007x in the case)
    found = study.verdict()
    assert found is not None and found["kind"] == NOTHING_CAN_WIN
    assert found["miss_trial"] == 3 and found["miss_drop"] == pytest.approx(0.0042) and found["fastest_trial"] == 0
    line = found["line"]
    assert "2 int8 layers (trial 3) lost 0.0042, over the 0.002 budget" in line
    assert "nothing faster than fp32 fits" in line
    assert "--max-drop" in line and "--runtime compiled" in line and "--space" in line
    assert "\n" not in line


def test_no_verdict_while_an_unmeasured_policy_below_the_miss_is_predicted_faster():
    # int8 saves 0.8 ms a layer, and 2.8 ms on the second least damaging one, which holds alone: unmeasured
    study = _Study(int8_ms=0.2, second_fp32_ms=3.0)
    assert study.verdict() is None
    # measure every other single layer below the miss: then nothing unmeasured there is faster than the
    # fastest of them by more than the timing's resolution
    x_hi = fidelity(study.profile, "fp32", study.policy(study.order[:2]))
    for name in study.order[1:]:
        if study.profile.layers[name]["int8"]["drop"] < x_hi:
            study.trials.append(study.measure(0.001, [name]))
    found = study.verdict()
    assert found is not None and "nothing faster than trial 4 (1 int8 layer, 0.767x fp32) fits" in found["line"]


def test_no_verdict_before_a_miss_brackets_the_budget():
    study = _Study(int8_ms=1.02)
    study.trials = study.trials[:1] + study.trials[2:3]  # fp32 and the one-layer policy: nothing missed yet
    assert study.verdict() is None


def test_a_superset_of_a_miss_a_failure_or_a_far_prediction_is_skipped_and_the_rest_is_measured():
    study = _Study(int8_ms=1.02)
    exclusion = study.exclusion()
    superset = exclusion.why("fp32", study.policy(study.order[:3]))
    assert superset is not None and superset.kind == SKIP_MISS and "trial 3" in superset.text
    assert superset.drop == pytest.approx(0.0042)
    # six of the eight layers, not a superset of the pair: predicted far beyond the budget
    far = exclusion.why("fp32", study.policy(study.order[2:]))
    assert far is not None and far.kind == SKIP_PREDICTED and far.drop > MAX_DROP + exclusion.margin
    # what lies below the smallest miss, or just beyond it, is measured
    assert exclusion.why("fp32", study.policy(study.order[1:2])) is None
    assert exclusion.margin >= 0.0
    study.trials.append(study.measure(None, study.order[4:6]))  # could not run
    failed = study.exclusion().why("fp32", study.policy(study.order[4:7]))
    assert failed is not None and failed.kind == SKIP_FAILED and failed.drop is None


def test_the_margin_widens_where_predictions_miss():
    study = _Study(int8_ms=1.02)
    before = study.exclusion()
    far = study.policy(study.order[3:6])
    x_far = fidelity(study.profile, "fp32", far)
    x_hi = fidelity(study.profile, "fp32", study.policy(study.order[:2]))
    assert x_far > x_hi
    # a policy beyond the smallest miss measured to hold: the drop model got it wrong, so it is believed less
    study.trials.append(study.measure(0.0015, study.order[2:5]))
    after = study.exclusion()
    assert after.margin > before.margin


def test_the_sampler_exhausted_line_names_the_smallest_miss():
    study = _Study(int8_ms=0.2)
    found = exhausted(study.profile, study.trials, REFERENCE, MAX_DROP, 25)
    assert "last 25 proposals were all skipped" in found["line"] and "2 int8 layers (trial 3), lost 0.0042" in found["line"]
    assert describe_policy("bf16", {"a": "int8", "b": "bf16", "c": "fp32"}) == "1 fp32 + 1 int8 layers (default bf16)"
