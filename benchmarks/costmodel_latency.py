"""The cost model's latency error on MiniLM: the calibration autoprec uses against the old one.

    HF_HUB_OFFLINE=1 python benchmarks/costmodel_latency.py --dump /tmp/cm_avx512.json
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/costmodel_latency.py --dump /tmp/cm_avx2.json
    python benchmarks/costmodel_latency.py --load /tmp/cm_avx2.json      # re-fit offline, no model run

What a search does, without Optuna: the fp32 reference, the sensitivity profile (layers timed alone
on their captured inputs), the uniform policies (fp32, bf16, int8) measured against fp32 in
interleaved rounds, then the knapsack proposals of the model calibrated on them, measured the same
way. The table gives, for each calibration, the median and max relative latency error on the
non-uniform policies (what the proposals were chosen by). --dump keeps the profile and every
measurement as JSON, so calibrations can be compared offline (--load) on the same measurements.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MINILM, machine_header, quiet, table  # noqa: E402

import torch  # noqa: E402

from autoprec.measure.machine import configure_cpu
from autoprec.guided.cost_model import CostModel, knapsack_proposals  # noqa: E402
from autoprec.guided.sensitivity import Profile  # noqa: E402


def measure(args: argparse.Namespace) -> dict:
    from autoprec.measure.evaluator import Evaluator
    from autoprec.policy import Policy
    from autoprec.guided.sensitivity import build_profile
    from autoprec.search.space import load_space
    from autoprec.model.model_file import load_spec

    spec = load_spec(str(MINILM))
    space = load_space("cpu")
    device = torch.device("cpu")
    started = time.perf_counter()
    configure_cpu(args.threads, False)
    ev = Evaluator(spec, device)
    choices = space.choices(ev.model, device)
    profile = build_profile(spec, ev.model, ev.example, choices, space.default_dtypes, device)
    measured = []

    def run(default: str, layers: dict[str, str], origin: str) -> None:
        m = ev.measure(Policy(layers=layers, default=default))
        measured.append({"origin": origin, "default": default, "layers": layers,
                         "drop": ev.reference_score - m.score, "latency_ms": m.latency_ms,
                         "ratio": m.latency_ratio, "ci": m.latency_ci, "rounds": m.latency_rounds,
                         "memory_bytes": m.memory_bytes})
        print(f"{origin}: {m.latency_ratio:.3f}x ({m.latency_rounds} rounds)", file=sys.stderr)

    for fmt in ("fp32", "bf16", "int8"):
        default = fmt if fmt in space.default_dtypes else "fp32"
        run(default, {n: fmt if fmt in c else default for n, c in choices.items()}, f"uniform {fmt}")
    model = calibrated(profile, choices, measured, "old")
    proposals = knapsack_proposals(model, args.max_drop, space.default_dtypes)[:args.proposals]
    for default, layers, why in proposals:
        run(default, layers, why)
    return {"profile": profile.to_json(), "choices": {k: list(v) for k, v in choices.items()},
            "reference_latency_ms": ev.reference_latency_ms, "measured": measured,
            "seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}


def calibrated(profile: Profile, choices: dict, measured: list[dict], how: str) -> CostModel:
    model = CostModel(profile, {k: tuple(v) for k, v in choices.items()})
    uniform = {m["origin"].split()[1]: (m["default"], m["layers"], m) for m in measured
               if m["origin"].startswith("uniform ")}
    model.calibrate(uniform)
    if how == "old":  # the older fit: rest_latency[D] = uniform D minus its layers alone, no scales
        model.latency_scale = {}
        for fmt, (default, layers, m) in uniform.items():
            if fmt == default:
                lat = profile.latency_by_default[default]
                model.rest_latency[default] = m["latency_ms"] - sum(lat[n][f] for n, f in layers.items())
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--proposals", type=int, default=10)
    parser.add_argument("--dump", help="write the profile and the measurements to this JSON file")
    parser.add_argument("--load", help="read them from this JSON file instead of measuring")
    args = parser.parse_args(argv)
    quiet()
    if args.load:
        data = json.loads(Path(args.load).read_text())
    else:
        data = measure(args)
        if args.dump:
            Path(args.dump).write_text(json.dumps(data))
    profile = Profile.from_json(data["profile"])
    others = [m for m in data["measured"] if not m["origin"].startswith("uniform ")]
    rows = []
    for how in ("old", "new"):
        model = calibrated(profile, data["choices"], data["measured"], how)
        errors = []
        for m in others:
            p = model.predict(m["default"], m["layers"])
            errors.append(abs(p["latency_ms"] - m["latency_ms"]) / m["latency_ms"])
        worst = min((model.predict(m["default"], m["layers"])["latency_ms"] for m in data["measured"]), default=0)
        rows.append([how, len(errors), f"{100 * statistics.median(errors):.1f}%", f"{100 * max(errors):.1f}%",
                     f"{worst:.1f}"])
    print(machine_header({"threads": data["threads"], "source": args.load or "measured now"}))
    print(table(["calibration", "non-uniform trials", "latency error median", "max", "lowest prediction ms"], rows))
    print("\n" + table(["policy", "default", "int8", "bf16", "ratio", "CI", "rounds"],
                       [[m["origin"], m["default"], sum(f == "int8" for f in m["layers"].values()),
                         sum(f == "bf16" for f in m["layers"].values()), f"{m['ratio']:.3f}", f"{m['ci']:.3f}",
                         m["rounds"]] for m in data["measured"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
