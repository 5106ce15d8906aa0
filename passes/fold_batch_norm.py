"""Rewrite: fold inference BatchNormalization into the preceding Conv or Gemm.

For y = BN(conv(x; W, b)) with per-channel gamma, beta, mean mu, variance var and epsilon:
    sigma = sqrt(var + eps),  W' = W * gamma / sigma,  b' = (b - mu) * gamma / sigma + beta.
The unfused form ``Mul(conv, a) -> Add(., c)`` with per-channel constants a, c folds the same
way: W' = W * a, b' = b * a + c; a lone ``Add(conv, c)`` is a bias: b' = b + c.
Preconditions: the conv output has no other consumer, the BN/Mul/Add constants are per output
channel, and the layer's weight is a constant.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.rewrite_report import RewriteReport


def per_channel(values: np.ndarray, channels: int, axis: int, ndim: int) -> np.ndarray | None:
    """A constant that broadcasts per output channel, as a flat (C,) vector, or None."""
    v = np.asarray(values, np.float64)
    if v.size == 1:
        return np.full(channels, float(v.reshape(())))
    if v.size != channels:
        return None
    expected = [1] * ndim
    expected[axis] = channels
    squeezed = [d for d in v.shape]
    if squeezed == expected[-v.ndim :]:  # a (C,) vector is per channel only on the last axis
        return v.reshape(channels)
    return None


def _scale_layer(graph: gs.Graph, layer: gs.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    weight = layer.inputs[1]
    axis = weight_channel_axis(layer) % weight.values.ndim
    shape = [1] * weight.values.ndim
    shape[axis] = -1
    new_w = (np.asarray(weight.values, np.float64) * scale.reshape(shape)).astype(np.float32)
    bias = (
        layer.inputs[2].values
        if len(layer.inputs) > 2 and isinstance(layer.inputs[2], gs.Constant)
        else np.zeros(scale.size)
    )
    bias = np.asarray(bias, np.float64)
    if layer.op == "Gemm":  # Gemm adds beta * C: fold beta into the bias, then beta = 1
        bias = bias * float(layer.attrs.get("beta", 1.0))
        layer.attrs["beta"] = 1.0
    new_b = (bias * scale + shift).astype(np.float32)
    # named after the layer: two layers sharing one weight initializer each get their own
    layer.inputs[1] = gs.Constant(f"{layer.name}_weight_folded", new_w)
    b_const = gs.Constant(f"{layer.name}_bias_folded", new_b)
    if len(layer.inputs) > 2:
        layer.inputs[2] = b_const
    else:
        layer.inputs.append(b_const)


def foldable_layer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The Conv or Gemm whose output ``tensor`` is, when an op reading it can fold into it."""
    if not tensor.inputs or len(tensor.outputs) != 1 or tensor in graph.outputs:
        return None
    layer = tensor.inputs[0]
    if layer.op not in ("Conv", "Gemm") or not isinstance(layer.inputs[1], gs.Constant):
        return None
    if len(layer.inputs) > 2 and not isinstance(layer.inputs[2], gs.Constant):
        return None
    return layer


def _bypass(node: gs.Node, layer: gs.Node) -> None:
    result = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    layer.outputs[0] = result


def fold_batch_norm(graph: QGraph) -> RewriteReport:
    """Fold in place (on the caller's copy of the graph)."""
    report = RewriteReport("fold_batch_norm")
    g = graph.graph
    for node in list(g.nodes):
        if node.op == "BatchNormalization":
            layer = foldable_layer(g, node.inputs[0])
            params = node.inputs[1:5]
            if layer is None or not all(isinstance(p, gs.Constant) for p in params):
                report.skip(node.name, "input is not a foldable Conv/Gemm output")
                continue
            training = int(node.attrs.get("training_mode", 0))  # batch statistics, not params
            if training or (len(node.outputs) > 1 and any(t.outputs for t in node.outputs[1:])):
                report.skip(node.name, "training mode uses batch statistics")
                continue
            gamma, beta, mean, var = (np.asarray(p.values, np.float64) for p in params)
            sigma = np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
            scale = gamma / sigma
            _scale_layer(g, layer, scale, beta - mean * scale)
            _bypass(node, layer)
            report.changed.append(node.name)
        elif node.op == "Mul":
            layer = foldable_layer(g, node.inputs[0])
            const = node.inputs[1] if len(node.inputs) == 2 else None
            if layer is None or not isinstance(const, gs.Constant):
                continue
            channels = layer.inputs[1].values.shape[weight_channel_axis(layer)]
            ndim = len(node.inputs[0].shape or ()) or 4
            a = per_channel(const.values, channels, 1, ndim)
            add = node.outputs[0].outputs[0] if len(node.outputs[0].outputs) == 1 else None
            c = None
            if add is not None and add.op == "Add" and isinstance(add.inputs[1], gs.Constant):
                c = per_channel(add.inputs[1].values, channels, 1, ndim)
            if a is None or c is None or add is None or node.outputs[0] in g.outputs:
                report.skip(node.name, "not a per-channel Mul -> Add after a layer")
                continue
            _scale_layer(g, layer, a, c)
            _bypass(node, layer)
            _bypass(add, layer)
            report.changed.extend([node.name, add.name])
        elif node.op == "Add" and len(node.inputs) == 2:
            # Caffe2 exports keep a convolution's bias as a per-channel Add after it
            # (DenseNet-121: Conv -> Add -> Relu); folded, the Relu fuses into the layer
            variable, const = sorted(node.inputs, key=lambda t: isinstance(t, gs.Constant))
            layer = foldable_layer(g, variable)
            if layer is None or not isinstance(const, gs.Constant):
                continue
            channels = layer.inputs[1].values.shape[weight_channel_axis(layer)]
            ndim = len(variable.shape or ()) or 4
            c = per_channel(const.values, channels, 1, ndim)
            if c is None or node.outputs[0] in g.outputs:
                continue
            _scale_layer(g, layer, np.ones(channels), c)
            _bypass(node, layer)
            report.changed.append(node.name)
    g.cleanup().toposort()
    return report
