"""Rewrite rule: a token embedding sum -> :class:`ip.Embedding` (wide int32 codes).

BERT-style embeddings are ``Gather(table, ids)`` plus constant rows (position and token-type
embeddings, folded to constants by the exporter), summed before a LayerNormalization. The QDQ
simulator keeps that sum in float. As integers: each row i of the table becomes int8 codes at
its own scale s_i = max|row_i| / 127 (floored at max_i s_i / 2^``ROW_SCALE_RANGE_BITS``, so
that a near-zero row cannot make the output scale vanish), the output scale is
s_o = min_i s_i / 2^``EMBEDDING_SHIFT``, the constants are summed and rounded at s_o, and

    out = table_codes[ids] * row_scales[ids] + offset_codes    (int32, exact;
                                                                 row_scales = round(s_i / s_o))

which the integer LayerNorm reads as it reads the wide residual stream. The rule applies when
the LayerNorm's input is exactly such a chain: a Gather on axis 0 of a constant 2-D table by
integer ids, then Adds of one constant each, every intermediate read by the next op only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq import integer_program as ip
from dyadiq.quantizers import ActQuant

EMBEDDING_SHIFT = 10  # bits the output scale keeps below the finest row's
ROW_SCALE_RANGE_BITS = 12  # the finest row scale allowed below the coarsest one
INT32_MARGIN = 2**31 - 1


@dataclass(frozen=True)
class EmbeddingSum:
    gather: gs.Node
    adds: tuple[gs.Node, ...]  # in graph order
    ids: gs.Variable
    table: np.ndarray  # float [V, D]
    offset: np.ndarray  # float: the sum of the added constants


def find_embedding_sum(tensor: gs.Tensor) -> EmbeddingSum | str:
    """``tensor`` as ``Gather(constant table, ids) + constant + ...``, or why it is not."""
    adds: list[gs.Node] = []
    constants: list[np.ndarray] = []
    current = tensor
    while True:
        if len(current.inputs) != 1:
            return "its input is not computed by one node"
        node = current.inputs[0]
        if node.op == "Add":
            fixed = [t for t in node.inputs if isinstance(t, gs.Constant)]
            data = [t for t in node.inputs if isinstance(t, gs.Variable)]
            if len(fixed) != 1 or len(data) != 1 or len(data[0].outputs) != 1:
                return "an Add of the embedding sum adds no single constant"
            adds.append(node)
            constants.append(np.asarray(fixed[0].values, np.float64))
            current = data[0]
            continue
        if node.op != "Gather":
            return "its input is not a Gather of a constant table plus constants"
        table, ids = node.inputs[0], node.inputs[1]
        if not isinstance(table, gs.Constant) or np.asarray(table.values).ndim != 2:
            return "the Gather's table is not a constant matrix"
        if int(node.attrs.get("axis", 0)) != 0:
            return "the Gather does not pick rows"
        if not isinstance(ids, gs.Variable) or ids.dtype is None:
            return "the Gather's ids are not a typed tensor"
        if not np.issubdtype(np.dtype(ids.dtype), np.integer):
            return "the Gather's ids are not integers"
        break
    offset = np.zeros((), np.float64)
    for constant in constants:
        offset = offset + constant
    return EmbeddingSum(
        node, tuple(reversed(adds)), ids, np.asarray(table.values, np.float64), offset
    )


def integer_embedding(found: EmbeddingSum, output: str) -> tuple[ip.Embedding, ActQuant] | str:
    """The integer op writing ``output`` and its wide quantizer, or why the sum does not fit
    int32 codes."""
    largest = np.abs(found.table).max(axis=1) / 127.0
    coarsest = float(largest.max(initial=0.0))
    if coarsest <= 0:
        largest = np.ones_like(largest)
        coarsest = 1.0
    row_scale = np.maximum(largest, coarsest / 2**ROW_SCALE_RANGE_BITS)
    codes = np.clip(np.round(found.table / row_scale[:, None]), -127, 127).astype(np.int8)
    scale = float(row_scale.min()) / 2**EMBEDDING_SHIFT
    multipliers = np.round(row_scale / scale).astype(np.int64)
    offset = np.round(found.offset / scale)
    bound = 127 * float(multipliers.max()) + float(np.abs(offset).max(initial=0.0))
    if bound > INT32_MARGIN:
        return "the embedding constants are too large for int32 codes at the table's scale"
    op = ip.Embedding(
        output, found.ids.name, codes, multipliers.astype(np.int32), offset.astype(np.int32)
    )
    return op, ActQuant(scale, 0, ip.WIDE_BITS, True)
