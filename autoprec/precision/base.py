"""The handler contract and the table that maps a format name to its handler."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


class FormatHandler(Protocol):
    name: str

    def unsupported_reason(self, module: nn.Module, device: torch.device) -> str | None:
        """None when this format can run `module` on `device`, else why not (one sentence)."""

    def convert(self, module: nn.Module, device: torch.device,
                input_qparams: tuple[float, int] | None = None) -> nn.Module:
        """A module computing like `module` in this format; `module` holds fp32 weights on `device`.

        `input_qparams`: the calibrated (scale, zero point) of the layer's input, for formats that
        `needs_calibration`; None for the others. A handler whose fastest kernel depends on the
        runtime sets `per_runtime = True` and takes `runtime` ("eager" or "compiled") as a keyword
        (see `convert_layer`). A handler whose converted module may have no `weight` tensor defines
        `drops_weight_tensor(module, device, runtime) -> bool` (see apply.layer_format_reason). A handler
        whose module takes and returns other floating dtypes than `io_dtype` as they come lists them in
        `native_io` (a tuple of dtypes): a model of such a default dtype adds no casts around it."""

    def needs_calibration(self, module: nn.Module) -> bool:
        """Whether `convert` needs the layer's calibrated input range (static int8)."""

    def io_dtype(self, device: torch.device) -> torch.dtype:
        """The floating dtype the converted module takes and returns."""


HANDLERS: dict[str, FormatHandler] = {}


def convert_layer(handler: FormatHandler, module: nn.Module, device: torch.device, runtime: str = "eager",
                  input_qparams: tuple[float, int] | None = None) -> nn.Module:
    """handler.convert, passing the runtime to the handlers that choose their kernel by it."""
    if getattr(handler, "per_runtime", False):
        return handler.convert(module, device, input_qparams, runtime=runtime)  # type: ignore[call-arg]
    return handler.convert(module, device, input_qparams)


def register(handler: FormatHandler) -> FormatHandler:
    HANDLERS[handler.name] = handler
    return handler


def torchao_quantize(module: nn.Module, config: object) -> nn.Module:
    """torchao's `quantize_` on one module, leaving the process as it was.

    Its configs default to `set_inductor_config=True`, which changes process-wide inductor settings
    (coordinate-descent tuning) and, up to torchao 0.17, set `torch.set_float32_matmul_precision("high")`:
    after the first int8 candidate every fp32 matmul of the process ran in TF32, so a study's fp32
    reference changed speed mid-search (seen on an H200: compiled MiniLM fp32 1.71 ms before, 0.64 ms
    after). A search must time every candidate under the same settings, so none are changed."""
    import dataclasses

    from torchao.quantization import quantize_

    if dataclasses.is_dataclass(config) and hasattr(config, "set_inductor_config"):
        config = dataclasses.replace(config, set_inductor_config=False)
    precision = torch.get_float32_matmul_precision()
    holder = nn.Sequential(module)
    try:
        quantize_(holder, config)
    finally:
        torch.set_float32_matmul_precision(precision)
    return holder[0]
