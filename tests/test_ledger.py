"""The ledger's counters and claims survive a connection that drops right after a commit."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from autoprec.store import worker_tables as ledger_module
from autoprec.store.worker_tables import Ledger


class DropsAfterCommit:
    """An engine whose next `times` transactions commit and then lose their connection, as when a
    server or network fails between the COMMIT and its acknowledgement."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.times = 0
        self.dropped = 0

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:
            yield conn
        if self.times > 0:
            self.times -= 1
            self.dropped += 1
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    def connect(self):
        return self.engine.connect()


PG_URL = os.environ.get("AUTOPREC_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.skipif(
    not PG_URL, reason="AUTOPREC_TEST_POSTGRES_URL is not set (.ci/run sets it)")])])
def flaky(request, tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module.time, "sleep", lambda s: None)  # the retries' back-off
    url = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else PG_URL
    engine = sa.create_engine(url)
    ledger = Ledger(engine)
    proxy = DropsAfterCommit(engine)
    ledger.engine = proxy
    return ledger, proxy


def _study() -> str:
    return f"ledger-{uuid.uuid4().hex[:12]}"


def test_a_reservation_retried_after_a_dropped_commit_counts_once(flaky):
    ledger, proxy = flaky
    run = ledger.new_run(_study(), quota=3)
    proxy.times = 1
    assert ledger.reserve(run)
    assert proxy.dropped == 1
    assert ledger.counts(run) == (1, 3)
    proxy.times = 1
    ledger.release(run)
    assert ledger.counts(run) == (0, 3)
    # the whole quota is still there: three reservations, each through a dropped commit, then none
    for _ in range(3):
        proxy.times = 1
        assert ledger.reserve(run)
    assert ledger.counts(run) == (3, 3)
    assert not ledger.reserve(run)


def test_a_new_run_retried_after_a_dropped_commit_is_registered_once(flaky):
    ledger, proxy = flaky
    study = _study()
    proxy.times = 1
    run = ledger.new_run(study, quota=2)
    assert proxy.dropped == 1
    assert ledger.counts(run) == (0, 2)
    runs = ledger_module.runs
    with proxy.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(runs.c.study_name == study)).scalar() == 1


def test_a_claim_retried_after_a_dropped_commit_is_still_owned(flaky):
    ledger, proxy = flaky
    study = _study()
    proxy.times = 1
    assert ledger.claim(study, "reference", stale_s=60)
    assert proxy.dropped == 1
    ledger.finish_claim(study, "reference")
    assert not ledger.claim(study, "reference", stale_s=60)  # done: nobody does it again


def test_a_store_that_stays_down_is_a_one_line_error(flaky):
    from autoprec.errors import StoreError

    ledger, proxy = flaky
    run = ledger.new_run(_study(), quota=2)
    proxy.times = 100
    with pytest.raises(StoreError, match="unreachable while reserving a trial"):
        ledger.reserve(run)
