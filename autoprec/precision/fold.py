"""BatchNorm folding for static int8 convolutions: a BatchNorm that only normalises an int8
convolution's output becomes part of that convolution's weights and bias.

Per-channel weight scales absorb the BatchNorm's per-channel factor exactly, so the int8 codes do not
change; what goes is one fp32 pass over the activation per folded pair (ResNet-18 all-int8: 2.4x ->
2.9x fp32, benchmarks/README.md). Finding the pairs needs the data flow, so it needs a model that
torch.fx can trace; any other model keeps its BatchNorms (nothing else changes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def foldable_batchnorms(model: nn.Module, conv_names: Iterable[str]) -> dict[str, str]:
    """conv name -> the BatchNorm (eval mode, running statistics) that alone consumes its output,
    called once, for those of `conv_names` that have one; {} when the model cannot be traced. Names of
    other layers (static int8 Linear layers) are passed over: a BatchNorm1d after a Linear on a 3-d input
    normalises another dimension than the Linear's outputs."""
    wanted = {name for name in conv_names if isinstance(model.get_submodule(name), _CONVS)}
    if not wanted:
        return {}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow, unsupported ops: no folding, nothing else changes
        return {}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted or calls[node.target] != 1 or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or calls.get(user.target) != 1 or user.args[:1] != (node,) \
                or len(user.args) + len(user.kwargs) != 1:
            continue
        norm = model.get_submodule(user.target)
        if isinstance(norm, _NORMS) and not norm.training and norm.running_mean is not None:
            pairs[node.target] = user.target
    return pairs


def folded_conv(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """A copy of `conv` computing conv followed by `norm` (eval)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(conv.eval(), norm)
