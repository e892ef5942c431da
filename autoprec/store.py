"""The study store: Optuna's RDB storage (SQLite by default, PostgreSQL for many workers), opened
with autoprec's ledger tables beside it. What a study holds is autoprec.record's contract.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import optuna
from optuna.storages import RDBStorage

from autoprec.errors import StoreError
from autoprec.ledger import Ledger
from autoprec.recovery import GRACE_S, HEARTBEAT_S, RetryAndRelease

DEFAULT_STORAGE = "sqlite:///autoprec.db"


def storage_url(url: str | None) -> str:
    return url or os.environ.get("AUTOPREC_STORAGE") or DEFAULT_STORAGE


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True, "pool_recycle": 300}


def open_storage(url: str | None = None, *, heartbeat: bool = True) -> RDBStorage:
    """Open (creating its tables if needed) the store; one line of error when it cannot be reached.

    With `heartbeat`, running trials beat every HEARTBEAT_S seconds and a trial silent for GRACE_S is
    failed and retried; the storage's `ledger` attribute is autoprec's Ledger on the same database.
    """
    url = storage_url(url)
    callback = RetryAndRelease() if heartbeat else None
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 4
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
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
