"""Run by ``tests/test_cpu_exactness.py`` on an emulated CPU: each integer product form that
onnxruntime offers, on operands that saturate int16 pair sums, against exact numpy.

Prints one JSON object: form -> {"op": ..., "exact": bool, "got": int, "want": int}.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dyadiq.ort_sessions import Kernels, open_session

_TYPES = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}
# (activation dtype, weight dtype, activation value, weight value, weight zero point)
FORMS = {
    "u8 x s8": (np.uint8, np.int8, 255, 127, 0),  # onnxruntime's default: saturates on AVX2
    "u8 x u8 (w + 128)": (np.uint8, np.uint8, 255, 255, 128),  # dyadiq's form for u8 inputs
    "s8 x s8": (np.int8, np.int8, -128, -127, 0),  # dyadiq's form for s8 inputs
}


def _model(op: str, x: np.ndarray, w: np.ndarray, wzp: np.ndarray) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.zeros((), x.dtype), "xz"),
        numpy_helper.from_array(wzp, "wz"),
    ]
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w", "xz", "wz"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", _TYPES[x.dtype], list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _qdq_matmul(k: int) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x -> Q/DQ (u8) -> MatMul with DQ(s8 weights): what onnxruntime fuses into a u8 x s8
    kernel when optimising, and what an exact simulation runs as dequantize + float MatMul."""
    x = np.full((4, k), 2.55, np.float32)  # code 255 at scale 0.01
    w = np.full((k, 16), 127, np.int8)
    inits = [
        numpy_helper.from_array(np.float32(0.01), "xs"),
        numpy_helper.from_array(np.uint8(0), "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.float32(0.001), "ws"),
        numpy_helper.from_array(np.int8(0), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    want = (255 * 0.01) * (127 * 0.001) * k * np.ones((4, 16))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), x, want


def probe(k: int = 64) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    rng = np.random.default_rng(0)
    for form, (xt, wt, xv, wv, wzp) in FORMS.items():
        for op in ("MatMulInteger", "ConvInteger"):
            if op == "MatMulInteger":
                x, w = np.full((4, k), xv, xt), np.full((k, 16), wv, wt)
                # a random tail so no kernel can special-case constant operands
                x[1:] = rng.integers(np.iinfo(xt).min, np.iinfo(xt).max, (3, k), endpoint=True)
                want = x.astype(np.int64) @ (w.astype(np.int64) - wzp)
            else:
                x, w = np.full((1, k, 4, 4), xv, xt), np.full((8, k, 1, 1), wv, wt)
                want = np.einsum("nchw,oc->nohw", x.astype(np.int64), w[:, :, 0, 0] - wzp)
            model = _model(op, x, w, np.array(wzp, wt))
            for kernels in Kernels:
                got = open_session(model, kernels=kernels).run(None, {"x": x})[0]
                results[f"{form} {op} {kernels.value}"] = {
                    "exact": bool(np.array_equal(got, want)),
                    "got": int(got.flat[0]),
                    "want": int(want.flat[0]),
                }
    model, x, want = _qdq_matmul(k)
    for kernels in Kernels:
        got = open_session(model, kernels=kernels).run(None, {"x": x})[0]
        results[f"QDQ MatMul {kernels.value}"] = {
            "exact": bool(np.allclose(got, want, rtol=1e-5)),
            "got": float(got.flat[0]),
            "want": float(want.flat[0]),
        }
    return results


if __name__ == "__main__":
    print(json.dumps(probe()))
