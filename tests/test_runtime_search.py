"""A study's runtime end to end: chosen at creation, fixed on resume, recorded in the trials and the
exported policy, reproduced by `autoprec apply`; a candidate that does not compile is a FAIL trial.

One compiled study of the tiny MLP (two uniform trials) serves every test: torch.compile costs seconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
import torch

from helpers import TINY, load_study, autoprec_cli

pytestmark = pytest.mark.slow  # searches in subprocesses

CPU = ["--device", "cpu", "--max-rounds", "9", "--no-progress", "--no-retime", "--strategy", "random"]


@pytest.fixture(scope="module")
def compiled_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compiled")
    url = f"sqlite:///{folder / 's.db'}"
    proc = autoprec_cli("search", str(TINY), "--trials", "2", "--runtime", "compiled", "--storage", url, *CPU)
    return folder, url, proc


def test_the_runtime_is_recorded_with_compile_times_and_the_cache_beside_the_store(compiled_study):
    folder, url, proc = compiled_study
    assert "compiled runtime" in proc.stdout and "compile s" in proc.stdout
    study = load_study(url, "tiny_mlp")
    assert study.user_attrs["autoprec"]["runtime"] == "compiled"
    # the format probe times the compiled kernels the candidates run, so its pruning holds here too
    info = study.user_attrs["autoprec"]
    assert info["prune"] is True and info["probe"]["machine"]["runtime"] == "compiled"
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    assert all(t.user_attrs["measurement"]["runtime"] == "compiled" for t in done)
    assert all(t.user_attrs["measurement"]["compile_s"] >= 0 for t in done)
    assert any((folder / "s.db.inductor").iterdir())  # inductor's caches, beside the store
    autoprec_cli("trials", "--storage", url, "--study", "tiny_mlp", "-o", str(folder / "t.csv"))
    rows = [r for r in csv.DictReader((folder / "t.csv").open()) if r["state"] == "COMPLETE"]
    assert len(rows) == 2 and all(float(r["compile_s"]) >= 0 for r in rows)


def test_a_resume_with_another_runtime_is_refused_and_writes_nothing(compiled_study):
    _, url, _ = compiled_study
    before = len(load_study(url, "tiny_mlp").trials)
    other = autoprec_cli("search", str(TINY), "--trials", "1", "--runtime", "eager", "--storage", url, *CPU, check=False)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "in the compiled runtime" in other.stderr and "drop --runtime eager" in other.stderr
    assert len(load_study(url, "tiny_mlp").trials) == before


def test_the_exported_policy_records_the_runtime_and_apply_uses_it(compiled_study):
    folder, url, _ = compiled_study
    policy = folder / "policy.json"
    autoprec_cli("export", "--storage", url, "--study", "tiny_mlp", "--pick", "fastest", "-o", str(policy))
    assert json.loads(policy.read_text())["measured"]["runtime"] == "compiled"
    out = autoprec_cli("apply", str(policy), str(TINY), "--device", "cpu").stdout
    assert "compiled runtime, as the study timed it" in out


def test_a_candidate_that_does_not_compile_is_a_failed_trial_with_the_reason(compiled_study, monkeypatch):
    import torch._inductor.compile_fx as compile_fx

    from autoprec.search.loop import Search, SearchConfig

    _, url, _ = compiled_study
    threads = torch.get_num_threads()
    try:
        search = Search.open(SearchConfig(model=str(TINY), storage=url, device="cpu", progress=False,
                                          strategy="random", retime_front=False))
        assert search.evaluator.runtime == "compiled"  # the study's, without --runtime

        def broken(*args, **kwargs):
            raise RuntimeError("no kernel for this (test)")

        monkeypatch.setattr(compile_fx, "compile_fx", broken)
        search.run(1)
    finally:
        torch.set_num_threads(threads)
    failed = [t for t in load_study(url, "tiny_mlp").trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1
    assert failed[0].user_attrs["failure_reason"].startswith("torch.compile failed: RuntimeError: no kernel for this")


def test_the_default_runtime_is_compiled_on_cuda_and_eager_on_the_cpu():
    from autoprec.search.study_setup import inductor_cache_dir, study_runtime

    assert study_runtime(torch.device("cuda"), None, None, "s") == "compiled"
    assert study_runtime(torch.device("cpu"), None, None, "s") == "eager"
    assert study_runtime(torch.device("cpu"), "compiled", None, "s") == "compiled"  # a resume keeps the study's
    assert inductor_cache_dir("sqlite:///a/b.db") == Path("a/b.db.inductor")
    assert inductor_cache_dir("sqlite://") is None
