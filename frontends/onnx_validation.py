"""Static checks of an ONNX model that ``onnx.checker`` does not make but dyadiq relies on.

1. Element types: every graph input, output, value_info and initializer has a type dyadiq
   can hold in numpy (float16/32/64, the signed and unsigned integers, bool). An id ONNX does
   not define (``elem_type 99``) is a broken model (:class:`ModelLoadError`); a defined type
   numpy cannot hold (bfloat16, float8, int4, string, complex) is refused as unsupported.
2. Initializer sizes: the data held (``raw_data`` bytes, or the typed field's entries) matches
   ``prod(dims)`` of the declared ``data_type``. Otherwise numpy fails later with a reshape
   error far from the cause.
0. Text fields (op types, domains, tensor and node names) are valid UTF-8: protobuf hands
   invalid ones over as ``bytes``, which every later step chokes on.
3. No NaN in a floating-point initializer: it poisons every activation downstream, and was
   reported as bad calibration data. (Infinities are legitimate, e.g. attention masks.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from dyadiq.errors import ModelLoadError, UnsupportedModelError

# data_type -> (bytes per element in raw_data, the typed field that holds it otherwise)
SUPPORTED_ELEMENT_TYPES: dict[int, tuple[int, str]] = {
    TensorProto.FLOAT: (4, "float_data"),
    TensorProto.DOUBLE: (8, "double_data"),
    TensorProto.FLOAT16: (2, "int32_data"),
    TensorProto.INT8: (1, "int32_data"),
    TensorProto.INT16: (2, "int32_data"),
    TensorProto.INT32: (4, "int32_data"),
    TensorProto.INT64: (8, "int64_data"),
    TensorProto.UINT8: (1, "int32_data"),
    TensorProto.UINT16: (2, "int32_data"),
    TensorProto.UINT32: (4, "uint64_data"),
    TensorProto.UINT64: (8, "uint64_data"),
    TensorProto.BOOL: (1, "int32_data"),
}
_NAMES = {value: name for name, value in TensorProto.DataType.items()}


def type_name(elem_type: int) -> str:
    return _NAMES.get(elem_type, f"unknown element type {elem_type}")


def _typed_values(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.ValueInfoProto]]:
    for info in graph.input:
        yield f"input {info.name}", info
    for info in graph.output:
        yield f"output {info.name}", info
    for info in graph.value_info:
        yield f"tensor {info.name}", info


def _initializers(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def check_element_types(model: onnx.ModelProto, where: str) -> None:
    """Refuse undefined element types (broken) and types numpy cannot hold (unsupported)."""
    undefined: list[str] = []
    unsupported: list[str] = []
    graph_io = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    for label, info in _typed_values(model.graph):
        kind = info.type.WhichOneof("value")
        if kind is None and info.name not in graph_io:
            continue  # an untyped value_info entry says nothing
        if kind != "tensor_type":
            unsupported.append(f"{label} ({kind or 'no type'})")
            continue
        elem_type = info.type.tensor_type.elem_type
        if elem_type == TensorProto.UNDEFINED and info.name not in graph_io:
            continue
        if elem_type not in _NAMES or elem_type == TensorProto.UNDEFINED:
            undefined.append(f"{label} ({elem_type})")
        elif elem_type not in SUPPORTED_ELEMENT_TYPES:
            unsupported.append(f"{label} ({type_name(elem_type)})")
    for tensor in _initializers(model):
        if tensor.data_type not in _NAMES or tensor.data_type == TensorProto.UNDEFINED:
            undefined.append(f"initializer {tensor.name} ({tensor.data_type})")
        elif tensor.data_type not in SUPPORTED_ELEMENT_TYPES:
            unsupported.append(f"initializer {tensor.name} ({type_name(tensor.data_type)})")
    if undefined:
        raise ModelLoadError(
            f"{where} declares element types ONNX does not define: " + ", ".join(undefined[:8])
        )
    if unsupported:
        supported = ", ".join(type_name(t).lower() for t in SUPPORTED_ELEMENT_TYPES)
        raise UnsupportedModelError(
            f"{where} uses element types dyadiq does not handle: "
            + ", ".join(unsupported[:8])
            + f" (supported: {supported})"
        )


def check_initializer_sizes(model: onnx.ModelProto, where: str) -> None:
    """Each initializer holds exactly ``prod(dims)`` elements of its declared type."""
    wrong: list[str] = []
    for tensor in _initializers(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            continue  # read_model loaded it into raw_data already when it was allowed
        itemsize, field = SUPPORTED_ELEMENT_TYPES[tensor.data_type]
        if any(d < 0 for d in tensor.dims):
            wrong.append(f"{tensor.name}: negative dims {list(tensor.dims)}")
            continue
        count = math.prod(tensor.dims)
        declared = f"{type_name(tensor.data_type)} {list(tensor.dims)}"
        if tensor.HasField("raw_data"):
            if len(tensor.raw_data) != count * itemsize:
                wrong.append(
                    f"{tensor.name}: {len(tensor.raw_data)} bytes of raw data, "
                    f"{declared} needs {count * itemsize}"
                )
        else:
            held = len(getattr(tensor, field))
            if held != count:
                wrong.append(f"{tensor.name}: {held} values in {field}, {declared} needs {count}")
    if wrong:
        raise ModelLoadError(
            f"{where} has initializers whose data does not match their declared type and "
            "shape: " + "; ".join(wrong[:8])
        )


_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)


def check_finite_weights(model: onnx.ModelProto, where: str) -> None:
    """Refuse floating-point initializers holding NaN (after the size check)."""
    poisoned: list[str] = []
    for tensor in _initializers(model):
        if tensor.data_type in _FLOAT_TYPES and tensor.data_location != TensorProto.EXTERNAL:
            nans = int(np.isnan(numpy_helper.to_array(tensor)).sum())
            if nans:
                poisoned.append(f"{tensor.name} ({nans} of {math.prod(tensor.dims)})")
    if poisoned:
        raise ModelLoadError(
            f"{where} has NaN weights, so every output would be NaN: " + ", ".join(poisoned[:8])
        )


def _text_fields(model: onnx.ModelProto) -> Iterator[tuple[str, object]]:
    graph = model.graph
    for opset in model.opset_import:
        yield "opset domain", opset.domain
    for index, node in enumerate(graph.node):
        label = f"node #{index}"
        yield f"{label} op_type", node.op_type
        yield f"{label} domain", node.domain
        yield f"{label} name", node.name
        for name in [*node.input, *node.output]:
            yield f"{label} tensor name", name
        for attr in node.attribute:
            yield f"{label} attribute name", attr.name
    for info in [*graph.input, *graph.output, *graph.value_info]:
        yield "value name", info.name
    for tensor in graph.initializer:
        yield "initializer name", tensor.name


def check_text_fields(model: onnx.ModelProto, where: str) -> None:
    """Refuse names and op types that are not valid UTF-8 (a corrupted file)."""
    broken = [label for label, value in _text_fields(model) if not isinstance(value, str)]
    if broken:
        raise ModelLoadError(
            f"{where} is corrupted: text fields that are not valid UTF-8 in "
            + ", ".join(sorted(set(broken))[:6])
        )
