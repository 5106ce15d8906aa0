"""canonicalize_inference_ops: Sum -> Add, inference Dropout removed; float outputs unchanged
(onnxruntime, optimisation off), declined cases kept, and the residual Sum of an old CNN becomes
an integer Add instead of a float island."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.inspection import describe
from dyadiq.passes.canonicalize_inference_ops import canonicalize_inference_ops
from tests.builders import with_weights
from tests.rewrite_checks import assert_integer_end_to_end, op_types, run_unoptimized

SHAPE = "float[2, 3, 4]"


def _model(
    body: str, *, opset: int = 17, inputs: str = "a, b, c", outputs: str = "y"
) -> onnx.ModelProto:
    decl_in = ", ".join(f"{SHAPE} {n.strip()}" for n in inputs.split(","))
    decl_out = ", ".join(f"{SHAPE} {n.strip()}" for n in outputs.split(","))
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    net ({decl_in}) => ({decl_out}) {{
        {body}
    }}
    """
    return with_weights(text)


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {i.name: rng.normal(size=(2, 3, 4)).astype(np.float32) * 1e3 for i in model.graph.input}


def _rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    notes = canonicalize_inference_ops(copy).notes()
    onnx.checker.check_model(copy, full_check=True)
    return copy, notes


def _assert_same(model: onnx.ModelProto, rewritten: onnx.ModelProto, *, rtol: float) -> None:
    feeds = _feeds(model)
    for want, got in zip(
        run_unoptimized(model, feeds), run_unoptimized(rewritten, feeds), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


def test_two_input_sum_is_the_same_add_bit_for_bit() -> None:
    model = _model("s = Sum (a, b)\n y = Relu (s)", inputs="a, b")
    rewritten, notes = _rewritten(model)
    assert op_types(rewritten) == ["Add", "Relu"]
    assert notes == ["rewrote 1 Sum node(s) as Add"]
    _assert_same(model, rewritten, rtol=0.0)


def test_three_input_sum_is_a_chain_of_adds() -> None:
    model = _model("y = Sum (a, b, c)")
    rewritten, _ = _rewritten(model)
    assert op_types(rewritten) == ["Add", "Add"]
    _assert_same(model, rewritten, rtol=1e-6)  # one extra rounding at most, of |y| ~ 1e3


@pytest.mark.parametrize("opset", [7, 12, 17])
def test_inference_dropout_is_removed_and_its_consumers_read_its_input(opset: int) -> None:
    model = _model("d, mask = Dropout (a)\n y = Relu (d)", opset=opset, inputs="a")
    rewritten, notes = _rewritten(model)
    assert op_types(rewritten) == ["Relu"]
    assert rewritten.graph.node[0].input[0] == "a"
    assert notes == ["removed 1 inference-mode Dropout node(s)"]
    _assert_same(model, rewritten, rtol=0.0)


def test_dropout_feeding_a_graph_output_keeps_the_name_through_an_identity() -> None:
    model = _model("y = Dropout (a)", inputs="a")
    rewritten, _ = _rewritten(model)
    assert op_types(rewritten) == ["Identity"]
    assert rewritten.graph.node[0].output[0] == "y"
    _assert_same(model, rewritten, rtol=0.0)


def test_dropout_in_training_mode_or_with_a_read_mask_is_kept() -> None:
    training = _model(
        "ratio = Constant <value = float {0.5}> ()\n"
        "train = Constant <value = bool {1}> ()\n"
        "d = Dropout (a, ratio, train)\n y = Relu (d)",
        inputs="a",
    )
    model = onnx.ModelProto()
    model.CopyFrom(training)
    result = canonicalize_inference_ops(model)
    assert "Dropout" in op_types(model) and result.dropouts_removed == 0
    mask_read = _model(
        "d, mask = Dropout (a)\n m = Cast <to = 1> (mask)\n y = Add (d, m)", inputs="a"
    )
    rewritten, notes = _rewritten(mask_read)
    assert "Dropout" in op_types(rewritten)
    assert any("mask output is read" in note for note in notes)


def test_caller_model_is_untouched_and_the_frontend_applies_it() -> None:
    model = _model("s = Sum (a, b)\n d, mask = Dropout (s)\n y = Relu (d)", inputs="a, b")
    before = model.SerializeToString()
    graph = load_onnx(model)
    assert model.SerializeToString() == before
    ops = [node.op for node in graph.nodes()]
    assert "Sum" not in ops and "Dropout" not in ops
    assert any("Sum" in note for note in graph.notes)


# ResNet-50 (ONNX model zoo, opset 9) joins its residual branches with Sum and ends in Dropout
RESIDUAL = """
    <ir_version: 7, opset_import: ["" : 9]>
    net (float[1, 4, 6, 6] x) => (float[1, 5] y) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
        s = Sum (c2, r1)
        r2 = Relu (s)
        p = GlobalAveragePool (r2)
        d, mask = Dropout <ratio = 0.5> (p)
        f = Flatten (d)
        y = Gemm <transB = 1> (f, w3, b3)
    }
"""


def test_residual_sum_and_dropout_quantize_to_integer_ops() -> None:
    """The Sum becomes an Add that absorbs the Relu after it (ResNet's block end), so the
    model is integer end to end, bit-exact against the reference, and inspect says so."""
    rng = np.random.default_rng(3)
    model = with_weights(
        RESIDUAL,
        w1=rng.normal(size=(4, 4, 3, 3)) / 6,
        b1=rng.normal(size=4) * 0.1,
        w2=rng.normal(size=(4, 4, 3, 3)) / 6,
        b2=rng.normal(size=4) * 0.1,
        w3=rng.normal(size=(5, 4)) / 2,
        b3=rng.normal(size=5) * 0.1,
    )
    graph = load_onnx(model)
    labels = describe(graph)["layers"]
    float_labels = [
        layer["id"]
        for layer in labels
        if not layer["quantizable"] and not layer["reason"].startswith("activation: fused")
    ]
    assert float_labels == [], labels
    feeds = [{"x": rng.normal(size=(1, 4, 6, 6)).astype(np.float32)} for _ in range(6)]
    result = assert_integer_end_to_end(graph, feeds)
    add = next(op for op in result.sites.fused_activations if op.startswith("s"))
    assert result.sites.fused_activations[add].startswith("Relu")
