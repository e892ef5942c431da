"""Which modules of a model can take a per-layer format."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

SEARCHABLE_CLASSES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _transformers_conv1d() -> type[nn.Module] | None:
    # Looked up, never imported: a model holding a Conv1D has already imported its module, and
    # importing transformers here would cost seconds (and pull in torchao) for every other model.
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_searchable(module: nn.Module) -> bool:
    conv1d = _transformers_conv1d()
    return isinstance(module, SEARCHABLE_CLASSES) or (conv1d is not None and isinstance(module, conv1d))


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (a Linear with its weight stored transposed)."""
    conv1d = _transformers_conv1d()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


@dataclass(frozen=True)
class LayerInfo:
    name: str
    cls: str
    weight_shape: tuple[int, ...]
    params: int


def searchable_layers(model: nn.Module) -> list[LayerInfo]:
    """The searchable layers of `model`, in `named_modules()` order."""
    found = []
    for name, module in model.named_modules():
        if name and is_searchable(module):
            weight = getattr(module, "weight", None)
            shape = tuple(weight.shape) if weight is not None else ()
            params = sum(p.numel() for p in module.parameters(recurse=False))
            found.append(LayerInfo(name, type(module).__name__, shape, params))
    return found
