"""A seeded MLP whose evaluate() is a known stepwise, concave function of output fidelity.

score = 1 - STEP * floor(COEF * sqrt(fidelity drop) / STEP), the fidelity drop being 1 - mean cosine of
the outputs to the fp32 model's on fixed inputs: like an accuracy over 1/STEP samples, one step lost as
soon as the outputs move a little, far more than a linear map from the all-int8 drop would say.
"""

import math

import torch
from torch import nn

STEP = 1 / 1000
COEF = 0.5
WIDTH = 256
OUTLIERS = (1.0, 64.0, 4.0, 256.0, 16.0, 128.0, 32.0)  # per Linear: one large input column spreads int8's error
_REFERENCE: list[torch.Tensor] = []


def build_model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(6):
        layers += [nn.Linear(32 if i == 0 else WIDTH, WIDTH), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 16))
    with torch.no_grad():
        for layer, outlier in zip((m for m in model if isinstance(m, nn.Linear)), OUTLIERS):
            layer.weight[:, 0] *= outlier
    return model


def example_inputs() -> torch.Tensor:
    return torch.randn(128, 32, generator=torch.Generator().manual_seed(1))


def _inputs() -> torch.Tensor:
    return torch.randn(256, 32, generator=torch.Generator().manual_seed(2))


def evaluate(model: nn.Module, device: torch.device) -> float:
    if not _REFERENCE:
        with torch.no_grad():
            _REFERENCE.append(build_model()(_inputs()).double())
    with torch.no_grad():
        out = model(_inputs().to(device)).double().cpu()
    cos = nn.functional.cosine_similarity(out, _REFERENCE[0], dim=1).mean().item()
    drop = max(0.0, 1.0 - cos)
    return 1.0 - STEP * math.floor(COEF * math.sqrt(drop) / STEP + 1e-9)
