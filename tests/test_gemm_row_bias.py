"""A Gemm bias stored as 1xN (Magika, after onnxsim fuses MatMul + Add) quantizes and runs.

Per-channel bias quantization put N scales on a DequantizeLinear whose bias axis 0 has size 1;
onnxruntime refused the QDQ model ("scale must be 1D tensor with size 1") and `--target x86`
crashed in the QDQ-vs-integer check. The frontend now stores such a bias as N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.pipeline import quantize


def _row_bias_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(1, 6)).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        "row_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_row_bias_is_stored_per_channel(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_row_bias_model(), path)
    graph = load_onnx(path)
    gemm = next(n for n in graph.nodes() if n.op == "Gemm")
    assert tuple(gemm.inputs[2].shape) == (6,)
    assert any("1xN" in note for note in graph.notes)


def test_row_bias_model_quantizes_to_a_runnable_qdq_model(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_row_bias_model(), path)
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(1, 8)).astype(np.float32)} for _ in range(8)]
    quantize(path, tmp_path / "out", batches)
    options = ort.SessionOptions()  # no constant folding: the bias DequantizeLinear must run
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    qdq = ort.InferenceSession(
        str(tmp_path / "out" / "model.qdq.onnx"), options, providers=["CPUExecutionProvider"]
    )
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = batches[0]
    got, want = qdq.run(None, x)[0], ref.run(None, x)[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 0.1 * (np.abs(want).max() + 1e-6)
