"""What ``dyadiq inspect`` reports: op counts, parameters and per-node quantizability."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph
from dyadiq.op_facts import OpKind
from dyadiq.passes.elementwise_lookup import ELEMENTWISE, UNARY


def quantizability(graph: QGraph, node: gs.Node) -> tuple[bool, str]:
    """Whether dyadiq quantizes a node, and the reason in words (with what integer models
    and compiled targets do with it where that differs from the QDQ model)."""
    facts = graph.facts(node)
    weight = graph.weight(node)
    if facts.quantizable and weight is not None:
        island = _integer_island_reason(graph, node, weight)
        if island is not None:
            return (
                True,
                "weighted layer, quantized in QDQ; a float island in --integer and --target: "
                + island,
            )
        return True, "weighted layer: per-channel weights and quantized inputs"
    if facts.quantizable and facts.has_weight:
        return True, "no constant weight: both operands quantized as activations"
    if facts.shares_input_scale:
        return True, "data movement: output shares its input's scale"
    if facts.unifies_input_scales:
        return True, "inputs and output share one scale: an integer op on their codes"
    if facts.quantizable and graph.kind(node) in UNARY:
        return True, "on a quantized input: an integer lookup table of its 256 codes"
    if facts.quantizable:
        return True, "integer op on quantized activations"
    if facts.fusable_activation:
        return False, "activation: fused into the producing layer's quantizer bounds"
    if graph.kind(node) in ELEMENTWISE:
        return False, (
            "elementwise float op: in --integer and --target, a chain of these from one "
            "quantized tensor to another (SiLU, Sigmoid, Tanh, GELU) becomes an integer lookup "
            "table; otherwise it runs in float between DQ and Q"
        )
    return False, f"{node.op} has no integer kernel here: runs in float between DQ and Q"


def _integer_island_reason(graph: QGraph, node: gs.Node, weight: gs.Constant) -> str | None:
    """Why integerize keeps this weighted layer in float, or None (it gets a kernel); the
    same tests integerize applies."""
    from dyadiq.passes.integerize import conv_transpose_blocker

    kind = graph.kind(node)
    if kind is OpKind.CONV_TRANSPOSE:
        return conv_transpose_blocker(node)
    if kind is OpKind.CONV and len(weight.shape) != 4:
        return f"integer Conv is 2-D only, this kernel is {len(weight.shape) - 2}-D"
    return None


def _element_count(constant: gs.Constant) -> int:
    """From the declared shape: counting never reads (or decodes) the tensor's data."""
    return int(math.prod(constant.shape))


def describe(graph: QGraph) -> dict[str, Any]:
    constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    layers = []
    for node in graph.nodes():
        ok, reason = quantizability(graph, node)
        weight = graph.weight(node)
        layers.append(
            {
                "id": node.name,
                "op": node.op,
                "params": _element_count(weight) if weight is not None else 0,
                "quantizable": ok,
                "reason": reason,
            }
        )
    return {
        "source": graph.source,
        "opset": graph.opset,
        "parameters": sum(_element_count(c) for c in constants.values()),
        "op_counts": dict(Counter(node.op for node in graph.nodes()).most_common()),
        "weighted_layers": len(graph.weighted_layers()),
        "layers": layers,
        "notes": graph.notes,
    }
