"""per_channel_affine_as_depthwise: DenseNet's BatchNormalization -> Mul -> Add after a Concat
becomes one depthwise 1x1 Conv (float outputs equal onnxruntime's on the original to float32
rounding), the model is then integer end to end and bit-exact, and what fold_batch_norm folds
or what is not a per-channel affine map is left alone."""

from __future__ import annotations

import numpy as np
import onnx

from dyadiq.frontends.onnx_frontend import load_onnx
from tests.builders import with_weights
from tests.rewrite_checks import assert_integer_end_to_end, run_unoptimized

# rtol/atol: a*x + b against ((x - mean) / sqrt(var + eps)) * gamma + beta, then * m + c: a few
# float32 ulps of outputs of magnitude ~10; a wrong channel or a dropped term misses by >= 1e-2
RTOL, ATOL = 1e-5, 1e-5

DENSE_BLOCK = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        cat = Concat <axis = 1> (x, r1)
        bn = BatchNormalization <epsilon = 1e-5> (cat, gamma, beta, mean, var)
        m = Mul (bn, scale)
        a = Add (m, shift)
        r2 = Relu (a)
        y = Conv (r2, w2, b2)
    }
"""


def _dense_block(rng: np.random.Generator) -> onnx.ModelProto:
    return with_weights(
        DENSE_BLOCK,
        w1=rng.normal(size=(4, 3, 3, 3)) / 3,
        b1=rng.normal(size=4) * 0.1,
        gamma=rng.uniform(0.5, 1.5, size=7),
        beta=rng.normal(size=7) * 0.2,
        mean=rng.normal(size=7) * 0.3,
        var=rng.uniform(0.5, 2.0, size=7),
        scale=rng.uniform(0.5, 2.0, size=(7, 1, 1)),
        shift=rng.normal(size=(7, 1, 1)) * 0.2,
        w2=rng.normal(size=(4, 7, 1, 1)) / 2,
        b2=rng.normal(size=4) * 0.1,
    )


def test_batch_norm_mul_add_after_a_concat_is_one_depthwise_conv() -> None:
    rng = np.random.default_rng(11)
    model = _dense_block(rng)
    graph = load_onnx(model)
    ops = [node.op for node in graph.nodes()]
    assert "BatchNormalization" not in ops and "Mul" not in ops and ops.count("Add") == 0
    depthwise = [n for n in graph.nodes() if n.op == "Conv" and n.attrs.get("group") == 7]
    assert len(depthwise) == 1
    feeds = {"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32) * 3}
    (want,) = run_unoptimized(model, feeds)
    (got,) = run_unoptimized(graph.to_onnx(), feeds)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_dense_block_is_integer_end_to_end_and_bit_exact() -> None:
    rng = np.random.default_rng(12)
    graph = load_onnx(_dense_block(rng))
    feeds = [{"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)} for _ in range(6)]
    assert_integer_end_to_end(graph, feeds)


SHARED_CONV = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y, float[1, 4, 6, 6] z, float[1, 4, 6, 6] u) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        y = BatchNormalization (c, g1, be1, mu1, v1)
        z = BatchNormalization (c, g2, be2, mu2, v2)
        c2 = Conv <pads = [1, 1, 1, 1]> (x, w2, b1)
        u = BatchNormalization (c2, g1, be1, mu1, v1)
    }
"""


def test_only_what_fold_batch_norm_cannot_fold_is_rewritten() -> None:
    """One Conv output read by two BatchNormalizations (Inception v2): both become depthwise
    convs; a BatchNormalization that is a Conv's only reader stays for fold_batch_norm."""
    rng = np.random.default_rng(13)
    stats = {}
    for k in (1, 2):
        stats |= {
            f"g{k}": rng.uniform(0.5, 1.5, size=4),
            f"be{k}": rng.normal(size=4) * 0.2,
            f"mu{k}": rng.normal(size=4) * 0.3,
            f"v{k}": rng.uniform(0.5, 2.0, size=4),
        }
    model = with_weights(
        SHARED_CONV,
        w1=rng.normal(size=(4, 3, 3, 3)) / 3,
        w2=rng.normal(size=(4, 3, 3, 3)) / 3,
        b1=rng.normal(size=4) * 0.1,
        **stats,
    )
    graph = load_onnx(model, simplify=False)
    ops = [node.op for node in graph.nodes()]
    assert ops.count("BatchNormalization") == 1
    assert sum(1 for n in graph.nodes() if n.op == "Conv" and n.attrs.get("group") == 4) == 2
    feeds = {"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)}
    for want, got in zip(
        run_unoptimized(model, feeds), run_unoptimized(graph.to_onnx(), feeds), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_a_lone_mul_by_a_constant_is_left_alone() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y) {
        y = Mul (x, s)
    }
    """
    graph = load_onnx(with_weights(text, s=np.full((4, 1, 1), 0.5)), simplify=False)
    assert [node.op for node in graph.nodes()] == ["Mul"]


def test_a_batch_norm_fold_would_leave_is_rewritten() -> None:
    """fold_batch_norm folds a Mul into a Conv only as a Mul -> Add pair, so a BN after
    Conv -> Mul stays unfolded there: this pass (which follows fold's own rules) takes it."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        m = Mul (c, scale)
        y = BatchNormalization (m, gamma, beta, mean, var)
    }
    """
    rng = np.random.default_rng(14)
    model = with_weights(
        text,
        w1=rng.normal(size=(4, 3, 3, 3)) / 3,
        b1=rng.normal(size=4) * 0.1,
        scale=rng.uniform(0.5, 2.0, size=(4, 1, 1)),
        gamma=rng.uniform(0.5, 1.5, size=4),
        beta=rng.normal(size=4) * 0.2,
        mean=rng.normal(size=4) * 0.3,
        var=rng.uniform(0.5, 2.0, size=4),
    )
    graph = load_onnx(model, simplify=False)
    ops = [node.op for node in graph.nodes()]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2, ops
    feeds = {"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)}
    (want,) = run_unoptimized(model, feeds)
    (got,) = run_unoptimized(graph.to_onnx(), feeds)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
