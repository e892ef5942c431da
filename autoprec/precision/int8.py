"""int8: real int8 kernels, not simulation.

Linear-like layers, CPU, eager runtime: torch's dynamic int8 Linear with per-channel symmetric
weight scales (benchmarks/README.md says why: in eager mode it is the only int8 path faster than
fp32 here, and per-channel scales keep the accuracy that per-tensor loses). CPU, compiled runtime,
on a CPU with VNNI int8 dot products: torchao's int8 dynamic-activation / int8-weight config, which
inductor fuses (MiniLM as fast as torch's dynamic int8 compiled, which breaks the graph at every
layer, and ten times more faithful; benchmarks/runtime_ratios.py); without VNNI torch's dynamic int8
(torchao's compiled int8 was 26x slower than compiled fp32 on an AVX2-only AMD EPYC). CUDA: torchao's config.
Convolutions, CPU only: static int8 (calibrated input scale, per-channel weights, oneDNN kernels;
`static_int8.py`); they need calibration (`calibration.py`). On CUDA they are refused with the reason.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from autoprec.errors import UnsupportedFormat
from autoprec.precision.base import register, torchao_quantize
from autoprec.precision.layers import is_linear_like
from autoprec.precision.static_int8 import StaticInt8Conv, static_conv_unsupported_reason


def _as_linear(module: nn.Module) -> nn.Linear:
    """nn.Linear itself, or transformers' Conv1D rewritten as the Linear it is."""
    if isinstance(module, nn.Linear):
        return module
    weight = module.weight  # Conv1D stores (in_features, out_features)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def _cpu_dynamic_int8(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        linear = linear.float().cpu()
        linear.qconfig = per_channel_dynamic_qconfig
        return DynamicQuantizedLinear.from_float(linear)


def _torchao_int8(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        # torchao 0.17 announces, once per layer, that its int8 tensor types are deprecated: a search
        # converts hundreds of layers, and the warnings buried its output (seen on an H200)
        warnings.simplefilter("ignore")
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return torchao_quantize(linear.float(), Int8DynamicActivationInt8WeightConfig())


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX), from Linux's
    /proc/cpuinfo; False where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def kernel(device: torch.device, runtime: str = "eager") -> str:
    """Which int8 kernel a layer gets: "torchao" or "torch-dynamic" (see the module's docstring)."""
    if device.type == "cuda" or (runtime == "compiled" and cpu_has_vnni()):
        return "torchao"
    return "torch-dynamic"


class Int8Format:
    name = "int8"
    per_runtime = True  # convert() takes the runtime: the fastest int8 kernel depends on it

    def needs_calibration(self, module: nn.Module) -> bool:
        return not is_linear_like(module)

    def unsupported_reason(self, module: nn.Module, device: torch.device) -> str | None:
        if not is_linear_like(module):
            return static_conv_unsupported_reason(module, device)
        if device.type not in ("cpu", "cuda"):
            return f"int8 is implemented for cpu and cuda, not {device.type}"
        if device.type == "cpu" and "qnnpack" not in torch.backends.quantized.supported_engines and \
                "fbgemm" not in torch.backends.quantized.supported_engines:
            return "this torch build has no quantized CPU engine (fbgemm or qnnpack)"
        return None

    def drops_weight_tensor(self, module: nn.Module, device: torch.device, runtime: str = "eager") -> bool:
        """Whether the converted layer has no `weight` tensor (torch's dynamic int8 module: a packed weight
        behind a method), which a parent reading the tensor itself cannot run with."""
        return is_linear_like(module) and kernel(device, runtime) == "torch-dynamic"

    def convert(self, module: nn.Module, device: torch.device,
                input_qparams: tuple[float, int] | None = None, runtime: str = "eager") -> nn.Module:
        if not is_linear_like(module):
            if input_qparams is None:
                raise UnsupportedFormat(f"static int8 {type(module).__name__} needs calibration: its input never "
                                        "ran on the calibration batches, or none were given")
            return StaticInt8Conv.from_float(module, input_qparams)
        linear = _as_linear(module)
        if kernel(device, runtime) == "torchao":
            return _torchao_int8(linear)
        return _cpu_dynamic_int8(linear)

    def io_dtype(self, device: torch.device) -> torch.dtype:
        return torch.float32


register(Int8Format())
