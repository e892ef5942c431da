"""Static int8 convolutions (CPU), calibration batches, and fp8's refusal off CUDA; fp8 on CUDA."""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
from torch import nn

import autoprec
from autoprec.measure.machine import configure_cpu
from autoprec.errors import PolicyError, SpecError, UnsupportedFormat
from autoprec.measure.evaluator import Evaluator
from autoprec.measure.calibration import policy_recipes
from autoprec.policy import Policy, load_policy, policy_from_json
from autoprec.precision import apply_formats, calibrate, module_storage_bytes
from autoprec.precision.static_int8 import StaticInt8Conv
from autoprec.search.space import load_space
from autoprec.measure.timing import TimingSettings
from autoprec.model.model_file import load_spec
from helpers import FAST, TINY_CONV_SPEC

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvNet(nn.Module):
    """Conv-BN-ReLU x2, a residual add, a Conv1d branch and a Linear head: seeded, BN statistics real."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv1d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x.flatten(2)))
        return self.fc(x.mean(-1))


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    model = ConvNet()
    model.train()
    with torch.no_grad():
        model(images(32, 99))
    return model.eval()


CALIBRATION = [images(8, 10 + i) for i in range(3)]
CONVS = ("conv1", "conv2", "conv3")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).min().item()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def test_per_layer_static_int8_applies_and_stays_close_to_fp32():
    model = conv_net()
    x = images(16, 1)
    reference = run(model, x)
    for names in (["conv2"], list(CONVS)):
        candidate = apply_formats(copy.deepcopy(model), {n: "int8" for n in names}, calibration=CALIBRATION)
        for name in CONVS:
            module = candidate.get_submodule(name)
            assert isinstance(module, StaticInt8Conv) == (name in names), name
            if name in names:
                assert module.weight_int8.dtype == torch.int8
                assert module.weight_scale.shape == (module.out_channels,)  # per-channel
        out = run(candidate, x)
        assert torch.isfinite(out).all() and not torch.equal(out, reference)
        assert cosine(out, reference) > 0.995, names


def _layouts(model: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, bool]:
    """Whether each named module's output is channels_last (and not also plainly contiguous)."""
    seen: dict[str, bool] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _a, out, n=n: seen.__setitem__(n, out.is_contiguous(memory_format=torch.channels_last)
                                                  and not out.is_contiguous())) for n in names]
    run(model, x)
    for hook in hooks:
        hook.remove()
    return seen


def test_an_int8_convolution_keeps_the_layout_its_float_convolution_gives():
    """One int8 layer must not switch the layers after it to channels_last (that made a policy's cost
    depend on its first int8 layer: ResNet-18 with its stem alone in int8 ran 1.2x slower than fp32)."""
    model = conv_net()
    x = images(16, 1)
    float_layouts = _layouts(model, x, ("conv1", "conv2"))
    assert float_layouts == {"conv1": False, "conv2": False}  # a contiguous model stays contiguous
    for names in (["conv1"], ["conv1", "conv2"]):
        candidate = apply_formats(copy.deepcopy(model), {n: "int8" for n in names}, calibration=CALIBRATION)
        assert _layouts(candidate, x, ("conv1", "conv2")) == float_layouts, names

    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert _layouts(channels_last, x, ("conv1", "conv2")) == {"conv1": True, "conv2": True}
    candidate = apply_formats(copy.deepcopy(channels_last), {"conv1": "int8"}, calibration=CALIBRATION)
    assert _layouts(candidate, x, ("conv1", "conv2")) == {"conv1": True, "conv2": True}
    reference = run(model, x)
    assert cosine(run(candidate, x), reference) > 0.995  # the same numbers in either layout
    contiguous = apply_formats(copy.deepcopy(model), {"conv1": "int8"}, calibration=CALIBRATION)
    assert torch.allclose(run(candidate, x), run(contiguous, x), atol=1e-5)


def test_the_search_says_when_int8_convolutions_would_reorder():
    from autoprec.precision.static_int8 import layout_hint

    model = conv_net()
    choices = {"conv1": ("fp32", "int8"), "conv2": ("fp32", "int8"), "conv3": ("fp32", "int8")}
    hint = layout_hint(model, choices, torch.device("cpu"))
    assert hint and hint.startswith("2 Conv2d layers") and "channels_last" in hint  # conv3 is a Conv1d
    assert layout_hint(copy.deepcopy(model).to(memory_format=torch.channels_last), choices, torch.device("cpu")) is None
    assert layout_hint(model, {"conv1": ("fp32", "bf16")}, torch.device("cpu")) is None  # no int8 to reorder for
    # a 1x1 convolution's kernel is contiguous in both layouts: in an NCHW model it counts too
    pointwise = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1))
    both = {"0": ("fp32", "int8"), "1": ("fp32", "int8"), "2": ("fp32", "int8")}
    assert layout_hint(pointwise, both, torch.device("cpu")).startswith("3 Conv2d layers")
    assert layout_hint(pointwise, {"1": ("fp32", "int8")}, torch.device("cpu")) is None  # nothing tells the layout


@pytest.mark.slow
def test_static_int8_convolutions_compile_into_one_graph_with_eager_numbers():
    """torch.compile traced neither the weight packing nor the quantized tensor type: a graph break at
    every int8 convolution (51 on ResNet-18). Packed eagerly, quantized with the decomposed op, the
    whole network is one graph, also after a copy."""
    model = copy.deepcopy(conv_net()).to(memory_format=torch.channels_last)
    candidate = copy.deepcopy(apply_formats(model, {n: "int8" for n in CONVS}, calibration=CALIBRATION))
    x = images(16, 1)
    eager = run(candidate, x)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(candidate)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        compiled = torch.compile(candidate, dynamic=False)(x)
    torch._dynamo.reset()
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4)


def test_mixed_policy_int8_bf16_fp32_applies_under_either_default():
    model = conv_net()
    x = images(16, 1)
    reference = run(model, x)
    layers = {"conv1": "int8", "conv2": "bf16", "conv3": "int8", "fc": "int8"}
    for default in ("fp32", "bf16"):
        candidate = apply_formats(copy.deepcopy(model), layers, default, calibration=CALIBRATION)
        assert isinstance(candidate.conv1, StaticInt8Conv) and isinstance(candidate.conv3, StaticInt8Conv)
        assert candidate.conv2.weight.dtype == torch.bfloat16
        assert isinstance(candidate.fc, torch.ao.nn.quantized.dynamic.Linear)
        out = run(candidate, x)
        assert out.dtype == (torch.float32 if default == "fp32" else torch.bfloat16)
        assert cosine(out.float(), reference) > 0.99, default


def test_calibration_ranges_come_from_the_fp32_inputs_and_are_reused():
    model = conv_net()
    calibration = calibrate(model, CONVS, CALIBRATION)
    assert set(calibration.inputs) == set(CONVS) and calibration.batches == 3
    scale, zero_point, _ = calibration.inputs["conv1"]
    assert scale > 0 and 0 <= zero_point <= 255
    # conv2's input is after a ReLU: nothing negative, so the zero point sits at the bottom
    assert calibration.inputs["conv2"][1] == 0
    x = images(4, 2)
    by_batches = run(apply_formats(copy.deepcopy(model), {"conv1": "int8"}, calibration=CALIBRATION), x)
    by_object = run(apply_formats(copy.deepcopy(model), {"conv1": "int8"}, calibration=calibration), x)
    assert torch.equal(by_batches, by_object)


def test_int8_conv_memory_is_int8_weights_with_scales():
    model = conv_net()
    candidate = apply_formats(copy.deepcopy(model), {"conv3": "int8"}, calibration=CALIBRATION)
    weights = 8 * 16 * 3
    saved = module_storage_bytes(model) - module_storage_bytes(candidate)
    # fp32 weight (4 B each) -> int8 (1 B) plus a 4 B scale and 8 B zero point per output channel
    assert saved == 4 * weights - (weights + 8 * (4 + 8))


def test_a_batchnorm_after_an_int8_conv_is_folded_into_it():
    model = conv_net()
    x = images(8, 4)
    reference = run(model, x)
    candidate = apply_formats(copy.deepcopy(model), {"conv1": "int8"}, calibration=CALIBRATION)
    assert isinstance(candidate.bn1, nn.Identity) and isinstance(candidate.bn2, nn.BatchNorm2d)
    assert candidate.conv1.bias is not None  # the BatchNorm's shift
    assert cosine(run(candidate, x), reference) > 0.999
    # conv2's output meets the residual add only through bn2: folded too when conv2 is int8
    both = apply_formats(copy.deepcopy(model), {"conv1": "int8", "conv2": "int8"}, calibration=CALIBRATION)
    assert isinstance(both.bn2, nn.Identity)
    assert cosine(run(both, x), reference) > 0.995


def test_a_layer_the_calibration_never_reached_is_unsupported():
    model = conv_net()
    calibration = calibrate(model, ["conv1"], CALIBRATION)
    with pytest.raises(UnsupportedFormat, match=r"layer 'conv2': static int8 needs its input range"):
        apply_formats(copy.deepcopy(model), {"conv2": "int8"}, calibration=calibration)
    with pytest.raises(PolicyError, match="no batches"):
        apply_formats(copy.deepcopy(model), {"conv2": "int8"}, calibration=[])


def test_policy_round_trips_through_export_and_apply_with_the_batches(tmp_path):
    model = conv_net()
    recipes = {"conv1": "minmax", "conv3": "histogram"}
    policy = Policy({"conv1": "int8", "conv2": "bf16", "conv3": "int8"}, default="fp32", calibration=recipes)
    path = policy.save(tmp_path / "policy.json")
    assert json.loads(path.read_text())["layers"]["conv1"] == "int8"
    x = images(8, 3)
    direct = run(apply_formats(copy.deepcopy(model), policy.layers, "fp32", calibration=CALIBRATION,
                               recipes=recipes), x)
    applied = autoprec.apply_policy(copy.deepcopy(model), path, calibration=CALIBRATION)
    assert load_policy(path).layers == policy.layers and load_policy(path).calibration == recipes
    assert torch.equal(run(applied, x), direct)
    # a file from before recipes were recorded: every layer as it was calibrated then (histogram)
    policy.calibration = None
    older = autoprec.apply_policy(copy.deepcopy(model), policy, calibration=CALIBRATION)
    assert older.conv1.input_scale == calibrate(model, ["conv1"], CALIBRATION, {"conv1": "histogram"}).inputs["conv1"].scale
    with pytest.raises(PolicyError, match=r"layer 'conv1' takes static int8 \(2 such layers\).*calibration="):
        autoprec.apply_policy(copy.deepcopy(model), path)


def test_fp8_is_refused_on_the_cpu_and_left_out_of_the_default_space():
    model = conv_net()
    choices = load_space("default").choices(model, torch.device("cpu"))
    assert all("fp8" not in formats for formats in choices.values())
    assert "int8" in choices["conv1"] and "int8" in choices["fc"]
    policy = Policy({"fc": "fp8"})
    with pytest.raises(UnsupportedFormat, match="fp8 needs a CUDA GPU of compute capability 8.9 or higher"):
        autoprec.apply_policy(copy.deepcopy(model), policy)


SPEC = TINY_CONV_SPEC
BAD_CALIBRATION = {
    "wrong_shape": ("return [torch.randn(2, 1, 8, 8)]", "batch 0 has shape (2, 1, 8, 8) where example_inputs() has (2, 3, 8, 8)"),
    "empty": ("return []", "gave no batches"),
    "single_tensor": ("return torch.randn(2, 3, 8, 8)", "returned a Tensor, not an iterable of batches"),
    "wrong_type": ("return ['images']", "batch 0 is a str, not a tensor"),
    "integer_images": ("return [torch.zeros(2, 3, 8, 8, dtype=torch.long)]", "batch 0 is torch.int64 where"),
    "raises": ("raise OSError('no data')", "raised OSError: no data"),
}


@pytest.mark.parametrize("body,expected", list(BAD_CALIBRATION.values()), ids=list(BAD_CALIBRATION))
def test_bad_calibration_inputs_is_a_one_line_error_naming_it(tmp_path, body, expected):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(SPEC) + f"\ndef calibration_inputs():\n    {body}\n")
    with pytest.raises(SpecError) as info:
        configure_cpu(1, False)
        Evaluator(load_spec(path), "cpu", timing=FAST, measure_peak=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: calibration_inputs: "), message
    assert expected in message, message


def test_evaluator_calibrates_once_and_measures_an_int8_conv_candidate(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(SPEC) + "\ndef calibration_inputs():\n"
                    "    return [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]\n")
    configure_cpu(1, False)
    evaluator = Evaluator(load_spec(path), "cpu", timing=FAST, measure_peak=False)
    # the convolution (static int8) and the Linear (int8_static): every layer a policy may calibrate for
    assert evaluator.calibration is not None and set(evaluator.calibration.inputs) == {"0", "3"}
    measured = evaluator.measure(Policy({"0": "int8", "3": "int8"}))
    assert measured.feasible, measured.reason
    assert 0.99 < measured.score <= 1.0
    failed = evaluator.measure(Policy({"3": "fp8"}))
    assert not failed.feasible and "fp8 needs a CUDA GPU" in failed.reason
    # the policy file records each static layer's calibration recipe; applied to the batches again, it is
    # the model the search measured
    policy = Policy({"0": "int8", "3": "int8_static"})
    policy.calibration = policy_recipes(evaluator.model, evaluator.calibration, policy)
    assert policy.calibration == {name: evaluator.calibration.recipes[name] for name in ("0", "3")}
    assert policy_recipes(evaluator.model, evaluator.calibration, Policy({"3": "int8"})) is None  # dynamic int8: nothing calibrated
    spec = load_spec(path)
    applied = autoprec.apply_policy(spec.new_model(), policy_from_json(policy.to_json()),
                                    calibration=spec.calibration_batches())
    x = images(2, 9)
    assert torch.equal(run(applied, x), run(evaluator.candidate(policy), x))


@pytest.mark.cuda
def test_cuda_fp8_linear_has_fp8_weights_and_stays_close():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(UnsupportedFormat, match="compute capability 8.9"):
            apply_formats(nn.Sequential(nn.Linear(64, 64)).cuda(), {"0": "fp8"}, device="cuda")
        return
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().eval()
    x = torch.randn(64, 256, device="cuda")
    reference = run(model, x)
    candidate = apply_formats(copy.deepcopy(model), {"0": "fp8"}, "fp32", "cuda")
    weight = candidate[0].weight
    assert type(weight).__name__ == "Float8Tensor", type(weight)
    assert weight.qdata.dtype == torch.float8_e4m3fn and weight.scale.numel() == 512  # one scale per row
    assert candidate[2].weight.dtype == torch.float32
    out = run(candidate, x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert cosine(out, reference) > 0.99
    # fp8 weights at 1 byte each, plus their per-row scales, instead of 4 bytes each
    saved = module_storage_bytes(model[0]) - module_storage_bytes(candidate[0])
    assert saved >= 256 * 512 * 3 - 512 * 4 - 512 * 4


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; per-layer static int8 does not need to."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if y.mean() > 0.1:  # a Python branch on a tensor's value
            y = y * 0.5
        return self.head(y).flatten(1)


def test_static_int8_needs_no_tracing():
    torch.manual_seed(0)
    model = Untraceable().eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    x = images(4, 5)
    candidate = apply_formats(copy.deepcopy(model), {"conv": "int8", "head": "int8"}, calibration=CALIBRATION)
    assert cosine(run(candidate, x), run(model, x)) > 0.99


def test_activations_take_7_bits_where_onednn_has_no_vnni(monkeypatch):
    from autoprec.precision.calibration import cpu_has_vnni

    model = conv_net()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_vnni()
    seven = calibrate(model, ["conv2"], CALIBRATION, {"conv2": "histogram"}).inputs["conv2"][0]
    monkeypatch.setattr("autoprec.precision.calibration.cpu_has_vnni", lambda: True)
    eight = calibrate(model, ["conv2"], CALIBRATION, {"conv2": "histogram"}).inputs["conv2"][0]
    assert seven == pytest.approx(2 * eight, rel=0.05)  # same range over 127 steps instead of 255


def test_a_training_space_offers_no_static_int8():
    from autoprec.search.space import space_from_dict

    model = conv_net()
    training = space_from_dict({"dtypes": ["fp32", "bf16", "int8"], "training": {"steps": 2}}, "t.yaml")
    choices = training.choices(model, torch.device("cpu"))
    assert choices["conv1"] == ("fp32", "bf16") and choices["fc"] == ("fp32", "bf16", "int8")
