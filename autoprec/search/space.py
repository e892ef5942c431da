"""Search-space files (YAML) -> the formats each layer may take.

Format, documented in docs/search-spaces.md:

    name: cpu
    dtypes: [fp32, bf16, int8]          # formats any layer may take
    default_dtypes: [fp32, bf16]        # formats for everything that is not a searchable layer
    layers:
      classes: [Linear, Conv1d, Conv2d, Conv3d, Conv1D]   # searchable classes
      exclude: ["*pooler*"]             # fnmatch patterns on layer names, left in the default
    rules:                              # first matching rule sets a layer's formats
      - {match: "*output.dense", dtypes: [fp32, bf16]}
      - {class: Conv2d, dtypes: [fp32, bf16]}
    training: {...}                     # training knobs, see autoprec/training settings

Formats a layer cannot run on the device (int8 convolutions on CUDA, fp8 off recent GPUs) are dropped
from its choices here, so the sampler never proposes them; so are static int8 convolutions in a
training space (training fine-tunes int8 as fake-quantised Linear layers only).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from autoprec.errors import SpaceError
from autoprec.precision import DTYPES, FLOAT_DTYPES, HANDLERS, LayerInfo, searchable_layers
from autoprec.precision.apply import layer_format_reason

SPACES_DIR = Path(__file__).resolve().parent / "spaces"  # package data (pyproject.toml)
_KNOWN_CLASSES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D")
_TOP_FIELDS = {"name", "description", "dtypes", "default_dtypes", "layers", "rules", "training"}
_TRAINING_FIELDS = {"enabled", "steps", "optimizer", "learning_rate", "loss_scale", "dynamic_loss_scale"}


@dataclass(frozen=True)
class Rule:
    dtypes: tuple[str, ...]
    match: str | None = None
    cls: str | None = None

    def applies(self, layer: LayerInfo) -> bool:
        return (self.match is None or fnmatch.fnmatchcase(layer.name, self.match)) and \
            (self.cls is None or layer.cls == self.cls)


@dataclass(frozen=True)
class SearchSpace:
    name: str = "default"
    dtypes: tuple[str, ...] = DTYPES
    default_dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")
    classes: tuple[str, ...] = _KNOWN_CLASSES
    exclude: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    training: dict[str, Any] = field(default_factory=dict)
    source: str = "<built-in default>"

    @property
    def trains(self) -> bool:
        return bool(self.training.get("enabled"))

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        return [layer for layer in searchable_layers(model)
                if layer.cls in self.classes and not any(fnmatch.fnmatchcase(layer.name, p) for p in self.exclude)]

    def choices(self, model: nn.Module, device: torch.device) -> dict[str, tuple[str, ...]]:
        """Layer name -> formats the sampler may give it (device-supported only, in DTYPES order)."""
        modules = dict(model.named_modules())
        result = {}
        for layer in self.layers(model):
            allowed = self.dtypes
            for rule in self.rules:
                if rule.applies(layer):
                    allowed = rule.dtypes
                    break
            module = modules[layer.name]
            # training mode fine-tunes int8 as fake-quantised Linear only: no calibrated (static) formats
            # (the eager runtime's kernels: a study's choices are fixed before its runtime is known)
            ok = tuple(d for d in DTYPES if d in allowed and layer_format_reason(model, layer.name, d, device) is None
                       and not (self.trains and HANDLERS[d].needs_calibration(module)))
            if ok:
                result[layer.name] = ok
        return result

    def dropped_formats(self, model: nn.Module, device: torch.device) -> dict[str, str]:
        """Formats the space names that no layer of `model` may take on `device`, each with why (the
        reason its first layer gave), in DTYPES order."""
        named = set(self.dtypes).union(*(rule.dtypes for rule in self.rules))
        given = {d for formats in self.choices(model, device).values() for d in formats}
        modules = dict(model.named_modules())
        dropped = {}
        for fmt in (d for d in DTYPES if d in named - given):
            reason = "no searchable layer takes it"
            for layer in self.layers(model):
                why = layer_format_reason(model, layer.name, fmt, device)
                if why is None and self.trains and HANDLERS[fmt].needs_calibration(modules[layer.name]):
                    why = "a training space fine-tunes int8 on Linear layers only"
                if why is not None:
                    reason = why.split(";")[0]
                    break
            dropped[fmt] = reason
        return dropped

    @property
    def shipped(self) -> bool:
        return self.source == "<built-in default>" or Path(self.source).resolve().parent == SPACES_DIR

    def check_device(self, model: nn.Module, device: torch.device, refuse: bool = True) -> None:
        """Say which of the space's formats `device` cannot run (one note per format, for a user's space:
        the shipped spaces list every format on purpose), and refuse a space that leaves only fp32."""
        dropped = self.dropped_formats(model, device)
        if not dropped:
            return
        given = {d for formats in self.choices(model, device).values() for d in formats}
        if refuse and given <= {"fp32"}:
            reasons = "; ".join(f"{fmt} dropped: {why}" for fmt, why in dropped.items())
            raise SpaceError(f"{self.source}: field 'dtypes': {reasons}; nothing but fp32 is left to search on "
                             f"{device}: list a format this device runs (e.g. bf16 or int8 on the CPU)")
        if not self.shipped or not refuse:
            for fmt, why in dropped.items():
                print(f"autoprec: note: space {self.name!r} ({self.source}): {fmt} dropped: {why}", file=sys.stderr)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtypes": list(self.dtypes), "default_dtypes": list(self.default_dtypes),
                "classes": list(self.classes), "exclude": list(self.exclude),
                "rules": [{"match": r.match, "class": r.cls, "dtypes": list(r.dtypes)} for r in self.rules],
                "training": self.training}

    def fingerprint(self) -> str:
        return "sha256:" + hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def _dtypes(value: Any, where: str, field_name: str, allowed: tuple[str, ...] = DTYPES) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SpaceError(f"{where}: field '{field_name}' must be a non-empty list of formats from {list(allowed)}")
    bad = [v for v in value if v not in allowed]
    if bad:
        raise SpaceError(f"{where}: field '{field_name}' has unknown format {bad[0]!r}; use {list(allowed)}")
    return tuple(value)


def _patterns(value: Any, where: str, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpaceError(f"{where}: field '{field_name}' must be a list of strings")
    return tuple(value)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _training(raw: Any, where: str) -> dict[str, Any]:
    """The training knobs with their defaults filled in, or {} when training is not configured."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - _TRAINING_FIELDS:
        raise SpaceError(f"{where}: field 'training' takes {', '.join(sorted(_TRAINING_FIELDS))}")
    out = {"enabled": raw.get("enabled", True), "steps": raw.get("steps", 20),
           "optimizer": raw.get("optimizer", "adamw"),
           "learning_rate": raw.get("learning_rate", {"low": 1e-5, "high": 1e-2, "log": True}),
           "loss_scale": raw.get("loss_scale", [1.0, 1024.0, 65536.0]),
           "dynamic_loss_scale": raw.get("dynamic_loss_scale", [True, False])}
    if not isinstance(out["enabled"], bool):
        raise SpaceError(f"{where}: field 'training.enabled' must be true or false")
    if not isinstance(out["steps"], int) or isinstance(out["steps"], bool) or out["steps"] < 1:
        raise SpaceError(f"{where}: field 'training.steps' must be a positive integer")
    if out["optimizer"] not in ("adamw", "sgd"):
        raise SpaceError(f"{where}: field 'training.optimizer' is {out['optimizer']!r}; use adamw or sgd")
    lr = out["learning_rate"]
    if _positive(lr):
        out["learning_rate"] = {"low": float(lr), "high": float(lr), "log": True}
    elif not (isinstance(lr, dict) and set(lr) <= {"low", "high", "log"} and _positive(lr.get("low"))
              and _positive(lr.get("high")) and lr["low"] <= lr["high"]):
        raise SpaceError(f"{where}: field 'training.learning_rate' must be a number or {{low, high, log}} "
                         "with 0 < low <= high")
    scales = out["loss_scale"]
    if not isinstance(scales, list) or not scales or not all(_positive(v) for v in scales):
        raise SpaceError(f"{where}: field 'training.loss_scale' must be a list of positive numbers")
    out["loss_scale"] = [float(v) for v in scales]
    dyn = out["dynamic_loss_scale"]
    if not isinstance(dyn, list) or not dyn or not all(isinstance(v, bool) for v in dyn):
        raise SpaceError(f"{where}: field 'training.dynamic_loss_scale' must be a list of true/false")
    return out


def space_from_dict(data: Any, where: str) -> SearchSpace:
    if not isinstance(data, dict):
        raise SpaceError(f"{where}: a search space is a YAML mapping, not {type(data).__name__}")
    for key in data:
        if key not in _TOP_FIELDS:
            raise SpaceError(f"{where}: unknown field {key!r}; known fields: {', '.join(sorted(_TOP_FIELDS))}")
    dtypes = _dtypes(data.get("dtypes", list(DTYPES)), where, "dtypes")
    defaults = _dtypes(data.get("default_dtypes", ["fp32", "bf16", "fp16"]), where, "default_dtypes",
                       tuple(FLOAT_DTYPES))
    layers = data.get("layers") or {}
    if not isinstance(layers, dict) or set(layers) - {"classes", "exclude"}:
        raise SpaceError(f"{where}: field 'layers' takes only 'classes' and 'exclude'")
    classes = _patterns(layers.get("classes", list(_KNOWN_CLASSES)), where, "layers.classes")
    unknown = [c for c in classes if c not in _KNOWN_CLASSES]
    if unknown:
        raise SpaceError(f"{where}: field 'layers.classes' has {unknown[0]!r}; searchable classes are "
                         f"{', '.join(_KNOWN_CLASSES)}")
    rules = []
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise SpaceError(f"{where}: field 'rules' must be a list of {{match|class, dtypes}} entries")
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, dict) or "dtypes" not in raw or not ({"match", "class"} & set(raw)) \
                or set(raw) - {"match", "class", "dtypes"}:
            raise SpaceError(f"{where}: rules[{i}] must have 'dtypes' and 'match' (name pattern) or 'class'")
        rules.append(Rule(_dtypes(raw["dtypes"], where, f"rules[{i}].dtypes"), raw.get("match"), raw.get("class")))
    training = _training(data.get("training"), where)
    name = data.get("name", Path(where).stem)
    if not isinstance(name, str) or not name:
        raise SpaceError(f"{where}: field 'name' must be a non-empty string")
    return SearchSpace(name=name, dtypes=dtypes, default_dtypes=defaults, classes=classes,
                       exclude=_patterns(layers.get("exclude"), where, "layers.exclude"), rules=tuple(rules),
                       training=training, source=where)


def load_space(path: str | Path | None) -> SearchSpace:
    """A space file by path, a shipped space by name (`cpu`), or the default space for None."""
    if path is None:
        path = SPACES_DIR / "default.yaml"
        if not path.is_file():
            return SearchSpace()
    path = Path(path)
    if not path.is_file() and (SPACES_DIR / f"{path}.yaml").is_file():
        path = SPACES_DIR / f"{path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise SpaceError(f"{path}: search space not found; pass a YAML file or one of {shipped}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return space_from_dict(data, str(path))
