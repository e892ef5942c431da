"""The search: an Optuna multi-objective study over per-layer formats, in a SQL store.

Objectives: score (max), latency_ms (min), memory_bytes (min). The accuracy constraint is an
Optuna constraint (`trial.set_constraint("score_drop", drop - max_drop)`): trials over the drop are
kept but infeasible. A candidate that cannot run is a FAIL trial with its `failure_reason`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from autoprec import guide
from autoprec.errors import AutoprecError, StoreError
from autoprec.evaluate import Evaluator, environment, resolve_device
from autoprec.policy import Policy, model_fingerprint
from autoprec.precision import DTYPES, module_storage_bytes
from autoprec.profile import build_profile
from autoprec.space import SearchSpace, load_space
from autoprec.store import STUDY_ATTR, open_storage, storage_url, study_info, study_names
from autoprec.timing import TimingSettings
from autoprec.userspec import ModelSpec, load_spec

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

OBJECTIVES = ("score", "latency_ms", "memory_bytes")
DIRECTIONS = ("maximize", "minimize", "minimize")
DEFAULT_MAX_DROP = 0.01
LAYER_PARAM = "layer:"
DEFAULT_PARAM = "default"
RETIMED_ATTR = "autoprec_retimed"
MAX_RETIMED = 12
STRATEGIES = ("guided", "tpe", "nsga2", "random")


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
    threads: int | None = None
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


def policy_from_params(params: dict[str, Any]) -> Policy:
    layers = {k[len(LAYER_PARAM):]: v for k, v in params.items() if k.startswith(LAYER_PARAM)}
    return Policy(layers=layers, default=params.get(DEFAULT_PARAM, "fp32"))


def _check_resume(info: dict[str, Any], fingerprint: str, space: SearchSpace, device: torch.device,
                  max_drop: float | None, name: str) -> None:
    way_out = f"start a new study with --study NEW_NAME (this one is {name!r})"
    if info.get("model_fingerprint") != fingerprint:
        raise StoreError(f"study {name!r} was made for a different model ({info.get('model_class')}, "
                         f"{info.get('model_path')}); the model's structure changed; {way_out}")
    if info.get("space_fingerprint") != space.fingerprint():
        raise StoreError(f"study {name!r} was made with search space {info.get('space', {}).get('name')!r} "
                         f"and this run's space {space.name!r} differs; {way_out}")
    if info.get("device_type") != device.type:
        raise StoreError(f"study {name!r} was measured on {info.get('device_type')}, not {device.type}; {way_out}")
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
        self.phase_seconds: dict[str, float] = {}
        self.spec: ModelSpec = load_spec(config.model)
        self.space = load_space(config.space)
        self.device = resolve_device(config.device)
        if config.max_drop is not None and not config.max_drop >= 0:
            raise AutoprecError(f"--max-drop {config.max_drop}: must be a number >= 0 (an absolute score drop)")
        model = self.spec.new_model()
        self.fingerprint = model_fingerprint(model)
        self.choices = self.space.choices(model, self.device)
        if not self.choices:
            raise AutoprecError(f"{self.spec.path}: no searchable layer under space {self.space.name!r} "
                                f"({self.space.source}); check its 'layers' and 'rules'")
        self.study_name = config.study or default_study_name(config.model)
        self.storage_url = storage_url(config.storage)
        self.storage = open_storage(self.storage_url)
        existing = self.study_name in study_names(self.storage)
        info = None
        if existing:
            info = study_info(optuna.load_study(study_name=self.study_name, storage=self.storage))
            _check_resume(info, self.fingerprint, self.space, self.device, config.max_drop, self.study_name)
        self.evaluator = Evaluator(self.spec, self.device, threads=config.threads, timing=config.timing,
                                   reference_latency_ms=info["reference"]["latency_ms"] if info else None)
        # Created only once the reference has been measured: a broken spec leaves no study behind.
        self.study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                         directions=list(DIRECTIONS), sampler=self._sampler(), load_if_exists=True)
        if info is None:
            info = self._initialise_study()
        self.info = info
        self.max_drop = float(info["max_drop"])
        self.reference_score = float(info["reference"]["score"])

    def _sampler(self) -> optuna.samplers.BaseSampler:
        seed = self.config.seed
        if self.config.strategy == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
        if self.config.strategy == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8, constant_liar=True)

    def _initialise_study(self) -> dict[str, Any]:
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
            "max_drop": DEFAULT_MAX_DROP if self.config.max_drop is None else self.config.max_drop,
            "reference": {"score": self.evaluator.reference_score,
                          "latency_ms": self.evaluator.reference_latency_ms,
                          "memory_bytes": module_storage_bytes(model)},
            "layers": list(self.choices),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.study.set_metric_names(list(OBJECTIVES))
        self.study.set_user_attr(STUDY_ATTR, info)
        for fmt in DTYPES:
            params = uniform_policy_params(self.choices, self.space, fmt)
            if params is not None:
                self.study.enqueue_trial(params, user_attrs={"origin": f"uniform {fmt}"}, skip_if_exists=True)
        return info

    def objective(self, trial: optuna.Trial) -> tuple[float, float, float]:
        params = {DEFAULT_PARAM: trial.suggest_categorical(DEFAULT_PARAM, list(self.space.default_dtypes))}
        for name, options in self.choices.items():
            params[LAYER_PARAM + name] = trial.suggest_categorical(LAYER_PARAM + name, list(options))
        policy = policy_from_params(params)
        trial.set_user_attr("policy", policy.to_json())
        trial.set_user_attr("counts", policy.counts() | {"default": policy.default})
        measurement = self.evaluator.measure(policy)
        trial.set_user_attr("measurement", measurement.to_json())
        if not measurement.feasible:
            trial.set_user_attr("failure_reason", measurement.reason)
            raise CandidateFailed(measurement.reason)
        drop = self.reference_score - measurement.score
        trial.set_user_attr("score_drop", drop)
        trial.set_constraint("score_drop", drop - self.max_drop)
        return measurement.score, measurement.latency_ms, float(measurement.memory_bytes)

    def _optimize(self, trials: int, deadline: float | None, bar: "_ProgressBar") -> int:
        """Run up to `trials` trials (WAITING ones first) before `deadline`; returns how many ran."""
        if trials <= 0 or (deadline is not None and time.monotonic() >= deadline):
            return 0
        before = self.finished_trials()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.study.optimize(self.objective, n_trials=trials, timeout=timeout, catch=(CandidateFailed,),
                            callbacks=[bar.update], gc_after_trial=True)
        return self.finished_trials() - before

    def _waiting(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))

    def guide(self) -> int:
        """Profile (once per study), calibrate the cost model on the uniform trials, enqueue proposals."""
        started = time.perf_counter()
        profile = guide.stored_profile(self.study)
        if profile is None:
            profile = build_profile(self.spec, self.evaluator.model, self.evaluator.example, self.choices,
                                    self.space.default_dtypes, self.device)
            profile.reference_latency_ms = self.evaluator.reference_latency_ms
            self.study.set_user_attr(guide.PROFILE_ATTR, profile.to_json())
        self.phase_seconds["profile"] = time.perf_counter() - started
        model = guide.calibrated_model(self.study, profile, self.choices, self.reference_score)
        return guide.enqueue_proposals(self.study, model, self.max_drop, self.space.default_dtypes)

    def run(self, trials: int, timeout: float | None = None) -> SearchResult:
        optuna.storages.fail_stale_trials(self.study)
        deadline = None if timeout is None else time.monotonic() + timeout
        before = self.finished_trials()
        bar = _ProgressBar(trials, self.study, self.config.progress)
        interrupted = False
        try:
            remaining = trials
            guided = self.config.strategy == "guided" and guide.PROPOSALS_ATTR not in self.study.user_attrs
            if guided:
                started = time.perf_counter()
                remaining -= self._optimize(min(remaining, self._waiting()), deadline, bar)
                self.phase_seconds["uniform"] = time.perf_counter() - started
                if remaining > 0 and self._waiting() == 0:
                    bar.note("profiling layers")
                    self.guide()
                    started = time.perf_counter()
                    remaining -= self._optimize(min(remaining, self._waiting()), deadline, bar)
                    self.phase_seconds["proposals"] = time.perf_counter() - started
            started = time.perf_counter()
            self._optimize(remaining, deadline, bar)
            self.phase_seconds["refinement"] = time.perf_counter() - started
            profile = guide.stored_profile(self.study)
            if profile is not None:
                model = guide.calibrated_model(self.study, profile, self.choices, self.reference_score)
                guide.record_model_error(self.study, model, self.reference_score)
            if self.config.retime_front and self.finished_trials() > before:
                bar.note("re-timing the front")
                started = time.perf_counter()
                self.retime_front()
                self.phase_seconds["retime"] = time.perf_counter() - started
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
        total = self.finished_trials()
        return SearchResult(self.study_name, self.storage_url, total - before, total, interrupted,
                            dict(self.phase_seconds))

    def retime_front(self) -> dict[str, Any]:
        """Re-time every front member beside the fp32 model in one pass, so their ratios compare."""
        from autoprec.results import pareto_front, trials_frame

        front = pareto_front(trials_frame(self.study))
        timings = {}
        for number in front.trial.astype(int).tolist()[:MAX_RETIMED]:
            trial = self.study.trials[number]
            policy = policy_from_params(trial.params)
            timing = self.evaluator.retime(policy)
            if timing is not None:
                timings[str(number)] = {"latency_ms": timing.ratio * self.evaluator.reference_latency_ms,
                                        "ratio": timing.ratio, "spread": timing.ratio_spread}
        record = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "trials": timings}
        self.study.set_user_attr(RETIMED_ATTR, record)
        return record

    def finished_trials(self) -> int:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
        return len(self.study.get_trials(deepcopy=False, states=states))


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
