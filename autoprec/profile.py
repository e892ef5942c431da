"""The sensitivity profile: what each layer costs and damages in each format, one layer at a time.

For every searchable layer and every format it may take:
- `drop`: the fidelity drop (1 - mean per-sample cosine of the compared output to fp32) of the whole
  model on `example_inputs()` with only that layer changed. Damages add up almost exactly across
  layers (shared/facts/cpu-minilm.md), so the cost model sums them, calibrated to the real score.
- `latency_ms`: the layer alone on its real captured input, with the casts it needs at its
  boundaries, for each default dtype of the rest of the model. A layer timed alone is stable to a
  few percent where whole-model timing is not.
- `memory_bytes`: the layer's storage in that format (exact).

The work is layers x formats forwards and micro-timings: linear in the model's size.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from autoprec.precision import FLOAT_DTYPES, HANDLERS, module_storage_bytes
from autoprec.precision.apply import _cast_floats
from autoprec.timing import solo_latency_ms
from autoprec.userspec import ModelSpec, call_model, first_float_tensor

PROFILE_ATTR = "autoprec_profile"


@dataclass
class Profile:
    """layers[name][fmt] = {"drop", "latency_ms", "memory_bytes"}; latency_by_default[D][name][fmt] = ms."""

    layers: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    latency_by_default: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    reference_latency_ms: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Profile":
        return cls(**data)


def _compared(spec: ModelSpec, outputs: Any) -> torch.Tensor:
    tensor = spec.compared_tensor(outputs) if spec.output is not None else first_float_tensor(outputs)
    if tensor is None:
        raise ValueError("the model returns no floating tensor to compare")
    return tensor.float()


def _fidelity_drop(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    a, b = out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1)
    return float(1 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).double().mean())


def capture_layer_inputs(model: nn.Module, names: list[str], inputs: Any) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each named layer receives during one forward of `inputs`."""
    captured: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name in names:
        def hook(_mod, args, kwargs, name=name):
            captured.setdefault(name, (args, kwargs))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


def _converted(layer: nn.Module, fmt: str, device: torch.device) -> tuple[nn.Module, torch.dtype]:
    handler = HANDLERS[fmt]
    return handler.convert(copy.deepcopy(layer), device), handler.io_dtype(device)


def build_profile(spec: ModelSpec, model: nn.Module, example: Any, choices: dict[str, tuple[str, ...]],
                  defaults: tuple[str, ...], device: torch.device,
                  progress: Callable[[str], None] | None = None) -> Profile:
    """Profile every (layer, format) of `choices` on the fp32 `model` (left unchanged)."""
    profile = Profile()
    names = list(choices)
    start = time.perf_counter()
    with torch.inference_mode():
        reference = _compared(spec, call_model(model, example))
    # Drop: the whole model with a forward hook that swaps in one converted layer's output.
    for index, name in enumerate(names):
        layer = model.get_submodule(name)
        profile.layers[name] = {}
        for fmt in choices[name]:
            if fmt == "fp32":
                drop = 0.0
            else:
                converted, io_dtype = _converted(layer, fmt, device)

                def swap(_mod, args, kwargs, out, converted=converted, io_dtype=io_dtype):
                    return _cast_floats(converted(*_cast_floats(args, io_dtype), **_cast_floats(kwargs, io_dtype)),
                                        out.dtype)
                handle = layer.register_forward_hook(swap, with_kwargs=True)
                try:
                    with torch.inference_mode():
                        drop = _fidelity_drop(_compared(spec, call_model(model, example)), reference)
                finally:
                    handle.remove()
            profile.layers[name][fmt] = {"drop": drop}
        if progress:
            progress(f"drop {index + 1}/{len(names)}")
    profile.seconds["drop"] = time.perf_counter() - start

    start = time.perf_counter()
    captured = capture_layer_inputs(model, names, example)
    for index, name in enumerate(names):
        layer = model.get_submodule(name)
        args, kwargs = captured[name]
        for fmt in choices[name]:
            converted, io_dtype = _converted(layer, fmt, device)
            profile.layers[name][fmt]["memory_bytes"] = module_storage_bytes(converted)
            for default in defaults:
                outside = FLOAT_DTYPES[default]
                inside = outside if fmt == default else io_dtype  # cast only where the dtype changes
                a, k = _cast_floats(args, outside), _cast_floats(kwargs, outside)

                def forward(m=converted, a=a, k=k, inside=inside, outside=outside):
                    return _cast_floats(m(*_cast_floats(a, inside), **_cast_floats(k, inside)), outside)
                with torch.inference_mode():
                    ms, _ = solo_latency_ms(forward, device, rounds=5, min_round_s=0.01, warmup_calls=1)
                profile.latency_by_default.setdefault(default, {}).setdefault(name, {})[fmt] = ms
            profile.layers[name][fmt]["latency_ms"] = profile.latency_by_default[defaults[0]][name][fmt]
        if progress:
            progress(f"latency {index + 1}/{len(names)}")
    profile.seconds["latency"] = time.perf_counter() - start
    return profile
