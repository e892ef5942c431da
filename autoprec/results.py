"""Reading a study back: trials as a table, the feasible Pareto front, policy export (pandas)."""

from __future__ import annotations

from typing import Any

import optuna
import pandas as pd

from autoprec.errors import AutoprecError
from autoprec.policy import Policy, policy_from_json
from autoprec.precision import DTYPES
from autoprec.store import study_info
from autoprec.tables import threads_text

RETIMED_ATTR = "autoprec_retimed"  # written by Search.retime_front
PICKS = {"fastest": ("latency_ms", True), "smallest": ("memory_bytes", True), "best-score": ("score", False)}


def trials_frame(study: optuna.Study, flatten_layers: bool = False) -> pd.DataFrame:
    """One row per trial: number, state, objectives, drop, feasibility, dtype counts, reason."""
    info = study_info(study)
    ref = info["reference"]
    retimed = (study.user_attrs.get(RETIMED_ATTR) or {}).get("trials", {})
    rows = []
    for t in study.get_trials(deepcopy=False):
        measurement = t.user_attrs.get("measurement") or {}
        policy = t.user_attrs.get("policy") or {}
        counts = t.user_attrs.get("counts") or {}
        row: dict[str, Any] = {
            "trial": t.number, "state": t.state.name, "origin": t.user_attrs.get("origin", "sampler"),
            "score": t.values[0] if t.values else measurement.get("score"),
            "latency_ms": t.values[1] if t.values else measurement.get("latency_ms"),
            "memory_bytes": t.values[2] if t.values else measurement.get("memory_bytes"),
            "peak_bytes": measurement.get("peak_bytes"),
            "score_drop": t.user_attrs.get("score_drop"),
            "feasible": t.state == optuna.trial.TrialState.COMPLETE and all(c <= 0 for c in t.constraints.values()),
            "default": policy.get("default", counts.get("default")),
            **{d: counts.get(d, 0) for d in DTYPES},
            "reason": t.user_attrs.get("failure_reason"),
        }
        if row["latency_ms"] is not None:
            row["latency_ratio"] = row["latency_ms"] / ref["latency_ms"]
        row["retimed_ratio"] = retimed.get(str(t.number), {}).get("ratio")
        if row["memory_bytes"] is not None:
            row["memory_ratio"] = row["memory_bytes"] / ref["memory_bytes"]
        training = measurement.get("training")
        if training:  # training mode: how the fine-tuning went, with what the sampler chose
            settings = policy.get("training") or {}
            row.update({"step_ms": training.get("step_ms"), "step_ratio": training.get("step_ratio"),
                        "skipped_steps": training.get("skipped_steps"),
                        "learning_rate": settings.get("learning_rate"), "loss_scale": settings.get("loss_scale"),
                        "dynamic_loss_scale": settings.get("dynamic_loss_scale")})
        if flatten_layers:
            for name in info.get("layers", []):
                row[f"layer:{name}"] = (policy.get("layers") or {}).get(name)
        rows.append(row)
    return pd.DataFrame(rows)


def _dominates(a: pd.Series, b: pd.Series) -> bool:
    no_worse = a.score >= b.score and a.latency_ms <= b.latency_ms and a.memory_bytes <= b.memory_bytes
    better = a.score > b.score or a.latency_ms < b.latency_ms or a.memory_bytes < b.memory_bytes
    return no_worse and better


def pareto_front(frame: pd.DataFrame, max_drop: float | None = None) -> pd.DataFrame:
    """Feasible, non-dominated trials (score up, latency and memory down), fastest first."""
    if frame.empty:
        return frame
    feasible = frame[frame.feasible]
    if max_drop is not None:
        feasible = feasible[feasible.score_drop <= max_drop]
    rows = list(feasible.itertuples(index=False))
    keep = [i for i, r in enumerate(rows) if not any(_dominates(o, r) for j, o in enumerate(rows) if j != i)]
    return feasible.iloc[keep].sort_values(["latency_ms", "score"], ascending=[True, False])


def pick_trial(study: optuna.Study, pick: str | None, trial: int | None, max_drop: float | None) -> optuna.trial.FrozenTrial:
    if trial is not None:
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
        if not matches or matches[0].state != optuna.trial.TrialState.COMPLETE:
            raise AutoprecError(f"--trial {trial}: no complete trial with that number in study {study.study_name!r}; "
                                "see `autoprec front`")
        return matches[0]
    if pick not in PICKS:
        raise AutoprecError(f"--pick {pick!r}: use one of {', '.join(PICKS)}, or --trial N")
    front = pareto_front(trials_frame(study), max_drop)
    if front.empty:
        limit = f" within --max-drop {max_drop}" if max_drop is not None else ""
        raise AutoprecError(f"study {study.study_name!r} has no feasible trial{limit}; run more trials or "
                            "loosen --max-drop")
    column, ascending = PICKS[pick]
    best = front.sort_values([column, "latency_ms"], ascending=[ascending, True]).iloc[0]
    return [t for t in study.get_trials(deepcopy=False) if t.number == int(best.trial)][0]


def policy_of(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> Policy:
    """The trial's policy with what was measured and the model's identity."""
    info = study_info(study)
    policy = policy_from_json(trial.user_attrs["policy"], where=f"trial {trial.number}")
    measurement = trial.user_attrs.get("measurement") or {}
    env = info.get("environment", {})
    retimed = (study.user_attrs.get(RETIMED_ATTR) or {}).get("trials", {}).get(str(trial.number), {})
    policy.measured = {
        "score": trial.values[0], "latency_ms": trial.values[1], "memory_bytes": int(trial.values[2]),
        "peak_bytes": measurement.get("peak_bytes"), "score_drop": trial.user_attrs.get("score_drop"),
        "reference_score": info["reference"]["score"], "reference_latency_ms": info["reference"]["latency_ms"],
        "latency_ratio": trial.values[1] / info["reference"]["latency_ms"],
        "retimed_ratio": retimed.get("ratio"),  # the front re-timed side by side at the end of the search
        "device": env.get("device"), "device_name": env.get("device_name"), "threads": env.get("threads"),
        "cpu_allocator": env.get("cpu_allocator"), "torch": env.get("torch"),
        "study": study.study_name, "trial": trial.number,
    }
    policy.model = {"class": info["model_class"], "fingerprint": info["model_fingerprint"]}
    return policy


def _timed_on(info: dict[str, Any]) -> str:
    """'cpu, 1 thread' or 'cuda' (a study's thread count is fixed, so it belongs with the device)."""
    device = info.get("device_type") or "-"
    threads = info.get("environment", {}).get("threads")
    return f"{device}, {threads_text(threads)}" if device == "cpu" and threads else device


def studies_frame(storage: Any) -> pd.DataFrame:
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if "autoprec" not in study.user_attrs:
            continue
        frame = trials_frame(study)
        front = pareto_front(frame)
        complete = int((frame.state == "COMPLETE").sum()) if not frame.empty else 0
        best = front.latency_ms.min() if not front.empty else None
        ref = study.user_attrs["autoprec"]["reference"]["latency_ms"]
        rows.append({"study": summary.study_name, "trials": len(frame), "complete": complete,
                     "failed": int((frame.state == "FAIL").sum()) if not frame.empty else 0,
                     "front": len(front), "best_latency_ms": best,
                     "best_vs_fp32": best / ref if best else None,
                     "device": _timed_on(study.user_attrs["autoprec"])})
    return pd.DataFrame(rows)
