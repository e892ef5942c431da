"""Training mode: per-layer mixed precision with loss scale and learning rate searched."""

from __future__ import annotations

import pytest
import optuna
import torch
from torch import nn

import autoprec
from autoprec.training import fake_quant_int8, make_optimizer, make_scaler, prepare_training, training_context
from helpers import SPECS, autoprec_cli

pytestmark = pytest.mark.slow  # searches in subprocesses


def _complete(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=url)
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def test_fp16_with_loss_scale_1_loses_small_gradients_and_a_large_scale_keeps_them(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    autoprec_cli("search", str(SPECS / "underflow.py"), "--max-rounds", "9", "--space", str(SPECS / "underflow_space.yaml"),
                 "--storage", url, "--strategy", "random", "--trials", "6", "--seed", "0", "--no-progress",
                 "--no-retime", "--max-drop", "1.0")
    by_scale: dict[float, list[dict[str, float]]] = {}
    for t in _complete(url, "underflow"):
        zero = t.user_attrs["measurement"]["training"]["zero_grad_fraction"]
        by_scale.setdefault(t.params["loss_scale"], []).append(zero)
    assert set(by_scale) == {1.0, 65536.0}, "the seeded search tried both loss scales"
    for zero in by_scale[1.0]:
        assert max(zero.values()) == 1.0, "with scale 1 every fp16 gradient of some layer underflows to zero"
    for zero in by_scale[65536.0]:
        assert max(zero.values()) < 0.05


def _scores(url: str) -> list[tuple]:
    return [(t.number, sorted(t.params.items()), t.values[0]) for t in _complete(url, "tiny_train")]


def test_seeded_training_search_is_reproducible(tmp_path):
    args = ["search", str(SPECS / "tiny_train.py"), "--max-rounds", "9", "--space", str(SPECS / "train_space.yaml"), "--strategy",
            "random", "--trials", "5", "--seed", "3", "--no-progress", "--no-retime", "--max-drop", "0.2"]
    first, second = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    autoprec_cli(*args, "--storage", first)
    autoprec_cli(*args, "--storage", second)
    assert _scores(first) == _scores(second)
    assert len(_scores(first)) >= 4
    trial = _complete(first, "tiny_train")[0]
    training = trial.user_attrs["measurement"]["training"]
    assert training["steps"] == 12 and training["step_ms"] > 0 and len(training["losses"]) >= 2
    # the step time beside an fp32 step, timed interleaved: a ratio with its confidence interval
    assert training["step_ratio"] > 0 and training["step_ratio_ci"] >= 1.0
    # the exported policy carries its training section and trains in a user's own loop
    target = tmp_path / "policy.json"
    autoprec_cli("export", "--storage", first, "--study", "tiny_train", "--pick", "best-score", "-o", str(target))
    policy = autoprec.load_policy(target)
    assert policy.training is not None and policy.training.steps == 12
    spec = __import__("autoprec.model.model_file", fromlist=["load_spec"]).load_spec(SPECS / "tiny_train.py")
    model = spec.build_model()
    optimizer, scaler = make_optimizer(model, policy), make_scaler(policy, "cpu")
    with training_context(model, policy):
        for inputs, targets in spec.train_batches():
            loss = spec.loss(model(inputs), targets)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    assert "forward" not in vars(model[0]), "leaving the context restores the layers' own forward"
    model = autoprec.apply_policy(model, policy)
    assert torch.isfinite(model(spec.example_inputs()).float()).all()


def test_training_space_without_train_batches_is_refused(tmp_path):
    proc = autoprec_cli("search", str(SPECS / "tiny_mlp.py"), "--max-rounds", "9", "--space", str(SPECS / "train_space.yaml"),
                        "--storage", f"sqlite:///{tmp_path / 's.db'}", "--trials", "1", check=False)
    assert proc.returncode == 2 and "train_batches" in proc.stderr


def test_fake_quant_rounds_forward_and_passes_gradient_straight_through():
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    y = fake_quant_int8(x, 0)
    assert len(torch.unique((y / (x.abs().amax(1, keepdim=True) / 127)).round(decimals=3))) <= 255
    assert (y - x).abs().max() <= x.abs().max() / 127
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_int8_layer_trains_with_fake_quant_and_fp32_layer_leaves_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    policy = autoprec.Policy(default="bf16", layers={"0": "int8", "2": "fp32"})
    handle = prepare_training(model, policy, "cpu")
    out = model(torch.randn(3, 8))
    assert out.dtype == torch.float32  # last layer fp32, outside the bf16 autocast of the rest
    out.sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.dtype == torch.float32
    handle.remove()
    assert "forward" not in vars(model) and "forward" not in vars(model[0])


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_formats_without_a_fake_quantized_form_are_refused_for_training(fmt):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=f"{fmt} layers cannot be fine-tuned"):
        prepare_training(model, autoprec.Policy(layers={"0": fmt}))
