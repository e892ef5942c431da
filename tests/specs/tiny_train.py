"""A tiny classifier with real (synthetic, seeded) labels, for training-mode searches."""

import torch
from torch import nn

_G = torch.Generator().manual_seed(0)
_X = torch.randn(384, 16, generator=_G)
_TEACHER = torch.randn(16, 4, generator=_G)
_Y = (_X @ _TEACHER).argmax(1)


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def example_inputs():
    return _X[:64]


def train_batches():
    return [(_X[i:i + 32], _Y[i:i + 32]) for i in range(0, 256, 32)]


def loss(outputs, targets):
    return nn.functional.cross_entropy(outputs.float(), targets)


def evaluate(model, device):
    with torch.inference_mode():
        pred = model(_X[256:].to(device)).argmax(1).cpu()
    return float((pred == _Y[256:]).float().mean())
