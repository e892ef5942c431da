"""GPT-2 at its 124M shape (12 blocks, n_embd 768, 12 heads; gpt2_small.py's model at full size), seeded
random init (no download), for the fp8 rows of benchmarks/runtime_ratios.py on a GPU. Searchable layers:
the 48 transformers `Conv1D` of the blocks. Score: fidelity of the final hidden states. Latency: 16 x 256
tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpt2_small  # noqa: E402

SEQ, BATCH, VOCAB = 256, 16, 50257


def build_model() -> nn.Module:
    return gpt2_small.build(layers=12, embed=768, heads=12, seq=SEQ, vocab=VOCAB)


def example_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1000))
