"""canonicalize_hard_swish: structure, numerics against onnxruntime, and near-misses it must skip.

The decomposed forms and ONNX ``HardSwish`` are equal in real arithmetic; in float32 they differ
by a few ulps of outputs of magnitude <= 6 (~1e-6), so rtol=1e-5, atol=1e-5 holds with margin
while any wrong rewrite (e.g. of x*clip(x+2,0,6)/6) misses by >= 1e-1.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from dyadiq.graph import QGraph
from dyadiq.passes.canonicalize_hard_swish import canonicalize_hard_swish
from dyadiq.rewrite_report import RewriteReport
from tests.builders import with_weights
from tests.rewrite_checks import apply_float_pass, assert_same_outputs, op_types

RTOL = 1e-5
ATOL = 1e-5
SEED = 4321
SHAPE = (2, 3, 5, 7)
CONSTS = {"three": np.array(3.0), "zero": np.array(0.0), "six": np.array(6.0)}


# --- helpers ----------------------------------------------------------------------------------
def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Uniform on [-6, 6] (all three pieces of hard-swish) plus the knots -3, 0 and 3."""
    rng = np.random.default_rng(SEED)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        x = rng.uniform(-6.0, 6.0, size=shape).astype(np.float32)
        x.reshape(-1)[:3] = [-3.0, 0.0, 3.0]
        feeds[value.name] = x
    return feeds


def _model(body: str, *, opset: int = 17, outputs: str = "y", inputs: str = "x", **weights):
    decl_in = ", ".join(
        f"float[{', '.join(map(str, SHAPE))}] {n.strip()}" for n in inputs.split(",")
    )
    decl_out = ", ".join(
        f"float[{', '.join(map(str, SHAPE))}] {n.strip()}" for n in outputs.split(",")
    )
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    net ({decl_in}) => ({decl_out}) {{
        {body}
    }}
    """
    return with_weights(text, **{**CONSTS, **weights})


def _named(model: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    for node, name in zip(model.graph.node, names, strict=True):
        node.name = name
    return model


def _rewrite(model: onnx.ModelProto) -> tuple[QGraph, RewriteReport, onnx.ModelProto]:
    return apply_float_pass(model, canonicalize_hard_swish)


def _ops(model: onnx.ModelProto) -> list[str]:
    return op_types(model)


def _assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    assert_same_outputs(original, rewritten, _feeds(original), rtol=RTOL, atol=ATOL)


CLIP_DIV = """
    a = Add (x, three)
    c = Clip (a, zero, six)
    m = Mul (x, c)
    y = Div (m, six)
"""


# --- structure + numerics: the pass fires -----------------------------------------------------
@pytest.mark.parametrize("opset", [17, 14])
def test_add_clip_mul_div_becomes_hard_swish(opset):
    model = _named(_model(CLIP_DIV, opset=opset), "add", "clip", "mul", "div")
    assert _ops(model) == ["Add", "Clip", "Mul", "Div"]
    graph, report, out = _rewrite(model)
    assert _ops(out) == ["HardSwish"]
    assert report.changed == ["add", "clip", "mul", "div"]
    assert report.skipped == []
    assert graph.node_ids() == ["add/HardSwish"]
    node = out.graph.node[0]
    assert list(node.input) == ["x"]
    assert list(node.output) == ["y"]
    assert out.opset_import[0].version == opset
    _assert_same_outputs(model, out)


@pytest.mark.parametrize("opset", [17, 14])
def test_mul_by_one_sixth_variant_becomes_hard_swish(opset):
    body = """
        a = Add (three, x)
        c = Clip (a, zero, six)
        m = Mul (c, x)
        y = Mul (sixth, m)
    """
    model = _named(_model(body, opset=opset, sixth=np.array(1 / 6)), "add", "clip", "mul", "mul6")
    _, report, out = _rewrite(model)
    assert _ops(out) == ["HardSwish"]
    assert report.changed == ["add", "clip", "mul", "mul6"]
    _assert_same_outputs(model, out)


def test_constant_node_operands_are_matched():
    """PP-OCR keeps the 3, 0, 6 as Constant nodes; import promotes them, then the rewrite fires."""
    model = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[{", ".join(map(str, SHAPE))}] x) => (float[{", ".join(map(str, SHAPE))}] y) {{
            k3 = Constant <value = float {{3.0}}> ()
            k0 = Constant <value = float {{0.0}}> ()
            k6 = Constant <value = float {{6.0}}> ()
            a = Add (x, k3)
            c = Clip (a, k0, k6)
            m = Mul (x, c)
            y = Div (m, k6)
        }}
        """
    )
    onnx.checker.check_model(model, full_check=True)
    _, report, out = _rewrite(model)
    assert _ops(out) == ["HardSwish"]
    assert len(report.changed) == 4
    _assert_same_outputs(model, out)


@pytest.mark.parametrize("opset", [17, 14])
def test_hard_sigmoid_times_x_becomes_hard_swish(opset):
    body = """
        h = HardSigmoid <alpha = 0.16666667, beta = 0.5> (x)
        y = Mul (x, h)
    """
    model = _named(_model(body, opset=opset), "hsig", "mul")
    graph, report, out = _rewrite(model)
    assert _ops(out) == ["HardSwish"]
    assert report.changed == ["hsig", "mul"]
    assert graph.node_ids() == ["hsig/HardSwish"]
    _assert_same_outputs(model, out)


def test_two_hard_swishes_in_a_chain_both_rewritten():
    body = """
        a = Add (x, three)
        c = Clip (a, zero, six)
        m = Mul (x, c)
        z = Div (m, six)
        h = HardSigmoid <alpha = 0.16666667> (z)
        y = Mul (h, z)
    """
    model = _model(body)
    _, report, out = _rewrite(model)
    assert _ops(out) == ["HardSwish", "HardSwish"]
    assert len(report.changed) == 6
    _assert_same_outputs(model, out)


# --- must not fire ----------------------------------------------------------------------------
def _assert_unchanged(model: onnx.ModelProto) -> RewriteReport:
    _, report, out = _rewrite(model)
    assert sorted(_ops(out)) == sorted(_ops(model))  # toposort may reorder side branches
    assert report.changed == []
    _assert_same_outputs(model, out)
    return report


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(CLIP_DIV.replace("Add (x, three)", "Add (x, two)"), id="add-2"),
        pytest.param(
            CLIP_DIV.replace("Clip (a, zero, six)", "Clip (a, zero, five)"), id="clip-0-5"
        ),
        pytest.param(CLIP_DIV.replace("Clip (a, zero, six)", "Clip (a, one, six)"), id="clip-1-6"),
        pytest.param(CLIP_DIV.replace("Div (m, six)", "Div (m, five)"), id="div-5"),
        pytest.param(CLIP_DIV.replace("Div (m, six)", "Div (six, m)"), id="six-over-m"),
        pytest.param(CLIP_DIV.replace("Div (m, six)", "Mul (m, fifth)"), id="mul-0.2"),
        pytest.param(CLIP_DIV.replace("Mul (x, c)", "Mul (c, c)"), id="clip-squared"),
        pytest.param(CLIP_DIV.replace("Mul (x, c)", "Add (x, c)"), id="add-not-mul"),
    ],
)
def test_near_miss_constants_and_ops_are_not_rewritten(body):
    weights = {"two": np.array(2.0), "five": np.array(5.0), "one": np.array(1.0)}
    _assert_unchanged(_model(body, fifth=np.array(0.2), **weights))


def test_mul_of_a_different_x_is_not_rewritten():
    body = """
        a = Add (x, three)
        c = Clip (a, zero, six)
        m = Mul (z, c)
        y = Div (m, six)
    """
    _assert_unchanged(_model(body, inputs="x, z"))


@pytest.mark.parametrize("shared", ["a", "c", "m"])
def test_intermediate_used_twice_is_not_rewritten(shared):
    body = CLIP_DIV + f"    r = Relu ({shared})\n"
    _assert_unchanged(_model(body, outputs="y, r"))


@pytest.mark.parametrize("exposed", ["a", "c", "m"])
def test_intermediate_graph_output_is_not_rewritten(exposed):
    _assert_unchanged(_model(CLIP_DIV, outputs=f"y, {exposed}"))


@pytest.mark.parametrize(
    "attrs",
    [
        pytest.param("", id="defaults-alpha-0.2"),
        pytest.param("<alpha = 0.2>", id="alpha-0.2"),
        pytest.param("<alpha = 0.2, beta = 0.5>", id="alpha-0.2-beta-0.5"),
        pytest.param("<alpha = 0.16666667, beta = 0.4>", id="beta-0.4"),
    ],
)
def test_hard_sigmoid_with_other_parameters_is_not_rewritten(attrs):
    body = f"""
        h = HardSigmoid {attrs} (x)
        y = Mul (x, h)
    """
    _assert_unchanged(_model(body))


def test_hard_sigmoid_times_other_tensor_is_not_rewritten():
    body = """
        h = HardSigmoid <alpha = 0.16666667> (x)
        y = Mul (z, h)
    """
    _assert_unchanged(_model(body, inputs="x, z"))


def test_hard_sigmoid_output_used_twice_is_not_rewritten():
    body = """
        h = HardSigmoid <alpha = 0.16666667> (x)
        y = Mul (x, h)
    """
    _assert_unchanged(_model(body, outputs="y, h"))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(CLIP_DIV, id="clip-form"),
        pytest.param("h = HardSigmoid <alpha = 0.16666667> (x)\n y = Mul (x, h)", id="hsig-form"),
    ],
)
def test_opset_13_rewrites_nothing_and_says_why(body):
    model = _model(body, opset=13)
    report = _assert_unchanged(model)
    assert report.skipped == [("*", "opset 13 < 14 has no HardSwish")]
