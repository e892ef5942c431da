"""The sensitivity profile: what each layer costs and damages in each format, one layer at a time.

For every searchable layer and every format it may take:
- `drop`: the fidelity drop (1 - mean per-sample cosine of the compared output to fp32) of the whole
  model on `example_inputs()` with only that layer changed. Damages add up almost exactly across
  layers (MiniLM-L6 on the CPU, int8: the 36 single-layer drops sum to 0.0568, all 36 layers in int8
  together drop 0.0600), so the cost model sums them, calibrated to the real score.
  By default the drop is linearized (one forward, a few backward passes, each layer run once per
  format: linear in depth; see `linearized_drops`); `method="exact"` runs one whole-model forward
  per layer and format instead (quadratic in depth).
- `latency_ms`: the layer alone on its real captured input, with the casts it needs at its
  boundaries, for each default dtype of the rest of the model. A layer timed alone is stable to a
  few percent where whole-model timing is not. In the compiled runtime the layer and its casts are
  compiled as the study compiles the model (autoprec.measure.runtime) and timed compiled; layers of one
  class, weight shape and input shape share one compile and one timing per format and default
  (MiniLM's 36 Linear layers are 3 such shapes).
- `memory_bytes`: the layer's storage in that format (exact), plus, for a format other than fp32, the
  fp32 weight a tied partner (an input embedding) keeps.
- `links` (compiled runtime on the CPU): pairs of layers between which int8 stays int8 when both take
  static int8 (autoprec.measure.int8_links), each with the time that saves: the activation and quantize
  pass between them, compiled and timed on the producer's captured output. The cost model subtracts it
  where a policy gives both layers static int8. A consumer calibrated with smoothing has none: its
  input is multiplied by the smoothing factors before the quantize, which inductor then cannot move
  into the producer's kernel.

The work is layers x formats single-layer runs and micro-timings: linear in the model's size.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from autoprec.measure import runtime as runtimes
from autoprec.measure.fidelity import sample_cosines
from autoprec.precision import FLOAT_DTYPES, HANDLERS, Calibration, module_storage_bytes
from autoprec.precision.apply import _cast_floats, shared_storage_bytes
from autoprec.precision.base import convert_layer
from autoprec.measure.calibration import spec_calibration
from autoprec.measure.int8_links import find_links, static_int8_format
from autoprec.measure.timing import solo_latency_ms
from autoprec.model.model_file import ModelSpec, call_model, first_float_tensor


@dataclass
class Profile:
    """layers[name][fmt] = {"drop", "latency_ms", "memory_bytes"}; latency_by_default[D][name][fmt] = ms."""

    layers: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    latency_by_default: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    reference_latency_ms: float | None = None
    # the fp32 model timed solo beside the layers (before and after them, mean): the layers' times are in
    # the machine's state of that moment, the trials' in the reference's (see time_scale)
    model_latency_ms: float | None = None
    method: str = "exact"
    seconds: dict[str, float] = field(default_factory=dict)
    runtime: str = "eager"  # the runtime the latencies were measured in (autoprec.measure.runtime)
    # {"producer", "consumer", "activation", "producer_format", "consumer_format", "saving_ms"} per link
    links: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Profile":
        return cls(**data)

    @property
    def time_scale(self) -> float:
        """Reference latency / the fp32 model's latency while the layers were timed: 1 on a steady machine.

        Trials are latency ratios times the reference latency, taken when the study was created; the
        layers are timed later, maybe on a busier or quieter machine (shared hosts move by 2x), so their
        times are put in the reference's terms before the cost model adds them to trial latencies."""
        if self.reference_latency_ms and self.model_latency_ms:
            return self.reference_latency_ms / self.model_latency_ms
        return 1.0


def _compared(spec: ModelSpec, outputs: Any) -> torch.Tensor:
    tensor = spec.compared_tensor(outputs) if spec.output is not None else first_float_tensor(outputs)
    if tensor is None:
        raise ValueError("the model returns no floating tensor to compare")
    return tensor.float()


def _fidelity_drop(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float(1 - sample_cosines(out, ref).mean())


def capture_layer_inputs(model: nn.Module, names: list[str], inputs: Any) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each named layer receives during one forward of `inputs`; on a GPU they are
    kept in host memory (`stash`), so the device holds one layer's inputs at a time, not every layer's."""
    captured: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name in names:
        def hook(_mod, args, kwargs, name=name):
            if name not in captured:
                captured[name] = (stash(args, copy=False), stash(kwargs, copy=False))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


def _converted(layer: nn.Module, fmt: str, device: torch.device, input_qparams: tuple[float, int] | None = None,
               runtime: str = "eager") -> tuple[nn.Module, torch.dtype]:
    handler = HANDLERS[fmt]
    return convert_layer(handler, copy.deepcopy(layer), device, runtime, input_qparams), handler.io_dtype(device)


class _CastLayer(nn.Module):
    """A converted layer with the casts its neighbours add: what it costs inside the model."""

    def __init__(self, layer: nn.Module, inside: torch.dtype, outside: torch.dtype) -> None:
        super().__init__()
        self.layer, self.inside, self.outside = layer, inside, outside

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.layer(*_cast_floats(args, self.inside), **_cast_floats(kwargs, self.inside))
        return _cast_floats(out, self.outside)


def _shape_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), str(value.dtype))
    if isinstance(value, (tuple, list)):
        return tuple(_shape_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _shape_key(v)) for k, v in value.items()))
    return repr(value)


def _layer_key(layer: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Layers with equal keys compute the same shapes with the same class: one compiled timing serves all."""
    params = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())
    return type(layer).__name__, params, _shape_key(args), _shape_key(kwargs)


def _run_converted(converted: nn.Module, io_dtype: torch.dtype, args: tuple, kwargs: dict, like: torch.Tensor) -> Any:
    return _cast_floats(converted(*_cast_floats(args, io_dtype), **_cast_floats(kwargs, io_dtype)), like.dtype)


def exact_drops(spec: ModelSpec, model: nn.Module, example: Any, names: list[str],
                choices: dict[str, tuple[str, ...]], device: torch.device,
                progress: Callable[[str], None] | None = None,
                ranges: dict[str, tuple[float, int]] | None = None,
                runtime: str = "eager") -> dict[str, dict[str, float]]:
    """One whole-model forward per (layer, format), a hook swapping in the converted layer's output.

    Exact, but each forward costs the whole model: quadratic in depth."""
    with torch.inference_mode():
        reference = _compared(spec, call_model(model, example))
    drops: dict[str, dict[str, float]] = {}
    for index, name in enumerate(names):
        layer = model.get_submodule(name)
        drops[name] = {}
        for fmt in choices[name]:
            if fmt == "fp32":
                drops[name][fmt] = 0.0
                continue
            converted, io_dtype = _converted(layer, fmt, device, (ranges or {}).get(name), runtime)

            def swap(_mod, args, kwargs, out, converted=converted, io_dtype=io_dtype):
                return _run_converted(converted, io_dtype, args, kwargs, out)
            handle = layer.register_forward_hook(swap, with_kwargs=True)
            try:
                with torch.inference_mode():
                    drops[name][fmt] = _fidelity_drop(_compared(spec, call_model(model, example)), reference)
            finally:
                handle.remove()
        if progress:
            progress(f"drop {index + 1}/{len(names)}")
    return drops


def stash(value: Any, copy: bool = True) -> Any:
    """A layer's captured input, kept aside: tensors on a GPU copied to host memory (captured inputs of
    every layer would otherwise take about one forward's activations of device memory), tensors on the
    CPU detached copies (`copy`: the model may change them in place later) or the tensors themselves."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            return value.detach().to("cpu", copy=True)
        return value.detach().clone() if copy else value
    if isinstance(value, (tuple, list)):
        return type(value)(stash(v, copy) for v in value)
    if isinstance(value, dict):
        return {k: stash(v, copy) for k, v in value.items()}
    return value


def unstash(value: Any, device: torch.device) -> Any:
    """A stashed input back on `device`, for the one layer that runs on it now."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(unstash(v, device) for v in value)
    if isinstance(value, dict):
        return {k: unstash(v, device) for k, v in value.items()}
    return value


class _NotLinearizable(Exception):
    """The model's compared output has no gradient path to the layers: use exact drops."""


def linearized_drops(spec: ModelSpec, model: nn.Module, example: Any, names: list[str],
                     choices: dict[str, tuple[str, ...]], device: torch.device, probes: int = 8, seed: int = 0,
                     progress: Callable[[str], None] | None = None,
                     ranges: dict[str, tuple[float, int]] | None = None, runtime: str = "eager"
                     ) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Fidelity drops from one forward, `probes` backward passes and one run of each converted layer.

    For sample i with output y_i, a small change D_i of the output costs 1 - cos(y_i + D_i, y_i)
    ~= |P_i D_i|^2 / (2 |y_i|^2), P_i the projection orthogonal to y_i. Changing layer l alone
    changes its output by d_l (the converted layer on its captured fp32 input minus the fp32 output)
    and the model's output by D_i ~= J_li d_l. For a random r_i ~ N(0, I),
    E[(r_i . P_i J_li d_l)^2] = |P_i J_li d_l|^2, and J_li^T P_i r_i is the gradient, at layer l's
    output, of sum_i (P_i r_i / |y_i|) . y_i: one backward pass gives it for every layer at once.
    So the cost is one forward, `probes` backward passes and layers x formats runs of single layers:
    linear in the model's size, where exact drops are a whole forward per layer and format.
    The second-order terms it ignores are what the cost model's calibration on the uniform trials
    absorbs. Returns the drops and the layers it could not handle (called more than once, output
    not a floating tensor, run without gradients, or reached by none): the caller measures those
    exactly.
    """
    captured: dict[str, list] = {n: [] for n in names}
    handles = []
    for name in names:
        def hook(_mod, args, kwargs, out, name=name):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or not torch.is_grad_enabled():
                captured[name].append(None)
                return None
            if not out.requires_grad:  # nothing upstream needs a gradient: start the graph here
                out = out.detach().requires_grad_()
            # inputs copied (to host memory on a GPU): the model may change them in place after this layer ran
            captured[name].append((stash(args), stash(kwargs), out))
            return out
        handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.enable_grad():
            y = _compared(spec, call_model(model, example))
    finally:
        for h in handles:
            h.remove()
    usable = [n for n in names if len(captured[n]) == 1 and captured[n][0] is not None]
    skipped = [n for n in names if n not in usable]
    if not y.requires_grad:
        raise _NotLinearizable("the compared output does not depend on the searched layers")
    flat = y.reshape(y.shape[0], -1)
    if flat.shape[1] == 1:  # one number per sample: the batch is compared as one vector (sample_cosines)
        flat = flat.reshape(1, -1)
    samples = flat.shape[0]
    ref = flat.detach().double()
    norm = ref.norm(dim=1, keepdim=True).clamp_min(1e-30)
    unit = ref / norm
    outs = [captured[n][0][2] for n in usable]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    grads_per_probe: list[tuple] = []
    for k in range(probes):
        # drawn on the CPU so that a seed gives the same probes on every device
        r = torch.randn(ref.shape, generator=generator, dtype=torch.float64).to(ref.device)
        r = r - (r * unit).sum(1, keepdim=True) * unit
        weight = (r / norm).to(device=flat.device, dtype=flat.dtype)
        grads = torch.autograd.grad((flat * weight).sum(), outs, retain_graph=k < probes - 1, allow_unused=True)
        grads_per_probe.append(tuple(None if g is None else g.detach() for g in grads))
    del y, flat, outs
    for name in usable:  # the graph is no longer needed
        captured[name][0] = captured[name][0][:2] + (None,)
    # No gradient at all: the output does not use the layer, or the model cuts the graph (detach,
    # no_grad) after it. Only a whole-model forward tells which, so those layers are measured exactly.
    no_gradient = {n for i, n in enumerate(usable) if all(g[i] is None for g in grads_per_probe)}
    skipped += [n for n in usable if n in no_gradient]
    drops: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for index, name in enumerate(usable):
            if name in no_gradient:
                continue
            args, kwargs = (unstash(v, device) for v in captured[name][0][:2])
            layer = model.get_submodule(name)
            out = layer(*args, **kwargs)  # fp32, recomputed: the forward's own output may have changed in place
            per_sample = out.dim() > 0 and out.shape[0] == samples
            drops[name] = {}
            for fmt in choices[name]:
                if fmt == "fp32":
                    drops[name][fmt] = 0.0
                    continue
                converted, io_dtype = _converted(layer, fmt, device, (ranges or {}).get(name), runtime)
                delta = (_run_converted(converted, io_dtype, args, kwargs, out).float() - out.float())
                if not torch.isfinite(delta).all():
                    drops[name][fmt] = float("inf")
                    continue
                total = 0.0
                for grads in grads_per_probe:
                    g = grads[index]
                    if g is None:
                        continue
                    product = (g.float() * delta)
                    dots = product.reshape(samples, -1).sum(1) if per_sample else product.sum().reshape(1)
                    total += float(dots.double().pow(2).sum())
                drops[name][fmt] = total / (2 * samples * probes)
            captured[name] = []  # free the layer's captured input
            if progress:
                progress(f"drop {index + 1}/{len(usable)}")
    return drops, skipped


def build_profile(spec: ModelSpec, model: nn.Module, example: Any, choices: dict[str, tuple[str, ...]],
                  defaults: tuple[str, ...], device: torch.device,
                  progress: Callable[[str], None] | None = None, method: str = "linearized",
                  calibration: Calibration | None = None, runtime: str = "eager",
                  time_model: Callable[[], float] | None = None) -> Profile:
    """Profile every (layer, format) of `choices` on the fp32 `model` (left unchanged).

    method: "linearized" (default; linear in depth, see linearized_drops) or "exact".
    calibration: the static int8 input ranges; observed on the spec's calibration batches if None.
    runtime: the study's (autoprec.measure.runtime): the kernels the formats get, and how layers are timed.
    time_model: times the fp32 model solo (ms), called before and after the layers are timed: their
    mean is `model_latency_ms`, which ties the layers' times to the reference's (Profile.time_scale)."""
    if method not in ("linearized", "exact"):
        raise ValueError(f"profile method must be 'linearized' or 'exact', not {method!r}")
    profile = Profile(method=method, runtime=runtimes.check_runtime(runtime))
    names = list(choices)
    if calibration is None:
        calibration = spec_calibration(spec, model, device, {f for c in choices.values() for f in c}) or Calibration()
    ranges = calibration.inputs
    start = time.perf_counter()
    drops: dict[str, dict[str, float]] = {}
    rest = names
    if method == "linearized":
        try:
            drops, rest = linearized_drops(spec, model, example, names, choices, device, progress=progress,
                                           ranges=ranges, runtime=runtime)
        except (_NotLinearizable, RuntimeError) as exc:  # no gradient path, or out of memory
            profile.method = f"exact (linearized failed: {type(exc).__name__}: {str(exc)[:120]})"
            drops, rest = {}, names
    if rest and method == "linearized" and profile.method == "linearized":
        profile.method = f"linearized ({len(rest)} of {len(names)} layers exact)"
    if rest:
        drops.update(exact_drops(spec, model, example, rest, choices, device, progress=progress, ranges=ranges,
                                 runtime=runtime))
    for name in names:
        profile.layers[name] = {fmt: {"drop": drops[name][fmt]} for fmt in choices[name]}
    profile.seconds["drop"] = time.perf_counter() - start

    start = time.perf_counter()
    model_ms = [time_model()] if time_model else []
    compile_s = 0.0
    timed: dict[tuple, float] = {}  # compiled runtime: (layer key, format, default) -> ms
    captured = capture_layer_inputs(model, names, example)
    for index, name in enumerate(names):
        layer = model.get_submodule(name)
        args, kwargs = (unstash(v, device) for v in captured.pop(name))
        key = _layer_key(layer, args, kwargs)
        shared = shared_storage_bytes(model, name)
        for fmt in choices[name]:
            converted, io_dtype = _converted(layer, fmt, device, ranges.get(name), runtime)
            # a tied weight's partner keeps the fp32 original when this layer takes another format
            profile.layers[name][fmt]["memory_bytes"] = module_storage_bytes(converted) + (shared if fmt != "fp32" else 0)
            for default in defaults:
                outside = FLOAT_DTYPES[default]
                inside = outside if fmt == default else io_dtype  # cast only where the dtype changes
                a, k = _cast_floats(args, outside), _cast_floats(kwargs, outside)
                if runtime != "eager" and (key, fmt, default) in timed:
                    ms = timed[key, fmt, default]
                else:
                    prepared = runtimes.Prepared(_CastLayer(converted, inside, outside), "eager")
                    if runtime != "eager":
                        runtimes.reset()  # the last layer's graphs are done with: no pile-up to the recompile limit
                        try:
                            prepared = runtimes.prepare(prepared.model, runtime, device,
                                                        lambda fn, a=a, k=k: fn(*a, **k), regional=False)
                        except runtimes.CompileFailed:
                            pass  # timed eager; a candidate with this format fails with the reason
                        compile_s += prepared.compile_s
                    with torch.inference_mode():
                        ms, _ = solo_latency_ms(prepared.forward(lambda fn, a=a, k=k: fn(*a, **k)), device,
                                                rounds=5, min_round_s=0.01, warmup_calls=1)
                    timed[key, fmt, default] = ms
                profile.latency_by_default.setdefault(default, {}).setdefault(name, {})[fmt] = ms
            profile.layers[name][fmt]["latency_ms"] = profile.latency_by_default[defaults[0]][name][fmt]
        if progress:
            progress(f"latency {index + 1}/{len(names)}")
    if runtime == "compiled" and device.type == "cpu":
        profile.links, link_compile_s = _timed_links(model, example, choices, ranges, device, runtime)
        compile_s += link_compile_s
    if time_model:
        model_ms.append(time_model())
        profile.model_latency_ms = sum(model_ms) / len(model_ms)
    profile.seconds["latency"] = time.perf_counter() - start
    if runtime != "eager":
        profile.seconds["compile"] = compile_s
        runtimes.reset()
    return profile


class _Unfused(nn.Module):
    """What runs between two static int8 layers when int8 does not pass between them: the activation and
    the consumer's quantize, as their own pass over the producer's float output."""

    def __init__(self, activation: str | None, qparams: tuple[float, int]) -> None:
        super().__init__()
        self.activation, self.scale, self.zero_point = activation, float(qparams[0]), int(qparams[1])

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            y = getattr(torch.nn.functional, self.activation)(y)
        return torch.ops.quantized_decomposed.quantize_per_tensor.default(
            y.float(), self.scale, self.zero_point, 0, 255, torch.uint8)


def _timed_links(model: nn.Module, example: Any, choices: dict[str, tuple[str, ...]], ranges: dict[str, Any],
                 device: torch.device, runtime: str) -> tuple[list[dict[str, Any]], float]:
    """Profile.links for `model`, and the seconds spent compiling."""
    links = find_links(model, example, choices)
    if not links:
        return [], 0.0
    outputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _mod, _args, out, name=name: outputs.setdefault(name, out.detach().clone()))
        for name in {link.producer for link in links}]
    try:
        with torch.inference_mode():
            call_model(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    out, timed, compile_s = [], {}, 0.0
    for link in links:
        y = outputs.get(link.producer)
        quant = ranges.get(link.consumer)
        if not isinstance(y, torch.Tensor) or getattr(quant, "smoothing", None) is not None:
            continue  # a smoothed consumer multiplies its input first: inductor fuses no quantize into the producer
        key = (tuple(y.shape), y.stride(), link.activation)
        if key not in timed:
            qparams = tuple(quant or (0.05, 128))[:2]
            runtimes.reset()
            prepared = runtimes.Prepared(_Unfused(link.activation, qparams), "eager")
            try:
                prepared = runtimes.prepare(prepared.model, runtime, device, lambda fn, y=y: fn(y), regional=False)
            except runtimes.CompileFailed:
                continue
            compile_s += prepared.compile_s
            with torch.inference_mode():
                timed[key], _ = solo_latency_ms(prepared.forward(lambda fn, y=y: fn(y)), device,
                                                rounds=5, min_round_s=0.01, warmup_calls=1)
        formats = (choices[link.producer], choices[link.consumer])
        out.append({"producer": link.producer, "consumer": link.consumer, "activation": link.activation,
                    "producer_format": static_int8_format(model.get_submodule(link.producer), formats[0]),
                    "consumer_format": static_int8_format(model.get_submodule(link.consumer), formats[1]),
                    "saving_ms": timed[key]})
    return out, compile_s  # the caller resets the compiled graphs once the profile is done
