"""Several workers on one study in PostgreSQL, and the faults they must survive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest

from helpers import SPECS, TINY, autoprec_cli

pytestmark = pytest.mark.slow  # searches in subprocesses

PG_URL = os.environ.get("AUTOPREC_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(not PG_URL, reason="AUTOPREC_TEST_POSTGRES_URL is not set (.ci/run sets it)")
FAST_HEARTBEAT = {"AUTOPREC_HEARTBEAT_S": "1", "AUTOPREC_GRACE_S": "3"}


def _front_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    feasible = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                and all(c <= 0 for c in t.constraints.values())]

    def dominates(a, b):
        return (a.values[0] >= b.values[0] and a.values[1] <= b.values[1] and a.values[2] <= b.values[2]
                and a.values != b.values)

    front = sorted((t for t in feasible if not any(dominates(o, t) for o in feasible)), key=lambda t: t.number)
    first: dict[tuple, int] = {}
    for t in front:  # a twin (a repeated policy, its values copied) is one point, under its first number
        first.setdefault(tuple(t.values), t.number)
    return set(first.values())


@needs_postgres
@pytest.mark.postgres
def test_three_workers_share_a_24_trial_study():
    study_name = f"workers-{uuid.uuid4().hex[:8]}"
    autoprec_cli("search", str(TINY), "--max-rounds", "9", "--storage", PG_URL, "--study", study_name, "--workers", "3",
                 "--trials", "24", "--no-progress", "--no-retime", "--strategy", "tpe")
    study = optuna.load_study(study_name=study_name, storage=PG_URL)
    trials = study.trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 24
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in complete}) == 3, "every worker ran some trials"
    import json
    out = autoprec_cli("front", "--storage", PG_URL, "--study", study_name, "--format", "json").stdout
    assert {row["trial"] for row in json.loads(out)} == _front_numbers(trials)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _worker_pid(trial: optuna.trial.FrozenTrial) -> int | None:
    worker = trial.user_attrs.get("worker", "")
    return int(worker.rsplit(":", 1)[1]) if ":" in worker else None


@needs_postgres
@pytest.mark.postgres
def test_a_worker_killed_mid_trial_is_retried_and_nothing_is_lost(tmp_path):
    study_name = f"kill-{uuid.uuid4().hex[:8]}"
    hold = tmp_path / "hold"
    env = {**os.environ, **FAST_HEARTBEAT, "SLOW_MLP_LOG": str(tmp_path / "calls.log"), "SLOW_MLP_SLEEP": "1.0",
           "SLOW_MLP_HOLD": str(hold)}
    launcher = subprocess.Popen([sys.executable, "-m", "autoprec", "search", str(SPECS / "slow_mlp.py"), "--max-rounds", "9",
                                 "--storage", PG_URL, "--study", study_name, "--workers", "3", "--trials", "9",
                                 "--no-progress", "--no-retime", "--strategy", "tpe"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = killed_trial = None
    deadline = time.time() + 240
    while time.time() < deadline and victim is None:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name=study_name, storage=PG_URL)
        except KeyError:
            continue
        children = set(_children(launcher.pid))
        trials = study.get_trials(deepcopy=False)
        workers_in_trials = {_worker_pid(t) for t in trials}
        finished = [t for t in trials if t.state.is_finished()]
        # Every worker is past its reference evaluation, so the next evaluate() to take the hold is inside
        # a trial, and it never returns: the kill cannot race the trial's end.
        if not hold.exists() and not list(tmp_path.glob("hold.*")) and children and children <= workers_in_trials \
                and len(finished) >= 2:
            hold.touch()
        for taken in tmp_path.glob("hold.*"):
            pid = int(taken.suffix[1:])
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and _worker_pid(t) == pid]
            if pid in children and running:
                victim, killed_trial = pid, running[0].number
    assert victim is not None, "no worker was caught mid-trial"
    os.kill(victim, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stderr
    study = optuna.load_study(study_name=study_name, storage=PG_URL)
    by_number = {t.number: t for t in study.trials}
    assert by_number[killed_trial].state == optuna.trial.TrialState.FAIL
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 9
    assert all(t.values is not None and len(t.values) == 3 for t in complete)
    assert any(t.system_attrs.get("failed_trial") == killed_trial for t in complete), "the killed trial was retried"


def test_several_workers_on_sqlite_are_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    proc = autoprec_cli("search", str(TINY), "--max-rounds", "9", "--storage", url, "--workers", "2", "--trials", "2", check=False)
    assert proc.returncode == 2
    assert "postgresql" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_unreachable_store_is_one_line():
    proc = autoprec_cli("search", str(TINY), "--max-rounds", "9", "--storage", "postgresql://nobody@127.0.0.1:1/none", "--trials", "1",
                        check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot open the study store" in lines[0]


@pytest.mark.parametrize("malloc_defaults", [False, True])
def test_workers_get_the_launchers_config_as_data(malloc_defaults):
    from types import SimpleNamespace

    from autoprec.cli import timing_settings
    from autoprec.search.loop import SearchConfig
    from autoprec.search.workers import WorkerJob, worker_job

    timing = timing_settings(13, malloc_defaults)
    config = SearchConfig(model=str(TINY), storage="postgresql://x@h/db", timing=timing, space="cpu", seed=5,
                          workers=2, devices=("cuda:0", "cuda:1"), strategy="tpe", timeout=30.0)
    launcher = SimpleNamespace(config=config, study_name="s", storage_url="postgresql://x@h/db", threads=1)
    job = WorkerJob.from_json(worker_job(launcher, "run1", index=3).to_json())
    assert job.run_id == "run1" and job.config.timing == timing
    assert (job.config.study, job.config.seed, job.config.threads, job.config.space) == ("s", 8, 1, "cpu")
    assert (job.config.device, job.config.workers, job.config.devices) == ("cuda:1", 1, None)
    assert (job.config.strategy, job.config.timeout, job.config.progress, job.config.retime_front) == \
        ("tpe", 30.0, False, False)
