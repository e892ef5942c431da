"""How repeatable is one `Evaluator.measure(policy)` on this noisy machine, and is memory_bytes right?

`autoprec.measure.evaluator.Evaluator(spec, "cpu")` on MiniLM measures three policies -- fp32 = Policy(),
all-bf16 = Policy(default="bf16", every searchable layer bf16), all-int8 = Policy(every searchable
layer int8) -- `--repeats` times each, interleaved (for repeat: for policy), and prints each
policy's latency_ms values and their spread (max/min; target <= 1.03), the seconds one measurement
costs, and memory_bytes beside the size of the same applied model's state_dict serialized with
torch.save into io.BytesIO (target: within 2%).

By default autoprec's TimingSettings: at least 9 rounds, more (4 at a time, up to 33) until the
median ratio's ~90% confidence interval is within 3%. With --sweep ROUNDS:MIN_ROUND_S,... the
same repeats are run for each fixed round count in turn on the same Evaluator (same fp32
reference latency), to compare what fixed settings give and cost.

    .venv/bin/python benchmarks/measurement_stability.py [--repeats 5] [--rounds 9 --min-round-s 0.05]
    .venv/bin/python benchmarks/measurement_stability.py --sweep 9:0.05,21:0.05,41:0.05 [--threads 1]
    .venv/bin/python benchmarks/measurement_stability.py --device cuda --sweep 9-33:0.05,9-33:0.2
    .venv/bin/python benchmarks/measurement_stability.py --target-ci 1.02,1.03
    .venv/bin/python benchmarks/measurement_stability.py --threads 1,2 --policies fp32,all-int8 --malloc-defaults

Timing keeps freed memory in the process as autoprec does (autoprec.measure.machine); --malloc-defaults
measures under glibc's defaults instead, for comparison (run it as its own process: mallopt is
process-wide and one-way).

Besides autoprec's estimator (median of per-round candidate/reference ratios), the same raw round
times (recorded by wrapping autoprec.measure.timing.time_calls, which changes nothing) are also summarised
as ratio of medians, ratio of minimums, and median of per-round ratios of process CPU time, to show
which estimator is steadiest on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import _common as C

C.quiet()

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import autoprec.measure.evaluator as E  # noqa: E402
import autoprec.measure.timing as T  # noqa: E402
from autoprec import Policy
from autoprec.measure.machine import configure_cpu
from autoprec.measure.timing import TimingSettings  # noqa: E402
from autoprec.measure.machine import default_threads  # noqa: E402

SPREAD_TARGET = 1.03
MEMORY_TARGET = 0.02

_timing_seconds: list[float] = []
_raw_pairs: list[list[tuple[float, float]]] = []  # per paired_latency call: (candidate s, reference s) per round
_cpu_pairs: list[list[tuple[float, float]]] = []  # the same rounds in process CPU seconds
_calls: list[float] = []
_cpu_calls: list[float] = []
_paired = T.paired_latency
_time_calls = T.time_calls


def _recording_time_calls(*args, **kwargs):
    cpu = time.process_time()
    seconds = _time_calls(*args, **kwargs)
    _cpu_calls.append(time.process_time() - cpu)
    _calls.append(seconds)
    return seconds


def _timed_paired_latency(*args, **kwargs):
    """autoprec's own paired_latency, unchanged; its wall time and raw round times are recorded."""
    _calls.clear()
    _cpu_calls.clear()
    start = time.perf_counter()
    try:
        result = _paired(*args, **kwargs)
    finally:
        _timing_seconds.append(time.perf_counter() - start)
    _raw_pairs.append(C.split_rounds(_calls[2:]))  # the first two are the one-call probes
    _cpu_pairs.append(C.split_rounds(_cpu_calls[2:]))
    return result


def _median_of_ratios(p):
    return statistics.median(c / r for c, r in p)


ESTIMATORS = {
    "median of round ratios (autoprec)": lambda raw: _median_of_ratios(raw["wall"]),
    "ratio of medians": lambda raw: (statistics.median(c for c, _ in raw["wall"])
                                     / statistics.median(r for _, r in raw["wall"])),
    "ratio of minimums": lambda raw: min(c for c, _ in raw["wall"]) / min(r for _, r in raw["wall"]),
    "median of round ratios of process CPU time": lambda raw: _median_of_ratios(raw["cpu"]),
}


T.time_calls = _recording_time_calls
E.paired_latency = _timed_paired_latency


def parse_sweep(text: str) -> list[TimingSettings]:
    """ROUNDS[:MIN_ROUND_S] is a fixed round count; MIN-MAX[:MIN_ROUND_S] adds rounds up to MAX (adaptive)."""
    out = []
    for item in text.split(","):
        rounds, _, min_s = item.partition(":")
        least, _, most = rounds.partition("-")
        out.append(TimingSettings(rounds=int(least), min_round_s=float(min_s or 0.05), max_rounds=int(most or least)))
    return out


def run_setting(ev: E.Evaluator, policies: dict[str, Policy], settings: TimingSettings, repeats: int,
                threads: list[int]):
    """for repeat: for thread count: for policy: measure. Keys are policy names, with the thread
    count appended when several are compared."""
    ev.timing = settings
    label = (lambda name, t: name) if len(threads) == 1 else (lambda name, t: f"{name} @ {t} thread(s)")
    results = {label(name, t): [] for t in threads for name in policies}
    bar = tqdm(total=repeats * len(threads) * len(policies), desc="measurements", unit="measure", file=sys.stderr)
    for _ in range(repeats):
        for t in threads:
            torch.set_num_threads(t)
            for name, policy in policies.items():
                bar.set_postfix_str(label(name, t) if len(threads) > 1 else name)
                start = time.perf_counter()
                _timing_seconds.clear()
                _raw_pairs.clear()
                _cpu_pairs.clear()
                m = ev.measure(policy)
                if not m.feasible:
                    raise SystemExit(f"{name}: infeasible: {m.reason}")
                assert len(_raw_pairs) == 1 and len(_raw_pairs[0]) == m.latency_rounds, "round times not captured"
                assert abs(_median_of_ratios(_raw_pairs[0]) - m.latency_ratio) < 1e-9
                results[label(name, t)].append((m, time.perf_counter() - start, sum(_timing_seconds),
                                                {"wall": _raw_pairs[0], "cpu": _cpu_pairs[0]}, policy))
                bar.update()
    bar.close()
    torch.set_num_threads(threads[0])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=None, help="TimingSettings.rounds (default: autoprec's)")
    parser.add_argument("--min-round-s", type=float, default=None, help="TimingSettings.min_round_s")
    parser.add_argument("--sweep", default=None, help="ROUNDS:MIN_ROUND_S,... fixed settings to try in turn (MIN-MAX:MIN_ROUND_S: adaptive rounds)")
    parser.add_argument("--target-ci", default=None,
                        help="comma list of TimingSettings.target_ci values to try in turn (adaptive rounds)")
    parser.add_argument("--spec", default=str(C.MINILM), help="model.py to measure (default: MiniLM)")
    parser.add_argument("--threads", default=None,
                        help="CPU threads (default: autoprec's, all usable cores but one); a list such as "
                             "1,2 measures every policy at each thread count in turn, side by side")
    parser.add_argument("--policies", default="fp32,all-bf16,all-int8",
                        help="which of fp32, all-bf16, all-int8 to measure (bf16 is slow where the CPU lacks avx512_bf16)")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="time with glibc's default malloc settings (autoprec keeps freed memory by default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (--threads applies to the CPU)")
    parser.add_argument("--no-peak", action="store_true", help="Evaluator(measure_peak=False)")
    args = parser.parse_args()

    default = TimingSettings()
    if args.sweep:
        sweep = parse_sweep(args.sweep)
    elif args.target_ci:
        sweep = [TimingSettings(target_ci=float(x)) for x in args.target_ci.split(",")]
    else:
        sweep = [TimingSettings(rounds=args.rounds or default.rounds,
                                min_round_s=args.min_round_s if args.min_round_s is not None else default.min_round_s)]

    sweep = [dataclasses.replace(t, keep_freed_memory=not args.malloc_defaults) for t in sweep]
    from autoprec.measure.machine import allocator_state
    from autoprec.model.model_file import load_spec

    spec = load_spec(args.spec)
    start = time.perf_counter()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [default_threads()]
    configure_cpu(threads[0], sweep[0].keep_freed_memory)
    ev = E.Evaluator(spec, args.device, timing=sweep[0], measure_peak=not args.no_peak,
                     time_reference=True)  # fp32 against itself is the point here
    setup_s = time.perf_counter() - start
    policies = {k: p for k, p in C.three_policies(ev.model).items() if k in args.policies.split(",")}

    print(f"### Measurement stability: Evaluator(spec, {args.device!r}).measure on {os.path.relpath(args.spec, C.REPO)}\n")
    print(C.machine_header({
        "threads": torch.get_num_threads() if len(threads) == 1 else
        f"{threads} in turn (fp32 reference latency measured at {threads[0]})",
        "Evaluator setup": f"{setup_s:.1f} s (fp32 reference latency {ev.reference_latency_ms:.1f} ms, "
                           f"solo, {2 * sweep[0].rounds} rounds)",
        "measure_peak": not args.no_peak,
        "cpu allocator": allocator_state(),
        "order": f"for repeat in {args.repeats}: for policy in {list(policies)}",
    }))
    print()

    memory_rows = None
    summary = []
    for settings in sweep:
        results = run_setting(ev, policies, settings, args.repeats, threads)
        rows = []
        for name, runs in results.items():
            ms = [m.latency_ms if len(threads) == 1 else m.latency_ratio for m, *_ in runs]
            spread = max(ms) / min(ms)
            wall = statistics.median(w for _, w, *_ in runs)
            timing_s = statistics.median(t for _, _, t, *_ in runs)
            inner = statistics.median(m.latency_spread for m, *_ in runs)
            digits = 1 if len(threads) == 1 else 3
            rows.append([name, " ".join(f"{x:.{digits}f}" for x in ms), f"{statistics.median(ms):.{digits}f}",
                         f"**{spread:.3f}**", "ok" if spread <= SPREAD_TARGET else "MISSED",
                         " ".join(str(m.latency_rounds) for m, *_ in runs), f"{inner:.2f}", f"{timing_s:.1f}", f"{wall:.1f}"])
            summary.append((settings, name, spread, timing_s, wall))
        print(f"#### TimingSettings(rounds={settings.rounds}, max_rounds={settings.max_rounds}, "
              f"target_ci={settings.target_ci}, min_round_s={settings.min_round_s}, "
              f"warmup_calls={settings.warmup_calls})\n")
        values = "latency_ms" if len(threads) == 1 else "latency_ratio (vs fp32 at the same threads)"
        print(C.table(["policy", f"{values} x {args.repeats}", "median", "spread max/min",
                       f"<= {SPREAD_TARGET}", "rounds per measure", "within-measure round ratio max/min",
                       "s in paired_latency", "s per measure (all)"], rows))
        print()
        est_rows = []
        for est_name, est in ESTIMATORS.items():
            cells = []
            for name, runs in results.items():
                values = [est(run[3]) for run in runs]
                cells.append(f"{max(values) / min(values):.3f}")
            est_rows.append([est_name, *cells])
        print(f"Same raw round times, other estimators of the ratio: spread max/min over the {args.repeats} "
              "repeats\n")
        print(C.table(["estimator", *[f"{n} spread" for n in results]], est_rows))
        print()
        if memory_rows is None:
            memory_rows = []
            seen: set[int] = set()
            for name, runs in results.items():
                if id(runs[0][4]) in seen:  # the same policy at another thread count
                    continue
                seen.add(id(runs[0][4]))
                name = name.split(" @ ")[0]
                mem = runs[0][0].memory_bytes
                assert all(m.memory_bytes == mem for m, *_ in runs), f"{name}: memory_bytes varies"
                ser = C.serialized_bytes(ev.candidate(runs[0][4]))
                ratio = mem / ser
                memory_rows.append([name, f"{mem:,}", f"{ser:,}", f"{ratio:.4f}",
                                    "ok" if abs(ratio - 1) <= MEMORY_TARGET else "MISSED",
                                    f"{runs[0][0].peak_bytes:,}" if runs[0][0].peak_bytes else "-"])

    print("#### memory_bytes vs serialized state_dict (torch.save into io.BytesIO)\n")
    print(C.table(["policy", "memory_bytes", "serialized bytes", "ratio", f"within {MEMORY_TARGET:.0%}",
                   "peak_bytes"], memory_rows))
    if len(sweep) > 1:
        print("\n#### Sweep summary\n")
        rows = []
        for settings in sweep:
            mine = [s for s in summary if s[0] == settings]
            worst = max(s[2] for s in mine)
            rows.append([f"rounds={settings.rounds}..{settings.max_rounds}, target_ci={settings.target_ci}, "
                         f"min_round_s={settings.min_round_s}", f"{worst:.3f}",
                         "ok" if worst <= SPREAD_TARGET else "MISSED",
                         " / ".join(f"{s[3]:.1f}" for s in mine), " / ".join(f"{s[4]:.1f}" for s in mine)])
        print(C.table(["TimingSettings", "worst spread", f"<= {SPREAD_TARGET}",
                       "s in paired_latency (per policy, table order)", "s per measure (per policy, table order)"],
                      rows))


if __name__ == "__main__":
    main()
