"""Rewrite: a per-channel affine map that no layer absorbs becomes a depthwise 1x1 Conv.

DenseNet-121 and Inception v2 (Caffe2 exports) normalise the output of a Concat or a MaxPool:
``BatchNormalization`` then ``Mul(x, a)`` and ``Add(x, b)`` with per-channel constants. With
no Conv before them, ``fold_batch_norm`` cannot fold them, and as ops on one quantized and one
constant operand they have no integer kernel, so each ran in float between DQ and Q (186 float
ops on DenseNet-121).

The chain is one affine map per channel, ``y = a_c x + b_c``, which is exactly a depthwise
convolution with 1x1 kernels ``a_c`` and bias ``b_c``. A Conv is a weighted layer: it is
quantized per channel (a single weight per channel is represented exactly, at its channel's
full-scale code), takes the Relu after it as clip bounds, and runs in the integer program like
any depthwise conv.

Algebra: ``BatchNormalization(x; gamma, beta, mean, var, eps)`` is ``a = gamma / sqrt(var +
eps)``, ``b = beta - mean a``; a following ``Mul(., m)`` gives ``a m, b m`` and ``Add(., c)``
gives ``b + c``. The float outputs agree with the original ops to float32 rounding (a few ulps;
tests compare with onnxruntime).

Preconditions:
- the chain starts at a BatchNormalization in inference form (one output, constant
  statistics); a lone Mul by a constant is left alone, since hard-swish, GELU and attention
  scaling are matched as such later;
- a rank-4 NCHW input with a static channel count, and per-channel (or scalar) constants;
- every intermediate output is read only by the next op of the chain and is not a graph output;
- a chain that is the only reader of a Conv or Gemm output is left to ``fold_batch_norm``,
  which folds it into that layer's weights instead (Inception v2 feeds one Conv output to
  three BatchNormalizations: those it cannot fold).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import sole_reader
from dyadiq.op_facts import OpKind, onnx_op_kind
from dyadiq.passes.fold_batch_norm import foldable_layer, per_channel


def _channels(tensor: gs.Tensor) -> int | None:
    shape = tensor.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or shape[1] <= 0:
        return None
    return int(shape[1])


def _per_channel(tensor: gs.Tensor, channels: int) -> np.ndarray | None:
    """A constant that broadcasts over NCHW per channel, as a (C,) vector (the test
    ``fold_batch_norm`` applies to the same constants)."""
    if not isinstance(tensor, gs.Constant):
        return None
    return per_channel(np.asarray(tensor.values), channels, 1, 4)


def _batch_norm(node: gs.Node, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    if len(node.outputs) != 1 or len(node.inputs) != 5:
        return None
    params = [node.inputs[i] for i in range(1, 5)]
    if not all(isinstance(p, gs.Constant) for p in params):
        return None
    gamma, beta, mean, var = (np.asarray(p.values, np.float64).reshape(-1) for p in params)
    if not all(v.size == channels for v in (gamma, beta, mean, var)):
        return None
    scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return scale, beta - mean * scale


def _step(node: gs.Node, x: gs.Tensor, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The (a, b) of one op of the chain applied to ``x``, or None if it is not affine."""
    kind = onnx_op_kind(node.domain or "", node.op)
    if kind is OpKind.BATCH_NORM and node.inputs[0] is x:
        return _batch_norm(node, channels)
    if kind in (OpKind.MUL, OpKind.ADD) and len(node.inputs) == 2 and x in node.inputs:
        other = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
        values = _per_channel(other, channels)
        if values is None:
            return None
        if kind is OpKind.MUL:
            return values, np.zeros(channels)
        return np.ones(channels), values
    return None


def _folded_into_layer(graph: gs.Graph, x: gs.Tensor, channels: int) -> bool:
    """Whether ``fold_batch_norm`` folds the op reading ``x`` into a layer: ``x`` is a Conv
    or Gemm output, possibly through the per-channel Adds and Mul -> Add pairs it folds
    first (a Mul alone it leaves)."""
    reached_by_add = False
    while x.inputs and foldable_layer(graph, x) is None:
        producer = x.inputs[0]
        variables = [t for t in producer.inputs if isinstance(t, gs.Variable)]
        if len(variables) != 1 or sole_reader(x, graph) is None:
            return False
        folds_with_next = producer.op == "Add" or (producer.op == "Mul" and reached_by_add)
        if not folds_with_next or _step(producer, variables[0], channels) is None:
            return False
        reached_by_add = producer.op == "Add"
        x = variables[0]
    return foldable_layer(graph, x) is not None


def per_channel_affine_as_depthwise(graph: gs.Graph) -> int:
    """Rewrite every maximal affine chain (see the module docstring) in place; returns how
    many depthwise convolutions replaced them."""
    replaced = 0
    for start in list(graph.nodes):
        if start.op != "BatchNormalization" or not start.inputs or not start.outputs:
            continue
        x = start.inputs[0]
        channels = _channels(x)
        if channels is None:
            continue
        if _folded_into_layer(graph, x, channels):
            continue  # fold_batch_norm folds it into the layer's weights instead
        scale, shift = np.ones(channels), np.zeros(channels)
        chain: list[gs.Node] = []
        node: gs.Node | None = start
        current = x
        while node is not None:
            step = _step(node, current, channels)
            if step is None:
                break
            a, b = step
            scale, shift = scale * a, shift * a + b
            chain.append(node)
            current = node.outputs[0]
            node = sole_reader(current, graph)
        if not chain:
            continue  # not an inference BatchNormalization with constant statistics
        out = chain[-1].outputs[0]
        name = f"{out.name}/depthwise"  # tensor names are unique; node names may be empty
        weight = gs.Constant(f"{name}/W", scale.reshape(channels, 1, 1, 1).astype(np.float32))
        bias = gs.Constant(f"{name}/B", shift.astype(np.float32))
        conv = gs.Node(
            "Conv", name, {"group": channels, "kernel_shape": [1, 1]}, [x, weight, bias], [out]
        )
        for member in chain:
            member.outputs.clear()
            member.inputs.clear()
        graph.nodes.append(conv)
        replaced += 1
    if replaced:
        graph.cleanup().toposort()
    return replaced
