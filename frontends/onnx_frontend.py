"""ONNX frontend: a model file or ModelProto in, a validated, simplified :class:`QGraph` out.

Steps, each with a typed error a user can act on:
1. read the protobuf (refusing external-data paths that escape the model's folder);
2. scan every node and list all unsupported ops in one error;
3. ``onnx.checker``;
4. promote weights held in ``Constant`` nodes to initializers;
5. element types and initializer sizes (``onnx_validation``);
6. optionally fix dynamic input dims, then, in a forked child, create an onnxruntime session
   and run it once (a model onnxruntime refuses is a :class:`ModelLoadError` quoting its
   reason) and simplify (onnxsim: constant folding, shape inference) - a simplifier failure
   or crash is recorded in the graph's notes and shape inference alone is used instead
   (``runtime_validation``);
7. import into onnx-graphsurgeon and assign stable node ids.
The input file is only ever read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from dyadiq.errors import ModelLoadError, UnsupportedModelError
from dyadiq.frontends.onnx_validation import (
    check_element_types,
    check_finite_weights,
    check_initializer_sizes,
    check_text_fields,
)
from dyadiq.frontends.runtime_validation import validate_and_simplify
from dyadiq.graph import QGraph, assign_stable_ids, default_opset
from dyadiq.op_facts import onnx_op_kind
from dyadiq.passes.affine_as_depthwise import per_channel_affine_as_depthwise
from dyadiq.passes.canonicalize_inference_ops import canonicalize_inference_ops
from dyadiq.passes.fold_static_if import fold_static_if
from dyadiq.passes.fuse_layer_norm import find_decomposed_layer_norms, fuse_layer_norms

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | onnx.ModelProto


LAYER_NORM_OPSET = 17  # the first opset with LayerNormalization


def read_model(source: ModelSource) -> tuple[onnx.ModelProto, str]:
    """Parse a model and load its external data safely. Returns (model, description)."""
    if isinstance(source, onnx.ModelProto):
        return source, "<ModelProto>"
    path = Path(source)
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder; give the model's .onnx file")
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a readable ONNX model: {exc}") from exc
    if not model.graph.node and not model.graph.input:
        raise ModelLoadError(f"{path} parsed but holds no graph (is it really an ONNX model?)")
    _load_external_data(model, path.parent.resolve())
    return model, str(path)


def _load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    escaping: list[str] = []
    missing: list[str] = []
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        target = (base_dir / info.location).resolve()
        if not target.is_relative_to(base_dir):
            escaping.append(f"{tensor.name} -> {info.location}")
        elif not target.is_file():
            missing.append(f"{tensor.name} -> {info.location}")
    if escaping:
        raise ModelLoadError(
            "refusing external data outside the model's folder "
            f"({base_dir}): " + "; ".join(escaping)
        )
    if missing:
        raise ModelLoadError("external data files not found: " + "; ".join(missing))
    try:
        external_data_helper.load_external_data_for_model(model, str(base_dir))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read external data: {exc}") from exc


def find_unsupported_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    """``"domain::op" -> node names`` for every node dyadiq cannot handle, subgraphs included."""
    unsupported: dict[str, list[str]] = {}

    def scan(graph: onnx.GraphProto) -> None:
        for index, node in enumerate(graph.node):
            if onnx_op_kind(node.domain, node.op_type) is None:
                key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
                unsupported.setdefault(key, []).append(node.name or f"#{index}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    scan(attr.g)

    scan(model.graph)
    return unsupported


def _raise_if_unsupported(model: onnx.ModelProto, where: str) -> None:
    unsupported = find_unsupported_ops(model)
    if unsupported:
        listing = ", ".join(
            f"{op} x{len(names)} (e.g. {names[0]})" for op, names in sorted(unsupported.items())
        )
        raise UnsupportedModelError(
            f"{where} uses {len(unsupported)} unsupported op type(s): {listing}"
        )


def _check(model: onnx.ModelProto, where: str) -> None:
    try:
        if model.ByteSize() < 2**31 - 1:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelLoadError(f"{where} fails onnx.checker: {exc}") from exc


def promote_constant_nodes(model: onnx.ModelProto) -> int:
    """Move tensor-valued ``Constant`` nodes into initializers (PP-OCR stores weights so)."""
    keep: list[onnx.NodeProto] = []
    promoted = 0
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            promoted += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return promoted


def _fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    by_name = {i.name: i for i in model.graph.input}
    unknown = sorted(set(shapes) - set(by_name))
    if unknown:
        raise ModelLoadError(
            f"--input-shape names {unknown} are not model inputs; inputs are {sorted(by_name)}"
        )
    for name, dims in shapes.items():
        tensor_type = by_name[name].type.tensor_type
        if len(tensor_type.shape.dim) not in (0, len(dims)):
            raise ModelLoadError(
                f"input {name} has rank {len(tensor_type.shape.dim)}, got shape {list(dims)}"
            )
        del tensor_type.shape.dim[:]
        for d in dims:
            tensor_type.shape.dim.add().dim_value = int(d)


def _clear_invalid_dims(model: onnx.ModelProto) -> None:
    """Turn negative dim values (some exporters write -1 for "dynamic") into unknown dims."""
    graph = model.graph
    for info in [*graph.input, *graph.output, *graph.value_info]:
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()


def flatten_gemm_row_biases(model: onnx.ModelProto) -> int:
    """Reshape every Gemm bias initializer of shape ``[1, N]`` to ``[N]`` (in place).

    Gemm broadcasts C either way, but per-channel bias quantization expects one value per
    output channel along axis 0: a ``[1, N]`` bias (onnxsim fuses jax2tf's MatMul + Add of a
    ``[1, N]`` constant into such a Gemm, as in Magika) got a DequantizeLinear whose N scales
    do not match the bias's axis 0 of size 1, and onnxruntime refused the QDQ model. Only
    initializers that nothing else reads are changed. Returns how many were.
    """
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in model.graph.output}
    initializers = {t.name: t for t in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3:
            continue
        bias = initializers.get(node.input[2])
        if bias is None or len(bias.dims) != 2 or bias.dims[0] != 1 or bias.dims[1] <= 1:
            continue
        if readers.get(bias.name, 0) != 1 or bias.name in outputs:
            continue
        bias.dims[:] = [bias.dims[1]]
        for info in model.graph.value_info:  # a stale 1xN shape would contradict it
            if info.name == bias.name:
                model.graph.value_info.remove(info)
                break
        changed += 1
    return changed


def load_onnx(
    source: ModelSource,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    simplify: bool = True,
) -> QGraph:
    """Import an ONNX model into a :class:`QGraph` (see the module docstring for the steps)."""
    original, where = read_model(source)
    model = onnx.ModelProto()
    model.CopyFrom(original)  # never edit the caller's proto
    check_text_fields(model, where)
    _raise_if_unsupported(model, where)
    _check(model, where)
    check_element_types(model, where)
    check_initializer_sizes(model, where)
    check_finite_weights(model, where)
    notes: list[str] = []
    promoted = promote_constant_nodes(model)
    if promoted:
        notes.append(f"promoted {promoted} Constant node(s) to initializers")
    _clear_invalid_dims(model)
    if input_shapes:
        _fix_input_shapes(model, input_shapes)
    folded = fold_static_if(model)  # before onnxsim, which then simplifies an inlined branch
    model, notes = folded.model, [*notes, *folded.notes]
    notes.extend(canonicalize_inference_ops(model).notes())
    model = validate_and_simplify(model, where, simplify=simplify, notes=notes)
    flattened = flatten_gemm_row_biases(model)
    if flattened:
        notes.append(f"stored {flattened} Gemm bias(es) of shape 1xN as N (same broadcast)")
    _raise_if_unsupported(model, f"{where} after simplification")
    opset = default_opset(model)
    graph, opset = _fuse_layer_norms(model, opset, notes)
    depthwise = per_channel_affine_as_depthwise(graph)
    if depthwise:
        notes.append(
            f"rewrote {depthwise} BatchNormalization chain(s) that no layer absorbs "
            "as depthwise 1x1 Conv"
        )
    assign_stable_ids(graph)
    return QGraph(graph=graph, opset=opset, source=where, notes=notes)


def _fuse_layer_norms(model: onnx.ModelProto, opset: int, notes: list[str]) -> tuple[gs.Graph, int]:
    """The model as a graph with every decomposed LayerNorm fused
    (:mod:`dyadiq.passes.fuse_layer_norm`); converted to opset 17 first when it has one."""
    graph = gs.import_onnx(model)
    matches = find_decomposed_layer_norms(graph)
    if matches and opset < LAYER_NORM_OPSET:
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(model, LAYER_NORM_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            notes.append(
                f"kept {len(matches)} decomposed LayerNorm(s) as separate ops: the model does not "
                f"convert from opset {opset} to {LAYER_NORM_OPSET} ({exc})"
            )
            return graph, opset
        notes.append(f"converted from opset {opset} to {LAYER_NORM_OPSET} for LayerNormalization")
        promote_constant_nodes(converted)  # the converter writes Squeeze axes etc. as Constants
        converted = onnx.shape_inference.infer_shapes(converted, data_prop=True)
        graph, opset = gs.import_onnx(converted), LAYER_NORM_OPSET
        matches = find_decomposed_layer_norms(graph)
    if fuse_layer_norms(graph, matches):
        notes.append(f"fused {len(matches)} decomposed LayerNorm(s) into LayerNormalization")
    return graph, opset


def upgrade_opset(graph: QGraph, target: int) -> QGraph:
    """Convert a graph to ``target`` opset (e.g. 21 for int4 QDQ); node ids are kept."""
    if graph.opset >= target:
        return graph
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(graph.to_onnx(), target)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise UnsupportedModelError(
            f"cannot convert the model from opset {graph.opset} to {target}: {exc}"
        ) from exc
    converted = onnx.shape_inference.infer_shapes(converted, data_prop=True)
    upgraded = gs.import_onnx(converted)
    assign_stable_ids(upgraded)
    notes = [*graph.notes, f"converted from opset {graph.opset} to {target}"]
    return QGraph(upgraded, target, graph.source, notes)
