"""Analysis: which activation tensors a plan quantizes, and which must share a scale.

Rules (onnxruntime's QDQ layout, so its kernels can fuse the result):
- a quantized op (a weighted layer in the plan, or a non-weighted quantizable op such as
  pooling, activation x activation MatMul, Concat) quantizes its float activation inputs and
  its output; elementwise Add/Mul only when every non-constant input comes out of a quantized
  op (a residual Add between two convs, not an attention-mask Add); a wide-input op
  (LayerNorm) quantizes only its output, and a residual Add that feeds only such an op is
  not quantized (the integer op sums the Add's two inputs wide);
- when that output's only consumer is a fusable activation (Relu, Clip with constant bounds),
  the activation's output is quantized instead, so the bounds become the quantizer's range;
- scale-sharing ops (MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze) whose input is
  quantized get a quantized output in the same scale group; Concat, Max and Min put all their
  inputs and their output in one group (``unifies_input_scales``). A group is calibrated over
  the union of its members' ranges.
The bit-width of a group is the largest activation width any consumer in the plan asks for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph
from dyadiq.op_facts import OpKind
from dyadiq.plan import PrecisionPlan


@dataclass(frozen=True)
class ActivationSites:
    tensors: tuple[str, ...]  # quantized float tensors, in graph order
    group_of: Mapping[str, int]  # tensor -> scale group
    group_bits: Mapping[int, int]
    fused_activations: Mapping[str, str]  # layer id -> id of the activation it absorbs
    fused_biases: Mapping[str, str] = field(default_factory=dict)  # MatMul id -> bias Add id
    float_layers: tuple[tuple[str, str], ...] = field(default=())  # (node id, reason)

    def groups(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for tensor in self.tensors:
            out.setdefault(self.group_of[tensor], []).append(tensor)
        return out


def _is_float_activation(tensor: gs.Tensor) -> bool:
    if not isinstance(tensor, gs.Variable) or tensor.dtype is None:
        return False
    try:
        return np.dtype(tensor.dtype) == np.float32
    except TypeError:  # an ONNX type numpy has no dtype for (bfloat16, float8): not float32
        return False


def _has_constant_bounds(node: gs.Node) -> bool:
    if QGraph.kind(node) is not OpKind.CLIP:
        return True
    return all(isinstance(t, gs.Constant) or t.name == "" for t in node.inputs[1:])


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, x: str) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.add(a)
        self.add(b)
        self.parent[self.find(a)] = self.find(b)


def _data_inputs(graph: QGraph, node: gs.Node) -> list[gs.Tensor]:
    """Inputs that carry activations (not the weight, bias or shape operands)."""
    facts = graph.facts(node)
    kind = graph.kind(node)
    if kind in (OpKind.RESHAPE, OpKind.SQUEEZE, OpKind.UNSQUEEZE):
        return node.inputs[:1]
    skip = {facts.weight_input, facts.bias_input} if graph.weight(node) is not None else set()
    return [t for i, t in enumerate(node.inputs) if i not in skip]


def _bias_add(graph: QGraph, node: gs.Node, graph_outputs: set[str]) -> gs.Node | None:
    """A constant per-output-channel Add right after a weighted MatMul (transformers' bias)."""
    weight = graph.weight(node)
    if graph.kind(node) is not OpKind.MATMUL or weight is None:
        return None
    output = node.outputs[0]
    if len(output.outputs) != 1 or output.name in graph_outputs:
        return None
    add = output.outputs[0]
    constants = [t for t in add.inputs if isinstance(t, gs.Constant)]
    if graph.kind(add) is not OpKind.ADD or len(constants) != 1:
        return None
    bias = np.asarray(constants[0].values)
    channels = weight.values.shape[-1]
    return add if bias.size == channels and bias.shape[-1] == channels else None


def _is_quantized_op(graph: QGraph, node: gs.Node, plan: PrecisionPlan) -> bool:
    facts = graph.facts(node)
    if not facts.quantizable or (facts.shares_input_scale and not facts.unifies_input_scales):
        return False
    if graph.weight(node) is not None:
        return node.name in plan.layers
    return node.name not in plan.excluded


def _feeds_wide_input(graph: QGraph, node: gs.Node, graph_outputs: set[str]) -> bool:
    """An Add whose output only a wide-input op (LayerNorm) reads: not quantized itself."""
    if graph.kind(node) is not OpKind.ADD or len(node.outputs) != 1:
        return False
    output = node.outputs[0]
    consumers = output.outputs
    return (
        output.name not in graph_outputs
        and len(consumers) == 1
        and graph.facts(consumers[0]).wide_input
    )


def find_activation_sites(graph: QGraph, plan: PrecisionPlan) -> ActivationSites:
    plan.validate_for(graph)
    graph.graph.toposort()
    uf = _UnionFind()
    order: list[str] = []
    fused: dict[str, str] = {}
    biases: dict[str, str] = {}
    quantized_outputs: set[str] = set()  # produced by a quantized op, or shared from one
    graph_outputs = {t.name for t in graph.graph.outputs}

    def mark(tensor: gs.Tensor) -> bool:
        if not _is_float_activation(tensor):
            return False
        if tensor.name not in uf.parent:
            uf.add(tensor.name)
            order.append(tensor.name)
        return True

    float_layers = [
        (n.name, "excluded by the plan" if n.name in plan.excluded else "not in the plan")
        for n in graph.weighted_layers()
        if n.name not in plan.layers
    ]
    for node in graph.nodes():
        facts = graph.facts(node)
        variable_inputs = [t for t in node.inputs if isinstance(t, gs.Variable)]
        if facts.needs_quantized_inputs and not all(
            t.name in quantized_outputs for t in variable_inputs
        ):
            continue
        if _feeds_wide_input(graph, node, graph_outputs):
            continue  # summed inside the wide-input op (its inputs are quantized already)
        if _is_quantized_op(graph, node, plan):
            wide = facts.wide_input
            inputs = [t for t in _data_inputs(graph, node) if not wide and mark(t)]
            output = node.outputs[0]
            bias = _bias_add(graph, node, graph_outputs) if node.name in plan.layers else None
            if bias is not None:  # the integer layer adds it to its int32 accumulator
                biases[node.name] = bias.name
                output = bias.outputs[0]
            consumers = output.outputs
            if (
                len(consumers) == 1
                and output.name not in graph_outputs
                and graph.facts(consumers[0]).fusable_activation
                and _has_constant_bounds(consumers[0])
                and not facts.unifies_input_scales  # a clipped output would clip the inputs' group
            ):
                fused[node.name] = consumers[0].name
                output = consumers[0].outputs[0]
            if mark(output):
                quantized_outputs.add(output.name)
                if facts.unifies_input_scales:
                    for tensor in inputs:
                        uf.union(tensor.name, output.name)
        elif (
            facts.shares_input_scale
            and node.inputs
            and node.inputs[0].name in uf.parent
            and mark(node.outputs[0])
        ):
            uf.union(node.outputs[0].name, node.inputs[0].name)
            quantized_outputs.add(node.outputs[0].name)
        elif (
            facts.fusable_activation
            and node.name not in fused.values()
            and node.inputs
            and node.inputs[0].name in quantized_outputs
            and _has_constant_bounds(node)
            and mark(node.outputs[0])
        ):
            # a Relu / Clip no layer absorbs (after a Concat, whose group it would clip): its
            # own output range, and integerize requantizes and clips the input's codes
            quantized_outputs.add(node.outputs[0].name)

    roots: dict[str, int] = {}
    group_of = {t: roots.setdefault(uf.find(t), len(roots)) for t in order}
    tensors = graph.tensors()
    group_bits: dict[int, int] = {}
    for name in order:
        wanted = [
            plan.layers[c.name].act_bits if c.name in plan.layers else plan.default_act_bits
            for c in tensors[name].outputs
        ] or [plan.default_act_bits]
        gid = group_of[name]
        group_bits[gid] = max(group_bits.get(gid, 0), *wanted)
    return ActivationSites(
        tensors=tuple(order),
        group_of=group_of,
        group_bits=group_bits,
        fused_activations=fused,
        fused_biases=biases,
        float_layers=tuple(float_layers),
    )
