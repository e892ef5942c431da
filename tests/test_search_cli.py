"""The main job end to end, through the CLI, on a tiny model and a SQLite store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

import autoprec
from autoprec.store import schema
from autoprec.measure.evaluator import Evaluator
from autoprec.model.model_file import load_spec
from helpers import SPECS, TINY, autoprec_cli, load_study

pytestmark = pytest.mark.slow  # searches in subprocesses

@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One 8-trial search of the tiny MLP in a fresh SQLite file."""
    folder = tmp_path_factory.mktemp("search")
    url = f"sqlite:///{folder / 'study.db'}"
    # --no-prune: what the probe prunes depends on the CPU (tests/test_prune_search.py covers it)
    proc = autoprec_cli("search", str(TINY), "--max-rounds", "9", "--trials", "8", "--storage", url, "--seed", "1", "--no-progress",
                        "--max-drop", "0.001", "--no-prune")
    return folder, url, proc


def test_search_creates_study_with_eight_trials_and_prints_front(searched):
    _, url, proc = searched
    assert "study 'tiny_mlp'" in proc.stdout
    assert "Feasible Pareto front" in proc.stdout
    study = load_study(url, "tiny_mlp")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 8
    origins = [t.user_attrs.get("origin") for t in study.trials[:4]]
    # fp32 first, then the others fastest first by the format probe (which depends on the CPU)
    assert origins[0] == "uniform fp32" and set(origins) == {"uniform fp32", "uniform fp16", "uniform bf16",
                                                              "uniform int8"}
    # the guided search profiles the layers after the uniform trials and measures sequential proposals
    profile = study.user_attrs["autoprec_profile"]
    assert set(profile["layers"]) == {"0", "2", "4"}
    assert all(set(v) == {"fp32", "fp16", "bf16", "int8"} for v in profile["layers"].values())
    assert any(str(t.user_attrs.get("origin", "")).startswith("sequential") for t in study.trials[4:])
    assert "autoprec_retimed" in study.user_attrs


def test_front_lists_only_feasible_non_dominated_trials(searched):
    _, url, _ = searched
    out = autoprec_cli("front", "--storage", url, "--study", "tiny_mlp", "--format", "json").stdout
    front = json.loads(out)
    assert front, "the fp32 trial is always feasible, so the front is never empty"
    study = load_study(url, "tiny_mlp")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    feasible = [t for t in complete if all(c <= 0 for c in t.constraints.values())]
    front_numbers = {row["trial"] for row in front}
    assert front_numbers <= {t.number for t in feasible}

    def dominates(a, b):
        return (a.values[0] >= b.values[0] and a.values[1] <= b.values[1] and a.values[2] <= b.values[2]
                and a.values != b.values)

    for t in feasible:
        dominated = any(dominates(o, t) for o in feasible)
        twin = any(o.number < t.number and o.values == t.values for o in feasible)  # one point, listed once
        assert (t.number in front_numbers) == (not dominated and not twin), t.number
    infeasible = {t.number for t in complete} - {t.number for t in feasible}
    assert not infeasible & front_numbers


def test_export_writes_a_policy_that_reproduces_the_stored_score(searched):
    folder, url, _ = searched
    target = folder / "policy.json"
    autoprec_cli("export", "--storage", url, "--study", "tiny_mlp", "--pick", "fastest", "-o", str(target))
    policy = autoprec.load_policy(target)
    assert policy.measured["study"] == "tiny_mlp"
    study = load_study(url, "tiny_mlp")
    stored = [t for t in study.trials if t.number == policy.measured["trial"]][0]
    assert policy.measured["score"] == stored.values[0]
    spec = load_spec(TINY)
    evaluator = Evaluator(spec, "cpu")
    assert evaluator.measure(policy).score == pytest.approx(stored.values[0], abs=1e-9)
    model = autoprec.apply_policy(spec.build_model(), target)
    assert not any(isinstance(m, type(None)) for m in model.modules())
    assert policy.measured["latency_ratio"] == pytest.approx(stored.values[1] / policy.measured["reference_latency_ms"])
    assert policy.measured["threads"] and policy.measured["device_name"]
    out = autoprec_cli("apply", str(target), str(TINY), "--device", "cpu").stdout
    assert "latency_ms" in out and "score" in out and "freed memory kept" in out
    assert "latency stored in the policy" in out and "measured here" in out


def test_export_says_when_a_trial_is_over_the_max_drop_or_has_no_policy(searched):
    folder, url, _ = searched
    autoprec_cli("search", str(TINY), "--max-rounds", "9", "--trials", "2", "--storage", url, "--study", "tiny_strict",
                 "--no-progress", "--max-drop", "1e-9", "--no-prune")
    over = [t for t in load_study(url, "tiny_strict").trials if t.state == optuna.trial.TrialState.COMPLETE
            and t.user_attrs.get(schema.TrialKey.SCORE_DROP, 0) > 1e-9]
    assert over, "the tiny MLP's all-int8 trial loses more than 1e-9"
    proc = autoprec_cli("export", "--storage", url, "--study", "tiny_strict", "--trial", str(over[0].number),
                        "-o", str(folder / "over.json"))
    assert (folder / "over.json").exists()  # asked for by number: written, with a note
    assert "over the study's max drop 1e-09" in proc.stderr
    proc = autoprec_cli("export", "--storage", url, "--study", "tiny_mlp", "--trial", "9999",
                        "-o", str(folder / "none.json"), check=False)
    assert proc.returncode == 2 and "no trial with that number" in proc.stderr
    proc = autoprec_cli("export", "--storage", url, "--study", "tiny_mlp", "--pick", "fastest", "--max-drop", "-1",
                        "-o", str(folder / "neg.json"), check=False)
    assert proc.returncode == 2 and "must be >= 0" in proc.stderr and not (folder / "neg.json").exists()


def test_load_study_shows_metric_names_and_every_policy(searched):
    _, url, _ = searched
    study = load_study(url, "tiny_mlp")
    assert study.metric_names == ["score", "latency_ms", "memory_bytes"]
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert set(t.user_attrs["policy"]["layers"]) == {"0", "2", "4"}
            assert t.user_attrs["measurement"]["feasible"] is True
    assert "reference" in study.user_attrs["autoprec"]


def test_studies_and_profile_commands(searched):
    _, url, _ = searched
    out = autoprec_cli("studies", "--storage", url).stdout
    assert "tiny_mlp" in out
    assert ("cpu, 1 thread" in out) != ("cuda" in out)  # the tests time CPU studies on one thread (conftest)
    out = autoprec_cli("profile", "--storage", url, "--study", "tiny_mlp").stdout
    assert "int8 drop / ms" in out and "cost model" in out
    assert "profile drops: linearized" in out and "re-fitted on the trials as they come" in out
    assert "drop model (profile drop -> score drop" in out and "score granularity" in out
    assert "to the power 1 (a continuous score" in out  # the default fidelity score: no lattice
    summary = load_study(url, "tiny_mlp").user_attrs["autoprec_costmodel"]
    assert summary["error_refit"]["trials"] == summary["error"]["trials"] > 0


def test_a_second_study_of_the_same_model_reuses_the_profile(searched):
    _, url, _ = searched
    autoprec_cli("search", str(TINY), "--max-rounds", "9", "--trials", "5", "--storage", url, "--study", "tiny_loose",
                 "--max-drop", "0.05", "--no-progress", "--no-retime", "--no-prune")  # the same searched choices
    first, second = load_study(url, "tiny_mlp"), load_study(url, "tiny_loose")
    assert second.user_attrs["autoprec_profile_from"] == "tiny_mlp"
    reused, original = dict(second.user_attrs["autoprec_profile"]), dict(first.user_attrs["autoprec_profile"])
    # the same layers, drops and times; tied to the second study's own reference latency (Profile.time_scale)
    assert reused.pop("reference_latency_ms") == second.user_attrs["autoprec"]["reference"]["latency_ms"]
    original.pop("reference_latency_ms")
    assert reused == original and reused["model_latency_ms"] > 0
    out = autoprec_cli("profile", "--storage", url, "--study", "tiny_mlp").stdout
    assert "layer times tied to the reference" in out
    assert any(str(t.user_attrs.get("origin", "")).startswith("sequential") for t in second.trials)
    out = autoprec_cli("profile", "--storage", url, "--study", "tiny_loose").stdout
    assert "profile reused from study 'tiny_mlp'" in out


def test_a_reader_that_closes_the_pipe_gets_no_traceback(searched):
    """`autoprec front | head`: the reader closed the pipe (here before anything was written)."""
    _, url, _ = searched
    proc = subprocess.Popen([sys.executable, "-m", "autoprec", "front", "--storage", url, "--study", "tiny_mlp",
                             "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_resume_adds_trials_and_refuses_a_changed_space(searched):
    folder, url, _ = searched
    autoprec_cli("search", str(TINY), "--max-rounds", "9", "--trials", "4", "--storage", url, "--no-progress")
    study = load_study(url, "tiny_mlp")
    assert len([t for t in study.trials if t.state.is_finished()]) == 12
    refused = autoprec_cli("search", str(TINY), "--max-rounds", "9", "--trials", "1", "--storage", url, "--space", "cpu",
                           "--no-progress", check=False)
    assert refused.returncode == 2
    assert "space" in refused.stderr and "--study" in refused.stderr
    assert len(load_study(url, "tiny_mlp").trials) == 12


def test_resume_on_the_cpu_refuses_the_other_malloc_setting(tmp_path):
    # pinned to the CPU: the malloc setting changes CPU timings only, so a CUDA study has no such check
    url = f"sqlite:///{tmp_path / 's.db'}"
    cpu = ["--device", "cpu", "--max-rounds", "9", "--storage", url, "--no-progress", "--no-retime"]
    autoprec_cli("search", str(TINY), "--trials", "1", *cpu)
    study = load_study(url, "tiny_mlp")
    assert study.user_attrs["autoprec"]["cpu_freed_memory_kept"] is True
    before = len(study.trials)
    other_malloc = autoprec_cli("search", str(TINY), "--trials", "1", "--malloc-defaults", *cpu, check=False)
    assert other_malloc.returncode == 2 and len(other_malloc.stderr.strip().splitlines()) == 1
    assert "freed memory kept" in other_malloc.stderr and "drop --malloc-defaults" in other_malloc.stderr
    assert len(load_study(url, "tiny_mlp").trials) == before


def test_broken_spec_leaves_no_study(tmp_path):
    bad = tmp_path / "model.py"
    bad.write_text("import torch\ndef build_model():\n    return torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
                   "def example_inputs():\n    return torch.randn(2, 5)\n")
    url = f"sqlite:///{tmp_path / 's.db'}"
    proc = autoprec_cli("search", str(bad), "--max-rounds", "9", "--trials", "2", "--storage", url, check=False)
    assert proc.returncode == 2
    assert "example_inputs" in proc.stderr and str(bad) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.db").exists()  # a store it created for nothing is not left behind
    # a store that already held something keeps it, and gets no study
    optuna.create_study(study_name="other", storage=url)
    proc = autoprec_cli("search", str(bad), "--max-rounds", "9", "--trials", "2", "--storage", url, check=False)
    assert proc.returncode == 2
    storage = optuna.storages.RDBStorage(url)
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["other"]


def test_sigkill_mid_trial_then_resume_fails_the_stale_trial(tmp_path):
    log = tmp_path / "calls.log"
    env = {"SLOW_MLP_LOG": str(log), "SLOW_MLP_SLEEP": "1.5", "AUTOPREC_HEARTBEAT_S": "1", "AUTOPREC_GRACE_S": "2"}
    url = f"sqlite:///{tmp_path / 's.db'}"
    args = [sys.executable, "-m", "autoprec", "search", str(SPECS / "slow_mlp.py"), "--max-rounds", "9", "--storage", url,
            "--no-progress", "--study", "slow"]
    proc = subprocess.Popen([*args, "--trials", "6"], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # one call for the fp32 reference, then one per trial: the 4th call is trial 2 in progress
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.1)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    study = load_study(url, "slow")
    running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1, "the killed trial is left RUNNING until its heartbeat goes stale"
    killed = running[0].number
    complete_before = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    time.sleep(3)  # past the grace period
    resumed = subprocess.run([*args, "--trials", "3"], env={**os.environ, **env}, check=True, capture_output=True,
                             text=True, timeout=300)
    assert "\n3 trials run, " in resumed.stdout, "the stale trial and its retry are not this run's extra trials"
    study = load_study(url, "slow")
    states = {t.number: t.state for t in study.trials}
    assert states[killed] == optuna.trial.TrialState.FAIL
    # its process is gone on this host: failed at once (a worker on another host: after the grace)
    assert study.trials[killed].user_attrs["failure_reason"] == schema.OWNER_GONE
    assert optuna.trial.TrialState.RUNNING not in states.values()
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == complete_before + 3
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE


def test_torchao_deprecation_chatter_stays_out_of_the_output_and_other_warnings_do_not(tmp_path):
    spec = tmp_path / "model.py"
    spec.write_text(
        "import warnings, torch\n"
        "def build_model():\n"
        "    warnings.warn('Deprecation: PlainLayout is deprecated and will be removed in a future release of "
        "torchao, see https://github.com/pytorch/ao/issues/2752 for more details')\n"
        "    warnings.warn('a warning of the user model')\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "def example_inputs():\n    return torch.randn(2, 4)\n")
    proc = autoprec_cli("layers", str(spec))
    assert "PlainLayout" not in proc.stderr
    assert "a warning of the user model" in proc.stderr


def test_study_threads_are_set_at_creation_and_shared_among_workers(monkeypatch):
    from autoprec.errors import StoreError
    from autoprec.search.study_setup import study_threads

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("AUTOPREC_THREADS", "6")
    assert study_threads(cpu, None, None, 1, "s") == 6
    assert study_threads(cpu, None, None, 4, "s") == 1  # 4 workers share the 6 threads' cores
    assert study_threads(cpu, None, 3, 4, "s") == 3
    assert study_threads(cpu, "2", None, 1, "s") == 2  # a resume keeps the study's
    assert study_threads(cpu, "2", 2, 1, "s") == 2
    assert study_threads(cuda, "2", None, 1, "s") is None  # threads do not time a GPU
    with pytest.raises(StoreError, match=r"timed with 2 threads on the CPU.*drop --threads 6.*--study NEW_NAME"):
        study_threads(cpu, "2", 6, 1, "s")


def test_a_resume_times_with_the_studys_threads_and_refuses_others(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    cpu = ["--device", "cpu", "--max-rounds", "9", "--storage", url, "--no-progress", "--no-retime"]
    autoprec_cli("search", str(TINY), "--trials", "1", "--threads", "1", *cpu)
    assert load_study(url, "tiny_mlp").user_attrs["autoprec"]["environment"]["threads"] == "1"
    before = len(load_study(url, "tiny_mlp").trials)
    other = autoprec_cli("search", str(TINY), "--trials", "1", "--threads", "2", *cpu, check=False)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "timed with 1 thread on the CPU" in other.stderr and "drop --threads 2" in other.stderr
    assert len(load_study(url, "tiny_mlp").trials) == before
    # without --threads the resume takes the study's count, whatever this machine's default is
    from autoprec.search.loop import Search, SearchConfig
    from autoprec.measure.machine import usable_cores

    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AUTOPREC_THREADS", "2")
            search = Search.open(SearchConfig(model=str(TINY), storage=url, device="cpu", progress=False))
            assert search.threads == 1 and torch.get_num_threads() == 1
        assert "oversubscribe" not in capsys.readouterr().err
        workers = usable_cores() + 1  # each at the study's one thread: one more than the machine has cores
        Search.open(SearchConfig(model=str(TINY), storage=url, device="cpu", progress=False, workers=workers))
        assert f"{workers} x 1 thread (study 'tiny_mlp''s) oversubscribe" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_a_bare_layer_as_the_model_is_told_to_wrap_it(tmp_path):
    from autoprec.errors import AutoprecError
    from autoprec.search.loop import SearchConfig, run_search

    bare = tmp_path / "model.py"
    bare.write_text("import torch\ndef build_model():\n    return torch.nn.Linear(4, 4)\n"
                    "def example_inputs():\n    return torch.randn(2, 4)\n")
    with pytest.raises(AutoprecError, match=r"bare Linear.*torch\.nn\.Sequential\(layer\)"):
        run_search(SearchConfig(model=str(bare), trials=1, storage=f"sqlite:///{tmp_path / 's.db'}", progress=False))
    assert not (tmp_path / "s.db").exists()


def test_a_resume_whose_layer_formats_changed_is_refused_in_one_line():
    """A study made when a layer could take int8 (before autoprec stopped offering it there) cannot be
    resumed over other values: Optuna raised 'CategoricalDistribution does not support dynamic value space'."""
    from autoprec.errors import StoreError
    from autoprec.search.study_setup import check_choices

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    trial = study.ask()
    trial.suggest_categorical(schema.LAYER_PARAM + "fc", ["fp32", "bf16", "int8"])
    study.tell(trial, (1.0, 1.0, 1.0))
    check_choices(study, {"fc": ("fp32", "bf16", "int8")}, "s")  # the same: resumes
    with pytest.raises(StoreError, match=r"layer 'fc' could take fp32, bf16, int8; this autoprec offers it fp32, bf16"):
        check_choices(study, {"fc": ("fp32", "bf16")}, "s")
