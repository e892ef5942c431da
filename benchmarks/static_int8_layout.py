"""Static int8 convolutions and memory layout: why an int8 layer keeps its float layer's layout.

    python benchmarks/static_int8_layout.py [--rounds 9]

oneDNN's int8 convolution computes in channels_last. Until session 9 autoprec's StaticInt8Conv returned
that channels_last output whatever its input was, so in a contiguous (NCHW) model one int8 layer
switched every layer after it, float ones included, to channels_last: a policy's latency depended on
which layer came first in int8, not on each layer's format, and the cost model (a sum over layers)
could not follow. Now an int8 layer returns the layout its float layer would have, and quantizes its
input straight into channels_last. This prints, for ResNet-18 (studies/resnet, batch 8 x 64 x 64) and
the deeper digits CNN (benchmarks/models/digits_deep.py, batch 256 x 8 x 8), the latency of a few
policies against the fp32 model in the same layout, timed side by side (interleaved pairs, medians of
the per-pair ratios), under:
- "before": the old StaticInt8Conv (contiguous input codes, channels_last output always), contiguous model;
- "now, contiguous": this StaticInt8Conv, the model contiguous (NCHW) as torchvision builds it;
- "now, channels_last": this StaticInt8Conv, `model.to(memory_format=torch.channels_last)`.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import warnings
from unittest import mock

import torch
from torch import nn

import _common as C
from autoprec.policy import Policy, apply_policy
from autoprec.precision import static_int8
from autoprec.model.model_file import load_spec

MODELS = {"resnet": C.REPO / "studies" / "resnet" / "model.py",
          "digits_deep": C.REPO / "benchmarks" / "models" / "digits_deep.py"}


def _old_quantize(self, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(x.float().contiguous(), self.input_scale, self.input_zero_point,
                                         torch.quint8).int_repr()


def _old_forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qconv_pointwise(
        self._quantize(x), self.input_scale, self.input_zero_point, self.packed_weight(), self.weight_scale,
        self.weight_zero_point, self.bias, self.stride, self.padding, self.dilation, self.groups,
        1.0, 0, torch.float32, "none", [], "")


def policies(names: list[str]) -> dict[str, dict[str, str]]:
    rng = random.Random(0)
    out = {"all-int8": {n: "int8" for n in names}, "first conv only int8": {names[0]: "int8"},
           "second half int8": {n: "int8" for n in names[len(names) // 2:]}}
    for i in range(3):
        out[f"random half {i + 1}"] = {n: "int8" for n in names if rng.random() < 0.5}
    return out


def measure(path, rounds: int) -> list[list[object]]:
    spec = load_spec(path)
    fp32 = spec.new_model().eval()
    fp32 = fp32.to(memory_format=torch.contiguous_format)  # the study may build it channels_last
    x = spec.example_inputs()
    calibration = spec.calibration_inputs() if spec.calibration_inputs else [x]
    convs = [n for n, m in fp32.named_modules() if isinstance(m, nn.Conv2d)]
    channels_last = copy.deepcopy(fp32).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return [_row(name, layers, fp32, channels_last, x, calibration, rounds)
                for name, layers in policies(convs).items()]


def _row(name, layers, fp32, channels_last, x, calibration, rounds) -> list[object]:
    with mock.patch.object(static_int8.StaticInt8Conv, "_quantize", _old_quantize), \
            mock.patch.object(static_int8.StaticInt8Conv, "forward", _old_forward):
        before = apply_policy(copy.deepcopy(fp32), Policy(layers=layers), "cpu", calibration=calibration)
        old = C.interleaved({"fp32": lambda: fp32(x), "int8": lambda: before(x)}, "fp32", rounds, 0.05)
    now = apply_policy(copy.deepcopy(fp32), Policy(layers=layers), "cpu", calibration=calibration)
    now_cl = apply_policy(copy.deepcopy(channels_last), Policy(layers=layers), "cpu", calibration=calibration)
    new = C.interleaved({"fp32": lambda: fp32(x), "int8": lambda: now(x)}, "fp32", rounds, 0.05)
    new_cl = C.interleaved({"fp32": lambda: channels_last(x), "int8": lambda: now_cl(x)}, "fp32", rounds, 0.05)
    return [name, sum(1 for f in layers.values() if f == "int8"), f"{old['int8']['ratio']:.3f}",
            f"{new['int8']['ratio']:.3f}", f"{new_cl['int8']['ratio']:.3f}",
            f"{new['fp32']['ms']:.1f} / {new_cl['fp32']['ms']:.1f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--models", default="resnet,digits_deep")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    C.quiet()
    C.set_threads(args.threads)
    print("# Static int8 convolutions and memory layout\n")
    print(C.machine_header({"rounds": args.rounds, "command": "python " + " ".join(sys.argv)}))
    for model in args.models.split(","):
        print(f"\n## {model}\n")
        print(C.table(["policy", "int8 convs", "before: / fp32 (contiguous)", "now: / fp32 (contiguous)",
                       "now, channels_last: / fp32 channels_last", "fp32 ms contiguous / channels_last"],
                      measure(MODELS[model], args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
