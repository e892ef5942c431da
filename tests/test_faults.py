"""Faults a user can cause or meet (concurrent starts, Ctrl-C, bad input, changed measurements,
read-only and silent stores): each has its regression test here."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch

from autoprec.store import schema
from autoprec.cli import main

pytestmark = pytest.mark.slow  # searches in subprocesses

SPECS = Path(__file__).parent / "specs"
TINY = SPECS / "tiny_mlp.py"
OLD_STORE = Path(__file__).parent / "fixtures" / "store_main_9952712.db"
PG_URL = os.environ.get("AUTOPREC_TEST_POSTGRES_URL")
QUICK = ["--max-rounds", "3", "--no-progress", "--threads", "1", "--space", "cpu"]


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _default_sigint() -> None:
    # a test run started in the background of a shell without job control inherits SIGINT ignored, and
    # Python then never turns Ctrl-C into KeyboardInterrupt: the searches here must see a user's Ctrl-C
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoprec", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **kw)


def _one_line_error(capsys_or_err) -> str:
    err = capsys_or_err if isinstance(capsys_or_err, str) else capsys_or_err.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoprec: error: "), err
    return lines[0]


# concurrent first use of a new SQLite store -------------------------------------------------


def test_three_searches_start_together_on_a_new_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [_cli("search", str(TINY), "--trials", "2", "--storage", url, "--no-retime", "--strategy", "random",
                  "--seed", str(i), *QUICK) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "\n2 trials run, " in out
    trials = optuna.load_study(study_name="tiny_mlp", storage=url).trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 6


# Ctrl-C: the trial is recorded as interrupted and retried; no tracebacks --------------------


def _wait_for_calls(log: Path, calls: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < calls):
        time.sleep(0.1)
    assert log.exists() and len(log.read_text().splitlines()) >= calls


def test_ctrl_c_records_the_trial_as_interrupted_and_the_next_run_retries_it(tmp_path):
    log = tmp_path / "calls.log"
    url = f"sqlite:///{tmp_path / 's.db'}"
    args = ["search", str(SPECS / "slow_mlp.py"), "--storage", url, "--strategy", "random", "--no-retime", *QUICK]
    proc = _cli(*args, "--trials", "4", env={"SLOW_MLP_LOG": str(log), "SLOW_MLP_SLEEP": "3"})
    # the fp32 reference, then trial 1 (the second uniform policy) in its evaluate(): trial 0, all fp32,
    # is the reference itself and calls nothing
    _wait_for_calls(log, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "\n1 trials run, " in out and "(re-timed" not in out
    study = optuna.load_study(study_name="slow_mlp", storage=url)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].user_attrs["failure_reason"] == schema.INTERRUPTED
    origin = schema.TrialRecord.of(failed[0]).origin
    assert origin.kind == schema.UNIFORM and origin.format != "fp32"
    resumed = _cli(*args, "--trials", "3", env={"SLOW_MLP_LOG": str(log), "SLOW_MLP_SLEEP": "0"})
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "\n3 trials run, " in out and "(re-timed" not in out
    study = optuna.load_study(study_name="slow_mlp", storage=url)
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert schema.TrialRecord.of(retry[0]).origin == origin
    uniform = {schema.TrialRecord.of(t).origin.format for t in study.trials if t.state.name == "COMPLETE"}
    assert uniform >= {"fp32", "bf16", "int8"}


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="AUTOPREC_TEST_POSTGRES_URL is not set (.ci/run sets it)")
def test_ctrl_c_to_a_search_with_workers_ends_cleanly(tmp_path):
    log = tmp_path / "calls.log"
    study_name = f"int-{uuid.uuid4().hex[:8]}"
    args = ["search", str(SPECS / "slow_mlp.py"), "--storage", PG_URL, "--study", study_name, "--workers", "2",
            "--strategy", "random", "--no-retime", *QUICK]
    proc = _cli(*args, "--trials", "6", env={"SLOW_MLP_LOG": str(log), "SLOW_MLP_SLEEP": "3"},
                start_new_session=True)  # its own process group, as a terminal's foreground job
    _wait_for_calls(log, 5)  # the reference, each worker's fp32 score, then both workers in a trial
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "Error" not in err, err
    trials = optuna.load_study(study_name=study_name, storage=PG_URL).trials
    assert not [t for t in trials if t.state.name == "RUNNING"]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all(t.user_attrs.get("failure_reason") == schema.INTERRUPTED for t in failed)
    queued = len(failed) + len([t for t in trials if t.state.name == "WAITING"])  # retries join the queue's end
    resumed = _cli(*args, "--trials", str(queued), env={"SLOW_MLP_LOG": str(log), "SLOW_MLP_SLEEP": "0"})
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"\n{queued} trials run, " in out
    done = optuna.load_study(study_name=study_name, storage=PG_URL).trials
    retried = {t.system_attrs.get("failed_trial") for t in done if t.state.name == "COMPLETE"}
    assert {t.number for t in failed} <= retried, "every interrupted trial was measured on resume"


# one line and exit 2 for each user mistake; failed candidates one line each ---------------


@pytest.mark.parametrize("args", [
    ["report", "--study", "tiny_mlp", "-o", "{tmp}/missing/report.html"],
    ["trials", "--study", "tiny_mlp", "-o", "{tmp}/missing/trials.csv"],
    ["export", "--study", "tiny_mlp", "--pick", "fastest", "-o", "{tmp}/missing/policy.json"],
    ["search", str(TINY), "--workers", "0"],
    ["search", str(TINY), "--trials", "-1"],
    ["search", str(TINY), "--timeout", "-1"],
    ["search", str(TINY), "--study", ""],
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, args):
    db = tmp_path / "s.db"
    shutil.copy(OLD_STORE, db)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--storage", f"sqlite:///{db}"]
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    assert main(argv) == 2
    _one_line_error(capsys)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before and not (tmp_path / "missing").exists()


FLAKY = '''
import torch
from torch import nn

class Flaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 3:
            raise ValueError("the fourth call fails")
        return self.fc(x)

def build_model():
    torch.manual_seed(0)
    return Flaky()

def example_inputs():
    return torch.randn(4, 8)
'''


def test_a_model_failing_on_a_later_reference_call_is_one_line(tmp_path, capsys, keep_threads):
    spec = tmp_path / "flaky.py"
    spec.write_text(FLAKY)
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(spec), "--storage", url, "--trials", "1", *QUICK]) == 2
    line = _one_line_error(capsys)
    assert "the fourth call fails" in line and "build_model" in line
    assert optuna.get_all_study_summaries(url) == []


PICKY = '''
import torch
from torch import nn

class Picky(nn.Module):
    """Not a searchable layer: refuses anything but fp32 inputs with an exception of its own."""
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        if x.dtype != torch.float32:
            raise ValueError(f"Picky takes float32, got {x.dtype}")
        return x @ self.w

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), Picky())

def example_inputs():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
'''


def test_a_failed_candidate_is_one_line_and_its_traceback_goes_to_the_store(tmp_path):
    spec = tmp_path / "picky.py"
    spec.write_text(PICKY)
    url = f"sqlite:///{tmp_path / 's.db'}"
    # every policy that hands Picky a bf16 tensor fails (the uniform bf16 one at least; whether the
    # sampler draws bf16 again depends on the host: a CPU with slow bf16 prunes it from sampling)
    proc = _cli("search", str(spec), "--storage", url, "--trials", "4", "--strategy", "random", "--no-retime", *QUICK)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err
    failed = [line for line in err.splitlines() if "failed" in line]
    numbers = [int(m.group(1)) for line in failed
               if (m := re.search(r"trial (\d+) failed: ValueError: Picky takes float32", line))]
    trials = optuna.load_study(study_name="picky", storage=url).trials
    with_bf16 = [t.number for t in trials if "bf16" in t.params.values()]
    assert with_bf16 and len(failed) == len(numbers) and sorted(numbers) == with_bf16, err
    for number in numbers:
        assert trials[number].state.name == "FAIL"
        assert "Traceback" in trials[number].user_attrs["measurement"]["traceback"]
    assert all(t.state.name == "COMPLETE" for t in trials if t.number not in numbers)


# changes the measurements depend on are refused ------------------------------------------


BATCHED = '''
import os
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8))

def example_inputs():
    return torch.randn(int(os.environ["BATCH"]), 8)
'''


def test_a_resume_with_other_example_inputs_is_refused(tmp_path, capsys, monkeypatch, keep_threads):
    spec = tmp_path / "batched.py"
    spec.write_text(BATCHED)
    url = f"sqlite:///{tmp_path / 's.db'}"
    monkeypatch.setenv("BATCH", "8")
    assert main(["search", str(spec), "--storage", url, "--trials", "0", "--no-retime", *QUICK]) == 0
    capsys.readouterr()
    monkeypatch.setenv("BATCH", "512")
    assert main(["search", str(spec), "--storage", url, "--trials", "1", *QUICK]) == 2
    line = _one_line_error(capsys)
    assert "tensor[8, 8] float32" in line and "tensor[512, 8] float32" in line
    assert len(optuna.load_study(study_name="batched", storage=url).trials) == 4  # the uniform ones of the cpu space (fp32, bf16, int8, int8_static), waiting


def test_apply_refuses_a_policy_of_another_model_unless_forced(tmp_path, capsys, keep_threads):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": "autoprec.policy", "version": 1, "default": "fp32", "layers": {},
                                  "model": {"class": "Sequential", "fingerprint": "sha256:" + "0" * 64}}))
    assert main(["apply", str(policy), str(TINY), "--device", "cpu", "--threads", "1"]) == 2
    assert "--force" in _one_line_error(capsys)
    assert main(["apply", str(policy), str(TINY), "--device", "cpu", "--threads", "1", "--force"]) == 0
    assert "warning: " in capsys.readouterr().out


# read-only stores -------------------------------------------------------------------------


def test_read_only_commands_work_on_a_read_only_store(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "s.db"
    shutil.copy(OLD_STORE, db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    db.chmod(0o444)
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make autoprec see what any other user sees
        real = os.access
        monkeypatch.setattr("autoprec.store.storage.os.access", lambda p, mode: False if mode & os.W_OK else real(p, mode))
    url = f"sqlite:///{db}"
    try:
        assert main(["studies", "--storage", url]) == 0
        assert main(["front", "--storage", url, "--study", "tiny_mlp"]) == 0
        assert "uniform int8" in capsys.readouterr().out
        started = time.monotonic()
        assert main(["search", str(TINY), "--storage", url, "--study", "tiny_mlp", *QUICK]) == 2
        assert "cannot be written" in _one_line_error(capsys) and time.monotonic() - started < 10
    finally:
        folder.chmod(0o755)
        db.chmod(0o644)
    assert sorted(p.name for p in folder.iterdir()) == ["s.db"]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


# a store that never answers -----------------------------------------------------------------


def test_a_server_that_never_answers_fails_within_the_connect_timeout(capsys, monkeypatch):
    pytest.importorskip("psycopg")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stay_silent() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    monkeypatch.setattr("autoprec.store.storage.CONNECT_TIMEOUT_S", 2)
    try:
        started = time.monotonic()
        code = main(["studies", "--storage", f"postgresql+psycopg://u@127.0.0.1:{server.getsockname()[1]}/x"])
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()
    assert code == 2 and elapsed < 15
    assert "cannot open the study store" in _one_line_error(capsys) and accepted
