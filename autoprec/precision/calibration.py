"""Calibration for static int8: the input range of each layer, observed on the fp32 model.

A static int8 layer quantizes its input with a fixed scale and zero point, so those are measured
once, before any layer is converted, on calibration batches run through the fp32 model. The result
depends only on the fp32 model and the batches: a search computes it once and reuses it for every
candidate (`Calibration`), and a user applying a policy passes the same batches again.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoprec.errors import PolicyError
from autoprec.model.model_file import call_model, move_inputs


@dataclass
class Calibration:
    """Per-layer uint8 quantization parameters of the layer's input: name -> (scale, zero_point)."""

    inputs: dict[str, tuple[float, int]] = field(default_factory=dict)
    batches: int = 0

    def covers(self, names: Iterable[str]) -> bool:
        return all(name in self.inputs for name in names)

    def to_json(self) -> dict[str, Any]:
        return {"inputs": {k: [s, z] for k, (s, z) in self.inputs.items()}, "batches": self.batches}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Calibration":
        return cls({k: (float(s), int(z)) for k, (s, z) in data["inputs"].items()}, int(data.get("batches", 0)))


def _observer() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        from torch.ao.quantization.observer import HistogramObserver
    # Without VNNI, u8 x s8 products are summed pairwise in int16 (vpmaddubsw) and saturate when
    # activations use all 8 bits: on an AVX2-limited oneDNN, ResNet-18 all-int8 lost 9.9e-3 of
    # fidelity at 8 bits against 3.1e-3 with VNNI (benchmarks/README.md). There, 7-bit activations
    # (torch's reduce_range guard); with VNNI the full range.
    return HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0,
                             quant_max=255 if cpu_has_vnni() else 127)


_NO_VNNI_ISAS = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}


def cpu_has_vnni() -> bool:
    """Whether oneDNN may use VNNI int8 dot products here: the CPU has them (avx512_vnni or avx_vnni)
    and ONEDNN_MAX_CPU_ISA does not cap oneDNN below them."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if cap in _NO_VNNI_ISAS:
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False  # unknown: the safe choice


def calibrate(model: nn.Module, names: Iterable[str], batches: Iterable[Any]) -> Calibration:
    """Observe the input of each named layer of the (fp32) `model` over `batches`; `model` is unchanged."""
    names = list(names)
    observers = {name: _observer() for name in names}
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    handles = []
    for name in names:
        def hook(_mod: nn.Module, args: tuple, observer: nn.Module = observers[name]) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                observer(args[0].detach().float())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    count = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                call_model(model, move_inputs(batch, device))
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise PolicyError("calibration: no batches were given; pass the batches the policy was calibrated on "
                          "(model.py's calibration_inputs(), else eval_inputs(), else example_inputs())")
    result = Calibration(batches=count)
    for name, observer in observers.items():
        if observer.min_val.numel() == 0 or not torch.isfinite(observer.min_val):
            continue  # the layer never ran on these batches: it cannot take static int8
        scale, zero_point = observer.calculate_qparams()
        result.inputs[name] = (float(scale), int(zero_point))
    return result


def calibrated_layers(model: nn.Module, device: torch.device | str,
                      formats: Iterable[str] | None = None) -> list[str]:
    """The searchable layers of `model` that can take a calibrated format (static int8) on `device`, among
    the formats a policy may name (`DTYPES`: a registered format that is not one is not calibrated for),
    or among `formats` (those searched)."""
    from autoprec.precision import DTYPES
    from autoprec.precision.base import HANDLERS
    from autoprec.precision.layers import is_searchable

    device = torch.device(device)
    wanted = DTYPES if formats is None else tuple(f for f in DTYPES if f in set(formats))
    handlers = [HANDLERS[name] for name in wanted if name in HANDLERS]
    return [name for name, module in model.named_modules()
            if name and is_searchable(module)
            and any(h.needs_calibration(module) and h.unsupported_reason(module, device) is None
                    for h in handlers)]
