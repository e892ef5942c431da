"""Four small Linear layers beside a fixed fp32 computation that takes nearly all the time, scored by a
discrete metric that loses a step for every layer whose output deviates from fp32's: one int8 layer
holds a budget of 1.5 steps, any two already miss, and no mix of int8 layers can be much faster than
fp32 (the layers are about 2% of the time): the case where a search should stop and say why.

score = 0.937 - STEP x (searchable layers whose output, on the input they were given, differs from
the fp32 layer's on that same input by more than THRESHOLD relative), on fixed inputs.
"""

import torch
from torch import nn
from torch.nn import functional as F

STEP = 1 / 1000
BASE = 0.937  # 937/1000: the scores lie on a lattice of 1/1000
THRESHOLD = 1e-4
LAYERS = 4
_REFERENCE: list[nn.Module] = []


class TwoMiss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(LAYERS))
        self.register_buffer("mix", torch.randn(512, 512, generator=torch.Generator().manual_seed(3)) / 23)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return x + torch.tanh(self.mix @ self.mix).mean()  # the fixed work: most of the time, no layer's


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return TwoMiss()


def example_inputs() -> torch.Tensor:
    return torch.randn(64, 64, generator=torch.Generator().manual_seed(1))


def evaluate(model: nn.Module, device: torch.device) -> float:
    if not _REFERENCE:
        _REFERENCE.append(build_model().eval())
    reference = _REFERENCE[0]
    deviating: set[int] = set()
    hooks = []
    for i in range(LAYERS):
        def hook(_mod: nn.Module, args: tuple, output: torch.Tensor, i: int = i) -> None:
            fp32 = reference.layers[i]
            x = args[0].detach().float().cpu()
            expected = F.linear(x, fp32.weight, fp32.bias)
            if (output.detach().float().cpu() - expected).norm() > THRESHOLD * expected.norm():
                deviating.add(i)
        hooks.append(model.get_submodule(f"layers.{i}").register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.randn(64, 64, generator=torch.Generator().manual_seed(2)).to(device))
    finally:
        for h in hooks:
            h.remove()
    return BASE - STEP * len(deviating)
