"""The study store: Optuna's RDB storage (SQLite by default, PostgreSQL for many workers).

What autoprec keeps, all as JSON so optuna-dashboard shows it:
- on the study (user attr "autoprec"): model path/class/fingerprint, the space, the device and
  environment, the fp32 reference measurement, max_drop, the searchable layers.
- on each trial: user attrs "policy" (the policy document), "measurement" (score, latency details,
  memory, methods), "failure_reason" for a candidate that could not run.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from autoprec.errors import StoreError
from autoprec.ledger import Ledger

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

DEFAULT_STORAGE = "sqlite:///autoprec.db"
STUDY_ATTR = "autoprec"
HEARTBEAT_S = int(os.environ.get("AUTOPREC_HEARTBEAT_S", "10"))
GRACE_S = int(os.environ.get("AUTOPREC_GRACE_S", str(3 * HEARTBEAT_S)))


def storage_url(url: str | None) -> str:
    return url or os.environ.get("AUTOPREC_STORAGE") or DEFAULT_STORAGE


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True, "pool_recycle": 300}


class RetryAndRelease:
    """Heartbeat-stale trial: fail it, enqueue its retry, and give its run's reservation back."""

    def __init__(self) -> None:
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
        self.ledger: Ledger | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # The retry is a fresh attempt: it must not inherit the dead attempt's constraint (Optuna
        # would then ignore the retry's own) nor its measurement.
        fresh = copy.deepcopy(trial)
        fresh.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("constraints")}
        fresh.user_attrs = {k: v for k, v in trial.user_attrs.items() if k == "origin"}
        self.retry(study, fresh)
        run_id = trial.user_attrs.get("run_id")
        if self.ledger is not None and run_id:
            self.ledger.release(run_id)


def open_storage(url: str | None = None, *, heartbeat: bool = True) -> RDBStorage:
    """Open (creating its tables if needed) the store; one line of error when it cannot be reached.

    With `heartbeat`, running trials beat every HEARTBEAT_S seconds and a trial silent for GRACE_S is
    failed and retried; the storage's `ledger` attribute is autoprec's Ledger on the same database.
    """
    url = storage_url(url)
    callback = RetryAndRelease() if heartbeat else None
    try:
        storage = RDBStorage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=HEARTBEAT_S if heartbeat else None,
            grace_period=GRACE_S if heartbeat else None,
            heartbeat_stale_trial_callback=callback,
        )
        if url.startswith("sqlite"):
            with storage.engine.connect() as conn:  # WAL: readers never block the writer
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        ledger = Ledger(storage.engine)
    except StoreError:
        raise
    except Exception as exc:  # SQLAlchemy and drivers raise many kinds; all mean "cannot use this store"
        text = str(getattr(exc, "orig", None) or exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise StoreError(f"cannot open the study store {url!r}: {first}; check --storage / AUTOPREC_STORAGE") from None
    if callback is not None:
        callback.ledger = ledger
    storage.ledger = ledger  # type: ignore[attr-defined]
    return storage


def study_names(storage: RDBStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load_study(storage: RDBStorage, name: str) -> optuna.Study:
    if name not in study_names(storage):
        known = ", ".join(study_names(storage)) or "none"
        raise StoreError(f"no study named {name!r} in the store (studies: {known}); see `autoprec studies`")
    return optuna.load_study(study_name=name, storage=storage)


def study_info(study: optuna.Study) -> dict[str, Any]:
    info = study.user_attrs.get(STUDY_ATTR)
    if not isinstance(info, dict):
        raise StoreError(f"study {study.study_name!r} was not made by `autoprec search` (no {STUDY_ATTR!r} attribute)")
    return info
