"""FoldStaticIf (passes/fold_static_if.py): an If whose condition is static once shapes are
fixed is replaced by its taken branch; one that depends on data is kept, with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyadiq.errors import ConfigError
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.fold_static_if import fold_static_if

BRANCHES = """
    then_branch = then_g () => (float[1, 4] t) {
        t = Relu (x)
    },
    else_branch = else_g () => (float[1, 4] e) {
        e = Neg (x)
    }
"""

SHAPE_CONDITION = f"""
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 4] x) => (float[1, 4] y) {{
    s = Shape (x)
    i = Constant <value = int64 {{1}}> ()
    d = Gather <axis = 0> (s, i)
    four = Constant <value = int64 {{4}}> ()
    c = Equal (d, four)
    y = If (c) <{BRANCHES}>
}}
"""

DATA_CONDITION = f"""
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 4] x) => (float[1, 4] y) {{
    r = ReduceSum <keepdims = 0> (x)
    zero = Constant <value = float {{0}}> ()
    c = Greater (r, zero)
    y = If (c) <{BRANCHES}>
}}
"""

# silero_vad's shape: the whole network under an If on a scalar sample-rate input, and inside
# the taken branch a Pad whose widths are computed (Constant -> Cast) and a nested If on a shape.
SILERO_SHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 8] x, int64 sr) => (float[1, 8] y) {
    rate = Constant <value = int64 {16000}> ()
    c = Equal (sr, rate)
    y = If (c) <
        then_branch = fast () => (float[1, 8] out) {
            p = Constant <value = int32[4] {0, 2, 0, 2}> ()
            p64 = Cast <to = 7> (p)
            padded = Pad (x, p64)
            s = Shape (padded)
            k = Constant <value = int64 {1}> ()
            n = Gather <axis = 0> (s, k)
            twelve = Constant <value = int64 {12}> ()
            wide = Equal (n, twelve)
            inner = If (wide) <
                then_branch = w () => (float[1, 12] a) { a = Relu (padded) },
                else_branch = v () => (float[1, 12] b) { b = Neg (padded) }
            >
            st = Constant <value = int64[1] {2}> ()
            en = Constant <value = int64[1] {10}> ()
            ax = Constant <value = int64[1] {1}> ()
            out = Slice (inner, st, en, ax)
        },
        else_branch = slow () => (float[1, 8] out2) {
            out2 = Neg (x)
        }
    >
}
"""


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_shape_condition_inlines_the_taken_branch():
    model = onnx.parser.parse_model(SHAPE_CONDITION)
    result = fold_static_if(model)
    assert result.modified and "If" not in _ops(result.model)
    assert "Relu" in _ops(result.model) and "Neg" not in _ops(result.model)
    (decision,) = result.decisions
    assert decision.folded and "then_branch" in decision.reason
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, {"x": x}), _run(model, {"x": x}), atol=1e-6)
    assert _ops(model).count("If") == 1  # the caller's model is not edited


def test_data_dependent_condition_is_kept_with_the_inputs_it_depends_on():
    model = onnx.parser.parse_model(DATA_CONDITION)
    result = fold_static_if(model)
    assert "If" in _ops(result.model)
    (decision,) = result.decisions
    assert not decision.folded and "graph input(s) x" in decision.reason
    assert result.report["declined"] == [vars(decision)]


def test_model_without_if_is_returned_unchanged():
    text = '<ir_version: 8, opset_import: ["" : 17]> net (float[1, 4] x) => (float[1, 4] y) '
    model = onnx.parser.parse_model(text + "{ s = Shape (x)\n y = Relu (x) }")
    result = fold_static_if(model)
    assert not result.modified and result.model == model


def test_silero_shape_folds_with_the_sample_rate_bound_and_says_why_not_without():
    model = onnx.parser.parse_model(SILERO_SHAPE)
    kept = fold_static_if(model)
    assert not kept.decisions[0].folded and "sr" in kept.decisions[0].reason
    bound = fold_static_if(model, bound_inputs={"sr": np.array(16000, np.int64)})
    ops = _ops(bound.model)
    assert "If" not in ops and [i.name for i in bound.model.graph.input] == ["x"]
    assert [d.folded for d in bound.decisions] == [True, True]  # outer and nested If
    pad = next(n for n in bound.model.graph.node if n.op_type == "Pad")
    initializers = {t.name for t in bound.model.graph.initializer}
    assert pad.input[1] in initializers  # literal Pad widths, as TVM's importer needs
    onnx.checker.check_model(bound.model, full_check=True)
    x = np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32)
    want = _run(model, {"x": x, "sr": np.array(16000, np.int64)})
    np.testing.assert_allclose(_run(bound.model, {"x": x}), want, atol=1e-6)


def test_binding_checks_names_types_and_shapes():
    model = onnx.parser.parse_model(SILERO_SHAPE)
    with pytest.raises(ConfigError, match=r"rate is not a model input.*sr is int64"):
        fold_static_if(model, bound_inputs={"rate": np.array(1), "sr": np.array(1.0)})


def test_the_frontend_folds_static_ifs_before_simplifying():
    graph = load_onnx(onnx.parser.parse_model(SHAPE_CONDITION))
    assert "If" not in [n.op for n in graph.graph.nodes]
    assert any("If" in note and "inlined" in note for note in graph.notes)


SILERO_NETWORK = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 1, 6] x, int64 sr) => (float[1, 3] y) {
    rate = Constant <value = int64 {16000}> ()
    c = Equal (sr, rate)
    y = If (c) <
        then_branch = fast () => (float[1, 3] out) {
            p = Constant <value = int32[6] {0, 0, 1, 0, 0, 1}> ()
            p64 = Cast <to = 7> (p)
            padded = Pad (x, p64)
            f = Conv <strides = [2]> (padded, cw)
            r = Relu (f)
            seq = Transpose <perm = [2, 0, 1]> (r)
            ys, yh, yc = LSTM <hidden_size = 3> (seq, lw, lr, lb)
            ax = Constant <value = int64[1] {0}> ()
            out = Squeeze (yh, ax)
        },
        else_branch = slow () => (float[1, 3] out2) {
            s = ReduceMean <axes = [2], keepdims = 0> (x)
            out2 = Concat <axis = 1> (s, s, s)
        }
    >
}
"""


def test_silero_shape_with_the_rate_bound_compiles_for_x86(tmp_path):
    """The whole network under an If on the sample rate, a computed Pad and an LSTM (silero_vad
    in small): with sr bound, the If folds, the LSTM unrolls and the program compiles for x86,
    equal to the reference interpreter (TVM refused it: "Dynamic pads", then "LSTM")."""
    from dyadiq.targets import emit_for_target
    from tests.tvm_helpers import integer_program

    rng = np.random.default_rng(5)
    model = onnx.parser.parse_model(SILERO_NETWORK)
    weights = {"cw": (4, 1, 3), "lw": (1, 12, 4), "lr": (1, 12, 3), "lb": (1, 24)}
    branch = model.graph.node[2].attribute[0].g  # then_branch: where the weights are read
    for name, shape in weights.items():
        value = (rng.normal(size=shape) * 0.5).astype(np.float32)
        branch.initializer.append(onnx.numpy_helper.from_array(value, name))
    bound = fold_static_if(model, bound_inputs={"sr": np.array(16000, np.int64)}).model
    assert "If" not in _ops(bound)
    calib = [{"x": rng.normal(size=(1, 1, 6)).astype(np.float32)} for _ in range(6)]
    program = integer_program(bound, calib)
    info = emit_for_target(program, "x86", tmp_path / "x86", calib[:3])
    check = info["bit_exact_vs_reference"]
    assert check["inputs"] == 3 and check["max_code_diff"] <= 2
