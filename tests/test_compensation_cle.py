"""Cross-layer equalisation: float outputs unchanged, ranges balanced, bounded pairs declined."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.compensation.cross_layer_equalization import equalize_cross_layer
from tests.builders import with_weights

CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[2, 4, 8, 8] x) => (float[2, 6, 8, 8] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (a)
    d = Conv <group = 8, pads = [1, 1, 1, 1]> (r, wd, bd)
    lo = Constant <value = float {0.0}> ()
    hi = Constant <value = float {6.0}> ()
    CLIP
    y = Conv (c, wp, bp)
}
"""


def _model(rng: np.random.Generator, relu6: bool) -> onnx.ModelProto:
    """The depthwise conv's activation: Clip(0, 6), or Clip(0) (no upper bound: a ReLU)."""
    w1 = rng.normal(size=(8, 4, 3, 3)) * np.exp(rng.normal(size=(8, 1, 1, 1)) * 1.5)
    clip = "c = Clip (d, lo, hi)" if relu6 else "c = Clip (d, lo)"
    return with_weights(
        CHAIN.replace("CLIP", clip),
        w1=w1,
        b1=rng.normal(size=8),
        wd=rng.normal(size=(8, 1, 3, 3)),
        bd=rng.normal(size=8),
        wp=rng.normal(size=(6, 8, 1, 1)),
        bp=rng.normal(size=6),
    )


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session.run(None, {"x": x})[0]


def test_cle_leaves_float_outputs_unchanged_and_balances_ranges() -> None:
    rng = np.random.default_rng(0)
    model = _model(rng, relu6=False)  # Clip(0): a ReLU, scales with the channel
    graph = load_onnx(model, simplify=False)
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    before = _outputs(graph.to_onnx(), x)
    w1_before = np.asarray(graph.weight(graph.weighted_layers()[0]).values)
    report = equalize_cross_layer(graph)
    after = _outputs(graph.to_onnx(), x)
    assert len(report.equalized) == 2 and report.declined[-1][1].startswith("its output")
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    w1_after = np.asarray(graph.weight(graph.weighted_layers()[0]).values)
    spread = [np.ptp(np.log(np.abs(w).reshape(8, -1).max(1))) for w in (w1_before, w1_after)]
    assert spread[1] < 0.5 * spread[0]  # channel ranges of layer 1 became more alike
    onnx.checker.check_model(graph.to_onnx(), full_check=True)


def test_cle_declines_a_relu6_pair_and_says_why() -> None:
    rng = np.random.default_rng(1)
    graph = load_onnx(_model(rng, relu6=True), simplify=False)
    report = equalize_cross_layer(graph)
    reasons = dict(report.declined)
    depthwise = graph.weighted_layers()[1].name
    assert "Clip(0, 6)" in reasons[depthwise]
    assert len(report.equalized) == 1  # the ReLU pair still goes through


def test_cle_goes_through_relu_and_maxpool() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 8, 8] x) => (float[1, 5, 4, 4] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
        y = Conv <pads = [1, 1, 1, 1]> (p, w2, b2)
    }
    """
    rng = np.random.default_rng(2)
    w1 = rng.normal(size=(6, 3, 3, 3)) * np.exp(rng.normal(size=(6, 1, 1, 1)) * 1.5)
    model = with_weights(
        text, w1=w1, b1=rng.normal(size=6), w2=rng.normal(size=(5, 6, 3, 3)), b2=rng.normal(size=5)
    )
    graph = load_onnx(model, simplify=False)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    before = _outputs(graph.to_onnx(), x)
    report = equalize_cross_layer(graph)
    assert len(report.equalized) == 1
    after = _outputs(graph.to_onnx(), x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
