"""studies/digits_cnn's CNN, scored by its accuracy on noisy test digits: a classification metric where formats cost images.

On the clean 450 test digits no format costs this network an image (bf16 and int8 all keep 0.980),
so there is no tight drop to plan for. Here `evaluate` scores the same trained network on 10 copies
of the test split, each with seeded Gaussian pixel noise (sigma 0.3 on images in [0, 1]): 4500
images, fp32 accuracy about 0.83, many of them near a decision boundary, where a format's rounding
flips some (in steps of 1/4500). Static int8 is calibrated on noisy batches too (the inputs it will
serve; calibrated on clean digits it clips the noise away and scores better than fp32). The network,
its training and the example input are the study's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "studies" / "digits_cnn"))
import model as digits_study  # noqa: E402

NOISE = 0.3
COPIES = 10
NOISE_SEED = 1
_NOISY: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

build_model = digits_study.build_model
example_inputs = digits_study.example_inputs


def noisy_copies(copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` seeded noisy copies of the test split and their labels (the first k the same for any count)."""
    if copies not in _NOISY:
        data = digits_study.digits()
        generator = torch.Generator().manual_seed(NOISE_SEED)
        x = data["x_test"]
        _NOISY[copies] = (torch.cat([x + NOISE * torch.randn(x.shape, generator=generator) for _ in range(copies)]),
                          data["y_test"].repeat(copies))
    return _NOISY[copies]


def noisy_test_split() -> tuple[torch.Tensor, torch.Tensor]:
    return noisy_copies(COPIES)


def calibration_inputs() -> list[torch.Tensor]:
    """The first 256 noisy digits (one copy of the 450 test digits holds them), in batches of 64."""
    return [noisy_copies(1)[0][start:start + 64] for start in range(0, 256, 64)]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 500) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch):
            logits = model(x[start:start + batch].to(device))
            correct += int((logits.argmax(1).cpu() == y[start:start + batch]).sum())
    return correct / len(y)


def evaluate(model: nn.Module, device: torch.device) -> float:
    """Accuracy on the 4500 noisy test digits."""
    return accuracy(model, *noisy_test_split(), device)
