"""A deeper CNN on the digits, scored by its accuracy on 45,000 noisy test digits: classification where int8 costs images.

studies/digits_cnn's 4-layer network loses no image to any format (clean test split), and on noisy digits
its accuracy moves by a few images either way (benchmarks/models/digits_noisy.py), so no drop there can
be planned for. This network has eight searchable layers (five Conv2d, three Linear), the same data,
training and seed as that study, and `evaluate` scores it on 100 seeded noisy copies of the 450 test
digits (Gaussian pixel noise, sigma 0.3 on images in [0, 1]): fp32 accuracy about 0.80, steps of 1/45,000,
enough images that int8's systematic cost (a correct answer near a boundary is lost more often than a
wrong one is won) stands out of the flips both ways. Static int8 is calibrated on noisy batches, the
inputs it serves. Latency and memory: one batch of 256 noisy digits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "studies" / "digits_cnn"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_noisy  # noqa: E402
import model as digits_study  # noqa: E402

COPIES = 100
TIMED_BATCH = 256
_TRAINED: dict[str, torch.Tensor] = {}


def new_network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 2 * 2, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def build_model() -> nn.Module:
    if not _TRAINED:
        with torch.random.fork_rng():
            torch.manual_seed(digits_study.SEED)
            _TRAINED.update(digits_study.fit(new_network()).state_dict())
    model = new_network()
    model.load_state_dict(_TRAINED)
    return model.eval()


def noisy_test_split() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_noisy.noisy_copies(COPIES)


def example_inputs() -> torch.Tensor:
    return noisy_test_split()[0][:TIMED_BATCH]


calibration_inputs = digits_noisy.calibration_inputs  # the first 256 noisy digits: the same in both


def evaluate(model: nn.Module, device: torch.device) -> float:
    """Accuracy on the 45,000 noisy test digits."""
    return digits_noisy.accuracy(model, *noisy_test_split(), device, batch=1000)
