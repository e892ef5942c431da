"""Apply a per-layer format choice to a model in place."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch
from torch import nn

from autoprec.errors import PolicyError, UnsupportedFormat
from autoprec.precision.base import FLOAT_DTYPES, HANDLERS, convert_layer
from autoprec.model.model_file import BadBatches, checked_batches, one_line
from autoprec.precision.calibration import Calibration, calibrate
from autoprec.precision.floating import cast_own_tensors
from autoprec.precision.fold import foldable_batchnorms, folded_conv
from autoprec.precision.layers import is_searchable, parent_unsupported_reason


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def add_boundary_casts(module: nn.Module, inside: torch.dtype, outside: torch.dtype | None) -> None:
    """Cast floating inputs to `inside` on entry and floating outputs to `outside` on exit."""

    def cast_inputs(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast_floats(args, inside), _cast_floats(kwargs, inside)

    module.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    if outside is not None:
        module.register_forward_hook(lambda _mod, _args, out: _cast_floats(out, outside))


def layer_format_reason(model: nn.Module, name: str, fmt: str, device: torch.device,
                        runtime: str = "eager") -> str | None:
    """Why the searchable layer `name` cannot take the known format `fmt` (None: it can): on the device,
    or where it sits in the model."""
    module = model.get_submodule(name)
    handler = HANDLERS[fmt]
    reason = handler.unsupported_reason(module, device)
    if reason is None:
        drops = getattr(handler, "drops_weight_tensor", None)
        reason = parent_unsupported_reason(model, name, fmt, bool(drops and drops(module, device, runtime)))
    return reason


def check_layer_format(model: nn.Module, name: str, fmt: str, device: torch.device, runtime: str = "eager") -> None:
    """Raise the specific error for a layer/format pair that cannot be applied."""
    modules = dict(model.named_modules())
    if fmt not in HANDLERS:
        raise PolicyError(f"layer {name!r}: unknown format {fmt!r}; use one of {', '.join(HANDLERS)}")
    if name not in modules or not name:
        raise PolicyError(f"layer {name!r} is not in the model ({type(model).__name__}); "
                          "use a name from `autoprec layers MODEL.py`")
    module = modules[name]
    if not is_searchable(module):
        raise PolicyError(f"layer {name!r} is a {type(module).__name__}, which takes no per-layer format; "
                          "list only Linear, Conv1d/2d/3d or Conv1D layers")
    reason = layer_format_reason(model, name, fmt, device, runtime)
    if reason is not None:
        raise UnsupportedFormat(f"layer {name!r}: {reason}")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


CalibrationData = Union[Calibration, Iterable[Any], None]


def needs_calibration(model: nn.Module, layers: Mapping[str, str]) -> list[str]:
    """The listed layers whose format is calibrated (static int8 convolutions)."""
    return [name for name, fmt in layers.items() if fmt in HANDLERS and name in dict(model.named_modules())
            and HANDLERS[fmt].needs_calibration(model.get_submodule(name))]


_CALIBRATION_FIX = ("pass calibration=<a list of batches, each a tensor, tuple or dict of tensors as the model takes> "
                    "(model.py's calibration_inputs(), else eval_inputs(), else [example_inputs()])")


def _calibrate_checked(model: nn.Module, names: list[str], batches: Any,
                       recipes: Mapping[str, str] | None = None) -> Calibration:
    """calibrate() on batches a user passed, checked as the CLI checks calibration_inputs() (a bare tensor
    or dict is taken as one batch): whatever is wrong, one PolicyError line, and the model untouched."""
    try:
        checked = checked_batches(batches, one_batch_ok=True, verb="got")
    except BadBatches as exc:
        raise PolicyError(f"calibration: {exc}; {_CALIBRATION_FIX}") from None
    try:
        return calibrate(model, names, checked, recipes)
    except PolicyError:
        raise
    except Exception as exc:  # the batches do not fit the model: torch's own message, on one line
        raise PolicyError(one_line(f"calibration: the fp32 model fails on the batches: {type(exc).__name__}: "
                                   f"{exc}; {_CALIBRATION_FIX}")) from None


def _input_ranges(model: nn.Module, names: list[str], calibration: CalibrationData,
                  recipes: Mapping[str, str] | None = None) -> Calibration:
    if not names:
        return Calibration()
    if calibration is None:
        raise PolicyError(f"layer {names[0]!r} takes static int8 ({len(names)} such layers), which needs "
                          "calibration batches; pass calibration=<batches> (the model.py's calibration_inputs(), "
                          "else eval_inputs(), else [example_inputs()], as the search used)")
    if not isinstance(calibration, Calibration):
        calibration = _calibrate_checked(model, names, calibration, recipes)
    missing = [name for name in names if name not in calibration.inputs]
    if missing:
        raise UnsupportedFormat(f"layer {missing[0]!r}: static int8 needs its input range, but the layer never ran "
                                "on the calibration batches; give it a float format or calibrate on batches that reach it")
    return calibration


def apply_formats(model: nn.Module, layers: Mapping[str, str], default: str = "fp32",
                  device: str | torch.device = "cpu", calibration: CalibrationData = None, *,
                  runtime: str = "eager", recipes: Mapping[str, str] | None = None) -> nn.Module:
    """Give each listed layer its format and everything else `default`, on `device`, in place.

    `calibration`: for static int8 layers, the batches to observe their input ranges on (run
    through the fp32 model before anything is converted), or a `Calibration` already made from them.
    `recipes`: with batches, the calibration recipe of each static int8 layer (see calibration.py); a
    layer not named takes the one closest to fp32 on its inputs.
    `runtime` ("eager" or "compiled": how the model will be run) picks the kernel of formats that
    have a faster one under torch.compile (int8 Linear on a VNNI CPU); nothing is compiled here.
    Nothing is changed when any entry is refused: all entries are checked first.
    """
    device = torch.device(device)
    if default not in FLOAT_DTYPES:
        raise PolicyError(f"default format {default!r} must be one of {', '.join(FLOAT_DTYPES)}")
    for name, fmt in layers.items():
        check_layer_format(model, name, fmt, device, runtime)

    default_dtype = FLOAT_DTYPES[default]
    model.to(device)
    # Converted from the fp32 originals before the default cast, so e.g. an fp32 layer in a
    # bf16 model never passes through bf16.
    overrides = {name: fmt for name, fmt in layers.items() if fmt != default}
    static = needs_calibration(model, overrides)
    ranges = _input_ranges(model, static, calibration, recipes)
    folds = foldable_batchnorms(model, static)
    converted: dict[str, tuple[nn.Module, torch.dtype]] = {}
    for name, fmt in overrides.items():
        handler = HANDLERS[fmt]
        original = model.get_submodule(name)
        if name in folds:
            original = folded_conv(original, model.get_submodule(folds[name]))
        module = convert_layer(handler, original, device, runtime, ranges.inputs.get(name))
        # a handler whose module takes and returns the model's default dtype too (`native_io`) needs no casts
        native = default_dtype in getattr(handler, "native_io", ())
        converted[name] = (module, default_dtype if native else handler.io_dtype(device))
    for norm in folds.values():
        _set_submodule(model, norm, nn.Identity())

    skip = set(converted)
    for name, module in model.named_modules():
        if name in skip or any(name.startswith(s + ".") for s in skip):
            continue
        cast_own_tensors(module, default_dtype, untie=False)

    for name, (module, io_dtype) in converted.items():
        _set_submodule(model, name, module)
        if io_dtype != default_dtype:
            add_boundary_casts(module, io_dtype, default_dtype)
    if default_dtype != torch.float32:
        add_boundary_casts(model, default_dtype, None)
    return model.eval()


def _tensor_storages(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a (possibly subclassed, e.g. torchao) tensor's data."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [s for n in names for s in _tensor_storages(getattr(t, n))]
    if t.is_quantized:
        parts = [t.int_repr()]
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            parts += [t.q_per_channel_scales(), t.q_per_channel_zero_points()]
        return parts
    return [t]


def shared_storage_bytes(model: nn.Module, name: str) -> int:
    """Bytes of the layer `name`'s own parameters that a module outside it holds too (a tied weight: an LM
    head and its input embedding). A format that converts the layer gives it its own copy, and the
    partner keeps the original: those bytes stay in the model."""
    layer = model.get_submodule(name)
    inside = {id(m) for m in layer.modules()}
    own = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in layer.parameters()}
    shared: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        for p in module.parameters(recurse=False):
            if p.untyped_storage().data_ptr() in own:
                shared.add(p.untyped_storage().data_ptr())
    return sum(own[ptr] for ptr in shared)


def module_storage_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as applied, packed int8 weights at their real size.

    Shared (tied) tensors count once.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    # a static int8 convolution's oneDNN-packed weight is an opaque copy of its int8 weight buffer,
    # counted by that buffer
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            tensors += [weight] + ([bias] if bias is not None else [])
    # Keep every part alive while counting: int_repr() copies are temporaries, and a freed
    # temporary's address can be reused by the next one.
    parts = [part for tensor in tensors for part in _tensor_storages(tensor)]
    for part in parts:
        if part.is_quantized or part.numel() == 0:
            continue
        storage = part.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
