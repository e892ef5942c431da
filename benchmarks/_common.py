"""Shared helpers for the benchmarks: machine header, MiniLM loading, interleaved timing, fidelity.

Every benchmark measures its variants side by side in one process, interleaved round by round, so
a slowdown of this shared machine (other processes, tests) during a round hits every variant of
that round and cancels in the per-round ratios that the tables report.
"""

from __future__ import annotations

import datetime
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MINILM = REPO / "studies" / "minilm" / "model.py"

Forward = Callable[[], object]


def quiet() -> None:
    """Silence the deprecation chatter of torch.ao.quantization and torchao."""
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("torch").setLevel(logging.ERROR)
    logging.getLogger("torchao").setLevel(logging.ERROR)


def cpu_model() -> str:
    from autoprec.measure.machine import cpu_name

    return cpu_name()


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"]
                return " ".join(f for f in wanted if f in flags) or "-"
    except OSError:
        pass
    return "?"


def gpu_name() -> str:
    if not torch.cuda.is_available():
        return "none"
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda})")


def machine_header(extra: dict[str, object] | None = None) -> str:
    """The lines printed above every table: what the numbers were measured on."""
    try:
        import torchao

        ao = torchao.__version__
    except Exception:
        ao = "not installed"
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    rows = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores; {cpu_flags()})",
        "torch": torch.__version__,
        "torchao": ao,
        "gpu": gpu_name(),
        "threads": torch.get_num_threads(),
        "quantized engine": torch.backends.quantized.engine,
        "load average at start (1/5/15 min)": load,
    }
    rows.update(extra or {})
    return "\n".join(f"- {k}: {v}" for k, v in rows.items())


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def set_threads(threads: int | None) -> int:
    from autoprec.measure.machine import default_threads

    torch.set_num_threads(threads or default_threads())
    return torch.get_num_threads()


def load_minilm():
    """The MiniLM spec, a fresh fp32 model in eval mode and its example batch."""
    from autoprec.model.model_file import load_spec

    spec = load_spec(MINILM)
    return spec, spec.new_model(), spec.example()


def searchable_names(model: nn.Module, linear_only: bool = False) -> list[str]:
    from autoprec.precision import searchable_layers

    return [layer.name for layer in searchable_layers(model) if not linear_only or layer.cls == "Linear"]


def time_calls(forward: Forward, calls: int) -> float:
    """Seconds for `calls` forwards; CUDA work is synchronised at both ends, or only the launches count."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        forward()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(forwards: dict[str, Forward], reference: str, rounds: int, min_round_s: float,
                warmup_calls: int = 2) -> dict[str, dict[str, float]]:
    """Time every variant against `reference` in adjacent pairs, many rounds.

    Each round visits every variant (starting point rotated each round) and times it back to back
    with the reference, the order of the two alternating (AB, BA, ...), so a pair's ratio sees the
    same machine load on both sides. Returns per variant: median per-call ms, median of its
    per-pair ratio to `reference` (time / reference time), max/min of those ratios, calls per side.
    """
    names = list(forwards)
    others = [n for n in names if n != reference]
    for name in names:
        for _ in range(warmup_calls):
            forwards[name]()
    calls = {}
    for name in names:
        probe = max(time_calls(forwards[name], 1), 1e-6)
        calls[name] = max(1, math.ceil(min_round_s / probe))
    per_call: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    flip = 0
    for r in range(rounds):
        k = r % len(others) if others else 0
        for name in others[k:] + others[:k]:
            def one(n: str) -> float:
                return 1000 * time_calls(forwards[n], calls[n]) / calls[n]

            if flip % 2 == 0:
                ref_ms, var_ms = one(reference), one(name)
            else:
                var_ms = one(name)
                ref_ms = one(reference)
            flip += 1
            per_call[reference].append(ref_ms)
            per_call[name].append(var_ms)
            ratios[name].append(var_ms / ref_ms)
    ratios[reference] = [1.0]
    return {name: {"ms": statistics.median(per_call[name]), "ratio": statistics.median(ratios[name]),
                   "spread": max(ratios[name]) / min(ratios[name]), "calls": calls[name],
                   "pairs": len(ratios[name])}
            for name in names}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def row_cosine(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Mean and min cosine similarity of the rows of `out` to the rows of `ref`."""
    a = out.double().reshape(out.shape[0], -1)
    b = ref.double().reshape(ref.shape[0], -1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    return float(cos.mean()), float(cos.min())


def serialized_bytes(model: nn.Module) -> int:
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def fmt_ms(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


class RoundRecorder:
    """Capture the raw round times of `autoprec.measure.timing.paired_latency` without changing it.

    Inside the `with`, autoprec.measure.timing.time_calls is wrapped to record each call's seconds;
    `pairs()` turns the calls of the last paired_latency into (candidate s, reference s) per round,
    following its order (two one-call probes, then even rounds candidate first, odd rounds reference
    first).
    """

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.cpu_calls: list[float] = []  # process CPU seconds of the same calls

    def __enter__(self) -> "RoundRecorder":
        import autoprec.measure.timing as T

        self._module, self._original = T, T.time_calls

        def recording(*args, **kwargs):
            cpu = time.process_time()
            seconds = self._original(*args, **kwargs)
            self.cpu_calls.append(time.process_time() - cpu)
            self.calls.append(seconds)
            return seconds

        T.time_calls = recording
        return self

    def __exit__(self, *exc) -> None:
        self._module.time_calls = self._original

    def clear(self) -> None:
        self.calls.clear()
        self.cpu_calls.clear()

    def pairs(self) -> list[tuple[float, float]]:
        return split_rounds(self.calls[2:])

    def cpu_pairs(self) -> list[tuple[float, float]]:
        return split_rounds(self.cpu_calls[2:])


def split_rounds(times: list[float]) -> list[tuple[float, float]]:
    pairs = []
    for r in range(len(times) // 2):
        a, b = times[2 * r], times[2 * r + 1]
        pairs.append((a, b) if r % 2 == 0 else (b, a))
    return pairs


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free ~95% confidence interval of the median (order statistics, binomial)."""
    v = sorted(values)
    n = len(v)
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1)  # 1-based ranks j = floor(n/2 - z sqrt(n)/2),
    hi = min(n - 1, math.ceil(1 + n / 2 + half) - 1)  # k = ceil(1 + n/2 + z sqrt(n)/2)
    return v[lo], v[hi]


def three_policies(model: nn.Module) -> dict:
    """fp32, all-bf16 and all-int8 over `model`'s searchable layers: the stability benchmarks' set."""
    from autoprec import Policy

    names = searchable_names(model)
    return {"fp32": Policy(), "all-bf16": Policy(default="bf16", layers={n: "bf16" for n in names}),
            "all-int8": Policy(layers={n: "int8" for n in names})}
