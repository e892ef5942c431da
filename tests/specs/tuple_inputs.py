"""A tiny two-input CNN spec (Conv1d + Conv2d + Linear): tuple example_inputs, model(*t)."""

import torch
from torch import nn


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 + 4 * 4 * 4, 5)

    def forward(self, seq: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(seq)).flatten(1)
        b = torch.relu(self.conv2(image)).flatten(1)
        return self.head(torch.cat([a, b], dim=1))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return TwoBranch()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, generator=gen), torch.randn(2, 1, 4, 4, generator=gen)
