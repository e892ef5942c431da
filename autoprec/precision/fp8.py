"""fp8 (e4m3): torchao's float8 dynamic-activation / float8-weight config with per-row scales.

Weights are stored as float8_e4m3fn with one scale per output row; each call quantizes its
activations per row (token) on the fly and multiplies in fp8 (cuBLASLt / torch._scaled_mm). Only
Linear-like layers, only on CUDA GPUs of compute capability 8.9 or higher (Ada, Hopper and later),
where fp8 tensor cores exist; elsewhere the layer is refused with the reason. Per-row scaling
works on bf16 weights, so the layer computes with bf16 inputs and outputs.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from autoprec.precision.base import register, torchao_quantize
from autoprec.precision.int8 import _as_linear
from autoprec.precision.layers import is_linear_like

MIN_CAPABILITY = (8, 9)


class Fp8Format:
    name = "fp8"

    def needs_calibration(self, module: nn.Module) -> bool:
        return False

    def unsupported_reason(self, module: nn.Module, device: torch.device) -> str | None:
        if not is_linear_like(module):
            return (f"fp8 is for Linear layers only, not {type(module).__name__}; "
                    "give this layer fp32, fp16, bf16 or int8")
        if device.type != "cuda":
            return (f"fp8 needs a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher "
                    f"(fp8 tensor cores), not {device.type}; give this layer bf16 or int8")
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"fp8 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher; "
                    f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
        return None

    def convert(self, module: nn.Module, device: torch.device,
                input_qparams: tuple[float, int] | None = None) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            return torchao_quantize(_as_linear(module).to(device=device, dtype=torch.bfloat16),
                                    Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))

    def io_dtype(self, device: torch.device) -> torch.dtype:
        return torch.bfloat16


register(Fp8Format())
