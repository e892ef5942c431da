"""Per-layer numeric formats, applied in place, dispatched through one handler table.

Every format is a `FormatHandler` registered under its name. `apply_formats` is the single
entry point: it converts the listed layers from their fp32 originals, casts everything else to
the policy's default dtype, and adds casts only at the boundaries where a layer's compute dtype
differs from the default.
"""

from __future__ import annotations

from autoprec.precision.base import FLOAT_DTYPES, FormatHandler, HANDLERS, register
from autoprec.precision.apply import apply_formats, check_layer_format, module_storage_bytes
from autoprec.precision.layers import SEARCHABLE_CLASSES, LayerInfo, searchable_layers

# Importing the handler modules fills the table.
from autoprec.precision import floating as _floating  # noqa: F401
from autoprec.precision import int8 as _int8  # noqa: F401
from autoprec.precision import fp8 as _fp8  # noqa: F401
from autoprec.precision import int4 as _int4  # noqa: F401
from autoprec.precision import static_int8_linear as _static_int8_linear  # noqa: F401  "int8_static"
from autoprec.precision.calibration import Calibration, calibrate

DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "fp8", "int4", "int8_static")  # the formats a policy and a search space name

__all__ = [
    "Calibration",
    "DTYPES",
    "FLOAT_DTYPES",
    "FormatHandler",
    "HANDLERS",
    "LayerInfo",
    "SEARCHABLE_CLASSES",
    "apply_formats",
    "calibrate",
    "check_layer_format",
    "module_storage_bytes",
    "register",
    "searchable_layers",
]
