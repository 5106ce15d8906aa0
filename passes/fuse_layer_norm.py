"""Rewrite: a LayerNorm spelled out op by op becomes one ``LayerNormalization`` (opset 17).

Exporters for opsets below 17 (torch's TorchScript exporter, paddle2onnx: PP-OCRv4's SVTR
recognizer) have no LayerNormalization op, so they write it as

    m = ReduceMean(x, axes=[-1]);  d = Sub(x, m);  v = ReduceMean(Pow(d, 2), axes=[-1])
    y = Div(d, Sqrt(Add(v, eps)))  [* gamma]  [+ beta]

(``Mul(d, d)`` for the square is matched too). Kept, those are nine float ops per LayerNorm
between quantized tensors; as one ``LayerNormalization`` they are the integer LayerNorm
(I-BERT) that reads the residual stream wide, as for models exported at opset 17.

Algebra: LayerNormalization(x; gamma, beta, axis=-1, epsilon) is exactly that expression
over the last axis; float outputs agree to float32 rounding (tests compare with onnxruntime).

Preconditions: the reductions are over the last axis only, with keepdims; the mean and the
centred tensor feed nothing outside the pattern (the centred tensor is read by the square and
the division only); eps, gamma and beta are constants, gamma and beta of the last axis's size
(or scalars). A model below opset 17 is converted to opset 17 first, only when it has a match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import sole_reader


@dataclass(frozen=True)
class DecomposedLayerNorm:
    x: gs.Tensor
    nodes: tuple[gs.Node, ...]  # every op of the pattern, first to last
    output: gs.Tensor
    epsilon: float
    gamma: np.ndarray | None
    beta: np.ndarray | None


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _only_reader(tensor: gs.Tensor, op: str, graph: gs.Graph) -> gs.Node | None:
    node = sole_reader(tensor, graph)
    return node if node is not None and node.op == op else None


def _reduces_last_axis(node: gs.Node) -> bool:
    if node.op != "ReduceMean" or int(node.attrs.get("keepdims", 1)) != 1:
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:  # opset 18: axes as an input
        axes = _constant(node.inputs[1])
    if axes is None:
        return False
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    rank = len(node.inputs[0].shape or ())
    return axes == [-1] or (rank > 0 and axes == [rank - 1])


def _squares(node: gs.Node, d: gs.Tensor) -> bool:
    if node.op == "Pow":
        exponent = _constant(node.inputs[1])
        return (
            node.inputs[0] is d
            and exponent is not None
            and exponent.size == 1
            and (float(exponent.reshape(())) == 2.0)
        )
    return node.op == "Mul" and node.inputs[0] is d and node.inputs[1] is d


def _other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    """The operand of a two-input op that is not ``tensor``."""
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def _vector(values: np.ndarray | None, size: int | None) -> np.ndarray | None:
    if values is None:
        return None
    flat = values.astype(np.float32).reshape(-1)
    if flat.size == 1 and size is not None:
        return np.full(size, flat[0], np.float32)
    return flat if size is None or flat.size == size else None


def _match(mean: gs.Node, graph: gs.Graph) -> DecomposedLayerNorm | None:
    if not _reduces_last_axis(mean):
        return None
    x = mean.inputs[0]
    sub = _only_reader(mean.outputs[0], "Sub", graph)
    if sub is None or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        return None
    d = sub.outputs[0]
    readers = list({id(n): n for n in d.outputs}.values())  # Mul(d, d) is listed twice
    if d in graph.outputs or len(readers) != 2:
        return None
    square = next((n for n in readers if _squares(n, d)), None)
    div = next((n for n in readers if n.op == "Div" and n.inputs[0] is d), None)
    if square is None or div is None:
        return None
    variance = _only_reader(square.outputs[0], "ReduceMean", graph)
    if variance is None or not _reduces_last_axis(variance):
        return None
    add = _only_reader(variance.outputs[0], "Add", graph)
    eps = _constant(add.inputs[1]) if add is not None else None
    if add is None or eps is None or eps.size != 1:
        return None
    sqrt = _only_reader(add.outputs[0], "Sqrt", graph)
    if sqrt is None or div.inputs[1] is not sqrt.outputs[0] or len(sqrt.outputs[0].outputs) != 1:
        return None
    nodes = [mean, sub, square, variance, add, sqrt, div]
    size = (x.shape or [None])[-1]
    size = size if isinstance(size, int) and size > 0 else None
    gamma = beta = None
    last = div
    mul = _only_reader(div.outputs[0], "Mul", graph)
    if mul is not None:
        gamma = _vector(_constant(_other(mul, div.outputs[0])), size)
        if gamma is not None:
            nodes.append(mul)
            last = mul
            bias = _only_reader(mul.outputs[0], "Add", graph)
            if bias is not None:
                beta = _vector(_constant(_other(bias, mul.outputs[0])), size)
            if bias is not None and beta is not None:
                nodes.append(bias)
                last = bias
    if gamma is None and size is None:
        return None  # LayerNormalization needs a scale of the axis's size
    return DecomposedLayerNorm(
        x, tuple(nodes), last.outputs[0], float(eps.reshape(())), gamma, beta
    )


def find_decomposed_layer_norms(graph: gs.Graph) -> list[DecomposedLayerNorm]:
    found = []
    for node in graph.nodes:
        if node.op == "ReduceMean":
            match = _match(node, graph)
            if match is not None:
                found.append(match)
    return found


def fuse_layer_norms(graph: gs.Graph, matches: list[DecomposedLayerNorm]) -> int:
    """Replace each match by one LayerNormalization (the graph must be at opset >= 17)."""
    for match in matches:
        size = (match.x.shape or [None])[-1]
        gamma = match.gamma if match.gamma is not None else np.ones(int(size), np.float32)
        name = match.nodes[-1].name or match.output.name
        inputs = [match.x, gs.Constant(f"{name}/gamma", gamma)]
        if match.beta is not None:
            inputs.append(gs.Constant(f"{name}/beta", match.beta))
        output = match.output
        for node in match.nodes:
            node.inputs.clear()
            node.outputs.clear()
        attrs = {"axis": -1, "epsilon": match.epsilon}
        graph.nodes.append(gs.Node("LayerNormalization", name, attrs, inputs, [output]))
    if matches:
        graph.cleanup().toposort()
    return len(matches)
