"""Search quality: autoprec's guided search against its peers at the same wall-clock budget.

    HF_HUB_OFFLINE=1 python benchmarks/search_quality.py --budget 110

For each model (studies/minilm, and a GPT-2 shape from benchmarks/models/gpt2_small.py) and each of
two accuracy drops (tight: the all-bf16 policy fails it; loose: all-bf16 passes), every method gets
the same wall-clock budget for its trials, over the same `cpu` space (fp32 / bf16 / int8 per layer,
fp32 or bf16 elsewhere), with the same seed:

- autoprec (guided): profile + cost model + knapsack proposals, then TPE (`--strategy guided`)
- NSGA-II, TPE, random: Optuna's samplers alone (`--strategy nsga2|tpe|random`)
- INC-like greedy: Intel Neural Compressor's basic strategy re-done on autoprec's Evaluator: all-int8,
  then layers reverted to bf16 (then fp32) in the order of the score each one alone wins back,
  accumulating, stopping at the first policy that holds the drop
- best uniform: the fastest feasible of the measured uniform fp32 / bf16 / int8 policies

Each search is its own Optuna study in its own SQLite file (under --workdir), with `timeout` = the
budget and a trial count too large to matter. The fp32 reference each study measures when it is
created is setup, outside the budget (reported). The uniform policies are enqueued first in every
Optuna strategy (by design: the front is never worse than a uniform choice), and count in the budget.

Task-metric studies (`--models minilm_retrieval,digits`, scored through their own evaluate(): top-10
neighbour agreement, test accuracy) take their drops from --drops-minilm-retrieval / --drops-digits
(their all-bf16 drop may be 0 or a few steps), and at the tight drop add the task-metric verdict: at least
half the guided proposals feasible, and guided <= 0.90x TPE (run with --methods guided,tpe).

Latencies from different runs drift on a shared machine, so at the end, per (model, drop), each
method's best feasible policy and the best uniform policy are re-timed side by side in one process
with one Evaluator, each paired with the fp32 model in interleaved rounds (Evaluator.retime), over
--passes passes in alternating order; the table's latency columns are those re-timed ratios (mean
over passes). Hypervolume is computed on what each method measured during its own run (its feasible
trials), in (drop / max_drop, latency / fp32, memory / fp32), all minimised, reference point
(1, 1.2, 1.2), divided by the reference box's volume 1.44: 1.0 would be a free, lossless, zero-size
model; the fp32 point alone gives 0.2 x 0.2 / 1.44 = 0.028. The all-fp32 policy is the reference
itself, so it is placed at latency ratio 1 exactly (its in-run paired ratio is timing noise around 1,
which otherwise moves the hypervolume of fronts that are identical).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_header, quiet, table  # noqa: E402

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402

MODELS = {
    "minilm": REPO / "studies" / "minilm" / "model.py",
    "gpt2": REPO / "benchmarks" / "models" / "gpt2_small.py",
    # scored by task metrics through evaluate(): top-10 neighbour agreement, test accuracy
    "minilm_retrieval": REPO / "studies" / "minilm_retrieval" / "model.py",
    "digits": REPO / "studies" / "digits_cnn" / "model.py",
    "digits_deep": REPO / "benchmarks" / "models" / "digits_deep.py",
}
TASK_MODELS = ("minilm_retrieval", "digits", "digits_deep")
METHODS = ("guided", "nsga2", "tpe", "random", "greedy")
LABELS = {"guided": "autoprec (guided)", "nsga2": "NSGA-II", "tpe": "TPE", "random": "random",
          "greedy": "INC-like greedy", "uniform": "best uniform"}
PEERS = ("nsga2", "tpe", "random", "greedy")
SPACE = "cpu"
REF_POINT = (1.0, 1.2, 1.2)  # (drop / max_drop, latency ratio, memory ratio)


@dataclass
class Point:
    """One measured candidate: its policy and where it lies (relative to fp32)."""

    policy: Any  # autoprec.policy.Policy
    drop: float
    latency_ratio: float
    memory_ratio: float
    feasible: bool
    origin: str = ""


@dataclass
class MethodRun:
    method: str
    points: list[Point] = field(default_factory=list)
    trials: int = 0
    wall_s: float = 0.0
    setup_s: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    retimed: float | None = None
    retimed_spread: float | None = None

    def best(self) -> Point | None:
        feasible = [p for p in self.points if p.feasible]
        return min(feasible, key=lambda p: p.latency_ratio) if feasible else None


# --------------------------------------------------------------------------------------------- metrics

def hypervolume(points: list[Point], max_drop: float) -> float:
    """Normalised hypervolume of the feasible points (see the module docstring)."""
    from optuna._hypervolume import compute_hypervolume

    ref = np.array(REF_POINT)
    rows = [(max(p.drop, 0.0) / max_drop if max_drop > 0 else 0.0, p.latency_ratio, p.memory_ratio)
            for p in points if p.feasible]
    rows = [r for r in rows if all(v < b for v, b in zip(r, ref))]
    if not rows:
        return 0.0
    return float(compute_hypervolume(np.array(rows, dtype=float), ref)) / float(np.prod(ref))


# --------------------------------------------------------------------------------------------- methods

def study_points(study: optuna.Study, max_drop: float) -> list[Point]:
    from autoprec.results.frames import trials_frame
    from autoprec.store.schema import policy_from_params

    frame = trials_frame(study)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    points = []
    for row in frame.itertuples(index=False):
        if row.state != "COMPLETE":
            continue
        policy = policy_from_params(by_number[int(row.trial)].params)
        ratio = float(row.latency_ratio)
        if policy.default == "fp32" and all(f == "fp32" for f in policy.layers.values()):
            ratio = 1.0  # the fp32 model itself: its in-run ratio is timing noise around 1 (see the docstring)
        points.append(Point(policy, float(row.score_drop), ratio, float(row.memory_ratio),
                            bool(row.feasible) and float(row.score_drop) <= max_drop, str(row.origin)))
    return points


def guided_notes(study: optuna.Study, reference_score: float, max_drop: float) -> dict[str, Any]:
    """How the knapsack proposals fared: predicted vs measured drop and latency."""
    from autoprec.store import schema

    ref = study.user_attrs["autoprec"]["reference"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        origin = str(t.user_attrs.get("origin", "sampler"))
        if not origin.startswith(("knapsack", "sequential")) or t.state == optuna.trial.TrialState.WAITING:
            continue  # enqueued proposals the budget never reached are not counted as run
        predicted = t.user_attrs.get("predicted") or {}
        measured_drop = t.user_attrs.get("score_drop")
        rows.append({"trial": t.number, "origin": origin, "state": t.state.name,
                     "predicted_drop": predicted.get("drop"), "drop": measured_drop,
                     "predicted_ratio": (predicted.get("latency_ms") or math.nan) / ref["latency_ms"],
                     "ratio": (t.values[1] / ref["latency_ms"]) if t.values else None,
                     "feasible": measured_drop is not None and measured_drop <= max_drop})
    profile = study.user_attrs.get(schema.PROFILE_ATTR) or {}
    return {"proposals_enqueued": len(study.user_attrs.get(schema.PROPOSALS_ATTR) or []), "proposals": rows,
            "profile_seconds": profile.get("seconds"),
            "costmodel": study.user_attrs.get(schema.COSTMODEL_ATTR)}


def run_search(model: str, method: str, max_drop: float, budget: float, db: Path, seed: int) -> MethodRun:
    from autoprec.search.loop import Search, SearchConfig

    if db.exists():
        db.unlink()
    config = SearchConfig(model=str(model), trials=10000, timeout=budget, storage=f"sqlite:///{db}",
                          study=f"{db.stem}", space=SPACE, max_drop=max_drop, seed=seed, strategy=method,
                          retime_front=False, progress=False)
    started = time.perf_counter()
    search = Search.open(config)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    result = search.run(config.trials, config.timeout)
    wall = time.perf_counter() - started
    run = MethodRun(method, study_points(search.study, max_drop), result.trials_run, wall, setup,
                    dict(result.phase_seconds))
    if method == "guided":
        run.notes = guided_notes(search.study, search.reference_score, max_drop)
    del search
    gc.collect()
    return run


def greedy(evaluator, choices: dict[str, tuple[str, ...]], max_drop: float, budget: float) -> MethodRun:
    """Intel Neural Compressor's basic strategy, accuracy-driven fallback, on autoprec's Evaluator.

    all-int8 (fp32 elsewhere); if over the drop, rank layers by the score each one alone recovers
    when reverted to bf16; revert them in that order, accumulating, bf16 first, then fp32 in the same
    order; stop at the first policy within the drop, or when the budget is spent.
    """
    from autoprec.policy import Policy
    from autoprec.precision import module_storage_bytes

    ref_mem = module_storage_bytes(evaluator.model)
    run = MethodRun("greedy")
    # fp32 is where the fallback ends; it is known without a measurement (drop 0, ratio 1, memory 1).
    run.points.append(Point(Policy(layers={}, default="fp32"), 0.0, 1.0, 1.0, True, "fp32 reference"))
    started = time.perf_counter()
    cache: dict[tuple, Point] = {}

    def measure(layers: dict[str, str], origin: str) -> Point | None:
        key = tuple(sorted(layers.items()))
        if key in cache:
            return cache[key]
        if time.perf_counter() - started >= budget:
            return None
        policy = Policy(layers=dict(layers), default="fp32")
        m = evaluator.measure(policy)
        run.trials += 1
        if not m.feasible:
            point = Point(policy, math.inf, math.inf, math.inf, False, origin + " (failed)")
        else:
            drop = evaluator.reference_score - m.score
            point = Point(policy, drop, m.latency_ratio, m.memory_bytes / ref_mem, drop <= max_drop, origin)
        run.points.append(point)
        cache[key] = point
        return point

    def lowest(options: tuple[str, ...]) -> str:
        return next(f for f in ("int8", "bf16", "fp32") if f in options)

    start = {n: lowest(o) for n, o in choices.items()}
    base = measure(start, "all int8")
    run.notes["stopped"] = "budget"
    if base is not None and base.feasible:
        run.notes["stopped"] = "all-int8 holds the drop"
    elif base is not None:
        gains = []
        for name, options in choices.items():
            if start[name] != "int8" or "bf16" not in options:
                continue
            point = measure({**start, name: "bf16"}, f"rank {name}")
            if point is None:
                break
            gains.append((base.drop - point.drop, name))
        else:
            order = [n for _, n in sorted(gains, key=lambda g: -g[0])]
            current = dict(start)
            done = False
            for fmt in ("bf16", "fp32"):
                for step, name in enumerate(order):
                    if fmt not in choices[name] or current[name] == fmt:
                        continue
                    current[name] = fmt
                    point = measure(current, f"revert {step + 1} to {fmt}")
                    if point is None:
                        done = True
                        break
                    if point.feasible:
                        run.notes["stopped"] = f"holds the drop after {step + 1} reverted to {fmt}"
                        done = True
                        break
                if done:
                    break
    run.wall_s = time.perf_counter() - started
    return run


# --------------------------------------------------------------------------------------------- driver

def retime(evaluator, runs: dict[str, MethodRun], passes: int) -> None:
    """Re-time every method's best feasible policy side by side, each paired with fp32."""
    items = [(m, r.best()) for m, r in runs.items() if r.best() is not None]
    ratios: dict[str, list[float]] = {m: [] for m, _ in items}
    spreads: dict[str, list[float]] = {m: [] for m, _ in items}
    memo: dict[tuple, tuple[float, float]] = {}
    for p in range(passes):
        order = items if p % 2 == 0 else list(reversed(items))
        memo.clear()
        for method, point in order:
            key = (point.policy.default, tuple(sorted(point.policy.layers.items())))
            if key not in memo:  # the same policy found by two methods is timed once per pass
                if point.policy.default == "fp32" and all(f == "fp32" for f in point.policy.layers.values()):
                    memo[key] = (1.0, 1.0)  # the fp32 model itself: 1 by definition
                else:
                    timing = evaluator.retime(point.policy)
                    memo[key] = (timing.ratio, timing.ratio_spread) if timing else (math.nan, math.nan)
            ratios[method].append(memo[key][0])
            spreads[method].append(memo[key][1])
    for method, _ in items:
        runs[method].retimed = statistics.fmean(ratios[method])
        runs[method].retimed_spread = max(spreads[method])


def uniform_run(guided: MethodRun) -> MethodRun:
    run = MethodRun("uniform", [p for p in guided.points if p.origin.startswith("uniform")])
    run.trials = len(run.points)
    return run


def choose_drops(evaluator, choices, space, override: str | None) -> tuple[dict[str, float], dict[str, float]]:
    from autoprec.store.schema import policy_from_params, uniform_params as uniform_policy_params

    measured = {}
    for fmt in ("bf16", "int8"):
        params = uniform_policy_params(choices, space, fmt)
        m = evaluator.measure(policy_from_params(params))
        measured[fmt] = evaluator.reference_score - m.score if m.feasible else math.inf
    if override:
        tight, loose = (float(x) for x in override.split(","))
    else:
        tight, loose = 0.5 * measured["bf16"], 4.0 * measured["bf16"]
    return {"tight": float(f"{tight:.2g}"), "loose": float(f"{loose:.2g}")}, measured


def _granularity_text(reference: float, uniform_drops: dict[str, float]) -> str:
    from autoprec.guided.drop_model import score_granularity

    g = score_granularity(reference, [reference - d for d in uniform_drops.values() if math.isfinite(d)])
    return ("no step seen in the fp32, all-bf16 and all-int8 scores" if g.denominator is None
            else f"scores in steps of 1/{g.denominator}, as seen in the fp32, all-bf16 and all-int8 scores")


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"


def task_verdicts(runs: dict[str, MethodRun]) -> list[str]:
    """The bar for a task-metric study at a tight drop: half the guided proposals hold the drop,
    and the guided search's best feasible latency is at most 0.90x TPE's at the same budget."""
    out = []
    proposals = runs["guided"].notes.get("proposals", [])
    held = sum(1 for p in proposals if p["feasible"])
    out.append(f"{'met' if proposals and 2 * held >= len(proposals) else 'MISSED'}: at least half the guided "
               f"proposals feasible ({held} of {len(proposals)})")
    g, t = runs["guided"].retimed, runs["tpe"].retimed if "tpe" in runs else None
    if g is None:
        out.append("MISSED: <= 0.90x TPE (guided found no feasible policy)")
    elif t is None:
        out.append("met: <= 0.90x TPE (TPE found no feasible policy)")
    else:
        out.append(f"{'met' if g <= 0.9 * t else 'MISSED'}: <= 0.90x TPE ({g:.3f} vs {t:.3f}; {g / t:.3f}x)")
    return out


def verdicts(runs: dict[str, MethodRun], kind: str) -> list[str]:
    out = []
    g, u = runs["guided"], runs["uniform"]
    if g.retimed is None:
        return ["autoprec found no feasible policy: every target missed"]
    if kind == "tight" and u.retimed:
        target = 0.75 * u.retimed
        out.append(f"{'met' if g.retimed <= target else 'MISSED'}: <= 0.75x best uniform "
                   f"({g.retimed:.3f} vs {target:.3f}; {g.retimed / u.retimed:.3f}x)")
        for m in PEERS:
            peer = runs[m].retimed
            if peer is None:
                out.append(f"met: <= 0.90x {LABELS[m]} (peer found no feasible policy)")
                continue
            out.append(f"{'met' if g.retimed <= 0.9 * peer else 'MISSED'}: <= 0.90x {LABELS[m]} "
                       f"({g.retimed / peer:.3f}x)")
    if u.retimed:
        out.append(f"{'met' if g.retimed <= 1.02 * u.retimed else 'MISSED'}: <= 1.02x best uniform "
                   f"({g.retimed / u.retimed:.3f}x)")
    hv = {m: r.notes.get("hv", 0.0) for m, r in runs.items()}
    best_other = max(v for m, v in hv.items() if m != "guided")
    out.append(f"{'met' if hv['guided'] >= best_other else 'MISSED'}: highest hypervolume "
               f"({hv['guided']:.4f} vs best other {best_other:.4f})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=110.0, help="seconds per method and drop")
    parser.add_argument("--models", default="minilm,gpt2", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--drops", default="tight,loose", help="which drops to run: tight, loose or both")
    parser.add_argument("--drops-minilm", help="override 'tight,loose' max drops for minilm")
    parser.add_argument("--drops-gpt2", help="override 'tight,loose' max drops for gpt2")
    parser.add_argument("--drops-minilm-retrieval", help="override 'tight,loose' max drops for minilm_retrieval")
    parser.add_argument("--drops-digits", help="override 'tight,loose' max drops for digits")
    parser.add_argument("--drops-digits-deep", help="override 'tight,loose' max drops for digits_deep")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--workdir", default="/tmp/autoprec-search-quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", type=int, default=2, help="side-by-side re-timing passes")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    quiet()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    from autoprec.measure.evaluator import Evaluator
    from autoprec.search.space import load_space
    from autoprec.model.model_file import load_spec

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    kinds = [k for k in args.drops.split(",") if k]
    from autoprec.measure.machine import default_threads

    torch.set_num_threads(default_threads())  # what every Evaluator here uses (AUTOPREC_THREADS, else all usable cores but one)
    print("# Search quality\n")
    print(machine_header({"budget per method and drop (s)": args.budget, "seed": args.seed, "space": SPACE,
                          "AUTOPREC_THREADS": os.environ.get("AUTOPREC_THREADS", "unset"),
                          "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}))
    everything: dict[str, Any] = {}
    for model_name in [m for m in args.models.split(",") if m]:
        path = MODELS[model_name]
        started = time.perf_counter()
        spec = load_spec(path)
        evaluator = Evaluator(spec, "cpu")
        space = load_space(SPACE)
        choices = space.choices(evaluator.model, torch.device("cpu"))
        drops, uniform_drops = choose_drops(evaluator, choices, space, getattr(args, f"drops_{model_name}"))
        if model_name in TASK_MODELS:
            print(f"\n(task metric through evaluate(): {_granularity_text(evaluator.reference_score, uniform_drops)})")
        print(f"\n## {model_name} ({path.relative_to(REPO)}), {len(choices)} searchable layers\n")
        print(f"- fp32 reference: latency {evaluator.reference_latency_ms:.1f} ms, score "
              f"{evaluator.reference_score:.6f}; setup with the drop probe {time.perf_counter() - started:.1f} s")
        print(f"- measured drops: all-bf16 {uniform_drops['bf16']:.3g}, all-int8 {uniform_drops['int8']:.3g}")
        def holding(max_drop: float) -> str:
            return "uniform policies holding it: " + ", ".join(
                ["fp32"] + [f"all-{f}" for f, d in uniform_drops.items() if d <= max_drop])

        print(f"- drops: tight {drops['tight']:g} ({holding(drops['tight'])}), loose {drops['loose']:g} "
              f"({holding(drops['loose'])})"
              + ("" if getattr(args, f"drops_{model_name}") else "; chosen as 0.5x and 4x the all-bf16 drop"))
        sys.stdout.flush()
        model_result: dict[str, Any] = {"drops": drops, "uniform_drops": uniform_drops, "by_drop": {}}
        for kind in kinds:
            max_drop = drops[kind]
            runs: dict[str, MethodRun] = {}
            for method in methods:
                t0 = time.strftime("%H:%M:%S")
                if method == "greedy":
                    runs[method] = greedy(evaluator, choices, max_drop, args.budget)
                else:
                    db = workdir / f"{model_name}_{kind}_{method}.db"
                    runs[method] = run_search(str(path), method, max_drop, args.budget, db, args.seed)
                r = runs[method]
                best = r.best()
                print(f"  [{t0}] {kind} {max_drop:g} {method}: {r.trials} trials, {r.wall_s:.0f} s "
                      f"(setup {r.setup_s:.0f} s), best feasible in-run ratio "
                      f"{fmt_ratio(best.latency_ratio if best else None)}", flush=True)
            if "guided" in runs:
                runs["uniform"] = uniform_run(runs["guided"])
            for r in runs.values():
                r.notes["hv"] = hypervolume(r.points, max_drop)
            retime(evaluator, runs, args.passes)
            rows = []
            for method, r in runs.items():
                best = r.best()
                rows.append([LABELS[method], fmt_ratio(r.retimed), fmt_ratio(best.latency_ratio if best else None),
                             f"{best.drop:.2e}" if best else "-", fmt_ratio(best.memory_ratio if best else None),
                             f"{r.notes['hv']:.4f}", r.trials,
                             f"{r.wall_s:.0f}" if method != "uniform" else "-",
                             f"{r.setup_s:.0f}" if method not in ("uniform", "greedy") else "-"])
            print(f"\n### {model_name}, {kind} drop {max_drop:g}\n")
            print(table(["method", "best feasible latency / fp32 (re-timed)", "in-run ratio", "its drop",
                         "its memory / fp32", "hypervolume", "trials", "wall s", "setup s"], rows))
            if "guided" in runs:
                g = runs["guided"]
                print("\nguided phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in g.phase_seconds.items())
                      + f"; profile {g.notes.get('profile_seconds')}; proposals enqueued "
                        f"{g.notes.get('proposals_enqueued')}, run {len(g.notes.get('proposals', []))}, feasible "
                        f"{sum(1 for p in g.notes.get('proposals', []) if p['feasible'])}")
                for p in g.notes.get("proposals", []):
                    print(f"  proposal #{p['trial']} ({p['origin']}): predicted drop {p['predicted_drop']:.3g} "
                          f"ratio {p['predicted_ratio']:.3f}; measured drop "
                          f"{p['drop'] if p['drop'] is None else format(p['drop'], '.3g')} ratio "
                          f"{fmt_ratio(p['ratio'])}")
                print(f"  cost model: {json.dumps(g.notes.get('costmodel'), default=str)}")
            if "greedy" in runs:
                print(f"greedy: {runs['greedy'].notes.get('stopped')}")
            if all(m in runs for m in ("guided", "uniform")) and all(m in runs for m in PEERS):
                print("\nverdict:")
                for line in verdicts(runs, kind):
                    print(f"- {line}")
            if model_name in TASK_MODELS and kind == "tight" and all(m in runs for m in ("guided", "tpe")):
                print("\ntask-metric verdict:")
                for line in task_verdicts(runs):
                    print(f"- {line}")
            sys.stdout.flush()
            model_result["by_drop"][kind] = {
                "max_drop": max_drop,
                "methods": {m: {"retimed": r.retimed, "retimed_spread": r.retimed_spread,
                                "in_run": r.best().latency_ratio if r.best() else None, "hv": r.notes["hv"],
                                "trials": r.trials, "wall_s": r.wall_s, "setup_s": r.setup_s,
                                "phase_seconds": r.phase_seconds,
                                "best_policy": r.best().policy.to_json() if r.best() else None,
                                "notes": {k: v for k, v in r.notes.items() if k != "hv"},
                                "points": [[p.drop, p.latency_ratio, p.memory_ratio, p.feasible, p.origin]
                                           for p in r.points]}
                            for m, r in runs.items()}}
        everything[model_name] = model_result
        del evaluator
        gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
