"""A small CNN on scikit-learn's handwritten digits (8 x 8 images, real labels, no download).

`build_model()` trains the network on the CPU in a few seconds with a fixed seed (once per process,
then cached), and `evaluate(model, device)` returns its real accuracy on the held-out test images, so
the search trades real task accuracy (in steps of 1/450) against latency and memory.

The data and training helpers (`digits`, `batches`, `fit`) are plain functions, so that a training-mode
version of this study can reuse them for `train_batches()` and `loss()`.
Searchable: two Conv2d (fp32 / bf16 / static int8 on the CPU, calibrated on example_inputs(); no int8 in
training mode) and two Linear layers (fp32 / bf16 / int8).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

SEED = 0
EPOCHS = 12
BATCH = 64
LEARNING_RATE = 2e-3
_DATA: dict[str, torch.Tensor] = {}
_TRAINED: dict[str, torch.Tensor] = {}


def digits() -> dict[str, torch.Tensor]:
    """The 1797 digits as float images in [0, 1] (N, 1, 8, 8) and int64 labels; a fixed stratified 75/25 split."""
    if not _DATA:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(data.target, dtype=torch.int64)
        train, test = train_test_split(range(len(labels)), test_size=0.25, random_state=SEED, stratify=data.target)
        _DATA.update(x_train=images[train], y_train=labels[train], x_test=images[test], y_test=labels[test])
    return _DATA


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = BATCH, seed: int | None = SEED) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches; shuffled with `seed`, in order when seed is None."""
    order = torch.arange(len(y)) if seed is None else torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(y), batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]


def new_network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def fit(model: nn.Module, epochs: int = EPOCHS, learning_rate: float = LEARNING_RATE, seed: int = SEED) -> nn.Module:
    """Train `model` on the training split with Adam and cross-entropy, on one CPU thread.

    One thread: the steps are tiny, so a second thread only adds waiting (and on a busy machine a lot
    of it), and the result is then the same bit for bit whatever the machine's thread count.
    """
    data = digits()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for epoch in range(epochs):
            for images, labels in batches(data["x_train"], data["y_train"], seed=seed + epoch):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(images), labels).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def accuracy(model: nn.Module, device: torch.device | str = "cpu", split: str = "test") -> float:
    data = digits()
    correct = 0
    with torch.no_grad():
        for images, labels in batches(data[f"x_{split}"], data[f"y_{split}"], batch_size=256, seed=None):
            correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
    return correct / len(data[f"y_{split}"])


def build_model() -> nn.Module:
    if not _TRAINED:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            _TRAINED.update(fit(new_network()).state_dict())
    model = new_network()
    model.load_state_dict(_TRAINED)
    return model.eval()


def example_inputs() -> torch.Tensor:
    return digits()["x_test"][:64]


def evaluate(model: nn.Module, device: torch.device) -> float:
    """Accuracy on the 450 held-out test digits."""
    return accuracy(model, device)


# Training mode (with a space that has a `training:` section, e.g. studies/digits_cnn/train_space.yaml):
# each trial fine-tunes the pre-trained network on the training split under its candidate policy.
TRAIN_BATCH = 256  # large enough that bf16 autocast steps are faster than fp32 on the CPU


def train_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = digits()
    return list(batches(data["x_train"], data["y_train"], batch_size=TRAIN_BATCH, seed=SEED + 100))


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs.float(), targets)
