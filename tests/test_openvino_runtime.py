"""The openvino runtime: autoprec's layers mapped to OpenVINO nodes, NNCF quantizing exactly the policy's
int8 layers, a short study through the CLI, and the one-line refusal without the extra."""

from __future__ import annotations

import builtins
import json

import optuna
import pytest
import torch
from torch import nn

from autoprec.errors import AutoprecError, UnsupportedFormat
from autoprec.measure import openvino_runtime as ovr
from autoprec.policy import Policy
from autoprec.precision.layers import searchable_layers
from helpers import TINY, autoprec_cli


def _conv() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    return model.eval()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


class _Attention(nn.Module):
    """One attention head: the products q @ k^T and p @ v (or SDPA) are of two activations."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sdpa = sdpa
        self.query, self.key, self.value, self.out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.sdpa:
            return self.out(nn.functional.scaled_dot_product_attention(q, k, v))
        return self.out(torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v)


CASES = [(_conv, (2, 3, 8, 8)), (_mlp, (4, 16))]


@pytest.mark.slow
@pytest.mark.parametrize("build,shape", CASES)
def test_every_layer_maps_to_one_node_and_int8_quantizes_only_it(build, shape) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    model = build()
    batches = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    runtime = ovr.OpenVINORuntime(model, batches[0], batches, threads=1)
    layers = [layer.name for layer in searchable_layers(model)]
    assert sorted(runtime.nodes) == sorted(layers)  # every layer found (the BatchNorm-folded conv by value)
    assert len(set(runtime.nodes.values())) == len(layers)  # each to its own node
    for layer in layers:
        quantized = ovr.int8_nodes(runtime.quantized([layer]))
        assert quantized <= {runtime.nodes[layer]}  # nothing but the layer's node
    assert ovr.int8_nodes(runtime.quantized(layers[:1])) == {runtime.nodes[layers[0]]}
    # a candidate runs like the torch model: same output structure, close values
    out = runtime.candidate(Policy(layers={layers[0]: "int8"}))(batches[1])
    assert isinstance(out, torch.Tensor) and out.shape == model(batches[1]).shape
    assert torch.allclose(out, model(batches[1]), atol=0.1)


def _quantized_inputs(ov_model, op_type: str) -> list[int]:
    """For each `op_type` node with no weight, how many of its first two inputs come from a FakeQuantize."""
    counts = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() == op_type and ovr._weight_constant(op) is None:
            sources = [op.input(i).get_source_output().get_node() for i in range(2)]
            for i, source in enumerate(sources):
                while source.get_type_name() in ("Reshape", "Transpose", "Multiply", "Divide"):
                    source = source.input(0).get_source_output().get_node()
                sources[i] = source
            counts.append(sum(s.get_type_name() == "FakeQuantize" for s in sources))
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
def test_products_of_two_activations_are_int8_only_where_their_feeding_layers_are(sdpa) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    model = _Attention(sdpa).eval()
    batches = [torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    runtime = ovr.OpenVINORuntime(model, batches[0], batches, threads=1)
    assert sorted(runtime.nodes) == ["key", "out", "query", "value"]
    op_type = "ScaledDotProductAttention" if sdpa else "MatMul"
    products = [op for op in runtime.fp32.get_ordered_ops()
                if op.get_type_name() == op_type and ovr._weight_constant(op) is None]
    assert len(products) == (1 if sdpa else 2)
    assert ovr.feeding_nodes(products[0]) == {runtime.nodes[n] for n in (("query", "key", "value") if sdpa
                                                                         else ("query", "key"))}
    everything = _quantized_inputs(runtime.quantized(runtime.layers), op_type)
    assert everything and all(n > 0 for n in everything)  # the whole graph int8, as NNCF quantizes it alone
    assert _quantized_inputs(runtime.quantized(["key", "value", "out"]), op_type) == [0] * len(products)
    assert _quantized_inputs(runtime.quantized(["out"]), op_type) == [0] * len(products)


BF16_CHECK = """
import torch
from autoprec.measure import openvino_runtime as ovr
from test_openvino_runtime import _Attention
model = _Attention(sdpa=False).eval()
x = torch.randn(2, 8, 16)
runtime = ovr.OpenVINORuntime(model, x, [x], threads=1)
try:
    runtime.compile(runtime.fp32, "bf16")
    compiled = True
except RuntimeError:
    compiled = False
print(ovr.bf16_runs(), compiled)
"""


@pytest.mark.slow
@pytest.mark.parametrize("cap", [None, "AVX2"])
def test_the_bf16_check_agrees_with_compiling_attention_at_bf16(cap, monkeypatch) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    tests = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", BF16_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    said, compiled = out.stdout.split()[-2:]
    assert said == compiled
    if said == "False":  # where bf16 cannot run, a bf16 candidate is a refusal with its reason
        monkeypatch.setattr(ovr, "bf16_runs", lambda: False)
        runtime = ovr.OpenVINORuntime(_Attention(sdpa=False).eval(), torch.randn(2, 8, 16), [torch.randn(2, 8, 16)])
        with pytest.raises(UnsupportedFormat, match="cannot compile bf16 here"):
            runtime.candidate(Policy(default="bf16"))


def test_float_precision_and_refused_formats() -> None:
    assert ovr.float_precision(Policy(default="bf16")) == "bf16"
    assert ovr.float_precision(Policy(default="bf16", layers={"a": "fp32"})) == "f32"
    assert ovr.float_precision(Policy(default="fp32", layers={"a": "bf16"})) == "f32"
    assert ovr.float_precision(Policy(default="bf16", layers={"a": "int8"})) == "bf16"
    assert ovr.float_precision(Policy(default="fp32", layers={"a": "int8"})) == "f32"
    assert ovr.int8_layers(Policy(layers={"a": "int8"}), ["a", "b"]) == ["a"]
    with pytest.raises(AutoprecError, match="fp16 does not run in the openvino runtime"):
        ovr.int8_layers(Policy(layers={"a": "fp16"}), ["a"])


def test_refused_in_one_line_without_the_extra(monkeypatch) -> None:
    real = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name in ("openvino", "nncf"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(AutoprecError) as err:
        ovr.require_openvino()
    assert str(err.value) == "--runtime openvino needs the openvino extra: pip install 'autoprec[openvino]'"


@pytest.mark.slow
def test_short_openvino_study_through_the_cli(tmp_path) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    url = f"sqlite:///{tmp_path}/s.db"
    autoprec_cli("search", str(TINY), "--runtime", "openvino", "--trials", "4", "--strategy", "random",
                 "--storage", url)
    trials = optuna.load_study(study_name="tiny_mlp", storage=url).trials
    uniform = {t.user_attrs.get("origin"): t.params for t in trials}
    # the uniform int8 policy is NNCF's whole graph as OpenVINO runs it by default: the rest at bf16
    assert uniform["uniform int8"]["default"] == "bf16"
    assert uniform["uniform fp32"]["default"] == "fp32"
    # a resume without --runtime keeps the study's runtime and its formats
    autoprec_cli("search", str(TINY), "--trials", "1", "--strategy", "random", "--storage", url)
    assert len(optuna.load_study(study_name="tiny_mlp", storage=url).trials) == len(trials) + 1
    out = tmp_path / "p.json"
    autoprec_cli("export", "--study", "tiny_mlp", "--pick", "fastest", "-o", str(out), "--ir", str(tmp_path / "ir"),
                 "--storage", url)
    text = out.read_text()
    assert '"runtime": "openvino"' in text
    assert all(f not in text for f in ('"fp16"', '"fp8"', '"int4"'))
    import openvino as ov

    ir = ov.Core().read_model(str(tmp_path / "ir" / "model.xml"))  # the IR loads, with the policy's int8 layers
    int8 = [name for name, fmt in json.loads(text)["layers"].items() if fmt == "int8"]
    assert bool(ovr.int8_nodes(ir)) == bool(int8)
