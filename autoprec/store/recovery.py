"""Stale and interrupted trials: failed with their reason, retried, the reservation given back.

A running trial beats every HEARTBEAT_S seconds (Optuna's heartbeat); one silent for GRACE_S is
failed by whoever looks next (`fail_stale`), and `RetryAndRelease` enqueues its retry and gives
its run's reservation back to the ledger, so a surviving worker of the same run runs the retry.
A worker killed before its first beat leaves a trial Optuna never sees as stale; `fail_stale`
fails those too once they are older than twice the grace period. A trial stopped by Ctrl-C is
failed as "interrupted" by its own process; `retry_interrupted` enqueues its retry when the
study is next run, so every uniform policy is measured once a study resumes.

A trial records its owner process (`process_identity`): one whose owner is gone on this host
(kill -9, a crash) is failed and retried at once, not after the grace; only a worker on another
host needs the heartbeat. `RetriesFirst` runs every retry before the other WAITING trials.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from autoprec.store import schema
from autoprec.store.worker_tables import Ledger

HEARTBEAT_S = int(os.environ.get("AUTOPREC_HEARTBEAT_S", "10"))
GRACE_S = int(os.environ.get("AUTOPREC_GRACE_S", str(3 * HEARTBEAT_S)))


class RetryAndRelease:
    """Heartbeat-stale trial: fail it, enqueue its retry, and give its run's reservation back."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
        self.ledger: Ledger | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # The retry is a fresh attempt: it must not inherit the dead attempt's constraint (Optuna
        # would then ignore the retry's own) nor its measurement.
        fresh = copy.deepcopy(trial)
        fresh.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("constraints")}
        fresh.user_attrs = schema.retry_attrs(trial)
        self.retry(study, fresh)
        run_id = trial.user_attrs.get(schema.TrialKey.RUN_ID)
        if self.ledger is not None and run_id:
            self.ledger.release(run_id)


def _never_beat(storage: RDBStorage, trial: optuna.trial.FrozenTrial) -> bool:
    from optuna.storages._rdb import models

    session = storage.scoped_session()
    try:
        return models.TrialHeartbeatModel.where_trial_id(trial._trial_id, session) is None
    finally:
        session.close()


def _fail(storage: RDBStorage, trial_id: int, reason: str) -> bool:
    """Fail a running trial with `reason`; False when another process finished it first."""
    try:
        storage.set_trial_user_attr(trial_id, schema.TrialKey.FAILURE_REASON, reason)
        return storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of a process, from /proc/PID/stat; None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5), after the parenthesised name
    except (OSError, IndexError, ValueError):
        return None


def process_identity() -> dict[str, Any]:
    """This process as a trial's owner: host, pid, pid namespace (containers on one host share pid
    numbers) and start time (a reused pid is another process)."""
    stat = _stat(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
            "started": stat[1] if stat else None}


def owner_gone(owner: Any) -> bool:
    """True when `owner` (a trial's `process_identity`) ran on this host and that process is gone:
    no such pid, a zombie, or another process under its pid. False wherever that cannot be known."""
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if owner.get("pid_namespace") != _pid_namespace() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    stat = _stat(pid)
    if stat is None:
        return False
    state, started = stat
    return state in ("Z", "X") or (isinstance(owner.get("started"), int) and started != owner["started"])


def fail_stale(study: optuna.Study, storage: RDBStorage, running: list[optuna.trial.FrozenTrial] | None = None) -> None:
    """Fail (and retry) the trials whose owner process is gone on this host, those whose worker
    stopped beating, and those that never beat at all (what Optuna's fail_stale_trials does, with
    the reason recorded on the trial)."""
    if storage.get_heartbeat_interval() is None:
        return
    if running is None:
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    limit = datetime.datetime.now() - datetime.timedelta(seconds=2 * GRACE_S + 5)
    gone = {t._trial_id for t in running if owner_gone(t.user_attrs.get(schema.TrialKey.OWNER))}
    stale = set(storage._get_stale_trial_ids(study._study_id)) - gone
    stale |= {t._trial_id for t in running if t._trial_id not in gone
              and t.datetime_start and t.datetime_start < limit and _never_beat(storage, t)}
    failed = [trial_id for trial_id in sorted(gone) if _fail(storage, trial_id, schema.OWNER_GONE)]
    failed += [trial_id for trial_id in sorted(stale) if _fail(storage, trial_id, schema.STALE)]
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in failed:
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))


class RetriesFirst(optuna.Study):
    """A study whose next trial is a WAITING retry of a failed trial, if any, before the other
    WAITING trials. Optuna pops WAITING trials in number order, so a retry enqueued when a study
    resumes would come after every uniform policy queued at its creation, and a short resume would
    not measure it at all. (Optuna's one hook for the order is this method of its Study.)"""

    def _pop_waiting_trial_id(self) -> int | None:
        waiting = self._storage.get_all_trials(self._study_id, deepcopy=False,
                                               states=(optuna.trial.TrialState.WAITING,))
        for trial in sorted(waiting, key=lambda t: ("failed_trial" not in t.system_attrs, t.number)):
            try:  # False, or UpdateFinishedTrialError: another process took it first
                if self._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.RUNNING):
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None


if not hasattr(optuna.Study, "_pop_waiting_trial_id"):  # the override would be dead code
    warnings.warn("this Optuna pops WAITING trials another way: retries may run after queued trials", stacklevel=1)


def abandon(storage: RDBStorage, trial_id: int) -> None:
    """The store failed under this process's trial: fail it for the next run to retry, if the store
    still takes that (if not, it stays RUNNING until a run on this host sees its process gone, or the
    heartbeat grace passes)."""
    try:
        if storage.get_trial(trial_id).state == optuna.trial.TrialState.RUNNING:
            _fail(storage, trial_id, schema.STORE_FAILED)
    except Exception:  # the store is failing: the owner check or the heartbeat recovers the trial
        pass


def retry_interrupted(study: optuna.Study) -> int:
    """Enqueue a retry of every interrupted trial (Ctrl-C, or the store failing under it) not retried
    yet (at most 3 times per trial)."""
    trials = study.get_trials(deepcopy=False)
    retried = schema.retried_numbers(trials)
    count = 0
    for t in trials:
        r = schema.TrialRecord.of(t)
        stopped = (r.failure_reason in (schema.INTERRUPTED, schema.STORE_FAILED)
                   or (r.failure_reason is None and not r.measurement))
        if t.state == optuna.trial.TrialState.FAIL and t.number not in retried and stopped:
            RetryAndRelease()(study, t)  # no ledger: the interrupted run is closed
            count += 1
    return count
