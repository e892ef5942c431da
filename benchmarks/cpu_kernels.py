"""Which Linear kernel is fastest on this CPU, eager and compiled with inductor's freezing? And what
does freezing give whole studies?

Part 1, kernels: one Linear layer on MiniLM's shapes (16 x 128 = 2048 tokens; 384 -> 1536, 1536 -> 384,
384 -> 384), seeded weights, inputs like the layer's (LayerNorm-like for 384 inputs, GELU outputs for
1536), one thread. Variants:

- fp32, bf16 (bf16 in and out: in a bf16 model there is no cast at the layer)
- int8 dyn: torch's dynamic int8, per-channel weights (autoprec's `int8` in the eager runtime)
- int8 torchao: torchao's int8 dynamic-activation config (autoprec's `int8` compiled, on a VNNI CPU)
- int8_static: autoprec's static int8 Linear (`precision/static_int8_linear.py`): uint8 input with a calibrated
  scale (autoprec's observer), per-channel int8 weight, `onednn.qlinear_pointwise`, fp32 out
- ao static (x86 / onednn engine): torch.ao's quantized Linear (quantize, `quantized.linear` on
  quantized tensors with a calibrated output scale, dequantize)
- q/dq linear: the layer written as `quantized_decomposed` quantize / dequantize + F.linear on the
  dequantized int8 weight, which inductor's x86 int8 passes (torchao's, registered by importing
  `torchao.quantization.pt2e.quantizer.x86_inductor_quantizer`) turn into `onednn.qlinear_pointwise`
  under compile with freezing

Columns: eager; `torch.compile` (inductor defaults); `torch.compile` with freezing (compiled and called
under `torch._inductor.config.patch(freezing=True)` and `torch.no_grad()`). Every variant of a shape is
timed in interleaved rounds against fp32 eager (benchmarks/_common.interleaved): medians in ms and the
median of the per-round ratios to fp32 eager. "rel err": ||out - fp32|| / ||fp32||. "kernel" says what
the compiled-with-freezing graph runs for the layer's matmul (from inductor's generated code).

Part 2, studies (--studies): studies/minilm and studies/resnet whole, fp32 / all-bf16 / int8 mixes, eager,
compiled as autoprec's compiled runtime does it (regional) without and with freezing; ratios to fp32 eager
timed in the same rounds.

    python benchmarks/cpu_kernels.py [--rounds 7] [--min-round-s 0.1] [--no-compile] [--studies]
        [--study-rounds 5] [--only-studies]

AVX2 emulation: `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_kernels.py`
(oneDNN and ATen's own kernels; MKL's fp32 and fbgemm's int8 pick their ISA themselves).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import os
import re
import sys
import time

import _common as C

C.quiet()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import torch.ao.quantization.fx._decomposed  # noqa: E402,F401

from autoprec.precision import apply_formats, calibrate  # noqa: E402
from autoprec.precision.int8 import _cpu_dynamic_int8, _torchao_int8  # noqa: E402
from autoprec.precision.static_int8_linear import StaticInt8Linear  # noqa: E402

try:  # the package layout after the move into subpackages
    from autoprec.measure import runtime as R  # noqa: E402
    from autoprec.model.model_file import call_model, load_spec  # noqa: E402
except ImportError:
    from autoprec import runtime as R  # noqa: E402
    from autoprec.model.model_file import call_model, load_spec  # noqa: E402

SHAPES = [(384, 1536), (1536, 384), (384, 384)]
TOKENS = (16, 128)


def cpu_line() -> str:
    flags = set()
    name = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name") and name == "?":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    caps = ", ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
                     if k in os.environ) or "none"
    return (f"{name}; ISA flags: {' '.join(f for f in wanted if f in flags) or '-'}; "
            f"ATen capability: {torch.backends.cpu.get_cpu_capability()}; ISA caps from the environment: {caps}")


# ---------------------------------------------------------------------------------------------
# candidate layers


class QDQLinear(nn.Module):
    """Static int8 written as quantize / dequantize + F.linear: what PT2E's convert leaves for inductor."""

    def __init__(self, linear: nn.Linear, qparams: tuple[float, int]) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        self.register_buffer("w_int8", torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8))
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zp", torch.zeros(scale.shape[0], dtype=torch.int64))
        self.register_buffer("bias", linear.bias.detach().float().clone())
        self.scale, self.zp = qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        q = qd.quantize_per_tensor.default(x, self.scale, self.zp, 0, 255, torch.uint8)
        xd = qd.dequantize_per_tensor.default(q, self.scale, self.zp, 0, 255, torch.uint8)
        w = qd.dequantize_per_channel.default(self.w_int8, self.w_scale, self.w_zp, 0, -128, 127, torch.int8)
        return F.linear(xd, w, self.bias)


class AoStaticLinear(nn.Module):
    """torch.ao's static quantized Linear between a quantize and a dequantize (quantized tensors)."""

    def __init__(self, linear: nn.Linear, qparams: tuple[float, int], out_qparams: tuple[float, int],
                 engine: str) -> None:
        super().__init__()
        from torch.ao.nn.quantized import Linear as QLinear

        self.engine = engine
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            w = linear.weight.detach().float()
            scale = w.abs().amax(1).clamp_min(1e-12) / 127
            qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.int64), 0, torch.qint8)
            self.q = QLinear(linear.in_features, linear.out_features)
            self.q.set_weight_bias(qw, linear.bias.detach().float())
            self.q.scale, self.q.zero_point = float(out_qparams[0]), int(out_qparams[1])
        finally:
            torch.backends.quantized.engine = previous
        self.scale, self.zp = qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx = torch.quantize_per_tensor(x, self.scale, self.zp, torch.quint8)
        return self.q(qx).dequantize()


class Bf16Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = copy.deepcopy(linear).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def layer_input(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*TOKENS, k, generator=g)
    if k > 384:  # the FFN's second Linear sees GELU outputs
        return F.gelu(x * 1.5)
    x[..., :4] *= 6.0  # a few outlier channels, as in a transformer's LayerNorm outputs
    return x


def candidates(linear: nn.Linear, x: torch.Tensor, with_ao: bool) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Variant name -> (module, its input)."""
    holder = nn.Sequential(linear)
    cal = calibrate(holder, ["0"], [x, layer_input(linear.in_features, 99)])
    qparams = cal.inputs["0"]
    out = {"fp32": (linear, x), "bf16": (Bf16Linear(linear), x.to(torch.bfloat16)),
           "int8 dyn": (_cpu_dynamic_int8(copy.deepcopy(linear)), x),
           "int8 torchao": (_torchao_int8(copy.deepcopy(linear)), x),
           "int8_static (onednn qlinear)": (StaticInt8Linear.from_float(linear, qparams), x),
           "q/dq linear": (QDQLinear(linear, qparams), x)}
    if with_ao:
        with torch.no_grad():
            ref = linear(x)
        lo, hi = float(ref.min()), float(ref.max())
        out_scale = (hi - lo) / 255
        out_qparams = (out_scale, int(round(-lo / out_scale)))
        for engine in ("x86", "onednn"):
            if engine in torch.backends.quantized.supported_engines:
                out[f"ao static ({engine})"] = (AoStaticLinear(linear, qparams, out_qparams, engine), x)
    return out


# ---------------------------------------------------------------------------------------------
# compiling


def kernel_of(code: str) -> str:
    """What inductor's generated code runs for the matmul."""
    found = []
    for pattern, label in [(r"onednn\.qlinear_pointwise", "onednn qlinear (int8)"),
                           (r"static_int8_linear", "onednn qlinear (opaque op)"),
                           (r"linear_dynamic", "fbgemm dynamic int8"),
                           (r"quantized\.linear\b", "quantized.linear"),
                           (r"_weight_int8pack_mm", "int8 weight-only mm"),
                           (r"_int_mm", "int8 mm (torch._int_mm)"),
                           (r"_mkl_linear", "MKL packed linear"),
                           (r"_linear_pointwise", "oneDNN linear (packed)"),
                           (r"extern_kernels\.(addmm|mm|bmm)", "aten addmm/mm"),
                           (r"CppMicroGemm|cpp_CppGemm", "inductor C++ GEMM template")]:
        if re.search(pattern, code):
            found.append(label)
    return ", ".join(found) or ("graph break: eager" if not code.strip() else "C++ loops")


def compiled(module: nn.Module, x: torch.Tensor, freeze: bool) -> tuple[object, float, str]:
    """A forward of `module` compiled (with freezing: traced, compiled and run under the setting and no_grad),
    the first call's seconds and what its matmul runs. One compile mode per process: dynamo does not guard
    on the freezing setting, so a graph compiled without it would serve a frozen caller of the same code."""
    from torch._inductor.utils import run_and_get_code

    fn = torch.compile(copy.deepcopy(module), dynamic=False)
    scope = R.freezing if freeze else contextlib.nullcontext

    def forward():
        with scope(), torch.no_grad():
            return fn(x)

    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    start = time.perf_counter()
    _, codes = run_and_get_code(forward)
    first = time.perf_counter() - start
    breaks = sum(counters["graph_break"].values()) - breaks
    return forward, first, (f"graph break ({breaks}): eager" if breaks else kernel_of("\n".join(codes)))


# ---------------------------------------------------------------------------------------------
# part 1 (one compile mode per process: see `compiled`)

MODES = {"plain": ("compiled", False), "freezing": ("compiled+freezing", True)}


def kernels(args: argparse.Namespace, mode: str | None) -> dict:
    """Per shape: variant -> {column: {ms, ratio}, err, kernel, compile_s}; column "eager", and MODES[mode]'s."""
    # inductor's x86 int8 passes (q/dq -> onednn qlinear), as PT2E users get them
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401,PLC0415

    torch._dynamo.config.recompile_limit = 64
    results = {}
    for k, n in SHAPES:
        torch.manual_seed(k * 7 + n)
        linear = nn.Linear(k, n).eval()
        x = layer_input(k, 1)
        with torch.no_grad():
            ref = linear(x)
        forwards: dict[str, object] = {}
        info: dict[str, dict[str, object]] = {}
        for name, (module, inp) in candidates(linear, x, with_ao=True).items():
            module.eval()
            with torch.no_grad():
                info[name] = {"err": C.rel_error(module(inp).float(), ref)}
            forwards[f"{name}|eager"] = (lambda m=module, i=inp: _no_grad(m, i))
            if mode is None:
                continue
            column, freeze = MODES[mode]
            try:
                fwd, first, kernel = compiled(module, inp, freeze)
                forwards[f"{name}|{column}"] = fwd
                info[name].update({"kernel": kernel, "compile_s": first})
            except Exception as exc:  # noqa: BLE001 - reported in the table
                info[name]["kernel"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        res = C.interleaved(forwards, "fp32|eager", args.rounds, args.min_round_s)
        for key, r in res.items():
            name, column = key.split("|")
            info[name][column] = {"ms": r["ms"], "ratio": r["ratio"], "spread": r["spread"]}
        results[f"{k}x{n}"] = info
    return results


def _no_grad(module: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return module(x)


def print_kernels(runs: dict[str, dict], rounds: int) -> None:
    columns = ["eager"] + [MODES[m][0] for m in runs if m in MODES]
    first = next(iter(runs.values()))
    for shape in first:
        k, n = shape.split("x")
        header = ["variant"] + [f"{c} ms (x fp32 eager)" for c in columns] + ["rel err", "compiled+freezing runs"]
        rows, spreads = [], []
        for name, info in first[shape].items():
            row = [name]
            for c in columns:
                source = runs.get(next((m for m in MODES if MODES[m][0] == c), ""), first)[shape][name]
                r = source.get(c)
                spreads += [r["spread"]] if r else []
                row.append(f"{r['ms']:.2f} ({r['ratio']:.3f}x)" if r else source.get("kernel", "-"))
            row.append(f"{info['err']:.1e}")
            row.append(runs["freezing"][shape][name].get("kernel", "-") if "freezing" in runs else "-")
            rows.append(row)
        print(f"\n### Linear {k} -> {n}, input {TOKENS[0]} x {TOKENS[1]} x {k} ({TOKENS[0] * TOKENS[1]} tokens)\n")
        print(C.table(header, rows))
        print(f"\n{rounds} rounds; largest pair spread (max/min of a variant's per-round ratios to fp32 eager): "
              f"{max(spreads):.2f}; each compiled column from its own process, its ratios to the fp32 eager timed there "
              f"(eager column: from the first)")


# ---------------------------------------------------------------------------------------------
# part 2


def study_policies(name: str, model: nn.Module) -> dict[str, tuple[dict[str, str], str]]:
    from autoprec.precision import searchable_layers

    layers = searchable_layers(model)
    linears = [layer.name for layer in layers if layer.cls == "Linear"]
    convs = [layer.name for layer in layers if layer.cls.startswith("Conv")]
    out: dict[str, tuple[dict[str, str], str]] = {"fp32": ({}, "fp32"), "all-bf16": ({}, "bf16")}
    if name == "minilm":
        out["Linear int8 (dynamic), rest fp32"] = ({n: "int8" for n in linears}, "fp32")
        out["Linear int8_static, rest fp32"] = ({n: "int8_static" for n in linears}, "fp32")
        out["Linear int8_static, rest bf16"] = ({n: "int8_static" for n in linears}, "bf16")
    else:
        out["convs int8, fc int8_static"] = ({**{n: "int8" for n in convs}, **{n: "int8_static" for n in linears}}, "fp32")
        out["convs int8, rest bf16"] = ({n: "int8" for n in convs}, "bf16")
    return out


def _cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.reshape(out.shape[0], -1).double(), ref.reshape(ref.shape[0], -1).double()
    return float(F.cosine_similarity(a, b, dim=1).mean())


def studies(args: argparse.Namespace, mode: str | None) -> dict:
    results = {}
    for study in args.study_names:
        spec = load_spec(C.REPO / "studies" / study / "model.py")
        example = spec.example()
        batches = spec.eval_batches()
        calibration_batches = spec.calibration_batches()
        base = spec.new_model().eval()
        with torch.inference_mode():
            refs = [spec.compared_tensor(call_model(base, b)).float() for b in batches]
        forwards: dict[str, object] = {}
        info: dict[str, dict[str, object]] = {}
        for label, (layers, default) in study_policies(study, base).items():
            model = apply_formats(spec.new_model().eval(), layers, default, "cpu", calibration=calibration_batches,
                                  runtime="eager" if mode is None else "compiled")
            info[label] = {}
            if mode is None:
                with torch.inference_mode():
                    outs = [spec.compared_tensor(call_model(model, b)).float() for b in batches]
                info[label]["drop"] = 1.0 - sum(_cosine(o, r) * len(o) for o, r in zip(outs, refs)) / sum(len(o) for o in outs)
            if mode is None or label == "fp32":  # a compiled run times the eager fp32 reference only
                forwards[f"{label}|eager"] = (lambda m=model: _inference(m, example))
            if mode is None:
                continue
            column, freeze = MODES[mode]
            try:
                start = time.perf_counter()
                prepared = R.prepare(copy.deepcopy(model), "compiled", torch.device("cpu"),
                                     lambda fn: call_model(fn, example), freeze=freeze,
                                     regional=False if args.whole else None)
                info[label]["compile_s"] = time.perf_counter() - start
                forwards[f"{label}|{column}"] = prepared.forward(lambda fn: _inference(fn, example))
                with torch.inference_mode():
                    outs = [spec.compared_tensor(call_model(prepared.model, b)).float() for b in batches]
                info[label]["drop"] = 1.0 - sum(_cosine(o, r) * len(o) for o, r in zip(outs, refs)) / sum(len(o) for o in outs)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                info[label]["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        res = C.interleaved(forwards, "fp32|eager", args.study_rounds, args.study_min_round_s, warmup_calls=1)
        for key, r in res.items():
            label, column = key.split("|")
            info[label][column] = {"ms": r["ms"], "ratio": r["ratio"], "spread": r["spread"]}
        results[study] = info
    return results


def print_studies(runs: dict[str, dict], rounds: int, whole: bool) -> None:
    modes = [m for m in MODES if m in runs]
    columns = ["eager"] + [MODES[m][0] for m in modes]
    first = next(iter(runs.values()))
    for study in first:
        header = (["policy"] + [f"{c} ms (x fp32 eager)" for c in columns]
                  + ["score drop: eager" + "".join(f" / {MODES[m][0]}" for m in modes)]
                  + (["compile s" + "".join(f" ({MODES[m][0]})" for m in modes)] if modes else []))
        rows, spreads = [], []
        for label in first[study]:
            row = [label]
            for c in columns:
                mode = next((m for m in MODES if MODES[m][0] == c), None)
                info = runs[mode][study][label] if mode else runs.get("eager", first)[study][label]
                r = info.get(c)
                spreads += [r["spread"]] if r else []
                row.append(f"{r['ms']:.1f} ({r['ratio']:.3f}x)" if r else info.get("failed", "-"))
            drops = [runs[m][study][label].get("drop") for m in ["eager", *modes] if m in runs]
            row.append(" / ".join(f"{d:.1e}" if d is not None else "-" for d in drops))
            if modes:
                row.append(" / ".join(f"{runs[m][study][label].get('compile_s', float('nan')):.0f}" for m in modes))
            rows.append(row)
        print(f"\n### studies/{study}: the whole model on example_inputs()" + (" (compiled whole)" if whole else "") + "\n")
        print(C.table(header, rows))
        print(f"\n{rounds} rounds; largest pair spread: {max(spreads):.2f}; score drop: 1 - mean per-sample cosine to the "
              "fp32 eager model on eval_inputs() (autoprec's default fidelity); compile s: autoprec.measure.runtime.prepare's first "
              "call, " + ("the whole model as one graph" if whole else "regional (the repeated blocks one by one)")
              + "; each compiled column from its own process, its ratios to the fp32 eager timed there")


def _inference(model, example):
    with torch.inference_mode():
        return call_model(model, example)


# ---------------------------------------------------------------------------------------------
# part 3: the goal, one process (--goal)


def goal_policies(name: str, model: nn.Module) -> dict[str, tuple[dict[str, str], str, bool, bool | None]]:
    """Label -> (layer formats, default, freeze, regional) for the compiled runtime; the first is the best
    before inductor's freezing (what autoprec's search chose in the compiled runtime then: regional).
    regional None: the runtime's default (with freezing on the CPU, the whole model as one graph)."""
    from autoprec.precision import searchable_layers

    layers = searchable_layers(model)
    linears = [layer.name for layer in layers if layer.cls == "Linear"]
    convs = [layer.name for layer in layers if layer.cls.startswith("Conv")]
    every = {layer.name: "int8" for layer in layers}
    static = "int8_static"
    if name == "minilm":
        return {"before: all-bf16, no freezing, regional": ({}, "bf16", False, True),
                "all-bf16, regional": ({}, "bf16", True, True),
                "all-bf16": ({}, "bf16", True, None),
                "all-int8 (dynamic Linear)": (every, "fp32", True, None),
                f"Linear {static}, rest fp32": ({n: static for n in linears}, "fp32", True, None),
                f"Linear {static}, rest bf16": ({n: static for n in linears}, "bf16", True, None)}
    mixed = {**{n: "int8" for n in convs}, **{n: static for n in linears}}
    return {"before: all-int8, no freezing, regional": (every, "fp32", False, True),
            "all-int8, regional": (every, "fp32", True, True),
            "all-bf16": ({}, "bf16", True, None),
            "all-int8 (static convs, dynamic fc)": (every, "fp32", True, None),
            f"convs int8, fc {static}": (mixed, "fp32", True, None),
            "convs int8, rest bf16": ({n: "int8" for n in convs}, "bf16", True, None),
            f"convs int8, fc {static}, rest bf16": (mixed, "bf16", True, None)}


def goal(args: argparse.Namespace) -> dict:
    """Per study: label -> {ms, ratio (to fp32 eager), drop, compile_s}, all timed in one process in
    interleaved rounds (the prepared models' backends differ with freezing, so their graphs stay apart)."""
    from autoprec.measure.runtime import rebatch_like

    results = {}
    for study in args.study_names:
        spec = load_spec(C.REPO / "studies" / study / "model.py")
        example = spec.example()
        batches = rebatch_like(spec.eval_batches(), example)  # scored with the graph that is timed
        calibration_batches = spec.calibration_batches()
        base = spec.new_model().eval()
        with torch.inference_mode():
            refs = [spec.compared_tensor(call_model(base, b)).float() for b in batches]
        forwards: dict[str, object] = {"eager fp32": lambda m=base: _inference(m, example)}
        info: dict[str, dict[str, object]] = {"eager fp32": {"drop": 0.0}}
        for label, (layers, default, freeze, regional) in goal_policies(study, base).items():
            info[label] = {}
            try:
                model = apply_formats(spec.new_model().eval(), layers, default, "cpu",
                                      calibration=calibration_batches, runtime="compiled")
                start = time.perf_counter()
                prepared = R.prepare(model, "compiled", torch.device("cpu"), lambda fn: call_model(fn, example),
                                     freeze=freeze, regional=regional)
                info[label]["compile_s"] = time.perf_counter() - start
                forwards[label] = prepared.forward(lambda fn: _inference(fn, example))
                with torch.inference_mode():
                    outs = [spec.compared_tensor(call_model(prepared.model, b)).float() for b in batches]
                info[label]["drop"] = 1.0 - sum(_cosine(o, r) * len(o) for o, r in zip(outs, refs)) / sum(len(o) for o in outs)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                info[label]["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            print(f"{study}: {label}: {info[label]}", file=sys.stderr, flush=True)
        res = C.interleaved(forwards, "eager fp32", args.study_rounds, args.study_min_round_s, warmup_calls=1)
        for label, r in res.items():
            info[label].update({"ms": r["ms"], "ratio": r["ratio"], "spread": r["spread"]})
        results[study] = info
    return results


def print_goal(results: dict, rounds: int, max_drop: float = 0.01) -> None:
    for study, info in results.items():
        before = next(label for label in info if label.startswith("before"))
        before_ratio = info[before].get("ratio")
        header = ["policy (compiled runtime; one graph unless regional)", "freezing", "ms", "x fp32 eager", "score drop",
                  "speedup over the best before", "compile s"]
        rows = []
        for label, r in info.items():
            if "ratio" not in r:
                rows.append([label, "-", r.get("failed", "-"), "-", "-", "-", "-"])
                continue
            fits = r.get("drop", 1.0) <= max_drop
            rows.append([label, "-" if label == "eager fp32" else ("no" if label == before else "yes"),
                         f"{r['ms']:.1f}", f"{r['ratio']:.3f}x", f"{r['drop']:.1e}" + ("" if fits else " (over)"),
                         f"{before_ratio / r['ratio']:.2f}x" if before_ratio else "-",
                         f"{r['compile_s']:.0f}" if "compile_s" in r else "-"])
        feasible = [(r["ratio"], label) for label, r in info.items()
                    if "ratio" in r and r.get("drop", 1.0) <= max_drop and label not in ("eager fp32", before)]
        print(f"\n### studies/{study}: the goal, one process\n")
        print(C.table(header, rows))
        if feasible and before_ratio:
            ratio, label = min(feasible)
            print(f"\nfastest feasible (drop <= {max_drop}) with freezing: {label}, {before_ratio / ratio:.2f}x "
                  f"the best before ({before_ratio:.3f}x -> {ratio:.3f}x fp32 eager)")
        print(f"\n{rounds} rounds; largest pair spread: {max(r.get('spread', 1.0) for r in info.values()):.2f}; "
              "every policy timed in adjacent pairs with fp32 eager in one process; score drop: 1 - mean per-sample "
              "cosine to fp32 eager on eval_inputs() (autoprec's default fidelity), of the compiled model")


# ---------------------------------------------------------------------------------------------
# part 4: int8 between neighbouring int8 layers (--chain)


def chain() -> list[list[str]]:
    """Two int8 layers with a ReLU between them, compiled with freezing as the compiled runtime does: does
    the first write uint8 for the second (inductor's x86 passes fold the second's quantize into it), or
    fp32 that a separate kernel quantizes? Read from inductor's generated code."""
    from torch._inductor.utils import run_and_get_code

    cl = torch.channels_last
    cases = {
        "Linear int8_static -> ReLU -> Linear int8_static, fp32 model": (
            nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), torch.randn(32, 64), "int8_static", "fp32"),
        "Linear int8_static -> ReLU -> Linear int8_static, bf16 model": (
            nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), torch.randn(32, 64), "int8_static", "bf16"),
        "Linear int8_static -> GELU -> Linear int8_static (smoothed), fp32 model": (
            nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)), torch.randn(32, 64), "int8_static", "fp32"),
        "Conv2d int8 -> ReLU -> Conv2d int8, channels_last": (
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).to(memory_format=cl),
            torch.randn(2, 8, 16, 16).to(memory_format=cl), "int8", "fp32"),
        "Conv2d int8 -> ReLU -> Conv2d int8, contiguous (NCHW)": (
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)),
            torch.randn(2, 8, 16, 16), "int8", "fp32"),
    }
    rows = []
    for label, (model, x, fmt, default) in cases.items():
        torch.manual_seed(0)
        # the second layer's recipe: smoothing multiplies its input first, where no quantize moves into the first
        recipes = {"0": "histogram", "2": "smooth" if "smoothed" in label else "histogram"}
        model = apply_formats(model.eval(), {"0": fmt, "2": fmt}, default, "cpu", calibration=[x], runtime="compiled",
                              recipes=recipes)
        R.reset()
        prepared = R.prepare(model, "compiled", torch.device("cpu"), lambda fn: fn(x), freeze=True)
        with torch.no_grad():
            _, codes = run_and_get_code(prepared.timed, x)
        code = "\n".join(codes)
        outs = re.findall(r"onednn\.q(?:linear|conv)_pointwise\.?\w*\([^\n]*?(torch\.\w+), '(\w+)'", code)
        kernels = re.findall(r"(cpp_fused_\w+) = ", code)
        rows.append([label, ", ".join(f"{dtype.split('.')[-1]} out ({post})" for dtype, post in outs) or "-",
                     str(len(kernels)), ", ".join(kernels) or "-"])
    R.reset()
    return rows


# ---------------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    mode = None if args.child == "eager" else args.child
    out = {}
    if not args.only_studies and (mode is not None or args.no_compile):  # else the compiled runs time it
        out["kernels"] = kernels(args, mode)
    if args.studies or args.only_studies:
        out["studies"] = studies(args, mode)
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-round-s", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-plain-compile", action="store_true", help="compile only with freezing")
    parser.add_argument("--studies", action="store_true", help="also the whole studies (part 2)")
    parser.add_argument("--only-studies", action="store_true")
    parser.add_argument("--study", dest="study_names", action="append", choices=["minilm", "resnet"])
    parser.add_argument("--whole", action="store_true", help="part 2: compile the whole model as one graph")
    parser.add_argument("--study-rounds", type=int, default=5)
    parser.add_argument("--study-min-round-s", type=float, default=0.3)
    parser.add_argument("--goal", action="store_true",
                        help="part 3 only: the best policy before freezing against the candidates with it, in one process")
    parser.add_argument("--chain", action="store_true",
                        help="part 4 only: does int8 pass between two neighbouring int8 layers, compiled with freezing?")
    parser.add_argument("--child", choices=["eager", *MODES], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.study_names = args.study_names or ["minilm", "resnet"]
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    print(f"CPU: {cpu_line()}\n")
    print(C.machine_header({"measured": "one thread, interleaved rounds against fp32 eager, medians; "
                                        "a shared 2-core machine (other jobs may run)"}))
    sys.stdout.flush()
    if args.goal:
        print_goal(goal(args), args.study_rounds)
        return
    if args.chain:
        print("\n### Neighbouring int8 layers, compiled with freezing\n")
        print(C.table(["chain", "oneDNN int8 kernels: output dtype (fused op)", "C++ kernels", "names"], chain()))
        return
    modes = ["eager"] if args.no_compile else (["freezing"] if args.no_plain_compile else ["plain", "freezing"])
    if "eager" not in modes and (args.studies or args.only_studies):
        modes = ["eager", *modes]  # the eager score drops
    runs = {}
    passed = [a for a in sys.argv[1:]]
    for mode in modes:
        proc = subprocess.run([sys.executable, __file__, *passed, "--child", mode], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"\n{mode} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        runs[mode] = json.loads(line[len("RESULT "):])
    if not args.only_studies:
        print_kernels({m: r["kernels"] for m, r in runs.items() if "kernels" in r}, args.rounds)
    if args.studies or args.only_studies:
        print_studies({m: r["studies"] for m, r in runs.items() if "studies" in r}, args.study_rounds, args.whole)


if __name__ == "__main__":
    main()
