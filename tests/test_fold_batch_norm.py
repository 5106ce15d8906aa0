"""fold_batch_norm: structure, numerics against onnxruntime, and the cases it must leave alone.

Every model is opset 17 ONNX text; the original and the folded model run on the same random
inputs. Folding computes W * gamma / sigma in float64 and rounds once to float32, so the only
difference is float32 rounding of the weights and of the accumulation order (a few ulps on
outputs of magnitude ~1-10): rtol=1e-5, atol=1e-5 bounds it with margin.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.graph import QGraph
from dyadiq.passes.fold_batch_norm import fold_batch_norm
from dyadiq.pipeline import prepare_graph
from dyadiq.rewrite_report import RewriteReport
from tests.builders import with_weights
from tests.rewrite_checks import apply_float_pass, assert_same_outputs, op_types

RTOL = 1e-5
ATOL = 1e-5
SEED = 1234


# --- helpers ----------------------------------------------------------------------------------
def _feeds(model: onnx.ModelProto, seed: int = SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.normal(size=shape).astype(np.float32)
    return feeds


def _fold(model: onnx.ModelProto) -> tuple[QGraph, RewriteReport, onnx.ModelProto]:
    return apply_float_pass(model, fold_batch_norm)


def _ops(model: onnx.ModelProto) -> list[str]:
    return op_types(model)


def _assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    assert_same_outputs(original, folded, _feeds(original), rtol=RTOL, atol=ATOL)


def _bn_params(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 2.0, size=c),
        "beta": rng.normal(size=c),
        "mean": rng.normal(size=c),
        "var": rng.uniform(0.2, 2.0, size=c),
    }


def _conv_bn(rng: np.random.Generator, *, bias: bool = True) -> onnx.ModelProto:
    conv_inputs = "x, w, b" if bias else "x, w"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> ({conv_inputs})
        y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
    }}
    """
    weights = {"w": rng.normal(size=(4, 3, 3, 3)) * 0.3, **_bn_params(rng, 4)}
    if bias:
        weights["b"] = rng.normal(size=4)
    return with_weights(text, **weights)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


# --- structure + numerics: the pass fires -----------------------------------------------------
def test_conv_bn_folds_into_conv():
    rng = np.random.default_rng(SEED)
    model = _conv_bn(rng)
    model.graph.node[0].name = "conv"
    model.graph.node[1].name = "bn"
    assert _ops(model) == ["Conv", "BatchNormalization"]
    graph, report, out = _fold(model)
    assert _ops(out) == ["Conv"]
    assert report.changed == ["bn"]
    assert report.skipped == []
    assert graph.node_ids() == ["conv"]  # the layer keeps its id
    assert [o.name for o in out.graph.output] == ["y"]
    _assert_same_outputs(model, out)


def test_conv_without_bias_gets_a_bias():
    rng = np.random.default_rng(SEED)
    model = _conv_bn(rng, bias=False)
    assert len(model.graph.node[0].input) == 2
    _, report, out = _fold(model)
    assert _ops(out) == ["Conv"]
    assert len(report.changed) == 1
    conv = out.graph.node[0]
    assert len(conv.input) == 3
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    assert initializers[conv.input[2]].shape == (4,)
    assert initializers[conv.input[2]].dtype == np.float32
    _assert_same_outputs(model, out)


@pytest.mark.parametrize("const_shape", [(4, 1, 1), (1, 4, 1, 1), ()])
def test_conv_mul_add_folds_into_conv(const_shape):
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        m = Mul (c, scale)
        y = Add (m, shift)
    }
    """
    model = with_weights(
        text,
        w=rng.normal(size=(4, 3, 3, 3)) * 0.3,
        b=rng.normal(size=4),
        scale=rng.uniform(0.5, 2.0, size=const_shape),
        shift=rng.normal(size=const_shape),
    )
    model.graph.node[1].name = "mul"
    model.graph.node[2].name = "add"
    _, report, out = _fold(model)
    assert _ops(out) == ["Conv"]
    assert report.changed == ["mul", "add"]
    _assert_same_outputs(model, out)


@pytest.mark.parametrize("trans_b", [1, 0])
def test_gemm_bn_on_2d_input_folds_into_gemm(trans_b):
    rng = np.random.default_rng(SEED)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[3, 6] x) => (float[3, 4] y) {{
        g = Gemm <transB = {trans_b}> (x, w, b)
        y = BatchNormalization (g, gamma, beta, mean, var)
    }}
    """
    w = rng.normal(size=(4, 6)) * 0.4
    model = with_weights(text, w=w if trans_b else w.T, b=rng.normal(size=4), **_bn_params(rng, 4))
    model.graph.node[1].name = "bn"
    _, report, out = _fold(model)
    assert _ops(out) == ["Gemm"]
    assert report.changed == ["bn"]
    _assert_same_outputs(model, out)


def test_gemm_with_alpha_and_beta_folds_exactly():
    """Gemm computes alpha*A*B + beta*C: the folded bias must account for beta."""
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[3, 6] x) => (float[3, 4] y) {
        g = Gemm <transB = 1, alpha = 0.5, beta = 0.25> (x, w, b)
        y = BatchNormalization (g, gamma, beta, mean, var)
    }
    """
    model = with_weights(
        text, w=rng.normal(size=(4, 6)), b=rng.normal(size=4), **_bn_params(rng, 4)
    )
    _, report, out = _fold(model)
    assert _ops(out) == ["Gemm"]
    assert len(report.changed) == 1
    _assert_same_outputs(model, out)


def test_two_convs_sharing_a_weight_fold_separately():
    """Two layers reading one weight initializer each get their own folded weight."""
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 5, 5] x) => (float[1, 4, 5, 5] y1, float[1, 4, 5, 5] y2) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w)
        y1 = BatchNormalization (c1, g1, b1, m1, v1)
        c2 = Conv <pads = [1, 1, 1, 1]> (x, w)
        y2 = BatchNormalization (c2, g2, b2, m2, v2)
    }
    """
    p1, p2 = _bn_params(rng, 4), _bn_params(rng, 4)
    model = with_weights(
        text,
        w=rng.normal(size=(4, 3, 3, 3)) * 0.3,
        **{f"{k[0]}1": v for k, v in p1.items()},
        **{f"{k[0]}2": v for k, v in p2.items()},
    )
    _, report, out = _fold(model)
    assert _ops(out) == ["Conv", "Conv"]
    assert len(report.changed) == 2
    _assert_same_outputs(model, out)


def test_bn_after_mul_add_chain_folds_both():
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 5, 5] x) => (float[1, 4, 5, 5] y) {
        c = Conv (x, w, b)
        m = Mul (c, scale)
        a = Add (m, shift)
        y = BatchNormalization (a, gamma, beta, mean, var)
    }
    """
    model = with_weights(
        text,
        w=rng.normal(size=(4, 3, 1, 1)),
        b=rng.normal(size=4),
        scale=rng.uniform(0.5, 2.0, size=(4, 1, 1)),
        shift=rng.normal(size=(4, 1, 1)),
        **_bn_params(rng, 4),
    )
    _, report, out = _fold(model)
    assert _ops(out) == ["Conv"]
    assert len(report.changed) == 3
    _assert_same_outputs(model, out)


# --- must not fire ----------------------------------------------------------------------------
# 1-D convolutions: on NCHW tensors the frontend already rewrites a BatchNormalization that no
# layer absorbs as a depthwise Conv (tests/test_affine_as_depthwise.py), so fold never sees it
def _assert_unchanged(model: onnx.ModelProto) -> RewriteReport:
    _, report, out = _fold(model)
    assert _ops(out) == _ops(model)
    assert report.changed == []
    _assert_same_outputs(model, out)
    return report


def test_bn_not_folded_when_conv_output_has_second_consumer():
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 5] x) => (float[1, 4, 5] y, float[1, 4, 5] r) {
        c = Conv <pads = [1, 1]> (x, w, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
        r = Relu (c)
    }
    """
    model = with_weights(
        text, w=rng.normal(size=(4, 3, 3)), b=rng.normal(size=4), **_bn_params(rng, 4)
    )
    model.graph.node[1].name = "bn"
    report = _assert_unchanged(model)
    assert [name for name, _ in report.skipped] == ["bn"]


def test_bn_not_folded_when_conv_output_is_a_graph_output():
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 5] x) => (float[1, 4, 5] y, float[1, 4, 5] c) {
        c = Conv <pads = [1, 1]> (x, w, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    model = with_weights(
        text, w=rng.normal(size=(4, 3, 3)), b=rng.normal(size=4), **_bn_params(rng, 4)
    )
    report = _assert_unchanged(model)
    assert len(report.skipped) == 1


def _bn_after_relu() -> onnx.ModelProto:
    """Conv -> Relu -> BatchNormalization "bn": the BN's input is not a layer output."""
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 5] x) => (float[1, 4, 5] y) {
        c = Conv <pads = [1, 1]> (x, w, b)
        r = Relu (c)
        y = BatchNormalization (r, gamma, beta, mean, var)
    }
    """
    model = with_weights(
        text, w=rng.normal(size=(4, 3, 3)), b=rng.normal(size=4), **_bn_params(rng, 4)
    )
    model.graph.node[2].name = "bn"
    return model


def test_bn_after_relu_is_not_folded():
    model = _bn_after_relu()
    report = _assert_unchanged(model)
    assert report.skipped == [("bn", "input is not a foldable Conv/Gemm output")]


def test_bn_on_graph_input_is_not_folded():
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 4, 5] x) => (float[1, 4, 5] y) {
        y = BatchNormalization (x, gamma, beta, mean, var)
    }
    """
    report = _assert_unchanged(with_weights(text, **_bn_params(rng, 4)))
    assert len(report.skipped) == 1


def test_bn_in_training_mode_is_not_folded():
    """training_mode=1 normalises with batch statistics: the constants do not describe it."""
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[2, 3, 5, 5] x) => (float[2, 4, 5, 5] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y, rm, rv = BatchNormalization <training_mode = 1> (c, gamma, beta, mean, var)
    }
    """
    model = with_weights(
        text, w=rng.normal(size=(4, 3, 3, 3)), b=rng.normal(size=4), **_bn_params(rng, 4)
    )
    _, report, out = _fold(model)
    assert _ops(out) == ["Conv", "BatchNormalization"]
    assert report.changed == []
    assert [reason for _, reason in report.skipped] == ["training mode uses batch statistics"]


@pytest.mark.parametrize(
    "scale_shape",
    [
        (4,),  # (C,) on NCHW broadcasts along W (here W == C == 4), not along channels
        (1, 1, 4, 4),  # spatial
        (1, 4, 4, 1),  # per channel and per row
    ],
)
def test_mul_with_non_per_channel_constant_is_not_folded(scale_shape):
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        m = Mul (c, scale)
        y = Add (m, shift)
    }
    """
    model = with_weights(
        text,
        w=rng.normal(size=(4, 3, 3, 3)),
        b=rng.normal(size=4),
        scale=rng.uniform(0.5, 2.0, size=scale_shape),
        shift=rng.normal(size=(4, 1, 1)),
    )
    model.graph.node[1].name = "mul"
    report = _assert_unchanged(model)
    assert [name for name, _ in report.skipped] == ["mul"]


def test_mul_add_with_non_per_channel_add_is_not_folded():
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        m = Mul (c, scale)
        y = Add (m, shift)
    }
    """
    model = with_weights(
        text,
        w=rng.normal(size=(4, 3, 3, 3)),
        b=rng.normal(size=4),
        scale=rng.uniform(0.5, 2.0, size=(4, 1, 1)),
        shift=rng.normal(size=(1, 1, 4, 4)),
    )
    _assert_unchanged(model)


def test_mul_add_with_shared_intermediate_is_not_folded():
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y, float[1, 4, 4, 4] m) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        m = Mul (c, scale)
        y = Add (m, shift)
    }
    """
    model = with_weights(
        text,
        w=rng.normal(size=(4, 3, 3, 3)),
        b=rng.normal(size=4),
        scale=rng.uniform(0.5, 2.0, size=(4, 1, 1)),
        shift=rng.normal(size=(4, 1, 1)),
    )
    _assert_unchanged(model)


def test_mul_after_relu_is_not_folded():
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        r = Relu (c)
        m = Mul (r, scale)
        y = Add (m, shift)
    }
    """
    model = with_weights(
        text,
        w=rng.normal(size=(4, 3, 3, 3)),
        b=rng.normal(size=4),
        scale=rng.uniform(0.5, 2.0, size=(4, 1, 1)),
        shift=rng.normal(size=(4, 1, 1)),
    )
    _assert_unchanged(model)


def test_fold_edits_only_the_graph_it_is_given():
    """The pass works in place on its QGraph; a copy taken before keeps the BN."""
    rng = np.random.default_rng(SEED)
    graph = load_onnx(_conv_bn(rng), simplify=False)
    kept = graph.copy()
    fold_batch_norm(graph)
    assert [n.op for n in graph.nodes()] == ["Conv"]
    assert [n.op for n in kept.nodes()] == ["Conv", "BatchNormalization"]
    assert all(isinstance(t, gs.Constant) for t in kept.graph.nodes[0].inputs[1:])


def test_depthwise_conv_bn_folds():
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y) {
        c = Conv <group = 4, pads = [1, 1, 1, 1]> (x, w, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    model = with_weights(
        text, w=rng.normal(size=(4, 1, 3, 3)), b=rng.normal(size=4), **_bn_params(rng, 4)
    )
    _, report, out = _fold(model)
    assert _ops(out) == ["Conv"]
    assert len(report.changed) == 1
    _assert_same_outputs(model, out)


def test_skip_reasons_reach_the_prepared_graph_report():
    """prepare_graph keeps each rewrite's report, reasons included (report.json `rewrites`)."""
    model = _bn_after_relu()
    prepared = prepare_graph(load_onnx(model))
    by_pass = {rewrite.name: rewrite.to_json() for rewrite in prepared.rewrites}
    assert by_pass["fold_batch_norm"] == {
        "pass": "fold_batch_norm",
        "changed": [],
        "skipped": [{"node": "bn", "reason": "input is not a foldable Conv/Gemm output"}],
    }
    assert "canonicalize_hard_swish" in by_pass
    assert "1 x input is not a foldable Conv/Gemm output" in prepared.rewrites[0].summary()


def test_export_leaves_the_graph_it_exports_untouched():
    """to_onnx drops dead nodes and sorts in the exported model only: analyses that export a
    graph they are still reading must not see it change."""
    rng = np.random.default_rng(SEED)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 5, 5] x) => (float[1, 4, 5, 5] y) {
        y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    }
    """
    graph = load_onnx(with_weights(text, w=rng.normal(size=(4, 3, 3, 3)), b=rng.normal(size=4)))
    dead = gs.Variable("dead", dtype=np.float32)
    graph.graph.nodes.append(
        gs.Node("Relu", "dead_relu", inputs=[graph.graph.inputs[0]], outputs=[dead])
    )
    before = graph.node_ids()
    exported = graph.to_onnx()
    assert graph.node_ids() == before and len(before) == 2
    assert [node.op_type for node in exported.graph.node] == ["Conv"]


@pytest.mark.parametrize(
    ("shift_shape", "folds"),
    [((4, 1, 1), True), ((1, 4, 1, 1), True), ((), True), ((4, 6, 6), False)],
)
@pytest.mark.parametrize("constant_first", [False, True])
def test_conv_then_per_channel_add_folds_into_the_bias(shift_shape, folds, constant_first):
    """Caffe2 exports (DenseNet-121) and paddle2onnx (PP-OCRv4) keep a Conv's bias as an Add
    after it; a per-channel one folds into the bias, anything else stays an Add."""
    rng = np.random.default_rng(SEED)
    operands = "shift, c" if constant_first else "c, shift"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        a = Add ({operands})
        y = Relu (a)
    }}
    """
    model = with_weights(
        text, w=rng.normal(size=(4, 3, 3, 3)) * 0.3, shift=rng.normal(size=shift_shape)
    )
    model.graph.node[1].name = "add"
    _, report, out = _fold(model)
    assert (_ops(out) == ["Conv", "Relu"]) is folds, _ops(out)
    assert (report.changed == ["add"]) is folds
    _assert_same_outputs(model, out)
