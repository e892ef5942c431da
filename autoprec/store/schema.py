"""The study's record: what autoprec keeps in an Optuna study, and the one module that reads and
writes it. Every other module goes through the names and types here.

Contract
--------
A study in the store (any Optuna RDB storage) is an autoprec study when its user attribute
``autoprec`` (`STUDY_ATTR`) holds a `StudyInfo` document. It is written last when the study is
created, after the fp32 reference was measured, so its presence means "ready": a worker that
finds the study without it waits for the creator.

Study user attributes (JSON, so optuna-dashboard shows them):

- ``autoprec`` (`StudyInfo`): the model (path, class, fingerprint), the example inputs' shapes and
  dtypes, the space and its fingerprint, the device and environment, whether the CPU allocator kept
  freed memory, the runtime (eager or compiled, autoprec.measure.runtime), max_drop, the fp32 reference
  (score, latency, memory), the searchable layers, training mode, the creation time, the format
  probe of the machine it was created on (probe.FormatProbe JSON; the store's cache of probes, keyed
  by machine: `stored_probes`) and whether slow formats are pruned, and the machine kind it is timed
  on (``machine_kind``: the probe's machine key without the thread count; absent in studies from
  before it was recorded, which get it at their next resume).
  Fixed for the study's life: a resume that would measure differently is refused.
- ``autoprec_retimed``: the front re-timed beside fp32 at the end of the last search,
  ``{"at": TIME, "trials": {"NUMBER": {"latency_ms", "ratio", "spread", "lo", "hi", "rounds"}},
  "not_retimed": [NUMBER, ...], "budget_s": SECONDS}`` (autoprec.search.retime: what did not fit the budget).
  A re-timing whose interval (hi / lo) is wider than the trial's own measurement's carries
  ``"wider": true`` and does not replace the search's ratio (`usable_retime`).
- ``autoprec_profile``, ``autoprec_profile_from``, ``autoprec_proposals``,
  ``autoprec_costmodel``: the guided search's sensitivity profile (profile.Profile), the study a
  reused profile came from, the proposals enqueued (one at a time, as planned) and the cost model's
  error, with the drop model's under "drop_model" (autoprec.guided.study_state).
- ``autoprec_verdict``: why the last search stopped before its --trials, when it did
  (autoprec.guided.verdict): ``{"kind", "line", "max_drop", "miss_trial", "miss_drop", "fastest_trial"}``,
  "line" the one line `autoprec front` and the report print; None once a later run went on measuring.
- ``autoprec_skipped``: how many sampler proposals were not measured, by why
  (``{"as damaging as a measured miss": N, ...}``): each is a PRUNED trial with its ``skipped`` reason.

Trial params: ``default`` (`DEFAULT_PARAM`) and one ``layer:NAME`` (`LAYER_PARAM`) per searchable
layer, each a format name; in training mode also ``learning_rate``, ``loss_scale`` and
``dynamic_loss_scale``. `policy_from_params` and `uniform_params` are the codec.

Trial user attributes (`TrialRecord` reads them all; `TrialKey` names them):

- ``origin``: why the trial exists, an `Origin` written as one string ("uniform bf16",
  "knapsack fastest, drop <= 0.5 x max_drop", absent for the sampler's).
- ``run_id``, ``worker``: the invocation (autoprec.store.worker_tables) and process that ran it.
- ``machine``: the machine kind the trial was timed on (as the study's ``machine_kind``).
- ``owner``: the process running it, ``{"host", "pid", "pid_namespace", "started"}`` (its start
  time in clock ticks after boot): a RUNNING trial whose owner is gone on this host is failed and
  retried at once (autoprec.store.recovery), without waiting for the heartbeat grace.
- ``policy`` (policy.Policy JSON), ``counts`` (layers per format and the default),
  ``measurement`` (evaluate.Measurement JSON), ``score_drop`` (fp32 score minus the trial's):
  a measured candidate; its constraint ``score_drop - max_drop`` is Optuna's.
- ``failure_reason``: a FAIL trial's one-line reason; `INTERRUPTED` for a trial stopped by Ctrl-C
  (retried by the next run), `STALE` for one whose worker stopped beating and `OWNER_GONE` for one
  whose process ended on this host (both retried at once), `STORE_FAILED` for one the store failed
  under (retried by the next run). The
  traceback of an unexpected failure is in its measurement's ``traceback``.
- ``duplicate_of``: the trial whose measurement a re-proposed policy copied.
- ``skipped``: a sampler proposal that was not measured (a PRUNED trial), why in one line, and
  ``skipped_kind`` (autoprec.guided.verdict.SKIP_KINDS); its constraint is the drop it is believed to
  lose less max_drop, so the sampler learns from it as from an infeasible trial.
- ``predicted``: what a proposal was planned at: the cost model's latency and memory, and for the
  sequential planner's (origin "sequential ...") the drop model's score drop, the policy's fidelity
  drop, the fidelity budget and the score drop it aimed at (autoprec.guided.planner.Proposal).

Adding a field: a study-level one goes into `StudyInfo` with a default (the value old studies
read as), a trial-level one into `TrialKey` and `TrialRecord` with a default. Unknown study
keys written by a newer autoprec are kept in `StudyInfo.extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from autoprec.errors import StoreError, StoreFault
from autoprec.policy import Policy, TrainingSettings

if TYPE_CHECKING:
    import optuna

    from autoprec.search.space import SearchSpace

STUDY_ATTR = "autoprec"
RETIMED_ATTR = "autoprec_retimed"
PROFILE_ATTR = "autoprec_profile"
PROFILE_SOURCE_ATTR = "autoprec_profile_from"
PROPOSALS_ATTR = "autoprec_proposals"
COSTMODEL_ATTR = "autoprec_costmodel"
VERDICT_ATTR = "autoprec_verdict"
SKIPPED_ATTR = "autoprec_skipped"

LAYER_PARAM = "layer:"
DEFAULT_PARAM = "default"
TRAINING_PARAMS = ("learning_rate", "loss_scale", "dynamic_loss_scale")


INTERRUPTED = "interrupted"
STALE = "its worker stopped (no heartbeat); retried"
OWNER_GONE = "its process ended (killed or crashed); retried"
STORE_FAILED = "the study store failed during the trial"


class TrialKey:
    ORIGIN = "origin"
    RUN_ID = "run_id"
    WORKER = "worker"
    POLICY = "policy"
    COUNTS = "counts"
    MEASUREMENT = "measurement"
    SCORE_DROP = "score_drop"
    FAILURE_REASON = "failure_reason"
    DUPLICATE_OF = "duplicate_of"
    PREDICTED = "predicted"
    SKIPPED = "skipped"
    SKIPPED_KIND = "skipped_kind"
    MACHINE = "machine"
    OWNER = "owner"


# --------------------------------------------------------------------------------------------
# origin


UNIFORM, PROPOSAL, SAMPLER = "uniform", "proposal", "sampler"


@dataclass(frozen=True)
class Origin:
    """Why a trial exists: a uniform policy (`format` set), a cost-model proposal, or the sampler.

    Stored as one string; `text` is what tables print."""

    kind: str = SAMPLER
    format: str | None = None
    description: str = ""

    @classmethod
    def uniform(cls, fmt: str) -> "Origin":
        return cls(UNIFORM, fmt, f"uniform {fmt}")

    @classmethod
    def proposal(cls, why: str) -> "Origin":
        return cls(PROPOSAL, None, why)

    @classmethod
    def parse(cls, value: Any) -> "Origin":
        text = str(value).strip() if value else ""
        if not text or text == SAMPLER:
            return cls()
        if text.startswith(UNIFORM + " "):
            return cls.uniform(text.split(None, 1)[1])
        return cls.proposal(text)

    @property
    def text(self) -> str:
        return self.description or self.kind

    @property
    def phase(self) -> str:
        """The search phase this trial's time counts to ('uniform', 'sequential', 'knapsack', 'sampler')."""
        return self.text.split()[0] if self.kind == PROPOSAL else self.kind


# --------------------------------------------------------------------------------------------
# study


@dataclass
class Reference:
    score: float
    latency_ms: float
    memory_bytes: int


@dataclass
class StudyInfo:
    model_path: str
    model_class: str
    model_fingerprint: str
    space: dict[str, Any]
    space_fingerprint: str
    device_type: str
    environment: dict[str, str]
    max_drop: float
    reference: Reference
    layers: list[str] = field(default_factory=list)
    training: bool = False
    cpu_freed_memory_kept: bool | None = None  # None: a study from before this was recorded
    runtime: str = "eager"  # autoprec.measure.runtime: how candidates are run and timed (studies before it: eager)
    inputs: str | None = None  # example_inputs() shapes and dtypes; None: a study from before 2026-11-30
    created: str = ""
    probe: dict[str, Any] | None = None  # probe.FormatProbe JSON, measured (or found cached) at creation
    prune: bool = False  # slow formats left out of per-layer search (studies from before: never)
    machine_kind: dict[str, str] | None = None  # what it is timed on (None: recorded at the next resume)
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def threads(self) -> int | None:
        value = self.environment.get("threads")
        return int(value) if value else None

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data["reference"] = dataclasses.asdict(self.reference)
        return {**self.extra, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "study") -> "StudyInfo":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            known = {k: v for k, v in data.items() if k in names}
            known["reference"] = Reference(**data["reference"])
            return cls(**known, extra={k: v for k, v in data.items() if k not in names})
        except (KeyError, TypeError) as exc:
            raise StoreError(f"{where}: its {STUDY_ATTR!r} attribute is incomplete ({exc}); it was not written "
                             "by `autoprec search`, or by a version this one cannot read") from None


def is_autoprec_study(study: "optuna.Study") -> bool:
    value = study.user_attrs.get(STUDY_ATTR)
    return isinstance(value, dict) or type(value).__name__ == "Unreadable"  # store/readable.py's marker


def read_info(study: "optuna.Study") -> StudyInfo:
    data = study.user_attrs.get(STUDY_ATTR)
    if type(data).__name__ == "Unreadable":
        raise StoreFault(f"study {study.study_name!r}: its {STUDY_ATTR!r} attribute is unreadable in the store "
                         f"({data.reason}); the study cannot be read (restore the store from a copy, or start a "
                         "new study)")
    if not isinstance(data, dict):
        raise StoreError(f"study {study.study_name!r} was not made by `autoprec search` (no {STUDY_ATTR!r} attribute)")
    return StudyInfo.from_json(data, where=f"study {study.study_name!r}")


def write_info(study: "optuna.Study", info: StudyInfo) -> None:
    study.set_user_attr(STUDY_ATTR, info.to_json())


def retimed(study: "optuna.Study") -> dict[str, dict[str, float]]:
    """Trial number (as a string) -> the front's re-timing at the end of the last search."""
    return (study.user_attrs.get(RETIMED_ATTR) or {}).get("trials", {})


def not_retimed(study: "optuna.Study") -> set[int]:
    """Front members the last search's re-time pass left out (past its time budget)."""
    return set((study.user_attrs.get(RETIMED_ATTR) or {}).get("not_retimed", []))


def write_retimed(study: "optuna.Study", at: str, trials: dict[str, dict[str, float]],
                  left_out: list[int] | None = None, budget_s: float | None = None) -> dict[str, Any]:
    record = {"at": at, "trials": trials, "not_retimed": list(left_out or []), "budget_s": budget_s}
    study.set_user_attr(RETIMED_ATTR, record)
    return record


def usable_retime(entry: Any) -> bool:
    """Whether a re-timing replaces the search's ratio: not when it was noisier than the search's own."""
    return isinstance(entry, dict) and not entry.get("wider") and isinstance(entry.get("ratio"), (int, float))


def machine_text(kind: Mapping[str, str] | None) -> str:
    """A machine kind in a few words: 'AMD EPYC 7B13 (AVX2, torch 2.5.1)', with any ISA-restricting
    variable; a GPU with its compute capability."""
    if not kind:
        return "an unrecorded machine kind"
    name = kind.get("device_name") or kind.get("device_type") or "?"
    if kind.get("device_type") == "cuda":
        parts = [f"compute capability {kind.get('capability', '?')}"]
    else:
        parts = [kind["cpu_capability"]] if kind.get("cpu_capability") else []
        parts += [f"{k}={v}" for k, v in sorted(kind.items()) if k.isupper()]  # ONEDNN_MAX_CPU_ISA and the like
    parts.append(f"torch {kind.get('torch', '?')}")
    return f"{name} ({', '.join(parts)})"


def machine_texts(there: Mapping[str, str], here: Mapping[str, str]) -> tuple[str, str]:
    """Two machine kinds in words that tell them apart (the differing fields are added when the short
    texts are the same)."""
    a, b = machine_text(there), machine_text(here)
    if a == b:
        differ = sorted(k for k in set(there) | set(here) if there.get(k) != here.get(k))
        a += "".join(f", {k} {there.get(k, 'unset')!r}" for k in differ)
        b += "".join(f", {k} {here.get(k, 'unset')!r}" for k in differ)
    return a, b


def machine_key(info: Mapping[str, str]) -> str:
    """The key a machine's format probe is kept under: CPU or GPU name, ISA flags, threads, torch."""
    return "sha256:" + hashlib.sha256(json.dumps(dict(info), sort_keys=True).encode()).hexdigest()[:16]


def stored_probes(storage: "optuna.storages.BaseStorage") -> dict[str, dict[str, Any]]:
    """Every format probe kept in the store (on its studies' info), by machine key."""
    found: dict[str, dict[str, Any]] = {}
    for other in storage.get_all_studies():
        data = other.user_attrs.get(STUDY_ATTR)
        probe = data.get("probe") if isinstance(data, dict) else None
        if isinstance(probe, dict) and isinstance(probe.get("machine"), dict):
            found[machine_key(probe["machine"])] = probe
    return found


# --------------------------------------------------------------------------------------------
# trial


@dataclass
class TrialRecord:
    number: int
    state: str
    values: list[float] | None
    params: dict[str, Any]
    origin: Origin = Origin()
    policy: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    measurement: dict[str, Any] = field(default_factory=dict)
    score_drop: float | None = None
    failure_reason: str | None = None
    run_id: str | None = None
    worker: str | None = None
    duplicate_of: int | None = None
    predicted: dict[str, float] | None = None
    skipped: str | None = None
    machine: dict[str, str] | None = None
    owner: dict[str, Any] | None = None

    @classmethod
    def of(cls, trial: "optuna.trial.FrozenTrial") -> "TrialRecord":
        a = trial.user_attrs
        return cls(number=trial.number, state=trial.state.name, values=list(trial.values) if trial.values else None,
                   params=dict(trial.params), origin=Origin.parse(a.get(TrialKey.ORIGIN)),
                   policy=a.get(TrialKey.POLICY) or {}, counts=a.get(TrialKey.COUNTS) or {},
                   measurement=a.get(TrialKey.MEASUREMENT) or {}, score_drop=a.get(TrialKey.SCORE_DROP),
                   failure_reason=a.get(TrialKey.FAILURE_REASON), run_id=a.get(TrialKey.RUN_ID),
                   worker=a.get(TrialKey.WORKER), duplicate_of=a.get(TrialKey.DUPLICATE_OF),
                   predicted=a.get(TrialKey.PREDICTED), skipped=a.get(TrialKey.SKIPPED),
                   machine=a.get(TrialKey.MACHINE), owner=a.get(TrialKey.OWNER))

    @property
    def default(self) -> str | None:
        return self.policy.get("default", self.counts.get("default"))

    @property
    def layers(self) -> dict[str, str]:
        return self.policy.get("layers") or {}


def enqueue(study: "optuna.Study", params: dict[str, Any], origin: Origin, **attrs: Any) -> None:
    study.enqueue_trial(params, user_attrs={TrialKey.ORIGIN: origin.text, **attrs}, skip_if_exists=True)


def start_trial(trial: "optuna.Trial", run_id: str, worker: str, machine: Mapping[str, str] | None = None,
                owner: Mapping[str, Any] | None = None) -> Origin:
    trial.set_user_attr(TrialKey.RUN_ID, run_id)
    trial.set_user_attr(TrialKey.WORKER, worker)
    if owner is not None:
        trial.set_user_attr(TrialKey.OWNER, dict(owner))
    if machine is not None:
        trial.set_user_attr(TrialKey.MACHINE, dict(machine))
    return Origin.parse(trial.user_attrs.get(TrialKey.ORIGIN))


def record_candidate(trial: "optuna.Trial", policy: Policy) -> None:
    trial.set_user_attr(TrialKey.POLICY, policy.to_json())
    trial.set_user_attr(TrialKey.COUNTS, policy.counts() | {"default": policy.default})


def record_measurement(trial: "optuna.Trial", measurement: dict[str, Any]) -> None:
    trial.set_user_attr(TrialKey.MEASUREMENT, measurement)


def record_failure(trial: "optuna.Trial", reason: str) -> None:
    trial.set_user_attr(TrialKey.FAILURE_REASON, reason)


def record_skip(trial: "optuna.Trial", kind: str, reason: str, over_budget: float | None) -> None:
    """A candidate not measured: why, and (where known) how far over max_drop it is believed to land."""
    trial.set_user_attr(TrialKey.SKIPPED, reason)
    trial.set_user_attr(TrialKey.SKIPPED_KIND, kind)
    if over_budget is not None and over_budget == over_budget:
        trial.set_constraint("score_drop", over_budget)


def skipped_counts(study: "optuna.Study", run_id: str | None = None) -> dict[str, int]:
    """How many proposals were skipped, by kind, as the trials record it (with run_id: that run's)."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        kind = t.user_attrs.get(TrialKey.SKIPPED_KIND)
        if kind and TrialKey.SKIPPED in t.user_attrs and run_id in (None, t.user_attrs.get(TrialKey.RUN_ID)):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def verdict_of(study: "optuna.Study") -> dict[str, Any] | None:
    """Why the last search stopped before its --trials (VERDICT_ATTR), or None."""
    value = study.user_attrs.get(VERDICT_ATTR)
    return value if isinstance(value, dict) and value.get("line") else None


def record_drop(trial: "optuna.Trial", drop: float, max_drop: float) -> None:
    trial.set_user_attr(TrialKey.SCORE_DROP, drop)
    trial.set_constraint("score_drop", drop - max_drop)


def copy_measured(trial: "optuna.Trial", twin: "optuna.trial.FrozenTrial", max_drop: float) -> None:
    """`trial` re-proposes `twin`'s policy: take its measurement instead of measuring again."""
    for key in (TrialKey.POLICY, TrialKey.COUNTS, TrialKey.MEASUREMENT, TrialKey.SCORE_DROP):
        trial.set_user_attr(key, twin.user_attrs.get(key))
    trial.set_user_attr(TrialKey.DUPLICATE_OF, twin.number)
    trial.set_constraint("score_drop", twin.user_attrs[TrialKey.SCORE_DROP] - max_drop)


def retried_numbers(trials: "list[optuna.trial.FrozenTrial]") -> set[int]:
    """Numbers of the trials that a later trial retries (Optuna's ``retry_history`` system attribute)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def trials_of_run(trials: "list[optuna.trial.FrozenTrial]", run_id: str) -> int:
    """Trials a run (all its workers) finished: not other runs' trials, not attempts that were
    retried, not interrupted ones."""
    retried = retried_numbers(trials)
    return sum(1 for t in trials if t.state.is_finished() and t.state.name != "PRUNED" and t.number not in retried
               and t.user_attrs.get(TrialKey.RUN_ID) == run_id
               and t.user_attrs.get(TrialKey.FAILURE_REASON) != INTERRUPTED)


def run_seconds(trials: "list[optuna.trial.FrozenTrial]", run_id: str) -> float:
    """Seconds a run's trials took, summed over its workers (start to completion)."""
    return sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
               if t.datetime_start and t.datetime_complete and t.user_attrs.get(TrialKey.RUN_ID) == run_id)


def is_measured(trial: "optuna.trial.FrozenTrial") -> bool:
    return TrialKey.SCORE_DROP in trial.user_attrs


def retry_attrs(trial: "optuna.trial.FrozenTrial") -> dict[str, Any]:
    """The user attributes a retry of `trial` keeps: only why it exists, not what the dead attempt measured."""
    return {k: v for k, v in trial.user_attrs.items() if k == TrialKey.ORIGIN}


# --------------------------------------------------------------------------------------------
# params codec


def params_of(default: str, layers: dict[str, str]) -> dict[str, str]:
    return {DEFAULT_PARAM: default, **{LAYER_PARAM + name: fmt for name, fmt in layers.items()}}


def uniform_params(choices: dict[str, tuple[str, ...]], space: "SearchSpace", fmt: str,
                   default: str | None = None) -> dict[str, str] | None:
    """Params of the all-`fmt` policy: every layer that may take `fmt` takes it, the rest the default
    (`fmt` itself where it can be one, else `default` where the space allows it, else fp32)."""
    if fmt in space.default_dtypes:
        default = fmt
    elif default not in space.default_dtypes:
        default = "fp32" if "fp32" in space.default_dtypes else space.default_dtypes[0]
    if fmt not in space.dtypes or not any(fmt in c for c in choices.values()):
        return None
    layers = {name: fmt if fmt in options else (default if default in options else options[0])
              for name, options in choices.items()}
    return params_of(default, layers)


def policy_from_params(params: dict[str, Any], space: "SearchSpace | None" = None) -> Policy:
    """The policy of a trial's params; with a training space, its training section too."""
    layers = {k[len(LAYER_PARAM):]: v for k, v in params.items() if k.startswith(LAYER_PARAM)}
    training = None
    if space is not None and "learning_rate" in params:
        training = TrainingSettings(loss_scale=float(params["loss_scale"]),
                                    dynamic_loss_scale=bool(params["dynamic_loss_scale"]),
                                    learning_rate=float(params["learning_rate"]),
                                    steps=int(space.training["steps"]), optimizer=space.training["optimizer"])
    return Policy(layers=layers, default=params.get(DEFAULT_PARAM, "fp32"), training=training)
