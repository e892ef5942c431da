"""The search: an Optuna multi-objective study over per-layer formats, in a SQL store.

`run_search(config)` opens the study (autoprec.opening), then runs the trial loop here in this
process, or starts local workers that run it (autoprec.workers). Objectives: score (max),
latency_ms (min), memory_bytes (min). The accuracy constraint is an Optuna constraint
(`score_drop - max_drop`): trials over the drop are kept but infeasible. A candidate that cannot
run is a FAIL trial with its `failure_reason`. What a trial records: autoprec.record.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from autoprec import guide, record
from autoprec.errors import AutoprecError
from autoprec.ledger import worker_name
from autoprec.opening import CLAIM_STALE_S, OpenedStudy, open_study
from autoprec.precision.static_int8 import layout_hint
from autoprec.profile import build_profile
from autoprec.record import DEFAULT_PARAM, LAYER_PARAM, Origin, policy_from_params
from autoprec.recovery import fail_stale, retry_interrupted
from autoprec.retime import FrontMember, plan_retime, retime_budget
from autoprec.sampling import KeepOut
from autoprec.store import storage_url
from autoprec.timing import TimingSettings


class CandidateFailed(Exception):
    """A candidate that could not run; the trial is recorded as FAIL with the reason."""


class _OneLineFailures(logging.Filter):
    """Optuna logs a failed trial with its parameters (every layer) and a traceback; for a candidate
    that could not run, the reason is the news (the trial keeps it, and the measurement any traceback)."""

    def filter(self, rec: logging.LogRecord) -> bool:
        if re.match(r"Trial \d+ failed with value None", str(rec.msg)):  # follows each of those: said already
            return False
        if rec.exc_info and isinstance(rec.exc_info[1], (CandidateFailed, KeyboardInterrupt)):
            number = re.match(r"Trial (\d+)", str(rec.msg))
            what = "interrupted" if isinstance(rec.exc_info[1], KeyboardInterrupt) else f"failed: {rec.exc_info[1]}"
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
    runtime: str | None = None  # eager or compiled (autoprec.runtime); None: the study's, or the device's default
    devices: tuple[str, ...] | None = None  # one worker per device (cuda:0,cuda:1), round robin
    strategy: str = "guided"  # guided (profile + sequential proposals, then TPE), tpe, nsga2, random
    retime_front: bool = True
    prune: bool = True  # leave formats the probe finds far slower than fp32 out of per-layer search
    timing: TimingSettings = field(default_factory=TimingSettings)
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SearchConfig":
        devices = data.get("devices")
        return cls(**{**data, "timing": TimingSettings(**data["timing"]),
                      "devices": tuple(devices) if devices else None})


@dataclass
class SearchResult:
    study_name: str
    storage: str
    trials_run: int
    trials_total: int
    interrupted: bool
    phase_seconds: dict[str, float] = field(default_factory=dict)
    study: optuna.Study | None = None


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
        self.study = optuna.load_study(study_name=self.study_name, storage=self.storage, sampler=self._sampler())

    @classmethod
    def open(cls, config: SearchConfig) -> "Search":
        return cls(open_study(config))

    def summary(self) -> str:
        return (f"study {self.study_name!r} in {self.storage_url} ({self.finished_trials()} trials so far); "
                f"{len(self.choices)} searchable layers on {self.device}, {self.info.runtime} runtime; fp32 score "
                f"{self.reference_score:.6g}, max drop {self.max_drop}")

    def _sampler(self) -> optuna.samplers.BaseSampler:
        seed = self.config.seed
        if self.config.strategy == "nsga2":
            base: optuna.samplers.BaseSampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
        elif self.config.strategy == "random":
            base = optuna.samplers.RandomSampler(seed=seed)
        else:
            base = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8, constant_liar=True)
        if self.pruning is None:
            return base
        # the distributions keep every format (the uniform policies use them); the sampler skips the pruned
        pruned = {LAYER_PARAM + n: set(self.choices[n]) - set(kept) for n, kept in self.search_choices.items()}
        pruned[DEFAULT_PARAM] = set(self.space.default_dtypes) - set(self.search_defaults)
        return KeepOut(base, pruned, seed)

    def objective(self, trial: optuna.Trial) -> tuple[float, float, float]:
        try:
            return self._objective(trial)
        except KeyboardInterrupt:
            with _no_second_interrupt():
                record.record_failure(trial, record.INTERRUPTED)
            raise

    def _objective(self, trial: optuna.Trial) -> tuple[float, float, float]:
        # Beat before anything else: a trial with no heartbeat row never counts as stale.
        self.storage.record_heartbeat(trial._trial_id)
        self._last_origin = record.start_trial(trial, self.run_id, worker_name())
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
            record.copy_measured(trial, twin, self.max_drop)
            return tuple(twin.values)
        record.record_candidate(trial, policy)
        measurement = self.evaluator.measure(policy, policy.training, seed=self.config.seed,
                                             neighbours=self._neighbours(self._last_origin))
        record.record_measurement(trial, measurement.to_json())
        if not measurement.feasible:
            record.record_failure(trial, measurement.reason)
            raise CandidateFailed(measurement.reason)
        record.record_drop(trial, self.reference_score - measurement.score, self.max_drop)
        return measurement.score, measurement.latency_ms, float(measurement.memory_bytes)

    def _neighbours(self, origin: Origin) -> tuple[float, ...] | None:
        """The latency ratios a candidate's place is decided against: fp32's and the feasible front's.
        None (time to the 3% target) for the uniform policies the cost model is calibrated on."""
        searched = set(self.search_defaults).union(*self.search_choices.values())
        if origin.kind == record.UNIFORM and origin.format in searched:
            return None
        reference = self.evaluator.reference_latency_ms
        return (1.0, *(t.values[1] / reference for t in self.study.best_trials))

    def _measured_twin(self, number: int, params: dict[str, Any]) -> optuna.trial.FrozenTrial | None:
        if self.trains:  # a fine-tuned trial's score depends on its training knobs' exact values too
            return None
        for t in self._trials(optuna.trial.TrialState.COMPLETE):
            if t.number != number and t.params == params and record.is_measured(t):
                return t
        return None

    def _trials(self, *states: optuna.trial.TrialState) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)

    def _ready_to_guide(self) -> bool:
        if self.config.strategy != "guided" or record.PROPOSALS_ATTR in self.study.user_attrs:
            return False
        if self._trials(optuna.trial.TrialState.WAITING):
            return False
        running = self._trials(optuna.trial.TrialState.RUNNING)
        return not any(record.TrialRecord.of(t).origin.kind == record.UNIFORM for t in running)

    def guide(self) -> int:
        """Profile (once per study), then the first sequential proposal (autoprec.planner)."""
        if not self.ledger.claim(self.study_name, "profile", stale_s=CLAIM_STALE_S):
            return 0  # another worker is on it; this one keeps sampling meanwhile
        try:
            started = time.perf_counter()
            profile = guide.stored_profile(self.study)
            reused = None if profile is not None else guide.sibling_profile(self.storage, self.study_name, self.info)
            if reused is not None:
                profile, source = reused
                profile.reference_latency_ms = self.evaluator.reference_latency_ms  # its layers in this study's terms
                self.study.set_user_attr(record.PROFILE_ATTR, profile.to_json())
                self.study.set_user_attr(record.PROFILE_SOURCE_ATTR, source)
            if profile is None:
                profile = build_profile(self.spec, self.evaluator.model, self.evaluator.example,
                                        self.search_choices, self.search_defaults, self.device,
                                        runtime=self.info.runtime,
                                        # compiled: timing the reference would compile it again after the
                                        # layers' resets; its profile keeps the layers' own times
                                        time_model=self.evaluator.reference_solo_ms if self.info.runtime == "eager"
                                        else None)
                profile.reference_latency_ms = self.evaluator.reference_latency_ms
                self.study.set_user_attr(record.PROFILE_ATTR, profile.to_json())
            self.phase_seconds["profile"] = time.perf_counter() - started
            self.study.set_user_attr(record.PROPOSALS_ATTR, [])  # from here on, proposals come one at a time
            count = self._propose()
        except BaseException:
            self.ledger.drop_claim(self.study_name, "profile")
            raise
        self.ledger.finish_claim(self.study_name, "profile")
        return count

    def _propose(self) -> int:
        """Enqueue the planner's next proposal, planned on every trial so far, when none is waiting: one
        at a time (measure, refit, re-plan). 0 once the planner has nothing left: the sampler goes on."""
        if self._trials(optuna.trial.TrialState.WAITING):
            return 0
        profile = guide.stored_profile(self.study)
        if profile is None:
            return 0
        proposal = guide.next_sequential(self.study, profile, self.search_choices, self.reference_score, self.max_drop,
                                         self.search_defaults)
        if proposal is None:
            return 0
        planned = list(self.study.user_attrs.get(record.PROPOSALS_ATTR) or [])
        planned.append({"default": proposal.default, "why": proposal.why, "predicted": proposal.predicted})
        self.study.set_user_attr(record.PROPOSALS_ATTR, planned)
        return 1

    def _guiding(self) -> bool:
        return self.config.strategy == "guided" and record.PROPOSALS_ATTR in self.study.user_attrs

    def run(self, trials: int | None, timeout: float | None = None, run_id: str | None = None,
            on_trial: Callable[[], None] | None = None) -> SearchResult:
        """Run this invocation's trials: `trials` new ones, or with `run_id` a share of that run's."""
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
                if self._ready_to_guide():
                    bar.note("profiling layers")
                    self.guide()
                    if deadline is not None and time.monotonic() >= deadline:
                        continue  # the profile used up the time: close the run at the top
                if not self.ledger.reserve(self.run_id):
                    if self._wait_for_siblings():
                        continue
                    break
                if self._guiding():
                    self._propose()  # planned on everything measured so far, just before it is measured
                started = time.perf_counter()
                self.study.optimize(self.objective, n_trials=1, catch=(CandidateFailed,), callbacks=[bar.update],
                                    gc_after_trial=False)
                phase = self._last_origin.phase
                self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - started
                if on_trial:
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
        return SearchResult(self.study_name, self.storage_url, self.trials_of_run(), self.finished_trials(),
                            interrupted, dict(self.phase_seconds), self.study)

    def trials_of_run(self) -> int:
        """Trials this run (all its workers) finished: not other runs' trials, not attempts that were
        retried, not interrupted ones."""
        trials = self.study.get_trials(deepcopy=False)
        retried = record.retried_numbers(trials)
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        return sum(1 for t in trials if t.state in done and t.number not in retried
                   and t.user_attrs.get(record.TrialKey.RUN_ID) == self.run_id
                   and t.user_attrs.get(record.TrialKey.FAILURE_REASON) != record.INTERRUPTED)

    def _wait_for_siblings(self) -> bool:
        """True while another worker of this run has a trial RUNNING (it finishes, or goes stale and
        comes back as a retry this worker can take); False when the run is done."""
        running = [t for t in self._trials(optuna.trial.TrialState.RUNNING)
                   if record.TrialRecord.of(t).run_id in (self.run_id, None)]
        if not running:
            return False
        time.sleep(1.0)
        fail_stale(self.study, self.storage, running)
        return True

    def finish(self) -> None:
        """After the trials: record the cost model's error, re-time the front beside fp32."""
        profile = guide.stored_profile(self.study)
        if profile is not None:
            model = guide.calibrated_model(self.study, profile, self.search_choices, self.reference_score)
            guide.record_model_error(self.study, model, self.reference_score)
            guide.record_drop_model(self.study, profile, self.reference_score, self.max_drop,
                                    self.search_defaults)
        if self.config.retime_front:
            started = time.perf_counter()
            self.retime_front()
            self.phase_seconds["retime"] = time.perf_counter() - started

    def retime_front(self) -> dict[str, Any]:
        """Re-time the front beside the fp32 model in one pass, so their ratios compare: the members a
        user picks from first (fastest, smallest, ...), within a share of this run's time
        (autoprec.retime); the rest are recorded as not re-timed."""
        from autoprec.results import pareto_front, trials_frame

        front = pareto_front(trials_frame(self.study))
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        members = [FrontMember(int(r.trial), float(r.score_drop), float(r.latency_ms), float(r.memory_bytes),
                               _timing_cost(record.TrialRecord.of(by_number[int(r.trial)])))
                   for r in front.itertuples()]
        plan = plan_retime(members, self.max_drop, retime_budget(sum(self.phase_seconds.values())))
        reference = self.evaluator.reference_latency_ms
        ratios = {m.trial: m.latency_ms / reference for m in members}
        timings = {}
        for number in plan.retime:
            # placed against fp32 and the other members: a member far from all of them settles early
            neighbours = (1.0, *(r for n, r in ratios.items() if n != number))
            timing = self.evaluator.retime(policy_from_params(by_number[number].params), neighbours)
            if timing is not None:
                timings[str(number)] = {"latency_ms": timing.ratio * reference, "ratio": timing.ratio,
                                        "spread": timing.ratio_spread, "lo": timing.ratio_lo, "hi": timing.ratio_hi,
                                        "rounds": timing.rounds}
        # a member this pass left out keeps the re-timing an earlier pass gave it (a short resume has a
        # small budget; its earlier side-by-side ratio is still the better number than none)
        earlier = record.retimed(self.study)
        kept = {str(n): {**earlier[str(n)], "earlier": True} for n in plan.not_retimed if str(n) in earlier}
        return record.write_retimed(self.study, time.strftime("%Y-%m-%dT%H:%M:%S%z"), {**kept, **timings},
                                    [n for n in plan.not_retimed if str(n) not in kept], plan.budget_s)

    def finished_trials(self) -> int:
        return len(self._trials(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                optuna.trial.TrialState.PRUNED))


def _timing_cost(trial: record.TrialRecord) -> float:
    """Seconds its timing took when it was measured (estimated for trials from before that was kept)."""
    m = trial.measurement
    if m.get("latency_seconds"):
        return float(m["latency_seconds"])
    return 2 * (m.get("latency_runs") or 0) * (m.get("candidate_ms") or 0) / 1000


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
        raise AutoprecError(f"--workers {config.workers} with SQLite ({url}): SQLite lets one process write at a "
                            "time, so several workers may fail with 'database is locked'; use "
                            "--storage postgresql://USER@HOST/DB for several workers")
    search = Search.open(config)
    if on_open is not None:
        on_open(search)
    if config.workers > 1 or config.devices:
        from autoprec.workers import run_workers

        return run_workers(search)
    return search.run(config.trials, config.timeout)
