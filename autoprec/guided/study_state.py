"""The guided part of a search: sensitivity profile in the store, cost model, knapsack proposals.

Kept on the study as user attributes (named in autoprec.store.schema) so resumed runs and other workers
reuse them: the Profile (see profile.py), where it was reused from, the proposals enqueued with
their predictions, and the cost model's calibration and its error on measured trials.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import optuna

from autoprec.store import schema
from autoprec.guided.cost_model import CostModel
from autoprec.guided.planner import Measured, Proposal, drop_model_report, next_proposal
from autoprec.guided.sensitivity import Profile
from autoprec.guided.verdict import Exclusion, exhausted, verdict
from autoprec.store.schema import COSTMODEL_ATTR, PROFILE_ATTR, Origin, StudyInfo


def stored_profile(study: optuna.Study) -> Profile | None:
    data = study.user_attrs.get(PROFILE_ATTR)
    return Profile.from_json(data) if isinstance(data, dict) else None


def sibling_profile(storage: optuna.storages.BaseStorage, study_name: str,
                    info: StudyInfo) -> tuple[Profile, str] | None:
    """A profile stored on another study of the same model, space and environment (the same search at
    another --max-drop, say): the drops, latencies and sizes it holds do not depend on the drop."""
    keys = ("model_fingerprint", "space_fingerprint", "device_type", "environment", "prune")
    mine = info.to_json()
    machine = (mine.get("probe") or {}).get("machine")  # the probe's machine: ISA restrictions included
    for other in storage.get_all_studies():
        their = other.user_attrs.get(schema.STUDY_ATTR)
        data = other.user_attrs.get(PROFILE_ATTR)
        if (other.study_name != study_name and isinstance(their, dict) and isinstance(data, dict)
                and all(their.get(k) == mine.get(k) for k in keys)
                and data.get("runtime", "eager") == mine.get("runtime", "eager")  # latencies are per runtime
                and (their.get("probe") or {}).get("machine") == machine):
            return Profile.from_json(data), other.study_name
    return None


def _measured(study: optuna.Study, reference_score: float) -> list[tuple[Origin, str, dict[str, str], dict[str, float]]]:
    """(origin, default, layers, {drop, latency_ms, memory_bytes}) of every complete trial."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        r = schema.TrialRecord.of(t)
        out.append((r.origin, r.policy.get("default", "fp32"), r.layers,
                    {"drop": reference_score - t.values[0], "latency_ms": t.values[1], "memory_bytes": t.values[2]}))
    return out


def calibrated_model(study: optuna.Study, profile: Profile, choices: dict[str, tuple[str, ...]],
                     reference_score: float) -> CostModel:
    model = CostModel(profile, choices)
    measured = _measured(study, reference_score)
    uniform = {origin.format: (default, layers, m) for origin, default, layers, m in measured
               if origin.kind == schema.UNIFORM}
    model.calibrate(uniform)
    return model


def _copy(model: CostModel) -> CostModel:
    """A copy whose rest_latency can be re-fitted without touching `model`'s."""
    return dataclasses.replace(model, rest_latency=dict(model.rest_latency))


def _refit_error(model: CostModel, measured: list[tuple[Origin, str, dict[str, str], dict[str, float]]]) -> dict[str, Any]:
    """Latency error of the model re-fitted on the trials as they come, each non-uniform trial
    predicted by a model fitted on all the other trials (leave one out: no trial grades itself)."""
    errors = []
    everything = [(d, layers, m) for _, d, layers, m in measured]
    for i, (origin, default, layers, m) in enumerate(measured):
        if origin.kind == schema.UNIFORM:
            continue
        refit = _copy(model)
        refit.refit_rest_latency(everything[:i] + everything[i + 1:])
        predicted = refit.predict(default, layers)
        if predicted is not None:
            errors.append(abs(predicted["latency_ms"] - m["latency_ms"]) / m["latency_ms"])
    if not errors:
        return {"trials": 0}
    return {"trials": len(errors), "latency_rel_median": statistics.median(errors), "latency_rel_max": max(errors)}


def record_model_error(study: optuna.Study, model: CostModel, reference_score: float) -> dict[str, Any]:
    """The model's error on the non-uniform trials, calibrated on the uniform ones (as the proposals
    were made) and re-fitted on the trials as they come (leave one out); the re-fitted rest terms."""
    measured = _measured(study, reference_score)
    others = [(d, layers, m) for origin, d, layers, m in measured if origin.kind != schema.UNIFORM]
    refit = _copy(model)
    refit.refit_rest_latency([(d, layers, m) for _, d, layers, m in measured])
    summary = {"error": model.error(others), "error_refit": _refit_error(model, measured),
               "rest_latency_ms": model.rest_latency, "rest_latency_ms_refit": refit.rest_latency,
               "latency_scale": model.latency_scale,
               "rest_memory_bytes": model.rest_memory, "rest_drop": model.rest_drop, "drop_scale": model.drop_scale}
    study.set_user_attr(COSTMODEL_ATTR, summary)
    return summary


# --------------------------------------------------------------------------- sequential proposals

SEQUENTIAL_ORIGIN = "sequential"  # the origin of every proposal the planner makes starts with this


def planner_trials(study: optuna.Study) -> list[Measured]:
    """Every trial as the planner sees it: measured ones with their score, failed ones (could not run)
    without, and waiting or running ones as pending (not proposed again)."""
    states = optuna.trial.TrialState
    out = []
    for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL, states.WAITING, states.RUNNING)):
        r = schema.TrialRecord.of(t)
        done = t.state == states.COMPLETE
        failed = t.state == states.FAIL and r.failure_reason is not None
        if t.state == states.FAIL and not failed:
            continue  # a dead worker's attempt: retried, not a verdict on the policy
        if r.policy:
            default, layers = r.default or "fp32", r.layers
        else:  # not measured yet: its params say what it will be
            policy = schema.policy_from_params(t.params or t.system_attrs.get("fixed_params") or {})
            default, layers = policy.default, policy.layers
        out.append(Measured(default=default, layers=layers, score=t.values[0] if done else None,
                            latency_ms=t.values[1] if done else None, memory_bytes=t.values[2] if done else None,
                            uniform=r.origin.format if r.origin.kind == schema.UNIFORM else None,
                            proposed=r.origin.kind == schema.PROPOSAL and r.origin.phase == SEQUENTIAL_ORIGIN,
                            pending=not (done or failed), number=t.number))
    return out


def next_sequential(study: optuna.Study, profile: Profile, choices: dict[str, tuple[str, ...]],
                    reference_score: float, max_drop: float, defaults: tuple[str, ...]) -> Proposal | None:
    """Plan the next proposal from every trial so far and enqueue it, with what it was planned at
    (predicted drop, fidelity, latency, memory; the fidelity budget and the drop aimed at); None when
    the planner has nothing left worth measuring."""
    proposal = next_proposal(profile, choices, planner_trials(study), reference_score, max_drop, defaults)
    if proposal is None:
        return None
    planned = {**proposal.predicted, "budget_fidelity": proposal.budget_fidelity, "target_drop": proposal.target_drop}
    schema.enqueue(study, schema.params_of(proposal.default, proposal.layers), Origin.proposal(proposal.why),
                   **{schema.TrialKey.PREDICTED: planned})
    return proposal


def record_drop_model(study: optuna.Study, profile: Profile, reference_score: float, max_drop: float,
                      defaults: tuple[str, ...]) -> dict[str, Any]:
    """The drop model's error on the trials (each predicted from the others) and the granularity it
    planned with, kept beside the cost model's error on the study."""
    report = drop_model_report(profile, [t for t in planner_trials(study) if not t.pending], reference_score,
                               defaults, max_drop)
    summary = dict(study.user_attrs.get(COSTMODEL_ATTR) or {})
    summary["drop_model"] = report
    study.set_user_attr(COSTMODEL_ATTR, summary)
    return report


def drop_model_of(study: optuna.Study, profile: Profile) -> dict[str, Any]:
    """The drop model's report on the study's trials as they are now (what `autoprec profile` prints)."""
    info = schema.read_info(study)
    trials = [t for t in planner_trials(study) if not t.pending]
    defaults = tuple(sorted({t.default for t in trials}, key=lambda d: d != "fp32"))
    return drop_model_report(profile, trials, info.reference.score, defaults, info.max_drop)


# --------------------------------------------------------------------------- where the search can still win


def exclusion(study: optuna.Study, profile: Profile, choices: dict[str, tuple[str, ...]], reference_score: float,
              max_drop: float, defaults: tuple[str, ...]) -> Exclusion:
    """What is not worth measuring, given every trial measured so far (autoprec.guided.verdict)."""
    return Exclusion(profile, choices, planner_trials(study), reference_score, max_drop, defaults)


def stop_verdict(study: optuna.Study, profile: Profile, choices: dict[str, tuple[str, ...]], reference_score: float,
                 max_drop: float, defaults: tuple[str, ...], resolution: float, runtime: str) -> dict[str, Any] | None:
    """The verdict that nothing unmeasured can beat the front, or None (autoprec.guided.verdict)."""
    return verdict(profile, choices, planner_trials(study), reference_score, max_drop, defaults, resolution, runtime)


def exhausted_verdict(study: optuna.Study, profile: Profile, reference_score: float, max_drop: float, skipped: int,
                      runtime: str) -> dict[str, Any]:
    """The verdict when the sampler's last `skipped` proposals were all skipped."""
    return exhausted(profile, planner_trials(study), reference_score, max_drop, skipped, runtime)
