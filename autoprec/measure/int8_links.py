"""Where the compiled CPU runtime keeps int8 between two searchable layers.

With inductor's freezing and its x86 int8 passes (`runtime._x86_int8_passes`), a static int8 layer
whose output feeds, alone, at most one activation the kernel can take in and then the next static int8
layer's quantize, writes that layer's uint8 input itself: the float tensor, the activation's pass and
the quantize pass disappear (benchmarks/README.md, `cpu_kernels.py --chain`). So in that runtime a
layer's cost depends on its neighbour's format. A `Link` names such a pair, found on the graph dynamo
captures of the fp32 model (the graph inductor sees, without tracing the model by hand).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoprec.model.model_file import call_model

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the activations oneDNN's int8 kernels take as a post-op (torchao's x86 passes: qconv and qlinear unary fusions)
_ACTIVATIONS = {
    "conv": {torch.relu, F.relu, F.hardtanh, F.hardswish, F.silu, "relu", "relu_"},
    "linear": {torch.relu, F.relu, F.gelu, "relu", "relu_"},
}
# ops that leave the tensor as it is in an eval-mode graph, or that inductor folds into the int8 kernel
_PASS_THROUGH = {F.dropout, "contiguous"}
_BATCH_NORMS = {F.batch_norm, torch.batch_norm}  # after a static int8 convolution, folded into it (fold.py)
_COMPUTE = {F.linear, torch._C._nn.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


@dataclass(frozen=True)
class Link:
    """`producer`'s output goes, through at most `activation`, only into `consumer`'s input."""

    producer: str
    consumer: str
    activation: str | None


def static_int8_format(layer: nn.Module, formats: tuple[str, ...]) -> str | None:
    """The format of `formats` in which `layer` runs as a static int8 layer on the CPU (uint8 in), or None."""
    if isinstance(layer, _CONVS) and "int8" in formats:
        return "int8"
    return "int8_static" if "int8_static" in formats else None


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)  # layer[0] / _modules['x'] -> layer.0 / .x
    return path.lstrip(".")


def _op(node: torch.fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def _links_in(graph: torch.fx.Graph, kinds: dict[str, str]) -> list[Link]:
    """kinds: searchable layer name -> "conv" or "linear", for layers that may take static int8."""
    output_of: dict[torch.fx.Node, str] = {}
    input_of: list[tuple[str, torch.fx.Node]] = []
    for node in graph.nodes:
        name = _module_path(node)
        if name in kinds and _op(node) in _COMPUTE:
            output_of[node] = name
            if node.args and isinstance(node.args[0], torch.fx.Node):
                input_of.append((name, node.args[0]))
    links = []
    for consumer, node in input_of:
        activation, normed = None, False  # activation: the op between, checked against the producer's kind below
        while node not in output_of:
            op = _op(node)
            if op is None or len(node.users) != 1 or not node.args or not isinstance(node.args[0], torch.fx.Node):
                break
            # walking back from the consumer: the activation comes before a BatchNorm (conv -> norm -> act)
            if op in _PASS_THROUGH:
                pass
            elif op in _BATCH_NORMS and not normed:
                normed = True
            elif activation is None and not normed and any(op in ops for ops in _ACTIVATIONS.values()):
                activation = op
            else:
                break
            node = node.args[0]
        producer = output_of.get(node)
        if producer is None or producer == consumer or len(node.users) != 1:
            continue
        kind = kinds[producer]
        if normed and kind != "conv":
            continue
        if activation is not None and activation not in _ACTIVATIONS[kind]:
            continue
        name = None if activation is None else getattr(activation, "__name__", str(activation)).rstrip("_")
        links.append(Link(producer, consumer, name))
    return links


def find_links(model: nn.Module, example: Any, choices: dict[str, tuple[str, ...]]) -> list[Link]:
    """The links between layers of `choices` that may both take static int8, on the graphs dynamo
    captures of `model` on `example` (every graph, where the model breaks into several); [] where dynamo
    cannot capture it (then the cost model stays additive)."""
    kinds = {}
    for name, formats in choices.items():
        layer = model.get_submodule(name)
        if static_int8_format(layer, formats) is not None:
            kinds[name] = "conv" if isinstance(layer, _CONVS) else "linear"
    if len(kinds) < 2:
        return []
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    import torch._dynamo

    try:
        with torch.inference_mode():
            call_model(torch.compile(model, backend=capture, dynamic=False), example)
    except Exception:  # noqa: BLE001 - a model dynamo cannot capture gets the additive model
        return []
    finally:
        torch._dynamo.reset()
    seen, links = set(), []
    for gm in graphs:
        for link in _links_in(gm.graph, kinds):
            if (link.producer, link.consumer) not in seen:
                seen.add((link.producer, link.consumer))
                links.append(link)
    return links
