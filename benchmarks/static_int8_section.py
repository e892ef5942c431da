"""Static int8 on the CPU, for benchmarks/int8_paths.py: one ResNet block, the whole ResNet-18, and the
MiniLM FFN block with a static int8 Linear against the dynamic one.

Routes compared for convolutions:
- autoprec's per-layer static int8 (`autoprec.precision.static_int8`): each int8 convolution quantizes its
  own input with a calibrated scale and returns fp32 (oneDNN qconv with a floating output); a BatchNorm
  that alone consumes its output is folded into it where torch.fx can trace the model (also shown
  without folding); ReLU and the residual add stay fp32. Works on any model, traced or not.
- FX graph mode (`torch.ao.quantization.quantize_fx`, the x86 default qconfig mapping): the whole graph
  traced, conv-bn(-relu) fused, int8 between neighbouring int8 ops, the residual add in int8; needs a
  model torch.fx can trace.
Dynamic int8 has no convolution kernel; for the MiniLM block, a static int8 Linear (calibrated per-tensor
input scale, oneDNN qlinear with fp32 output) is compared with torch's dynamic int8 Linear.

`compile_=True` adds torch.compile of the autoprec and FX int8 variants: the hook for the compiled runtime.
"""

from __future__ import annotations

import copy
import time
import warnings
from unittest import mock

import torch
from torch import nn

import _common as C
from autoprec.precision import apply_formats, calibrate
from autoprec.precision.int8 import _cpu_dynamic_int8
from autoprec.model.model_file import load_spec

RESNET = C.REPO / "studies" / "resnet" / "model.py"


def fx_static_int8(model: nn.Module, example: torch.Tensor, batches: list[torch.Tensor]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (example,))
        with torch.inference_mode():
            for batch in batches:
                prepared(batch)
        return convert_fx(prepared)


class StaticInt8Linear(nn.Module):
    """A Linear with a calibrated per-tensor uint8 input and per-channel int8 weights, fp32 output (oneDNN)."""

    def __init__(self, linear: nn.Linear, scale: float, zero_point: int) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.w_scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.w_zp = torch.zeros_like(self.w_scale, dtype=torch.int64)
        qweight = torch.clamp(torch.round(weight / self.w_scale[:, None]), -127, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        self.bias = linear.bias.detach().float() if linear.bias is not None else None
        self.scale, self.zero_point = scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.quantize_per_tensor(x, self.scale, self.zero_point, torch.quint8).int_repr()
        return torch.ops.onednn.qlinear_pointwise(q, self.scale, self.zero_point, self.packed, self.w_scale,
                                                  self.w_zp, self.bias, 1.0, 0, torch.float32, "none", [], "")


def _bf16_io(module: nn.Module):
    module = copy.deepcopy(module).to(torch.bfloat16)
    return lambda x: module(x.to(torch.bfloat16)).float()


def _convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _compile(variants: dict, first_call: dict, names: list[str], x) -> None:
    torch._dynamo.reset()
    for name in names:
        compiled = torch.compile(variants[name])
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                compiled(x)
        except Exception as exc:  # recorded, not fatal: the table says which compile failed
            first_call[f"{name}, torch.compile"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            continue
        first_call[f"{name}, torch.compile"] = f"{time.perf_counter() - t0:.1f} s compile + first call"
        variants[f"{name}, torch.compile"] = compiled


def _table(title: str, variants: dict, first_call: dict, x, ref_name: str, rounds: int, min_round_s: float) -> str:
    with torch.inference_mode():
        ref = variants[ref_name](x).float()
        outs = {name: m(x).float() for name, m in variants.items()}
        timing = C.interleaved({n: (lambda m=m: m(x)) for n, m in variants.items()}, ref_name, rounds, min_round_s)
    rows = []
    for name in variants:
        t = timing[name]
        mean_cos, _ = C.row_cosine(outs[name].flatten(1), ref.flatten(1))
        rows.append([name, C.fmt_ms(t["ms"]), f"{1 / t['ratio']:.2f}x", "-" if name == ref_name else f"{t['spread']:.3f}",
                     f"{C.rel_error(outs[name], ref):.2e}", f"{1 - mean_cos:.1e}", first_call.get(name, "-")])
    for name, note in first_call.items():
        if name not in variants:
            rows.append([name, "-", "-", "-", "-", "-", note])
    head = (f"{title}\n\n{rounds} rounds; each round times every variant back to back with fp32 (AB/BA), "
            f">= {min_round_s} s per side.\n\n")
    return head + C.table(["path", "median ms", "speed-up vs fp32 (median of pairs)", "pair spread max/min",
                           "relative error vs fp32", "1 - mean row cosine", "setup / first call"], rows)


def resnet_sections(rounds: int, min_round_s: float, compile_: bool) -> str:
    spec = load_spec(RESNET)
    model = spec.new_model()
    example, batches = spec.example(), spec.calibration_batches()
    out = []
    # one block: layer2.0 (conv-bn-relu-conv-bn + strided 1x1 downsample, residual add, relu) on its real input
    block = copy.deepcopy(model.layer2[0]).eval()
    captured: list[torch.Tensor] = []
    hook = model.layer2[0].register_forward_pre_hook(lambda m, a: captured.append(a[0].clone()))
    with torch.inference_mode():
        model(example)
        for batch in batches:
            model(batch)
    hook.remove()
    x, block_batches = captured[0], captured[1:]
    for title, net, inp, calib in (
            (f"#### One ResNet-18 block (`layer2.0`: 3 convolutions, its real input {tuple(captured[0].shape)})",
             block, x, block_batches),
            (f"#### Whole ResNet-18 (studies/resnet, batch {tuple(example.shape)}), every convolution int8, `fc` fp32",
             model, example, batches)):
        first_call: dict[str, str] = {}
        variants: dict = {"fp32": net, "bf16 (`.to(torch.bfloat16)`)": _bf16_io(net)}
        t0 = time.perf_counter()
        variants["autoprec static int8, per layer"] = apply_formats(
            copy.deepcopy(net), {n: "int8" for n in _convs(net)}, calibration=calib)
        first_call["autoprec static int8, per layer"] = f"{time.perf_counter() - t0:.2f} s calibrate + convert"
        with mock.patch("autoprec.precision.apply.foldable_batchnorms", lambda model, names: {}):
            variants["same, BatchNorm not folded"] = apply_formats(
                copy.deepcopy(net), {n: "int8" for n in _convs(net)}, calibration=calib)
        t0 = time.perf_counter()
        variants["FX graph mode static int8 (x86 qconfig, fused)"] = fx_static_int8(net, inp, calib)
        first_call["FX graph mode static int8 (x86 qconfig, fused)"] = f"{time.perf_counter() - t0:.2f} s"
        first_call["dynamic int8"] = "no dynamic int8 convolution in torch"
        if compile_:
            _compile(variants, first_call, ["fp32", "autoprec static int8, per layer",
                                            "FX graph mode static int8 (x86 qconfig, fused)"], inp)
        out.append(_table(title, variants, first_call, inp, "fp32", rounds, min_round_s))
    return "\n\n".join(out)


def minilm_block_section(rounds: int, min_round_s: float, compile_: bool, layer: int = 0) -> str:
    spec, model, example = C.load_minilm()
    src = model.encoder.encoder.layer[layer]
    captured: list[torch.Tensor] = []
    hook = src.intermediate.dense.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    with torch.inference_mode():
        model(**example)
        for batch in spec.eval_batches()[:4]:
            model(**batch)
    hook.remove()
    x, calib = captured[0], captured[1:]
    ffn = nn.Sequential(copy.deepcopy(src.intermediate.dense), nn.GELU(), copy.deepcopy(src.output.dense)).eval()
    ranges = calibrate(ffn, ["0", "2"], calib)
    static = copy.deepcopy(ffn)
    static[0] = StaticInt8Linear(ffn[0], *ranges.inputs["0"])
    static[2] = StaticInt8Linear(ffn[2], *ranges.inputs["2"])
    dynamic = copy.deepcopy(ffn)
    dynamic[0], dynamic[2] = _cpu_dynamic_int8(ffn[0]), _cpu_dynamic_int8(ffn[2])
    variants: dict = {"fp32": ffn, "bf16 (`.to(torch.bfloat16)`)": _bf16_io(ffn),
                      "dynamic int8 Linear, per-channel (autoprec)": dynamic,
                      "static int8 Linear, per-tensor input calibrated (oneDNN qlinear, fp32 out)": static}
    first_call: dict[str, str] = {}
    if compile_:
        _compile(variants, first_call, ["fp32", "static int8 Linear, per-tensor input calibrated (oneDNN qlinear, fp32 out)"], x)
    title = (f"#### One MiniLM FFN block (encoder layer {layer}: its real input {tuple(x.shape)} -> Linear 1536 -> "
             f"GELU -> Linear 384), static against dynamic int8 Linear; calibrated on {len(calib)} eval batches")
    return _table(title, variants, first_call, x, "fp32", rounds, min_round_s)
