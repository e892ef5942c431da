"""Which formats have fast kernels on this device: a short micro-benchmark, and the pruning it allows.

A format without native kernels can be many times slower than fp32 (bf16 on an AVX2-only CPU: 5-7x) and then wins no latency anywhere: timing it layer by layer and in
per-layer proposals only costs minutes. The probe times one Linear and one convolution of
representative size in each format against fp32 (paired, in the study's thread count), in about a
second per format. Its result is keyed by the machine (CPU or GPU name, ISA flags and the
environment variables that restrict them, threads, torch) so a store can keep it per machine.

`prune` then keeps a format that is far slower than fp32 out of the per-layer choices and the
default dtypes the proposals use; the search still measures its uniform policy, which holds the
memory end of the front. Pruning is the search's choice, never the space's: `--space` decides what
may be searched at all.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from autoprec.measure import runtime as runtimes
from autoprec.measure.machine import cpu_name
from autoprec.store.schema import machine_key
from autoprec.precision import HANDLERS
from autoprec.precision.base import convert_layer
from autoprec.precision.calibration import calibrate
from autoprec.precision.apply import _cast_floats
from autoprec.measure.timing import TimingSettings, paired_latency

PRUNE_RATIO = 2.0  # a format this many times slower than fp32 on the probe wins no latency
KINDS = ("linear", "conv")  # the kernel families a searchable layer uses
_CONV_CLASSES = ("Conv1d", "Conv2d", "Conv3d")
# ISA features that decide which kernels a CPU has for bf16, fp16 and int8
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
              "amx_fp16", "asimd", "sve", "bf16", "i8mm")
_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
_SETTINGS = TimingSettings(rounds=5, min_round_s=0.02, warmup_calls=2, max_rounds=9, target_ci=1.05)


def layer_kind(cls: str) -> str:
    """The probe kernel family of a searchable layer class."""
    return "conv" if cls in _CONV_CLASSES else "linear"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [f for f in _CPU_FLAGS if f in present]
    except OSError:
        pass
    return []


def machine(device: torch.device, runtime: str = "eager") -> dict[str, str]:
    """What a probe result depends on: the same dict means the same kernels at the same speeds (the
    runtime named where it is not eager, so eager probes keep the keys they were stored under)."""
    info = {"device_type": device.type, "torch": torch.__version__, "threads": str(torch.get_num_threads())}
    if runtime != "eager":
        info["runtime"] = runtime
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
    else:
        info["device_name"] = cpu_name()
        info["machine"] = platform.machine()
        info["cpu_flags"] = " ".join(_cpu_flags())
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info.update({name: os.environ[name] for name in _ISA_ENV if name in os.environ})
    return info


def machine_kind(device: torch.device) -> dict[str, str]:
    """The kind of machine a study is timed on: `machine` without the thread count, which a study
    fixes and checks on its own. Two machines of one kind run the same kernels at the same speeds
    (same CPU model, ISA flags and ISA-restricting variables, or same GPU and compute capability;
    same torch), so their latency ratios to fp32 belong in one front."""
    kind = machine(device)
    kind.pop("threads", None)
    return kind


@dataclass
class FormatProbe:
    """ratios[fmt][kind]: median time of the format's kernel / fp32's (absent: the format cannot run it)."""

    machine: dict[str, str]
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return machine_key(self.machine)

    def ratio(self, fmt: str, kind: str) -> float | None:
        return 1.0 if fmt == "fp32" else self.ratios.get(fmt, {}).get(kind)

    def order(self, formats: Iterable[str]) -> list[str]:
        """`formats` fastest first (by their best kernel), unprobed ones last, ties in the given order."""
        def speed(fmt: str) -> float:
            known = [r for r in (self.ratio(fmt, k) for k in KINDS) if r is not None]
            return min(known) if known else float("inf")
        return sorted(formats, key=speed)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FormatProbe":
        return cls(machine=dict(data["machine"]), ratios={f: dict(r) for f, r in data["ratios"].items()},
                   seconds=float(data.get("seconds", 0.0)))


def _kernels(device: torch.device) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """A MiniLM-size feed-forward Linear and a ResNet-size 3x3 convolution, each a few ms on one core."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(384, 1536)
    conv = nn.Conv2d(32, 64, 3, padding=1)
    for module in (linear, conv):
        for p in module.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.05
    return {"linear": (linear.to(device).eval(), torch.randn(256, 384, generator=generator).to(device)),
            "conv": (conv.to(device).eval(), torch.randn(4, 32, 28, 28, generator=generator).to(device))}


def _in_runtime(module: nn.Module, x: torch.Tensor, runtime: str, device: torch.device) -> Callable[..., Any]:
    """`module` as the study's runtime runs it: compiled (alone, as the profile compiles one layer) or eager."""
    if runtime == "eager":
        return module
    runtimes.reset()  # the last kernel's graphs are done with
    return runtimes.prepare(module, runtime, device, lambda fn: fn(x), regional=False).timed


def run_probe(formats: Iterable[str], device: torch.device, settings: TimingSettings = _SETTINGS,
              runtime: str = "eager") -> FormatProbe:
    """Time each format's Linear and convolution against fp32's, paired (a second or so per format),
    in the study's runtime: compiled kernels for a compiled study, as its candidates will run.

    Timing stops as soon as the ratio is placed against 1 and PRUNE_RATIO (see paired_latency)."""
    import copy

    started = time.perf_counter()
    probe = FormatProbe(machine(device, runtime))
    kernels = _kernels(device)
    reference = {kind: _in_runtime(copy.deepcopy(m), x, runtime, device) for kind, (m, x) in kernels.items()}
    with torch.inference_mode():
        for fmt in formats:
            if fmt == "fp32" or fmt not in HANDLERS:
                continue
            handler = HANDLERS[fmt]
            probe.ratios[fmt] = {}  # probed, even where it has no kernel of either kind
            for kind, (module, x) in kernels.items():
                if handler.unsupported_reason(module, device) is not None:
                    continue
                try:
                    qparams = None
                    if handler.needs_calibration(module):  # static int8: its input range, from the probe's input
                        qparams = calibrate(nn.Sequential(module), ["0"], [x], {"0": "histogram"}).inputs["0"]
                    inside = _cast_floats(x, handler.io_dtype(device))
                    converted = _in_runtime(convert_layer(handler, copy.deepcopy(module), device, input_qparams=qparams),
                                            inside, runtime, device)
                    fp32 = reference[kind]
                    if runtime != "eager":
                        fp32(x)  # compiled again from the cache after the reset, before it is timed
                    timing = paired_latency(lambda: converted(inside), lambda: fp32(x), device, settings,
                                            neighbours=(1.0, PRUNE_RATIO))
                except (RuntimeError, NotImplementedError, runtimes.CompileFailed):  # no kernel at all: as slow as it gets
                    probe.ratios.setdefault(fmt, {})[kind] = float("inf")
                    continue
                probe.ratios.setdefault(fmt, {})[kind] = timing.ratio
    if runtime != "eager":
        runtimes.reset()
    probe.seconds = time.perf_counter() - started
    return probe


def cached_probe(cache: Mapping[str, Any], formats: Iterable[str], device: torch.device,
                 runtime: str = "eager") -> tuple[FormatProbe, bool]:
    """The probe stored in `cache` (machine key -> FormatProbe JSON) for this machine and runtime, if it
    covers `formats`; else a new one. Returns (probe, whether it came from the cache)."""
    wanted = [f for f in formats if f != "fp32" and f in HANDLERS]
    info = machine(device, runtime)
    stored = cache.get(machine_key(info))
    if isinstance(stored, Mapping):
        probe = FormatProbe.from_json(stored)
        if probe.machine == info and all(f in probe.ratios for f in wanted):
            return probe, True
    return run_probe(wanted, device, runtime=runtime), False


@dataclass
class Pruning:
    choices: dict[str, tuple[str, ...]]  # per layer, what the sampler and the proposals may use
    defaults: tuple[str, ...]  # default dtypes the proposals may use
    pruned: dict[str, dict[str, float]]  # fmt -> kind -> probe ratio, for what was taken out
    announcement: str | None  # one line for the user; None when nothing was pruned


def prune(choices: Mapping[str, tuple[str, ...]], kinds: Mapping[str, str], defaults: Iterable[str],
          probe: FormatProbe, limit: float = PRUNE_RATIO) -> Pruning:
    """Take formats slower than `limit` x fp32 on the probe out of the per-layer choices (per kernel
    kind: a format slow for convolutions stays for Linear layers if it is fast there) and out of the
    default dtypes (slow on any kind the model's layers use is out: the rest of the model runs those
    kernels too, and more). fp32 and
    a layer's last remaining format are never taken out."""
    def slow(fmt: str, kind: str) -> bool:
        ratio = probe.ratio(fmt, kind)
        return fmt != "fp32" and ratio is not None and ratio > limit

    pruned: dict[str, dict[str, float]] = {}
    kept: dict[str, tuple[str, ...]] = {}
    for name, options in choices.items():
        kind = kinds.get(name, "linear")
        fast = tuple(f for f in options if not slow(f, kind)) or tuple(options)
        for fmt in set(options) - set(fast):
            pruned.setdefault(fmt, {})[kind] = probe.ratio(fmt, kind)
        kept[name] = fast
    defaults = tuple(defaults)
    present = sorted(set(kinds.values())) or KINDS  # the rest of the model: judged on the kernels it uses
    kept_defaults = tuple(d for d in defaults if not any(slow(d, k) for k in present)) or defaults
    for fmt in set(defaults) - set(kept_defaults):
        pruned.setdefault(fmt, {}).update({k: probe.ratio(fmt, k) for k in present if slow(fmt, k)})
    return Pruning(kept, kept_defaults, pruned, _announcement(pruned, probe) if pruned else None)


def _announcement(pruned: Mapping[str, Mapping[str, float]], probe: FormatProbe) -> str:
    where = probe.machine.get("device_name", probe.machine.get("device_type", "this device"))
    threads = probe.machine.get("threads", "?")
    conditions = [c for c in (probe.machine.get("ONEDNN_MAX_CPU_ISA") or probe.machine.get("cpu_capability"),
                              f"{threads} thread{'' if threads == '1' else 's'}") if c]
    parts = [f"{fmt} ({', '.join(f'{ratio:.1f}x fp32 on {kind}' for kind, ratio in sorted(pruned[fmt].items()))})"
             for fmt in sorted(pruned)]
    return (f"pruned {' and '.join(parts)}, slow on {where} ({', '.join(conditions)}): left out of per-layer "
            "proposals and sampling, uniform policies still measured for memory; --no-prune searches everything")
