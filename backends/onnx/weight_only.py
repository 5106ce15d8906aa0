"""Weight-only models in ONNX: group-wise integer weights, float activations.

Two forms of the same codes and scales (:class:`dyadiq.passes.weight_only.groupwise
.GroupwiseWeight`), each computing exactly ``s (q - z)`` for every weight:

- ``dequantize-linear``: the standard form. Each weight becomes a blocked
  ``DequantizeLinear`` (opset 21 ``block_size``) of int4 / uint4 codes (int8 / uint8 above 4
  bits) whose output carries the old initializer's name, so every reader (MatMul, Gather,
  the tied LM head's Transpose) is unchanged and a tied weight is still stored once.
- ``matmul-nbits``: onnxruntime's contrib ops. A 4-bit weight read only by MatMul and Gather
  nodes is packed once, two codes a byte, low nibble first, as
  ``[N, K / block, block / 2]`` uint8 with scales [N, K / block] and packed uint4 zero
  points [N, ceil(K / block / 2)]; each MatMul becomes ``MatMulNBits`` and each Gather
  ``GatherBlockQuantized`` of a Reshape of the same packed tensor (the tied embedding and
  LM head share one copy). Other weights (other widths, Gemm readers, a Gather over a
  partial last block) fall back to the first form, and the report says which.

Salient input columns (:mod:`dyadiq.passes.weight_only.salient`) add, in both forms, a side
path per reader; their group-wise codes are zero points (exactly 0), so the group-wise part
is unchanged in layout and the sum is the weight's value:

- a MatMul reader ``y = x W^T`` becomes ``y_main + Gather(x, columns, axis=-1) @ S^T``;
- a Gather reader (an embedding) ``y = W[ids]`` becomes ``y_main + S[ids] @ P``, with P
  [k, K] the one-hot placement of the k columns (a product with ones and zeros: exact);

with S [R, k] = ``DequantizeLinear`` of the int8 codes (per-row scales, axis 0), stored once
per weight (a tied table's embedding and LM head share it).

The returned header still points at the source model's external data for the tensors it
did not replace; the caller materialises and saves it (:func:`dyadiq.io.save_model_atomic`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dyadiq.errors import ConfigError
from dyadiq.passes.weight_only.groupwise import GroupwiseWeight
from dyadiq.passes.weight_only.layers import Orientation, Use, WeightLayer
from dyadiq.passes.weight_only.salient import SalientColumns

BLOCKED_DQ_OPSET = 21
INT4_IR_VERSION = 10
MS_DOMAIN = "com.microsoft"


class WeightOnlyForm(StrEnum):
    DEQUANTIZE_LINEAR = "dequantize-linear"
    MATMUL_NBITS = "matmul-nbits"


@dataclass
class ExportReport:
    form: WeightOnlyForm
    as_matmul_nbits: list[str] = field(default_factory=list)
    as_dequantize_linear: list[str] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)  # layer -> why not MatMulNBits
    salient: dict[str, int] = field(default_factory=dict)  # layer -> its 8-bit input columns

    def to_json(self) -> dict[str, object]:
        return {
            "form": str(self.form),
            "matmul_nbits": self.as_matmul_nbits,
            "dequantize_linear": self.as_dequantize_linear,
            "fallbacks": self.fallbacks,
            "salient_columns": self.salient,
        }


def _code_type(q: GroupwiseWeight) -> int:
    small = q.format.bits <= 4
    if q.format.symmetric:
        return TensorProto.INT4 if small else TensorProto.INT8
    return TensorProto.UINT4 if small else TensorProto.UINT8


def _typed(name: str, values: np.ndarray, data_type: int) -> TensorProto:
    """An initializer of ``data_type`` (int4 / uint4 packed by onnx) from integer values."""
    if data_type in (TensorProto.INT8, TensorProto.UINT8):
        dtype = np.int8 if data_type == TensorProto.INT8 else np.uint8
        return numpy_helper.from_array(values.astype(dtype), name)
    # ONNX stores 4-bit tensors two a byte, the first element in the low nibble (two's
    # complement nibbles for int4), the last byte zero-padded
    flat = (values.reshape(-1).astype(np.int16) & 15).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    tensor = TensorProto(name=name, data_type=data_type, dims=list(values.shape))
    tensor.raw_data = (flat[0::2] | (flat[1::2] << 4)).tobytes()
    return tensor


def _dequantize_linear(
    layer: WeightLayer, q: GroupwiseWeight
) -> tuple[list[TensorProto], onnx.NodeProto]:
    """Initializers and the blocked DequantizeLinear node producing ``layer``'s float
    weight under its original name."""
    transposed = layer.orientation is Orientation.TRANSPOSED
    codes = q.codes.T if transposed else q.codes
    scales = q.scales.T if transposed else q.scales
    base = layer.initializer
    data_type = _code_type(q)
    inits = [
        _typed(f"{base}_wq", np.ascontiguousarray(codes), data_type),
        numpy_helper.from_array(np.ascontiguousarray(scales, np.float32), f"{base}_ws"),
    ]
    inputs = [inits[0].name, inits[1].name]
    if not q.format.symmetric:
        zeros = q.zero_points.T if transposed else q.zero_points
        inits.append(_typed(f"{base}_wz", np.ascontiguousarray(zeros), data_type))
        inputs.append(inits[2].name)
    node = helper.make_node(
        "DequantizeLinear",
        inputs,
        [base],
        name=f"{layer.id}/weight_dequantize",
        axis=0 if transposed else 1,
        block_size=q.format.group_size,
    )
    return inits, node


def pack_uint4(codes: np.ndarray, block: int) -> np.ndarray:
    """Unsigned 4-bit codes [N, K] as MatMulNBits' B [N, ceil(K / block), block / 2] uint8:
    two codes a byte, the first in the low nibble, the last block zero-padded."""
    rows, columns = codes.shape
    blocks = -(-columns // block)
    padded = np.zeros((rows, blocks * block), np.uint8)
    padded[:, :columns] = codes.astype(np.uint8)
    packed = padded[:, 0::2] | (padded[:, 1::2] << 4)
    return packed.reshape(rows, blocks, block // 2)


def pack_zero_points(zeros: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit zero points [N, G] as [N, ceil(G / 2)] uint8, low nibble first; an
    unused last nibble holds 8, the default zero point, as onnxruntime's quantizer writes."""
    rows, groups = zeros.shape
    padded = np.full((rows, groups + groups % 2), 8, np.uint8)
    padded[:, :groups] = zeros.astype(np.uint8)
    return padded[:, 0::2] | (padded[:, 1::2] << 4)


def _nbits_fallback(
    layer: WeightLayer, q: GroupwiseWeight, nodes: Mapping[str, onnx.NodeProto]
) -> str | None:
    """Why ``layer`` cannot take the MatMulNBits form, or None."""
    if q.format.bits != 4:
        return f"{q.format.bits}-bit (MatMulNBits form: 4-bit only)"
    for reader in layer.readers:
        op = nodes[reader.node].op_type
        if reader.use is Use.MATMUL and op != "MatMul":
            return f"read by {op} {reader.node}"
        if reader.use is Use.GATHER and layer.columns % q.format.group_size:
            return "a Gather over a partial last block"
    return None


def _matmul_nbits(
    layer: WeightLayer,
    q: GroupwiseWeight,
    nodes: Mapping[str, onnx.NodeProto],
) -> tuple[list[TensorProto], dict[str, list[onnx.NodeProto]]]:
    """Initializers, and the nodes replacing each reader of ``layer`` (by reader name)."""
    qlo, _ = q.format.code_range
    # symmetric codes move to the unsigned range with an explicit zero point of 8
    codes = q.codes.astype(np.int32) - qlo
    zeros = q.zero_points.astype(np.int32) - qlo
    block, rows, columns = q.format.group_size, layer.rows, layer.columns
    base = layer.initializer
    packed = pack_uint4(codes, block)
    inits = [
        numpy_helper.from_array(packed, f"{base}_nbits"),
        numpy_helper.from_array(np.ascontiguousarray(q.scales, np.float32), f"{base}_nbits_scales"),
        numpy_helper.from_array(pack_zero_points(zeros), f"{base}_nbits_zeros"),
    ]
    names = [t.name for t in inits]
    replacements: dict[str, list[onnx.NodeProto]] = {}
    for reader in layer.readers:
        old = nodes[reader.node]
        if reader.use is Use.MATMUL:
            replacements[old.name] = [
                helper.make_node(
                    "MatMulNBits",
                    [old.input[0], *names],
                    list(old.output),
                    name=old.name,
                    domain=MS_DOMAIN,
                    K=columns,
                    N=rows,
                    bits=4,
                    block_size=block,
                )
            ]
        else:
            shape = f"{base}_nbits_table_shape"
            if shape not in {t.name for t in inits}:
                inits.append(
                    numpy_helper.from_array(np.array([rows, columns // 2], np.int64), shape)
                )
            table = f"{base}_nbits_table/{old.name}"
            replacements[old.name] = [
                helper.make_node("Reshape", [names[0], shape], [table], name=f"{old.name}/table"),
                helper.make_node(
                    "GatherBlockQuantized",
                    [table, old.input[1], names[1], names[2]],
                    list(old.output),
                    name=old.name,
                    domain=MS_DOMAIN,
                    gather_axis=0,
                    quantize_axis=1,
                    block_size=block,
                    bits=4,
                ),
            ]
    return inits, replacements


def _salient_side(
    layer: WeightLayer,
    q: GroupwiseWeight,
    readers: Mapping[str, list[onnx.NodeProto]],
) -> tuple[list[TensorProto], list[onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """Initializers, nodes of constants (the 8-bit DequantizeLinear and, for MatMul
    readers, its Transpose) and, per reader, its nodes (``readers``: what replaces it so
    far) with the main output renamed and the side path added to it."""
    salient = q.salient
    assert salient is not None
    base = f"{layer.initializer}_salient"
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(salient.codes, np.int8), f"{base}_q"),
        numpy_helper.from_array(salient.scales.astype(np.float32), f"{base}_s"),
        numpy_helper.from_array(salient.columns.astype(np.int64), f"{base}_columns"),
    ]
    values = f"{base}_values"  # S [R, k]
    constants = [
        helper.make_node(
            "DequantizeLinear",
            [f"{base}_q", f"{base}_s"],
            [values],
            name=f"{layer.id}/salient_dequantize",
            axis=0,
        )
    ]
    if any(r.use is Use.MATMUL for r in layer.readers):
        constants.append(
            helper.make_node(
                "Transpose", [values], [f"{values}_t"], name=f"{layer.id}/salient_t", perm=[1, 0]
            )
        )
    if any(r.use is Use.GATHER for r in layer.readers):
        placement = np.zeros((salient.columns.size, layer.columns), np.float32)
        placement[np.arange(salient.columns.size), salient.columns] = 1.0
        inits.append(numpy_helper.from_array(placement, f"{base}_placement"))
    out: dict[str, list[onnx.NodeProto]] = {}
    for reader in layer.readers:
        current = [_copy(n) for n in readers[reader.node]]
        final = current[-1]  # the node producing the reader's output
        y = final.output[0]
        main, side, picked = f"{y}/main", f"{y}/salient", f"{y}/salient_in"
        final.output[0] = main
        tag = f"{reader.node}/salient"
        if reader.use is Use.MATMUL:
            x = readers[reader.node][-1].input[0]
            side_nodes = [
                helper.make_node(
                    "Gather", [x, f"{base}_columns"], [picked], name=f"{tag}_gather", axis=-1
                ),
                helper.make_node("MatMul", [picked, f"{values}_t"], [side], name=f"{tag}_matmul"),
            ]
        else:
            ids = readers[reader.node][-1].input[1]
            side_nodes = [
                helper.make_node("Gather", [values, ids], [picked], name=f"{tag}_gather", axis=0),
                helper.make_node(
                    "MatMul", [picked, f"{base}_placement"], [side], name=f"{tag}_place"
                ),
            ]
        add = helper.make_node("Add", [main, side], [y], name=f"{tag}_add")
        out[reader.node] = [*current, *side_nodes, add]
    return inits, constants, out


def stored_salient_columns(
    initializers: Mapping[str, TensorProto], array: Callable[[str], np.ndarray], weight: str
) -> SalientColumns | None:
    """The salient columns :func:`export_weight_only` wrote for the float initializer
    ``weight`` (``array(name)`` reads an initializer), or None if it has none."""
    base = f"{weight}_salient"
    names = [f"{base}_q", f"{base}_s", f"{base}_columns"]
    if not all(n in initializers for n in names):
        return None
    codes, scales, columns = (array(n) for n in names)
    return SalientColumns(
        columns.astype(np.int64), codes.astype(np.int8), scales.astype(np.float32)
    )


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain == domain or (domain == "" and opset.domain == "ai.onnx"):
            opset.version = max(opset.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def _drop_dead_transposes(model: onnx.ModelProto) -> None:
    """Transposes left without readers (a tied LM head's) are removed."""
    graph = model.graph
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Transpose" and n.output[0] not in read]
        if not dead:
            return
        keep = [n for n in graph.node if n not in dead]
        del graph.node[:]
        graph.node.extend(keep)


def export_weight_only(
    header: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    quantized: Mapping[str, GroupwiseWeight],
    form: WeightOnlyForm = WeightOnlyForm.DEQUANTIZE_LINEAR,
) -> tuple[onnx.ModelProto, ExportReport]:
    """A copy of ``header`` with each layer in ``quantized`` (by layer id) replaced by its
    codes in ``form``; layers not in ``quantized`` stay float."""
    by_id = {layer.id: layer for layer in layers}
    unknown = sorted(set(quantized) - set(by_id))
    if unknown:
        raise ConfigError(f"quantized weights for unknown layers: {unknown}")
    model = onnx.ModelProto()
    model.CopyFrom(header)
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    report = ExportReport(form)
    new_inits: list[TensorProto] = []
    dq_nodes: list[onnx.NodeProto] = []
    replaced: dict[str, list[onnx.NodeProto]] = {}
    for layer_id, q in quantized.items():
        layer = by_id[layer_id]
        why = _nbits_fallback(layer, q, nodes) if form is WeightOnlyForm.MATMUL_NBITS else None
        if form is WeightOnlyForm.MATMUL_NBITS and why is None:
            inits, replacements = _matmul_nbits(layer, q, nodes)
            new_inits += inits
            replaced.update(replacements)
            report.as_matmul_nbits.append(layer_id)
        else:
            inits, node = _dequantize_linear(layer, q)
            new_inits += inits
            dq_nodes.append(node)
            report.as_dequantize_linear.append(layer_id)
            if why is not None:
                report.fallbacks[layer_id] = why
        if q.salient is not None:
            layer_readers = {r.node: replaced.get(r.node, [nodes[r.node]]) for r in layer.readers}
            inits, constants, with_side = _salient_side(layer, q, layer_readers)
            new_inits += inits
            dq_nodes += constants
            replaced.update(with_side)
            report.salient[layer_id] = int(q.salient.columns.size)
    drop = {by_id[i].initializer for i in quantized}
    kept_inits = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend([*kept_inits, *new_inits])
    out_nodes: list[onnx.NodeProto] = list(dq_nodes)
    for node in graph.node:
        out_nodes.extend(replaced.get(node.name, [node]))
    del graph.node[:]
    graph.node.extend(out_nodes)
    _drop_dead_transposes(model)
    if dq_nodes:
        _set_opset(model, "", BLOCKED_DQ_OPSET)
    if report.as_matmul_nbits:
        _set_opset(model, MS_DOMAIN, 1)
    model.ir_version = max(model.ir_version, INT4_IR_VERSION)
    return model, report
