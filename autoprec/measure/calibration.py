"""The calibration of a model.py's static int8 layers, computed once per search from its batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from autoprec.errors import PolicyError
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
