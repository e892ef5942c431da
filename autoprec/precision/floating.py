"""fp32 / fp16 / bf16: the layer's weights stored and computed in that dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autoprec.precision.base import FLOAT_DTYPES, register


def cast_own_tensors(module: nn.Module, dtype: torch.dtype, *, untie: bool) -> None:
    """Cast the floating parameters and buffers held directly by `module` (not its children).

    With `untie`, every parameter becomes a new Parameter, so a weight shared with another module
    (tied embeddings) keeps its dtype there.
    """
    for key, param in list(module._parameters.items()):
        if param is None or not param.is_floating_point():
            continue
        if untie:
            module._parameters[key] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
        elif param.dtype != dtype:
            param.data = param.data.to(dtype)
    for key, buf in list(module._buffers.items()):
        if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
            module._buffers[key] = buf.to(dtype)


@dataclass(frozen=True)
class FloatFormat:
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.name]

    def unsupported_reason(self, module: nn.Module, device: torch.device) -> str | None:
        if self.dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return f"{torch.cuda.get_device_name(device)} has no bf16 support"
        return None

    def needs_calibration(self, module: nn.Module) -> bool:
        return False

    def convert(self, module: nn.Module, device: torch.device,
                input_qparams: tuple[float, int] | None = None) -> nn.Module:
        for sub in module.modules():
            cast_own_tensors(sub, self.dtype, untie=True)
        return module

    def io_dtype(self, device: torch.device) -> torch.dtype:
        return self.dtype


for _name in FLOAT_DTYPES:
    register(FloatFormat(_name))
