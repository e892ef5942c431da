"""studies/llama: the tiny decoder end to end through the CLI (search, export, apply), and its score."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoprec.precision import apply_formats

STUDY = Path(__file__).resolve().parent.parent / "studies" / "llama" / "model.py"
ENV = {"AUTOPREC_LLAMA_SIZE": "tiny", "AUTOPREC_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def autoprec_cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "autoprec", *args], capture_output=True, text=True,
                          env={**os.environ, **ENV}, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"autoprec {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def tiny(monkeypatch):
    """The study's module, freshly imported (nothing cached), at its tiny size."""
    monkeypatch.setenv("AUTOPREC_LLAMA_SIZE", "tiny")
    spec = importlib.util.spec_from_file_location("llama_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_decoder_searches_exports_and_applies(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = autoprec_cli("search", str(STUDY), "--trials", "4", "--max-rounds", "3", "--storage", url,
                          "--seed", "1", "--no-progress", "--space", "cpu", "--no-prune", "--no-retime")
    assert "study 'llama'" in search.stdout and "15 searchable layers" in search.stdout
    assert "Feasible Pareto front" in search.stdout
    front = json.loads(autoprec_cli("front", "--storage", url, "--study", "llama", "--format", "json").stdout)
    assert {"uniform fp32", "uniform int8"} <= {row["origin"] for row in front}
    policy = tmp_path / "policy.json"
    autoprec_cli("export", "--storage", url, "--study", "llama", "--pick", "smallest", "-o", str(policy))
    exported = json.loads(policy.read_text())
    assert len(exported["layers"]) == 15 and {"int8", "int8_static"} & set(exported["layers"].values())
    applied = autoprec_cli("apply", str(policy), str(STUDY), "--device", "cpu")
    score = next(line for line in applied.stdout.splitlines() if line.startswith("score "))
    fp32_score, policy_score = float(score.split()[1]), float(score.split()[2])
    assert fp32_score == 1.0
    # the score is a KL divergence of next-token distributions: the same policy scores the same here
    assert policy_score == pytest.approx(exported["measured"]["score"], abs=1e-6)
    assert 1.0 - 0.01 <= policy_score < 1.0


def test_score_is_one_minus_the_mean_kl_to_fp32(tiny):
    model = tiny.build_model()
    assert sum(p.numel() for p in model.parameters()) == 147_776
    assert tiny.evaluate(model, torch.device("cpu")) == pytest.approx(1.0, abs=1e-7)
    bf16 = tiny.evaluate(apply_formats(copy.deepcopy(model), {}, "bf16", "cpu"), torch.device("cpu"))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    int8 = tiny.evaluate(apply_formats(copy.deepcopy(model), {n: "int8" for n in linears}, "fp32", "cpu"),
                         torch.device("cpu"))
    # both lose a little of the fp32 distributions, int8 more than bf16
    assert 0 < 1 - bf16 < 1 - int8 < 0.01


def test_next_token_distributions_are_peaked_not_uniform(tiny):
    """The rescaled initialisation: logits of std LOGIT_STD, so a format's damage shows in the KL."""
    ref = tiny.reference_log_probs()
    assert len(ref) == tiny.EVAL_BATCHES and ref[0].shape == (2, 32, 512)
    entropy = float(-(ref[0].exp() * ref[0]).sum(-1).mean())
    assert entropy < 0.5 * torch.log(torch.tensor(512.0)).item()


def test_reference_is_computed_once_and_kept_on_the_cpu(tiny, monkeypatch):
    first = tiny.reference_log_probs()
    monkeypatch.setattr(tiny, "build_model", lambda: pytest.fail("the reference was computed again"))
    assert tiny.reference_log_probs() is first
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in first)


def test_offloaded_reference_model_computes_what_the_model_does(tiny):
    """On a GPU the reference copy keeps its decoder layers off the device between their calls; the
    hooks that move them change no number (checked here with the CPU as the device)."""
    x = tiny.example_inputs()
    model = tiny.build_model()
    with torch.inference_mode():
        direct = model(**x).logits
        offloaded = tiny._offloaded(tiny.build_model(), torch.device("cpu"))(**x).logits
    assert torch.equal(direct, offloaded)


def test_size_comes_from_the_environment(tiny, monkeypatch):
    assert tiny.example_inputs()["input_ids"].shape == (2, 32)
    monkeypatch.setenv("AUTOPREC_LLAMA_SIZE", "1b")
    cfg = tiny.config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.vocab_size) == (2048, 16, 8192, 32, 32000)
    assert tiny.example_inputs()["input_ids"].shape == (4, 512)
    monkeypatch.setenv("AUTOPREC_LLAMA_SIZE", "7b")
    with pytest.raises(ValueError, match="AUTOPREC_LLAMA_SIZE='7b': use one of tiny, 1b"):
        tiny.size()
