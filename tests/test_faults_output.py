"""Files written, secrets kept, text escaped, and small faults of the command line: one regression
test (or a few) per fault, each failing without its fix."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest

from autoprec.cli import build_parser, main
from helpers import STORE, TINY

STUDY = "tiny_mlp"
PG_URL = os.environ.get("AUTOPREC_TEST_POSTGRES_URL")
ROOT = Path(__file__).resolve().parent.parent
# subprocesses import this checkout, whatever folder they run in
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
QUICK = ["--max-rounds", "3", "--no-progress", "--threads", "1", "--space", "cpu"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoprec: error: "), err
    return lines[0]


def _write(command: str, output: str, *extra: str) -> list[str]:
    pick = ["--pick", "fastest"] if command == "export" else []
    return [command, "--study", STUDY, *pick, "-o", output, *extra]


# the store read (or any SQLite file) is never written over; other files only with --force ----------


def test_output_never_overwrites_the_store_or_a_sqlite_file_and_asks_for_force(store, tmp_path, capsys):
    before = _digest(store)
    for command in ("export", "report", "trials"):
        for extra in ((), ("--force",)):
            assert main(_write(command, "autoprec.db", *extra)) == 2
            assert "study store being read" in _one_line_error(capsys.readouterr().err)
    other = tmp_path / "other.db"
    shutil.copy(STORE, other)
    link = tmp_path / "store-link.csv"
    link.symlink_to(store)
    for target in (other, link):
        assert main(_write("trials", str(target), "--force")) == 2
        _one_line_error(capsys.readouterr().err)
    assert _digest(store) == before and _digest(other) == before
    # a file of another kind: replaced only with --force
    notes = tmp_path / "notes.json"
    notes.write_text("my notes\n")
    assert main(_write("export", str(notes))) == 2
    assert "pass --force" in _one_line_error(capsys.readouterr().err)
    assert notes.read_text() == "my notes\n"
    assert main(_write("export", str(notes), "--force")) == 0
    assert json.loads(notes.read_text())["format"] == "autoprec.policy"


# symlinks written through, devices and FIFOs written in place, `-` is stdout, unique temp names ---------


def test_output_writes_through_links_into_fifos_and_to_stdout(store, tmp_path, capsys):
    real = tmp_path / "real.json"
    real.write_text("")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert main(_write("export", str(link))) == 0
    assert link.is_symlink() and json.loads(real.read_text())["format"] == "autoprec.policy"
    capsys.readouterr()

    assert main(_write("export", "-")) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["format"] == "autoprec.policy" and "wrote standard output" in captured.err
    assert not (tmp_path / "-").exists()
    assert main(_write("trials", "-")) == 0
    assert capsys.readouterr().out.startswith("trial,state,")

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    assert main(_write("report", str(fifo))) == 0
    reader.join(30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and received[0].startswith(b"<!DOCTYPE html>")
    # no temporary file is left, and none has the fixed name two writers would share
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("autoprec.db")) == \
        ["fifo", "link.json", "real.json"]


def test_temporary_names_are_unique_and_policy_save_writes_through_links(tmp_path, monkeypatch):
    from autoprec import Policy
    from autoprec import output

    names: list[str] = []
    real_mkstemp = output.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        names.append(name)
        return fd, name

    monkeypatch.setattr(output.tempfile, "mkstemp", spy)
    target = tmp_path / "p.json"
    link = tmp_path / "l.json"
    link.symlink_to(target)
    Policy(layers={"0": "int8"}).save(link)
    Policy(layers={"0": "bf16"}).save(link)
    assert link.is_symlink() and json.loads(target.read_text())["layers"] == {"0": "bf16"}
    assert len(set(names)) == 2 and all(Path(n).parent == tmp_path for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json", "p.json"]


# a folder the user cannot write: one line, exit 2 ------------------------------------------------------


def test_a_folder_that_cannot_be_written_is_one_line(store, tmp_path, capsys, monkeypatch):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make autoprec see what any other user sees
        real = os.access
        monkeypatch.setattr("autoprec.output.os.access",
                            lambda p, mode: False if mode & os.W_OK and Path(p) == folder else real(p, mode))
    try:
        for command, name in (("export", "p.json"), ("report", "r.html"), ("trials", "t.csv"),
                              ("trials", "t.parquet")):
            assert main(_write(command, str(folder / name))) == 2
            assert "cannot write in the folder" in _one_line_error(capsys.readouterr().err)
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_a_write_that_fails_half_way_is_one_line_and_leaves_nothing(store, tmp_path, capsys, monkeypatch):
    from autoprec import output

    def full_disk(fd, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output.os, "fsync", full_disk)
    assert main(_write("trials", str(tmp_path / "t.csv"))) == 2
    assert "No space left on device" in _one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("autoprec.db")) == []


# no password on a command line or in any output ---------------------------------------------------------


def test_store_urls_are_printed_without_their_password(capsys, monkeypatch):
    from autoprec.cli import export_command
    from autoprec.store.storage import shown_url

    assert shown_url("postgresql://me:s3cret@db.example/studies") == "postgresql://me:***@db.example/studies"
    assert "s3cret" not in export_command("x", "postgresql://me:s3cret@db.example/studies")
    # a store that cannot be reached: its error names the URL, never the password
    for argv in (["studies", "--storage", "postgresql://me:s3cret@127.0.0.1:1/x"],
                 ["front", "--study", "x", "--storage", "postgresql://me:s3cret@127.0.0.1:1/x"]):
        assert main(argv) == 2
        assert "s3cret" not in _one_line_error(capsys.readouterr().err)
    monkeypatch.setenv("AUTOPREC_STORAGE", "postgresql://me:s3cret@127.0.0.1:1/x")
    assert main(["studies"]) == 2
    assert "s3cret" not in _one_line_error(capsys.readouterr().err)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="AUTOPREC_TEST_POSTGRES_URL is not set")
def test_workers_get_no_password_on_their_command_line_and_nothing_prints_it(tmp_path):
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL).set(password="s3cret").render_as_string(hide_password=False)
    name = f"secret-{uuid.uuid4().hex[:8]}"
    launcher = subprocess.Popen([sys.executable, "-m", "autoprec", "search", str(TINY), "--storage", url,
                                 "--study", name, "--workers", "2", "--trials", "4", "--strategy", "tpe", *QUICK],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    command_lines: list[bytes] = []
    while launcher.poll() is None:
        for child in _children(launcher.pid):
            try:
                command_lines.append(Path(f"/proc/{child}/cmdline").read_bytes())
            except OSError:
                pass
        time.sleep(0.2)
    out, err = launcher.communicate()
    assert launcher.returncode == 0, err
    workers = [c for c in command_lines if b"autoprec.search.workers" in c]
    assert workers, "the workers were seen"
    assert not any(b"s3cret" in c or b"postgresql" in c for c in workers)
    outputs = [out, err]
    for argv in (["front", "--study", name], ["studies"], ["profile", "--study", name],
                 ["export", "--study", name, "--pick", "fastest", "-o", str(tmp_path / "p.json")]):
        done = subprocess.run([sys.executable, "-m", "autoprec", *argv, "--storage", url], capture_output=True,
                              text=True, timeout=300, env=ENV)
        assert done.returncode == 0, done.stderr
        outputs += [done.stdout, done.stderr]
    assert "postgres:***@" in out and "--storage" in out
    assert not any("s3cret" in text for text in outputs)
    assert "s3cret" not in (tmp_path / "p.json").read_text()


# control characters from a store or a policy file are escaped when printed ------------------------------


def test_control_characters_in_study_names_and_policy_fields_are_escaped(store, capsys):
    forged = "evil\x1b[2J\x1b[H\nforged      99  99\rx\u202e"
    with sqlite3.connect(store) as db:
        db.execute("UPDATE studies SET study_name = ? WHERE study_name = ?", (forged, STUDY))
    assert main(["studies"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert len(out.strip().splitlines()) == 3  # header, rule, one study: no forged row
    assert "evil\\x1b[2J\\x1b[H\\nforged" in out

    from autoprec.measure.remeasure import stored_latency

    here = {"device": "cpu", "device_name": "cpu-here", "threads": "1", "cpu_allocator": "x"}
    line = stored_latency({"latency_ratio": 1.0, "device": "cpu\x1b[31m", "device_name": "\x1b[2J\nfake: 9x",
                           "threads": "1"}, 1.0, here)
    assert "\x1b" not in line and "\\x1b[2J\\nfake" in line


# junk in a policy's measured fields is refused at load, before any measurement -------------------------


@pytest.mark.parametrize("field,value", [
    ("score", "0.9"), ("score", [1]), ("score", math.nan), ("latency_ratio", 10**300), ("retimed_ratio", math.inf),
    ("threads", {"a": 1}), ("threads", 10**40), ("device_name", ["x"]), ("latency_ms", True),
])
def test_apply_refuses_junk_in_measured_fields_in_one_line(tmp_path, capsys, field, value):
    from autoprec import Policy

    policy = Policy(layers={"0": "bf16"}).to_json()
    policy["measured"] = {"score": 0.99, "latency_ratio": 0.9, "device": "cpu", "threads": "1", field: value}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))  # json writes nan and inf as NaN and Infinity, which it reads back
    started = time.monotonic()
    assert main(["apply", str(path), str(TINY), "--device", "cpu"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"measured.{field}" in line and len(line) < 300 and time.monotonic() - started < 30


# a model file that is not Python ------------------------------------------------------------------------


@pytest.mark.parametrize("command,name", [("search", "nb.ipynb"), ("layers", "model.txt"), ("apply", "model")])
def test_a_model_file_that_is_not_python_is_one_line(tmp_path, capsys, command, name):
    model = tmp_path / name
    model.write_text(TINY.read_text())
    argv = {"search": ["search", str(model), "--storage", f"sqlite:///{tmp_path / 's.db'}"],
            "layers": ["layers", str(model)]}.get(command)
    if argv is None:
        policy = tmp_path / "p.json"
        policy.write_text(json.dumps({"format": "autoprec.policy", "version": 1, "layers": {}}))
        argv = ["apply", str(policy), str(model), "--device", "cpu"]
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(model) in line and "model.py" in line and "Python" in line
    assert not (tmp_path / "s.db").exists()


# a study name longer than the store's column -----------------------------------------------------------


def test_a_study_name_over_512_characters_is_refused_before_the_store(tmp_path, capsys):
    from autoprec.search.study_setup import MAX_STUDY_NAME

    assert MAX_STUDY_NAME == 512
    urls = [f"sqlite:///{tmp_path / 'new.db'}"] + ([PG_URL] if PG_URL else [])
    for url in urls:
        assert main(["search", str(TINY), "--study", "x" * 513, "--storage", url, *QUICK]) == 2
        assert "at most 512" in _one_line_error(capsys.readouterr().err)
        if url.startswith("postgresql"):
            assert "x" * 513 not in optuna.get_all_study_names(url)
    assert not (tmp_path / "new.db").exists()


# small ones --------------------------------------------------------------------------------------------


def test_the_export_hint_and_the_report_hint_are_shell_quoted(store, tmp_path):
    from autoprec.cli import export_command
    from autoprec.results.html_report import build_report

    assert export_command("my model") == "autoprec export --study 'my model' --pick fastest -o policy.json"
    assert export_command("it's", "sqlite:///my dir/a.db").endswith("--storage 'sqlite:///my dir/a.db'")
    with sqlite3.connect(store) as db:
        db.execute("UPDATE studies SET study_name = 'my model' WHERE study_name = ?", (STUDY,))
    import html

    report = html.unescape(build_report(optuna.load_study(study_name="my model", storage=f"sqlite:///{store}")))
    assert "autoprec export --study 'my model' --trial N" in report


@pytest.mark.slow
def test_the_printed_export_hint_runs_as_pasted_for_a_folder_with_a_space(tmp_path):
    folder = tmp_path / "my model"
    folder.mkdir()
    shutil.copy(TINY, folder / "model.py")
    url = f"sqlite:///{tmp_path / 'a b.db'}"
    done = subprocess.run([sys.executable, "-m", "autoprec", "search", str(folder / "model.py"), "--trials", "1",
                           "--no-retime", "--storage", url, *QUICK], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=ENV)
    assert done.returncode == 0, done.stderr
    hint = [line for line in done.stdout.splitlines() if line.startswith("export one with: ")][0]
    pasted = subprocess.run(hint.removeprefix("export one with: ").replace("autoprec ", f"{sys.executable} -m "
                            "autoprec ", 1), shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=ENV)
    assert pasted.returncode == 0, pasted.stderr
    assert (tmp_path / "policy.json").exists()


def test_a_flag_typo_in_a_subcommand_prints_that_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["export", "--study", "s", "--pick", "fastest", "-o", "p.json", "--forse"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "usage: autoprec export" in err and "autoprec export: error: unrecognized arguments: --forse" in err


THREAD_AT_IMPORT = '''
import threading, time
threading.Thread(target=lambda: time.sleep(3600), name="model-poller").start()
'''


def _model_with(tmp_path: Path, prelude: str) -> Path:
    path = tmp_path / "model.py"
    path.write_text(prelude + "\n" + TINY.read_text())
    return path


@pytest.mark.slow
def test_a_thread_left_running_by_model_py_does_not_hang_the_command(tmp_path):
    model = _model_with(tmp_path, THREAD_AT_IMPORT)
    env = {**ENV, "AUTOPREC_THREADS_EXIT_S": "1"}
    done = subprocess.run([sys.executable, "-m", "autoprec", "layers", str(model)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "searchable layers" in done.stdout
    assert "still running (model-poller)" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_ctrl_c_while_model_py_threads_hold_the_exit_is_quiet_and_non_zero(tmp_path):
    model = _model_with(tmp_path, THREAD_AT_IMPORT)
    env = {**ENV, "AUTOPREC_THREADS_EXIT_S": "600"}
    proc = subprocess.Popen([sys.executable, "-m", "autoprec", "layers", str(model)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()  # the table's header: the command is done, only its exit is left
    assert first.startswith("layer")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


@pytest.mark.slow
def test_os_exit_at_import_of_model_py_is_one_line_and_exit_2(tmp_path):
    model = _model_with(tmp_path, "import os\nos._exit(0)\n")
    done = subprocess.run([sys.executable, "-m", "autoprec", "layers", str(model)], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert done.returncode == 2
    assert "os._exit(0)" in _one_line_error(done.stderr)


def test_studies_shows_a_placeholder_for_nan(capsys, monkeypatch):
    frame = pd.DataFrame([{"study": "s", "trials": 3, "complete": 3, "failed": 0, "front": 1,
                           "best_latency_ms": math.nan, "best_vs_fp32": math.inf, "device": "cpu",
                           "machine": "x86_64 avx512"}])
    monkeypatch.setattr("autoprec.results.frames.studies_frame", lambda storage: frame)
    monkeypatch.setattr("autoprec.store.storage.open_storage", lambda *a, **k: None)
    assert main(["studies"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "inf" not in out and re.search(r"n/a\s+n/a\s+cpu", out)


def test_seed_study_and_no_progress_have_help():
    parser = build_parser()
    for command, flags in (("search", ("--seed", "--study", "--no-progress")),
                           ("front", ("--study",)), ("export", ("--study", "--force")), ("report", ("--force",))):
        sub = parser._defaults["_parsers"][command]
        for action in sub._actions:
            if set(action.option_strings) & set(flags):
                assert action.help, f"{command} {action.option_strings} has no help"
