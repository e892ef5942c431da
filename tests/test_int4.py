"""int4 weight-only (torchao, group size 128): its refusals on the CPU and on GPUs or shapes that cannot take
it, its place in policies and search spaces; on CUDA, the converted layer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from autoprec.errors import UnsupportedFormat
from autoprec.policy import Policy, load_policy, policy_from_json
from autoprec.precision import DTYPES, HANDLERS, apply_formats, module_storage_bytes
from autoprec.search.space import space_from_dict

INT4 = HANDLERS["int4"]
CUDA = torch.device("cuda")


def _gpu(monkeypatch, capability: tuple[int, int], name: str = "Test GPU") -> None:
    """Make unsupported_reason see a CUDA GPU of `capability` (it only asks torch.cuda about it)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_int4_is_a_known_format_that_cannot_be_a_default():
    assert "int4" in DTYPES
    assert INT4.io_dtype(CUDA) == torch.bfloat16 and not INT4.needs_calibration(nn.Linear(128, 8))
    with pytest.raises(Exception, match="field 'default' is 'int4'"):
        Policy(layers={}, default="int4")


def test_int4_is_refused_off_cuda_with_the_reason():
    reason = INT4.unsupported_reason(nn.Linear(256, 64), torch.device("cpu"))
    assert reason is not None and "int4 needs a CUDA GPU of compute capability 8.0 or higher" in reason
    assert "not cpu" in reason


def test_int4_is_for_linear_layers_only(monkeypatch):
    _gpu(monkeypatch, (9, 0))
    for module in (nn.Conv2d(128, 8, 3), nn.Conv1d(128, 8, 1)):
        reason = INT4.unsupported_reason(module, CUDA)
        assert reason is not None and f"int4 is weight-only for Linear layers, not {type(module).__name__}" in reason


def test_int4_is_refused_below_compute_capability_8(monkeypatch):
    _gpu(monkeypatch, (7, 5), "Tesla T4")
    reason = INT4.unsupported_reason(nn.Linear(256, 64), CUDA)
    assert reason == "int4 needs compute capability 8.0 or higher; Tesla T4 has 7.5"


def test_int4_needs_input_features_in_groups_of_128(monkeypatch):
    _gpu(monkeypatch, (8, 0))
    reason = INT4.unsupported_reason(nn.Linear(192, 64), CUDA)
    assert reason is not None and "groups of 128 input features; this layer has 192" in reason
    # output features are padded by the kernel: any count is taken
    assert INT4.unsupported_reason(nn.Linear(256, 100), CUDA) is None
    assert INT4.unsupported_reason(nn.Linear(2048, 32000, bias=False), CUDA) is None


def test_int4_reads_a_transformers_conv1d_weight_transposed(monkeypatch):
    from transformers.pytorch_utils import Conv1D

    _gpu(monkeypatch, (9, 0))
    assert INT4.unsupported_reason(Conv1D(64, 256), CUDA) is None  # nf=64 outputs, nx=256 inputs
    reason = INT4.unsupported_reason(Conv1D(256, 64), CUDA)
    assert reason is not None and "this layer has 64" in reason


def test_int4_policy_round_trips_through_its_file(tmp_path):
    policy = Policy(layers={"0": "int4", "2": "bf16", "4": "int4"}, default="bf16")
    assert policy.counts()["int4"] == 2
    path = policy.save(tmp_path / "policy.json")
    again = load_policy(path)
    assert again.layers == policy.layers and again.default == "bf16"
    assert policy_from_json(json.loads(path.read_text())).to_json() == policy.to_json()


def test_int4_in_a_search_space_and_dropped_from_the_cpu_choices():
    space = space_from_dict({"name": "gpu", "dtypes": ["fp32", "bf16", "fp8", "int4"],
                             "default_dtypes": ["bf16"]}, "gpu.yaml")
    assert space.dtypes == ("fp32", "bf16", "fp8", "int4")
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 8))
    choices = space.choices(model, torch.device("cpu"))
    assert choices and all("int4" not in formats for formats in choices.values())


def test_int4_policy_is_refused_on_the_cpu_naming_the_layer():
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 8))
    with pytest.raises(UnsupportedFormat, match="layer '0': int4 needs a CUDA GPU"):
        apply_formats(copy.deepcopy(model), {"0": "int4"}, device="cpu")


@pytest.mark.cuda
def test_cuda_int4_linear_packs_its_weight_and_stays_close():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if torch.cuda.get_device_capability() < (8, 0):
        with pytest.raises(UnsupportedFormat, match="compute capability 8.0"):
            apply_formats(nn.Sequential(nn.Linear(256, 64)).cuda(), {"0": "int4"}, device="cuda")
        return
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 1024)).cuda().eval()
    x = torch.randn(64, 1024, device="cuda")
    with torch.inference_mode():
        reference = model(x)
    candidate = apply_formats(copy.deepcopy(model), {"0": "int4", "2": "int4"}, "fp32", "cuda")
    assert type(candidate[0].weight).__name__ == "Int4TilePackedTo4dTensor", type(candidate[0].weight)
    with torch.inference_mode():
        out = candidate(x)
        compiled = torch.compile(candidate)(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    cos = nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert cos > 0.99, float(cos)
    assert torch.allclose(compiled, out, rtol=2e-2, atol=2e-2)
    # half a byte per weight plus a bf16 scale and zero point per 128 weights, against 4 bytes in fp32
    fp32_bytes = module_storage_bytes(model)
    assert module_storage_bytes(candidate) < 0.2 * fp32_bytes
