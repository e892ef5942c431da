"""int4 weight-only: torchao's Int4WeightOnlyConfig, group size 128, on CUDA.

Weights are stored as 4-bit integers with one bf16 scale and zero point per group of 128 input
features (asymmetric); activations stay bf16, and each call dequantizes the weight inside torch's
tinygemm kernel (`aten._weight_int4pack_mm`, torchao's "tile_packed_to_4d" packing: part of every CUDA
build of torch, where torchao's default "plain" packing needs the separate mslk kernels). It pays
where a layer is bound by reading its weight (small batches, decode); at large prefill batches the
bf16 matmul it replaces is compute-bound and int4 can be slower, which the search measures.

Refused, with the reason: off CUDA, below compute capability 8.0 (tinygemm's tensor-core kernels), for
a layer that is not Linear-like, and where the input features are not a multiple of the group size
(torchao would silently leave such a weight in bf16). The kernel pads the input features to a
multiple of 1024 and the output features to a multiple of 8: a layer off those multiples computes
(and stores) the padding, which its measured latency and memory include.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from autoprec.precision.base import register, torchao_quantize
from autoprec.precision.int8 import _as_linear
from autoprec.precision.layers import is_linear_like

GROUP_SIZE = 128
MIN_CAPABILITY = (8, 0)
PACKING = "tile_packed_to_4d"  # torchao's Int4PackingFormat for tinygemm


def in_features(module: nn.Module) -> int:
    """A Linear-like layer's input features (transformers' Conv1D stores its weight transposed)."""
    weight = module.weight
    return weight.shape[1] if isinstance(module, nn.Linear) else weight.shape[0]


class Int4Format:
    name = "int4"

    def needs_calibration(self, module: nn.Module) -> bool:
        return False

    def unsupported_reason(self, module: nn.Module, device: torch.device) -> str | None:
        if not is_linear_like(module):
            return (f"int4 is weight-only for Linear layers, not {type(module).__name__}; "
                    "give this layer fp32, fp16, bf16 or int8")
        if device.type != "cuda":
            return (f"int4 needs a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher "
                    f"(torch's tinygemm kernel), not {device.type}; give this layer bf16 or int8")
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"int4 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher; "
                    f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
        features = in_features(module)
        if features % GROUP_SIZE:
            return (f"int4 quantizes groups of {GROUP_SIZE} input features; this layer has {features}, "
                    f"not a multiple of {GROUP_SIZE}")
        return None

    def convert(self, module: nn.Module, device: torch.device,
                input_qparams: tuple[float, int] | None = None) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int4WeightOnlyConfig

            config = Int4WeightOnlyConfig(group_size=GROUP_SIZE, int4_packing_format=PACKING)
            # tinygemm takes bf16 weights and activations
            return torchao_quantize(_as_linear(module).to(device=device, dtype=torch.bfloat16), config)

    def io_dtype(self, device: torch.device) -> torch.dtype:
        return torch.bfloat16


register(Int4Format())
