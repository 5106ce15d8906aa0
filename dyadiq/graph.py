"""The graph every pass works on: an onnx-graphsurgeon Graph with stable node ids and op kinds.

A node's id is its name, made unique and non-empty once at import (``{op_type}_{index}`` for
unnamed or duplicate names). Passes key their reports and plans by these ids; nodes a rewrite
inserts get names derived from the id of the node they serve, so ids of imported nodes never
change. The op kind of each node comes from :mod:`dyadiq.op_facts`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dyadiq.errors import InternalError, UnsupportedModelError
from dyadiq.op_facts import OpFacts, OpKind, facts, onnx_op_kind
from dyadiq.rewrite_report import RewriteReport


@dataclass
class QGraph:
    """A model under quantization: the gs graph plus what import learned about it."""

    graph: gs.Graph
    opset: int
    source: str = "<memory>"
    notes: list[str] = field(default_factory=list)
    rewrites: list[RewriteReport] = field(default_factory=list)  # each rewrite pass's report

    # --- nodes -------------------------------------------------------------------------------
    def nodes(self) -> Iterator[gs.Node]:
        return iter(self.graph.nodes)

    def node(self, node_id: str) -> gs.Node:
        for node in self.graph.nodes:
            if node.name == node_id:
                return node
        raise KeyError(f"no node with id {node_id!r}")

    def node_ids(self) -> list[str]:
        return [node.name for node in self.graph.nodes]

    @staticmethod
    def kind(node: gs.Node) -> OpKind:
        kind = onnx_op_kind(node.domain or "", node.op)
        if kind is None:  # import refuses such graphs, so this means a pass inserted one
            raise UnsupportedModelError(f"node {node.name} has unsupported op {node.op}")
        return kind

    @classmethod
    def facts(cls, node: gs.Node) -> OpFacts:
        return facts(cls.kind(node))

    def weight(self, node: gs.Node) -> gs.Constant | None:
        """The node's constant weight tensor, or None (e.g. activation x activation MatMul)."""
        index = self.facts(node).weight_input
        if index is None or index >= len(node.inputs):
            return None
        tensor = node.inputs[index]
        return tensor if isinstance(tensor, gs.Constant) else None

    def weighted_layers(self) -> list[gs.Node]:
        """Quantizable nodes with a constant weight: the layers a precision plan covers."""
        return [
            n for n in self.graph.nodes if self.facts(n).quantizable and self.weight(n) is not None
        ]

    def consumers(self, tensor: gs.Tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    def producer(self, tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    # --- tensors -----------------------------------------------------------------------------
    def tensors(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    def input_specs(self) -> dict[str, tuple[np.dtype, tuple[int | str | None, ...]]]:
        """Graph inputs: name -> (dtype, shape with str/None for dynamic dims)."""
        return {
            t.name: (np.dtype(t.dtype), tuple(t.shape or ()))
            for t in self.graph.inputs
            if isinstance(t, gs.Variable)
        }

    # --- conversion --------------------------------------------------------------------------
    def to_onnx(self) -> onnx.ModelProto:
        """The graph as a model, dead nodes dropped and topologically sorted. Exports a copy:
        cleanup and toposort would otherwise reorder or drop nodes of a graph that analyses
        are still reading."""
        exported = self.graph.copy().cleanup().toposort()
        model = gs.export_onnx(exported, do_type_check=False)
        model.ir_version = max(model.ir_version, 8)
        return model

    def copy(self) -> QGraph:
        """New nodes and tensors; constant arrays are shared, so rewrites replace, never edit."""
        return QGraph(
            self.graph.copy(), self.opset, self.source, list(self.notes), list(self.rewrites)
        )


def default_opset(model: onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def sole_reader(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The one node that reads ``tensor``, if no other node reads it and it is not a graph
    output: the precondition of every rewrite that fuses a chain of ops into one."""
    if len(tensor.outputs) != 1 or tensor in graph.outputs:
        return None
    return tensor.outputs[0]


def weight_channel_axis(node: gs.Node) -> int:
    """Output-channel axis of a node's weight, resolving attributes such as Gemm's transB."""
    kind = QGraph.kind(node)
    axis = facts(kind).channel_axis
    if axis is None:
        raise InternalError(f"{node.op} has no weight channel axis")
    if kind is OpKind.GEMM:
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return axis


def activation_bounds(node: gs.Node) -> tuple[float, float]:
    """The real interval a Relu or Clip node clamps to (constant bounds only)."""
    if QGraph.kind(node) is OpKind.RELU:
        return 0.0, np.inf
    bounds = [-np.inf, np.inf]
    if "min" in node.attrs:  # opset < 11 keeps bounds as attributes
        bounds = [float(node.attrs["min"]), float(node.attrs.get("max", np.inf))]
    for i, tensor in enumerate(node.inputs[1:3]):
        if isinstance(tensor, gs.Constant):
            bounds[i] = float(np.asarray(tensor.values).reshape(()))
    return bounds[0], bounds[1]


def is_whole_input_average_pool(node: gs.Node) -> bool:
    """An AveragePool whose window is its whole (static) spatial input and that has no pads:
    the same numbers as GlobalAveragePool (ResNet-50's final 7x7 pool in older exports)."""
    if QGraph.kind(node) is not OpKind.AVGPOOL or not node.inputs:
        return False
    shape = node.inputs[0].shape or ()
    spatial = list(shape[2:])
    kernel = list(node.attrs.get("kernel_shape", []))
    pads = list(node.attrs.get("pads", [0] * 2 * len(kernel)))
    static = all(isinstance(d, int) and d > 0 for d in spatial)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return static and kernel == spatial and not any(pads) and auto_pad in ("NOTSET", "VALID")


def assign_stable_ids(graph: gs.Graph) -> None:
    """Give every node a unique, non-empty name: its id for the rest of the pipeline.

    Names that are already unique are kept, so re-importing a graph (after an opset
    conversion that inserts unnamed nodes) never renames a node a plan refers to.
    """
    counts: dict[str, int] = {}
    for node in graph.nodes:
        counts[node.name] = counts.get(node.name, 0) + 1
    taken = {name for name, n in counts.items() if name and n == 1}
    for index, node in enumerate(graph.nodes):
        if node.name and counts[node.name] == 1:
            continue
        name = f"{node.op}_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)


def make_constant(name: str, array: np.ndarray) -> gs.Constant:
    """A graph constant; 4-bit arrays go through onnx's own packing (gs mis-sizes them)."""
    if array.dtype.itemsize == 1 and array.dtype.name in ("int4", "uint4"):
        from onnx import numpy_helper
        from onnx_graphsurgeon.ir.tensor import LazyValues

        return gs.Constant(name, LazyValues(numpy_helper.from_array(array, name)))
    return gs.Constant(name, array)
