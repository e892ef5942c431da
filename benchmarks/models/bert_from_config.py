"""A BERT encoder built from `transformers.BertConfig` (no download), for benchmarks/bert24_growth.py.

hidden 256, 4 heads, intermediate 1024, no pooler, seeded random init; the layer count is the
argument of `make(layers)`. bert6.py and bert24.py are the model.py files autoprec loads (6 Linear
layers per block: 36 and 144 searchable layers). Score: autoprec's default fidelity on the last
hidden state over 4 seeded random token batches of 16 x 64; latency and memory: one batch of 8 x 64.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

SEED = 0
HIDDEN = 256
HEADS = 4
INTERMEDIATE = 1024
SEQ = 64
BATCH = 8
VOCAB = 8192


class LastHidden(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids=input_ids).last_hidden_state


def make(layers: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                        intermediate_size=INTERMEDIATE, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(SEED)
    return LastHidden(BertModel(config, add_pooling_layer=False)).eval()


def tokens(seed: int, batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def example_inputs() -> torch.Tensor:
    return tokens(1000, BATCH)


def eval_inputs() -> list[torch.Tensor]:
    return [tokens(2000 + i, 16) for i in range(4)]
