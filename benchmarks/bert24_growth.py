"""How the guided search's phases grow with depth: a BERT from BertConfig with 6 and with 24 layers.

    HF_HUB_OFFLINE=1 python benchmarks/bert24_growth.py --trials 16

Each model (benchmarks/models/bert6.py, bert24.py: hidden 256, 4 heads, intermediate 1024, seq 64,
batch 8, seeded random init, no download) runs through one guided search (space `cpu`) of a fixed
number of trials in a fresh SQLite study, and the table gives the seconds of each phase
(SearchResult.phase_seconds: uniform trials, profile + cost model + proposals, knapsack trials,
sampler trials, final re-timing of the front), the trials of each phase, the profile's own split
(drop forwards / per-layer latency timings) and the cost model's error on the non-uniform trials.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_header, quiet, table  # noqa: E402

MODELS = {6: REPO / "benchmarks" / "models" / "bert6.py", 24: REPO / "benchmarks" / "models" / "bert24.py"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--max-drop", type=float, default=1e-3)
    parser.add_argument("--layers", default="6,24")
    parser.add_argument("--workdir", default="/tmp/autoprec-bert-growth")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quiet()
    import optuna

    from autoprec.search.loop import Search, SearchConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import torch

    from autoprec.measure.machine import default_threads

    torch.set_num_threads(default_threads())  # what the searches' Evaluators use
    print("# Guided search growth, BERT 6 -> 24 layers\n")
    print(machine_header({"trials per search": args.trials, "max drop": args.max_drop, "space": "cpu",
                          "AUTOPREC_THREADS": os.environ.get("AUTOPREC_THREADS", "unset"),
                          "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}))
    rows, errors = [], []
    for layers in (int(x) for x in args.layers.split(",")):
        db = workdir / f"bert{layers}.db"
        if db.exists():
            db.unlink()
        config = SearchConfig(model=str(MODELS[layers]), trials=args.trials, storage=f"sqlite:///{db}",
                              study=f"bert{layers}", space="cpu", max_drop=args.max_drop, seed=args.seed,
                              strategy="guided", progress=False)
        started = time.perf_counter()
        search = Search.open(config)
        setup = time.perf_counter() - started
        started = time.perf_counter()
        result = search.run(config.trials, config.timeout)
        total = time.perf_counter() - started
        study = search.study
        counts: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            origin = str(t.user_attrs.get("origin", "sampler")).split()[0]
            counts[origin] = counts.get(origin, 0) + 1
        feasible = sum(1 for t in study.get_trials(deepcopy=False)
                       if t.state == optuna.trial.TrialState.COMPLETE and all(c <= 0 for c in t.constraints.values()))
        profile = study.user_attrs.get("autoprec_profile", {}).get("seconds", {})
        cost = study.user_attrs.get("autoprec_costmodel", {})
        ph = result.phase_seconds

        def cell(key: str) -> str:
            return f"{ph[key]:.1f}" + (f" ({counts[key]})" if key in counts else "") if key in ph else "-"

        rows.append([layers, len(search.choices), f"{setup:.1f}", cell("uniform"),
                     f"{ph.get('profile', 0):.1f} ({profile.get('drop', 0):.1f} / {profile.get('latency', 0):.1f})",
                     cell("sequential"), cell("sampler"), f"{ph.get('retime', 0):.1f}", f"{total:.1f}",
                     f"{result.trials_run} ({feasible} feasible)"])
        err = cost.get("error", {})
        errors.append([layers, err.get("trials", 0), _pct(err.get("latency_rel_median")),
                       _pct(err.get("latency_rel_max")), _pct(err.get("memory_rel_median")),
                       _sci(err.get("drop_abs_median"))])
        print(f"  bert{layers}: done in {total:.0f} s", flush=True)
        del search
    print()
    print(table(["layers", "searchable layers", "setup s (fp32 reference)", "uniform s (trials)",
                 "profile s (drop / latency)", "proposals s (trials)", "sampler s (trials)", "retime s",
                 "search total s", "trials"], rows))
    print("\ncost model error on the non-uniform trials\n")
    print(table(["layers", "trials", "latency rel. median", "latency rel. max", "memory rel. median",
                 "drop abs. median"], errors))
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


if __name__ == "__main__":
    sys.exit(main())
