"""Static int8 convolutions on the CPU: int8 activations (calibrated per-tensor scale), per-channel
symmetric int8 weights, oneDNN's quantized convolution with a floating output.

Each converted layer quantizes its own input and returns fp32, so a layer not given int8 keeps its
float format and any model works, traceable or not (benchmarks/README.md: measured against FX graph
mode, which keeps int8 between neighbours and fuses BatchNorm, but needs a traceable model). The
floating output skips the output requantization that torch.ao's quantized modules do: one rounding
less per layer, and one pass less over the output.

The output keeps the memory layout the float convolution would have given (channels_last where the
input or the weight is channels_last, as PyTorch's own convolution decides), although oneDNN computes
in channels_last either way: otherwise one int8 layer would switch every layer after it to
channels_last, and a policy's cost would depend on which layer came first, not on each layer's
format (ResNet-18 with only its first convolution in int8 ran 1.2x slower than fp32 that way,
benchmarks/README.md "Static int8 and memory layout"). A channels_last model keeps int8 and float
layers in channels_last, with no reorder between them.
"""

from __future__ import annotations

import warnings

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
from torch import nn

from autoprec.precision.packed_int8 import PackedInt8Layer

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by tensor rank


def _is_channels_last(t: torch.Tensor) -> bool:
    """True where `t` is laid out channels_last and not also plainly contiguous (a tensor with one
    channel is both, and counts as contiguous, as torch's suggest_memory_format decides)."""
    layout = _CHANNELS_LAST.get(t.dim())
    return layout is not None and t.is_contiguous(memory_format=layout) and not t.is_contiguous()


def _is_only_contiguous(t: torch.Tensor) -> bool:
    """True where a 4-d `t` is plainly contiguous and not also channels_last (a 1x1 kernel is both)."""
    return t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)


def static_conv_unsupported_reason(module: nn.Module, device: torch.device) -> str | None:
    """None when `module` can run as a static int8 convolution on `device`, else why not."""
    if device.type != "cpu":
        return (f"static int8 convolutions run on the CPU only (oneDNN), not {device.type}; "
                "give this layer fp32, fp16 or bf16")
    if not hasattr(torch.ops.onednn, "qconv_pointwise") or not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN quantized convolution (onednn.qconv_pointwise); give this layer a float format"
    if not isinstance(module, _CONVS):
        return f"static int8 is for Conv1d/2d/3d, not {type(module).__name__}"
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        return (f"static int8 needs numeric zero padding; this {type(module).__name__} has padding="
                f"{module.padding!r}, padding_mode={module.padding_mode!r}")
    return None


class StaticInt8Conv(PackedInt8Layer):
    """A Conv1d/2d/3d computing in int8 with fp32 output; built by `StaticInt8Conv.from_float`."""

    def __init__(self, conv: nn.Module, input_scale: float, input_zero_point: int) -> None:
        super().__init__()
        self.kind = type(conv).__name__
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.groups = tuple(conv.kernel_size), conv.groups
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.input_scale, self.input_zero_point = float(input_scale), int(input_zero_point)
        self.weight_channels_last = _is_channels_last(conv.weight)
        self._set_weights(conv.weight, conv.bias)

    def _pack(self) -> torch.Tensor:
        return torch.ops.onednn.qconv_prepack(
            self.weight_int8, self.weight_scale, self.input_scale, self.input_zero_point,
            self.stride, self.padding, self.dilation, self.groups, None)

    @classmethod
    def from_float(cls, conv: nn.Module, input_qparams: tuple[float, int]) -> "StaticInt8Conv":
        scale, zero_point = input_qparams[:2]  # a convolution's recipes never smooth (see calibration.py)
        return cls(conv, scale, zero_point)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last codes: the layout oneDNN computes in, so it reorders nothing itself
        x = x.float().contiguous(memory_format=_CHANNELS_LAST.get(x.dim(), torch.contiguous_format))
        if torch.compiler.is_compiling():  # the op inductor lowers into one fused kernel; no graph break
            return torch.ops.quantized_decomposed.quantize_per_tensor.default(
                x, self.input_scale, self.input_zero_point, 0, 255, torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor types are deprecated; only the uint8 codes are kept
            # eager: one fused kernel (the decomposed op above is four in eager mode)
            return torch.quantize_per_tensor(x, self.input_scale, self.input_zero_point, torch.quint8).int_repr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.onednn.qconv_pointwise(
            self._quantize(x), self.input_scale, self.input_zero_point, self.packed_weight(), self.weight_scale,
            self.weight_zero_point, self.bias, self.stride, self.padding, self.dilation, self.groups,
            1.0, 0, torch.float32, "none", [], "")
        if self.weight_channels_last or _is_channels_last(x):
            return out
        return out.contiguous()  # the float convolution's layout: see the module's docstring

    def extra_repr(self) -> str:
        return (f"{self.kind} {self.in_channels}->{self.out_channels}, kernel={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, input scale={self.input_scale:.3g} zero point={self.input_zero_point}")


def layout_hint(model: nn.Module, choices: dict[str, tuple[str, ...]], device: torch.device) -> str | None:
    """One line for a contiguous (NCHW) model whose 2-d convolutions may take static int8, else None.

    oneDNN's int8 convolution computes in channels_last, so in a contiguous model each int8 layer
    reorders its input and output (it keeps the float layer's layout, see the module's docstring); a
    channels_last model pays no reorder, in int8 or float (docs/performance.md, "Layout of int8 convolutions")."""
    if device.type != "cpu":
        return None
    convs = [model.get_submodule(name) for name, options in choices.items() if "int8" in options
             and isinstance(model.get_submodule(name), nn.Conv2d)]
    # 1x1 and depthwise kernels are contiguous in both layouts: one plainly NCHW kernel tells the model's
    # layout, and then every layer that is contiguous at all counts
    if not any(_is_only_contiguous(conv.weight) for conv in convs):
        return None
    contiguous = [conv for conv in convs if conv.weight.is_contiguous()]
    count = "1 Conv2d layer that may take int8 is" if len(contiguous) == 1 else \
        f"{len(contiguous)} Conv2d layers that may take int8 are"
    return (f"{count} contiguous (NCHW): each int8 one reorders "
            f"to and from channels_last, oneDNN's layout; return model.to(memory_format=torch.channels_last) "
            f"from build_model() to run float and int8 convolutions without reorders")
