"""Calibration for static int8: the input range of each layer, observed on the fp32 model.

A static int8 layer quantizes its input with a fixed scale and zero point, so those are measured
once, before any layer is converted, on calibration batches run through the fp32 model. The result
depends only on the fp32 model and the batches: a search computes it once and reuses it for every
candidate (`Calibration`), and a user applying a policy passes the same batches again.

Each layer's range comes from one of several recipes (`RECIPES`), because no one recipe suits every
layer: a histogram range clips rare large activations (right for most layers, ruinous for one whose
output depends on those few: MiniLM's FFN output layers after GELU), min-max keeps them, and SmoothQuant-style
smoothing moves a Linear layer's outlier input channels into its weights. `calibrate` tries each recipe
a layer can take on a sample of the layer's own calibration inputs and keeps the one whose int8 output
is closest to the fp32 output; the choice is recorded (`Calibration.recipes`) and a policy file names
it, so applying the policy later reproduces what the search measured.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from autoprec.errors import PolicyError
from autoprec.model.model_file import call_model, move_inputs

RECIPES: tuple[str, ...] = ("histogram", "minmax", "smooth")
DEFAULT_RECIPE = "histogram"  # what a policy file that names no recipe was calibrated with
SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: outliers split evenly between input and weight
_SAMPLE_ROWS = 256  # rows (tokens, positions) of a Linear layer's input kept per batch to compare recipes on
_SAMPLE_BATCHES = 8
_SAMPLE_IMAGES = 4  # leading samples of a convolution's first calibration input kept for the same


class InputQuant(NamedTuple):
    """How a static int8 layer quantizes its input: uint8 codes = round(x * smoothing / scale) + zero_point,
    with `smoothing` a per-input-channel factor (None: 1) that the layer's weight is divided by."""

    scale: float
    zero_point: int
    smoothing: torch.Tensor | None = None


@dataclass
class Calibration:
    """Per-layer input quantization of the static int8 layers (name -> InputQuant) and the recipe that
    gave each (name -> one of RECIPES)."""

    inputs: dict[str, InputQuant] = field(default_factory=dict)
    batches: int = 0
    recipes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inputs = {name: InputQuant(*q) for name, q in self.inputs.items()}

    def covers(self, names: Iterable[str]) -> bool:
        return all(name in self.inputs for name in names)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (no pickle): name -> [scale, zero point] or [scale, zero point, [smoothing factors]]."""
        inputs = {name: [q.scale, q.zero_point] + ([q.smoothing.tolist()] if q.smoothing is not None else [])
                  for name, q in self.inputs.items()}
        return {"inputs": inputs, "batches": self.batches, "recipes": dict(self.recipes)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Calibration":
        inputs = {name: InputQuant(float(q[0]), int(q[1]),
                                   torch.tensor(q[2], dtype=torch.float32) if len(q) > 2 else None)
                  for name, q in data["inputs"].items()}
        return cls(inputs, int(data.get("batches", 0)), dict(data.get("recipes", {})))


def recipes_for(module: nn.Module) -> tuple[str, ...]:
    """The recipes a layer can take: smoothing needs a Linear's per-input-channel weight columns."""
    from autoprec.precision.layers import is_linear_like

    return RECIPES if is_linear_like(module) else tuple(r for r in RECIPES if r != "smooth")


def _quant_max() -> int:
    # Without VNNI, u8 x s8 products are summed pairwise in int16 (vpmaddubsw) and saturate when
    # activations use all 8 bits: on an AVX2-limited oneDNN, ResNet-18 all-int8 lost 9.9e-3 of
    # fidelity at 8 bits against 3.1e-3 with VNNI (benchmarks/README.md). There, 7-bit activations
    # (torch's reduce_range guard); with VNNI the full range.
    return 255 if cpu_has_vnni() else 127


def _observer(kind: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver
    cls = MinMaxObserver if kind == "minmax" else HistogramObserver
    return cls(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=_quant_max())


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


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A Linear-like layer's weight as (out_features, in_features), fp32."""
    weight = module.weight.detach().float()
    return weight if isinstance(module, nn.Linear) else weight.t()  # transformers' Conv1D stores it transposed


def smoothing_factors(input_absmax: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors: the input is multiplied by them, the weight's columns divided.
    Channels where either side is all zeros keep factor 1."""
    w = weight.abs().amax(dim=0)
    s = input_absmax.clamp_min(1e-8) ** SMOOTHING_ALPHA / w.clamp_min(1e-8) ** (1 - SMOOTHING_ALPHA)
    s = torch.where((input_absmax > 0) & (w > 0), s, torch.ones_like(s))
    return (1.0 / s).float()


class _LayerStats:
    """What one layer's calibration batches leave: observers per range recipe, per-channel input maxima,
    and a sample of its inputs to compare the recipes on."""

    def __init__(self, module: nn.Module, recipes: tuple[str, ...]) -> None:
        self.module, self.recipes = module, recipes
        self.linear = "smooth" in recipes_for(module)
        self.observers = {r: _observer(r) for r in recipes if r != "smooth"}
        self.absmax: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(0)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        for observer in self.observers.values():
            observer(x)
        if self.linear:
            rows = x.reshape(-1, x.shape[-1])
            if "smooth" in self.recipes:
                absmax = rows.abs().amax(dim=0)
                self.absmax = absmax if self.absmax is None else torch.maximum(self.absmax, absmax)
            if (len(self.recipes) > 1 or "smooth" in self.recipes) and len(self.samples) < _SAMPLE_BATCHES:
                pick = torch.randperm(rows.shape[0], generator=self.generator)[:_SAMPLE_ROWS]
                self.samples.append(rows[pick.to(rows.device)].clone())
        elif len(self.recipes) > 1 and not self.samples:
            self.samples.append(x[:_SAMPLE_IMAGES].clone())

    def candidates(self) -> dict[str, InputQuant]:
        out = {}
        for recipe, observer in self.observers.items():
            if observer.min_val.numel() and torch.isfinite(observer.min_val):
                scale, zero_point = observer.calculate_qparams()
                out[recipe] = InputQuant(float(scale), int(zero_point))
        if "smooth" in self.recipes and self.absmax is not None and self.samples:
            factors = smoothing_factors(self.absmax, linear_weight(self.module).to(self.absmax.device))
            observer = _observer("histogram")
            observer(torch.cat(self.samples) * factors)
            scale, zero_point = observer.calculate_qparams()
            out["smooth"] = InputQuant(float(scale), int(zero_point), factors.cpu())
        return out

    def error(self, quant: InputQuant) -> float:
        """Relative squared error of the layer's output with its input quantized by `quant` (and, for a
        Linear, its weight per channel in int8, as the static int8 layer computes) on the sample."""
        x = torch.cat(self.samples)
        qmax = _quant_max()
        with torch.inference_mode():
            if self.linear:
                weight = linear_weight(self.module).to(x.device)
                reference = F.linear(x, weight)
                if quant.smoothing is not None:
                    factors = quant.smoothing.to(x.device)
                    x, weight = x * factors, weight / factors
                xq = torch.fake_quantize_per_tensor_affine(x, quant.scale, quant.zero_point, 0, qmax)
                out = F.linear(xq, _fake_quant_weight(weight))
            else:
                reference = self.module(x)
                out = self.module(torch.fake_quantize_per_tensor_affine(x, quant.scale, quant.zero_point, 0, qmax))
        return float(((out - reference) ** 2).sum() / (reference ** 2).sum().clamp_min(1e-30))


def _fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def calibrate(model: nn.Module, names: Iterable[str], batches: Iterable[Any],
              recipes: Mapping[str, str] | None = None) -> Calibration:
    """Observe the input of each named layer of the (fp32) `model` over `batches`; `model` is unchanged.

    `recipes`: the recipe of each layer (a policy's record); a layer not in it takes the one of
    `recipes_for(layer)` whose int8 output is closest to fp32 on its calibration inputs."""
    names = list(names)
    recipes = dict(recipes or {})
    stats = {}
    for name in names:
        module = model.get_submodule(name)
        if name in recipes and recipes[name] not in recipes_for(module):
            raise PolicyError(f"calibration: layer {name!r} cannot take recipe {recipes[name]!r}; "
                              f"use one of {', '.join(recipes_for(module))}")
        stats[name] = _LayerStats(module, (recipes[name],) if name in recipes else recipes_for(module))
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    handles = []
    for name in names:
        def hook(_mod: nn.Module, args: tuple, layer: _LayerStats = stats[name]) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                layer.observe(args[0])
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
    for name, layer in stats.items():
        candidates = layer.candidates()
        if not candidates:
            continue  # the layer never ran on these batches: it cannot take static int8
        if len(candidates) == 1:
            chosen = next(iter(candidates))
        else:  # ties go to the first recipe listed (RECIPES' order)
            errors = {recipe: layer.error(quant) for recipe, quant in candidates.items()}
            chosen = min(errors, key=errors.get)
        result.inputs[name] = candidates[chosen]
        result.recipes[name] = chosen
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
