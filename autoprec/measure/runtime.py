"""How a candidate runs while it is scored and timed: `eager` forwards, or `compiled` ones.

`compiled` is `torch.compile` with inductor, as a user serves a model: on the CPU with freezing the
whole model as one graph, without freezing its repeated blocks one by one (PyTorch's regional compilation
recipe: identical blocks share one compiled graph, so a 6-layer encoder compiles one layer, not six;
frozen, each block would compile its own graph anyway), on CUDA in mode
"reduce-overhead" (CUDA graphs: an eager forward of a small batch is bound by kernel launches, which
a graph replay removes), regionally too where the model has repeated blocks. On the CPU with inductor's freezing (`FREEZE_ON_CPU`,
PyTorch's setting for CPU inference): weights become constants of the compiled graph, folded and
prepacked for oneDNN once, and inductor's x86 int8 passes (`_x86_int8_passes`) keep int8 between
neighbouring int8 layers (benchmarks/cpu_kernels.py: all-bf16 MiniLM 0.51x fp32 eager against 0.54x
compiled without freezing, ResNet-18 0.38x against 0.53x). Freezing is scoped: every call of
the prepared model runs under `torch._inductor.config.patch(freezing=True)`, since dynamo reads the
setting when it traces (a frozen graph guards on its weights' identity: each block gets its own
graph, where without freezing identical blocks share one) and inductor when it compiles, and a
recompile may come at any call.

`prepare(model, runtime, device, example)` compiles (on the first call, which it makes) and returns
a `Prepared`: the model to score, the forward to time and what compiling cost. Inductor's on-disk
caches (FX graph cache, autotuning results, kernels) go where `use_cache_dir` points them, so a
layer/format assignment seen once, in this search or an earlier one, compiles from the cache.

A graph break is timed, not refused: the user who compiles the policy gets the same break, and the
time of the broken graph is what they get (torch's dynamic int8 Linear breaks the graph at each
layer and is still 2x faster than compiled fp32 on an AVX-512 CPU). A candidate is refused
(`CompileFailed`) when compiling raises, or when torch.compile would give up and run eager code
that it was asked to compile (its recompile limit reached): timing it would label eager time as
compiled.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from autoprec.errors import AutoprecError
from autoprec.policy import RUNTIMES

CUDA_MODE = "reduce-overhead"  # CUDA graphs; benchmarks/runtime_ratios.py --device cuda compares modes
RECOMPILE_LIMIT = 64  # distinct compiled variants per code object: blocks x formats x batch shapes
FREEZE_ON_CPU = True  # inductor's freezing in the compiled CPU runtime (see the module's docstring)

Forward = Callable[[], Any]


class CompileFailed(AutoprecError):
    """torch.compile could not compile a candidate so that its timing means compiled time."""


def check_runtime(name: str) -> str:
    if name not in RUNTIMES:
        raise AutoprecError(f"--runtime {name!r}: use one of {', '.join(RUNTIMES)}")
    return name


def use_cache_dir(path: str | os.PathLike[str]) -> Path:
    """Keep inductor's on-disk caches in `path` (created if missing).

    Inductor reads TORCHINDUCTOR_CACHE_DIR each time it needs its cache folder, but memoises some
    paths under it; those are cleared, so the folder may change after inductor was first used."""
    folder = Path(path).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    if "torch._inductor.utils" in sys.modules:
        from torch._inductor.utils import clear_caches

        clear_caches()
    return folder


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks: the children of a ModuleList or Sequential that holds
    two or more modules of one class with children of their own (a transformer's layers, a ResNet
    stage's blocks). Blocks inside a block already found are not listed again."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        if any(name == f or name.startswith(f + ".") for f in found):
            continue
        children = list(module.named_children())
        classes = {type(child) for _, child in children}
        if len(children) >= 2 and len(classes) == 1 and any(True for _ in children[0][1].children()):
            found += [f"{name}.{child}" if name else child for child, _ in children]
    return found


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for k in sorted(value) for leaf in _leaves(value[k])]
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _slice(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, dict):
        return {k: _slice(v, start, stop) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, start, stop) for v in value)
    return value


def rebatch_like(batches: list[Any], example: Any) -> list[Any]:
    """`batches` cut into batches of the example's shape where they are whole multiples of it (same
    structure, same non-batch dimensions), the others as they are: a compiled model then scores
    with the graph it is timed with, instead of compiling one more per eval batch shape."""
    shapes = [tuple(t.shape) for t in _leaves(example) if isinstance(t, torch.Tensor)]
    if not shapes or any(len(s) == 0 for s in shapes):
        return list(batches)
    size = shapes[0][0]
    out = []
    for batch in batches:
        leaves = [t for t in _leaves(batch) if isinstance(t, torch.Tensor)]
        ours = [tuple(t.shape) for t in leaves]
        n = ours[0][0] if ours and ours[0] else 0
        fits = (len(ours) == len(shapes) and n > 0 and size > 0 and n % size == 0
                and all(o[0] == n and o[1:] == s[1:] for o, s in zip(ours, shapes)))
        out += [_slice(batch, i, i + size) for i in range(0, n, size)] if fits and n != size else [batch]
    return out


def _clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_clone_tensors(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_tensors(v) for v in value)
    if isinstance(value, dict):
        cloned = {k: _clone_tensors(v) for k, v in value.items()}
        try:
            return type(value)(**cloned) if type(value) is not dict else cloned  # e.g. transformers ModelOutput
        except TypeError:
            return cloned
    return value


def freezing() -> contextlib.AbstractContextManager[Any]:
    """Inductor's freezing for what runs inside, the process's setting unchanged outside."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def _x86_int8_passes() -> None:
    """Register inductor's x86 int8 fusions for frozen graphs: an int8 Linear or convolution takes the
    pointwise op after it (ReLU, GELU) and the next int8 layer's quantize into its kernel (uint8 out),
    so no dequantize / quantize pair runs between neighbours; torchao's dynamic int8 Linear becomes
    oneDNN's int8 kernel. They moved from torch to torchao, whose quantizer module registers them on
    import; they match only quantized ops."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError:  # older torchao: the passes were still inductor's own
        pass


class FrozenModel(nn.Module):
    """A model compiled with freezing: each call (a recompile may come at any) runs under `freezing()`."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled
        self.writes_inputs: bool | None = None  # known after the first call

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Inductor's x86 pass fuses an int8 Linear with a residual add into oneDNN's in-place "sum", which
        # it may do into a graph input (torch 2.14: a block whose residual is the model's own input): the
        # caller's tensor is overwritten. The first call checks for that and puts the input back; from
        # then on such a model is called with copies, so a search scoring one batch again scores it right.
        if self.writes_inputs:
            args, kwargs = _clone_tensors((args, kwargs))
        with freezing():
            if self.writes_inputs is not None:
                return self.compiled(*args, **kwargs)
            before = _clone_tensors((args, kwargs))
            out = self.compiled(*args, **kwargs)
        pairs = list(zip(pytree.tree_leaves((args, kwargs)), pytree.tree_leaves(before)))
        changed = [(now, then) for now, then in pairs if isinstance(now, torch.Tensor) and not torch.equal(now, then)]
        with torch.inference_mode(any(now.is_inference() for now, _ in changed)), torch.no_grad():
            for now, then in changed:
                now.copy_(then)
        self.writes_inputs = bool(changed)
        return out


class CudaGraphModel(nn.Module):
    """A model compiled with CUDA graphs, safe to score: each call starts a new graph step and
    returns copies, since the next replay overwrites the graph's own output buffers."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return _clone_tensors(self.compiled(*args, **kwargs))


@dataclass
class Prepared:
    model: nn.Module  # call this to score: outputs are the caller's to keep
    runtime: str
    compile_s: float = 0.0  # first call minus a warm call
    graph_breaks: int = 0
    break_reasons: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)  # compiled submodules; [""] is the whole model
    _timed: Callable[..., Any] | None = None

    @property
    def timed(self) -> Callable[..., Any]:
        """The model function to time: outputs are not copied (on CUDA, the next replay overwrites them)."""
        return self._timed if self._timed is not None else self.model

    def forward(self, call: Callable[[Callable[..., Any]], Any]) -> Forward:
        """A zero-argument forward for timing: `call(fn)` runs the model function on the example
        (e.g. userspec.call_model(fn, example)). Outputs are not copied."""
        fn = self.timed
        return lambda: call(fn)


def _raise_at_recompile_limit() -> None:
    """Allow RECOMPILE_LIMIT variants per code object, and raise past it instead of running eager.
    (The names changed across torch versions: cache_size_limit / fail_on_cache_limit_hit before 2.6.)"""
    import torch._dynamo

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    for flag in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, flag):
            setattr(config, flag, True)
            break


def _graph_breaks() -> dict[str, int]:
    """Graph breaks so far in this process, by reason (dynamo's counters)."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def _with_graph_step(compiled: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are done with
        return compiled(*args, **kwargs)
    return forward


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip() and not line.startswith("Traceback"):
            return line.strip()[:300]
    return ""


def prepare(model: nn.Module, runtime: str, device: torch.device, call: Callable[[Callable[..., Any]], Any],
            *, regional: bool | None = None, mode: str | None = None, freeze: bool | None = None) -> Prepared:
    """`model` ready to run in `runtime`; `call(fn)` runs fn on the example batch (the first call,
    which compiles, and a warm one, to separate compile time from run time).

    regional: compile the repeated blocks one by one (None: wherever the model has them, on CUDA with
    a CUDA graph per block, so a large model compiles one block per distinct format assignment). mode: torch.compile's mode (None: CUDA_MODE
    on CUDA, inductor's default on the CPU). freeze: inductor's freezing (None: FREEZE_ON_CPU on the CPU,
    never on CUDA)."""
    check_runtime(runtime)
    if runtime == "eager":
        return Prepared(model, runtime)
    _raise_at_recompile_limit()
    if mode is None and device.type == "cuda":
        mode = CUDA_MODE
    if freeze is None:
        freeze = FREEZE_ON_CPU and device.type == "cpu"
    if freeze and device.type == "cpu":
        _x86_int8_passes()
    cuda_graphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    if regional is None:  # CUDA too: each block a CUDA graph; a study compiles each block assignment once
        # frozen, each block compiles its own graph anyway (its weights are constants), so regions share no
        # work; one graph fuses across blocks and compiles the rest of the model too (cpu_kernels.py --goal:
        # ResNet-18 all-int8 0.21x fp32 eager as one graph against 0.30x regional, MiniLM all-bf16 0.20x against 0.22x)
        regional = not (freeze and device.type == "cpu")
    regions = repeated_blocks(model) if regional else []
    # A frozen graph's backend carries the setting: dynamo keeps a compiled graph for any later caller whose
    # backend compares equal, so without it a graph compiled unfrozen would serve a frozen model of the same
    # blocks in one process (and the other way round).
    options: dict[str, Any] = {"mode": mode}
    if freeze:
        from torch._inductor import list_mode_options

        options = {"options": {**(list_mode_options(mode) if mode else {}), "freezing": True}}
    if regions:
        for name in regions:
            model.get_submodule(name).compile(dynamic=False, **options)
        compiled: nn.Module = model
    else:
        regions = [""]
        compiled = torch.compile(model, dynamic=False, **options)
    breaks_before = _graph_breaks()
    if freeze:
        compiled = FrozenModel(compiled)
    timed = _with_graph_step(compiled) if cuda_graphs else compiled
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # torchao's int8 tensors announce, once per compile, that AOT autograd's cache skips them;
            # inductor's FX graph cache still serves them (a second compile of one assignment: 1 s, not 20)
            warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
            start = time.perf_counter()
            call(timed)
            _sync(device)
            first = time.perf_counter() - start
            start = time.perf_counter()
            call(timed)
            _sync(device)
            warm = time.perf_counter() - start
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        cause = getattr(exc, "inner_exception", None) or exc  # BackendCompilerFailed wraps the backend's error
        raise CompileFailed(f"torch.compile failed: {type(cause).__name__}: {_first_line(cause)}") from exc
    reasons = {k: v - breaks_before.get(k, 0) for k, v in _graph_breaks().items() if v > breaks_before.get(k, 0)}
    scored = CudaGraphModel(compiled) if cuda_graphs else compiled
    return Prepared(scored, runtime, max(0.0, first - warm), sum(reasons.values()),
                    [r.strip().splitlines()[0][:200] for r in reasons if r.strip()], regions, timed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset() -> None:
    """Forget every compiled graph of this process (the on-disk caches stay): each candidate adds
    compiled variants of the model's blocks, and without a reset they pile up to the recompile limit."""
    import torch._dynamo

    torch._dynamo.reset()
