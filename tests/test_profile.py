"""The sensitivity profile's drops: the linearized estimate against whole-model forwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoprec.precision.layers import searchable_layers
from autoprec.guided.sensitivity import build_profile, exact_drops, linearized_drops
from autoprec.model.model_file import load_spec

SPECS = Path(__file__).parent / "specs"
CPU = torch.device("cpu")


def _setup(name: str):
    spec = load_spec(SPECS / name)
    model = spec.new_model()
    names = [layer.name for layer in searchable_layers(model)]
    return spec, model, spec.example(), names, {n: ("fp32", "bf16", "int8") for n in names}


@pytest.mark.slow
def test_linearized_drops_agree_with_whole_model_forwards():
    torch.manual_seed(0)
    spec, model, example, names, choices = _setup("residual_block.py")
    linear, skipped = linearized_drops(spec, model, example, names, choices, CPU, probes=16)
    exact = exact_drops(spec, model, example, names, choices, CPU)
    assert skipped == []
    for fmt in ("bf16", "int8"):
        a = np.array([linear[n][fmt] for n in names])
        b = np.array([exact[n][fmt] for n in names])
        assert (b > 0).all()
        # what the cost model uses: the sum (calibrated later) and the layers' sizes relative to each other
        assert 0.8 < a.sum() / b.sum() < 1.25, (fmt, a, b)
        assert np.corrcoef(np.log(a), np.log(b))[0, 1] > 0.9, (fmt, a, b)
        assert np.all((a / b > 0.5) & (a / b < 2.0)), (fmt, a / b)
    assert all(linear[n]["fp32"] == 0.0 for n in names)


@pytest.mark.slow
def test_linearized_profile_is_seeded_and_leaves_the_model_unchanged():
    spec, model, example, names, choices = _setup("residual_block.py")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = build_profile(spec, model, example, choices, ("fp32",), CPU)
    second = build_profile(spec, model, example, choices, ("fp32",), CPU)
    assert first.method == "linearized"
    assert {n: {f: v["drop"] for f, v in d.items()} for n, d in first.layers.items()} == \
        {n: {f: v["drop"] for f, v in d.items()} for n, d in second.layers.items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class _Detached(nn.Module):
    """Its output has no gradient path to the layers: the profile must fall back to exact drops."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        with torch.no_grad():
            return self.b(torch.relu(self.a(x)))


class _Shared(nn.Module):
    """One layer called twice: measured exactly, the others linearized."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        self.b(x)
        return self.a(x)


class _Spec:
    path = "inline"
    output = None

    def compared_tensor(self, outputs):
        return outputs


def test_profile_falls_back_to_exact_drops_where_no_gradient_reaches():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    choices = {"a": ("fp32", "int8"), "b": ("fp32", "int8")}
    model = _Detached().eval()
    profile = build_profile(_Spec(), model, x, choices, ("fp32",), CPU)
    assert profile.method.startswith("exact (linearized failed")
    exact = exact_drops(_Spec(), model, x, list(choices), choices, CPU)
    assert {n: profile.layers[n]["int8"]["drop"] for n in choices} == {n: exact[n]["int8"] for n in choices}

    shared = _Shared().eval()
    drops, skipped = linearized_drops(_Spec(), shared, x, list(choices), choices, CPU)
    assert skipped == ["a"] and "b" in drops
    # a layer whose output is not used gets no gradient: measured exactly (drop 0), not guessed
    unused = _Unused().eval()
    drops, skipped = linearized_drops(_Spec(), unused, x, list(choices), choices, CPU)
    assert skipped == ["b"] and drops["a"]["int8"] > 0
    profile = build_profile(_Spec(), shared, x, choices, ("fp32",), CPU)
    assert profile.layers["a"]["int8"]["drop"] == exact_drops(_Spec(), shared, x, ["a"], choices, CPU)["a"]["int8"]


@pytest.mark.cuda
def test_linearized_profile_runs_on_cuda_and_agrees_with_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    from autoprec.model.model_file import move_inputs

    cuda = torch.device("cuda")
    spec, model, example, names, choices = _setup("residual_block.py")
    choices = {n: ("fp32", "bf16") for n in names}
    on_cpu = build_profile(spec, model, example, choices, ("fp32",), CPU)
    on_cuda = build_profile(spec, model.to(cuda), move_inputs(example, cuda), choices, ("fp32",), cuda)
    assert on_cuda.method == "linearized", on_cuda.method
    for name in names:
        a, b = on_cpu.layers[name]["bf16"]["drop"], on_cuda.layers[name]["bf16"]["drop"]
        assert 0.5 < b / a < 2.0, (name, a, b)


class _TiedLM(nn.Module):
    """An input embedding and an output head sharing one weight (GPT-2's wte and lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(512, 64)
        self.mix = nn.Linear(64, 64)
        self.head = nn.Linear(64, 512, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.embed(ids))))


def test_the_memory_of_a_tied_layer_in_another_format_keeps_its_partners_weight():
    """int8 on a tied head gives it an int8 copy while the embedding keeps the fp32 weight: the model
    grows. Predicted from the profile and the fp32 trial, every policy's memory is exact."""
    import copy

    from autoprec.guided.cost_model import CostModel
    from autoprec.precision import apply_formats, module_storage_bytes
    from autoprec.model.model_file import ModelSpec

    def build():
        torch.manual_seed(0)
        return _TiedLM().eval()

    spec = ModelSpec(path=Path("<tied lm>"), build_model=build, example_inputs=lambda: torch.arange(16).reshape(2, 8))
    model = spec.new_model()
    choices = {"mix": ("fp32", "bf16", "int8"), "head": ("fp32", "bf16", "int8")}
    profile = build_profile(spec, model, spec.example(), choices, ("fp32",), CPU)
    fp32 = {n: "fp32" for n in choices}
    cost = CostModel(profile, choices)
    cost.calibrate({"fp32": ("fp32", fp32, {"drop": 0.0, "latency_ms": 1.0,
                                            "memory_bytes": module_storage_bytes(model)})})
    for layers in ({"mix": "int8", "head": "int8"}, {"mix": "fp32", "head": "bf16"}, {"mix": "int8", "head": "fp32"}):
        measured = module_storage_bytes(apply_formats(copy.deepcopy(model), layers))
        assert cost.predict("fp32", layers)["memory_bytes"] == pytest.approx(measured, rel=0.01), layers
    assert module_storage_bytes(apply_formats(copy.deepcopy(model), {"head": "int8"})) > module_storage_bytes(model)
