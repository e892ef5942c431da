"""Linearized profile drops against whole-model forwards, per layer, and what each costs.

    HF_HUB_OFFLINE=1 python benchmarks/profile_drops.py [--models minilm,resnet,bert6,bert24] [--probes 8]

For every searchable layer and format (bf16, int8) of each model, the fidelity drop with only that
layer changed, computed both ways on the model's example_inputs():
- linearized (autoprec's default, `autoprec.guided.sensitivity.linearized_drops`): one forward with gradients,
  `--probes` random backward probes, one run of each converted layer on its captured input;
- exact (`autoprec.guided.sensitivity.exact_drops`): one whole-model forward per layer and format.
The table gives the seconds of each, the sums (what the cost model adds up before calibration), the
Spearman rank correlation and the spread of per-layer ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MINILM, REPO, machine_header, quiet, table  # noqa: E402

MODELS = {"minilm": MINILM, "resnet": REPO / "studies" / "resnet" / "model.py",
          "gpt2": REPO / "benchmarks" / "models" / "gpt2_small.py", "bert6": REPO / "benchmarks" / "models" / "bert6.py",
          "bert24": REPO / "benchmarks" / "models" / "bert24.py"}
FORMATS = ("bf16", "int8")


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,resnet,bert6,bert24")
    parser.add_argument("--probes", type=int, default=8)
    args = parser.parse_args()
    quiet()
    import torch

    from autoprec.guided.sensitivity import exact_drops, linearized_drops
    from autoprec.search.space import load_space
    from autoprec.measure.machine import default_threads
    from autoprec.model.model_file import load_spec

    torch.set_num_threads(default_threads())
    device = torch.device("cpu")
    print("### Profile drops: linearized vs whole-model forwards\n")
    print(machine_header({"probes": args.probes, "command": "python " + " ".join(sys.argv)}))
    print()
    rows = []
    for key in args.models.split(","):
        spec = load_spec(MODELS[key])
        model = spec.new_model()
        example = spec.example()
        # the formats each layer can take here (ResNet's convolutions have no int8 kernel)
        choices = load_space("cpu").choices(model, device)
        start = time.perf_counter()
        names = list(choices)
        linear, skipped = linearized_drops(spec, model, example, names, choices, device, probes=args.probes)
        linear_s = time.perf_counter() - start
        if skipped:
            linear.update(exact_drops(spec, model, example, skipped, choices, device))
            linear_s = time.perf_counter() - start
        start = time.perf_counter()
        exact = exact_drops(spec, model, example, names, choices, device)
        exact_s = time.perf_counter() - start
        for fmt in FORMATS:
            both = [(linear[n][fmt], exact[n][fmt]) for n in names if fmt in exact[n] and exact[n][fmt] > 1e-8]
            if not both:
                continue
            a, b = [x for x, _ in both], [y for _, y in both]
            ratios = sorted(x / y for x, y in both)
            rows.append([key, len(names), fmt, f"{linear_s:.1f}", f"{exact_s:.1f}", f"{exact_s / linear_s:.1f}x",
                         f"{sum(a):.3e}", f"{sum(b):.3e}", f"{sum(a) / sum(b):.3f}", f"{_spearman(a, b):.3f}" if len(both) > 2 else "-",
                         f"{ratios[len(ratios) // 10]:.2f} / {statistics.median(ratios):.2f} / "
                         f"{ratios[-1 - len(ratios) // 10]:.2f}", len(skipped)])
        print(f"  {key}: done", file=sys.stderr)
    print(table(["model", "layers", "format", "linearized s", "exact s", "speed-up", "sum linearized",
                 "sum exact", "sum ratio", "Spearman", "per-layer ratio p10 / median / p90", "layers exact"],
                rows))
    print("\nPer-layer ratios are over layers whose exact drop is above 1e-8 (below that both are rounding"
          " noise); the seconds are the same for both formats of a model (one pass does all formats).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
