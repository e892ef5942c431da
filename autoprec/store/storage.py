"""The study store: Optuna's RDB storage (SQLite by default, PostgreSQL for many workers), opened
with autoprec's ledger tables beside it. What a study holds is autoprec.store.schema's contract.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import optuna
from optuna.storages import RDBStorage
from sqlalchemy.engine import make_url

from autoprec.errors import StoreError, StoreFault
from autoprec.store.readable import ReadableStorage
from autoprec.store.worker_tables import Ledger
from autoprec.store.recovery import GRACE_S, HEARTBEAT_S, RetryAndRelease

try:
    import fcntl
except ImportError:  # not POSIX: no lock, as before
    fcntl = None  # type: ignore[assignment]

DEFAULT_STORAGE = "sqlite:///autoprec.db"
# A server store that does not answer fails within these bounds, with one line (README.md, "The user's path").
CONNECT_TIMEOUT_S = int(os.environ.get("AUTOPREC_STORE_TIMEOUT_S", "10"))
STATEMENT_TIMEOUT_S = int(os.environ.get("AUTOPREC_STATEMENT_TIMEOUT_S", "60"))
SQLITE_BUSY_TIMEOUT_S = 60


def storage_url(url: str | None) -> str:
    return url or os.environ.get("AUTOPREC_STORAGE") or DEFAULT_STORAGE


def shown_url(url: str) -> str:
    """The store's URL to print or log: its password masked (`postgresql://user:***@host/db`)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: mask anything between "user:" and "@" anyway
        return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def without_password(text: str, url: str) -> str:
    """`text` (a driver's error, say) with the store URL's password masked wherever it appears."""
    text = text.replace(url, shown_url(url))
    try:
        password = make_url(url).password
    except Exception:
        password = None
    return text.replace(str(password), "***") if password and len(str(password)) >= 3 else text


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_recycle": 300}
    if url.startswith("postgresql"):
        # the URL's own `options` (a server setting such as its own statement_timeout) come after
        # autoprec's default, so they win: connect_args would otherwise replace them
        own = make_url(url).query.get("options")
        own = " ".join(own) if isinstance(own, tuple) else own
        options = f"-c statement_timeout={1000 * STATEMENT_TIMEOUT_S}" + (f" {own}" if own else "")
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S, "options": options}
    elif url.startswith("mysql"):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": STATEMENT_TIMEOUT_S}
    return kwargs


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other stores and in-memory databases)."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).absolute()


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _read_only_url(path: Path) -> str:
    """A URL that opens `path` without writing to it or beside it (no journal-mode switch, no tables).
    In a folder nobody can write, a WAL store without a -wal file is read as immutable: SQLite could
    not create its -shm file there."""
    immutable = not os.access(path.parent, os.W_OK) and not Path(f"{path}-wal").exists()
    return f"sqlite:///file:{quote(str(path))}?mode=ro{'&immutable=1' if immutable else ''}&uri=true"


@contextlib.contextmanager
def _creation_lock(path: Path | None) -> Iterator[None]:
    """Serialise opening (and so creating) one SQLite store among processes: Optuna's table creation
    and its schema stamp race when two processes open a new file at once. The lock is on the
    store's folder, so no lock file is left behind."""
    if path is None or fcntl is None or not path.parent.is_dir():
        yield
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_storage(url: str | None = None, *, heartbeat: bool = True, readonly: bool = False) -> RDBStorage:
    """Open (creating its tables if needed) the store; one line of error when it cannot be reached.

    With `heartbeat`, running trials beat every HEARTBEAT_S seconds and a trial silent for GRACE_S is
    failed and retried; the storage's `ledger` attribute is autoprec's Ledger on the same database.
    With `readonly` (the commands that only read), nothing is created or written: a SQLite file is
    opened read-only, it must exist, and there is no ledger.
    """
    url = storage_url(url)
    path = sqlite_file(url)
    if path is not None and readonly and not path.is_file():
        raise StoreError(f"no study store at {str(path)!r} ({shown_url(url)}); run `autoprec search` first, "
                         "or pass --storage")
    if path is not None and not readonly and path.exists() and not _writable(path):
        where = path if not os.access(path, os.W_OK) else path.parent
        raise StoreError(f"the study store {str(path)!r} cannot be written ({where} is read-only); a search writes "
                         "to it: make it writable or pass another --storage (reading commands work as they are)")
    heartbeat = heartbeat and not readonly
    callback = RetryAndRelease() if heartbeat else None
    try:
        with warnings.catch_warnings(), _creation_lock(None if readonly else path):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat is, in Optuna 4
            # the reading commands skip what a hand-damaged store cannot decode (readable.py)
            storage = (ReadableStorage if readonly else RDBStorage)(
                _read_only_url(path) if readonly and path is not None else url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=HEARTBEAT_S if heartbeat else None,
                grace_period=GRACE_S if heartbeat else None,
                heartbeat_stale_trial_callback=callback,
            )
            if path is not None and not readonly:
                with storage.engine.connect() as conn:  # WAL: readers never block the writer
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            ledger = None if readonly else Ledger(storage.engine)
    except StoreError:
        raise
    except Exception as exc:  # SQLAlchemy and drivers raise many kinds; all mean "cannot use this store"
        first = without_password(_first_line(_database_error(exc) or exc), url)
        if _statement_timeout(exc):  # it answers, then gives up: the server is at fault, not the URL
            raise StoreFault(f"the study store {shown_url(url)!r} cancelled a statement while opening: {first}; raise "
                             "the server's statement_timeout (or the one in the URL's options)") from None
        raise StoreError(f"cannot open the study store {shown_url(url)!r}: {first}; "
                         "check --storage / AUTOPREC_STORAGE") from None
    if callback is not None:
        callback.ledger = ledger
    storage.ledger = ledger  # type: ignore[attr-defined]
    return storage


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _database_error(exc: BaseException) -> BaseException | None:
    """The database's own error behind `exc` (the driver's, else SQLAlchemy's), None when there is none.
    Optuna re-raises a failed commit as StorageInternalError with a guess ("exceeding max length");
    a failure while it handles that one surfaces as an UnboundLocalError: both are chained to it."""
    from sqlalchemy.exc import SQLAlchemyError

    found = [getattr(link, "orig", None) or link for link in _chain(exc) if isinstance(link, SQLAlchemyError)]
    # the cause, not what followed it (after a cancelled statement: "current transaction is aborted")
    cancelled = [e for e in found if _cancelled(e)]
    return (cancelled or found or [None])[0]


def _cancelled(error: BaseException) -> bool:
    """Whether the server cancelled a statement (PostgreSQL's SQLSTATE 57014: a statement timeout)."""
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    return code == "57014" or "statement timeout" in str(error)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _statement_timeout(exc: BaseException) -> bool:
    found = _database_error(exc)
    return found is not None and _cancelled(found)


def store_fault(exc: BaseException) -> StoreFault | None:
    """The store's failure behind `exc`, as one line (exit 1: the store is at fault); None when `exc`
    does not come from the database."""
    if isinstance(exc, StoreFault):
        return exc
    found = _database_error(exc)
    if found is None:
        return None
    return StoreFault(f"the study store failed: {_first_line(found)}; the trials finished so far are kept, and a "
                      "trial it cut short is retried by the next run; check the server (its statement_timeout, "
                      "its connections) or --storage / AUTOPREC_STORAGE")


def discard_if_unused(storage: RDBStorage, path: Path) -> None:
    """Remove the SQLite store at `path` (this process created it) when nothing was written to it: a
    search that stopped at bad input leaves no store behind, as if it had never started."""
    try:
        if study_names(storage) or not storage.ledger.unused():  # type: ignore[attr-defined]
            return
    except Exception:  # an unreadable store is not ours to remove
        return
    storage.engine.dispose()
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)


def study_names(storage: RDBStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load_study(storage: RDBStorage, name: str) -> optuna.Study:
    if name not in study_names(storage):
        known = ", ".join(study_names(storage)) or "none"
        raise StoreError(f"no study named {name!r} in the store (studies: {known}); see `autoprec studies`")
    return optuna.load_study(study_name=name, storage=storage)
