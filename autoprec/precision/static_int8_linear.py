"""int8_static: static int8 Linear layers on the CPU: uint8 activations with a calibrated per-tensor scale and
zero point, per-channel symmetric int8 weights, oneDNN's int8 matmul (`onednn.qlinear_pointwise`, AMX or
VNNI where the CPU has them), fp32 output (bf16 for a bf16 input: in a bf16 model, no casts around the layer).

One layer at a time, like the static int8 convolutions (`static_int8.py`): each converted layer quantizes
its own input and returns fp32, so any model works without tracing. The same two oneDNN calls run in
both runtimes: eagerly, and under torch.compile, where inductor keeps them as they are (no graph break)
and, with freezing, folds the packed weight into the graph as a constant.

Measured against the other int8 Linear kernels torch has on the CPU (benchmarks/cpu_kernels.py): torch's
dynamic int8 (fbgemm, activations quantized at run time: the `int8` format), torch.ao's static quantized
Linear (quantized tensors in and out, so it needs an output scale too and requantizes), and a layer
written as quantize / dequantize + F.linear, which inductor's x86 passes (torchao's) turn into the same
oneDNN kernel under compile with freezing and which is slower eagerly.

A format of its own, not a change of `int8`: a policy naming `int8` for a Linear layer means torch's
dynamic int8 (no calibration needed) and still does.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
from torch import nn

from autoprec.errors import UnsupportedFormat
from autoprec.precision.base import register
from autoprec.precision.int8 import _as_linear
from autoprec.precision.layers import is_linear_like
from autoprec.precision.packed_int8 import PackedInt8Layer


def static_linear_unsupported_reason(module: nn.Module, device: torch.device) -> str | None:
    """None when `module` can run as a static int8 Linear on `device`, else why not."""
    if not is_linear_like(module):
        return (f"int8_static (static int8) is for Linear layers, not {type(module).__name__}; "
                "give this layer int8 (static int8 for convolutions), fp32, fp16 or bf16")
    if device.type != "cpu":
        return (f"int8_static (static int8 Linear) runs on the CPU only (oneDNN), not {device.type}; "
                "give this layer int8, fp32, fp16 or bf16")
    if not hasattr(torch.ops.onednn, "qlinear_pointwise") or not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN quantized Linear (onednn.qlinear_pointwise); give this layer a float format"
    return None


@functools.cache
def _opaque_qlinear() -> Callable[..., torch.Tensor]:
    """onednn.qlinear_pointwise as a custom op, hidden from inductor: its lowering of that op needs the
    packed weight as a graph constant, which it is only with freezing. Defined at first use: defining a
    custom op imports torch._dynamo, a second at every start of the command otherwise."""

    @torch.library.custom_op("autoprec::static_int8_linear", mutates_args=())
    def qlinear(qx: torch.Tensor, x_scale: float, x_zero_point: int, packed: torch.Tensor,
                w_scale: torch.Tensor, w_zero_point: torch.Tensor, bias: torch.Tensor | None,
                bf16_out: bool = False) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(qx, x_scale, x_zero_point, packed, w_scale, w_zero_point, bias,
                                                  1.0, 0, torch.bfloat16 if bf16_out else torch.float32, "none", [], "")

    @qlinear.register_fake
    def _(qx, x_scale, x_zero_point, packed, w_scale, w_zero_point, bias, bf16_out=False):
        return qx.new_empty((*qx.shape[:-1], w_scale.shape[0]), dtype=torch.bfloat16 if bf16_out else torch.float32)

    return qlinear


@torch._dynamo.assume_constant_result
def _freezing() -> bool:
    """Whether torch.compile is tracing with inductor's freezing (decided when tracing, as dynamo decides
    it for the parameters)."""
    from torch._dynamo.utils import is_parameter_freezing

    return is_parameter_freezing()


class StaticInt8Linear(PackedInt8Layer):
    """A Linear computing in int8 with fp32 output; built by `StaticInt8Linear.from_float`."""

    def __init__(self, linear: nn.Linear, input_scale: float, input_zero_point: int,
                 smoothing: torch.Tensor | None = None) -> None:
        super().__init__()
        _opaque_qlinear()  # defines torch.ops.autoprec.static_int8_linear before anything compiles this layer
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.input_scale, self.input_zero_point = float(input_scale), int(input_zero_point)
        weight = linear.weight.detach().float()
        if smoothing is not None:  # SmoothQuant: input channels times the factors, weight columns divided by them
            smoothing = smoothing.detach().float().cpu()
            weight = weight.cpu() / smoothing
        self.register_buffer("input_smoothing", smoothing)
        self._set_weights(weight, linear.bias)

    def _pack(self) -> torch.Tensor:
        return torch.ops.onednn.qlinear_prepack(self.weight_int8, None)

    @classmethod
    def from_float(cls, module: nn.Module, input_qparams: tuple) -> "StaticInt8Linear":
        """`input_qparams`: (scale, zero point) or a calibration's InputQuant (with its smoothing)."""
        return cls(_as_linear(module), *input_qparams)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_smoothing is not None:  # one more elementwise op, fused into the quantize once compiled
            x = x.float() * self.input_smoothing
        if torch.compiler.is_compiling():  # inductor fuses it with its neighbours; no graph break
            # bf16 as it comes: with freezing, the previous int8 layer then writes uint8 for this one
            x = x if x.dtype == torch.bfloat16 else x.float()
            return torch.ops.quantized_decomposed.quantize_per_tensor.default(
                x, self.input_scale, self.input_zero_point, 0, 255, torch.uint8)
        x = x.float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor types are deprecated; only the uint8 codes are kept
            return torch.quantize_per_tensor(x, self.input_scale, self.input_zero_point, torch.quint8).int_repr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 in, bf16 out (oneDNN writes it directly): a bf16 model needs no casts around the layer
        bf16 = x.dtype == torch.bfloat16
        qx = self._quantize(x)
        if torch.compiler.is_compiling() and not _freezing():
            return torch.ops.autoprec.static_int8_linear(qx, self.input_scale, self.input_zero_point,
                                                         self.packed_weight(), self.weight_scale,
                                                         self.weight_zero_point, self.bias, bf16)
        return torch.ops.onednn.qlinear_pointwise(
            qx, self.input_scale, self.input_zero_point, self.packed_weight(), self.weight_scale,
            self.weight_zero_point, self.bias, 1.0, 0, torch.bfloat16 if bf16 else torch.float32, "none", [], "")

    def extra_repr(self) -> str:
        smoothed = ", smoothed" if self.input_smoothing is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"input scale={self.input_scale:.3g} zero point={self.input_zero_point}{smoothed}")


class StaticInt8LinearFormat:
    name = "int8_static"
    native_io = (torch.bfloat16,)  # StaticInt8Linear returns bf16 for bf16 input

    def needs_calibration(self, module: nn.Module) -> bool:
        return True

    def unsupported_reason(self, module: nn.Module, device: torch.device) -> str | None:
        return static_linear_unsupported_reason(module, device)

    def drops_weight_tensor(self, module: nn.Module, device: torch.device, runtime: str = "eager") -> bool:
        """StaticInt8Linear has no `weight` tensor: a parent reading it (a TransformerEncoderLayer's fused
        path) cannot run with it, in either runtime."""
        return True

    def convert(self, module: nn.Module, device: torch.device,
                input_qparams: tuple[float, int] | None = None) -> nn.Module:
        if input_qparams is None:
            raise UnsupportedFormat(f"static int8 {type(module).__name__} needs calibration: its input never "
                                    "ran on the calibration batches, or none were given")
        return StaticInt8Linear.from_float(module, input_qparams)

    def io_dtype(self, device: torch.device) -> torch.dtype:
        return torch.float32


register(StaticInt8LinearFormat())
