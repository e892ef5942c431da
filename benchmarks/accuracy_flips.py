"""Why a classifier's accuracy is a rugged function of its formats: predictions flipped both ways.

    python benchmarks/accuracy_flips.py [--model benchmarks/models/digits_deep.py] [--copies 1000]

For a classification study whose evaluate() is accuracy (benchmarks/models/digits_deep.py by default:
45,000 noisy test digits), apply all-int8, all-bf16 and int8 on each searchable layer alone, and count
against the fp32 model's predictions: how many changed, how many correct answers were lost, how many
wrong ones were won. The accuracy drop is lost - won: a small difference of two large counts; z is that
difference over the square root of their sum (how many flip-noise deviations the drop stands out by).
`--copies` scores that many noisy copies of the test digits instead of the study's own count (a model
with a module-level COPIES, as digits_deep and digits_noisy have): more images, less flip noise.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import _common as C
from autoprec.policy import Policy, apply_policy
from autoprec.search.space import load_space
from autoprec.model.model_file import load_spec

DEFAULT = C.REPO / "benchmarks" / "models" / "digits_deep.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--copies", type=int, default=None, help="noisy copies of the test digits to score")
    args = parser.parse_args(argv)
    C.quiet()
    C.set_threads(args.threads)
    spec = load_spec(args.model)
    if args.copies is not None:
        spec.evaluate.__globals__["COPIES"] = args.copies
    x, y = spec.evaluate.__globals__["noisy_test_split"]()  # the study's scored images and labels
    fp32 = spec.new_model().eval()
    calibration = list(spec.calibration_inputs()) if spec.calibration_inputs else [spec.example_inputs()]
    choices = load_space("cpu").choices(fp32, torch.device("cpu"))

    def predictions(model: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(y), 1000)])

    reference = predictions(fp32)
    right = reference == y
    policies = {"all-int8": {n: "int8" for n, o in choices.items() if "int8" in o},
                "all-bf16": {n: "bf16" for n, o in choices.items() if "bf16" in o}}
    policies.update({f"int8 on {n} alone": {n: "int8"} for n, o in choices.items() if "int8" in o})
    rows = []
    for name, layers in policies.items():
        got = predictions(apply_policy(copy.deepcopy(fp32), Policy(layers=layers), "cpu", calibration=calibration))
        lost, won = int((right & (got != y)).sum()), int((~right & (got == y)).sum())
        z = (lost - won) / max(1, lost + won) ** 0.5
        rows.append([name, int((got != reference).sum()), lost, won, f"{(lost - won) / len(y):+.6f}", f"{z:+.1f}"])
    print("# Predictions flipped against fp32\n")
    print(C.machine_header({"model": args.model, "images": len(y),
                            "fp32 accuracy": f"{float(right.float().mean()):.4f}",
                            "command": "python " + " ".join(sys.argv)}))
    print()
    print(C.table(["policy", "predictions changed", "correct lost", "wrong won", "accuracy drop", "z"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
