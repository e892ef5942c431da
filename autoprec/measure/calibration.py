"""The calibration of a model.py's static int8 layers, computed once per search from its batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from autoprec.errors import PolicyError
from autoprec.policy import Policy
from autoprec.precision.apply import needs_calibration
from autoprec.precision.calibration import Calibration, calibrate, calibrated_layers
from autoprec.model.model_file import ModelSpec, move_inputs, one_line


def spec_calibration(spec: ModelSpec, model: nn.Module, device: torch.device,
                     formats: Iterable[str] | None = None) -> Calibration | None:
    """Input ranges of every layer of the fp32 `model` that may take static int8 on `device` (among
    `formats`, where given), observed on the spec's calibration batches; None when no layer can (nothing is
    run then)."""
    names = calibrated_layers(model, device, formats)
    if not names:
        return None
    source = "calibration_inputs" if spec.calibration_inputs is not None else \
        "eval_inputs" if spec.eval_inputs is not None else "example_inputs"
    batches = [move_inputs(batch, device) for batch in spec.calibration_batches()]
    try:
        return calibrate(model, names, batches)
    except PolicyError:
        raise
    except Exception as exc:
        raise spec.error(source, one_line(f"the fp32 model fails on them: {type(exc).__name__}: {exc}"),
                         "make every batch match what build_model()'s forward takes") from exc


def policy_recipes(model: nn.Module, calibration: Calibration | None, policy: Policy) -> dict[str, str] | None:
    """The calibration recipe of each of `policy`'s static int8 layers of the fp32 `model`, as a candidate is
    built with `calibration` (the policy file records them); None where it has none."""
    if calibration is None:
        return None
    overrides = {name: fmt for name, fmt in policy.layers.items() if fmt != policy.default}
    static = needs_calibration(model, overrides)
    return {name: calibration.recipes[name] for name in static if name in calibration.recipes} or None
