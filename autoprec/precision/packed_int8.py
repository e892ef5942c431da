"""The state the static int8 layers share: per-output-channel symmetric int8 weights with their scales,
the float bias, and oneDNN's packed (blocked) copy of the weight.

The int8 weight is the module's state (copied, saved, counted by memory_bytes); the packed copy is made
when the layer is built and again after a copy or a state load, never copied or saved: packed eagerly,
because torch.compile cannot trace the packing (a graph break per layer).
"""

from __future__ import annotations

import torch
from torch import nn


class PackedInt8Layer(nn.Module):
    """Base of StaticInt8Conv and StaticInt8Linear; a subclass sets its weights with `_set_weights`
    (after everything its `_pack` reads) and packs them in `_pack`."""

    _packed: torch.Tensor | None = None

    def _set_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight = weight.detach().float().cpu()
        scale = weight.abs().reshape(weight.shape[0], -1).amax(dim=1).clamp_min(1e-12) / 127.0
        per_channel = scale.reshape(-1, *[1] * (weight.dim() - 1))
        self.register_buffer("weight_int8", torch.clamp(torch.round(weight / per_channel), -127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros(scale.shape[0], dtype=torch.int64))
        self.register_buffer("bias", bias.detach().float().cpu() if bias is not None else None)
        self._packed = None
        self.packed_weight()

    def _pack(self) -> torch.Tensor:
        raise NotImplementedError

    def packed_weight(self) -> torch.Tensor:
        if self._packed is None:
            self._packed = self._pack()
        return self._packed

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_packed"] = None  # an opaque oneDNN tensor: neither deep-copyable nor picklable
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.packed_weight()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None
        self.packed_weight()
