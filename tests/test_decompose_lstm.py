"""decompose_lstm (passes/decompose_lstm.py): an LSTM of static length becomes its unrolled cell
(MatMul / Add / Sigmoid / Tanh / Mul), equal to onnxruntime's LSTM to float rounding."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from dyadiq.graph import QGraph, assign_stable_ids
from dyadiq.passes.decompose_lstm import decompose_lstm

HIDDEN = 5

LSTM_TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
net (float[3, 2, 4] x, float[1, 2, {HIDDEN}] h0, float[1, 2, {HIDDEN}] c0)
    => (float[3, 1, 2, {HIDDEN}] y, float[1, 2, {HIDDEN}] yh, float[1, 2, {HIDDEN}] yc) {{
    y, yh, yc = LSTM <hidden_size = {HIDDEN}> (x, w, r, b, , h0, c0)
}}
"""


def _model(*, direction: str = "forward") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    text = LSTM_TEXT.replace("<hidden_size", f'<direction = "{direction}", hidden_size')
    model = onnx.parser.parse_model(text)
    for name, shape in (("w", (1, 4 * HIDDEN, 4)), ("r", (1, 4 * HIDDEN, HIDDEN)),
                        ("b", (1, 8 * HIDDEN))):  # fmt: skip
        value = rng.normal(size=shape).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _qgraph(model: onnx.ModelProto) -> QGraph:
    graph = gs.import_onnx(model)
    assign_stable_ids(graph)
    return QGraph(graph=graph, opset=17, source="test", notes=[])


def test_lstm_unrolls_to_its_cell_and_matches_onnxruntime():
    model = _model()
    graph = _qgraph(model)
    report = decompose_lstm(graph)
    assert len(report.changed) == 1 and not report.skipped
    rewritten = graph.to_onnx()
    ops = [n.op_type for n in rewritten.graph.node]
    assert "LSTM" not in ops and ops.count("MatMul") == 3 * 4 * 2  # steps x gates x (W, R)
    onnx.checker.check_model(rewritten, full_check=True)
    rng = np.random.default_rng(1)
    feeds = {
        "x": rng.normal(size=(3, 2, 4)).astype(np.float32),
        "h0": rng.normal(size=(1, 2, HIDDEN)).astype(np.float32),
        "c0": rng.normal(size=(1, 2, HIDDEN)).astype(np.float32),
    }
    for got, want in zip(_run(rewritten, feeds), _run(model, feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bidirectional_lstm_is_left_with_the_reason():
    graph = _qgraph(_model(direction="reverse"))
    report = decompose_lstm(graph)
    assert report.changed == [] and "forward" in report.skipped[0][1]
    assert [n.op for n in graph.graph.nodes] == ["LSTM"]
