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

    def convert(self, module: nn.Module, device: torch.device) -> nn.Module:
        """A module computing like `module` in this format; `module` holds fp32 weights on `device`.

        A handler whose fastest kernel depends on the runtime sets `per_runtime = True` and takes
        `runtime` ("eager" or "compiled") as a keyword (see `convert_layer`)."""

    def io_dtype(self, device: torch.device) -> torch.dtype:
        """The floating dtype the converted module takes and returns."""


HANDLERS: dict[str, FormatHandler] = {}


def convert_layer(handler: FormatHandler, module: nn.Module, device: torch.device, runtime: str = "eager") -> nn.Module:
    """handler.convert, passing the runtime to the handlers that choose their kernel by it."""
    if getattr(handler, "per_runtime", False):
        return handler.convert(module, device, runtime=runtime)  # type: ignore[call-arg]
    return handler.convert(module, device)


def register(handler: FormatHandler) -> FormatHandler:
    HANDLERS[handler.name] = handler
    return handler
