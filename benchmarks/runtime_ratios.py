"""fp32, all-bf16, all-int8 and a mixed policy, eager and compiled, as ratios to fp32 of the same runtime.

For MiniLM (studies/minilm, 16 x 128 tokens) and ResNet-18 (studies/resnet, 8 x 3 x 64 x 64): each
policy applied as autoprec applies it in that runtime (`apply_formats(..., runtime=...)`: int8 on a
VNNI CPU is torchao's config when compiled, torch's dynamic int8 when eager) and prepared as the
Evaluator prepares it (`autoprec.measure.runtime.prepare`: regional compilation of the repeated blocks on the
CPU, the whole model with CUDA graphs on CUDA). Every variant of a model is timed in one
interleaved run against eager fp32 (AB/BA pairs, `_common.interleaved`); a variant's ratio to fp32
of its own runtime is the quotient of the two medians. `compile s` is the first forward's time
minus a warm one's, from a fresh inductor cache unless --warm-cache. `fidelity` is the mean
per-sample cosine of the output to eager fp32 on the example batch.

Two extra rows (unless --no-extras): fp32 with the whole model compiled instead of its repeated blocks
(the CPU's regional compilation against what a user who writes torch.compile(model) gets), and
all-int8 with the eager runtime's int8 kernel compiled (why the compiled runtime takes another).

On a GPU with fp8 kernels (compute capability 8.9+) two more: all-fp8 (every layer that can take fp8,
bf16 elsewhere) and fp8-large+bf16 (fp8 on the larger half of the layers by weight size, bf16 elsewhere);
`--models gpt2` adds GPT-2 at its 124M shape (benchmarks/models/gpt2_124m.py, 16 x 256 tokens),
`--models digits_deep` the 8-layer digits CNN classification study (256 noisy digits).

The mixed policy gives the searchable layers int8, bf16 and fp32 in turn (a layer that cannot take
int8 gets bf16), so it has many format boundaries, like a searched policy.

    .venv/bin/python benchmarks/runtime_ratios.py [--device cuda] [--models minilm,resnet,gpt2] [--rounds 7]
    .venv/bin/python benchmarks/runtime_ratios.py --device cuda --modes reduce-overhead,default,max-autotune-no-cudagraphs
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import sys
import tempfile

if "--warm-cache" not in sys.argv:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoprec-bench-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import _common as C

C.quiet()

import torch  # noqa: E402

from autoprec.measure import runtime as R
from autoprec.errors import AutoprecError  # noqa: E402
from autoprec.precision import HANDLERS, apply_formats, searchable_layers  # noqa: E402
from autoprec.precision.int8 import kernel as int8_kernel  # noqa: E402
from autoprec.measure.calibration import spec_calibration  # noqa: E402
from autoprec.model.model_file import call_model, load_spec, move_inputs  # noqa: E402

STUDIES = {"minilm": C.REPO / "studies" / "minilm" / "model.py", "resnet": C.REPO / "studies" / "resnet" / "model.py",
           "gpt2": C.REPO / "benchmarks" / "models" / "gpt2_124m.py",
           "digits_deep": C.REPO / "benchmarks" / "models" / "digits_deep.py"}


def policies(model: torch.nn.Module, device: torch.device) -> dict[str, tuple[dict[str, str], str]]:
    """name -> (layers, default) for the four policies."""
    names = [layer.name for layer in searchable_layers(model)]
    modules = dict(model.named_modules())

    def can(name: str, fmt: str) -> bool:
        return HANDLERS[fmt].unsupported_reason(modules[name], device) is None

    int8 = {n: "int8" for n in names if can(n, "int8")}
    mixed = {}
    for i, n in enumerate(names):
        fmt = ("int8", "bf16", "fp32")[i % 3]
        mixed[n] = fmt if can(n, fmt) else "bf16"
    table = {"fp32": ({}, "fp32"), "all-bf16": ({n: "bf16" for n in names}, "bf16"),
             "all-int8": (int8, "fp32"), "mixed": (mixed, "fp32")}
    fp8 = [n for n in names if can(n, "fp8")]
    if fp8:  # a GPU with fp8 kernels: every layer that can, and the larger half only, the rest bf16
        sizes = {n: modules[n].weight.numel() for n in fp8}
        large = [n for n in fp8 if sizes[n] >= sorted(sizes.values())[len(sizes) // 2]]
        table["all-fp8"] = ({n: "fp8" if n in fp8 else "bf16" for n in names}, "bf16")
        table["fp8-large+bf16"] = ({n: "fp8" if n in large else "bf16" for n in names}, "bf16")
    return table


def run_model(key: str, device: torch.device, runtimes: list[str], rounds: int, min_round_s: float,
              extras: bool, only: set[str] | None = None) -> tuple[str, list]:
    spec = load_spec(STUDIES[key])
    base = spec.new_model().to(device).eval()
    example = move_inputs(spec.example(), device)

    def call(fn):
        return call_model(fn, example)

    calibration = spec_calibration(spec, base, device)  # static int8 convolutions' input ranges
    with torch.inference_mode():
        reference = spec.compared_tensor(call(base)).float().clone()
    variants, info = {}, {}
    plan = []  # (policy, runtime label, runtime, apply_formats' runtime, prepare's keywords)
    for runtime in runtimes:
        mode = None if runtime in ("eager", "compiled") else runtime.split(":", 1)[1]
        kind = "eager" if runtime == "eager" else "compiled"
        plan += [(name, runtime, kind, kind, {"mode": mode}) for name in policies(base, device)
                 if only is None or name in only or name == "fp32"]
    if extras and "compiled" in runtimes:
        if device.type == "cpu" and R.repeated_blocks(base):  # the other way to compile: the whole model
            plan.append(("fp32", "compiled, whole model", "compiled", "compiled", {"regional": False}))
        if int8_kernel(device, "compiled") != int8_kernel(device, "eager"):  # the eager int8 kernel, compiled
            plan.append(("all-int8", f"compiled, {int8_kernel(device, 'eager')} int8", "compiled", "eager", {}))
    table = policies(base, device)
    for name, runtime, kind, apply_runtime, keywords in plan:
        layers, default = table[name]
        label = f"{name} | {runtime}"
        try:
            model = apply_formats(copy.deepcopy(base), layers, default, device, calibration=calibration,
                                  runtime=apply_runtime)
            prepared = R.prepare(model, kind, device, call, **keywords)
        except (AutoprecError, RuntimeError) as exc:
            info[label] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
            print(f"{key}: {label}: {info[label]['error']}", file=sys.stderr, flush=True)
            continue
        with torch.inference_mode():
            out = spec.compared_tensor(call(prepared.model)).float()
        cos = torch.nn.functional.cosine_similarity(out.reshape(out.shape[0], -1).double(),
                                                    reference.reshape(reference.shape[0], -1).double(), dim=1)
        variants[label] = prepared.forward(call)
        info[label] = {"compile_s": prepared.compile_s, "breaks": prepared.graph_breaks, "fidelity": float(cos.mean())}
        print(f"{key}: {label}: ready (compile {prepared.compile_s:.1f} s, {prepared.graph_breaks} graph breaks)",
              file=sys.stderr, flush=True)
    with torch.inference_mode():
        timing = C.interleaved(variants, "fp32 | eager", rounds, min_round_s)
    rows = []
    for label in info:
        policy, runtime = label.split(" | ")
        if "error" in info[label]:
            rows.append([key, policy, runtime, "-", "-", "-", "-", "-", info[label]["error"]])
            continue
        own = timing.get(f"fp32 | {runtime.split(',')[0]}")
        ratio = timing[label]["ratio"] / own["ratio"] if own else float("nan")
        compiled = runtime != "eager"
        rows.append([key, policy, runtime, C.fmt_ms(timing[label]["ms"]), f"{ratio:.3f}",
                     f"{timing[label]['ratio']:.3f}",
                     f"{info[label]['compile_s']:.1f}" if compiled else "-",
                     f"{info[label]['breaks']}" if compiled else "-", f"{info[label]['fidelity']:.6f}"])
    batch = "x".join(str(s) for s in (example["input_ids"].shape if isinstance(example, dict) else example.shape))
    return batch, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="minilm,resnet")
    parser.add_argument("--modes", default=None,
                        help="comma-separated runtimes besides eager: 'compiled' (autoprec's) and, e.g. on CUDA, "
                             "'mode:default', 'mode:max-autotune-no-cudagraphs' (torch.compile modes)")
    parser.add_argument("--policies", default=None,
                        help="comma-separated policies to time (fp32 always): all-bf16, all-int8, mixed, and on a GPU "
                             "with fp8 kernels all-fp8, fp8-large+bf16 (default: all)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-round-s", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: autoprec's default)")
    parser.add_argument("--no-extras", dest="extras", action="store_false",
                        help="skip the two extra rows (fp32 compiled whole; all-int8 with the eager int8 kernel, compiled)")
    parser.add_argument("--warm-cache", action="store_true", help="use the usual inductor cache (compile times warm)")
    args = parser.parse_args()

    device = torch.device(args.device)
    threads = C.set_threads(args.threads) if device.type == "cpu" else torch.get_num_threads()
    runtimes = ["eager", "compiled"] + [f"mode:{m.removeprefix('mode:')}" for m in (args.modes or "").split(",")
                                        if m and m != "compiled"]
    print("### Runtimes: eager and compiled, ratios to fp32 of the same runtime\n")
    print(C.machine_header({"device": str(device), "threads": threads,
                            "int8 kernel, compiled": int8_kernel(device, "compiled"),
                            "int8 kernel, eager": int8_kernel(device, "eager"),
                            "compiled": (f"torch.compile mode {R.CUDA_MODE!r}, whole model" if device.type == "cuda"
                                         else "torch.compile (inductor default mode), repeated blocks regionally"),
                            "inductor cache": "warm" if args.warm_cache else "fresh (cold compile times)"}))
    print()
    rows = []
    for key in args.models.split(","):
        torch.manual_seed(0)
        batch, model_rows = run_model(key, device, runtimes, args.rounds, args.min_round_s, args.extras,
                                      set(args.policies.split(",")) if args.policies else None)
        rows += [[f"{row[0]} ({batch})"] + row[1:] for row in model_rows]
    print(f"{args.rounds} interleaved rounds, >= {args.min_round_s} s per side.\n")
    print(C.table(["model (batch)", "policy", "runtime", "median ms", "vs fp32 of same runtime",
                   "vs fp32 eager", "compile s", "graph breaks", "fidelity"], rows))


if __name__ == "__main__":
    main()
