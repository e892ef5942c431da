"""Which int8 path should autoprec use on the CPU? Decided by measurement.

Two workloads:

1. One MiniLM feed-forward block with its real weights (encoder layer `--layer`): the 2048 x 384
   hidden states that layer receives on `example_inputs()` (16 x 128 tokens) -> Linear 384->1536
   -> GELU -> Linear 1536->384.
2. The whole MiniLM from studies/minilm/model.py on `example_inputs()`; fidelity on `eval_inputs()`
   (256 sentences, mean-pooled embeddings), the score autoprec uses.

Variants: fp32, bf16 (for scale), torch.ao dynamic int8 with per-channel weight scales (exactly
`autoprec.precision.int8._cpu_dynamic_int8`), the same with reduce_range=False (torch.ao's
dynamic Linear quantizes activations to 7 bits; 8 bits is safe with VNNI), torchao
`Int8DynamicActivationInt8WeightConfig` eager (exactly `autoprec.precision.int8._torchao_int8`),
and for the block only, unless --no-compile, torchao and fp32 under `torch.compile` (first-call
time reported, from a fresh inductor cache unless --warm-cache).

All variants of a workload are timed in one run: every round times each variant back to back with
fp32 (AB / BA alternating), and the speed-up column is fp32 time / variant time, the median over
the pairs; "pair spread" is max/min of those per-pair ratios (how noisy the machine was).

    .venv/bin/python benchmarks/int8_paths.py [--rounds 31] [--model-rounds 11] [--no-compile] [--threads N]
        [--static-only | --no-static]

Static int8 sections first (benchmarks/static_int8_section.py): one ResNet-18 block and the whole
ResNet-18 (autoprec's per-layer static int8 against FX graph mode and bf16), and the MiniLM FFN block
with a static int8 Linear against the dynamic one; torch.compile rows unless --no-compile.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import sys
import tempfile
import time

if "--warm-cache" not in sys.argv:  # first-call compile time from a cold inductor cache
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoprec-bench-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import _common as C

C.quiet()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from autoprec.precision.int8 import _cpu_dynamic_int8, _torchao_int8  # noqa: E402


def _cpu_dynamic_int8_full_range(linear: nn.Linear) -> nn.Module:
    """autoprec's CPU path with 8-bit instead of 7-bit activations (reduce_range=False).

    torch.ao's dynamic Linear always calls linear_dynamic(..., reduce_range=True), a guard against
    int16 saturation in AVX2's vpmaddubsw; VNNI (vpdpbusd) accumulates in int32 and does not need it.
    """
    module = _cpu_dynamic_int8(linear)
    module.__class__ = FullRangeDynamicLinear
    return module


def _full_range_forward(self, x):
    y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
    return y.to(x.dtype)


FullRangeDynamicLinear = type("FullRangeDynamicLinear", (type(_cpu_dynamic_int8(nn.Linear(2, 2))),),
                              {"forward": _full_range_forward, "__module__": __name__})

AO = "torch.ao dynamic int8, per-channel (autoprec CPU path)"
AO_FULL = "same, reduce_range=False (8-bit activations)"


class FFN(nn.Module):
    def __init__(self, up: nn.Linear, down: nn.Linear) -> None:
        super().__init__()
        self.up, self.act, self.down = up, nn.GELU(), down

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def swap_linears(model: nn.Module, convert) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by convert(linear)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, convert(module))
    return model


def bf16_io(module: nn.Module) -> nn.Module:
    """module.to(bf16) taking and returning fp32, as a neighbour of fp32 layers would see it."""
    module = module.to(torch.bfloat16)
    return lambda x: module(x.to(torch.bfloat16)).float()


def block_section(model: nn.Module, example: dict, layer: int, rounds: int, min_round_s: float,
                  compile_: bool) -> str:
    ffn_src = model.encoder.encoder.layer[layer]
    captured = {}
    hook = ffn_src.intermediate.dense.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.inference_mode():
        model(**example)
    hook.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1]).clone()  # 2048 x 384
    fp32 = FFN(copy.deepcopy(ffn_src.intermediate.dense), copy.deepcopy(ffn_src.output.dense)).eval()

    first_call: dict[str, str] = {}
    variants: dict[str, nn.Module | object] = {"fp32 eager": fp32}
    variants["bf16 eager"] = bf16_io(copy.deepcopy(fp32))
    t0 = time.perf_counter()
    variants[AO] = swap_linears(copy.deepcopy(fp32), _cpu_dynamic_int8)
    first_call[AO] = f"{time.perf_counter() - t0:.2f} s convert"
    variants[AO_FULL] = swap_linears(copy.deepcopy(fp32), _cpu_dynamic_int8_full_range)
    t0 = time.perf_counter()
    variants["torchao Int8DynActInt8Weight, eager"] = swap_linears(copy.deepcopy(fp32), _torchao_int8)
    first_call["torchao Int8DynActInt8Weight, eager"] = f"{time.perf_counter() - t0:.2f} s convert"
    if compile_:
        torch._dynamo.reset()
        # torchao first, so its first-call time includes inductor's one-off start-up cost too.
        for name, base in (("torchao Int8DynActInt8Weight, torch.compile",
                            swap_linears(copy.deepcopy(fp32), _torchao_int8)),
                           ("fp32, torch.compile", copy.deepcopy(fp32))):
            compiled = torch.compile(base)
            t0 = time.perf_counter()
            with torch.inference_mode():
                compiled(x)
            first_call[name] = f"{time.perf_counter() - t0:.1f} s compile + first call"
            variants[name] = compiled

    with torch.inference_mode():
        ref = fp32(x)
        outs = {name: m(x).float() for name, m in variants.items()}
        forwards = {name: (lambda m=m: m(x)) for name, m in variants.items()}
        timing = C.interleaved(forwards, "fp32 eager", rounds, min_round_s)
    rows = []
    for name in variants:
        t = timing[name]
        mean_cos, _ = C.row_cosine(outs[name], ref)
        spread = "-" if name == "fp32 eager" else f"{t['spread']:.3f}"
        rows.append([name, C.fmt_ms(t["ms"]), f"{1 / t['ratio']:.2f}x", spread,
                     f"{C.rel_error(outs[name], ref):.2e}", f"{1 - mean_cos:.1e}", first_call.get(name, "-")])
    head = (f"#### One MiniLM FFN block (encoder layer {layer} weights, its real input "
            f"{tuple(x.shape)} -> Linear {fp32.up.out_features} -> GELU -> Linear {fp32.down.out_features})\n\n"
            f"{rounds} rounds; each round times every variant back to back with fp32 (AB/BA), "
            f">= {min_round_s} s per side.\n\n")
    return head + C.table(["path", "median ms", "speed-up vs fp32 (median of pairs)",
                           "pair spread max/min", "relative error vs fp32", "1 - mean row cosine",
                           "first call / setup"], rows)


def model_section(model: nn.Module, spec, example: dict, rounds: int, min_round_s: float) -> str:
    from autoprec import Policy, apply_policy

    linears = C.searchable_names(model, linear_only=True)
    variants: dict[str, nn.Module] = {"fp32": model}
    variants["bf16 (`model.to(torch.bfloat16)`)"] = copy.deepcopy(model).to(torch.bfloat16)
    variants["torch.ao dynamic int8, per-channel, all Linear (autoprec CPU path)"] = apply_policy(
        copy.deepcopy(model), Policy(layers={n: "int8" for n in linears}))
    variants["same, reduce_range=False (8-bit activations)"] = swap_linears(copy.deepcopy(model),
                                                                            _cpu_dynamic_int8_full_range)
    variants["torchao Int8DynActInt8Weight eager, all Linear"] = swap_linears(copy.deepcopy(model), _torchao_int8)

    batches = spec.eval_batches()
    with torch.inference_mode():
        refs = [model(**b).float() for b in batches]
        fidelity = {}
        for name, m in variants.items():
            outs = [m(**b).float() for b in batches]
            out, ref = torch.cat(outs), torch.cat(refs)
            mean_cos, min_cos = C.row_cosine(out, ref)
            fidelity[name] = (C.rel_error(out, ref), mean_cos, min_cos)
        forwards = {name: (lambda m=m: m(**example)) for name, m in variants.items()}
        timing = C.interleaved(forwards, "fp32", rounds, min_round_s)
    rows = []
    for name in variants:
        t = timing[name]
        rel, mean_cos, min_cos = fidelity[name]
        spread = "-" if name == "fp32" else f"{t['spread']:.3f}"
        rows.append([name, C.fmt_ms(t["ms"]), f"{1 / t['ratio']:.2f}x", spread, f"{rel:.2e}",
                     f"{mean_cos:.6f}", f"{min_cos:.6f}"])
    batch = "x".join(str(s) for s in example["input_ids"].shape)
    head = (f"#### Whole MiniLM ({len(linears)} Linear layers), batch {batch} tokens from example_inputs()\n\n"
            f"{rounds} rounds; each round times every variant back to back with fp32 (AB/BA), "
            f">= {min_round_s} s per side; fidelity on "
            f"eval_inputs() ({sum(len(b['input_ids']) for b in batches)} sentences, pooled embeddings).\n\n")
    return head + C.table(["path", "median ms", "speed-up vs fp32 (median of pairs)",
                           "pair spread max/min", "relative error vs fp32", "mean cosine", "min cosine"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds for the FFN block")
    parser.add_argument("--min-round-s", type=float, default=0.1, help="block: seconds per variant per round")
    parser.add_argument("--model-rounds", type=int, default=11, help="interleaved rounds for the whole model")
    parser.add_argument("--model-min-round-s", type=float, default=0.3)
    parser.add_argument("--layer", type=int, default=0, help="which encoder layer's FFN weights and input")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile variants")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use the usual inductor cache (default: a fresh one, so compile times are cold)")
    parser.add_argument("--skip-model", action="store_true", help="FFN block only")
    parser.add_argument("--static-only", action="store_true",
                        help="only the static int8 sections (ResNet block, ResNet-18, MiniLM FFN static vs dynamic)")
    parser.add_argument("--no-static", dest="static", action="store_false", help="skip the static int8 sections")
    parser.add_argument("--static-rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    args = parser.parse_args()

    threads = C.set_threads(args.threads)
    torch.manual_seed(0)
    spec, model, example = C.load_minilm()
    print("### int8 paths on the CPU\n")
    print(C.machine_header({"threads": threads}))
    print()
    if args.static:
        from static_int8_section import minilm_block_section, resnet_sections

        print(resnet_sections(args.static_rounds, args.min_round_s, args.compile))
        print()
        print(minilm_block_section(args.static_rounds, args.min_round_s, args.compile, args.layer))
        print()
        if args.static_only:
            return
    print(block_section(model, example, args.layer, args.rounds, args.min_round_s, args.compile))
    if not args.skip_model:
        print()
        print(model_section(model, spec, example, args.model_rounds, args.model_min_round_s))


if __name__ == "__main__":
    main()
