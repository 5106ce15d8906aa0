"""Elementwise float chains on one quantized tensor, as integer lookup tables.

With 8-bit (or narrower) activations a quantized tensor takes at most 256 values. A chain of
elementwise float ops that reads only that tensor ``x`` (and scalar constants) and whose one
result ``y`` is quantized again computes, per element,

    q_y = Q_y(f(DQ_x(q_x)))

a function of the input code alone: a 256-entry table. SiLU (``x * sigmoid(x)``, after every
convolution of YOLO-family detectors), Sigmoid, Tanh, the erf GELU and Mish are all such
chains. The table is computed once here by running the chain's own ONNX nodes in onnxruntime
(the kernels the reference interpreter runs float islands with) on the 256 dequantized codes,
so the integer model returns what the float island would have returned on every input, and
every backend gets an exact integer op instead of float kernels that round differently.

A chain qualifies when (``lookup_chain``):
- its first node reads only ``x``, a quantized tensor of at most 8 bits;
- every node is of an elementwise kind in :data:`ELEMENTWISE`, reads only ``x``, outputs of
  the chain and constants with one element (a per-channel constant would make the function
  depend on the channel);
- exactly one tensor leaves the chain (read outside it or a graph output), and it is quantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from dyadiq.graph import QGraph
from dyadiq.op_facts import OpKind
from dyadiq.quantizers import ActQuant

ELEMENTWISE = frozenset(
    {
        OpKind.SIGMOID,
        OpKind.TANH,
        OpKind.EXP,
        OpKind.ERF,
        OpKind.GELU,
        OpKind.SOFTPLUS,
        OpKind.ELU,
        OpKind.SELU,
        OpKind.MISH,
        OpKind.NEG,
        OpKind.ABS,
        OpKind.RELU,
        OpKind.CLIP,
        OpKind.LEAKY_RELU,
        OpKind.HARD_SIGMOID,
        OpKind.HARD_SWISH,
        OpKind.ADD,
        OpKind.SUB,
        OpKind.MUL,
        OpKind.DIV,
        OpKind.POW,
    }
)
# one input: a table by themselves when quantized on both sides (op_facts makes Sigmoid so)
UNARY = ELEMENTWISE - {OpKind.ADD, OpKind.SUB, OpKind.MUL, OpKind.DIV, OpKind.POW}
MAX_BITS = 8  # a table of 2^bits entries; the container has 256 codes either way


@dataclass(frozen=True)
class LookupChain:
    source: gs.Variable  # x, quantized
    result: gs.Variable  # y, quantized
    nodes: tuple[gs.Node, ...]  # in graph order


def _scalar_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape or ())) == 1


def lookup_chain(
    graph: QGraph,
    start: gs.Node,
    params: Mapping[str, ActQuant],
    skip: frozenset[str] | set[str] = frozenset(),
) -> LookupChain | None:
    """The largest qualifying chain that begins at ``start`` (module docstring), or None.

    ``skip``: node names that belong to something else (e.g. activations fused into a layer).
    """
    if graph.kind(start) not in ELEMENTWISE or start.name in skip:
        return None
    variables = [t for t in start.inputs if isinstance(t, gs.Variable)]
    sources = {t.name for t in variables}
    if len(sources) != 1:
        return None
    source = variables[0]
    q = params.get(source.name)
    if q is None or q.bits > MAX_BITS:
        return None
    if not all(isinstance(t, gs.Variable) or _scalar_constant(t) for t in start.inputs):
        return None
    chain = [start]
    members = {id(start)}
    # growth continues from x and from unquantized outputs only: a tensor the QDQ model
    # quantizes inside the chain would be rounded there, which the table would skip
    frontier = [source, *(t for t in start.outputs if t.name not in params)]
    available = {t.name for t in frontier}
    while frontier:
        tensor = frontier.pop()
        for consumer in tensor.outputs:
            if id(consumer) in members or consumer.name in skip:
                continue
            if graph.kind(consumer) not in ELEMENTWISE:
                continue
            if not all(
                (isinstance(t, gs.Variable) and t.name in available) or _scalar_constant(t)
                for t in consumer.inputs
            ):
                continue
            chain.append(consumer)
            members.add(id(consumer))
            fresh = [t for t in consumer.outputs if t.name not in params]
            available.update(t.name for t in fresh)
            frontier.extend(fresh)
            frontier.append(tensor)  # its other consumers may now have every input
    return _with_one_exit(graph, chain, source, params)


def _with_one_exit(
    graph: QGraph, chain: list[gs.Node], source: gs.Variable, params: Mapping[str, ActQuant]
) -> LookupChain | None:
    """Shrink ``chain`` from its end until exactly one quantized tensor leaves it."""
    graph_outputs = {t.name for t in graph.graph.outputs}
    while chain:
        members = set(map(id, chain))
        exits = [
            t
            for node in chain
            for t in node.outputs
            if t.name in graph_outputs or any(id(c) not in members for c in t.outputs)
        ]
        if len(exits) == 1 and exits[0].name in params:
            order = {id(n): i for i, n in enumerate(graph.graph.nodes)}
            nodes = tuple(sorted(chain, key=lambda n: order[id(n)]))
            return LookupChain(source, exits[0], nodes)
        chain = chain[:-1]
    return None


def lookup_table(
    chain: LookupChain, x: ActQuant, y: ActQuant, signed_container: bool, opset: int
) -> np.ndarray | None:
    """Output code for each input byte: ``Q_y(f(DQ_x(q)))`` for the 256 codes of the input's
    container (codes outside ``[qmin, qmax]`` never occur; they get their clipped code's)."""
    from dyadiq.ort_sessions import Kernels, open_session

    first = -128 if signed_container else 0
    codes = np.clip(np.arange(first, first + 256), x.qmin, x.qmax)
    # as the reference interpreter's Dequantize and onnxruntime's DequantizeLinear: float32
    real = (codes.astype(np.int32) - x.zero_point).astype(np.float32) * np.float32(x.scale)
    constants = {
        t.name: OnnxExporter.export_tensor_proto(t)
        for node in chain.nodes
        for t in node.inputs
        if isinstance(t, gs.Constant)
    }
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [OnnxExporter.export_node(node) for node in chain.nodes],
            "lookup",
            [onnx.helper.make_tensor_value_info(chain.source.name, onnx.TensorProto.FLOAT, [256])],
            [onnx.helper.make_tensor_value_info(chain.result.name, onnx.TensorProto.FLOAT, None)],
            list(constants.values()),
        ),
        opset_imports=[onnx.helper.make_opsetid("", opset)],
    )
    session = open_session(model, kernels=Kernels.EXACT, threads=1)
    (values,) = session.run([chain.result.name], {chain.source.name: real})
    values = np.asarray(values, np.float32).reshape(256)
    if not np.isfinite(values).all():
        return None  # NaN or inf for some code (a Pow or Div outside its domain): float island
    # as the reference interpreter's Quantize: round half to even of the float32 quotient
    quantized = np.round(values / np.float32(y.scale)).astype(np.int64) + y.zero_point
    return np.clip(quantized, y.qmin, y.qmax)
