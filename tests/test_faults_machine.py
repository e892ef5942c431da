"""One machine kind per study, retries first, honest re-times, workers that stop with their launcher,
a store that fails mid-search, and a killed search's trial retried at once."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from autoprec.store import schema
from autoprec.store.recovery import owner_gone, process_identity

from helpers import FIXTURES, SPECS, TINY, load_study

PG_URL = os.environ.get("AUTOPREC_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(not PG_URL, reason="AUTOPREC_TEST_POSTGRES_URL is not set (.ci/run sets it)")
QUICK = ["--max-rounds", "3", "--no-progress", "--threads", "1", "--space", "cpu"]
OTHER_KIND = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # what another CPU presents
SLOW = SPECS / "slow_mlp.py"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background test run may inherit SIGINT ignored


def _cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoprec", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **kw)


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str, str]:
    proc = _cli(*args, env=env)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("[I ")]  # Optuna's "study created"
    assert len(lines) == 1 and lines[0].startswith("autoprec: error: "), err
    return lines[0]


def _wait_for_calls(log: Path, calls: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < calls):
        time.sleep(0.1)
    assert log.exists() and len(log.read_text().splitlines()) >= calls, "the search never got that far"


def _dump(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return list(conn.iterdump())


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


# one machine kind per study ----------------------------------------------------------------


def test_machine_kinds_in_words_tell_two_kinds_apart():
    native = {"device_type": "cpu", "device_name": "AMD EPYC", "cpu_capability": "AVX512", "torch": "2.5.1",
              "cpu_flags": "avx2 avx512f", "machine": "x86_64"}
    restricted = {**native, "cpu_capability": "AVX2", **OTHER_KIND}
    there, here = schema.machine_texts(native, restricted)
    assert there == "AMD EPYC (AVX512, torch 2.5.1)"
    assert here == "AMD EPYC (AVX2, ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, torch 2.5.1)"
    other_flags = {**native, "cpu_flags": "avx2"}  # same short text: the differing field is named
    there, here = schema.machine_texts(native, other_flags)
    assert "cpu_flags 'avx2 avx512f'" in there and "cpu_flags 'avx2'" in here
    gpu = {"device_type": "cuda", "device_name": "NVIDIA H200", "capability": "9.0", "torch": "2.5.1"}
    assert schema.machine_text(gpu) == "NVIDIA H200 (compute capability 9.0, torch 2.5.1)"


@pytest.mark.slow
def test_a_resume_under_another_cpu_isa_is_refused_and_writes_nothing(tmp_path):
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    code, out, err = _run("search", str(TINY), "--storage", url, "--trials", "1", "--no-retime", *QUICK)
    assert code == 0, err
    study = load_study(url, "tiny_mlp")
    kind = schema.read_info(study).machine_kind
    assert kind and "threads" not in kind and kind["device_type"] == "cpu"
    measured = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert measured and all(t.user_attrs[schema.TrialKey.MACHINE] == kind for t in measured)
    before = _dump(db)
    code, out, err = _run("search", str(TINY), "--storage", url, "--trials", "1", "--no-retime", *QUICK,
                          env=OTHER_KIND)
    line = _one_line_error(err)
    assert code == 2
    assert schema.machine_text(kind) in line and "ONEDNN_MAX_CPU_ISA=AVX2" in line and "--study NEW_NAME" in line
    assert _dump(db) == before, "a refused resume wrote to the store"
    # the study's machine kind is named where it is read
    studies = subprocess.run([sys.executable, "-m", "autoprec", "studies", "--storage", url], capture_output=True,
                             text=True, check=True).stdout
    assert schema.machine_text(kind) in studies
    report = tmp_path / "report.html"
    subprocess.run([sys.executable, "-m", "autoprec", "report", "--study", "tiny_mlp", "--storage", url, "-o",
                    str(report)], check=True, capture_output=True)
    assert "machine kind" in report.read_text() and schema.machine_text(kind) in report.read_text()


@pytest.mark.slow
def test_a_store_without_a_machine_kind_gets_it_at_its_next_resume(tmp_path):
    db = tmp_path / "autoprec.db"
    shutil.copy(FIXTURES / "tiny_mlp_store_0.1.0.db", db)
    url = f"sqlite:///{db}"
    assert schema.read_info(load_study(url, "tiny_mlp")).machine_kind is None
    code, out, err = _run("search", str(TINY), "--storage", url, "--trials", "1", "--no-progress", "--no-retime")
    assert code == 0, err
    study = load_study(url, "tiny_mlp")
    kind = schema.read_info(study).machine_kind
    assert kind and kind["device_type"] == "cpu"
    latest = max(study.trials, key=lambda t: t.number)
    assert latest.user_attrs[schema.TrialKey.MACHINE] == kind


@needs_postgres
@pytest.mark.slow
@pytest.mark.postgres
def test_a_process_of_another_machine_kind_is_refused_from_a_shared_postgres_study(tmp_path):
    """Two machines on one store: the second presents another CPU ISA while the first searches."""
    study_name = f"kind-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "calls.log"
    args = ["search", str(SLOW), "--storage", PG_URL, "--study", study_name, "--strategy", "random", "--no-retime",
            *QUICK]
    first = _cli(*args, "--trials", "3", env={"SLOW_MLP_LOG": str(log), "SLOW_MLP_SLEEP": "2"})
    try:
        _wait_for_calls(log, 2)  # the study exists and the first machine is in a trial
        study = load_study(PG_URL, study_name)
        trials_before = len(study.trials)
        code, out, err = _run(*args, "--trials", "3", env={"SLOW_MLP_LOG": str(log), "SLOW_MLP_SLEEP": "0",
                                                           **OTHER_KIND})
        line = _one_line_error(err)
        assert code == 2 and "ONEDNN_MAX_CPU_ISA=AVX2" in line
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    study = load_study(PG_URL, study_name)
    kind = schema.read_info(study).machine_kind
    assert schema.machine_text(kind) in line
    assert trials_before <= len(study.trials) and all(
        t.user_attrs.get(schema.TrialKey.MACHINE) == kind for t in study.trials if t.state.name == "COMPLETE")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 3, "the refused one ran nothing"


# retries before the queue ----------------------------------------------------------------


@pytest.mark.slow
def test_an_interrupted_fp32_trial_is_measured_first_by_a_short_resume(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    code, out, err = _run("search", str(TINY), "--storage", url, "--trials", "0", "--no-retime", *QUICK)
    assert code == 0, err
    study = load_study(url, "tiny_mlp")
    trial = study.ask()  # pops the queue's first: the uniform fp32 policy, as a search would
    assert study.trials[trial.number].user_attrs["origin"] == "uniform fp32"
    trial.set_user_attr(schema.TrialKey.FAILURE_REASON, schema.INTERRUPTED)  # what Ctrl-C records
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    code, out, err = _run("search", str(TINY), "--storage", url, "--trials", "1", "--no-retime", *QUICK)
    assert code == 0, err
    done = [t for t in load_study(url, "tiny_mlp").trials if t.state.name == "COMPLETE"]
    assert [t.user_attrs["origin"] for t in done] == ["uniform fp32"]
    assert done[0].system_attrs.get("failed_trial") == trial.number


# a re-time noisier than the search does not replace it ------------------------------------


@pytest.mark.slow
def test_a_re_time_noisier_than_the_search_keeps_the_searchs_ratio(tmp_path, one_thread):
    from autoprec.cli import _front_table
    from autoprec.measure.evaluator import Evaluator
    from autoprec.measure.remeasure import stored_latency
    from autoprec.measure.timing import PairedTiming
    from autoprec.results.frames import pareto_front, policy_of, trials_frame
    from autoprec.results.html_report import build_report
    from autoprec.search.loop import Search, SearchConfig
    from autoprec.search.retime import retime_front
    from helpers import FAST

    config = SearchConfig(model=str(TINY), trials=3, storage=f"sqlite:///{tmp_path / 's.db'}", timing=FAST,
                          progress=False, space="cpu", strategy="random", retime_front=False, max_drop=1.0)
    search = Search.open(config)
    search.run(3)

    def noisy(self, policy, neighbours=None):  # a busy machine: 0.30-5.26 around 0.357
        return PairedTiming(0.357, 17.5, 1.0, 2.8, 5, 10, 17.5, 0.30, 5.26)

    original = Evaluator.retime
    Evaluator.retime = noisy
    try:
        retime_front(search.study, search.evaluator, search.max_drop, 1e9)
    finally:
        Evaluator.retime = original
    entries = schema.retimed(search.study)
    assert entries and all(e["wider"] for e in entries.values())
    frame = trials_frame(search.study)
    front = pareto_front(frame)
    assert front.retimed_ratio.isna().all() and front.retime_too_noisy.all()
    assert "too noisy" in _front_table(front)
    member = next(t for t in search.study.trials if str(t.number) in entries)
    measured = policy_of(search.study, member).measured
    assert measured["retimed_ratio"] is None and measured["retime_too_noisy"] == [0.30, 5.26]
    line = stored_latency(measured, 1.0, {"device": "cpu", "device_name": "x", "threads": "1", "cpu_allocator": ""})
    assert f"{measured['latency_ratio']:.3f}x fp32 (in the search; its final re-time, 0.30-5.26x" in line
    assert "too noisy" in build_report(search.study)

    def steady(self, policy, neighbours=None):  # an interval no wider than any: it replaces the search's
        return PairedTiming(0.9, 1.0, 1.0, 1.1, 5, 10, 1.0, 0.9, 0.9)

    Evaluator.retime = steady
    try:
        retime_front(search.study, search.evaluator, search.max_drop, 1e9)
    finally:
        Evaluator.retime = original
    front = pareto_front(trials_frame(search.study))
    assert (front.retimed_ratio == 0.9).all() and not front.retime_too_noisy.any()


# the workers' launcher ----------------------------------------------------------------


@needs_postgres
@pytest.mark.slow
@pytest.mark.postgres
def test_the_launchers_re_time_budget_counts_its_workers_time():
    study_name = f"budget-{uuid.uuid4().hex[:8]}"
    code, out, err = _run("search", str(TINY), "--storage", PG_URL, "--study", study_name, "--workers", "2",
                          "--trials", "4", "--strategy", "random", *QUICK)
    assert code == 0, err
    study = load_study(PG_URL, study_name)
    record = study.user_attrs[schema.RETIMED_ATTR]
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials
                  if t.datetime_complete and t.datetime_start)
    assert record["budget_s"] > 0 and record["budget_s"] == pytest.approx(0.15 * seconds, rel=0.01)


def _start_workers(tmp_path: Path, trials: int) -> tuple[subprocess.Popen, str, list[int]]:
    """A --workers 2 search on slow evaluations, once both workers are inside a trial."""
    log = tmp_path / "calls.log"
    study_name = f"launcher-{uuid.uuid4().hex[:8]}"
    launcher = _cli("search", str(SLOW), "--storage", PG_URL, "--study", study_name, "--workers", "2", "--trials",
                    str(trials), "--strategy", "random", "--no-retime", *QUICK,
                    env={"SLOW_MLP_LOG": str(log), "SLOW_MLP_SLEEP": "3"}, start_new_session=True)
    _wait_for_calls(log, 5)  # the reference, each worker's fp32 score, then both workers in a trial
    workers = _children(launcher.pid)
    assert len(workers) == 2
    return launcher, study_name, workers


@needs_postgres
@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_to_the_launcher_stops_its_workers(tmp_path, signum):
    launcher, study_name, workers = _start_workers(tmp_path, 8)
    try:
        os.kill(launcher.pid, signum)  # the launcher alone, as `timeout` or systemd send it
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 130 and "Traceback" not in err, err
    assert not _wait_gone(workers, 30), "workers still running after their launcher stopped"
    trials = load_study(PG_URL, study_name).trials
    assert not [t for t in trials if t.state.name == "RUNNING"]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all(t.user_attrs.get("failure_reason") == schema.INTERRUPTED for t in failed)


@needs_postgres
@pytest.mark.slow
@pytest.mark.postgres
def test_a_worker_whose_launcher_was_killed_stops_after_its_trial(tmp_path):
    launcher, study_name, workers = _start_workers(tmp_path, 10)
    try:
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        assert not _wait_gone(workers, 60), "workers went on after their launcher was killed"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    trials = load_study(PG_URL, study_name).trials
    assert not [t for t in trials if t.state.name == "RUNNING"], "each worker finished its trial"
    assert len([t for t in trials if t.state.name == "COMPLETE"]) < 8, "they stopped instead of running the rest"


# a store that fails mid-search ------------------------------------------------------------


@pytest.fixture
def own_database():
    """A PostgreSQL database of this test's own, to lock its tables without holding up anyone else's."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"autoprec_fm_{uuid.uuid4().hex[:8]}"
    base = make_url(PG_URL)
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = base.set(database=name).render_as_string(hide_password=False)
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _lock_trial_values(url: str):
    import psycopg
    from sqlalchemy.engine import make_url

    conn = psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
    conn.execute("LOCK TABLE trial_values IN ACCESS EXCLUSIVE MODE")  # held until rollback
    return conn


@needs_postgres
@pytest.mark.slow
@pytest.mark.postgres
def test_a_statement_timeout_is_one_line_and_a_resume_retries_the_trial_it_cut(tmp_path, own_database):
    timeout_url = own_database + "?options=-c%20statement_timeout%3D1500"  # the server's own setting
    log = tmp_path / "calls.log"
    args = ["search", str(SLOW), "--storage", timeout_url, "--strategy", "random", "--no-retime", *QUICK]
    search = _cli(*args, "--trials", "3", env={"SLOW_MLP_LOG": str(log), "SLOW_MLP_SLEEP": "3"})
    lock = None
    try:
        _wait_for_calls(log, 2)  # trial 1 is in its evaluate(): its results will meet the lock
        lock = _lock_trial_values(own_database)
        out, err = search.communicate(timeout=300)
        assert search.returncode == 1, err
        line = _one_line_error(err)
        assert "statement timeout" in line and "UnboundLocalError" not in line
        code, out, err = _run("studies", "--storage", timeout_url)  # a reading command meets it too
        assert code == 1 and "statement timeout" in _one_line_error(err), err
    finally:
        if search.poll() is None:
            search.kill()
        if lock is not None:
            lock.rollback()
            lock.close()
    cut = [t for t in load_study(own_database, "slow_mlp").trials if t.state.name in ("RUNNING", "FAIL")]
    assert len(cut) == 1
    code, out, err = _run(*args, "--trials", "1", env={"SLOW_MLP_LOG": str(log), "SLOW_MLP_SLEEP": "0"})
    assert code == 0, err
    trials = load_study(own_database, "slow_mlp").trials
    assert not [t for t in trials if t.state.name == "RUNNING"]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == cut[0].number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"


# a killed search's trial is retried at once ----------------------------------------------


def test_a_trial_owner_is_gone_when_its_process_is():
    me = process_identity()
    assert me["pid"] == os.getpid() and not owner_gone(me)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert owner_gone({**me, "pid": child.pid, "started": None})
    assert owner_gone({**me, "started": me["started"] - 1})  # the pid now belongs to another process
    assert not owner_gone({**me, "pid": child.pid, "host": "elsewhere"})  # another host: the heartbeat decides
    assert not owner_gone({**me, "pid": child.pid, "pid_namespace": "pid:[1]"})  # another container
    assert not owner_gone(None) and not owner_gone({"host": me["host"], "pid": "x"})


@pytest.mark.slow
def test_a_killed_searchs_trial_is_failed_and_retried_by_the_next_run_at_once(tmp_path):
    log = tmp_path / "calls.log"
    url = f"sqlite:///{tmp_path / 's.db'}"
    args = ["search", str(SLOW), "--storage", url, "--strategy", "random", "--no-retime", *QUICK]
    env = {"SLOW_MLP_LOG": str(log), "AUTOPREC_GRACE_S": "600"}  # the heartbeat alone would wait 10 minutes
    search = _cli(*args, "--trials", "3", env={**env, "SLOW_MLP_SLEEP": "5"})
    try:
        _wait_for_calls(log, 2)  # trial 1 in its evaluate()
    finally:
        search.kill()
        search.wait()
    running = [t for t in load_study(url, "slow_mlp").trials if t.state.name == "RUNNING"]
    assert len(running) == 1
    code, out, err = _run(*args, "--trials", "1", env={**env, "SLOW_MLP_SLEEP": "0"})
    assert code == 0, err
    trials = {t.number: t for t in load_study(url, "slow_mlp").trials}
    killed = trials[running[0].number]
    assert killed.state.name == "FAIL" and killed.user_attrs["failure_reason"] == schema.OWNER_GONE
    assert not [t for t in trials.values() if t.state.name == "RUNNING"]
    done = [t for t in trials.values() if t.state.name == "COMPLETE" and t.number > killed.number]
    assert len(done) == 1 and done[0].system_attrs.get("failed_trial") == killed.number


@pytest.mark.slow
def test_a_trial_owned_on_another_host_waits_for_the_heartbeat_grace(tmp_path):
    from optuna.storages import RDBStorage

    from autoprec.store.recovery import RetryAndRelease, fail_stale

    storage = RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=2,
                         heartbeat_stale_trial_callback=RetryAndRelease())
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    trial.set_user_attr(schema.TrialKey.OWNER, {**process_identity(), "host": "elsewhere", "pid": 999999})
    fail_stale(study, storage)
    assert study.trials[trial.number].state.name == "RUNNING", "its owner's death cannot be seen from here"
    time.sleep(3.5)
    fail_stale(study, storage)
    failed = study.trials[trial.number]
    assert failed.state.name == "FAIL" and failed.user_attrs["failure_reason"] == schema.STALE
    assert [t.system_attrs.get("failed_trial") for t in study.trials if t.state.name == "WAITING"] == [trial.number]

