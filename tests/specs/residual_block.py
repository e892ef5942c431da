"""Two small pre-norm residual blocks (LayerNorm, Linear-GELU-Linear), seeded: the profile tests' model."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.blocks = nn.Sequential(Block(32), Block(32))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def build_model():
    torch.manual_seed(0)
    return Net()


def example_inputs():
    return torch.randn(32, 10, 16, generator=torch.Generator().manual_seed(1))
