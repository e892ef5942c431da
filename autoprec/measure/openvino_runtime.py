"""The `openvino` runtime: candidates converted to OpenVINO, quantized by NNCF, run by OpenVINO's CPU plugin.

The fp32 model is converted once (`openvino.convert_model` on the example batch, its shapes made
static). Each candidate is that graph quantized by `nncf.quantize` on the study's calibration batches,
with every Convolution / MatMul that the policy does not make int8 in NNCF's ignored scope (a product
of two activations, attention's, is int8 where every layer making its operands is: `feeding_nodes`), then
compiled for the CPU at one inference precision: OpenVINO's CPU plugin takes one float precision per
compiled model (a node marked to keep its precision still ran bf16 under a bf16 hint), so float layers
run at bf16 when the policy's default is bf16 and it lists no layer as fp32, and at f32 otherwise. The
fp32 reference is the unquantized graph compiled at f32.

autoprec's layers are module names; after conversion a convolution followed by BatchNorm is one node
named after the folded Multiply. `layer_nodes` maps each layer to its node by its weight: the node's
weight Constant is named `self.<layer>.weight` where nothing was folded into it, and otherwise equals
the module's weight up to one scale per output channel (BatchNorm folding), which is matched by value.

`OpenVINOModel` wraps a compiled model as an nn.Module (torch tensors in, torch tensors out, in the
fp32 model's output structure), so the Evaluator scores and times it like any candidate.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from autoprec.errors import AutoprecError, UnsupportedFormat
from autoprec.model.model_file import call_model
from autoprec.policy import Policy
from autoprec.precision.layers import searchable_layers

FORMATS = ("fp32", "bf16", "int8")  # what a policy may name in this runtime
MISSING = "--runtime openvino needs the openvino extra: pip install 'autoprec[openvino]'"
WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")
PRODUCTS = ("MatMul", "ScaledDotProductAttention")  # of two activations: int8 where their feeding layers are
_LAYOUT = ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "AvgPool")
_PASS_THROUGH = ("Convert", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Multiply")


def require_openvino() -> None:
    """Raise the one-line refusal where openvino or nncf is not installed."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        raise AutoprecError(MISSING) from exc


def _arrays(inputs: Any) -> Any:
    """The inputs as OpenVINO takes them: a list of arrays, or a dict by input name."""
    if isinstance(inputs, torch.Tensor):
        return [inputs.detach().cpu().numpy()]
    if isinstance(inputs, dict):
        return {k: v.detach().cpu().numpy() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    return [v.detach().cpu().numpy() for v in inputs if isinstance(v, torch.Tensor)]


def convert(model: nn.Module, example: Any) -> Any:
    """`model` as an OpenVINO model with the example batch's static shapes."""
    import openvino as ov

    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=example)
    arrays = _arrays(example)
    if isinstance(arrays, dict):
        shapes = {i.get_any_name(): list(arrays[i.get_any_name()].shape) for i in ov_model.inputs
                  if i.get_any_name() in arrays}
        if len(shapes) == len(ov_model.inputs):
            ov_model.reshape(shapes)
    elif len(arrays) == len(ov_model.inputs):
        ov_model.reshape({i: list(a.shape) for i, a in enumerate(arrays)})
    return ov_model


def _weight_constant(node: Any) -> Any | None:
    """The Constant a weighted node's second input comes from (through converts, reshapes, scales)."""
    source = node.input(1).get_source_output().get_node()
    for _ in range(8):
        kind = source.get_type_name()
        if kind == "Constant":
            return source
        if kind not in _PASS_THROUGH:
            return None
        # a Multiply of a folded scale: follow the larger input, the weight
        inputs = [i.get_source_output().get_node() for i in source.inputs()]
        source = max(inputs, key=lambda n: int(np.prod(n.get_output_partial_shape(0).get_min_shape() or [1])))
    return None


def _per_channel(array: np.ndarray, rows: int) -> np.ndarray | None:
    if array.size % rows:
        return None
    flat = array.reshape(rows, -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norms == 0, 1, norms)


def _same_up_to_channel_scale(const: np.ndarray, weight: np.ndarray) -> bool:
    """True where `const` is `weight` times one number per output channel (a folded BatchNorm)."""
    if const.size != weight.size:
        return False
    rows = weight.shape[0]
    w = _per_channel(weight, rows)
    candidates = [const]
    if const.ndim == 2:
        candidates.append(const.T)  # a MatMul without transpose_b
    for c in candidates:
        n = _per_channel(np.ascontiguousarray(c), rows)
        if n is not None and w is not None and np.allclose(np.abs((n * w).sum(axis=1)), 1.0, atol=1e-4):
            return True
    return False


def layer_nodes(ov_model: Any, model: nn.Module) -> dict[str, str]:
    """Each searchable layer of `model` -> the friendly name of its OpenVINO node; a layer whose node
    is not found is left out (it cannot take a format of its own in this runtime)."""
    nodes = {op.get_friendly_name(): op for op in ov_model.get_ordered_ops() if op.get_type_name() in WEIGHTED}
    consts = {name: _weight_constant(op) for name, op in nodes.items()}
    by_const_name = {c.get_friendly_name(): name for name, c in consts.items() if c is not None}
    modules = dict(model.named_modules())
    found: dict[str, str] = {}
    pending = []
    for layer in searchable_layers(model):
        node = by_const_name.get(f"self.{layer.name}.weight")
        if node is not None and node not in found.values():
            found[layer.name] = node
        else:
            pending.append(layer.name)
    for name in pending:  # folded weights: matched by value
        weight = modules[name].weight.detach().float().cpu().numpy()
        for node, const in consts.items():
            if const is None or node in found.values():
                continue
            if _same_up_to_channel_scale(const.get_data().astype(np.float32), weight):
                found[name] = node
                break
    return found


@functools.cache
def bf16_runs() -> bool:
    """Whether OpenVINO's CPU plugin compiles bf16 attention here. The plugin reads bf16 support from
    the CPU's flags, but its oneDNN kernels honour ONEDNN_MAX_CPU_ISA: capped below AVX-512 BF16 on a CPU
    that has it, a bf16 softmax between two matrix products has no kernel and the model does not compile."""
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([2, 8, 16], np.float32)
    h = ops.matmul(x, ops.constant(np.ones((16, 16), np.float32)), False, False)
    out = ops.matmul(ops.softmax(ops.matmul(h, h, False, True), -1), h, False, False)
    try:
        ov.Core().compile_model(ov.Model([out], [x]), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    except RuntimeError:
        return False
    return True


def float_precision(policy: Policy) -> str:
    """The compiled model's one float precision (see the module's docstring)."""
    if policy.default == "bf16" and "fp32" not in policy.layers.values():
        return "bf16"
    return "f32"


def int8_layers(policy: Policy, layers: list[str]) -> list[str]:
    """The layers the policy makes int8; a format this runtime lacks is refused."""
    out = []
    for name in layers:
        fmt = policy.layers.get(name, policy.default)
        if fmt not in FORMATS:
            raise UnsupportedFormat(f"{fmt} does not run in the openvino runtime (layer {name}); "
                                    f"use one of {', '.join(FORMATS)}")
        if fmt == "int8":
            out.append(name)
    if policy.default not in FORMATS:
        raise UnsupportedFormat(f"default {policy.default} does not run in the openvino runtime; "
                                f"use one of {', '.join(FORMATS)}")
    return out


class OpenVINOModel(nn.Module):
    """A compiled OpenVINO model called like the torch model it came from."""

    def __init__(self, compiled: Any, ov_model: Any, treespec: Any, precision: str, compile_s: float) -> None:
        super().__init__()
        self.compiled = compiled
        self.ov_model = ov_model  # what `autoprec export --ir` would save
        self.request = compiled.create_infer_request()
        self.treespec = treespec
        self.precision = precision
        self.compile_s = compile_s
        self.names = [i.get_any_name() for i in compiled.inputs]

    def storage_bytes(self) -> int:
        """Bytes of the model's constants as converted (int8 weights after quantization)."""
        return int(sum(op.get_byte_size() for op in self.ov_model.get_ordered_ops()
                       if op.get_type_name() == "Constant"))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        arrays = _arrays(kwargs) if kwargs else _arrays(args[0] if len(args) == 1 else args)
        if isinstance(arrays, dict):
            arrays = {k: v for k, v in arrays.items() if k in self.names}
        results = self.request.infer(arrays, share_inputs=True)
        leaves = [torch.from_numpy(np.array(results[out])) for out in self.compiled.outputs]
        if self.treespec is not None and self.treespec.num_leaves == len(leaves):
            return pytree.tree_unflatten(leaves, self.treespec)
        return leaves[0] if len(leaves) == 1 else leaves


class OpenVINORuntime:
    """The fp32 model converted once, and candidates quantized and compiled from it."""

    def __init__(self, model: nn.Module, example: Any, calibration: list[Any], threads: int | None = None) -> None:
        require_openvino()
        import logging

        import nncf
        import openvino as ov

        nncf.set_log_level(logging.ERROR)  # NNCF's per-candidate notes and progress bars

        self.core = ov.Core()
        self.threads = threads or torch.get_num_threads()
        with torch.inference_mode():
            _, self.treespec = pytree.tree_flatten(call_model(model, example))
        self.fp32 = convert(model, example)
        self.nodes = layer_nodes(self.fp32, model)
        self.layers = list(self.nodes)
        self.calibration = [_arrays(b) for b in calibration]
        names = [i.get_any_name() for i in self.fp32.inputs]
        self.calibration = [{k: v for k, v in b.items() if k in names} if isinstance(b, dict) else b
                            for b in self.calibration]
        self.transformer = any("attention" in type(m).__name__.lower() for m in model.modules())

    def compile(self, ov_model: Any, precision: str) -> OpenVINOModel:
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": precision}
        start = time.perf_counter()
        compiled = self.core.compile_model(ov_model, "CPU", config)
        return OpenVINOModel(compiled, ov_model, self.treespec, precision, time.perf_counter() - start)

    def reference(self) -> OpenVINOModel:
        return self.compile(self.fp32, "f32")

    def quantized(self, int8: list[str]) -> Any:
        """The fp32 graph with exactly the nodes of `int8` layers quantized, and the products of two
        activations whose feeding layers are all int8; everything else is in NNCF's ignored scope."""
        import nncf

        keep = {self.nodes[name] for name in int8}
        ignored = [op.get_friendly_name() for op in self.fp32.get_ordered_ops()
                   if op.get_type_name() in WEIGHTED + PRODUCTS and not self._quantizes(op, keep)]
        kwargs: dict[str, Any] = {}
        if self.transformer:
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        return nncf.quantize(self.fp32.clone(), nncf.Dataset(self.calibration),
                             subset_size=max(1, sum(_batch_size(b) for b in self.calibration)),
                             ignored_scope=nncf.IgnoredScope(names=ignored, validate=False), **kwargs)

    def _quantizes(self, op: Any, keep: set[str]) -> bool:
        name = op.get_friendly_name()
        if name in self.nodes.values():
            return name in keep
        if op.get_type_name() in PRODUCTS and _weight_constant(op) is None:  # a product of two activations
            feeders = feeding_nodes(op)
            return bool(feeders) and feeders <= keep
        return False  # a weighted node of no autoprec layer stays float

    def candidate(self, policy: Policy) -> OpenVINOModel:
        int8 = int8_layers(policy, self.layers)
        precision = float_precision(policy)
        if precision == "bf16" and not bf16_runs():
            raise UnsupportedFormat("OpenVINO's CPU plugin cannot compile bf16 here (ONEDNN_MAX_CPU_ISA caps its "
                                    "kernels below AVX-512 BF16); give the layers fp32 or int8, or unset the cap")
        ov_model = self.quantized(int8) if int8 else self.fp32
        return self.compile(ov_model, precision)


def _batch_size(batch: Any) -> int:
    arrays = list(batch.values()) if isinstance(batch, dict) else list(batch)
    return int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 1


def feeding_nodes(product: Any, limit: int = 256) -> set[str]:
    """The weighted nodes whose outputs reach the operands of `product` (a matrix product of two
    activations, or attention) through unweighted operations: the layers that make its operands.
    Shape computations are not followed; a walk longer than `limit` nodes gives an empty set."""
    ports = range(min(3, product.get_input_size()))  # SDPA: query, key, value; its mask and scale are not operands
    todo = [product.input(i).get_source_output().get_node() for i in ports]
    seen: set[str] = set()
    found: set[str] = set()
    while todo:
        node = todo.pop()
        if node.get_name() in seen or node.get_type_name() in ("Constant", "Parameter", "ShapeOf"):
            continue
        seen.add(node.get_name())
        if len(seen) > limit:
            return set()
        if node.get_type_name() in WEIGHTED and _weight_constant(node) is not None:
            found.add(node.get_friendly_name())
            continue
        todo.extend(i.get_source_output().get_node() for i in node.inputs())
    return found


def int8_nodes(ov_model: Any) -> set[str]:
    """Weighted nodes whose activation input comes through a FakeQuantize (quantized by NNCF)."""
    out = set()
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in WEIGHTED:
            source = op.input(0).get_source_output().get_node()
            while source.get_type_name() in _LAYOUT:  # NNCF may place the quantizer before a reshape or pool
                source = source.input(0).get_source_output().get_node()
            if source.get_type_name() == "FakeQuantize":
                out.add(op.get_friendly_name())
    return out


def save_ir(spec: Any, policy: Policy, folder: Any) -> Any:
    """Write the candidate of `policy` for the model file `spec` as an OpenVINO IR (model.xml and
    model.bin in `folder`): the fp32 model converted and quantized as the openvino runtime measured it.
    Returns the .xml path."""
    from pathlib import Path

    require_openvino()
    import openvino as ov

    from autoprec.measure.runtime import rebatch_like

    example = spec.example()
    model = spec.new_model()
    runtime = OpenVINORuntime(model, example, rebatch_like(spec.calibration_batches(), example))
    int8 = int8_layers(policy, runtime.layers)
    ov_model = runtime.quantized(int8) if int8 else runtime.fp32
    ov_model.set_rt_info(float_precision(policy), ["runtime_options", "INFERENCE_PRECISION_HINT"])
    path = Path(folder) / "model.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    return path
