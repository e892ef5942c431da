"""The search: an Optuna multi-objective study over per-layer formats, in a SQL store.

Objectives: score (max), latency_ms (min), memory_bytes (min). The accuracy constraint is an
Optuna constraint (`trial.set_constraint("score_drop", drop - max_drop)`): trials over the drop are
kept but infeasible. A candidate that cannot run is a FAIL trial with its `failure_reason`.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from autoprec import cpu_malloc, guide
from autoprec.errors import AutoprecError, StoreError
from autoprec.evaluate import Evaluator, environment, resolve_device
from autoprec.policy import Policy, TrainingSettings, model_fingerprint
from autoprec.precision import DTYPES, module_storage_bytes
from autoprec.profile import build_profile
from autoprec.results import RETIMED_ATTR
from autoprec.space import SearchSpace, load_space
from autoprec.ledger import Ledger, worker_name
from autoprec.store import GRACE_S, STUDY_ATTR, open_storage, storage_url, study_info, study_names
from autoprec.tables import threads_text
from autoprec.timing import TimingSettings, default_threads, usable_cores
from autoprec.userspec import ModelSpec, load_spec

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

OBJECTIVES = ("score", "latency_ms", "memory_bytes")
DIRECTIONS = ("maximize", "minimize", "minimize")
DEFAULT_MAX_DROP = 0.01
LAYER_PARAM = "layer:"
DEFAULT_PARAM = "default"
MAX_RETIMED = 12
STRATEGIES = ("guided", "tpe", "nsga2", "random")
CLAIM_STALE_S = float(os.environ.get("AUTOPREC_CLAIM_STALE_S", "900"))


class CandidateFailed(Exception):
    """A candidate that could not run; the trial is recorded as FAIL with the reason."""


def default_study_name(model_path: str | Path) -> str:
    path = Path(model_path).resolve()
    return path.parent.name if path.stem == "model" else path.stem


@dataclass
class SearchConfig:
    model: str
    trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    study: str | None = None
    space: str | None = None
    device: str | None = None
    max_drop: float | None = None
    seed: int = 0
    threads: int | None = None  # CPU threads; None: the study's, or for a new study default_threads() / workers
    workers: int = 1  # local worker processes that will share this machine's cores
    strategy: str = "guided"  # guided (profile + knapsack proposals, then TPE), tpe, nsga2, random
    retime_front: bool = True
    timing: TimingSettings = field(default_factory=TimingSettings)
    progress: bool = True


@dataclass
class SearchResult:
    study_name: str
    storage: str
    trials_run: int
    trials_total: int
    interrupted: bool
    phase_seconds: dict[str, float] = field(default_factory=dict)


def uniform_policy_params(choices: dict[str, tuple[str, ...]], space: SearchSpace, fmt: str) -> dict[str, str] | None:
    """Params of the all-`fmt` policy: every layer that may take `fmt` takes it, the rest the default."""
    default = fmt if fmt in space.default_dtypes else ("fp32" if "fp32" in space.default_dtypes else space.default_dtypes[0])
    if fmt not in space.dtypes or not any(fmt in c for c in choices.values()):
        return None
    params = {DEFAULT_PARAM: default}
    for name, options in choices.items():
        params[LAYER_PARAM + name] = fmt if fmt in options else (default if default in options else options[0])
    return params


def policy_from_params(params: dict[str, Any], space: SearchSpace | None = None) -> Policy:
    """The policy of a trial's params; with a training space, its training section too."""
    layers = {k[len(LAYER_PARAM):]: v for k, v in params.items() if k.startswith(LAYER_PARAM)}
    training = None
    if space is not None and "learning_rate" in params:
        training = TrainingSettings(loss_scale=float(params["loss_scale"]),
                                    dynamic_loss_scale=bool(params["dynamic_loss_scale"]),
                                    learning_rate=float(params["learning_rate"]),
                                    steps=int(space.training["steps"]), optimizer=space.training["optimizer"])
    return Policy(layers=layers, default=params.get(DEFAULT_PARAM, "fp32"), training=training)


def study_threads(device: torch.device, stored: str | None, requested: int | None, workers: int,
                  name: str) -> int | None:
    """The CPU thread count to time a study with: set when the study is created (--threads, else
    default_threads() shared among the local workers) and kept by every resume and worker, because
    the ratios of bf16 and int8 to fp32 change with the thread count."""
    if device.type != "cpu":
        return requested
    if stored is None:
        return requested or max(1, default_threads() // workers)
    if requested is not None and requested != int(stored):
        raise StoreError(f"study {name!r} was timed with {threads_text(stored)} on the CPU, and latency ratios "
                         f"change with the thread count; drop --threads {requested} (a resume keeps the study's), "
                         "or start a new study with --study NEW_NAME")
    return int(stored)


def _check_resume(info: dict[str, Any], fingerprint: str, space: SearchSpace, device: torch.device,
                  max_drop: float | None, name: str, freed_memory_kept: bool) -> None:
    way_out = f"start a new study with --study NEW_NAME (this one is {name!r})"
    if info.get("model_fingerprint") != fingerprint:
        raise StoreError(f"study {name!r} was made for a different model ({info.get('model_class')}, "
                         f"{info.get('model_path')}); the model's structure changed; {way_out}")
    if info.get("space_fingerprint") != space.fingerprint():
        raise StoreError(f"study {name!r} was made with search space {info.get('space', {}).get('name')!r} "
                         f"and this run's space {space.name!r} differs; {way_out}")
    if info.get("device_type") != device.type:
        raise StoreError(f"study {name!r} was measured on {info.get('device_type')}, not {device.type}; {way_out}")
    if device.type == "cpu" and info.get("cpu_freed_memory_kept", freed_memory_kept) != freed_memory_kept:
        kept = info["cpu_freed_memory_kept"]
        was, flag = ("kept", "drop --malloc-defaults") if kept else ("returned", "add --malloc-defaults")
        raise StoreError(f"study {name!r} was timed with the CPU allocator's freed memory {was}, which changes "
                         f"latencies; {flag} to match it, or {way_out}")
    if max_drop is not None and abs(max_drop - info["max_drop"]) > 1e-15:
        raise StoreError(f"study {name!r} uses --max-drop {info['max_drop']}, not {max_drop}; "
                         f"`autoprec front --max-drop` filters an existing study, or {way_out}")


class Search:
    """One worker's view of a study: the evaluator, the space and the Optuna study."""

    def __init__(self, config: SearchConfig) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.config = config
        if config.strategy not in STRATEGIES:
            raise AutoprecError(f"--strategy {config.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if config.max_drop is not None and not config.max_drop >= 0:
            raise AutoprecError(f"--max-drop {config.max_drop}: must be a number >= 0 (an absolute score drop)")
        self.phase_seconds: dict[str, float] = {}
        self._last_origin = "sampler"
        self.spec: ModelSpec = load_spec(config.model)
        self.space = load_space(config.space)
        self.device = resolve_device(config.device)
        model = self.spec.new_model()
        self.fingerprint = model_fingerprint(model)
        self.choices = self.space.choices(model, self.device)
        if not self.choices:
            raise AutoprecError(f"{self.spec.path}: no searchable layer under space {self.space.name!r} "
                                f"({self.space.source}); check its 'layers' and 'rules'")
        self.trains = self.space.trains
        if self.trains and not self.spec.can_train:
            raise AutoprecError(f"{self.spec.path}: space {self.space.name!r} enables training, but model.py lacks "
                                "train_batches() and loss(outputs, targets); define both, or use a space without "
                                "'training'")
        if self.trains and self.spec.evaluate is None:
            raise AutoprecError(f"{self.spec.path}: evaluate(model, device) is missing; training mode needs a task "
                                "score (fidelity to the un-tuned model is no score after fine-tuning)")
        self.study_name = config.study or default_study_name(config.model)
        self.storage_url = storage_url(config.storage)
        self.storage = open_storage(self.storage_url)
        self.ledger: Ledger = self.storage.ledger
        self.evaluator: Evaluator | None = None
        info = self._ready_info()
        if info is None:
            self.threads = study_threads(self.device, None, config.threads, config.workers, self.study_name)
            info = self._create_or_wait()
        if self.evaluator is None:
            _check_resume(info, self.fingerprint, self.space, self.device, config.max_drop, self.study_name,
                          cpu_malloc.prepare(self.config.timing.keep_freed_memory))
            self.threads = study_threads(self.device, info.get("environment", {}).get("threads"), config.threads,
                                         config.workers, self.study_name)
            self.evaluator = Evaluator(self.spec, self.device, threads=self.threads, timing=config.timing,
                                       reference_latency_ms=info["reference"]["latency_ms"])
        if self.device.type == "cpu" and self.threads and self.threads * config.workers > usable_cores():
            print(f"autoprec: {config.workers} x {threads_text(self.threads)} (study {self.study_name!r}'s) "
                  f"oversubscribe this machine's {usable_cores()} cores, which slows and blurs every timing; "
                  "use fewer --workers, or a new study with fewer --threads", file=sys.stderr)
        self.study = optuna.load_study(study_name=self.study_name, storage=self.storage, sampler=self._sampler())
        self.info = info
        self.max_drop = float(info["max_drop"])
        self.reference_score = float(info["reference"]["score"])

    def _ready_info(self) -> dict[str, Any] | None:
        if self.study_name not in study_names(self.storage):
            return None
        study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        return study_info(study) if STUDY_ATTR in study.user_attrs else None

    def _create_or_wait(self) -> dict[str, Any]:
        """The first worker measures the fp32 reference and creates the study; the others wait for it."""
        while True:
            if self.ledger.claim(self.study_name, "reference", stale_s=CLAIM_STALE_S):
                try:
                    self.evaluator = Evaluator(self.spec, self.device, threads=self.threads,
                                               timing=self.config.timing)
                    # Created only once the reference is measured: a broken spec leaves no study behind.
                    study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                                directions=list(DIRECTIONS), load_if_exists=True)
                    info = self._initialise_study(study)
                except BaseException:
                    self.ledger.drop_claim(self.study_name, "reference")
                    raise
                self.ledger.finish_claim(self.study_name, "reference")
                return info
            waited = time.monotonic()
            while time.monotonic() - waited < CLAIM_STALE_S:
                info = self._ready_info()
                if info is not None:
                    return info
                time.sleep(1.0)

    def _sampler(self) -> optuna.samplers.BaseSampler:
        seed = self.config.seed
        if self.config.strategy == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
        if self.config.strategy == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8, constant_liar=True)

    def _initialise_study(self, study: optuna.Study) -> dict[str, Any]:
        model = self.evaluator.model
        info = {
            "version": 1,
            "model_path": str(self.spec.path.resolve()),
            "model_class": type(model).__name__,
            "model_fingerprint": self.fingerprint,
            "space": self.space.to_json(),
            "space_fingerprint": self.space.fingerprint(),
            "device_type": self.device.type,
            "environment": environment(self.device),
            "cpu_freed_memory_kept": cpu_malloc.prepare(self.config.timing.keep_freed_memory),
            "max_drop": DEFAULT_MAX_DROP if self.config.max_drop is None else self.config.max_drop,
            "reference": {"score": self.evaluator.reference_score,
                          "latency_ms": self.evaluator.reference_latency_ms,
                          "memory_bytes": module_storage_bytes(model)},
            "layers": list(self.choices),
            "training": self.trains,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        study.set_metric_names(list(OBJECTIVES))
        for fmt in DTYPES:
            params = uniform_policy_params(self.choices, self.space, fmt)
            if params is not None:
                study.enqueue_trial(params, user_attrs={"origin": f"uniform {fmt}"}, skip_if_exists=True)
        study.set_user_attr(STUDY_ATTR, info)  # last: its presence means the study is ready
        return info

    def objective(self, trial: optuna.Trial) -> tuple[float, float, float]:
        # Beat before anything else: a trial with no heartbeat row never counts as stale.
        self.storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("run_id", self.run_id)
        trial.set_user_attr("worker", worker_name())
        self._last_origin = str(trial.user_attrs.get("origin", "sampler")).split()[0]
        params = {DEFAULT_PARAM: trial.suggest_categorical(DEFAULT_PARAM, list(self.space.default_dtypes))}
        for name, options in self.choices.items():
            params[LAYER_PARAM + name] = trial.suggest_categorical(LAYER_PARAM + name, list(options))
        if self.trains:
            knobs = self.space.training
            lr = knobs["learning_rate"]
            params["learning_rate"] = trial.suggest_float("learning_rate", lr["low"], lr["high"], log=lr["log"])
            params["loss_scale"] = trial.suggest_categorical("loss_scale", knobs["loss_scale"])
            params["dynamic_loss_scale"] = trial.suggest_categorical("dynamic_loss_scale", knobs["dynamic_loss_scale"])
        policy = policy_from_params(params, self.space)
        twin = self._measured_twin(trial.number, params)
        if twin is not None:  # samplers re-propose policies; measuring one twice buys nothing
            for key in ("policy", "counts", "measurement", "score_drop"):
                trial.set_user_attr(key, twin.user_attrs.get(key))
            trial.set_user_attr("duplicate_of", twin.number)
            trial.set_constraint("score_drop", twin.user_attrs["score_drop"] - self.max_drop)
            return tuple(twin.values)
        trial.set_user_attr("policy", policy.to_json())
        trial.set_user_attr("counts", policy.counts() | {"default": policy.default})
        measurement = self.evaluator.measure(policy, policy.training, seed=self.config.seed)
        trial.set_user_attr("measurement", measurement.to_json())
        if not measurement.feasible:
            trial.set_user_attr("failure_reason", measurement.reason)
            raise CandidateFailed(measurement.reason)
        drop = self.reference_score - measurement.score
        trial.set_user_attr("score_drop", drop)
        trial.set_constraint("score_drop", drop - self.max_drop)
        return measurement.score, measurement.latency_ms, float(measurement.memory_bytes)

    def _measured_twin(self, number: int, params: dict[str, Any]) -> optuna.trial.FrozenTrial | None:
        if self.trains:  # a fine-tuned trial's score depends on its training knobs' exact values too
            return None
        for t in self._trials(optuna.trial.TrialState.COMPLETE):
            if t.number != number and t.params == params and "score_drop" in t.user_attrs:
                return t
        return None

    def _trials(self, *states: optuna.trial.TrialState) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)

    def _ready_to_guide(self) -> bool:
        if self.config.strategy != "guided" or guide.PROPOSALS_ATTR in self.study.user_attrs:
            return False
        if self._trials(optuna.trial.TrialState.WAITING):
            return False
        running = self._trials(optuna.trial.TrialState.RUNNING)
        return not any(str(t.user_attrs.get("origin", "")).startswith("uniform") for t in running)

    def guide(self) -> int:
        """Profile (once per study), calibrate the cost model on the uniform trials, enqueue proposals."""
        if not self.ledger.claim(self.study_name, "profile", stale_s=CLAIM_STALE_S):
            return 0  # another worker is on it; this one keeps sampling meanwhile
        try:
            started = time.perf_counter()
            profile = guide.stored_profile(self.study)
            reused = None if profile is not None else guide.sibling_profile(self.storage, self.study_name, self.info)
            if reused is not None:
                profile, source = reused
                self.study.set_user_attr(guide.PROFILE_ATTR, profile.to_json())
                self.study.set_user_attr(guide.PROFILE_SOURCE_ATTR, source)
            if profile is None:
                profile = build_profile(self.spec, self.evaluator.model, self.evaluator.example, self.choices,
                                        self.space.default_dtypes, self.device)
                profile.reference_latency_ms = self.evaluator.reference_latency_ms
                self.study.set_user_attr(guide.PROFILE_ATTR, profile.to_json())
            self.phase_seconds["profile"] = time.perf_counter() - started
            model = guide.calibrated_model(self.study, profile, self.choices, self.reference_score)
            count = guide.enqueue_proposals(self.study, model, self.max_drop, self.space.default_dtypes)
        except BaseException:
            self.ledger.drop_claim(self.study_name, "profile")
            raise
        self.ledger.finish_claim(self.study_name, "profile")
        return count

    def run(self, trials: int | None, timeout: float | None = None, run_id: str | None = None,
            on_trial: Callable[[], None] | None = None) -> SearchResult:
        """Run this invocation's trials: `trials` new ones, or with `run_id` a share of that run's."""
        optuna.storages.fail_stale_trials(self.study)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.run_id = run_id or self.ledger.new_run(self.study_name, int(trials or 0))
        before = self.finished_trials()
        bar = _ProgressBar(trials or 0, self.study, self.config.progress and run_id is None)
        interrupted = False
        try:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    self.ledger.close_run(self.run_id)
                    break
                if self._ready_to_guide():
                    bar.note("profiling layers")
                    self.guide()
                    if deadline is not None and time.monotonic() >= deadline:
                        continue  # the profile used up the time: close the run at the top
                if not self.ledger.reserve(self.run_id):
                    if self._wait_for_siblings():
                        continue
                    break
                started = time.perf_counter()
                self.study.optimize(self.objective, n_trials=1, catch=(CandidateFailed,), callbacks=[bar.update],
                                    gc_after_trial=False)
                self.phase_seconds[self._last_origin] = (self.phase_seconds.get(self._last_origin, 0.0)
                                                         + time.perf_counter() - started)
                if on_trial:
                    on_trial()
            if run_id is None:
                self.finish()
        except KeyboardInterrupt:
            interrupted = True
            self.ledger.close_run(self.run_id)
        finally:
            bar.close()
        total = self.finished_trials()
        return SearchResult(self.study_name, self.storage_url, total - before, total, interrupted,
                            dict(self.phase_seconds))

    def _wait_for_siblings(self) -> bool:
        """True while another worker of this run has a trial RUNNING (it finishes, or goes stale and
        comes back as a retry this worker can take); False when the run is done."""
        running = [t for t in self._trials(optuna.trial.TrialState.RUNNING)
                   if t.user_attrs.get("run_id") in (self.run_id, None)]
        if not running:
            return False
        time.sleep(1.0)
        optuna.storages.fail_stale_trials(self.study)
        # A worker killed before its first heartbeat leaves a trial Optuna never sees as stale.
        limit = datetime.datetime.now() - datetime.timedelta(seconds=2 * GRACE_S + 5)
        for t in running:
            if t.datetime_start and t.datetime_start < limit and self._never_beat(t):
                try:
                    self.storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
                except Exception:  # another worker failed it first
                    continue
                self.storage.heartbeat_stale_trial_callback(self.study, self.study.trials[t.number])
        return True

    def _never_beat(self, trial: optuna.trial.FrozenTrial) -> bool:
        from optuna.storages._rdb import models

        session = self.storage.scoped_session()
        try:
            return models.TrialHeartbeatModel.where_trial_id(trial._trial_id, session) is None
        finally:
            session.close()

    def finish(self) -> None:
        """After the trials: record the cost model's error, re-time the front beside fp32."""
        profile = guide.stored_profile(self.study)
        if profile is not None:
            model = guide.calibrated_model(self.study, profile, self.choices, self.reference_score)
            guide.record_model_error(self.study, model, self.reference_score)
        if self.config.retime_front:
            started = time.perf_counter()
            self.retime_front()
            self.phase_seconds["retime"] = time.perf_counter() - started

    def retime_front(self) -> dict[str, Any]:
        """Re-time every front member beside the fp32 model in one pass, so their ratios compare."""
        from autoprec.results import pareto_front, trials_frame

        front = pareto_front(trials_frame(self.study))
        timings = {}
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for number in front.trial.astype(int).tolist()[:MAX_RETIMED]:
            timing = self.evaluator.retime(policy_from_params(by_number[number].params))
            if timing is not None:
                timings[str(number)] = {"latency_ms": timing.ratio * self.evaluator.reference_latency_ms,
                                        "ratio": timing.ratio, "spread": timing.ratio_spread}
        record = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "trials": timings}
        self.study.set_user_attr(RETIMED_ATTR, record)
        return record

    def finished_trials(self) -> int:
        return len(self._trials(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                optuna.trial.TrialState.PRUNED))


class _ProgressBar:
    def __init__(self, total: int, study: optuna.Study, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="trials", unit="trial", disable=not enabled, dynamic_ncols=True)

    def note(self, text: str) -> None:
        self.bar.set_description_str(text)

    def update(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        best = None
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if all(c <= 0 for c in t.constraints.values()) and (best is None or t.values[1] < best):
                best = t.values[1]
        self.bar.set_description_str("trials")
        state = trial.state.name.lower()
        self.bar.set_postfix_str(f"last #{trial.number} {state}, best feasible {best:.2f} ms" if best
                                 else f"last #{trial.number} {state}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_search(config: SearchConfig) -> SearchResult:
    search = Search(config)
    return search.run(config.trials, config.timeout)
