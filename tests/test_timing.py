"""Paired latency keeps adding rounds until the median ratio is known well enough."""

from __future__ import annotations

import random

import pytest
import torch

from autoprec.measure import timing as T

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


def _ratio_clock(monkeypatch, ratio: float, noise: float, seed: int = 0) -> None:
    """The candidate takes `ratio` x the reference's 1 s per call, times 1 +- noise (uniform)."""
    rng = random.Random(seed)

    def fake_time_calls(forward, calls, device):
        forward()
        if forward.__name__ == "candidate":
            return ratio * (1 + rng.uniform(-noise, noise)) * calls
        return 1.0 * calls
    monkeypatch.setattr(T, "time_calls", fake_time_calls)


FRONT = (1.0, 0.96, 0.6)  # fp32 and two front members


def test_a_candidate_5x_slower_than_everything_stops_after_a_handful_of_rounds(monkeypatch):
    settings = T.TimingSettings(rounds=9, max_rounds=33)
    _ratio_clock(monkeypatch, ratio=5.0, noise=0.08)  # a shared machine: per-round ratios spread by ~15%
    slow = T.paired_latency(candidate, reference, CPU, settings, neighbours=FRONT)
    _ratio_clock(monkeypatch, ratio=0.97, noise=0.08)
    close = T.paired_latency(candidate, reference, CPU, settings, neighbours=FRONT)
    assert slow.rounds == settings.settled_rounds == 5 and slow.stopped == "settled"
    assert 1.0 < slow.ratio_lo <= slow.ratio <= slow.ratio_hi and slow.ratio == pytest.approx(5.0, rel=0.08)
    # 0.97x sits between two neighbours 4% apart: it needs the full precision
    assert close.rounds >= 3 * slow.rounds
    assert close.ratio_lo <= 0.97 <= close.ratio_hi


def test_without_neighbours_the_3_percent_target_rules(monkeypatch):
    _ratio_clock(monkeypatch, ratio=5.0, noise=0.03)
    t = T.paired_latency(candidate, reference, CPU, T.TimingSettings(rounds=9, max_rounds=33))
    assert t.rounds >= 9 and t.stopped in ("target", "max_rounds")
    assert t.ratio_lo <= t.ratio <= t.ratio_hi and t.ratio_hi / t.ratio_lo == pytest.approx(t.ratio_ci)


def test_a_neighbour_inside_the_interval_keeps_the_timing_going(monkeypatch):
    _ratio_clock(monkeypatch, ratio=1.0, noise=0.1)
    t = T.paired_latency(candidate, reference, CPU, T.TimingSettings(rounds=9, max_rounds=21), neighbours=(1.0,))
    assert t.rounds == 21 and t.stopped == "max_rounds" and t.ratio_lo <= 1.0 <= t.ratio_hi


@pytest.mark.parametrize("lo,hi,neighbours,expected", [
    (1.2, 1.5, (1.0, 0.5), True), (0.7, 0.8, (1.0, 0.5), True), (0.9, 1.1, (1.0,), False),
    (0.5, 0.6, (0.55,), False), (0.5, 0.6, (), False)])
def test_settles_when_the_interval_holds_no_neighbour(lo, hi, neighbours, expected):
    assert T.settles(lo, hi, neighbours) is expected
    assert T.settles(1.2, 1.5, (1.0,), margin=1.25) is False  # widened to 0.96-1.875


def test_the_cpu_peak_sees_the_buffers_inside_a_compiled_graph(one_thread):
    """A compiled graph is one profiler op whose intermediate buffers are allocated and freed inside it:
    its net usage is the output alone (64 KiB here). The peak counts the 256 KiB hidden activation too."""
    from autoprec.measure.timing import cpu_activation_peak_bytes

    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256)).eval()
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model)
    hidden, output = 64 * 1024 * 4, 64 * 256 * 4
    with torch.inference_mode():
        compiled(x)
        assert cpu_activation_peak_bytes(lambda: model(x)) >= hidden + output
        assert cpu_activation_peak_bytes(lambda: compiled(x)) >= hidden + output
