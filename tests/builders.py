"""Readable tiny ONNX models for unit tests, written as ONNX text."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def with_weights(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, array in weights.items():
        model.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
    onnx.checker.check_model(model)
    return model


def conv_relu_pool_fc(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv(+bias) -> Relu -> MaxPool -> Flatten -> Gemm(transB) -> y."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 8, 8] x) => (float[1, 5] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c)
        p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, w2, b2)
    }
    """
    return with_weights(
        text,
        w1=rng.normal(size=(4, 3, 3, 3)),
        b1=rng.normal(size=4),
        w2=rng.normal(size=(5, 64)) * 0.2,
        b2=rng.normal(size=5),
    )


def residual_concat(rng: np.random.Generator) -> onnx.ModelProto:
    """Two convs, a residual Add, a Concat and a ReLU6 Clip: scale-sharing cases."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 4, 6, 6] x) => (float[1, 8, 6, 6] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, wa)
        lo = Constant <value = float {0.0}> ()
        hi = Constant <value = float {6.0}> ()
        a6 = Clip (a, lo, hi)
        b = Conv (a6, wb)
        s = Add (b, x)
        y = Concat <axis = 1> (s, a6)
    }
    """
    return with_weights(
        text, wa=rng.normal(size=(4, 4, 3, 3)) * 0.3, wb=rng.normal(size=(4, 4, 1, 1)) * 0.5
    )


def calibration(
    shape: tuple[int, ...], rng: np.random.Generator, n: int = 8
) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(n)]
