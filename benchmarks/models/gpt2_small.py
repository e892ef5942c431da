"""A small GPT-2 shape built from `transformers.GPT2Config` (no download), for benchmarks/search_quality.py.

4 blocks, n_embd 256, 4 heads, seeded random init (GPT-2's own initialiser, std 0.02). Searchable
layers: the 16 transformers `Conv1D` of the blocks (c_attn, attn.c_proj, c_fc, mlp.c_proj), which int8
takes as the Linear it is. Score: autoprec's default fidelity (mean per-sample cosine of the final
hidden states to the fp32 model's) on 4 seeded random token batches. Latency and memory: one batch of
8 x 128 tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

SEED = 0
LAYERS = 4
EMBED = 256
HEADS = 4
SEQ = 128
BATCH = 8
VOCAB = 8192


class HiddenStates(nn.Module):
    """GPT2Model returning its last hidden state as one tensor."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids=input_ids, use_cache=False).last_hidden_state


def build(layers: int = LAYERS, embed: int = EMBED, heads: int = HEADS, seq: int = SEQ, vocab: int = VOCAB) -> nn.Module:
    """A seeded GPT-2 of this shape returning its last hidden state."""
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=embed, n_layer=layers, n_head=heads,
                        n_inner=4 * embed, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(SEED)
    return HiddenStates(GPT2Model(config)).eval()


def build_model() -> nn.Module:
    return build()


def _tokens(seed: int, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=generator)


def example_inputs() -> torch.Tensor:
    return _tokens(1000, BATCH)


def eval_inputs() -> list[torch.Tensor]:
    return [_tokens(2000 + i, 16) for i in range(4)]
