"""Stale and interrupted trials: failed with their reason, retried, the reservation given back.

A running trial beats every HEARTBEAT_S seconds (Optuna's heartbeat); one silent for GRACE_S is
failed by whoever looks next (`fail_stale`), and `RetryAndRelease` enqueues its retry and gives
its run's reservation back to the ledger, so a surviving worker of the same run runs the retry.
A worker killed before its first beat leaves a trial Optuna never sees as stale; `fail_stale`
fails those too once they are older than twice the grace period. A trial stopped by Ctrl-C is
failed as "interrupted" by its own process; `retry_interrupted` enqueues its retry when the
study is next run, so every uniform policy is measured once a study resumes.
"""

from __future__ import annotations

import copy
import datetime
import os
import warnings

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


def fail_stale(study: optuna.Study, storage: RDBStorage, running: list[optuna.trial.FrozenTrial] | None = None) -> None:
    """Fail (and retry) the trials whose worker stopped beating, and those that never beat at all
    (what Optuna's fail_stale_trials does, with the reason recorded on the trial)."""
    if storage.get_heartbeat_interval() is None:
        return
    if running is None:
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    limit = datetime.datetime.now() - datetime.timedelta(seconds=2 * GRACE_S + 5)
    stale = set(storage._get_stale_trial_ids(study._study_id))
    stale |= {t._trial_id for t in running
              if t.datetime_start and t.datetime_start < limit and _never_beat(storage, t)}
    failed = [trial_id for trial_id in sorted(stale) if _fail(storage, trial_id, schema.STALE)]
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in failed:
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))


def retry_interrupted(study: optuna.Study) -> int:
    """Enqueue a retry of every interrupted trial not retried yet (at most 3 times per trial)."""
    trials = study.get_trials(deepcopy=False)
    retried = schema.retried_numbers(trials)
    count = 0
    for t in trials:
        r = schema.TrialRecord.of(t)
        stopped = r.failure_reason == schema.INTERRUPTED or (r.failure_reason is None and not r.measurement)
        if t.state == optuna.trial.TrialState.FAIL and t.number not in retried and stopped:
            RetryAndRelease()(study, t)  # no ledger: the interrupted run is closed
            count += 1
    return count
