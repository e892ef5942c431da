"""Reading a study back (pandas): trials as a table or a CSV/Parquet file, the feasible Pareto front,
the studies in a store, a trial's policy for export."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from autoprec.store import schema
from autoprec.errors import AutoprecError, StoreError, StoreFault
from autoprec.output import Output, check_output, write_output
from autoprec.policy import Policy, policy_from_json
from autoprec.precision import DTYPES
from autoprec.store.schema import StudyInfo, TrialRecord
from autoprec.display import threads_text

TRIAL_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
PICKS = {"fastest": ("latency_ms", True), "smallest": ("memory_bytes", True), "best-score": ("score", False)}


def trials_frame(study: optuna.Study, flatten_layers: bool = False) -> pd.DataFrame:
    """One row per trial: number, state, objectives, drop, feasibility, dtype counts, reason."""
    info = schema.read_info(study)
    ref = info.reference
    retimed = schema.retimed(study)
    left_out = schema.not_retimed(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        r = TrialRecord.of(t)
        measurement, counts = r.measurement, r.counts
        row: dict[str, Any] = {
            "trial": t.number, "state": t.state.name, "origin": r.origin.text,
            "score": t.values[0] if t.values else measurement.get("score"),
            "latency_ms": t.values[1] if t.values else measurement.get("latency_ms"),
            "memory_bytes": t.values[2] if t.values else measurement.get("memory_bytes"),
            "peak_bytes": measurement.get("peak_bytes"),
            "score_drop": r.score_drop,
            "feasible": t.state == optuna.trial.TrialState.COMPLETE and all(c <= 0 for c in t.constraints.values()),
            "default": r.default,
            **{d: counts.get(d, 0) for d in DTYPES},
            "reason": r.failure_reason or (f"skipped: {r.skipped}" if r.skipped else None),
            "compile_s": measurement.get("compile_s"),  # compiled runtime only
            "graph_breaks": measurement.get("graph_breaks"),
        }
        if row["latency_ms"] is not None:
            row["latency_ratio"] = row["latency_ms"] / ref.latency_ms
        entry = retimed.get(str(t.number))
        row["retimed_ratio"] = entry["ratio"] if schema.usable_retime(entry) else None
        row["retime_too_noisy"] = isinstance(entry, dict) and bool(entry.get("wider"))  # the search's ratio stands
        row["not_retimed"] = t.number in left_out  # on the front, past the re-time pass's budget
        if row["memory_bytes"] is not None:
            row["memory_ratio"] = row["memory_bytes"] / ref.memory_bytes
        training = measurement.get("training")
        if training:  # training mode: how the fine-tuning went, with what the sampler chose
            settings = r.policy.get("training") or {}
            row.update({"step_ms": training.get("step_ms"), "step_ratio": training.get("step_ratio"),
                        "skipped_steps": training.get("skipped_steps"),
                        "learning_rate": settings.get("learning_rate"), "loss_scale": settings.get("loss_scale"),
                        "dynamic_loss_scale": settings.get("dynamic_loss_scale")})
        if flatten_layers:
            for name in info.layers:
                row[schema.LAYER_PARAM + name] = r.layers.get(name)
        rows.append(row)
    return pd.DataFrame(rows)


def output_of(path: "str | Path | Output", flag: str = "-o") -> Output:
    """`path` checked as a file to write (autoprec.output's rules), refused with one line before anything is
    computed; the library overwrites an existing file (the CLI asks for --force first)."""
    return path if isinstance(path, Output) else check_output(path, force=True, flag=flag)


def trials_kind(out: Output) -> str:
    """csv or parquet, from the file's suffix (standard output: csv)."""
    if out.is_stdout:
        return "csv"
    kind = TRIAL_FORMATS.get(out.suffix)
    if kind is None:
        raise AutoprecError(f"{out.flag} {out.shown}: unknown file type {out.suffix or '(no suffix)'!r}; "
                            "name a .csv or .parquet file")
    return kind


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """`trials_frame(flatten_layers=True)` plus start time and duration of each trial."""
    frame = trials_frame(study, flatten_layers=True)
    if frame.empty:
        return frame
    times, spreads = {}, {}
    for t in study.get_trials(deepcopy=False):
        start, end = t.datetime_start, t.datetime_complete
        times[t.number] = (start.isoformat(timespec="seconds") if start else None,
                           (end - start).total_seconds() if start and end else None)
        spreads[t.number] = TrialRecord.of(t).measurement.get("latency_spread")
    frame.insert(2, "started", [times[n][0] for n in frame.trial])
    frame.insert(3, "duration_s", [times[n][1] for n in frame.trial])
    position = list(frame.columns).index("latency_ms") + 1
    frame.insert(position, "latency_spread", [spreads[n] for n in frame.trial])
    return frame


def write_trials(study: optuna.Study, path: "str | Path | Output") -> Path | None:
    """Every trial as a row, to CSV or Parquet chosen by the file's suffix; returns the file written
    (None: standard output)."""
    out = output_of(path)
    kind = trials_kind(out)
    if kind == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise AutoprecError(f"{out.flag} {out.shown}: writing Parquet needs pyarrow; pip install "
                                "'autoprec[report]' or write a .csv") from None
    frame = trials_table(study)
    if kind == "csv":
        write_output(out, frame.to_csv(index=False))
        return out.target
    # Columns that are None everywhere (no failure reasons yet) have no type; make them strings.
    for column in frame.columns:
        if frame[column].dtype == object and frame[column].isna().all():
            frame[column] = frame[column].astype("string")
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_output(out, buffer.getvalue())
    return out.target


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
    front = feasible.iloc[keep].sort_values(["latency_ms", "score", "trial"], ascending=[True, False, True])
    # a sampler's repeat of a measured policy carries its twin's values: one point, listed once (the first)
    return front.drop_duplicates(["score", "latency_ms", "memory_bytes"], keep="first")


def pick_trial(study: optuna.Study, pick: str | None, trial: int | None, max_drop: float | None) -> optuna.trial.FrozenTrial:
    if trial is not None:
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
        if not matches:
            raise AutoprecError(f"--trial {trial}: study {study.study_name!r} has no trial with that number; "
                                "see `autoprec front`")
        if matches[0].state != optuna.trial.TrialState.COMPLETE:
            why = TrialRecord.of(matches[0]).failure_reason
            state = f"failed ({why})" if why else matches[0].state.name.lower()
            raise AutoprecError(f"--trial {trial}: that trial {state}, so it has no measured policy to export; "
                                "pick a complete one from `autoprec front`")
        return matches[0]
    if pick not in PICKS:
        raise AutoprecError(f"--pick {pick!r}: use one of {', '.join(PICKS)}, or --trial N")
    front = pareto_front(trials_frame(study), max_drop)
    if front.empty:
        study_limit = schema.read_info(study).max_drop
        limit = f" within --max-drop {max_drop}" if max_drop is not None else ""
        raise AutoprecError(f"study {study.study_name!r} has no feasible trial{limit} (its own max drop, fixed when "
                            f"it was created: {study_limit:g}; --max-drop here can only tighten it); run more trials, "
                            "export a trial by number with --trial N, or start a new --study with a larger --max-drop")
    column, ascending = PICKS[pick]
    best = front.sort_values([column, "latency_ms"], ascending=[ascending, True]).iloc[0]
    return [t for t in study.get_trials(deepcopy=False) if t.number == int(best.trial)][0]


def policy_of(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> Policy:
    """The trial's policy with what was measured and the model's identity."""
    info = schema.read_info(study)
    r = TrialRecord.of(trial)
    policy = policy_from_json(trial.user_attrs[schema.TrialKey.POLICY], where=f"trial {trial.number}")
    env, ref = info.environment, info.reference
    retimed = schema.retimed(study).get(str(trial.number))
    noisy = isinstance(retimed, dict) and bool(retimed.get("wider"))
    policy.measured = {
        "score": trial.values[0], "latency_ms": trial.values[1], "memory_bytes": int(trial.values[2]),
        "peak_bytes": r.measurement.get("peak_bytes"), "score_drop": r.score_drop,
        "reference_score": ref.score, "reference_latency_ms": ref.latency_ms,
        "latency_ratio": trial.values[1] / ref.latency_ms,
        # the front re-timed side by side at the end of the search, unless that was noisier than the search
        "retimed_ratio": retimed["ratio"] if schema.usable_retime(retimed) else None,
        **({"retime_too_noisy": [retimed.get("lo"), retimed.get("hi")]} if noisy else {}),
        "device": env.get("device"), "device_name": env.get("device_name"), "threads": env.get("threads"),
        "cpu_allocator": env.get("cpu_allocator"), "torch": env.get("torch"),
        "runtime": info.runtime,  # how it was timed: serve a compiled policy under torch.compile
        "compile_s": r.measurement.get("compile_s"),
        "study": study.study_name, "trial": trial.number,
    }
    policy.model = {"class": info.model_class, "fingerprint": info.model_fingerprint}
    return policy


def _timed_on(info: StudyInfo) -> str:
    """'cpu, 1 thread' or 'cuda' (a study's thread count is fixed, so it belongs with the device)."""
    device = info.device_type or "-"
    threads = info.environment.get("threads")
    where = f"{device}, {threads_text(threads)}" if device == "cpu" and threads else device
    return where if info.runtime == "eager" else f"{where}, {info.runtime}"


def machine_of(info: StudyInfo) -> str:
    """The machine kind a study is timed on; for a study from before it was recorded, the CPU or GPU name."""
    if info.machine_kind:
        return schema.machine_text(info.machine_kind)
    return f"{info.environment.get('device_name') or '-'} (kind not recorded)"


def trial_machines(study: optuna.Study) -> dict[str, int]:
    """Machine kinds (in words) that trials were timed on, other than the study's own, with their counts."""
    own = schema.read_info(study).machine_kind
    others: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        kind = t.user_attrs.get(schema.TrialKey.MACHINE)
        if isinstance(kind, dict) and own and kind != own:
            text = schema.machine_texts(own, kind)[1]
            others[text] = others.get(text, 0) + 1
    return others


def studies_frame(storage: Any) -> pd.DataFrame:
    rows = []
    unreadable = 0
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if not schema.is_autoprec_study(study):
            continue
        try:  # one damaged study is skipped with a warning; the others are listed
            info = schema.read_info(study)
            frame = trials_frame(study)
        except StoreError as exc:
            print(f"autoprec: warning: {exc}; not listed", file=sys.stderr)
            unreadable += 1
            continue
        front = pareto_front(frame)
        complete = int((frame.state == "COMPLETE").sum()) if not frame.empty else 0
        best = front.latency_ms.min() if not front.empty else None
        rows.append({"study": summary.study_name, "trials": len(frame), "complete": complete,
                     "failed": int((frame.state == "FAIL").sum()) if not frame.empty else 0,
                     "front": len(front), "best_latency_ms": best,
                     "best_vs_fp32": best / info.reference.latency_ms if best else None,
                     "device": _timed_on(info), "machine": machine_of(info)})
    if unreadable and not rows:
        raise StoreFault(f"no study in the store can be read ({unreadable} damaged); restore the store from a copy")
    return pd.DataFrame(rows)
