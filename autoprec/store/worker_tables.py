"""Two small tables beside Optuna's in the study store, so several workers agree without a queue.

- `autoprec_runs`: one row per `autoprec search` invocation (its workers share it): how many trials
  it asked for (`quota`) and how many its workers have started (`reserved`). A worker reserves one
  trial with an atomic conditional UPDATE before each trial, so N workers run exactly `quota`
  trials between them. A trial whose worker died (heartbeat gone stale) gives its reservation
  back, so a surviving worker of the same run runs the retried trial.
- `autoprec_claims`: one row per once-per-study job (the fp32 reference, the sensitivity profile):
  the first worker to INSERT it does the job; the others use the result from the study. A claim
  whose owner stopped heartbeating for `stale_s` can be taken over.

- `autoprec_ops`: one row per counter change (reserve, release), written in the same transaction
  as the change, so that a retry after a connection dropped between the commit and its
  acknowledgement finds its row and does not count twice.

The trials themselves stay Optuna's (RDB storage); these rows only count and claim.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from autoprec.errors import StoreFault

T = TypeVar("T")
_metadata = sa.MetaData()
runs = sa.Table(
    "autoprec_runs", _metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("study_name", sa.String(512), nullable=False),
    sa.Column("quota", sa.Integer, nullable=False),
    sa.Column("reserved", sa.Integer, nullable=False, default=0),
    sa.Column("created", sa.Float, nullable=False),
)
claims = sa.Table(
    "autoprec_claims", _metadata,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("job", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("beat", sa.Float, nullable=False),
    sa.Column("done", sa.Boolean, nullable=False, default=False),
)

ops = sa.Table(
    "autoprec_ops", _metadata,
    sa.Column("op_id", sa.String(64), primary_key=True),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# A claim's owner must name this process alone: containers often share a host name and pid numbers.
_PROCESS_TOKEN = uuid.uuid4().hex[:12]


def _claim_owner() -> str:
    return f"{worker_name()}:{_PROCESS_TOKEN}"


def with_retry(action: Callable[[], T], what: str, attempts: int = 6) -> T:
    """Retry a store operation through a dropped connection, backing off 0.5, 1, 2, 4, 8 s."""
    for attempt in range(attempts):
        try:
            return action()
        except OperationalError as exc:
            if attempt == attempts - 1:
                first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                raise StoreFault(f"the study store stayed unreachable while {what}: {first}") from None
            time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


class Ledger:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        with_retry(lambda: _metadata.create_all(engine), "creating autoprec's tables")

    def new_run(self, study: str, quota: int) -> str:
        run_id = uuid.uuid4().hex

        def insert() -> None:
            try:
                with self.engine.begin() as conn:
                    conn.execute(runs.insert().values(run_id=run_id, study_name=study, quota=quota, reserved=0,
                                                      created=time.time()))
            except IntegrityError:  # an earlier attempt committed before its connection dropped
                with self.engine.connect() as conn:
                    if conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run_id)).first() is None:
                        raise
        with_retry(insert, "registering this run")
        return run_id

    def _counted_once(self, run_id: str, change: sa.Update) -> Callable[[], bool]:
        """An action for with_retry: apply `change` to the run's row once, however often retried."""
        op_id = uuid.uuid4().hex

        def action() -> bool:
            with self.engine.begin() as conn:
                if conn.execute(sa.select(ops.c.op_id).where(ops.c.op_id == op_id)).first() is not None:
                    return True
                if conn.execute(change).rowcount != 1:
                    return False
                conn.execute(ops.insert().values(op_id=op_id, run_id=run_id, created=time.time()))
                return True
        return action

    def reserve(self, run_id: str) -> bool:
        change = (runs.update().where(runs.c.run_id == run_id, runs.c.reserved < runs.c.quota)
                  .values(reserved=runs.c.reserved + 1))
        return with_retry(self._counted_once(run_id, change), "reserving a trial")

    def release(self, run_id: str) -> None:
        change = (runs.update().where(runs.c.run_id == run_id, runs.c.reserved > 0)
                  .values(reserved=runs.c.reserved - 1))
        with_retry(self._counted_once(run_id, change), "giving back a trial")

    def counts(self, run_id: str) -> tuple[int, int]:
        """(reserved, quota) of a run."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs.c.reserved, runs.c.quota).where(runs.c.run_id == run_id)).one()
        return int(row.reserved), int(row.quota)

    def close_run(self, run_id: str) -> None:
        """No more trials for this run (timeout or interrupt): its workers stop after their current one."""
        def update() -> None:
            with self.engine.begin() as conn:
                conn.execute(runs.update().where(runs.c.run_id == run_id).values(quota=runs.c.reserved))
        with_retry(update, "closing this run")

    def claim(self, study: str, job: str, stale_s: float) -> bool:
        """True when this worker now owns `job` for `study` (first come, or the owner went silent)."""
        owner, now = _claim_owner(), time.time()

        def attempt() -> bool:
            try:
                with self.engine.begin() as conn:
                    conn.execute(claims.insert().values(study_name=study, job=job, owner=owner, beat=now, done=False))
                return True
            except IntegrityError:
                with self.engine.begin() as conn:
                    result = conn.execute(claims.update().where(
                        claims.c.study_name == study, claims.c.job == job, claims.c.done.is_(False),
                        sa.or_(claims.c.beat < now - stale_s, claims.c.owner == owner)).values(owner=owner, beat=now))
                    # owner == this process: an earlier attempt's insert committed before its connection dropped
                    return result.rowcount == 1
        return with_retry(attempt, f"claiming the {job}")

    def finish_claim(self, study: str, job: str) -> None:
        def update() -> None:
            with self.engine.begin() as conn:
                conn.execute(claims.update().where(claims.c.study_name == study, claims.c.job == job)
                             .values(done=True, beat=time.time()))
        with_retry(update, f"recording the {job}")

    def unused(self) -> bool:
        """Nothing recorded: no run, no claim (a store only created, never worked in)."""
        with self.engine.connect() as conn:
            return all(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0
                       for table in (runs, claims))

    def drop_claim(self, study: str, job: str) -> None:
        """Give a claim back after a failure, so the next worker or run can try again."""
        def delete() -> None:
            with self.engine.begin() as conn:
                conn.execute(claims.delete().where(claims.c.study_name == study, claims.c.job == job,
                                                   claims.c.done.is_(False)))
        with_retry(delete, f"giving back the {job}")
