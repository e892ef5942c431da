"""Fine-tune one candidate: the training loop a trial runs in training mode (no Optuna here)."""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from autoprec.policy import Policy, TrainingSettings
from autoprec.precision.layers import is_searchable
from autoprec.measure.timing import PairedTiming, TimingSettings, cpu_activation_peak_bytes, paired_latency
from autoprec.training import make_optimizer, make_scaler, prepare_training
from autoprec.model.model_file import ModelSpec, call_model, move_inputs

MAX_CURVE_POINTS = 20


class TrainingDiverged(Exception):
    pass


@dataclass
class FineTuneResult:
    steps: int
    skipped_steps: int  # optimizer steps the loss scaler skipped because gradients overflowed
    step_ms: float  # median wall time of one step (forward, backward, optimizer)
    peak_bytes: int | None  # parameters + gradients + optimizer state + peak activations of one step
    final_loss_scale: float
    losses: list[float] = field(default_factory=list)  # at most MAX_CURVE_POINTS, evenly spaced
    zero_grad_fraction: dict[str, float] = field(default_factory=dict)  # per layer, first step
    # one step under the policy / one fp32 step, timed interleaved (ABBA) after fine-tuning: what
    # step_ms cannot say on a busy machine, where whole-trial medians drift between trials
    step_ratio: float | None = None
    step_ratio_ci: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = sum(p.numel() * p.element_size() * (2 if p.grad is not None else 1) for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def load_train_batches(spec: ModelSpec) -> list[tuple[Any, Any]]:
    """The spec's `train_batches()` as a list of (inputs, targets) pairs, or its one-line error."""
    try:
        batches = list(spec.train_batches())
    except Exception as exc:
        raise spec.error("train_batches", f"raised {type(exc).__name__}: {exc}") from exc
    if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
        raise spec.error("train_batches", "must give at least one (inputs, targets) pair")
    return batches


def paired_step_ratio(spec: ModelSpec, fp32_model: nn.Module, policy: Policy, settings: TrainingSettings,
                      device: torch.device, timing: TimingSettings, batch: tuple[Any, Any]) -> PairedTiming:
    """Time one training step under `policy` against one fp32 training step, interleaved.

    Both run on their own copy of `fp32_model` (left unchanged) with their own optimizer and
    scaler, on `batch`: forward, backward, optimizer step, as in fine_tune."""
    assert spec.loss is not None
    inputs, targets = move_inputs(batch[0], device), move_inputs(batch[1], device)

    def stepper(use_policy: bool):
        model = copy.deepcopy(fp32_model).train()
        if use_policy:
            prepare_training(model, policy, device.type)
        optimizer = make_optimizer(model, settings)
        scaler = make_scaler(settings, device)  # the same optimizer and scaler: only the formats differ

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = spec.loss(call_model(model, inputs), targets)
            scaler.scale(loss.float()).backward()
            scaler.step(optimizer)
            scaler.update()
        return step
    return paired_latency(stepper(True), stepper(False), device, timing)


def fine_tune(spec: ModelSpec, model: nn.Module, policy: Policy, settings: TrainingSettings,
              device: torch.device, seed: int = 0, batches: list[tuple[Any, Any]] | None = None) -> FineTuneResult:
    """Train `model` (fp32 weights, on `device`) in place for `settings.steps` steps under `policy`,
    on `batches` (default: load_train_batches(spec))."""
    assert spec.train_batches is not None and spec.loss is not None
    torch.manual_seed(seed)
    if batches is None:
        batches = load_train_batches(spec)
    steps = settings.steps or len(batches)
    model.train()
    optimizer = make_optimizer(model, settings)
    scaler = make_scaler(settings, device)
    handle = prepare_training(model, policy, device.type)
    layers = [n for n, m in model.named_modules() if n and is_searchable(m)]
    losses: list[float] = []
    times: list[float] = []
    skipped = 0
    zero_fraction: dict[str, float] = {}
    peak = None
    try:
        for step, (inputs, targets) in enumerate(itertools.islice(itertools.cycle(batches), steps)):
            inputs, targets = move_inputs(inputs, device), move_inputs(targets, device)

            def one_step() -> float:
                nonlocal skipped
                optimizer.zero_grad(set_to_none=True)
                loss = spec.loss(call_model(model, inputs), targets)
                scaler.scale(loss.float()).backward()
                if step == 0:
                    for name in layers:
                        grad = model.get_submodule(name).weight.grad
                        if grad is not None:
                            zero_fraction[name] = float((grad == 0).float().mean())
                before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                if getattr(scaler, "skipped_last", False) or scaler.get_scale() < before:
                    skipped += 1
                return float(loss.detach())

            started = time.perf_counter()
            if step == steps - 1 and device.type == "cpu":
                holder: list[float] = []
                activations = cpu_activation_peak_bytes(lambda: holder.append(one_step()))
                loss_value = holder[0]
                peak = activations + _state_bytes(model, optimizer)
            else:
                if device.type == "cuda" and step == steps - 1:
                    torch.cuda.reset_peak_memory_stats(device)
                loss_value = one_step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    if step == steps - 1:
                        peak = torch.cuda.max_memory_allocated(device)
            times.append(time.perf_counter() - started)
            losses.append(loss_value)
    finally:
        handle.remove()
        model.eval()
    if not torch.isfinite(torch.tensor(losses[-1])):
        raise TrainingDiverged(f"non-finite loss at the last of {steps} steps that the loss scaler could not recover")
    stride = max(1, len(losses) // MAX_CURVE_POINTS)
    return FineTuneResult(steps=steps, skipped_steps=skipped,
                          step_ms=1000 * statistics.median(times[1:] or times), peak_bytes=peak,
                          final_loss_scale=float(scaler.get_scale()), losses=losses[::stride][:MAX_CURVE_POINTS],
                          zero_grad_fraction=zero_fraction)
