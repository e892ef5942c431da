"""A tiny seeded MLP for report tests: refuses fp16 on purpose, so a study of it has a failed trial.

Score: cosine similarity of the outputs to the fp32 model's (computed here, in `evaluate`).
"""

import torch
from torch import nn

_X = torch.randn(32, 32, generator=torch.Generator().manual_seed(2))
_REFERENCE: list[torch.Tensor] = []


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))


def example_inputs():
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(1))


def evaluate(model, device):
    if any(p.dtype == torch.float16 for p in model.parameters()):
        raise RuntimeError("report_mlp refuses fp16 weights on purpose")
    with torch.no_grad():
        if not _REFERENCE:
            _REFERENCE.append(build_model()(_X))
        out = model(_X.to(device)).float().cpu()
    return float(nn.functional.cosine_similarity(out, _REFERENCE[0], dim=1).mean())
