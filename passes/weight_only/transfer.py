"""The codes of one weight-only model applied to another graph with the same weights.

A language model has two graphs over one set of weights: the fixed-length prefill graph the
quantizer calibrates on, and the KV-cache decode step (:mod:`dyadiq.zoo.gemma3_decode`),
whose weights carry the prefill graph's initializer names. :func:`read_groupwise_codes`
reads the codes, scales and zero points back from the blocked ``DequantizeLinear`` form of
a quantized model (:mod:`dyadiq.backends.onnx.weight_only`), keyed by the float
initializer each one replaced; :func:`codes_for_layers` matches them to another graph's
weight layers by that name, so the other graph gets exactly the same codes.

A code tensor stored as int4 / uint4 is read as a 4-bit format and one stored as int8 /
uint8 as an 8-bit one: a 2- or 3-bit layer's codes lie inside that range, and ``s (q - z)``
is the same number whichever container width is named (the plan file keeps the chosen
widths).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from dyadiq.backends.onnx.weight_only import (
    ExportReport,
    WeightOnlyForm,
    export_weight_only,
    stored_salient_columns,
)
from dyadiq.errors import ConfigError
from dyadiq.io import save_model_atomic
from dyadiq.passes.weight_only.awq import has_input_scales
from dyadiq.passes.weight_only.groupwise import GroupwiseFormat, GroupwiseWeight
from dyadiq.passes.weight_only.layers import Orientation, WeightLayer, find_weights
from dyadiq.passes.weight_only.model_file import ModelFile

_CONTAINERS = {
    TensorProto.INT4: (4, True),
    TensorProto.UINT4: (4, False),
    TensorProto.INT8: (8, True),
    TensorProto.UINT8: (8, False),
}


@dataclass(frozen=True)
class StoredCodes:
    """One quantized weight as stored: its codes as W [R, K] and the stored orientation
    (axis 0 of a blocked DequantizeLinear means the initializer was W^T [K, R])."""

    weight: GroupwiseWeight
    orientation: Orientation


def _attribute(node: onnx.NodeProto, name: str) -> int | None:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return None


def read_groupwise_codes(source: ModelFile) -> dict[str, StoredCodes]:
    """Float initializer name -> its codes, for every blocked ``DequantizeLinear`` of a
    weight-only model (nodes without ``block_size`` are not weight-only and are skipped).
    A model quantized with AWQ input scales is refused: its codes are of W diag(s), and the
    1/s its graph applies would not travel with them to another graph."""
    if has_input_scales(source.header):
        raise ConfigError(
            "the model was quantized with AWQ input scales (--awq): its codes are of "
            "W diag(s), with 1/s applied in its own graph only, so they cannot be moved to "
            "another graph (the decode step, --target); quantize without --awq for that"
        )
    inits = {t.name: t for t in source.header.graph.initializer}
    out: dict[str, StoredCodes] = {}
    problems: list[str] = []
    for node in source.header.graph.node:
        block = _attribute(node, "block_size")
        if node.op_type != "DequantizeLinear" or not block:
            continue
        missing = [name for name in node.input if name and name not in inits]
        if missing:
            problems.append(f"{node.name}: inputs {missing} are not initializers")
            continue
        codes_tensor = inits[node.input[0]]
        if codes_tensor.data_type not in _CONTAINERS:
            problems.append(f"{node.name}: codes of type {codes_tensor.data_type}")
            continue
        bits, symmetric = _CONTAINERS[codes_tensor.data_type]
        codes = source.array(node.input[0]).astype(np.int16)
        scales = source.array(node.input[1]).astype(np.float32)
        has_zero = len(node.input) > 2 and bool(node.input[2])
        zeros = (
            source.array(node.input[2]).astype(np.int16)
            if has_zero
            else np.zeros(scales.shape, np.int16)
        )
        axis = _attribute(node, "axis")
        transposed = axis == 0
        if transposed:
            codes, scales, zeros = codes.T, scales.T, zeros.T
        try:
            fmt = GroupwiseFormat(bits, block, symmetric and not has_zero)
        except ConfigError as exc:
            problems.append(f"{node.name}: {exc}")
            continue
        weight = GroupwiseWeight(
            np.ascontiguousarray(codes),
            np.ascontiguousarray(scales),
            np.ascontiguousarray(zeros),
            fmt,
            stored_salient_columns(inits, source.array, node.output[0]),
        )
        orientation = Orientation.TRANSPOSED if transposed else Orientation.ROWS
        out[node.output[0]] = StoredCodes(weight, orientation)
    if problems:
        raise ConfigError("cannot read the weight-only codes back: " + "; ".join(problems))
    if not out:
        raise ConfigError(
            "the model has no blocked DequantizeLinear weights (write it with "
            "--wo-format dequantize-linear to reuse its codes)"
        )
    return out


@dataclass(frozen=True)
class Transfer:
    """Codes per target layer id, and the target layers left float (id -> why)."""

    quantized: dict[str, GroupwiseWeight]
    left_float: dict[str, str]


def codes_for_layers(codes: Mapping[str, StoredCodes], layers: Sequence[WeightLayer]) -> Transfer:
    """Each target layer whose initializer has codes gets them (its shape must match);
    every code tensor must find its layer. All mismatches are reported together."""
    quantized: dict[str, GroupwiseWeight] = {}
    left_float: dict[str, str] = {}
    problems: list[str] = []
    used: set[str] = set()
    for layer in layers:
        stored = codes.get(layer.initializer)
        if stored is None:
            left_float[layer.id] = f"{layer.initializer} is float in the quantized model"
            continue
        shape = stored.weight.codes.shape
        if shape != (layer.rows, layer.columns):
            problems.append(
                f"{layer.initializer}: codes {shape}, layer {layer.rows, layer.columns}"
            )
            continue
        used.add(layer.initializer)
        quantized[layer.id] = stored.weight
    unused = sorted(set(codes) - used)
    if unused:
        problems.append(f"codes for weights the graph does not read: {unused}")
    if problems:
        raise ConfigError("the quantized codes do not fit this graph: " + "; ".join(problems))
    return Transfer(quantized, left_float)


def quantize_like(
    quantized_model: Path,
    graph: Path,
    output: Path,
    form: WeightOnlyForm = WeightOnlyForm.DEQUANTIZE_LINEAR,
) -> tuple[Transfer, ExportReport]:
    """Write ``graph`` (a float model with the same weights, e.g. the decode step) to
    ``output`` with the codes of ``quantized_model`` (blocked DequantizeLinear form), in
    ``form``; the float tensors it keeps are copied in (external data above 2 GB)."""
    codes = read_groupwise_codes(ModelFile.load(quantized_model))
    target = ModelFile.load(graph)
    inventory = find_weights(target.header)
    transfer = codes_for_layers(codes, inventory.layers)
    header, report = export_weight_only(target.header, inventory.layers, transfer.quantized, form)
    save_model_atomic(target.materialised(header), output)
    return transfer, report
