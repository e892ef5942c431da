"""What one int8 Linear costs per call when its matrix work is tiny: the framework's overhead.

On a GPU that issues kernels faster than a Python model can launch them (MiniLM at batch 16 x 128
on an H200 is such a case), a layer's cost is its host-side overhead, not its arithmetic. This
times one small Linear (--batch x --width -> --width) per call, interleaved round by round, as:
fp32 (nn.Linear), autoprec's int8 on this device (torch dynamic int8 on the CPU, torchao's
Int8DynamicActivationInt8WeightConfig on CUDA, through autoprec.precision), and torchao's config
on the CPU as well, for comparison.

    .venv/bin/python benchmarks/int8_call_overhead.py [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import _common as C

C.quiet()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from autoprec.precision import apply_formats  # noqa: E402
from autoprec.measure.timing import time_calls  # noqa: E402


def per_call_us(forward, x: torch.Tensor, device: torch.device, calls: int) -> float:
    return 1e6 * time_calls(lambda: forward(x), calls, device) / calls


def describe(layer: nn.Module) -> str:
    kind = type(layer)
    weight = getattr(layer, "weight", None)
    held = f", weight {type(weight).__name__}" if isinstance(weight, torch.Tensor) else ""
    return f"{kind.__module__}.{kind.__name__}{held}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(args.width, args.width)).to(device).eval()
    variants = {"fp32 nn.Linear": fp32,
                f"autoprec int8 on {device.type}": apply_formats(copy.deepcopy(fp32), {"0": "int8"}, "fp32", device)}
    if device.type == "cpu":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao = copy.deepcopy(fp32)
        quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        variants["torchao int8 config on cpu"] = ao
    x = torch.randn(args.batch, args.width, device=device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for model in variants.values():
            for _ in range(20):
                model(x)
        for r in range(args.rounds):
            names = list(variants)
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: no fixed order
                times[name].append(per_call_us(variants[name], x, device, args.calls))
    print(f"### One Linear {args.batch}x{args.width} -> {args.width}, per call, on {device}\n")
    print(C.machine_header({"threads": torch.get_num_threads(),
                            "rounds": f"{args.rounds} x {args.calls} calls per variant, interleaved"}))
    print()
    base = statistics.median(times["fp32 nn.Linear"])
    rows = [[name, f"{statistics.median(t):.1f}", f"{statistics.median(t) / base:.1f}x", describe(variants[name][0])]
            for name, t in times.items()]
    print(C.table(["variant", "us per call (median)", "vs fp32", "module"], rows))


if __name__ == "__main__":
    main()
