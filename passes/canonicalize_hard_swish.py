"""Rewrite: spell hard-swish as one ``HardSwish`` node (opset 14) wherever it is decomposed.

Matched forms (x is any tensor; intermediate tensors must have no other consumer):
- ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`` and the ``Mul(..., 1/6)`` variant (PP-OCR);
- ``Mul(x, HardSigmoid(x; alpha=1/6, beta=1/2))``.
Both equal ``x * clip(x + 3, 0, 6) / 6`` exactly in real arithmetic; in float32 they agree with
``HardSwish`` to a few ulps. One node is one quantized op: the integer pipeline gives it a
fixed-point kernel instead of four float islands.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph, sole_reader
from dyadiq.rewrite_report import RewriteReport

MIN_OPSET = 14
_TOL = 1e-6


def _scalar(tensor: gs.Tensor | None) -> float | None:
    if not isinstance(tensor, gs.Constant):
        return None
    try:
        values = np.asarray(tensor.values)
    except ValueError:  # data that does not fit its declared type/shape is not a scalar
        return None
    return float(values.reshape(())) if values.size == 1 else None


def _is(tensor: gs.Tensor | None, value: float) -> bool:
    scalar = _scalar(tensor)
    return scalar is not None and abs(scalar - value) <= _TOL


def _other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    others = [t for t in node.inputs if t is not tensor]
    return others[0] if len(others) == 1 else None


def _match_clip_form(
    clip_in_add: gs.Node, graph: gs.Graph
) -> tuple[gs.Tensor, list[gs.Node], gs.Tensor] | None:
    add = clip_in_add
    x = next((t for t in add.inputs if _scalar(t) is None), None)
    if x is None or not _is(_other(add, x), 3.0):
        return None
    clip = sole_reader(add.outputs[0], graph)
    if clip is None or clip.op != "Clip" or len(clip.inputs) < 3:
        return None
    if not (_is(clip.inputs[1], 0.0) and _is(clip.inputs[2], 6.0)):
        return None
    mul = sole_reader(clip.outputs[0], graph)
    if mul is None or mul.op != "Mul" or _other(mul, clip.outputs[0]) is not x:
        return None
    last = sole_reader(mul.outputs[0], graph)
    if last is None:
        return None
    divides = last.op == "Div" and _is(last.inputs[1], 6.0)
    multiplies = last.op == "Mul" and _is(_other(last, mul.outputs[0]), 1 / 6)
    if not (divides or multiplies):
        return None
    return x, [add, clip, mul, last], last.outputs[0]


def _match_hard_sigmoid_form(
    hsig: gs.Node, graph: gs.Graph
) -> tuple[gs.Tensor, list[gs.Node], gs.Tensor] | None:
    alpha = float(hsig.attrs.get("alpha", 0.2))
    beta = float(hsig.attrs.get("beta", 0.5))
    if abs(alpha - 1 / 6) > _TOL or abs(beta - 0.5) > _TOL:
        return None
    x = hsig.inputs[0]
    mul = sole_reader(hsig.outputs[0], graph)
    if mul is None or mul.op != "Mul" or _other(mul, hsig.outputs[0]) is not x:
        return None
    return x, [hsig, mul], mul.outputs[0]


def canonicalize_hard_swish(graph: QGraph) -> RewriteReport:
    """Rewrite in place (on the caller's copy); the graph must be at opset >= 14."""
    report = RewriteReport("canonicalize_hard_swish")
    if graph.opset < MIN_OPSET:
        report.skip("*", f"opset {graph.opset} < {MIN_OPSET} has no HardSwish")
        return report
    g = graph.graph
    for node in list(g.nodes):
        if node.op == "Add":
            match = _match_clip_form(node, g)
        elif node.op == "HardSigmoid":
            match = _match_hard_sigmoid_form(node, g)
        else:
            continue
        if match is None:
            continue
        x, matched, y = match
        last = matched[-1]
        last.outputs.clear()
        for n in matched:
            n.inputs.clear()
        g.nodes.append(
            gs.Node("HardSwish", f"{matched[0].name}/HardSwish", inputs=[x], outputs=[y])
        )
        report.changed.extend(n.name for n in matched)
    g.cleanup().toposort()
    return report
