"""Paired latency keeps adding rounds until the median ratio is known well enough."""

from __future__ import annotations

import random

import pytest
import torch

from autoprec import timing as T

CPU = torch.device("cpu")


def _fake_clock(monkeypatch, noise: float, seed: int = 0) -> None:
    """time_calls returns 1.0 s per call for the reference and 0.5 s x (1 + noise) for the candidate."""
    rng = random.Random(seed)

    def fake_time_calls(forward, calls, device):
        forward()
        base = 0.5 if forward.__name__ == "candidate" else 1.0
        jitter = 1 + rng.uniform(-noise, noise) if forward.__name__ == "candidate" else 1.0
        return base * jitter * calls
    monkeypatch.setattr(T, "time_calls", fake_time_calls)


def candidate() -> None:
    pass


def reference() -> None:
    pass


def test_a_steady_machine_stops_at_the_minimum_rounds(monkeypatch):
    _fake_clock(monkeypatch, noise=0.001)
    t = T.paired_latency(candidate, reference, CPU, T.TimingSettings(rounds=9, max_rounds=45))
    assert t.rounds == 9 and t.ratio == pytest.approx(0.5, rel=2e-3) and t.ratio_ci <= 1.02


def test_a_noisy_machine_gets_more_rounds_up_to_the_maximum(monkeypatch):
    _fake_clock(monkeypatch, noise=0.05)
    t = T.paired_latency(candidate, reference, CPU, T.TimingSettings(rounds=9, max_rounds=45, target_ci=1.02))
    assert 9 < t.rounds <= 45 and (t.rounds - 9) % 4 == 0
    assert t.rounds == 45 or t.ratio_ci <= 1.02
    _fake_clock(monkeypatch, noise=0.3)
    t = T.paired_latency(candidate, reference, CPU, T.TimingSettings(rounds=9, max_rounds=21, target_ci=1.02))
    assert t.rounds == 21 and t.ratio_ci > 1.02  # gave up at the maximum, and says how wide it stayed
    fixed = T.paired_latency(candidate, reference, CPU, T.TimingSettings(rounds=5, max_rounds=5))
    assert fixed.rounds == 5


@pytest.mark.parametrize("n", [9, 13, 21, 45])
def test_median_confidence_interval_covers_the_median_about_90_percent(n):
    rng = random.Random(n)
    trials = 2000
    hits = sum(lo <= 0 <= hi for lo, hi in (T.median_ci([rng.gauss(0, 1) for _ in range(n)]) for _ in range(trials)))
    assert 0.85 <= hits / trials <= 0.97
    lo, hi = T.median_ci(list(range(n)))
    assert lo < (n - 1) / 2 < hi
