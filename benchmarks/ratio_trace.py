"""Why a policy's latency ratio moves between measurements: the ratio over time, and page faults.

On MiniLM (studies/minilm), fp32 (a copy of the reference), all-bf16 and all-int8 are each timed
against the fp32 reference in back-to-back ABBA pairs of single forwards, continuously for
`--seconds`, on the same model instances (nothing re-applied). The table shows, per window of
`--window` pairs, each side's median ms and the median ratio: if the ratio steps while the same
instances run the same inputs, the cause is the machine, not the measurement method.

Then minor page faults per forward (getrusage) under glibc's default allocator and after
`autoprec.measure.machine.keep_freed_memory()` (what a server with tcmalloc/jemalloc does), with the
median ms of 7 forwards each: a forward that faults its activations in on every call pays the
kernel for it, and that cost moves with the machine's memory state.

    .venv/bin/python benchmarks/ratio_trace.py [--threads 2] [--seconds 180] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import _common as C

C.quiet()

import torch  # noqa: E402

import autoprec.measure.evaluator as E  # noqa: E402
from autoprec.measure.machine import configure_cpu
from autoprec.measure.machine import KEPT, keep_freed_memory  # noqa: E402
from autoprec.measure.timing import TimingSettings, time_calls  # noqa: E402
from autoprec.model.model_file import call_model, load_spec  # noqa: E402

def faults_and_ms(forward, calls: int = 7) -> tuple[float, float]:
    forward()
    forward()
    faults, ms = [], []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        forward()
        ms.append(1000 * (time.perf_counter() - start))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(faults), statistics.median(ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--window", type=int, default=20, help="ABBA pairs per row of the trace")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run the trace with glibc keeping freed memory (mallopt) instead of the default")
    args = parser.parse_args()

    spec = load_spec(str(C.MINILM))
    # The Evaluator would keep freed memory itself; here the trace chooses, and the defaults go first.
    configure_cpu(args.threads, False)
    ev = E.Evaluator(spec, "cpu", measure_peak=False, reference_latency_ms=1.0,
                     timing=TimingSettings(keep_freed_memory=False))
    models = {k: ev.candidate(p) for k, p in C.three_policies(ev.model).items()}
    forwards = {k: (lambda m=m: call_model(m, ev.example)) for k, m in models.items()}
    reference = lambda: call_model(ev.model, ev.example)  # noqa: E731

    print("### Latency ratio over time and page faults per forward (ratio_trace.py)\n")
    print(C.machine_header({"model": "studies/minilm (batch 16 x 128)",
                            "trace allocator": "glibc, freed memory kept (mallopt)" if args.keep_freed_memory
                            else "glibc defaults"}))
    print()
    if args.keep_freed_memory and keep_freed_memory() != KEPT:
        raise SystemExit("this C library has no mallopt thresholds to set (not glibc)")

    pairs: list[dict[str, float]] = []
    start = time.time()
    with torch.inference_mode():
        while time.time() - start < args.seconds:
            row = {"t": time.time() - start}
            for k, f in forwards.items():
                if len(pairs) % 2 == 0:
                    c, r = time_calls(f, 1, ev.device), time_calls(reference, 1, ev.device)
                else:
                    r, c = time_calls(reference, 1, ev.device), time_calls(f, 1, ev.device)
                row[k], row[k + " ms"], row[k + " ref"] = c / r, 1000 * c, 1000 * r
            pairs.append(row)

    header = ["t (s)"] + [f"{k} ms / ref ms (ratio)" for k in forwards]
    rows, window_ratios = [], {k: [] for k in forwards}
    window = max(1, min(args.window, len(pairs)))  # a short trace of slow policies is one window
    for j in range(0, len(pairs) - window + 1, window):
        chunk = pairs[j:j + window]
        cells = [f"{chunk[0]['t']:.0f}"]
        for k in forwards:
            ratio = statistics.median(p[k] for p in chunk)
            window_ratios[k].append(ratio)
            cells.append(f"{statistics.median(p[k + ' ms'] for p in chunk):.1f} / "
                         f"{statistics.median(p[k + ' ref'] for p in chunk):.1f} ({ratio:.3f})")
        rows.append(cells)
    rows.append(["**spread max/min of the window ratios**"]
                + [f"**{max(v) / min(v):.3f}**" for v in window_ratios.values()])
    print(f"{len(pairs)} ABBA pairs per policy in {args.seconds:.0f} s, median per window of {window}:\n")
    print(C.table(header, rows))
    print()

    # After the trace: mallopt cannot be undone, so the default allocator is measured first.
    with torch.inference_mode():
        default = None if args.keep_freed_memory else {k: faults_and_ms(f) for k, f in forwards.items()}
        keep_freed_memory()
        kept = {k: faults_and_ms(f) for k, f in forwards.items()}
    rows = [[k, *(["-", "-"] if default is None else [f"{default[k][0]:.0f}", f"{default[k][1]:.1f}"]),
             f"{kept[k][0]:.0f}", f"{kept[k][1]:.1f}"] for k in forwards]
    print("Minor page faults per forward, median of 7 forwards:\n")
    print(C.table(["policy", "faults / forward (glibc default)", "ms", "faults / forward (freed memory kept)",
                   "ms"], rows))


if __name__ == "__main__":
    main()
