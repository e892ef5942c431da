"""Does choosing each static int8 layer's calibration recipe win back score?

On a study's model, every layer that takes static int8 (Linear layers `int8_static`, convolutions `int8`)
converted at once, calibrated on the study's calibration batches with one recipe for every layer
(histogram, min-max, SmoothQuant-style smoothing where the layer is a Linear) and with each layer's recipe
chosen as a search does it (the one whose int8 output is closest to fp32 on the layer's own calibration
inputs). Score drop: 1 - mean per-sample cosine to the fp32 model on eval_inputs() (autoprec's default
fidelity), eager, fp32 elsewhere. Calibration s: `calibrate` itself, the choice included.

    HF_HUB_OFFLINE=1 python benchmarks/calibration_recipes.py                  # studies/minilm and studies/resnet
    HF_HUB_OFFLINE=1 python benchmarks/calibration_recipes.py --studies minilm
"""

from __future__ import annotations

import argparse
import collections
import copy
import time

import torch

import _common as C

C.quiet()

from autoprec.measure.fidelity import sample_cosines  # noqa: E402
from autoprec.model.model_file import call_model, load_spec  # noqa: E402
from autoprec.precision import apply_formats  # noqa: E402
from autoprec.precision.calibration import RECIPES, calibrate, calibrated_layers, recipes_for  # noqa: E402


def one_study(name: str) -> list[list[object]]:
    spec = load_spec(C.REPO / "studies" / name / "model.py")
    model = spec.new_model()
    layers = calibrated_layers(model, "cpu", ("int8", "int8_static"))
    formats = {n: "int8_static" if "smooth" in recipes_for(model.get_submodule(n)) else "int8" for n in layers}
    batches, calibration = spec.eval_batches(), spec.calibration_batches()
    with torch.inference_mode():
        refs = [spec.compared_tensor(call_model(model, b)).float() for b in batches]

    def drop(cal) -> float:
        candidate = apply_formats(copy.deepcopy(model), formats, "fp32", calibration=cal)
        with torch.inference_mode():
            cos = [sample_cosines(spec.compared_tensor(call_model(candidate, b)).float(), r)
                   for b, r in zip(batches, refs)]
        return 1.0 - torch.cat(cos).mean().item()

    rows = []
    for recipe in (*RECIPES, None):
        fixed = None if recipe is None else \
            {n: recipe if recipe in recipes_for(model.get_submodule(n)) else "histogram" for n in layers}
        start = time.perf_counter()
        cal = calibrate(model, layers, calibration, fixed)
        seconds = time.perf_counter() - start
        counts = collections.Counter(cal.recipes.values())
        label = "each layer's closest to fp32" if recipe is None else \
            f"{recipe} everywhere" + ("" if all(recipe in recipes_for(model.get_submodule(n)) for n in layers)
                                      else " (histogram on convolutions)")
        rows.append([name, f"{len(layers)} ({', '.join(sorted(set(formats.values())))})", label,
                     ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), f"{drop(cal):.2e}", f"{seconds:.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", nargs="+", default=["minilm", "resnet"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    C.set_threads(args.threads)
    print(C.machine_header())
    print()
    rows = [row for name in args.studies for row in one_study(name)]
    print(C.table(["study", "static int8 layers", "calibration", "recipes taken", "score drop", "calibration s"], rows))


if __name__ == "__main__":
    main()
