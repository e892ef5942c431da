"""A tiny keyword-input spec: dict example_inputs, model(**d); returns a dict of outputs."""

import torch
from torch import nn


class Keyed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, input_ids: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.tanh(self.proj(self.embed(input_ids))) * scale
        return {"ids": input_ids, "logits": self.out(hidden)}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Keyed()


def example_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 20, (2, 6), generator=gen), "scale": torch.ones(1)}
