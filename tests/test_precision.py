"""Per-layer formats on a small model zoo: closeness to fp32, refusals, tied weights, storage, casts."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from autoprec.errors import PolicyError, UnsupportedFormat
from autoprec.precision import apply_formats, module_storage_bytes, searchable_layers
from autoprec.precision.apply import layer_format_reason
from autoprec.search.space import load_space
from autoprec.model.model_file import call_model, first_float_tensor

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- the zoo


class TwoBranchCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16 + 8 * 8 * 8, 10)

    def forward(self, seq: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(seq)).flatten(1)
        b = torch.relu(self.norm(self.conv2(image))).flatten(1)
        return self.fc(torch.cat([a, b], dim=1))


def _calibrate_batchnorm(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Untrained torchvision nets have BN statistics (mean 0, var 1) that make mobilenet's activations
    vanish (~1e-9 at the output). Running a few random batches in train mode gives BN real statistics
    so the output is O(1) and a relative error means something."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average
            module.reset_running_stats()
    model.train()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(*shape, generator=gen))
    return model.eval()


def build_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(),
                          nn.Linear(64, 10))
    return model, torch.randn(4, 16)


def build_cnn():
    torch.manual_seed(0)
    model = TwoBranchCNN()
    model.norm.momentum = None  # BN statistics from one batch (the helper above takes one input only)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 16), torch.randn(8, 1, 8, 8))
    return model.eval(), (torch.randn(2, 3, 16), torch.randn(2, 1, 8, 8))


def build_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    ids = torch.randint(0, 100, (2, 12))
    return transformers.BertModel(config), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gpt2_config():
    return transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)


def build_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(gpt2_config()), {"input_ids": torch.randint(0, 100, (2, 12))}


def build_resnet18():
    torch.manual_seed(0)
    model = _calibrate_batchnorm(torchvision.models.resnet18(weights=None, num_classes=10), (8, 3, 32, 32))
    return model, torch.randn(1, 3, 32, 32)


def build_mobilenet():
    torch.manual_seed(0)
    model = _calibrate_batchnorm(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), (8, 3, 64, 64))
    # One image: dynamic int8 scales activations per tensor, i.e. across the whole batch, so in a
    # batch of two a sample whose logits are 10x smaller than its neighbour's loses much more
    # (cosine 0.95 vs 0.9999 alone), a real int8 property this closeness test is not about.
    return model, torch.randn(1, 3, 64, 64)


class TorchEncoder(nn.Module):
    """torch's own transformer blocks: MultiheadAttention runs its out_proj itself, and TransformerEncoderLayer
    has a fused inference path that reads its Linear layers' weight tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 32)
        block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def build_torch_encoder():
    torch.manual_seed(0)
    return TorchEncoder(), torch.randn(2, 10, 6)


ZOO = {"torch_encoder": build_torch_encoder, "mlp": build_mlp, "cnn": build_cnn, "bert": build_bert, "gpt2": build_gpt2, "resnet18": build_resnet18,
       "mobilenet_v3_small": build_mobilenet}

# Observed on this CPU (worst over the zoo): fp16 rel 7e-3 / cos 0.99997, bf16 rel 8e-2 / cos 0.9987,
# int8 rel 7e-2 / cos 0.9915. Bounds leave about 2x room and still separate the formats.
TOLERANCE = {"fp16": (0.02, 0.9995), "bf16": (0.15, 0.995), "int8": (0.15, 0.98)}

CASES = [("fp16", "fp32"), ("fp16", "fp16"), ("bf16", "fp32"), ("bf16", "bf16"), ("int8", "fp32"), ("int8", "bf16")]

_cache: dict[str, tuple[nn.Module, object, torch.Tensor]] = {}


def zoo_model(name: str):
    """(fp32 model, inputs, fp32 output) built once per session; callers deepcopy the model."""
    if name not in _cache:
        model, inputs = ZOO[name]()
        model.eval()
        _cache[name] = (model, inputs, compared(model, inputs))
    return _cache[name]


def compared(model: nn.Module, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return first_float_tensor(call_model(model, inputs)).float()


def supports(model: nn.Module, name: str, fmt: str) -> bool:
    return (fmt != "int8" or isinstance(model.get_submodule(name), (nn.Linear, Conv1D))) and \
        layer_format_reason(model, name, fmt, torch.device("cpu")) is None


# --------------------------------------------------------------------------- closeness to fp32


@pytest.mark.slow
@pytest.mark.parametrize("fmt,default", CASES, ids=[f"{f}-default-{d}" for f, d in CASES])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_output_close_to_fp32(name, fmt, default):
    model, inputs, reference = zoo_model(name)
    candidate = copy.deepcopy(model)
    layers = {layer.name: fmt for layer in searchable_layers(candidate)
              if supports(candidate, layer.name, fmt)}
    assert layers, f"{name} has no layer that takes {fmt}"
    apply_formats(candidate, layers, default)

    # The formats really took effect.
    for layer in layers:
        module = candidate.get_submodule(layer)
        if fmt == "int8":
            assert isinstance(module, torch.ao.nn.quantized.dynamic.Linear), layer
        else:
            assert module.weight.dtype == DTYPE[fmt], layer
    for mod_name, module in candidate.named_modules():
        if mod_name not in layers and not any(mod_name.startswith(n + ".") for n in layers):
            for param in module.parameters(recurse=False):
                assert param.dtype == DTYPE[default], (mod_name, param.dtype)

    out = compared(candidate, inputs)
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()
    assert not torch.equal(out, reference), "no numeric change at all: the formats were not applied"
    max_rel, min_cos = TOLERANCE[fmt]
    rel = ((out - reference).norm() / reference.norm()).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1), dim=1).min().item()
    assert rel <= max_rel, f"{name} {fmt} (default {default}): relative error {rel:.3g} > {max_rel}"
    assert cos >= min_cos, f"{name} {fmt} (default {default}): cosine {cos:.6f} < {min_cos}"


STATIC = {nn.Linear: "int8_static", nn.Conv2d: "int8"}  # calibrated formats: activations int8 too


@pytest.mark.slow
@pytest.mark.parametrize("default", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_static_int8_close_to_fp32(name, default):
    """Static int8 (calibrated input ranges) on every Linear and convolution that takes it."""
    model, inputs, reference = zoo_model(name)
    candidate = copy.deepcopy(model)
    layers = {}
    for layer in searchable_layers(candidate):
        fmt = STATIC.get(type(candidate.get_submodule(layer.name)))
        if fmt and layer_format_reason(candidate, layer.name, fmt, torch.device("cpu")) is None:
            layers[layer.name] = fmt
    assert layers, f"{name} has no layer that takes static int8"
    apply_formats(candidate, layers, default, calibration=[inputs])
    out = compared(candidate, inputs).float()
    assert out.shape == reference.shape and torch.isfinite(out).all() and not torch.equal(out, reference)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1), dim=1).min().item()
    assert cos >= 0.995, f"{name} static int8 (default {default}): cosine {cos:.6f} < 0.995"  # worst seen 0.998


def test_a_layer_its_parent_runs_itself_is_no_searchable_layer():
    """MultiheadAttention passes out_proj.weight to its kernel without calling out_proj: a format of
    out_proj's own would break it (bf16 weight, fp32 input) or never take effect."""
    model, _ = build_torch_encoder()
    names = [layer.name for layer in searchable_layers(model)]
    assert "encoder.layers.0.linear1" in names and "head" in names
    assert not any(name.endswith("self_attn.out_proj") for name in names)
    with pytest.raises(UnsupportedFormat, match="MultiheadAttention"):
        apply_formats(copy.deepcopy(model), {"encoder.layers.0.self_attn.out_proj": "bf16"})


def test_eager_int8_is_not_offered_under_a_fused_transformer_layer_and_the_rest_runs():
    """TransformerEncoderLayer's fused inference path reads linear1.weight as a tensor; torch's dynamic
    int8 module has none (it failed every such trial with an AttributeError). The space leaves int8 out
    there, a policy asking for it is refused naming the layer, and every mix of what is offered runs."""
    model, inputs = build_torch_encoder()
    choices = load_space("cpu").choices(model, torch.device("cpu"))
    assert choices["encoder.layers.1.linear2"] == ("fp32", "bf16")
    assert "int8" in choices["head"]
    with pytest.raises(UnsupportedFormat, match="encoder.layers.0.linear1.*TransformerEncoderLayer"):
        apply_formats(copy.deepcopy(model), {"encoder.layers.0.linear1": "int8"})
    reference = compared(model, inputs)
    for default in ("fp32", "bf16"):
        for layers in ({"head": "int8", "embed": "int8", "encoder.layers.0.linear1": "bf16"},
                       {"encoder.layers.0.linear1": "fp32", "encoder.layers.1.linear2": "fp32"}):
            out = compared(apply_formats(copy.deepcopy(model), layers, default), inputs)
            assert torch.nn.functional.cosine_similarity(out, reference, dim=1).min() > 0.99, (default, layers)


def test_uniform_default_matches_model_to_dtype():
    """An all-bf16 policy computes exactly what model.to(bfloat16) computes (same kernels, same casts)."""
    model, inputs, _ = zoo_model("mlp")
    candidate = apply_formats(copy.deepcopy(model), {}, "bf16")
    plain = copy.deepcopy(model).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(candidate(inputs), plain(inputs.to(torch.bfloat16)))


# --------------------------------------------------------------------------- refusals


def test_int8_on_conv_without_calibration_is_a_policy_error_naming_the_layer():
    model, _, _ = zoo_model("resnet18")
    with pytest.raises(PolicyError, match=r"layer 'layer1\.0\.conv1' takes static int8.*calibration="):
        apply_formats(copy.deepcopy(model), {"layer1.0.conv1": "int8"})


def test_fp8_on_the_cpu_is_unsupported_with_the_reason():
    model, _, _ = zoo_model("cnn")
    with pytest.raises(UnsupportedFormat, match=r"layer 'fc': fp8 needs a CUDA GPU of compute capability 8\.9"):
        apply_formats(copy.deepcopy(model), {"fc": "fp8"})
    with pytest.raises(UnsupportedFormat, match=r"layer 'conv1': fp8 is for Linear layers only, not Conv1d"):
        apply_formats(copy.deepcopy(model), {"conv1": "fp8"})


def test_missing_layer_is_a_policy_error():
    model, _, _ = zoo_model("mlp")
    with pytest.raises(PolicyError, match=r"layer 'encoder\.dense' is not in the model \(Sequential\)"):
        apply_formats(copy.deepcopy(model), {"encoder.dense": "bf16"})


def test_unsearchable_layer_is_a_policy_error():
    model, _, _ = zoo_model("mlp")
    with pytest.raises(PolicyError, match=r"layer '3' is a LayerNorm, which takes no per-layer format"):
        apply_formats(copy.deepcopy(model), {"3": "bf16"})


def test_int_default_is_refused():
    model, _, _ = zoo_model("mlp")
    with pytest.raises(PolicyError, match="default format 'int8'"):
        apply_formats(copy.deepcopy(model), {}, "int8")


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


@pytest.mark.parametrize("layers,error", [
    ({"fc": "int8", "conv1": "fp16", "conv2": "fp8"}, UnsupportedFormat),
    ({"fc": "int8", "conv1": "fp16", "conv2": "int8"}, PolicyError),  # static int8 without calibration
    ({"fc": "int8", "conv2": "bf16", "nope": "fp16"}, PolicyError),
    ({"fc": "bf16", "norm": "fp16"}, PolicyError),
])
@pytest.mark.parametrize("default", ["fp32", "bf16"])
def test_refused_entry_mutates_nothing(layers, error, default):
    model, inputs, reference = zoo_model("cnn")
    candidate = copy.deepcopy(model)
    state, modules = _snapshot(candidate)
    with pytest.raises(error):
        apply_formats(candidate, layers, default)
    after_state, after_modules = _snapshot(candidate)
    assert after_modules == modules
    assert after_state.keys() == state.keys()
    for key, value in state.items():
        assert after_state[key].dtype == value.dtype, key
        assert torch.equal(after_state[key], value), key
    for name, module in candidate.named_modules():
        assert not module._forward_pre_hooks and not module._forward_hooks, name
    assert torch.equal(compared(candidate, inputs), reference)


# --------------------------------------------------------------------------- tied weights


def test_tied_embedding_stays_fp32_when_lm_head_is_bf16():
    model, inputs, reference = zoo_model("gpt2")
    candidate = copy.deepcopy(model)
    assert candidate.lm_head.weight is candidate.transformer.wte.weight
    fp32_bytes = module_storage_bytes(candidate)
    apply_formats(candidate, {"lm_head": "bf16"}, "fp32")
    assert candidate.lm_head.weight.dtype == torch.bfloat16
    assert candidate.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(candidate.transformer.wte.weight, model.transformer.wte.weight)
    # The untied bf16 copy of the head is stored beside the fp32 embedding.
    assert module_storage_bytes(candidate) == fp32_bytes + candidate.lm_head.weight.numel() * 2
    logits = compared(candidate, inputs)
    assert torch.isfinite(logits).all()
    assert ((logits - reference).norm() / reference.norm()).item() < 0.02


def test_tied_head_stays_fp32_under_bf16_default():
    model, _, _ = zoo_model("gpt2")
    candidate = apply_formats(copy.deepcopy(model), {"lm_head": "fp32"}, "bf16")
    assert candidate.lm_head.weight.dtype == torch.float32
    assert candidate.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(candidate.lm_head.weight, model.lm_head.weight)


def test_tied_embedding_stays_fp32_when_lm_head_is_int8():
    model, inputs, reference = zoo_model("gpt2")
    candidate = apply_formats(copy.deepcopy(model), {"lm_head": "int8"}, "fp32")
    assert candidate.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(candidate.transformer.wte.weight, model.transformer.wte.weight)
    logits = compared(candidate, inputs)
    assert ((logits - reference).norm() / reference.norm()).item() < 0.05


def test_gpt2_conv1d_takes_int8():
    model, inputs, reference = zoo_model("gpt2")
    candidate = apply_formats(copy.deepcopy(model), {"transformer.h.0.attn.c_attn": "int8"}, "fp32")
    assert isinstance(candidate.transformer.h[0].attn.c_attn, torch.ao.nn.quantized.dynamic.Linear)
    logits = compared(candidate, inputs)
    assert ((logits - reference).norm() / reference.norm()).item() < 0.05


# --------------------------------------------------------------------------- storage bytes


def _wide_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.LayerNorm(512)).eval()


def _saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


LINEARS = ("0", "2", "4")
N = 512
# Exact bytes: three Linear(512, 512) in the listed format plus a LayerNorm in the default.
# int8 = int8 weight + per-channel fp64 scales and int64 zero points + the fp32 bias, as fbgemm keeps them.
LINEAR_BYTES = {"fp32": (N * N + N) * 4, "bf16": (N * N + N) * 2, "fp16": (N * N + N) * 2,
                "int8": N * N + 8 * N + 8 * N + 4 * N}
NORM_BYTES = {"fp32": 2 * N * 4, "bf16": 2 * N * 2}


@pytest.mark.parametrize("fmt,default", [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("int8", "fp32"),
                                         ("int8", "bf16")])
def test_storage_bytes_agree_with_serialized_size(fmt, default):
    model = apply_formats(_wide_model(), {n: fmt for n in LINEARS}, default)
    counted = module_storage_bytes(model)
    assert counted == 3 * LINEAR_BYTES[fmt] + NORM_BYTES[default]
    saved = _saved_bytes(model)
    assert abs(counted - saved) / saved < 0.02, (counted, saved)


def test_storage_bytes_count_tied_weights_once():
    model, _, _ = zoo_model("gpt2")
    expected = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert module_storage_bytes(model) == expected


# --------------------------------------------------------------------------- casts only at boundaries


def _hooked(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()
            if m._forward_pre_hooks or m._forward_hooks}


@pytest.mark.parametrize("name", ["bert", "gpt2", "resnet18"])
def test_uniform_bf16_policy_registers_only_the_root_hook(name):
    model, _, _ = zoo_model(name)
    candidate = copy.deepcopy(model)
    apply_formats(candidate, {layer.name: "bf16" for layer in searchable_layers(candidate)}, "bf16")
    assert _hooked(candidate) == {"": (1, 0)}


def test_fp32_model_has_no_hooks():
    model, _, _ = zoo_model("bert")
    candidate = copy.deepcopy(model)
    apply_formats(candidate, {layer.name: "fp32" for layer in searchable_layers(candidate)}, "fp32")
    assert _hooked(candidate) == {}


def test_int8_under_fp32_default_needs_no_casts():
    """Dynamic int8 takes and returns fp32, so in an fp32 model it needs no boundary hooks."""
    model, _, _ = zoo_model("gpt2")
    candidate = copy.deepcopy(model)
    apply_formats(candidate, {layer.name: "int8" for layer in searchable_layers(candidate)}, "fp32")
    assert _hooked(candidate) == {}


def test_mixed_policy_hooks_only_the_layers_that_differ():
    model, inputs, _ = zoo_model("bert")
    candidate = copy.deepcopy(model)
    layers = {layer.name: "bf16" for layer in searchable_layers(candidate)}
    layers["encoder.layer.0.attention.self.query"] = "fp32"
    layers["encoder.layer.1.output.dense"] = "int8"
    apply_formats(candidate, layers, "bf16")
    assert _hooked(candidate) == {"": (1, 0), "encoder.layer.0.attention.self.query": (1, 1),
                                  "encoder.layer.1.output.dense": (1, 1)}
    # The fp32 island hands bf16 back to its bf16 neighbours.
    seen = {}
    query = candidate.get_submodule("encoder.layer.0.attention.self.query")
    query.register_forward_hook(lambda _m, args, out: seen.update(inp=args[0].dtype, out=out.dtype))
    with torch.inference_mode():
        candidate(**inputs)
    assert seen == {"inp": torch.float32, "out": torch.bfloat16}


# --------------------------------------------------------------------------- torchao int8 (the CUDA path)


def test_torchao_int8_linear_close_on_cpu():
    try:
        import torchao  # noqa: F401
        from autoprec.precision.int8 import _torchao_int8
        import torchao.quantization  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"torchao not importable: {exc}")
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    with torch.inference_mode():
        reference = linear(x)
    quantized = _torchao_int8(copy.deepcopy(linear))
    assert type(quantized.weight) is not nn.Parameter and type(quantized.weight) is not torch.Tensor
    with torch.inference_mode():
        out = quantized(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, reference)
    assert ((out - reference).norm() / reference.norm()).item() < 0.03
    # int8 weights: well under half the fp32 storage.
    assert module_storage_bytes(quantized) < module_storage_bytes(linear) / 3


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_zoo_int8_and_bf16():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, inputs, reference = zoo_model("gpt2")
    for fmt in ("int8", "bf16", "fp16"):
        candidate = copy.deepcopy(model)
        layers = {layer.name: fmt for layer in searchable_layers(candidate)}
        apply_formats(candidate, layers, "fp32", "cuda")
        cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
        out = compared(candidate, cuda_inputs).cpu()
        assert torch.isfinite(out).all()
        rel = ((out - reference).norm() / reference.norm()).item()
        assert rel < TOLERANCE[fmt][0], (fmt, rel)


def test_torchao_conversion_leaves_process_settings_alone(monkeypatch):
    """torchao's configs change inductor settings, and torchao <= 0.17 turned on TF32 for every fp32
    matmul of the process: the fp32 reference of a study then changed speed mid-search."""
    import torch._inductor.config as inductor_config
    import torchao.quantization

    from autoprec.precision.base import torchao_quantize
    from autoprec.precision.int8 import _torchao_int8

    before = (torch.get_float32_matmul_precision(), inductor_config.coordinate_descent_tuning)
    torch.manual_seed(0)
    converted = _torchao_int8(nn.Linear(16, 8))
    assert type(converted.weight).__name__ != "Parameter" or converted.weight.dtype != torch.float32
    assert (torch.get_float32_matmul_precision(), inductor_config.coordinate_descent_tuning) == before

    real = torchao.quantization.quantize_

    def like_torchao_0_17(model, config):  # what recommended_inductor_config_setter did up to 0.17
        torch.set_float32_matmul_precision("high")
        return real(model, config)

    monkeypatch.setattr(torchao.quantization, "quantize_", like_torchao_0_17)
    torchao_quantize(nn.Linear(16, 8), torchao.quantization.Int8DynamicActivationInt8WeightConfig())
    assert torch.get_float32_matmul_precision() == before[0]
