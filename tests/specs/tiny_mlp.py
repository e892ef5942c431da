"""A tiny seeded MLP for search tests: three Linear layers, default fidelity score."""

import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))


def example_inputs():
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(1))


def eval_inputs():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(32, 32, generator=g) for _ in range(2)]
