"""Training with a policy: per-layer autocast over fp32 master weights, int8 as fake quantisation.

    handle = autoprec.prepare_training(model, policy)   # or: with autoprec.training_context(model, policy):
    scaler = autoprec.make_scaler(policy, device)
    optimizer = autoprec.make_optimizer(model, policy)
    for inputs, targets in batches:
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    handle.remove()
    model = autoprec.apply_policy(model, policy)          # real int8 / bf16 for inference

fp32 layers run outside autocast, fp16/bf16 layers inside autocast of that dtype, int8 layers in
fp32 with per-channel symmetric int8 weights and per-tensor int8 activations, rounded in the
forward pass and passed straight through in the backward pass (straight-through estimator).
Imports torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from autoprec.policy import Policy, TrainingSettings
from autoprec.precision.layers import is_linear_like

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def fake_quant_int8(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Symmetric int8 rounding (per-channel along `dim`, else per-tensor) with a straight-through gradient."""
    if dim is None:
        scale = x.detach().abs().amax().clamp(min=1e-12) / 127
    else:
        reduce = [d for d in range(x.dim()) if d != dim]
        scale = x.detach().abs().amax(dim=reduce, keepdim=True).clamp(min=1e-12) / 127
    quantised = (x / scale).round().clamp(-127, 127) * scale
    return x + (quantised - x).detach()


@dataclass
class TrainingHandle:
    """What prepare_training changed; `remove()` restores the model's own forwards."""

    patched: list[tuple[nn.Module, object]] = field(default_factory=list)

    def remove(self) -> None:
        for module, original in self.patched:
            if original is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = original
        self.patched.clear()


def _int8_forward(module: nn.Module):
    if isinstance(module, nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                return nn.functional.linear(fake_quant_int8(x.float(), None),
                                            fake_quant_int8(module.weight, 0), module.bias)
        return forward

    def conv1d_forward(x: torch.Tensor) -> torch.Tensor:  # transformers Conv1D: weight (in, out)
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape[:-1] + (module.weight.shape[1],)
            flat = fake_quant_int8(x.float().reshape(-1, x.shape[-1]), None)
            out = torch.addmm(module.bias, flat, fake_quant_int8(module.weight, 1))
            return out.reshape(shape)
    return conv1d_forward


def _autocast_forward(module: nn.Module, fmt: str, device_type: str):
    original = module.forward
    dtype = _AUTOCAST_DTYPES.get(fmt)

    def forward(*args, **kwargs):
        if dtype is None:  # fp32 layer: outside autocast, inputs back to fp32
            with torch.autocast(device_type, enabled=False):
                args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
                return original(*args, **kwargs)
        with torch.autocast(device_type, dtype=dtype):
            return original(*args, **kwargs)
    return forward


def prepare_training(model: nn.Module, policy: Policy, device_type: str | None = None) -> TrainingHandle:
    """Make `model` (fp32 weights) train under `policy`; the default dtype wraps the whole model."""
    if device_type is None:
        first = next(iter(model.parameters()), None)
        device_type = first.device.type if first is not None else "cpu"
    handle = TrainingHandle()
    targets: list[tuple[nn.Module, str]] = [(model.get_submodule(n), f) for n, f in policy.layers.items()]
    targets.append((model, policy.default))
    for module, fmt in targets:
        original = module.__dict__.get("forward")
        if fmt in ("fp8", "int4"):  # no fake-quantized form here: training it as fp32 would measure the wrong thing
            raise ValueError(f"{fmt} layers cannot be fine-tuned by autoprec; leave {fmt} out of a training space")
        if fmt == "int8":
            if not is_linear_like(module):
                raise ValueError(f"int8 training needs a Linear-like layer, not {type(module).__name__}")
            module.forward = _int8_forward(module)
        elif module is model and fmt == "fp32":
            continue
        else:
            module.forward = _autocast_forward(module, fmt, device_type)
        handle.patched.append((module, original))
    return handle


@contextlib.contextmanager
def training_context(model: nn.Module, policy: Policy) -> Iterator[nn.Module]:
    handle = prepare_training(model, policy)
    try:
        yield model
    finally:
        handle.remove()


class StaticLossScaler:
    """A fixed loss scale with GradScaler's interface: steps whose gradients overflow are skipped."""

    def __init__(self, scale: float) -> None:
        self._scale = float(scale)
        self.skipped_last = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self._scale)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.unscale_(optimizer)
        finite = all(torch.isfinite(p.grad).all() for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None)
        self.skipped_last = not finite
        if finite:
            optimizer.step()

    def update(self) -> None:
        pass

    def get_scale(self) -> float:
        return self._scale


def make_scaler(settings: TrainingSettings | Policy, device: str | torch.device):
    settings = settings.training if isinstance(settings, Policy) else settings
    if settings is None:
        raise ValueError("the policy has no training section")
    if settings.dynamic_loss_scale:
        return torch.amp.GradScaler(torch.device(device).type, init_scale=settings.loss_scale)
    return StaticLossScaler(settings.loss_scale)


def make_optimizer(model: nn.Module, settings: TrainingSettings | Policy) -> torch.optim.Optimizer:
    settings = settings.training if isinstance(settings, Policy) else settings
    if settings is None:
        raise ValueError("the policy has no training section")
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.learning_rate, momentum=0.9)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.learning_rate)
    raise ValueError(f"optimizer {settings.optimizer!r}: use adamw or sgd")


__all__ = ["StaticLossScaler", "TrainingHandle", "fake_quant_int8", "make_optimizer", "make_scaler",
           "prepare_training", "training_context"]
