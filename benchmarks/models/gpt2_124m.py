"""GPT-2 at its 124M shape (12 blocks, n_embd 768, 12 heads) from `transformers.GPT2Config`, seeded random
init (no download), for the fp8 rows of benchmarks/runtime_ratios.py on a GPU. Searchable layers: the 48
transformers `Conv1D` of the blocks. Score: fidelity of the final hidden states. Latency: 16 x 256 tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

SEQ, BATCH, VOCAB = 256, 16, 50257


class HiddenStates(nn.Module):
    """GPT2Model returning its last hidden state as one tensor."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids=input_ids, use_cache=False).last_hidden_state


def build_model() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_positions=SEQ, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    torch.manual_seed(0)
    return HiddenStates(GPT2Model(config)).eval()


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1000))
