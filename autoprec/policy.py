"""The policy file: which format each layer takes, as versioned JSON, and `apply_policy`.

Imports torch only (never Optuna, SQLAlchemy or pandas): this is what users ship with their model.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprec.errors import PolicyError
from autoprec.output import check_output, write_output
from autoprec.precision import DTYPES, FLOAT_DTYPES, Calibration, apply_formats
from autoprec.precision.calibration import DEFAULT_RECIPE, RECIPES

RUNTIMES = ("eager", "compiled", "openvino")  # where a policy was timed: the runtimes of autoprec.measure.runtime


POLICY_FORMAT = "autoprec.policy"
POLICY_VERSION = 1
_FIELDS = {"format", "version", "default", "layers", "calibration", "training", "measured", "model"}
# What `autoprec export` writes under 'measured' (autoprec.results.frames.policy_of); checked at load, so a
# hand-edited file is refused in one line, not after a whole measurement. Other keys are kept unchecked.
_MEASURED_NUMBERS = ("score", "latency_ms", "memory_bytes", "peak_bytes", "score_drop", "reference_score",
                     "reference_latency_ms", "latency_ratio", "retimed_ratio", "compile_s")
_MEASURED_TEXTS = ("device", "device_name", "cpu_allocator", "torch", "runtime", "study")
_TRAINING_FIELDS = {"loss_scale": "number", "dynamic_loss_scale": "bool", "learning_rate": "number",
                    "steps": "int", "optimizer": "str"}


@dataclass
class TrainingSettings:
    loss_scale: float = 1.0
    dynamic_loss_scale: bool = True
    learning_rate: float = 1e-4
    steps: int | None = None
    optimizer: str = "adamw"

    def to_json(self) -> dict[str, Any]:
        data = {"loss_scale": self.loss_scale, "dynamic_loss_scale": self.dynamic_loss_scale,
                "learning_rate": self.learning_rate, "optimizer": self.optimizer}
        if self.steps is not None:
            data["steps"] = self.steps
        return data


@dataclass
class Policy:
    """Per-layer formats: `layers` maps `named_modules()` names to fp32/fp16/bf16/int8/fp8;
    everything else runs in `default`."""

    layers: dict[str, str] = field(default_factory=dict)
    default: str = "fp32"
    # the calibration recipe of each static int8 layer (one of RECIPES); a layer not named: DEFAULT_RECIPE
    calibration: dict[str, str] | None = None
    training: TrainingSettings | None = None
    measured: dict[str, Any] | None = None
    model: dict[str, str] | None = None

    def __post_init__(self) -> None:
        validate_formats(self.default, self.layers, where="policy")

    @property
    def runtime(self) -> str:
        """How the policy was measured: "eager", or "compiled" (serve it under torch.compile)."""
        return str((self.measured or {}).get("runtime", "eager"))

    def counts(self) -> dict[str, int]:
        """How many listed layers take each format."""
        return {d: sum(1 for v in self.layers.values() if v == d) for d in DTYPES}

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": POLICY_FORMAT, "version": POLICY_VERSION,
                                "default": self.default, "layers": dict(self.layers)}
        if self.calibration:
            data["calibration"] = dict(self.calibration)
        if self.training is not None:
            data["training"] = self.training.to_json()
        if self.measured is not None:
            data["measured"] = self.measured
        if self.model is not None:
            data["model"] = self.model
        return data

    def to_text(self) -> str:
        """The policy file's text."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the policy file (through a symlink; never over a SQLite database; a regular file is
        replaced at once, never left half-written)."""
        write_output(check_output(path, force=True), self.to_text())
        return Path(path)


def validate_formats(default: Any, layers: Any, where: str) -> None:
    if not isinstance(default, str) or default not in FLOAT_DTYPES:
        raise PolicyError(f"{where}: field 'default' is {default!r}; use one of {', '.join(FLOAT_DTYPES)}")
    if not isinstance(layers, dict):
        raise PolicyError(f"{where}: field 'layers' must be an object of layer name -> format, "
                          f"not {type(layers).__name__}")
    for name, fmt in layers.items():
        if not isinstance(name, str) or not name:
            raise PolicyError(f"{where}: field 'layers' has an empty or non-string layer name {name!r}")
        if not isinstance(fmt, str) or fmt not in DTYPES:
            raise PolicyError(f"{where}: layer {name!r} has format {fmt!r}; use one of {', '.join(DTYPES)}")


def _check_type(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    if kind == "str":
        return isinstance(value, str) and bool(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an integer too large for a float (JSON allows any number of digits)
        return False


def _parse_calibration(data: Any, layers: dict[str, Any], where: str) -> dict[str, str]:
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: field 'calibration' must be an object of layer name -> recipe "
                          f"({', '.join(RECIPES)}), not {type(data).__name__}")
    for name, recipe in data.items():
        if name not in layers:
            raise PolicyError(f"{where}: field 'calibration' names layer {name!r}, which 'layers' does not list; "
                              "remove it or add the layer")
        if recipe not in RECIPES:
            raise PolicyError(f"{where}: field 'calibration.{name}' is {_shown(recipe)}; use one of {', '.join(RECIPES)}")
    return dict(data)


def _parse_training(data: Any, where: str) -> TrainingSettings:
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: field 'training' must be an object, not {type(data).__name__}")
    for key, value in data.items():
        if key not in _TRAINING_FIELDS:
            raise PolicyError(f"{where}: unknown field 'training.{key}'; known: {', '.join(_TRAINING_FIELDS)}")
        kind = _TRAINING_FIELDS[key]
        if not _check_type(value, kind):
            want = {"number": "a positive finite number", "bool": "true or false",
                    "int": "a positive integer", "str": "a non-empty string"}[kind]
            raise PolicyError(f"{where}: field 'training.{key}' is {value!r}; it must be {want}")
    return TrainingSettings(**data)


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and abs(value) < 1e18  # no measurement comes near: a hand-edited file
    except OverflowError:  # an integer too large for a float
        return False


def _check_measured(measured: dict[str, Any], where: str) -> None:
    """The fields `autoprec apply` prints: numbers finite, texts strings, the thread count a count."""
    for key in _MEASURED_NUMBERS:
        value = measured.get(key)
        if value is not None and not _finite_number(value):
            raise PolicyError(f"{where}: field 'measured.{key}' is {_shown(value)}; it must be a finite number "
                              "(under 1e18) or null (re-export the policy with `autoprec export`)")
    for key in _MEASURED_TEXTS:
        value = measured.get(key)
        if value is not None and not (isinstance(value, str) and len(value) <= 200):
            raise PolicyError(f"{where}: field 'measured.{key}' is {_shown(value)}; it must be a short string "
                              "or null (re-export the policy with `autoprec export`)")
    threads, trial = measured.get("threads"), measured.get("trial")
    if threads is not None and not ((isinstance(threads, str) and threads.isdigit() and len(threads) <= 6)
                                    or (_check_type(threads, "int") and threads < 10**6)):
        raise PolicyError(f"{where}: field 'measured.threads' is {_shown(threads)}; it must be a thread count "
                          "or null (re-export the policy with `autoprec export`)")
    if trial is not None and (isinstance(trial, bool) or not isinstance(trial, int) or not 0 <= trial < 10**12):
        raise PolicyError(f"{where}: field 'measured.trial' is {_shown(trial)}; it must be a trial number or null")


def _shown(value: Any) -> str:
    """A value for an error line: its repr, cut short (a 300-digit number or a long string fits on a line)."""
    big = isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30
    text = "a number of more than 30 digits" if big else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def policy_from_json(data: Any, where: str = "policy") -> Policy:
    """Validate a decoded policy document; every failure names the offending entry."""
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: a policy is a JSON object, not {type(data).__name__}")
    for key in data:
        if key not in _FIELDS:
            raise PolicyError(f"{where}: unknown field {key!r}; known fields: {', '.join(sorted(_FIELDS))}")
    if data.get("format") != POLICY_FORMAT:
        raise PolicyError(f"{where}: field 'format' is {data.get('format')!r}, expected {POLICY_FORMAT!r} "
                          "(is this an autoprec policy file?)")
    version = data.get("version")
    if version != POLICY_VERSION or not isinstance(version, int) or isinstance(version, bool):
        raise PolicyError(f"{where}: field 'version' is {version!r}; this autoprec reads version "
                          f"{POLICY_VERSION} (upgrade autoprec for newer files)")
    if "layers" not in data:
        raise PolicyError(f"{where}: field 'layers' is missing; add an object of layer name -> format")
    validate_formats(data.get("default", "fp32"), data["layers"], where)
    calibration = _parse_calibration(data["calibration"], data["layers"], where) if "calibration" in data else None
    training = _parse_training(data["training"], where) if "training" in data else None
    measured = data.get("measured")
    if measured is not None and not isinstance(measured, dict):
        raise PolicyError(f"{where}: field 'measured' must be an object, not {type(measured).__name__}")
    if measured is not None:
        _check_measured(measured, where)
    if measured is not None and measured.get("runtime", "eager") not in RUNTIMES:
        raise PolicyError(f"{where}: field 'measured.runtime' is {measured['runtime']!r}; use one of "
                          f"{', '.join(RUNTIMES)}")
    model = data.get("model")
    if model is not None and not (isinstance(model, dict) and all(isinstance(v, str) for v in model.values())):
        raise PolicyError(f"{where}: field 'model' must be an object of strings (class, fingerprint)")
    return Policy(layers=dict(data["layers"]), default=data.get("default", "fp32"), calibration=calibration,
                  training=training, measured=measured, model=model)


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PolicyError(f"{path}: policy file not found; write one with `autoprec export`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or an int over 4300 digits
        raise PolicyError(f"{path}: not JSON ({exc}); a policy file is the JSON `autoprec export` writes") from None
    return policy_from_json(data, where=str(path))


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's structure: module names and classes, parameter names, shapes, dtypes."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"m {name} {type(module).__name__}\n".encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"p {name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
    return "sha256:" + digest.hexdigest()


def apply_policy(model: nn.Module, policy: Policy | str | Path, device: str | torch.device | None = None,
                 calibration: Iterable[Any] | Calibration | None = None, runtime: str | None = None) -> nn.Module:
    """Apply a policy (object or file path) to an fp32 model in place and return it, in eval mode.

    `device` defaults to where the model's parameters are. `calibration`: the batches (each a tensor,
    tuple or dict, as model.py's inputs) that static int8 layers observe their input ranges on, run
    through the fp32 model first; needed only when the policy gives a convolution int8. Pass the
    batches the search calibrated on (model.py's calibration_inputs(), else eval_inputs(), else
    [example_inputs()]) to get the model it measured. `runtime` defaults to the one the policy was
    measured in (`measured.runtime`): a "compiled" policy gets the kernels that are fastest under
    torch.compile (int8 Linear on a VNNI CPU: torchao's); compile the result yourself,
    `torch.compile(apply_policy(model, "policy.json"))`. Nothing here compiles.
    """
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    expected = (policy.model or {}).get("fingerprint")
    if expected and expected != model_fingerprint(model):
        warnings.warn(f"this policy was measured on a model with a different structure "
                      f"({policy.model.get('class', '?')}); layer names are checked, timings may differ",
                      stacklevel=2)
    # a file from before recipes were chosen per layer names none: its layers take the one recipe there was
    recipes = {name: (policy.calibration or {}).get(name, DEFAULT_RECIPE) for name in policy.layers}
    return apply_formats(model, policy.layers, policy.default, device, calibration=calibration,
                         runtime=runtime or policy.runtime, recipes=recipes)
