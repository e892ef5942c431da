"""The search: an Optuna multi-objective study over per-layer formats, in a SQL store.

`run_search(config)` opens the study (autoprec.search.study_setup), then runs the trial loop here in this
process, or starts local workers that run it (autoprec.search.workers). Objectives: score (max),
latency_ms (min), memory_bytes (min). The accuracy constraint is an Optuna constraint
(`score_drop - max_drop`): trials over the drop are kept but infeasible. A candidate that cannot
run is a FAIL trial with its `failure_reason`. What a trial records: autoprec.store.schema.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from autoprec.guided import study_state

from autoprec.store import schema
from autoprec.errors import AutoprecError
from autoprec.measure.calibration import policy_recipes
from autoprec.store.worker_tables import worker_name
from autoprec.search.guidance import MEASURED, STOP, Guidance
from autoprec.search.study_setup import OpenedStudy, open_study
from autoprec.precision.static_int8 import layout_hint
from autoprec.store.schema import DEFAULT_PARAM, LAYER_PARAM, Origin, policy_from_params
from autoprec.store.recovery import RetriesFirst, abandon, fail_stale, process_identity, retry_interrupted
from autoprec.search.retime import retime_front
from autoprec.search.sampling import KeepOut
from autoprec.store.storage import shown_url, storage_url, store_fault
from autoprec.display import printable
from autoprec.search.config import SearchConfig


class CandidateFailed(Exception):
    """A candidate that could not run; the trial is recorded as FAIL with the reason."""


class _OneLineFailures(logging.Filter):
    """Optuna logs a failed trial with its parameters (every layer) and a traceback; for a candidate
    that could not run, the reason is the news (the trial keeps it, and the measurement any traceback)."""

    def filter(self, rec: logging.LogRecord) -> bool:
        if re.match(r"Trial \d+ failed with value None", str(rec.msg)):  # follows each of those: said already
            return False
        if rec.exc_info and store_fault(rec.exc_info[1]) is not None:  # the search stops with one line on it
            return False
        if rec.exc_info and isinstance(rec.exc_info[1], (CandidateFailed, KeyboardInterrupt)):
            number = re.match(r"Trial (\d+)", str(rec.msg))
            exc = rec.exc_info[1]
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {printable(exc)}"
            rec.msg = f"trial {number.group(1) if number else '?'} {what}"
            rec.args, rec.exc_info, rec.exc_text = (), None, None
        return True


_ONE_LINE_FAILURES = _OneLineFailures()


@contextlib.contextmanager
def _no_second_interrupt() -> Iterator[None]:
    """While a run records its interrupt, a second Ctrl-C must not break the store writes half way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class SearchResult:
    study_name: str
    storage: str
    trials_run: int
    trials_total: int
    interrupted: bool
    phase_seconds: dict[str, float] = field(default_factory=dict)
    study: optuna.Study | None = None
    verdict: str | None = None  # why the search stopped before its --trials (autoprec.guided.verdict)
    skipped: dict[str, int] = field(default_factory=dict)  # sampler proposals not measured this run, by why


def _sampler(config: SearchConfig, kept: dict[str, tuple[str, ...]] | None, choices: dict[str, tuple[str, ...]],
             defaults: tuple[str, ...], kept_defaults: tuple[str, ...]) -> optuna.samplers.BaseSampler:
    """The strategy's sampler; with pruning (`kept`: each layer's formats left in), one that skips the
    pruned formats."""
    seed = config.seed
    if config.strategy == "nsga2":
        base: optuna.samplers.BaseSampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    elif config.strategy == "random":
        base = optuna.samplers.RandomSampler(seed=seed)
    else:
        base = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8, constant_liar=True)
    if kept is None:
        return base
    # the distributions keep every format (the uniform policies use them); the sampler skips the pruned
    pruned = {LAYER_PARAM + n: set(choices[n]) - set(k) for n, k in kept.items()}
    pruned[DEFAULT_PARAM] = set(defaults) - set(kept_defaults)
    return KeepOut(base, pruned, seed)


def measured_twin(complete: list[optuna.trial.FrozenTrial], number: int,
                  params: dict[str, Any]) -> optuna.trial.FrozenTrial | None:
    """A measured trial with the same parameters as trial `number` (samplers re-propose policies).
    Not for fine-tuned trials: their score depends on the training knobs' exact values too."""
    for t in complete:
        if t.number != number and t.params == params and schema.is_measured(t):
            return t
    return None


class Search:
    """The trial loop of one worker over an opened study."""

    def __init__(self, opened: OpenedStudy) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("optuna.study._optimize").addFilter(_ONE_LINE_FAILURES)
        self.opened = opened
        self.config = opened.config
        self.spec, self.space, self.device, self.choices = opened.spec, opened.space, opened.device, opened.choices
        self.trains = self.space.trains
        self.study_name, self.storage_url, self.storage = opened.study_name, opened.storage_url, opened.storage
        self.ledger = opened.ledger
        self.evaluator = opened.evaluator
        self.info = opened.info
        self.threads = opened.threads
        self.max_drop = float(self.info.max_drop)
        self.reference_score = float(self.info.reference.score)
        self.phase_seconds: dict[str, float] = {}
        self._last_origin = Origin()
        self.pruning = opened.pruning
        self.search_choices = self.choices if self.pruning is None else self.pruning.choices
        self.search_defaults = self.space.default_dtypes if self.pruning is None else self.pruning.defaults
        self.layout_hint = layout_hint(self.evaluator.model, self.choices, self.device)
        self.study = RetriesFirst(study_name=self.study_name, storage=self.storage, sampler=self._sampler())
        self.run_id = ""
        self._trial_id: int | None = None  # the trial this process is running
        self.guidance = Guidance(self)

    @classmethod
    def open(cls, config: SearchConfig) -> "Search":
        return cls(open_study(config))

    def summary(self) -> str:
        return (f"study {self.study_name!r} in {shown_url(self.storage_url)} ({self.finished_trials()} trials so far); "
                f"{len(self.choices)} searchable layers on {self.device}, {self.info.runtime} runtime; fp32 score "
                f"{self.reference_score:.6g}, max drop {self.max_drop}")

    def _sampler(self) -> optuna.samplers.BaseSampler:
        return _sampler(self.config, None if self.pruning is None else self.search_choices, self.choices,
                        self.space.default_dtypes, self.search_defaults)

    def objective(self, trial: optuna.Trial) -> tuple[float, float, float]:
        try:
            return self._objective(trial)
        except KeyboardInterrupt:
            with _no_second_interrupt():
                schema.record_failure(trial, schema.INTERRUPTED)
            raise

    def _objective(self, trial: optuna.Trial) -> tuple[float, float, float]:
        # Beat before anything else: a trial with no heartbeat row never counts as stale.
        self._trial_id = trial._trial_id
        self.storage.record_heartbeat(trial._trial_id)
        self._last_origin = schema.start_trial(trial, self.run_id, worker_name(), self.opened.machine_kind,
                                               process_identity())
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
        self.guidance.screen(trial, policy, self._last_origin)  # the planner's exclusions hold for the sampler too
        twin = None if self.trains else measured_twin(self._trials(optuna.trial.TrialState.COMPLETE), trial.number, params)
        if twin is not None:  # samplers re-propose policies; measuring one twice buys nothing
            schema.copy_measured(trial, twin, self.max_drop)
            return tuple(twin.values)
        policy.calibration = policy_recipes(self.evaluator.model, self.evaluator.calibration, policy)
        schema.record_candidate(trial, policy)
        measurement = self.evaluator.measure(policy, policy.training, seed=self.config.seed,
                                             neighbours=self._neighbours(self._last_origin))
        schema.record_measurement(trial, measurement.to_json())
        if not measurement.feasible:
            schema.record_failure(trial, measurement.reason)
            raise CandidateFailed(measurement.reason)
        schema.record_drop(trial, self.reference_score - measurement.score, self.max_drop)
        return measurement.score, measurement.latency_ms, float(measurement.memory_bytes)

    def _neighbours(self, origin: Origin) -> tuple[float, ...] | None:
        """The latency ratios a candidate's place is decided against: fp32's and the feasible front's.
        None (time to the 3% target) for the uniform policies the cost model is calibrated on."""
        searched = set(self.search_defaults).union(*self.search_choices.values())
        if origin.kind == schema.UNIFORM and origin.format in searched:
            return None
        reference = self.evaluator.reference_latency_ms
        return (1.0, *(t.values[1] / reference for t in self.study.best_trials))

    def _trials(self, *states: optuna.trial.TrialState) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states or None)

    def run(self, trials: int | None, timeout: float | None = None, run_id: str | None = None,
            on_trial: Callable[[], None] | None = None, stop: Callable[[], bool] | None = None) -> SearchResult:
        """Run this invocation's trials: `trials` new ones, or with `run_id` a share of that run's.
        `stop`, asked before each trial: True ends the loop there (a worker whose launcher is gone)."""
        try:
            return self._run(trials, timeout, run_id, on_trial, stop)
        except Exception as exc:
            fault = store_fault(exc)
            if fault is None:
                raise
            if self._trial_id is not None:
                abandon(self.storage, self._trial_id)
            raise fault from None

    def _run(self, trials: int | None, timeout: float | None, run_id: str | None,
             on_trial: Callable[[], None] | None, stop: Callable[[], bool] | None) -> SearchResult:
        fail_stale(self.study, self.storage)
        if run_id is None:  # the launcher of workers retries before it starts them
            retry_interrupted(self.study)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.run_id = run_id or self.ledger.new_run(self.study_name, int(trials or 0))
        bar = _ProgressBar(trials or 0, self.config.progress and run_id is None)
        interrupted = False
        try:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    self.ledger.close_run(self.run_id)
                    break
                if stop is not None and stop():
                    break
                if self.guidance.ready():
                    bar.note("profiling layers")
                    self.guidance.start()
                    if deadline is not None and time.monotonic() >= deadline:
                        continue  # the profile used up the time: close the run at the top
                if not self.ledger.reserve(self.run_id):
                    if self._wait_for_siblings():
                        continue
                    break
                if self.guidance.before_trial():  # nothing unmeasured can beat the front: said, and stopped
                    break
                started = time.perf_counter()
                self.study.optimize(self.objective, n_trials=1, catch=(CandidateFailed,), callbacks=[bar.update],
                                    gc_after_trial=False)
                self._trial_id = None
                phase = self._last_origin.phase
                self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - started
                outcome = self.guidance.after_trial()
                if outcome == STOP:
                    break
                if outcome == MEASURED and on_trial:
                    on_trial()
            if run_id is None:
                self.finish()
        except KeyboardInterrupt:
            interrupted = True
            with _no_second_interrupt():
                self.ledger.close_run(self.run_id)
        finally:
            bar.close()
        return self.result(interrupted)

    def result(self, interrupted: bool) -> SearchResult:
        verdict = schema.verdict_of(self.study)
        return SearchResult(self.study_name, self.storage_url, self.trials_of_run(), self.finished_trials(),
                            interrupted, dict(self.phase_seconds), self.study,
                            verdict=verdict["line"] if verdict else None,
                            skipped=schema.skipped_counts(self.study, self.run_id))

    def trials_of_run(self) -> int:
        return schema.trials_of_run(self._trials(), self.run_id)

    def _wait_for_siblings(self) -> bool:
        """True while another worker of this run has a trial RUNNING (it finishes, or goes stale and
        comes back as a retry this worker can take); False when the run is done."""
        running = [t for t in self._trials(optuna.trial.TrialState.RUNNING)
                   if schema.TrialRecord.of(t).run_id in (self.run_id, None)]
        if not running:
            return False
        time.sleep(1.0)
        fail_stale(self.study, self.storage, running)
        return True

    def finish(self) -> None:
        """After the trials: record the cost model's error, re-time the front beside fp32."""
        skipped = schema.skipped_counts(self.study)
        if skipped:
            self.study.set_user_attr(schema.SKIPPED_ATTR, skipped)
        profile = study_state.stored_profile(self.study)
        if profile is not None:
            model = study_state.calibrated_model(self.study, profile, self.search_choices, self.reference_score)
            study_state.record_model_error(self.study, model, self.reference_score)
            study_state.record_drop_model(self.study, profile, self.reference_score, self.max_drop,
                                    self.search_defaults)
        if self.config.retime_front:
            started = time.perf_counter()
            # a launcher of workers ran no trial itself: the budget is its workers' time
            seconds = sum(self.phase_seconds.values()) or schema.run_seconds(self._trials(), self.run_id)
            retime_front(self.study, self.evaluator, self.max_drop, seconds)
            self.phase_seconds["retime"] = time.perf_counter() - started

    def finished_trials(self) -> int:
        """Trials measured or failed (a skipped proposal, PRUNED, is neither)."""
        return len(self._trials(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL))


class _ProgressBar:
    def __init__(self, total: int, enabled: bool) -> None:
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
        if trial.state == optuna.trial.TrialState.PRUNED:  # a skipped proposal: not a trial run
            self.bar.set_postfix_str(f"#{trial.number} skipped")
            return
        state = trial.state.name.lower()
        self.bar.set_postfix_str(f"last #{trial.number} {state}, best feasible {best:.2f} ms" if best
                                 else f"last #{trial.number} {state}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_search(config: SearchConfig, on_open: Callable[[Search], None] | None = None) -> SearchResult:
    """Open (create or resume) the study and run `config.trials` trials in it: here, or with
    `config.workers` > 1 or `config.devices` in local worker processes. `on_open` sees the opened
    search before the first trial (the CLI prints its summary)."""
    url = storage_url(config.storage)
    if config.workers > 1 and url.startswith("sqlite"):
        raise AutoprecError(f"--workers {config.workers} with SQLite ({shown_url(url)}): SQLite lets one process "
                            "write at a time, so several workers may fail with 'database is locked'; use "
                            "--storage postgresql://USER@HOST/DB for several workers")
    search = Search.open(config)
    if on_open is not None:
        on_open(search)
    if config.workers > 1 or config.devices:
        from autoprec.search.workers import run_workers

        return run_workers(search)
    return search.run(config.trials, config.timeout)
