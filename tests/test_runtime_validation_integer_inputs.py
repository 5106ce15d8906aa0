"""Load-time validation runs a model once on zeros; zeros in an integer input prove nothing.

silero-vad (PyPI ``silero-vad``) takes its sample rate as an int64 scalar ``sr`` and branches
on it with ``If``: ``sr == 0`` takes a branch whose LSTM cannot run, so every load was refused
("onnxruntime cannot run it on zeros") although the model runs on real inputs. Same shape here:
a float input, an int64 scalar, an ``If`` whose else branch fails at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dyadiq.errors import ModelLoadError
from dyadiq.frontends.onnx_frontend import load_onnx


def _branch(name: str, node: onnx.NodeProto) -> onnx.GraphProto:
    out = helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)
    return helper.make_graph([node], name, [], [out])


def _rate_switched_model(rate_dtype: int) -> onnx.ModelProto:
    """y = x if sr == 16000 else reshape(x, 7x7) (impossible for a 1x4 x)."""
    bad_shape = helper.make_tensor("bad_shape", TensorProto.INT64, [2], [7, 7])
    then_branch = _branch("then", helper.make_node("Identity", ["x"], ["y_then"]))
    else_branch = _branch("else", helper.make_node("Reshape", ["x", "bad_shape"], ["y_else"]))
    rate = helper.make_tensor("rate", rate_dtype, [], [16000])
    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["is_16k"]),
        helper.make_node("If", ["is_16k"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes,
        "rate_switched",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("sr", rate_dtype, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[bad_shape, rate],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_integer_input_whose_zero_is_invalid_still_loads(tmp_path: Path) -> None:
    model = _rate_switched_model(TensorProto.INT64)
    path = tmp_path / "vad_like.onnx"
    onnx.save(model, path)
    session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32)[None]
    real = session.run(None, {"x": x, "sr": np.array(16000, np.int64)})[0]
    np.testing.assert_array_equal(real, x)  # the model is fine on a real sample rate
    with pytest.raises(Exception, match=r"[Rr]eshape"):
        session.run(None, {"x": x, "sr": np.array(0, np.int64)})  # and fails on zeros
    graph = load_onnx(path)
    assert "If" in {node.op for node in graph.nodes()}


def test_float_inputs_that_fail_on_zeros_are_still_refused(tmp_path: Path) -> None:
    """With only float inputs and static dims, a failed trial run stays a refusal."""
    model = _rate_switched_model(TensorProto.FLOAT)
    path = tmp_path / "float_switch.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="cannot run it on zeros"):
        load_onnx(path)
