"""Stale trials: a trial whose worker died is failed, retried, and its reservation given back.

A running trial beats every HEARTBEAT_S seconds (Optuna's heartbeat); one silent for GRACE_S is
failed by whoever looks next (`fail_stale`), and `RetryAndRelease` enqueues its retry and gives
its run's reservation back to the ledger, so a surviving worker of the same run runs the retry.
A worker killed before its first beat leaves a trial Optuna never sees as stale; `fail_stale`
fails those too once they are older than twice the grace period.
"""

from __future__ import annotations

import copy
import datetime
import os
import warnings

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from autoprec import record
from autoprec.ledger import Ledger

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
        fresh.user_attrs = record.retry_attrs(trial)
        self.retry(study, fresh)
        run_id = trial.user_attrs.get(record.TrialKey.RUN_ID)
        if self.ledger is not None and run_id:
            self.ledger.release(run_id)


def _never_beat(storage: RDBStorage, trial: optuna.trial.FrozenTrial) -> bool:
    from optuna.storages._rdb import models

    session = storage.scoped_session()
    try:
        return models.TrialHeartbeatModel.where_trial_id(trial._trial_id, session) is None
    finally:
        session.close()


def fail_stale(study: optuna.Study, storage: RDBStorage, running: list[optuna.trial.FrozenTrial] | None = None) -> None:
    """Fail (and retry) the trials whose worker stopped beating, and those that never beat at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if running is None:
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    limit = datetime.datetime.now() - datetime.timedelta(seconds=2 * GRACE_S + 5)
    for t in running:
        if t.datetime_start and t.datetime_start < limit and _never_beat(storage, t):
            try:
                storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            except Exception:  # another worker failed it first
                continue
            storage.heartbeat_stale_trial_callback(study, study.trials[t.number])
