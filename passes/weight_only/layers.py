"""Which weights a weight-only quantizer may touch, read off an ONNX graph.

A *weight* is one float32 initializer that feeds, directly or through a 2-D ``Transpose``,
the weight input of ``MatMul`` / ``Gemm`` nodes or the table input of ``Gather`` nodes.
Each weight is one layer for quantization and allocation, however many nodes read it: a
token embedding tied to the LM head (``Gather(E)`` and ``MatMul(x, Transpose(E))``) is one
layer, quantized once and stored once.

Every weight is seen as a matrix W [R, K] with K the input dimension its groups run along:

- ``MatMul(x, B)`` with B [K, N] (and ``Gemm`` without ``transB``): W = B^T;
- ``MatMul(x, Transpose(E))`` (and ``Gemm`` with ``transB``): W = E;
- ``Gather(E, ids)`` (axis 0): W = E, one row per token, groups along the embedding.

A weight read in two incompatible orientations (B by one MatMul, B^T by another) is skipped
with its reason, as is anything not 2-D or not float32.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


class Orientation(enum.Enum):
    """How the stored initializer relates to W [R, K]."""

    TRANSPOSED = "transposed"  # stored as W^T [K, R] (a MatMul weight B)
    ROWS = "rows"  # stored as W [R, K] (an embedding table, a transB Gemm weight)


class Use(enum.Enum):
    MATMUL = "matmul"  # a product with activations: has a Hessian E[x x^T]
    GATHER = "gather"  # rows looked up by index: no input statistics


@dataclass(frozen=True)
class Reader:
    node: str  # node name
    use: Use
    activation: str | None  # the MatMul / Gemm activation input (None for Gather)
    op: str = ""  # the node's op type


@dataclass(frozen=True)
class WeightLayer:
    """One quantizable weight: its id (the first reader's node name), initializer name,
    orientation, shape of W [R, K] and every node reading it."""

    id: str
    initializer: str
    orientation: Orientation
    rows: int
    columns: int
    readers: tuple[Reader, ...]

    @property
    def tied(self) -> bool:
        return len(self.readers) > 1

    @property
    def activations(self) -> tuple[str, ...]:
        """The activation tensors its MatMul readers multiply (the Hessian's inputs)."""
        return tuple(r.activation for r in self.readers if r.activation is not None)

    @property
    def params(self) -> int:
        return self.rows * self.columns

    def matrix(self, stored: np.ndarray) -> np.ndarray:
        """W [R, K] from the stored initializer."""
        return stored.T if self.orientation is Orientation.TRANSPOSED else stored

    def stored(self, matrix: np.ndarray) -> np.ndarray:
        """The initializer's layout of W [R, K] (inverse of :meth:`matrix`)."""
        return np.ascontiguousarray(
            matrix.T if self.orientation is Orientation.TRANSPOSED else matrix
        )


@dataclass(frozen=True)
class WeightInventory:
    layers: tuple[WeightLayer, ...]
    skipped: Mapping[str, str]  # initializer -> why it is not quantized

    def by_id(self) -> dict[str, WeightLayer]:
        return {layer.id: layer for layer in self.layers}


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _transposed_initializers(
    model: onnx.ModelProto, floats: Mapping[str, onnx.TensorProto]
) -> dict[str, str]:
    """Output of a 2-D ``Transpose`` of a float initializer -> that initializer."""
    out = {}
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.input[0]
        perm = [a.ints for a in node.attribute if a.name == "perm"]
        if source in floats and len(floats[source].dims) == 2 and (not perm or perm[0] == [1, 0]):
            out[node.output[0]] = source
    return out


def find_weights(model: onnx.ModelProto) -> WeightInventory:
    """Every weight-only candidate of ``model`` (main graph), in first-reader order."""
    floats = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    through_transpose = _transposed_initializers(model, floats)
    seen: dict[str, list[tuple[Reader, Orientation]]] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        found: tuple[str, Orientation, Use, str | None] | None = None
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2:
            name = node.input[1]
            flipped = node.op_type == "Gemm" and _attribute(node, "transB", 0) == 1
            if node.op_type == "Gemm" and _attribute(node, "transA", 0) == 1:
                continue  # x^T W: the activation's rows are not samples
            if name in floats:
                orient = Orientation.ROWS if flipped else Orientation.TRANSPOSED
                found = (name, orient, Use.MATMUL, node.input[0])
            elif name in through_transpose:
                orient = Orientation.TRANSPOSED if flipped else Orientation.ROWS
                found = (through_transpose[name], orient, Use.MATMUL, node.input[0])
        elif (
            node.op_type == "Gather"
            and node.input[0] in floats
            and _attribute(node, "axis", 0) == 0
        ):
            found = (node.input[0], Orientation.ROWS, Use.GATHER, None)
        if found is not None:
            name, orient, use, activation = found
            reader = Reader(node.name, use, activation, node.op_type)
            seen.setdefault(name, []).append((reader, orient))
    layers: list[WeightLayer] = []
    skipped: dict[str, str] = {}
    for name, readers in seen.items():
        tensor = floats[name]
        orientations = {o for _, o in readers}
        if len(tensor.dims) != 2:
            skipped[name] = f"{len(tensor.dims)}-D weight (weight-only handles 2-D matrices)"
            continue
        if len(orientations) > 1:
            skipped[name] = "read both as W and as W^T by different nodes"
            continue
        orient = orientations.pop()
        k_first = orient is Orientation.TRANSPOSED
        rows, columns = (tensor.dims[1], tensor.dims[0]) if k_first else tuple(tensor.dims)
        matmul_first = sorted(readers, key=lambda r: r[0].use is not Use.MATMUL)
        layers.append(
            WeightLayer(
                id=matmul_first[0][0].node,
                initializer=name,
                orientation=orient,
                rows=int(rows),
                columns=int(columns),
                readers=tuple(r for r, _ in readers),
            )
        )
    return WeightInventory(tuple(layers), skipped)


def matches(layer: WeightLayer, pattern: str) -> bool:
    """``--exclude`` semantics: a layer id, a glob over its id, initializer or reader node
    names, or the op type of one of its readers (``Gather`` keeps a tied table in float)."""
    names = [layer.id, layer.initializer, *(r.node for r in layer.readers)]
    return any(fnmatch.fnmatchcase(n, pattern) for n in names) or any(
        r.op == pattern for r in layer.readers
    )


def weight_matrix(model: onnx.ModelProto, layer: WeightLayer) -> np.ndarray:
    """W [R, K] (float32) of ``layer`` from ``model``'s initializer (external data loaded)."""
    tensor = next(t for t in model.graph.initializer if t.name == layer.initializer)
    return np.asarray(layer.matrix(numpy_helper.to_array(tensor)), np.float32)
