"""Latency and peak memory of one forward, built for a noisy shared machine.

Latency is measured as a ratio to a reference model timed in the same rounds: each round times
the candidate and the reference back to back (order alternating between rounds, ABBA), so a
slowdown of the whole machine during a round hits both and cancels in the ratio. The median of
the per-round ratios is stable to a few percent where whole-model medians drift by 10%.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

Forward = Callable[[], object]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(forward: Forward, calls: int, device: torch.device) -> float:
    """Seconds for `calls` forwards, device-synchronised at both ends."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        forward()
    _sync(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class TimingSettings:
    rounds: int = 9  # at least this many rounds
    min_round_s: float = 0.05  # each side of a round runs at least this long
    warmup_calls: int = 2  # the last one is timed, to size the rounds
    max_rounds: int = 33  # rounds are added, 4 at a time, until the median is known to within
    target_ci: float = 1.03  # this ratio (upper / lower end of its ~90% confidence interval)
    keep_freed_memory: bool = True  # on the CPU, glibc keeps freed memory (see autoprec.measure.machine)
    settled_rounds: int = 5  # with neighbours to place it among, the earliest a candidate may stop


@dataclass
class PairedTiming:
    ratio: float  # median over rounds of candidate time / reference time
    ratio_spread: float  # max / min of the per-round ratios
    candidate_ms: float  # median per-call ms of the candidate, as measured in this run
    reference_ms: float
    rounds: int
    calls_per_round: int
    ratio_ci: float = 1.0  # upper / lower end of the median ratio's ~90% confidence interval
    ratio_lo: float | None = None  # the ends of that interval
    ratio_hi: float | None = None
    stopped: str = "target"  # settled (its place among the neighbours is known), target, or max_rounds
    seconds: float = 0.0  # wall time of the whole measurement, warm-up included


def median_ci(values: list[float], z: float = 1.645) -> tuple[float, float]:
    """A distribution-free confidence interval of the median from order statistics (z=1.645: ~90%).

    The rank of the sample median is binomial(n, 1/2): the interval runs from the order statistic
    z * sqrt(n) / 2 below the middle to the one as far above it."""
    ordered = sorted(values)
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1 + (n % 2))
    hi = min(n - 1, math.ceil(n / 2 + half) - (n % 2 == 0))
    return ordered[lo], ordered[hi]


def settles(lo: float, hi: float, neighbours: Sequence[float], margin: float = 1.0) -> bool:
    """True when the interval [lo, hi], widened by `margin` (a ratio) on each side, holds none of the
    neighbours' ratios: more rounds would not change which of them the candidate is faster than."""
    return bool(neighbours) and not any(lo / margin <= r <= hi * margin for r in neighbours)


def paired_latency(candidate: Forward, reference: Forward, device: torch.device,
                   settings: TimingSettings = TimingSettings(),
                   neighbours: Sequence[float] | None = None) -> PairedTiming:
    """Time candidate and reference interleaved (ABBA) and keep the ratio.

    After `settings.rounds` rounds, more are added until the median ratio's confidence interval is
    within `target_ci` (a quiet machine stops early, a busy one measures longer, up to max_rounds).
    With `neighbours` (the ratios the candidate's place is decided against: fp32's 1.0 and the
    front's), timing stops as soon as the interval, widened by `target_ci`, holds none of them, from
    `settled_rounds` on, then at every step of 4: a candidate 5x slower than everything stops after a
    handful of rounds, and the 3% target only binds where a neighbour is that close. (The widening
    keeps a close candidate from settling on a lucky first handful: at 5 rounds the interval is the
    range, which misses the median about 6% of the time.)"""
    started = time.perf_counter()
    for _ in range(max(0, settings.warmup_calls - 1)):
        candidate()
        reference()
    # the last warm-up call of each side is timed, to size the rounds
    probe = max(time_calls(candidate, 1, device), time_calls(reference, 1, device), 1e-6)
    calls = max(1, math.ceil(settings.min_round_s / probe))
    ratios, cand_ms, ref_ms = [], [], []
    target = settings.rounds
    checks = {settings.settled_rounds} if neighbours else set()
    stopped = "target"
    while True:
        if len(ratios) % 2 == 0:
            tc = time_calls(candidate, calls, device)
            tr = time_calls(reference, calls, device)
        else:
            tr = time_calls(reference, calls, device)
            tc = time_calls(candidate, calls, device)
        ratios.append(tc / tr)
        cand_ms.append(1000 * tc / calls)
        ref_ms.append(1000 * tr / calls)
        n = len(ratios)
        if n in checks or (neighbours and n >= target):
            if settles(*median_ci(ratios), neighbours or (), settings.target_ci):
                stopped = "settled"
                break
        if n >= target:
            lo, hi = median_ci(ratios)
            if hi / lo <= settings.target_ci:
                break
            if n >= settings.max_rounds:
                stopped = "max_rounds"
                break
            target = min(settings.max_rounds, target + 4)
    lo, hi = median_ci(ratios)
    return PairedTiming(statistics.median(ratios), max(ratios) / min(ratios), statistics.median(cand_ms),
                        statistics.median(ref_ms), len(ratios), calls, hi / lo, lo, hi, stopped,
                        time.perf_counter() - started)


def solo_latency_ms(forward: Forward, device: torch.device, rounds: int = 15,
                    min_round_s: float = 0.05, warmup_calls: int = 2) -> tuple[float, float]:
    """Median per-call ms of `forward` alone, and the max/min spread of the round medians."""
    for _ in range(warmup_calls):
        forward()
    probe = max(time_calls(forward, 1, device), 1e-6)
    calls = max(1, math.ceil(min_round_s / probe))
    per_call = [1000 * time_calls(forward, calls, device) / calls for _ in range(rounds)]
    return statistics.median(per_call), max(per_call) / min(per_call)


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a moment: the profiler's C++ side (kineto) prints start/stop
    and GPU-probe lines there that a user should not read as errors."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_activation_peak_bytes(forward: Forward) -> int:
    """Peak bytes of tensors allocated during one CPU forward and alive at the same time.

    From the PyTorch profiler's allocator events (`profile_memory=True`): every allocation and free
    at its own time; the running sum's maximum is the peak. It counts tensor storage handed out by
    torch's CPU allocator, not interpreter or library overhead, so it is deterministic where RSS is not.
    The raw events, not the ops' net usage: a compiled graph is one op whose buffers are allocated and
    freed inside it (its net usage is its output alone; a compiled MLP's peak read 64 KiB, not 320).
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except AttributeError:  # a torch without the raw events: each op's net allocation at its start
        events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                        if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def cuda_forward_peak_bytes(forward: Forward, device: torch.device) -> int:
    """The CUDA caching allocator's peak during one forward (weights included)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
