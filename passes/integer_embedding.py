"""Rewrite rule: a token embedding sum -> :class:`ip.Embedding` (wide int32 codes).

BERT-style embeddings are ``Gather(table, ids)`` plus constant rows (position and token-type
embeddings, folded to constants by the exporter), summed before a LayerNormalization. The QDQ
simulator keeps that sum in float. As integers: the table becomes int8 codes at one scale
s_t = max|table| / 127, the constants are summed and rounded at the finer output scale
s_t / 2^``EMBEDDING_SHIFT``, and the sum is

    out = table_codes[ids] * 2^shift + offset_codes        (int32, exact)

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

EMBEDDING_SHIFT = 10  # bits the constants' rows keep below the table's own scale
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
    largest = float(np.abs(found.table).max())
    table_scale = largest / 127.0 if largest > 0 else 1.0
    codes = np.clip(np.round(found.table / table_scale), -127, 127).astype(np.int8)
    scale = table_scale / 2**EMBEDDING_SHIFT
    offset = np.round(found.offset / scale)
    if 127 * 2**EMBEDDING_SHIFT + float(np.abs(offset).max(initial=0.0)) > INT32_MARGIN:
        return "the embedding constants are too large for int32 codes at the table's scale"
    op = ip.Embedding(output, found.ids.name, codes, EMBEDDING_SHIFT, offset.astype(np.int32))
    return op, ActQuant(scale, 0, ip.WIDE_BITS, True)
