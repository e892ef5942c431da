"""The default score's unit: how close an output is to the fp32 output, sample by sample."""

from __future__ import annotations

import torch


def sample_cosines(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each sample's output to the reference's, in float64 (float32 resolves a
    cosine only to ~6e-8, the size of a one-layer bf16 drop).

    Where a sample's output is one number (a regression or a logit of shape (N,) or (N, 1)), its cosine
    is only its sign's agreement, 1 for any rounding: there the batch's outputs are compared as one
    vector instead (one cosine for the batch)."""
    a, b = out.reshape(out.shape[0], -1).double(), ref.reshape(ref.shape[0], -1).double()
    if a.shape[1] == 1:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
