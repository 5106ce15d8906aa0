"""The language-model zoo's text handling and external-data model files (no model needed:
exporting Gemma takes minutes, so the real model runs in benchmarks/llm.py instead)."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dyadiq import zoo
from dyadiq.io import save_model_atomic
from dyadiq.zoo._text import britannica_prose


def test_britannica_prose_drops_headers_and_page_markers() -> None:
    raw = (
        "## Title\n### START: x ###\n\np.772:0\n\nShakespeare, William\nwas born.\n\n"
        "p.772:1\nNext para.\n"
    )
    assert britannica_prose(raw) == "Shakespeare, William was born.\n\nNext para."


def test_gemma_is_listed_as_a_language_model() -> None:
    entry = {m.name: m for m in zoo.list_models()}["gemma3_270m"]
    assert entry.task is zoo.Task.LANGUAGE_MODEL and not entry.has_labels
    assert "dequantised" in entry.description


def _model(weight: np.ndarray, codes: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("DequantizeLinear", ["codes", "scale"], ["wq"], axis=1, block_size=4),
        helper.make_node("MatMul", ["x", "w"], ["y0"]),
        helper.make_node("MatMul", ["y0", "wq"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(weight, "w"),
        helper.make_tensor("codes", TensorProto.INT4, codes.shape, codes.flatten().tolist()),
        numpy_helper.from_array(np.full((8, 2), 0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array([1.0], np.float32), "tiny"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_external_data_round_trip(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 8)).astype(np.float32)
    codes = rng.integers(-8, 8, size=(8, 8)).astype(np.int8)
    model = _model(weight, codes)
    before = model.SerializeToString()
    written = save_model_atomic(model, tmp_path / "m.onnx", external_data=True)
    assert written == [tmp_path / "m.onnx", tmp_path / "m.onnx.data"]
    assert model.SerializeToString() == before  # the caller's model is untouched
    header = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = {t.name for t in header.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"w"}  # the int4 codes (32 bytes) and small tensors stay inline
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    got = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    np.testing.assert_array_equal(got["w"], weight)
    np.testing.assert_array_equal(got["codes"].astype(np.int8), codes)
    x = rng.normal(size=(2, 64)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    want = (x @ weight) @ (codes.astype(np.float32) * 0.5)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_small_models_stay_inline_by_default(tmp_path: pathlib.Path) -> None:
    model = _model(np.ones((64, 8), np.float32), np.zeros((8, 8), np.int8))
    assert save_model_atomic(model, tmp_path / "m.onnx") == [tmp_path / "m.onnx"]
    assert not (tmp_path / "m.onnx.data").exists()


def test_models_over_the_protobuf_limit_get_external_data(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model too big for one protobuf is written with external data, never inline (the
    limit is lowered here: the real one is 2 GiB)."""
    from dyadiq import io
    from dyadiq.errors import OutputPathError

    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1024)
    model = _model(np.ones((64, 8), np.float32), np.zeros((8, 8), np.int8))
    written = save_model_atomic(model, tmp_path / "big.onnx")
    assert written == [tmp_path / "big.onnx", tmp_path / "big.onnx.data"]
    loaded = onnx.load(str(tmp_path / "big.onnx"))
    w = next(t for t in loaded.graph.initializer if t.name == "w")
    np.testing.assert_array_equal(numpy_helper.to_array(w), np.ones((64, 8), np.float32))
    with pytest.raises(OutputPathError, match="external data"):
        save_model_atomic(model, tmp_path / "inline.onnx", external_data=False)
