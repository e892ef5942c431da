"""A tiny MLP spec: tensor example_inputs, seeded eval_inputs, default fidelity score."""

import torch
from torch import nn


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 8))


def example_inputs() -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


def eval_inputs():
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(4, 16, generator=gen) for _ in range(3)]
