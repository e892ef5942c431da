"""The openvino runtime: autoprec's layers mapped to OpenVINO nodes, NNCF quantizing exactly the policy's
int8 layers, a short study through the CLI, and the one-line refusal without the extra."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from torch import nn

from autoprec.errors import AutoprecError
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


def test_float_precision_and_refused_formats() -> None:
    assert ovr.float_precision(Policy(default="bf16")) == "bf16"
    assert ovr.float_precision(Policy(default="bf16", layers={"a": "fp32"})) == "f32"
    assert ovr.float_precision(Policy(default="fp32", layers={"a": "bf16"})) == "f32"
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
