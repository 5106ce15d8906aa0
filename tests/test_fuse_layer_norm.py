"""fuse_layer_norm: a LayerNorm written out op by op (opset < 17 exporters) becomes one
LayerNormalization; float outputs equal onnxruntime's on the original to float32 rounding,
the model is converted to opset 17 only when it has a match, and near misses stay as they
are."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.inspection import describe
from tests.builders import with_weights
from tests.rewrite_checks import run_unoptimized

# the fused op and the nine-op spelling differ by float32 rounding of a mean, a variance and a
# square root: a few ulps of outputs of magnitude ~3; a wrong axis or eps misses by >= 1e-3
RTOL, ATOL = 1e-5, 1e-5
HIDDEN = 8


def _decomposed(square: str = "Pow (d, two)", affine: bool = True, axes: str = "[-1]") -> str:
    tail = (
        "n = Div (d, s)\n g = Mul (n, gamma)\n y0 = Add (g, beta)" if affine else "y0 = Div (d, s)"
    )
    return f"""
    <ir_version: 7, opset_import: ["" : 12]>
    net (float[1, 5, {HIDDEN}] x) => (float[1, 5, {HIDDEN}] y) {{
        h = MatMul (x, w)
        m = ReduceMean <axes = {axes}> (h)
        d = Sub (h, m)
        p = {square}
        v = ReduceMean <axes = {axes}> (p)
        e = Add (v, eps)
        s = Sqrt (e)
        {tail}
        y = MatMul (y0, w2)
    }}
    """


def _model(text: str) -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    return with_weights(
        text,
        w=rng.normal(size=(HIDDEN, HIDDEN)),
        w2=rng.normal(size=(HIDDEN, HIDDEN)) / 3,
        two=np.array(2.0),
        eps=np.array(1e-5),
        gamma=rng.uniform(0.5, 1.5, size=HIDDEN),
        beta=rng.normal(size=HIDDEN) * 0.2,
    )


def _assert_same(model: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    feeds = {"x": np.random.default_rng(9).normal(size=(1, 5, HIDDEN)).astype(np.float32) * 3}
    for want, got in zip(
        run_unoptimized(model, feeds), run_unoptimized(rewritten, feeds), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("square", ["Pow (d, two)", "Mul (d, d)"])
@pytest.mark.parametrize("affine", [True, False])
def test_decomposed_layer_norm_becomes_one_layer_normalization(square: str, affine: bool) -> None:
    model = _model(_decomposed(square, affine))
    graph = load_onnx(model)
    ops = [node.op for node in graph.nodes()]
    assert ops == ["MatMul", "LayerNormalization", "MatMul"], ops
    assert graph.opset == 17
    assert any("fused 1 decomposed LayerNorm" in note for note in graph.notes)
    _assert_same(model, graph.to_onnx())


def test_fused_layer_norm_is_an_integer_layer_norm_in_inspect() -> None:
    graph = load_onnx(_model(_decomposed()))
    labels = {layer["op"]: layer for layer in describe(graph)["layers"]}
    assert labels["LayerNormalization"]["quantizable"], labels["LayerNormalization"]
    assert "integer LayerNorm" in labels["LayerNormalization"]["reason"]


@pytest.mark.parametrize(
    "text",
    [
        _decomposed(axes="[1]"),  # over the tokens, not the features
        _decomposed().replace("d = Sub (h, m)", "d = Sub (m, h)"),  # the sign flipped
        _decomposed()
        .replace("y = MatMul (y0, w2)", "y = MatMul (y0, w2)\n q = Relu (d)")
        .replace("=> (float[1, 5, 8] y)", "=> (float[1, 5, 8] y, float[1, 5, 8] q)"),
    ],
    ids=["other-axis", "negated", "centred-tensor-read-elsewhere"],
)
def test_near_misses_stay_as_written_and_at_their_opset(text: str) -> None:
    model = _model(text)
    graph = load_onnx(model)
    assert "LayerNormalization" not in [node.op for node in graph.nodes()]
    assert graph.opset == 12
    _assert_same(model, graph.to_onnx())


def test_opset_conversion_leaves_no_constant_nodes() -> None:
    """Converting opset 12 -> 17 turns Squeeze's axes attribute into a Constant node's output;
    left as a node, a float island that reads it declared the int64 axes a float input (PP-OCRv4
    rec's integer build failed), so the frontend promotes them to initializers again."""
    text = _decomposed().replace(
        "y = MatMul (y0, w2)",
        "u = Unsqueeze <axes = [0]> (y0)\n q = Squeeze <axes = [0]> (u)\n y = MatMul (q, w2)",
    )
    model = _model(text)
    graph = load_onnx(model, simplify=False)
    assert graph.opset == 17
    ops = [node.op for node in graph.nodes()]
    assert "LayerNormalization" in ops and "Constant" not in ops, ops
    _assert_same(model, graph.to_onnx())
