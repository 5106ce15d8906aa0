"""Small valid float models the fuzzer mutates, and calibration batches that fit them.

Each seed quantizes cleanly as it is (a test checks that), so whatever goes wrong with a mutant
comes from the mutation. Between them they cover the op kinds dyadiq treats differently:
convolutions with pooling and a classifier, a MatMul + Softmax block (the integer softmax),
and a two-input elementwise graph with hard-swish pieces and a depthwise convolution.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _const(
    rng: np.random.Generator, name: str, *shape: int, scale: float = 0.3
) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)


def cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Flatten -> Gemm, input x 1x3x8x8."""
    nodes = [
        helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["c"], name="conv", pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        initializer=[
            _const(rng, "w_conv", 4, 3, 3, 3),
            _const(rng, "b_conv", 4, scale=0.1),
            _const(rng, "w_fc", 5, 64, scale=0.2),
            _const(rng, "b_fc", 5, scale=0.1),
        ],
    )
    return _model(graph)


def attention_block(rng: np.random.Generator) -> onnx.ModelProto:
    """MatMul -> Add -> Relu -> MatMul -> Softmax over the last axis, input x 1x4x8."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "attention_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6])],
        initializer=[
            _const(rng, "w1", 8, 16),
            _const(rng, "b1", 16, scale=0.1),
            _const(rng, "w2", 16, 6),
        ],
    )
    return _model(graph)


def two_inputs(rng: np.random.Generator) -> onnx.ModelProto:
    """Add(a, b) -> depthwise Conv -> HardSigmoid * itself (hard-swish) -> GlobalAveragePool."""
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "w_dw"], ["d"], name="dw", group=4, pads=[1] * 4),
        helper.make_node("HardSigmoid", ["d"], ["g"], name="hsig", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["d", "g"], ["m"], name="hswish"),
        helper.make_node("GlobalAveragePool", ["m"], ["y"], name="gap"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4, 6, 6]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 6, 6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])],
        initializer=[_const(rng, "w_dw", 4, 1, 3, 3)],
    )
    return _model(graph)


SEEDS = {"cnn": cnn, "attention_block": attention_block, "two_inputs": two_inputs}


def seed_model(name: str) -> onnx.ModelProto:
    return SEEDS[name](np.random.default_rng(0))


def input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Each graph input's declared shape (unknown dims read as 1)."""
    shapes = {}
    for info in model.graph.input:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)
    return shapes


def calibration_batches(
    model: onnx.ModelProto, count: int, rng: np.random.Generator
) -> list[dict[str, np.ndarray]]:
    return [
        {
            name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in input_shapes(model).items()
        }
        for _ in range(count)
    ]
