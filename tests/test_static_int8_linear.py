"""int8_static, static int8 Linear layers (CPU, oneDNN): closeness to fp32 eager and compiled (with and without
inductor's freezing), calibration, refusals; and the int8 formats under the compiled runtime's freezing."""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprec.measure import runtime as R
from autoprec.errors import PolicyError, UnsupportedFormat
from autoprec.precision import DTYPES, HANDLERS, apply_formats, calibrate, module_storage_bytes
from autoprec.precision.calibration import RECIPES, calibrated_layers, recipes_for
from autoprec.precision.static_int8 import StaticInt8Conv
from autoprec.precision.static_int8_linear import StaticInt8Linear

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


class Mlp(nn.Module):
    """A transformer-like feed-forward block on (batch, tokens, features) and a head, seeded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(x).mean(1)


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 6, 32, generator=torch.Generator().manual_seed(seed))


CALIBRATION = [tokens(8, 10 + i) for i in range(3)]
LINEARS = ("up", "down", "head")


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).min().item()


def int8s_model(default: str = "fp32") -> nn.Module:
    return apply_formats(Mlp().eval(), {n: "int8_static" for n in LINEARS}, default, calibration=CALIBRATION)


def test_static_int8_linear_applies_per_layer_and_stays_close_to_fp32():
    model = Mlp().eval()
    x = tokens(16, 1)
    reference = run(model, x)
    for names in (["down"], list(LINEARS)):
        candidate = apply_formats(copy.deepcopy(model), {n: "int8_static" for n in names}, calibration=CALIBRATION)
        for name in LINEARS:
            module = candidate.get_submodule(name)
            assert isinstance(module, StaticInt8Linear) == (name in names), name
            if name in names:
                assert module.weight_int8.dtype == torch.int8
                assert module.weight_scale.shape == (module.out_features,)  # per-channel, symmetric
                assert module.weight_int8.abs().max() <= 127
        out = run(candidate, x)
        assert out.dtype == torch.float32 and torch.isfinite(out).all() and not torch.equal(out, reference)
        assert cosine(out, reference) > 0.995, names


def test_in_a_bf16_model_the_int8_layers_take_and_give_back_bf16():
    reference = run(Mlp().eval(), tokens(4, 2))
    candidate = int8s_model("bf16")
    assert candidate.norm.weight.dtype == torch.bfloat16 and isinstance(candidate.up, StaticInt8Linear)
    out = run(candidate, tokens(4, 2))
    assert out.dtype == torch.bfloat16 and cosine(out.float(), reference) > 0.99
    # oneDNN reads bf16 and writes bf16 itself: no cast hooks around the layer
    assert not candidate.up._forward_pre_hooks and not candidate.up._forward_hooks
    assert run(candidate.up, tokens(4, 2).bfloat16()).dtype == torch.bfloat16


def test_calibration_gives_each_layer_its_input_range():
    model = Mlp().eval()
    calibration = calibrate(model, LINEARS, CALIBRATION)
    scale, zero_point, _ = calibration.inputs["up"]
    assert scale > 0 and 0 < zero_point < 255  # a LayerNorm's output: both signs
    candidate = apply_formats(copy.deepcopy(model), {"up": "int8_static"}, calibration=calibration)
    assert (candidate.up.input_scale, candidate.up.input_zero_point) == (scale, zero_point)
    x = tokens(4, 3)
    by_batches = run(apply_formats(copy.deepcopy(model), {"up": "int8_static"}, calibration=CALIBRATION), x)
    assert torch.equal(run(candidate, x), by_batches)


def test_without_calibration_it_is_refused_with_the_reason():
    with pytest.raises(PolicyError, match="needs calibration batches"):
        apply_formats(Mlp().eval(), {"up": "int8_static"})
    only_up = calibrate(Mlp().eval(), ["up"], CALIBRATION)
    with pytest.raises(UnsupportedFormat, match=r"layer 'down': static int8 needs its input range"):
        apply_formats(Mlp().eval(), {"down": "int8_static"}, calibration=only_up)


def test_it_is_for_linear_layers_on_the_cpu():
    handler = HANDLERS["int8_static"]
    assert handler.needs_calibration(nn.Linear(2, 2))
    assert handler.unsupported_reason(nn.Linear(2, 2), CPU) is None
    assert "Linear layers, not Conv2d" in handler.unsupported_reason(nn.Conv2d(2, 2, 1), CPU)
    assert "CPU only" in handler.unsupported_reason(nn.Linear(2, 2), torch.device("cuda"))
    assert "CPU only" in handler.unsupported_reason(nn.Linear(2, 2), torch.device("mps"))
    with pytest.raises(UnsupportedFormat, match="Linear layers"):
        apply_formats(nn.Sequential(nn.Conv2d(3, 3, 1)), {"0": "int8_static"}, calibration=[torch.randn(1, 3, 4, 4)])


def test_a_policy_names_it_and_the_cpu_space_searches_it_on_linear_layers_only():
    """A format of DTYPES: a study calibrates every Linear for it on the CPU; the cpu space offers it to
    Linear layers, not to convolutions (off the CPU: test_it_is_for_linear_layers_on_the_cpu); the default space does not name it."""
    from autoprec.search.space import load_space

    assert "int8_static" in DTYPES
    assert calibrated_layers(Mlp(), CPU) == list(LINEARS)
    cpu = load_space("cpu")
    choices = cpu.choices(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Flatten(), nn.Linear(3, 2)), CPU)
    assert choices == {"0": ("fp32", "bf16", "int8"), "2": ("fp32", "bf16", "int8", "int8_static")}
    assert "int8_static" not in load_space(None).dtypes


def test_a_batchnorm_after_an_int8_linear_stays():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).eval()
    model[1].running_mean.fill_(0.5)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    candidate = apply_formats(copy.deepcopy(model), {"0": "int8_static"}, calibration=[x])
    assert isinstance(candidate[1], nn.BatchNorm1d)
    assert cosine(run(candidate, x), run(model, x)) > 0.995


def test_copies_and_state_loads_repack_the_weight():
    candidate = int8s_model()
    x = tokens(4, 4)
    out = run(candidate, x)
    assert torch.equal(run(copy.deepcopy(candidate), x), out)
    fresh = int8s_model()
    fresh.load_state_dict(candidate.state_dict())
    assert torch.equal(run(fresh, x), out)
    assert not any("packed" in key for key in candidate.state_dict())


def test_memory_is_int8_weights_with_scales():
    model = Mlp().eval()
    weights = 64 * 32
    candidate = apply_formats(copy.deepcopy(model), {"up": "int8_static"}, calibration=CALIBRATION,
                              recipes={"up": "histogram"})
    # fp32 weight (4 B each) -> int8 (1 B) plus a 4 B scale and 8 B zero point per output channel
    assert module_storage_bytes(model) - module_storage_bytes(candidate) == 4 * weights - (weights + 64 * (4 + 8))
    smoothed = apply_formats(copy.deepcopy(model), {"up": "int8_static"}, calibration=CALIBRATION,
                             recipes={"up": "smooth"})
    # and a 4 B smoothing factor per input channel
    assert module_storage_bytes(candidate) + 32 * 4 == module_storage_bytes(smoothed)


@pytest.mark.parametrize("freeze,default", [(True, "fp32"), (False, "fp32"), (True, "bf16"), (False, "bf16")])
def test_compiled_with_or_without_freezing_it_is_one_graph_with_eager_numbers(freeze, default):
    """With freezing inductor lowers oneDNN's int8 Linear with its packed weight as a constant; without,
    its lowering refuses a packed weight that is a graph input, so the layer calls it through an opaque op."""
    candidate = int8s_model(default)
    x = tokens(4, 5)
    eager = run(candidate, x)
    R.reset()
    prepared = R.prepare(candidate, "compiled", CPU, lambda fn: fn(x), freeze=freeze)
    assert prepared.graph_breaks == 0
    tolerance = 1e-4 if default == "fp32" else 2e-2  # bf16: inductor may fuse and round the float ops otherwise
    torch.testing.assert_close(run(prepared.model, x), eager, atol=tolerance, rtol=tolerance)
    R.reset()


@pytest.mark.slow
def test_frozen_and_unfrozen_models_of_one_process_keep_their_own_graphs():
    """Dynamo keeps a compiled graph for any caller whose backend compares equal; the frozen model's backend
    carries the setting, so the unfrozen model compiled after it does not serve it (nor the other way)."""
    x = tokens(4, 5)
    frozen = R.prepare(int8s_model(), "compiled", CPU, lambda fn: fn(x), freeze=True)
    unfrozen = R.prepare(int8s_model(), "compiled", CPU, lambda fn: fn(x), freeze=False)

    def ops(model: nn.Module) -> set[str]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(model, x)
        return {event.name for event in prof.events()}

    opaque = "autoprec::static_int8_linear"  # the unfrozen graph's call of oneDNN's kernel
    assert opaque not in ops(frozen.model)
    assert opaque in ops(unfrozen.model)
    assert opaque not in ops(frozen.model)
    R.reset()


def test_int8_formats_compile_under_freezing():
    """The compiled runtime freezes on the CPU: the other int8 kernels (static int8 convolutions, torchao's
    or torch's dynamic int8 Linear) compile and keep their numbers under it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    batches = [torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    x = batches[0]
    reference = run(model, x)
    for runtime in ("eager", "compiled"):
        layers = {"0": "int8", "2": "int8", "5": "int8", "7": "int8_static"}
        candidate = apply_formats(copy.deepcopy(model), layers, calibration=batches, runtime=runtime)
        assert isinstance(candidate[0], StaticInt8Conv)
        eager = run(candidate, x)
        R.reset()
        prepared = R.prepare(candidate, "compiled", CPU, lambda fn: fn(x), freeze=True)
        out = run(prepared.model, x)
        R.reset()
        assert cosine(out, reference) > 0.99, runtime
        torch.testing.assert_close(out, eager, atol=2e-2, rtol=2e-2)


def test_frozen_blocks_keep_their_own_weights():
    """Freezing makes a block's weights constants of its graph: identical blocks must not share one."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)]).eval()
    x = torch.randn(2, 8)
    expected = run(model, x)
    R.reset()
    prepared = R.prepare(model, "compiled", CPU, lambda fn: fn(x), regional=True)
    assert prepared.regions == ["0", "1", "2"]
    torch.testing.assert_close(run(prepared.model, x), expected)
    R.reset()


def test_a_frozen_graph_leaves_the_callers_input_as_it_was():
    """Inductor may fuse `down`'s int8 output with the residual add into oneDNN's in-place sum on the graph
    input itself; the compiled runtime puts the input back and calls such a model with copies."""
    candidate = apply_formats(Mlp().eval(), {"down": "int8_static"}, calibration=CALIBRATION)
    x = tokens(4, 5)
    kept = x.clone()
    eager = run(candidate, x)
    R.reset()
    prepared = R.prepare(candidate, "compiled", CPU, lambda fn: fn(x), freeze=True)
    for _ in range(2):
        torch.testing.assert_close(run(prepared.model, x), eager, atol=1e-4, rtol=1e-4)
        assert torch.equal(x, kept)
    R.reset()


class OutlierChannels(nn.Module):
    """A Linear whose input has a few channels 40x larger than the rest, as transformers' LayerNorm outputs do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wide = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(torch.cat([x[..., :3] * 40, x[..., 3:]], dim=-1))


def test_each_layer_takes_the_calibration_recipe_closest_to_fp32():
    model = OutlierChannels().eval()
    x = tokens(8, 7)
    reference = run(model, x)

    def error(recipes):
        out = run(apply_formats(copy.deepcopy(model), {"wide": "int8_static"}, calibration=CALIBRATION,
                                recipes=recipes), x)
        return ((out - reference) ** 2).sum().item() / (reference ** 2).sum().item()

    chosen = calibrate(model, ["wide"], CALIBRATION)
    assert chosen.recipes == {"wide": "smooth"}  # the outlier channels moved into the weight
    assert chosen.inputs["wide"].smoothing.shape == (32,)
    errors = {recipe: error({"wide": recipe}) for recipe in RECIPES}
    assert error(None) == errors["smooth"] < min(errors["histogram"], errors["minmax"])  # on inputs it never saw
    # on a convolution there is nothing to smooth: the recipe is one of the ranges
    assert recipes_for(nn.Conv2d(3, 4, 3)) == ("histogram", "minmax")
    with pytest.raises(PolicyError, match="layer 'conv' cannot take recipe 'smooth'"):
        calibrate(nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3))), ["conv"],
                  [torch.randn(2, 3, 8, 8)], {"conv": "smooth"})


def test_calibration_kept_as_json_gives_the_same_model():
    """Ranges, recipes and smoothing factors survive plain JSON, so shipped ranges rebuild the measured model."""
    import json

    from autoprec.precision import Calibration

    model = OutlierChannels().eval()
    x = tokens(8, 7)
    chosen = calibrate(model, ["wide"], CALIBRATION)
    kept = Calibration.from_json(json.loads(json.dumps(chosen.to_json())))
    assert kept.recipes == chosen.recipes == {"wide": "smooth"}
    torch.testing.assert_close(kept.inputs["wide"].smoothing, chosen.inputs["wide"].smoothing)
    direct = run(apply_formats(copy.deepcopy(model), {"wide": "int8_static"}, calibration=chosen), x)
    shipped = run(apply_formats(copy.deepcopy(model), {"wide": "int8_static"}, calibration=kept), x)
    assert torch.equal(direct, shipped)


def _int8_outputs(model: nn.Module, layers: dict[str, str], x: torch.Tensor,
                  recipes: dict[str, str] | None = None) -> list[str]:
    """The output dtype of each oneDNN int8 kernel in the frozen compiled model's generated code."""
    import re

    from torch._inductor.utils import run_and_get_code

    recipes = {name: "histogram" for name in layers} | (recipes or {})
    candidate = apply_formats(model, layers, calibration=[x], runtime="compiled", recipes=recipes)
    R.reset()
    prepared = R.prepare(candidate, "compiled", CPU, lambda fn: fn(x), freeze=True)
    with torch.no_grad():
        _, codes = run_and_get_code(prepared.timed, x)
    R.reset()
    return re.findall(r"onednn\.q(?:linear|conv)_pointwise[^\n]*?torch\.(\w+), '", "\n".join(codes))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_neighbouring_int8_layers_pass_uint8_once_compiled(kind):
    """With freezing, an int8 layer whose output feeds only a ReLU and the next int8 layer writes that
    layer's uint8 input itself: no float tensor and no separate quantize between them. Next to a float
    layer, or before a smoothed int8 Linear (its input is multiplied first), it writes float."""
    torch.manual_seed(0)
    if kind == "conv":
        cl = torch.channels_last
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
        model, x = model.to(memory_format=cl), torch.randn(2, 8, 12, 12).to(memory_format=cl)
        fmt = "int8"
    else:
        model, x, fmt = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval(), tokens(4, 3), "int8_static"
    assert _int8_outputs(copy.deepcopy(model), {"0": fmt, "2": fmt}, x) == ["uint8", "float32"]
    assert _int8_outputs(copy.deepcopy(model), {"0": fmt, "2": "fp32"}, x) == ["float32"]
    if kind == "linear":
        smoothed = _int8_outputs(copy.deepcopy(model), {"0": fmt, "2": fmt}, x, recipes={"2": "smooth"})
        assert smoothed == ["float32", "float32"]


class Chains(nn.Module):
    """Two layer pairs that keep int8 between them once compiled, and two that cannot."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))  # conv -> norm -> relu -> conv: a link
        x = torch.relu(x)
        x = x + self.conv3(x)  # conv2's output also feeds the residual: no link
        h = x.mean((2, 3))
        h = self.down(torch.nn.functional.gelu(self.up(h)))  # Linear -> GELU -> Linear: a link
        return self.head(self.norm(h))  # a LayerNorm between: no link


def test_links_are_the_pairs_the_compiled_runtime_passes_uint8_between():
    from autoprec.measure.int8_links import Link, find_links

    model, x = Chains().eval(), torch.randn(2, 3, 8, 8)
    choices = {**{n: ("fp32", "int8") for n in ("conv1", "conv2", "conv3")},
               **{n: ("fp32", "int8_static") for n in ("up", "down", "head")}}
    assert find_links(model, x, choices) == [Link("conv1", "conv2", "relu"), Link("up", "down", "gelu")]
    # a layer that cannot take static int8 (a Linear offered dynamic int8 only) has no link
    assert find_links(model, x, {**choices, "down": ("fp32", "int8")}) == [Link("conv1", "conv2", "relu")]


@pytest.mark.slow
def test_a_compiled_profile_times_what_each_link_saves():
    from autoprec.guided.sensitivity import build_profile
    from autoprec.model.model_file import ModelSpec

    model, x = Chains().eval(), torch.randn(2, 3, 8, 8)
    spec = ModelSpec(path=Path("chains.py"), build_model=Chains, example_inputs=lambda: x)
    choices = {"conv1": ("fp32", "int8"), "conv2": ("fp32", "int8"), "up": ("fp32", "int8_static"),
               "down": ("fp32", "int8_static")}
    calibration = calibrate(model, choices, [x], recipes={n: "histogram" for n in choices})
    profile = build_profile(spec, model, x, choices, ("fp32",), CPU, calibration=calibration, runtime="compiled")
    assert [(link["producer"], link["consumer"], link["producer_format"], link["consumer_format"])
            for link in profile.links] == [("conv1", "conv2", "int8", "int8"), ("up", "down", "int8_static", "int8_static")]
    assert all(link["saving_ms"] > 0 for link in profile.links)
    smoothed = calibrate(model, choices, [x], recipes={n: "smooth" if n == "down" else "histogram" for n in choices})
    profile = build_profile(spec, model, x, choices, ("fp32",), CPU, calibration=smoothed, runtime="compiled")
    assert [(link["producer"], link["consumer"]) for link in profile.links] == [("conv1", "conv2")]
    eager = build_profile(spec, model, x, choices, ("fp32",), CPU, calibration=calibration)
    assert eager.links == []  # eager layers each quantize their own input: nothing to save
