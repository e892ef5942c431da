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


def _parent(model: nn.Module, name: str) -> nn.Module | None:
    parent_name, _, _ = name.rpartition(".")
    try:
        return model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None


def owned_by_parent(model: nn.Module, name: str) -> bool:
    """A layer its parent runs without calling it: nn.MultiheadAttention passes `out_proj.weight` to its
    functional kernel itself, so a format of the layer's own (a cast at its boundary, a quantized module)
    never takes effect or breaks the kernel. Such a layer is no layer of its own: it takes its parent's
    (the default) format."""
    return isinstance(_parent(model, name), nn.MultiheadAttention)


def parent_unsupported_reason(model: nn.Module, name: str, fmt: str, drops_weight_tensor: bool) -> str | None:
    """Why the layer `name` cannot take `fmt` where it sits (None: it can). `drops_weight_tensor`: the format
    swaps the layer for a module without a `weight` tensor (torch's dynamic int8)."""
    if owned_by_parent(model, name):
        return ("it is the output projection of a MultiheadAttention, whose kernel reads its weight itself: it "
                "takes the model's default format; leave it out of the policy")
    if drops_weight_tensor and isinstance(_parent(model, name), nn.TransformerEncoderLayer):
        return (f"{fmt} here replaces it with a module without a weight tensor, and its TransformerEncoderLayer's "
                "fused inference path reads that tensor; give it fp32, bf16 or fp16 (int8 runs there in the "
                "compiled runtime on a VNNI CPU and on CUDA)")
    return None


def searchable_layers(model: nn.Module) -> list[LayerInfo]:
    """The searchable layers of `model`, in `named_modules()` order (not the ones their parent runs itself:
    `owned_by_parent`)."""
    found = []
    for name, module in model.named_modules():
        if name and is_searchable(module) and not owned_by_parent(model, name):
            weight = getattr(module, "weight", None)
            shape = tuple(weight.shape) if weight is not None else ()
            params = sum(p.numel() for p in module.parameters(recurse=False))
            found.append(LayerInfo(name, type(module).__name__, shape, params))
    return found
