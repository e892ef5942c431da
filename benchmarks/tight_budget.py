"""A tight drop on a task metric, on this CPU and under an AVX2 cap: are the trials spent where they can win?

    HF_HUB_OFFLINE=1 python benchmarks/tight_budget.py [--max-drop 0.002] [--trials 14] [--kinds native,avx2]

For each CPU kind, one `autoprec search` of studies/minilm_retrieval (top-10 neighbour agreement with
the fp32 model, a discrete metric) at a tight `--max-drop`, in the `cpu` space, in a fresh store. The
AVX2 kind caps oneDNN and ATen at AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`): bf16 and
fp16 then have no fast kernels and the format probe prunes them, so only int8 layers can win, and few
hold a tight drop. The table gives, per kind: trials measured (uniform and not), how many of the
non-uniform ones were feasible, the sampler proposals skipped unmeasured, the best feasible latency
ratio, and the verdict line when the search stopped before its --trials. The check: at least half the
non-uniform trials feasible, or the search stopped with its verdict.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoprec.store import schema  # noqa: E402

KINDS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def cpu_name() -> str:
    """The CPU's model name and the ISA flags that decide its bf16 and int8 kernels."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return f"{name} ({' '.join(shown) or 'no flags read'})"


def run(kind: str, args: argparse.Namespace, folder: Path) -> dict:
    store = folder / f"{kind}.db"
    env = {**os.environ, **KINDS[kind], "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "autoprec", "search", str(ROOT / "studies/minilm_retrieval/model.py"),
                           "--max-drop", str(args.max_drop), "--trials", str(args.trials), "--space", "cpu",
                           "--threads", "1", "--storage", f"sqlite:///{store}", "--no-progress"],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"kind": kind, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    study = optuna.load_study(study_name="minilm_retrieval", storage=f"sqlite:///{store}")
    measured = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    uniform = [t for t in measured if schema.Origin.parse(t.user_attrs.get("origin")).kind == schema.UNIFORM]
    others = [t for t in measured if t not in uniform]
    feasible = [t for t in others if t.user_attrs.get("score_drop", float("inf")) <= args.max_drop]
    ratios = [t.user_attrs["measurement"]["latency_ratio"] for t in measured if t.user_attrs.get("score_drop", float("inf")) <= args.max_drop]
    verdict = schema.verdict_of(study)
    return {"kind": kind, "seconds": seconds, "measured": len(measured), "uniform": len(uniform),
            "others": len(others), "feasible": len(feasible), "skipped": sum(schema.skipped_counts(study).values()),
            "best": min(ratios) if ratios else float("nan"), "verdict": verdict["line"] if verdict else "",
            "met": (len(others) > 0 and 2 * len(feasible) >= len(others)) or bool(verdict)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-drop", type=float, default=0.002)
    parser.add_argument("--trials", type=int, default=14)
    parser.add_argument("--kinds", default="native,avx2", help="comma list of: " + ", ".join(KINDS))
    args = parser.parse_args()
    print(f"{cpu_name()}, {os.cpu_count()} cores; studies/minilm_retrieval, max drop {args.max_drop}, "
          f"--trials {args.trials}, --space cpu, one thread")
    with tempfile.TemporaryDirectory() as folder:
        rows = [run(kind, args, Path(folder)) for kind in args.kinds.split(",")]
    print("| CPU kind | measured (uniform) | non-uniform feasible | skipped | best feasible vs fp32 | wall s | met | verdict |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['kind']} | failed: {r['error']} | | | | | | |")
            continue
        print(f"| {r['kind']} | {r['measured']} ({r['uniform']}) | {r['feasible']} of {r['others']} | {r['skipped']} "
              f"| {r['best']:.3f}x | {r['seconds']:.0f} | {'yes' if r['met'] else 'no'} | {r['verdict']} |")


if __name__ == "__main__":
    main()
