"""The cost model's latency error: the calibration autoprec uses against the old one.

    HF_HUB_OFFLINE=1 python benchmarks/costmodel_latency.py --dump cm_avx512.json
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/costmodel_latency.py --dump cm_avx2.json
    python benchmarks/costmodel_latency.py --load cm_avx2.json      # re-fit offline, no model run
    python benchmarks/costmodel_latency.py --study resnet --runtime compiled --neighbours --proposals 3

What a search does, without Optuna: the fp32 reference, the sensitivity profile (layers timed alone
on their captured inputs), the uniform policies (fp32, bf16, int8) measured against fp32 in
interleaved rounds, then the knapsack proposals of the model calibrated on them, measured the same
way. The table gives, for each calibration, the median and max relative latency error on the
non-uniform policies (what the proposals were chosen by). --dump keeps the profile and every
measurement as JSON, so calibrations can be compared offline (--load) on the same measurements.

--neighbours adds four policies that split the int8 layers in two ways: every other layer (two
complementary policies, so most int8 layers have float neighbours) and the first and second half (int8
layers next to int8 layers). An additive model predicts the same sum for both pairs; where int8 passes
between neighbouring int8 layers (the compiled runtime fuses the next layer's quantize into the
previous layer's kernel), the alternating pair measures slower than the halves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MINILM, REPO, machine_header, quiet, table  # noqa: E402

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

    spec = load_spec(str(MINILM if args.study == "minilm" else REPO / "studies" / args.study / "model.py"))
    space = load_space("cpu")
    device = torch.device("cpu")
    started = time.perf_counter()
    configure_cpu(args.threads, True)  # freed memory kept, as a search keeps it
    ev = Evaluator(spec, device, runtime=args.runtime)
    choices = space.choices(ev.model, device)
    profile = build_profile(spec, ev.model, ev.example, choices, space.default_dtypes, device, runtime=args.runtime,
                            time_model=ev.reference_solo_ms if args.runtime == "eager" else None)
    profile.reference_latency_ms = ev.reference_latency_ms
    measured = []

    def run(default: str, layers: dict[str, str], origin: str) -> None:
        m = ev.measure(Policy(layers=layers, default=default))
        measured.append({"origin": origin, "default": default, "layers": layers,
                         "drop": ev.reference_score - m.score, "latency_ms": m.latency_ms,
                         "ratio": m.latency_ratio, "ci": m.latency_ci, "rounds": m.latency_rounds,
                         "memory_bytes": m.memory_bytes})
        print(f"{origin}: {m.latency_ratio:.3f}x ({m.latency_rounds} rounds)", file=sys.stderr)

    uniform = ["fp32", "bf16", "int8"] + ([args.int8] if args.neighbours and args.int8 != "int8" else [])
    for fmt in uniform:
        default = fmt if fmt in space.default_dtypes else "fp32"
        run(default, {n: fmt if fmt in c else default for n, c in choices.items()}, f"uniform {fmt}")
    if args.neighbours:
        fmt = args.int8
        int8 = [n for n, c in choices.items() if fmt in c]
        half = len(int8) // 2
        for origin, chosen in ((f"{fmt} every other layer, from the first", int8[0::2]),
                               (f"{fmt} every other layer, from the second", int8[1::2]),
                               (f"{fmt} first half", int8[:half]), (f"{fmt} second half", int8[half:])):
            run("fp32", {n: fmt if n in chosen else "fp32" for n in choices}, origin)
    model = calibrated(profile, choices, measured, "old")
    proposals = knapsack_proposals(model, args.max_drop, space.default_dtypes)[:args.proposals]
    for default, layers, why in proposals:
        run(default, layers, why)
    return {"profile": profile.to_json(), "choices": {k: list(v) for k, v in choices.items()},
            "reference_latency_ms": ev.reference_latency_ms, "measured": measured,
            "seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
            "study": args.study, "runtime": args.runtime, "int8": args.int8}


def calibrated(profile: Profile, choices: dict, measured: list[dict], how: str) -> CostModel:
    """how: "old" (the rest term only, no scales), "additive" (scales, no links) or "new" (autoprec's)."""
    if how != "new":
        profile = Profile.from_json({**profile.to_json(), "links": []})
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
    parser.add_argument("--study", default="minilm", help="a folder of studies/ (default: minilm)")
    parser.add_argument("--runtime", default="eager", choices=("eager", "compiled"))
    parser.add_argument("--neighbours", action="store_true",
                        help="also measure int8 on alternating layers and on each half (see the module's docstring)")
    parser.add_argument("--int8", default="int8", choices=("int8", "int8_static"),
                        help="the format --neighbours splits (int8_static: static int8 Linear layers)")
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
    for how in ("old", "additive", "new") if profile.links else ("old", "new"):
        model = calibrated(profile, data["choices"], data["measured"], how)
        errors = []
        for m in others:
            p = model.predict(m["default"], m["layers"])
            errors.append(abs(p["latency_ms"] - m["latency_ms"]) / m["latency_ms"])
        worst = min((model.predict(m["default"], m["layers"])["latency_ms"] for m in data["measured"]), default=0)
        rows.append([how, len(errors), f"{100 * statistics.median(errors):.1f}%", f"{100 * max(errors):.1f}%",
                     f"{worst:.1f}"])
    print(machine_header({"threads": data["threads"], "source": args.load or "measured now",
                          "study": data.get("study", "minilm"), "runtime": data.get("runtime", "eager")}))
    print(table(["calibration", "non-uniform trials", "latency error median", "max", "lowest prediction ms"], rows))
    if profile.links:
        print(f"\n{len(profile.links)} links (int8 passed between neighbouring static int8 layers), saving "
              f"{sum(link['saving_ms'] for link in profile.links):.2f} ms together: "
              + ", ".join(f"{link['producer']} -> {link['consumer']}" for link in profile.links[:3])
              + (", ..." if len(profile.links) > 3 else ""))
    new = calibrated(profile, data["choices"], data["measured"], "new")
    print("\n" + table(["policy", "default", "int8", "bf16", "ratio", "CI", "rounds", "predicted ratio"],
                       [[m["origin"], m["default"], sum(f.startswith("int8") for f in m["layers"].values()),
                         sum(f == "bf16" for f in m["layers"].values()), f"{m['ratio']:.3f}", f"{m['ci']:.3f}",
                         m["rounds"], f"{new.predict(m['default'], m['layers'])['latency_ms'] / data['reference_latency_ms']:.3f}"]
                        for m in data["measured"]]))
    ratio = {m["origin"]: m["ratio"] for m in data["measured"]}
    fmt = data.get("int8", "int8")
    pairs = ((f"{fmt} every other layer, from the first", f"{fmt} every other layer, from the second"),
             (f"{fmt} first half", f"{fmt} second half"))
    if all(o in ratio for pair in pairs for o in pair) and f"uniform {fmt}" in ratio:
        whole = ratio[f"uniform {fmt}"] + ratio["uniform fp32"]
        print(f"\nsums of complementary {fmt} policies, x fp32 (an additive model predicts "
              f"all-{fmt} + fp32 = {whole:.3f} for both):")
        print(table(["pair", "sum", "over all-int8 + fp32"],
                    [[" + ".join(pair), f"{ratio[pair[0]] + ratio[pair[1]]:.3f}",
                      f"{ratio[pair[0]] + ratio[pair[1]] - whole:+.3f}"] for pair in pairs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
