"""Structured mutations: of a model's protobuf, and of what comes with it (data, plans, options).

Every mutation is a pure function of (input, ``np.random.Generator``), named by a string, so a
case is reproduced (and minimised) from its list of ``(mutation name, seed)`` pairs alone.
Model mutations edit what exporters and hand-edited files get wrong: dims, element types,
attributes, op types, dropped / duplicated nodes and initializers, rewired inputs, weight
values, opsets; byte flips then corrupt the serialized file itself.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ModelMutation = Callable[[onnx.ModelProto, np.random.Generator], None]

_ODD_INTS = (0, -1, 1, 2, 7, -7, 3, 1000, 2**31 - 1, -(2**31))
_ODD_FLOATS = (0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"), 2.8e27)
_OPS = (
    "Relu", "Conv", "Gemm", "MatMul", "Add", "Mul", "Softmax", "MaxPool", "AveragePool",
    "Flatten", "Reshape", "Transpose", "Concat", "Sigmoid", "HardSwish", "BatchNormalization",
    "LayerNormalization", "Gelu", "Clip", "Identity", "TopK", "NonMaxSuppression", "Loop",
    "Unknown",
)  # fmt: skip


def _pick(rng: np.random.Generator, items: Any) -> Any:
    items = list(items)
    return items[int(rng.integers(len(items)))] if items else None


def _value_infos(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [*model.graph.input, *model.graph.output, *model.graph.value_info]


def mutate_dim(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    info = _pick(rng, _value_infos(model))
    dims = info.type.tensor_type.shape.dim if info is not None else []
    if not dims:
        return
    dim = _pick(rng, dims)
    choice = int(rng.integers(4))
    if choice == 0:
        dim.dim_param = "N"
    elif choice == 1:
        dim.dim_value = int(_pick(rng, (0, 1, 2, 3, 5, 17, 4096)))
    elif choice == 2:
        info.type.tensor_type.shape.dim.add().dim_value = 1  # one more axis
    else:
        del info.type.tensor_type.shape.dim[-1]  # one fewer


def mutate_dtype(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    elem_type = int(_pick(rng, [*TensorProto.DataType.values(), 99, 1000]))
    if rng.random() < 0.5 and model.graph.initializer:
        _pick(rng, model.graph.initializer).data_type = elem_type
    else:
        info = _pick(rng, _value_infos(model))
        if info is not None:
            info.type.tensor_type.elem_type = elem_type


def mutate_attribute(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    node = _pick(rng, model.graph.node)
    if node is None:
        return
    attr = _pick(rng, node.attribute)
    if attr is None or rng.random() < 0.3:
        name = _pick(rng, ("axis", "group", "strides", "kernel_shape", "pads", "alpha", "perm"))
        node.attribute.append(onnx.helper.make_attribute(name, int(_pick(rng, _ODD_INTS))))
        return
    if attr.type == onnx.AttributeProto.INT:
        attr.i = int(_pick(rng, _ODD_INTS))
    elif attr.type == onnx.AttributeProto.INTS and attr.ints:
        attr.ints[int(rng.integers(len(attr.ints)))] = int(_pick(rng, _ODD_INTS))
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = float(_pick(rng, _ODD_FLOATS))
    else:
        node.attribute.remove(attr)


def mutate_op_type(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    node = _pick(rng, model.graph.node)
    if node is not None:
        node.op_type = str(_pick(rng, _OPS))


def drop_node(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    if model.graph.node:
        del model.graph.node[int(rng.integers(len(model.graph.node)))]


def duplicate_node(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    node = _pick(rng, model.graph.node)
    if node is not None:
        copy = model.graph.node.add()
        copy.CopyFrom(node)
        if rng.random() < 0.5:  # a second producer of the same name, or a fresh name
            for i in range(len(copy.output)):
                copy.output[i] += "_dup"


def drop_initializer(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    if model.graph.initializer:
        del model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]


def duplicate_initializer(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    tensor = _pick(rng, model.graph.initializer)
    if tensor is not None:
        model.graph.initializer.add().CopyFrom(tensor)


def rewire_input(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    node = _pick(rng, model.graph.node)
    if node is None or not node.input:
        return
    names = [t.name for t in model.graph.initializer] + [i.name for i in model.graph.input]
    names += [o for n in model.graph.node for o in n.output] + ["", "missing_tensor"]
    node.input[int(rng.integers(len(node.input)))] = str(_pick(rng, names))


def mutate_weights(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    tensor = _pick(rng, model.graph.initializer)
    if tensor is None or tensor.data_type != TensorProto.FLOAT:
        return
    values = numpy_helper.to_array(tensor).astype(np.float32).copy()
    choice = int(rng.integers(4))
    if choice == 0:
        values *= np.float32(_pick(rng, (2.8e27, 1e-30, 0.0, -1e10)))
    elif choice == 1 and values.size:
        values.flat[int(rng.integers(values.size))] = _pick(rng, _ODD_FLOATS)
    elif choice == 2:
        values[...] = 0
    else:
        del tensor.dims[:]  # keep the data, lose the shape
        return
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def mutate_raw_data(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    tensor = _pick(rng, model.graph.initializer)
    if tensor is None or not tensor.raw_data:
        return
    cut = int(rng.integers(len(tensor.raw_data)))
    tensor.raw_data = tensor.raw_data[:cut] if rng.random() < 0.5 else tensor.raw_data * 2


def mutate_opset(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    model.opset_import[0].version = int(_pick(rng, (1, 6, 7, 10, 11, 13, 14, 21, 22, 30, 99)))


def mutate_ir_version(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    model.ir_version = int(_pick(rng, (0, 1, 3, 7, 9, 10, 11, 99)))


MODEL_MUTATIONS: dict[str, ModelMutation] = {
    "dim": mutate_dim,
    "dtype": mutate_dtype,
    "attribute": mutate_attribute,
    "op_type": mutate_op_type,
    "drop_node": drop_node,
    "duplicate_node": duplicate_node,
    "drop_initializer": drop_initializer,
    "duplicate_initializer": duplicate_initializer,
    "rewire_input": rewire_input,
    "weights": mutate_weights,
    "raw_data": mutate_raw_data,
    "opset": mutate_opset,
    "ir_version": mutate_ir_version,
}


def apply_model_mutations(
    model: onnx.ModelProto, mutations: tuple[tuple[str, int], ...]
) -> onnx.ModelProto:
    mutant = onnx.ModelProto()
    mutant.CopyFrom(model)
    for name, seed in mutations:
        # An earlier mutation may leave nothing this one can edit: it is then a no-op.
        with contextlib.suppress(ValueError, TypeError, IndexError, OverflowError):
            MODEL_MUTATIONS[name](mutant, np.random.default_rng(seed))
    return mutant


def flip_bytes(data: bytes, flips: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = bytearray(data)
    for _ in range(flips):
        if buffer:
            buffer[int(rng.integers(len(buffer)))] = int(rng.integers(256))
    return bytes(buffer)


# --- calibration data -------------------------------------------------------------------------
def mutate_calibration(
    batches: list[dict[str, np.ndarray]], kind: str, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """A damaged copy of ``batches`` (``kind`` in :data:`CALIBRATION_MUTATIONS`)."""
    out: list[dict[str, Any]] = [dict(b) for b in batches]
    first = next(iter(out[0]))
    if kind == "shape":
        out[0][first] = np.zeros((*out[0][first].shape[:-1], 1 + int(rng.integers(9))), np.float32)
    elif kind == "dtype":
        dtype = _pick(rng, (np.int64, np.float64, np.bool_, np.uint8, np.float16, np.complex64))
        out[-1][first] = out[-1][first].astype(dtype)
    elif kind == "non_finite":
        out[0][first].flat[0] = _pick(rng, (np.nan, np.inf, -np.inf))
    elif kind == "huge":
        out[0][first] = out[0][first] * np.float32(_pick(rng, (1e30, 1e38, 3e38)))
    elif kind == "missing_input":
        del out[0][first]
    elif kind == "extra_input":
        out[0]["not_an_input"] = np.zeros(3, np.float32)
    elif kind == "constant":
        out = [{k: np.zeros_like(v) for k, v in b.items()} for b in out]
    elif kind == "rank":
        out[0][first] = out[0][first].reshape(-1)
    elif kind == "empty":
        out = []
    return out


CALIBRATION_MUTATIONS = (
    "shape", "dtype", "non_finite", "huge", "missing_input", "extra_input", "constant", "rank",
    "empty", "corrupt_file", "text_file",
)  # fmt: skip


# --- plans, budgets, options ------------------------------------------------------------------
def mutate_plan(plan: dict[str, Any], rng: np.random.Generator) -> str:
    """A damaged plan.json text."""
    plan = json.loads(json.dumps(plan))
    layers = plan.setdefault("layers", {})
    choice = int(rng.integers(8))
    layer = _pick(rng, sorted(layers))
    if choice == 0 and layer:
        layers[layer]["weight_bits"] = _pick(rng, (0, 1, 9, 16, -1, 3, "8", None, 2.5))
    elif choice == 1 and layer:
        layers[layer]["act_bits"] = _pick(rng, (0, 3, 5, 16, -8, "x"))
    elif choice == 2:
        layers["no_such_layer"] = {"weight_bits": 8, "act_bits": 8}
    elif choice == 3 and layer:
        del layers[layer]
    elif choice == 4:
        plan["excluded"] = _pick(rng, (["no_such_layer"], [layer], "conv", 7))
    elif choice == 5:
        plan["layers"] = _pick(rng, ([], "x", None, {}))
    elif choice == 6:
        return json.dumps(plan)[: int(rng.integers(1, 40))]  # truncated JSON
    else:
        plan["default_act_bits"] = _pick(rng, (4, 0, 99, "8"))
    return json.dumps(plan)


_BUDGETS = (
    "size=0", "size=1B", "size=2MB", "size=abc", "avg-wbits=1", "avg-wbits=5", "avg-wbits=nan",
    "avg-wbits=-3", "bops=0.5x", "bops=-1x", "latency=0.7x", "latency=3ms", "flash=1KB",
    "ram=64KB", "size=1e309", "", "=", "size=2MB,size=1MB", "weird=1",
)  # fmt: skip


def mutate_options(rng: np.random.Generator, integer_share: float) -> list[str]:
    """Random option combinations, valid or not, for ``dyadiq quantize``."""
    options: list[str] = []
    if rng.random() < integer_share:
        options.append("--integer")
    for _ in range(int(rng.integers(0, 3))):
        choice = int(rng.integers(9))
        if choice == 0:
            options += ["--percentile", str(_pick(rng, (99.9, 100, 0, 200, -1, "nan", "inf")))]
        elif choice == 1:
            options += ["--calib-limit", str(_pick(rng, (1, 2, 0, -1, 1000)))]
        elif choice == 2:
            options += ["--wbits", str(_pick(rng, (2, 3, 4, 6, 8, 0, 1, 9, 16)))]
        elif choice == 3:
            options += ["--abits", "4"]
        elif choice == 4:
            options += ["--act-dtype", "int8"]
        elif choice == 5:
            options += ["--calibrator", str(_pick(rng, ("minmax", "mse", "entropy")))]
        elif choice == 6:
            options += ["--exclude", str(_pick(rng, ("conv", "fc", "nothing", "")))]
        elif choice == 7:
            options += ["--budget", str(_pick(rng, _BUDGETS)), "--compensate", "none"]
        else:
            options += ["--input-shape", str(_pick(rng, ("x=1x3x8x8", "x=0x3", "y=1", "x=axb")))]
    return options
