"""Do the formats' kernels slow down alike when the machine's state changes? One matmul per format,
timed on each core in turn for a while.

A 512x512 matmul in fp32 and in bf16 is timed on core 0 and on core 1 alternately (one thread,
pinned with sched_setaffinity), continuously for `--seconds`; the table shows the medians per
time window. Pairing a candidate with the fp32 reference cancels a slowdown that hits both
alike; if fp32 and bf16 move by different amounts at the same moment, the bf16/fp32 ratio itself
moves, and no pairing can cancel that.

    .venv/bin/python benchmarks/core_drift.py [--seconds 150] [--windows 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import _common as C

import torch  # noqa: E402


def ms_per_call(fn, calls: int = 20) -> float:
    return 1000 * C.time_calls(fn, calls) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores = sorted(os.sched_getaffinity(0))[:2]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(args.size, args.size, generator=g), torch.randn(args.size, args.size, generator=g)
    kernels = {"fp32": lambda: a @ b, "bf16": (lambda x, y: lambda: x @ y)(a.bfloat16(), b.bfloat16())}
    samples: list[tuple[float, dict[tuple[str, int], float]]] = []
    start = time.time()
    with torch.inference_mode():
        for fn in kernels.values():
            fn()
        while time.time() - start < args.seconds:
            row = {}
            for core in cores:
                os.sched_setaffinity(0, {core})
                for name, fn in kernels.items():
                    row[(name, core)] = ms_per_call(fn)
            samples.append((time.time() - start, row))
    os.sched_setaffinity(0, set(cores))
    print(f"### {args.size}x{args.size} matmul per call (ms), fp32 and bf16, on cores {cores} in turn\n")
    print(C.machine_header({"threads": 1, "samples": f"{len(samples)} in {args.seconds:.0f} s"}))
    print()
    per = max(1, len(samples) // args.windows)
    rows, ratios, fp32s, bf16s = [], [], [], []
    for i in range(0, len(samples) - per + 1, per):
        window = samples[i:i + per]
        med = {key: statistics.median(r[key] for _, r in window) for key in window[0][1]}
        fp32 = statistics.median(med[("fp32", c)] for c in cores)
        bf16 = statistics.median(med[("bf16", c)] for c in cores)
        fp32s.append(fp32)
        bf16s.append(bf16)
        ratios.append(bf16 / fp32)
        rows.append([f"{window[0][0]:.0f}", *(f"{med[(n, c)]:.3f}" for c in cores for n in kernels), f"{bf16 / fp32:.3f}"])
    rows.append(["**max/min**", *[""] * (2 * len(cores)), f"**{max(ratios) / min(ratios):.3f}**"])
    print(C.table(["t (s)", *(f"{n} core {c}" for c in cores for n in kernels), "bf16 / fp32"], rows))
    print(f"\nfp32 moved {min(fp32s):.3f}-{max(fp32s):.3f} ms ({max(fp32s) / min(fp32s):.3f}), "
          f"bf16 {min(bf16s):.3f}-{max(bf16s):.3f} ms ({max(bf16s) / min(bf16s):.3f})")


if __name__ == "__main__":
    main()
