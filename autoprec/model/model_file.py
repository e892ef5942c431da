"""Load a user's model.py by path and check it against the model.py contract (README.md,
"The model.py contract").

Every broken spec raises `SpecError` with one line naming the file, the callable and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from autoprec.errors import SpecError

# sys.exit() or argparse in a user's model.py is a mistake to report in one line, not our exit.
USER_CODE_ERRORS = (Exception, SystemExit)

Inputs = Any  # a tensor, a tuple of positional inputs or a dict of keyword inputs

_REQUIRED = {
    "build_model": "define build_model() returning a fresh fp32 torch.nn.Module",
    "example_inputs": "define example_inputs() returning one CPU batch: a tensor, a tuple or a dict",
}
_OPTIONAL = {
    "evaluate": "evaluate(model, device) must return a finite number, higher is better",
    "eval_inputs": "eval_inputs() must return an iterable of batches shaped like example_inputs()",
    "output": "output(outputs) must return the tensor to compare",
    "calibration_inputs": ("calibration_inputs() must return a non-empty iterable of batches shaped like "
                           "example_inputs() (the batches static int8 layers are calibrated on)"),
    "train_batches": "train_batches() must return an iterable of (inputs, targets)",
    "loss": "loss(outputs, targets) must return a scalar tensor",
}


def one_line(message: str) -> str:
    """A message on one line: exception texts quoted into errors may span several."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def move_inputs(inputs: Inputs, device: torch.device | str, dtype: torch.dtype | None = None) -> Inputs:
    """Move every tensor of an input structure to `device` (floating ones to `dtype` when given)."""
    if isinstance(inputs, torch.Tensor):
        if dtype is not None and inputs.is_floating_point():
            return inputs.to(device=device, dtype=dtype)
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move_inputs(v, device, dtype) for v in inputs)
    if isinstance(inputs, dict):
        return {k: move_inputs(v, device, dtype) for k, v in inputs.items()}
    return inputs


def describe_inputs(inputs: Inputs) -> str:
    """Shapes and dtypes of an input structure, e.g. "(tensor[8, 32] float32, {'mask': tensor[8] int64})"."""
    if isinstance(inputs, torch.Tensor):
        return f"tensor[{', '.join(map(str, inputs.shape))}] {str(inputs.dtype).removeprefix('torch.')}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe_inputs(v) for v in inputs) + ")"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k!r}: {describe_inputs(v)}" for k, v in inputs.items()) + "}"
    return type(inputs).__name__


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """Call a model the way the contract says: tensor -> model(x), tuple -> model(*t), dict -> model(**d)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _check_inputs(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return len(value) > 0 and any(isinstance(v, torch.Tensor) for v in value)
    if isinstance(value, dict):
        return len(value) > 0 and all(isinstance(k, str) for k in value) and \
            any(isinstance(v, torch.Tensor) for v in value.values())
    return False


def _unlike(batch: Any, example: Any, ref: str = "example_inputs()") -> str | None:
    """Why `batch` cannot be a batch of the same model as `example` (form, tensor rank, dtype kind);
    `ref` names `example` in the message."""
    if not _check_inputs(batch):
        return f"is a {type(batch).__name__}, not a tensor, tuple or dict of tensors"
    if type(batch) is not type(example) and not (isinstance(batch, (tuple, list)) and isinstance(example, (tuple, list))):
        return f"is a {type(batch).__name__} where {ref} is a {type(example).__name__}"
    if isinstance(batch, torch.Tensor):
        pairs = [("", batch, example)]
    elif isinstance(batch, dict):
        if set(batch) != set(example):
            return f"has keys {sorted(batch)} where {ref} has {sorted(example)}"
        pairs = [(f"[{k!r}]", batch[k], example[k]) for k in example]
    else:
        if len(batch) != len(example):
            return f"has {len(batch)} inputs where {ref} has {len(example)}"
        pairs = [(f"[{i}]", b, e) for i, (b, e) in enumerate(zip(batch, example))]
    for where, b, e in pairs:
        part = f"{where} " if where else ""
        if isinstance(e, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"{part}is a {type(b).__name__} where {ref}{where} is a {type(e).__name__}"
        if isinstance(e, torch.Tensor):
            if b.dim() != e.dim() or b.shape[1:] != e.shape[1:] and b.dim() > 2:
                return (f"{part}has shape {tuple(b.shape)} where {ref}{where} has "
                        f"{tuple(e.shape)} (only the batch size may differ)")
            if b.is_floating_point() != e.is_floating_point():
                return f"{part}is {b.dtype} where {ref}{where} is {e.dtype}"
            if b.numel() == 0:
                return f"{part}is empty (shape {tuple(b.shape)})"
    return None


# Past this magnitude a calibration batch is a bug (uninitialised memory, a unit mistake): the input
# range it gives leaves every ordinary value in one or two int8 steps.
ABSURD_MAGNITUDE = 1e20


class BadBatches(Exception):
    """Why a set of calibration batches cannot be used (a phrase for the caller's one-line error)."""


def _float_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _float_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _float_tensors(item)


def checked_batches(value: Any, example: Inputs | None = None, *, one_batch_ok: bool = False,
                    verb: str = "returned") -> list[Inputs]:
    """The calibration batches in `value` as a list, checked: an iterable (not a string) of batches, each
    a tensor, tuple or dict of tensors shaped like `example` (else like the first batch), with finite
    values of sane magnitude, not all zeros. `one_batch_ok`: a bare tensor or dict is one batch.
    Raises BadBatches with what is wrong."""
    if isinstance(value, (torch.Tensor, dict)) and one_batch_ok:
        value = [value]
    if isinstance(value, (torch.Tensor, dict, str, bytes)) or not isinstance(value, Iterable):
        raise BadBatches(f"{verb} a {type(value).__name__}, not an iterable of batches")
    try:
        batches = list(value)
    except USER_CODE_ERRORS as exc:
        raise BadBatches(f"raised {type(exc).__name__} while iterating: {exc}") from exc
    if not batches:
        raise BadBatches("gave no batches")
    ref, ref_name = (example, "example_inputs()") if example is not None else (batches[0], "batch 0")
    for index, batch in enumerate(batches):
        problem = _unlike(batch, ref, ref_name)
        if problem:
            raise BadBatches(f"batch {index} {problem}")
    nonzero = False
    for index, batch in enumerate(batches):
        for tensor in _float_tensors(batch):
            if not bool(torch.isfinite(tensor).all()):
                raise BadBatches(f"batch {index} has NaN or infinite values")
            peak = float(tensor.abs().max()) if tensor.numel() else 0.0
            if peak > ABSURD_MAGNITUDE:
                raise BadBatches(f"batch {index} has values up to {peak:.3g} (over {ABSURD_MAGNITUDE:.0e} in "
                                 "magnitude)")
            nonzero = nonzero or peak > 0
    if not nonzero and any(True for batch in batches for _ in _float_tensors(batch)):
        raise BadBatches("every batch is all zeros, which gives no input range to calibrate on")
    return batches


def first_float_tensor(value: Any) -> torch.Tensor | None:
    """The first floating tensor of a model's return value (tensor, tuple, list, dict, ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, dict):  # transformers' ModelOutput is an OrderedDict
        items: Iterable[Any] = value.values()
    elif isinstance(value, (tuple, list)):
        items = value
    else:
        return None
    for item in items:
        found = first_float_tensor(item)
        if found is not None:
            return found
    return None


@dataclass
class ModelSpec:
    """A checked model.py."""

    path: Path
    build_model: Callable[[], nn.Module]
    example_inputs: Callable[[], Inputs]
    evaluate: Callable[[nn.Module, torch.device], float] | None = None
    eval_inputs: Callable[[], Iterable[Inputs]] | None = None
    output: Callable[[Any], torch.Tensor] | None = None
    train_batches: Callable[[], Iterable[tuple[Inputs, Any]]] | None = None
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    calibration_inputs: Callable[[], Iterable[Inputs]] | None = None
    # eval_inputs()/calibration_inputs() are read once and kept: a function that returns the same
    # generator each call would give nothing the second time (at the profile, or on a resume)
    _batches: dict[str, list[Inputs]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def can_train(self) -> bool:
        return self.train_batches is not None and self.loss is not None

    def error(self, name: str, problem: str, fix: str | None = None) -> SpecError:
        fix = fix or _REQUIRED.get(name) or _OPTIONAL.get(name, "")
        return SpecError(one_line(f"{self.path}: {name}: {problem}; {fix}"))

    def new_model(self) -> nn.Module:
        try:
            model = self.build_model()
        except USER_CODE_ERRORS as exc:
            raise self.error("build_model", f"raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise self.error("build_model", f"returned {type(model).__name__}, not a torch.nn.Module")
        floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if floats - {torch.float32}:
            raise self.error("build_model", f"returned parameters in {sorted(map(str, floats))}",
                             "return the fp32 model; autoprec applies the formats itself")
        return model.eval()

    def example(self) -> Inputs:
        return self._inputs("example_inputs", self.example_inputs)

    def _inputs(self, name: str, fn: Callable[[], Any]) -> Inputs:
        try:
            value = fn()
        except USER_CODE_ERRORS as exc:
            raise self.error(name, f"raised {type(exc).__name__}: {exc}") from exc
        if not _check_inputs(value):
            raise self.error(name, f"returned {type(value).__name__}, not a tensor, a tuple of tensors "
                             "or a dict of str -> tensor", _REQUIRED["example_inputs"])
        return value

    def eval_batches(self) -> list[Inputs]:
        """The batches the default score compares on: eval_inputs() or the example batch."""
        if self.eval_inputs is None:
            return [self.example()]
        if "eval_inputs" in self._batches:
            return list(self._batches["eval_inputs"])
        try:
            batches = list(self.eval_inputs())
        except USER_CODE_ERRORS as exc:
            raise self.error("eval_inputs", f"raised {type(exc).__name__}: {exc}") from exc
        if not batches:
            raise self.error("eval_inputs", "gave no batches")
        example = self.example()
        for index, batch in enumerate(batches):
            if not _check_inputs(batch):
                raise self.error("eval_inputs", f"gave a {type(batch).__name__} batch, not a tensor, tuple or dict")
            problem = _unlike(batch, example)
            if problem:
                raise self.error("eval_inputs", f"batch {index} {problem}")
        self._batches["eval_inputs"] = batches
        return list(batches)

    def calibration_batches(self) -> list[Inputs]:
        """The batches static int8 layers are calibrated on: calibration_inputs(), else eval_inputs(),
        else the example batch."""
        if self.calibration_inputs is None:
            return self.eval_batches()
        name = "calibration_inputs"
        if name in self._batches:
            return list(self._batches[name])
        try:
            value = self.calibration_inputs()
        except USER_CODE_ERRORS as exc:
            raise self.error(name, f"raised {type(exc).__name__}: {exc}") from exc
        try:
            batches = checked_batches(value, self.example())
        except BadBatches as exc:
            fix = "return a list of batches, e.g. [example_inputs()]" if "iterable" in str(exc) else None
            raise self.error(name, str(exc), fix) from exc.__cause__
        self._batches[name] = batches
        return list(batches)

    def compared_tensor(self, outputs: Any) -> torch.Tensor:
        """The tensor the default score compares: output(outputs) or the first floating tensor."""
        if self.output is not None:
            try:
                value = self.output(outputs)
            except USER_CODE_ERRORS as exc:
                raise self.error("output", f"raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise self.error("output", f"returned {type(value).__name__}, not a floating tensor")
            return value
        value = first_float_tensor(outputs)
        if value is None:
            raise self.error("output", f"the model returned {type(outputs).__name__} with no floating tensor",
                             "define output(outputs) in model.py to pick the tensor to compare")
        return value

    def user_score(self, model: nn.Module, device: torch.device) -> float:
        assert self.evaluate is not None
        try:
            value = self.evaluate(model, device)
        except USER_CODE_ERRORS as exc:
            raise self.error("evaluate", f"raised {type(exc).__name__}: {exc}") from exc
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error("evaluate", f"returned {type(value).__name__}, not a number")
        return float(value)

    def fingerprint(self) -> str:
        return "sha256:" + hashlib.sha256(self.path.read_bytes()).hexdigest()


class ProcessExit(Exception):
    """os._exit() called by model.py while autoprec imports it."""

    def __init__(self, status: Any) -> None:
        super().__init__(f"os._exit({status!r})")


@contextlib.contextmanager
def _no_process_exit() -> Iterator[None]:
    """While model.py is imported, os._exit raises ProcessExit instead of ending the process with no word
    (a kill or a crash of the interpreter still cannot be caught: the exit status then tells)."""
    real = os._exit

    def refuse(status: Any = 0) -> NoReturn:
        raise ProcessExit(status)

    os._exit = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        os._exit = real


def load_spec(path: str | Path) -> ModelSpec:
    """Import model.py by path (like torch.hub's hubconf.py) and check its names statically."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: file not found; pass the path to a model.py that defines "
                        "build_model() and example_inputs()")
    if path.suffix != ".py":
        raise SpecError(f"{path}: not a Python file; pass a model.py (a .py file that defines build_model() and "
                        "example_inputs(); see docs/model-file.md)")
    source = path.read_bytes()
    try:
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise SpecError(f"{path}:{exc.lineno}: syntax error: {exc.msg}; fix the file") from None
    module_name = "autoprec_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"{path}: Python cannot import it as a module; pass a model.py (a .py file)")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so model.py can import its neighbours
    try:
        with _no_process_exit():
            spec.loader.exec_module(module)
    except ProcessExit as exc:
        raise SpecError(f"{path}: importing it calls {exc}, which would end autoprec with no word; remove the "
                        "call (autoprec imports model.py, it does not run it as a script)") from None
    except USER_CODE_ERRORS as exc:
        raise SpecError(one_line(f"{path}: importing it raised {type(exc).__name__}: {exc}; fix the import "
                                 "(is every package it needs installed?)")) from None
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    found: dict[str, Any] = {}
    for name in (*_REQUIRED, *_OPTIONAL):
        value = getattr(module, name, None)
        if value is None:
            if name in _REQUIRED:
                raise SpecError(f"{path}: {name} is missing; {_REQUIRED[name]}")
            continue
        if not callable(value):
            fix = _REQUIRED.get(name) or _OPTIONAL[name]
            raise SpecError(f"{path}: {name} is a {type(value).__name__}, not a function; {fix}")
        found[name] = value
    return ModelSpec(path=path, **found)
