"""Integer-only pipeline: integerize -> integer ONNX, bit-exact against the reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyadiq.backends.onnx.integer import export_integer_onnx
from dyadiq.consistency import bit_exactness, simulation_agreement
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.inspection import describe
from dyadiq.integer_program import Conv, IntegerProgram
from dyadiq.passes.integerize import AccumulatorOverflowError, integerize
from dyadiq.pipeline import build_integer, quantize_graph
from dyadiq.plan import LayerFormat, PrecisionPlan
from dyadiq.reference_interpreter import ReferenceInterpreter
from tests.builders import calibration, conv_relu_pool_fc, residual_concat, with_weights


def _integer(model: onnx.ModelProto, calib, plan_fn=None, simplify=True):
    graph = load_onnx(model, simplify=simplify)
    plan = plan_fn(graph) if plan_fn else PrecisionPlan.uniform(graph)
    result = quantize_graph(graph, plan, calib)
    program = integerize(result.graph, plan, result.sites, result.qdq.act_params)
    return result, program, export_integer_onnx(program)


def _assert_bit_exact(program: IntegerProgram, model: onnx.ModelProto, batches) -> None:
    report = bit_exactness(program, model, batches)
    assert report["tensors"] > 0
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


def se_hard_swish(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> HardSwish -> SE (GAP -> Conv -> Relu -> Conv -> HardSigmoid -> Mul) -> Conv."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 8, 8] x) => (float[1, 6, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        h = HardSwish (c)
        p = GlobalAveragePool (h)
        s1 = Conv (p, ws1, bs1)
        r = Relu (s1)
        s2 = Conv (r, ws2, bs2)
        g = HardSigmoid <alpha = 0.2, beta = 0.5> (s2)
        m = Mul (h, g)
        y = Conv (m, w2, b2)
    }
    """
    return with_weights(
        text,
        w1=rng.normal(size=(8, 3, 3, 3)) * 0.5,
        b1=rng.normal(size=8) * 0.1,
        ws1=rng.normal(size=(4, 8, 1, 1)) * 0.5,
        bs1=rng.normal(size=4) * 0.1,
        ws2=rng.normal(size=(8, 4, 1, 1)) * 0.5,
        bs2=rng.normal(size=8) * 0.1,
        w2=rng.normal(size=(6, 8, 1, 1)) * 0.5,
        b2=rng.normal(size=6) * 0.1,
    )


@pytest.mark.parametrize("wbits", [8, 4, 2])
def test_conv_pool_gemm_is_fully_integer_and_bit_exact(wbits):
    rng = np.random.default_rng(0)
    calib = calibration((1, 3, 8, 8), rng, n=16)

    def plan_fn(g):
        return PrecisionPlan.uniform(g, weight_bits=wbits)

    result, program, model = _integer(conv_relu_pool_fc(rng), calib, plan_fn)
    assert program.float_ops == []
    ops = {n.op_type for n in model.graph.node}
    assert {"ConvInteger", "MatMulInteger", "BitShift"} <= ops
    assert not ops & {"Conv", "Gemm", "MatMul", "Relu", "Div"}  # no float compute
    _assert_bit_exact(program, model, calib)
    if wbits == 8:
        agreement = simulation_agreement(program, export_qdq_model(result), model, calib)
        assert agreement["max_output_diff_lsb"] <= 2.0  # requant rounding vs float rounding
        assert agreement["top1_agreement_qdq_vs_integer"] >= 0.9


def export_qdq_model(result):
    from dyadiq.backends.onnx.qdq import export_qdq

    return export_qdq(result.qdq.graph)


def test_mixed_plan_keeps_per_layer_bits():
    rng = np.random.default_rng(1)
    calib = calibration((1, 3, 8, 8), rng, n=8)

    def mixed(graph):
        conv = next(n.name for n in graph.nodes() if n.op == "Conv")
        gemm = next(n.name for n in graph.nodes() if n.op == "Gemm")
        return PrecisionPlan({conv: LayerFormat(4, 8), gemm: LayerFormat(8, 8)})

    _, program, model = _integer(conv_relu_pool_fc(rng), calib, mixed)
    conv = next(op for op in program.ops if isinstance(op, Conv))
    assert conv.weight_bits == 4 and np.abs(conv.weight).max() <= 7
    _assert_bit_exact(program, model, calib)


def test_residual_add_concat_and_relu6_are_integer():
    rng = np.random.default_rng(2)
    calib = calibration((1, 4, 6, 6), rng, n=8)
    _, program, model = _integer(residual_concat(rng), calib)
    assert program.float_ops == []
    _assert_bit_exact(program, model, calib)


def test_hard_swish_and_squeeze_excite_are_integer():
    rng = np.random.default_rng(3)
    calib = calibration((1, 3, 8, 8), rng, n=8)
    _, program, model = _integer(se_hard_swish(rng), calib)
    assert program.float_ops == []
    kinds = {type(op).__name__ for op in program.ops}
    assert {"HardSwish", "HardSigmoid", "Mul", "GlobalAvgPool"} <= kinds
    _assert_bit_exact(program, model, calib)


def test_unsupported_op_becomes_a_listed_float_island_and_stays_exact():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1)
        s = LRN <size = 3> (c)
        y = Conv (s, w2)
    }
    """
    rng = np.random.default_rng(4)
    model = with_weights(text, w1=rng.normal(size=(4, 3, 3, 3)), w2=rng.normal(size=(4, 4, 1, 1)))
    calib = calibration((1, 3, 8, 8), rng, n=6)
    _, program, int_model = _integer(model, calib)
    assert [op.split()[0] for op in program.float_ops] == ["LRN"]
    _assert_bit_exact(program, int_model, calib)


def test_extreme_inputs_saturate_identically():
    rng = np.random.default_rng(5)
    calib = calibration((1, 3, 8, 8), rng, n=8)
    _, program, model = _integer(conv_relu_pool_fc(rng), calib)
    extremes = [
        {"x": np.full((1, 3, 8, 8), 1e6, np.float32)},
        {"x": np.full((1, 3, 8, 8), -1e6, np.float32)},
        {"x": np.where(rng.random((1, 3, 8, 8)) < 0.5, 1e6, -1e6).astype(np.float32)},
    ]
    _assert_bit_exact(program, model, extremes)


def test_possible_int32_overflow_is_an_error_not_silent():
    k = 70_000  # 70000 * 127 * 255 > 2^31: an 8-bit layer this wide could overflow
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, {k}] x) => (float[1, 2] y) {{
        y = Gemm <transB = 1> (x, w)
    }}
    """
    model = with_weights(text, w=np.ones((2, k)))
    rng = np.random.default_rng(6)
    calib = [{"x": rng.random((1, k)).astype(np.float32)} for _ in range(2)]
    with pytest.raises(AccumulatorOverflowError, match="could overflow"):
        _integer(model, calib)
    # 4-bit weights bound the sum below 2^31: the same layer is accepted and exact.
    _, program, int_model = _integer(
        model, calib, lambda g: PrecisionPlan.uniform(g, weight_bits=4)
    )
    _assert_bit_exact(program, int_model, calib)


def test_dynamic_batch_reshape_is_exact():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 1, 6, 6] x) => (float[N, 3] y) {
        c = Conv (x, w1)
        r = Relu (c)
        f = Flatten (r)
        y = Gemm <transB = 1> (f, w2)
    }
    """
    rng = np.random.default_rng(7)
    model = with_weights(text, w1=rng.normal(size=(2, 1, 3, 3)), w2=rng.normal(size=(3, 32)))
    calib = [{"x": rng.normal(size=(4, 1, 6, 6)).astype(np.float32)} for _ in range(4)]
    _, program, int_model = _integer(model, calib)
    _assert_bit_exact(program, int_model, [{"x": rng.normal(size=(3, 1, 6, 6)).astype(np.float32)}])


def test_reference_interpreter_is_exact_on_a_hand_computed_conv():
    rng = np.random.default_rng(8)
    calib = calibration((1, 3, 8, 8), rng, n=4)
    _, program, _ = _integer(conv_relu_pool_fc(rng), calib)
    conv = next(op for op in program.ops if isinstance(op, Conv))
    env = ReferenceInterpreter(program).run(calib[0])
    q_in = program.quant[conv.input]
    v = env[conv.input].astype(np.int64) - q_in.zero_point
    padded = np.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1)))
    acc = np.zeros((4, 8, 8), np.int64)
    for o in range(4):
        for i in range(8):
            for j in range(8):
                window = padded[0, :, i : i + 3, j : j + 3]
                acc[o, i, j] = int((window * conv.weight[o].astype(np.int64)).sum()) + int(
                    conv.bias[o]
                )
    m, k = conv.requant.mult.reshape(-1, 1, 1), conv.requant.shift.reshape(-1, 1, 1)
    want = ((acc * m + (1 << (k - 1))) >> k) + conv.requant.zero_point
    want = np.clip(want, conv.requant.lo, conv.requant.hi)
    np.testing.assert_array_equal(env[conv.output][0], want)


def test_build_integer_reports_exactness_and_agreement():
    rng = np.random.default_rng(9)
    calib = calibration((1, 3, 8, 8), rng, n=4)
    graph = load_onnx(conv_relu_pool_fc(rng))
    result = quantize_graph(graph, PrecisionPlan.uniform(graph), calib)
    _, model, report = build_integer(result, calib)
    onnx.checker.check_model(model, full_check=True)
    assert report["fully_integer"] and report["bit_exact_vs_reference"]["exact_tensors"] > 8
    assert report["qdq_vs_integer"]["compared_rows"] == 4
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert {o.name for o in sess.get_outputs()} == {"y", "y_codes"}


def test_integer_softmax_is_exact_and_close_to_float():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[4, 16] x) => (float[4, 10] y) {
        l = Gemm <transB = 1> (x, w)
        y = Softmax <axis = -1> (l)
    }
    """
    rng = np.random.default_rng(10)
    model = with_weights(text, w=rng.normal(size=(10, 16)))
    calib = [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(8)]
    _, program, int_model = _integer(model, calib)
    assert program.float_ops == []
    assert any(type(op).__name__ == "Softmax" for op in program.ops)
    _assert_bit_exact(program, int_model, calib)
    sess = ort.InferenceSession(int_model.SerializeToString(), providers=["CPUExecutionProvider"])
    softmax = next(op for op in program.ops if type(op).__name__ == "Softmax")
    q_in, q_out = program.quant[softmax.input], program.quant[softmax.output]
    reference = ReferenceInterpreter(program)
    worst = 0.0
    for feeds in calib:
        env = reference.run(feeds)
        logits = (env[softmax.input].astype(np.float64) - q_in.zero_point) * q_in.scale
        exact = np.exp(logits - logits.max(-1, keepdims=True))
        exact /= exact.sum(-1, keepdims=True)
        got = (env[softmax.output].astype(np.float64) - q_out.zero_point) * q_out.scale
        worst = max(worst, float(np.abs(got - exact).max()))
        np.testing.assert_array_equal(sess.run(["y"], feeds)[0], got.astype(np.float32))
        np.testing.assert_allclose(got.sum(axis=-1), 1.0, atol=0.03)
    # on the same integer logits: I-BERT's exp fit plus output rounding (LSB ~ 0.004)
    assert worst < 0.02, worst


def test_matmul_bias_add_fuses_into_the_int32_accumulator():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 5, 16] x) => (float[1, 5, 8] y) {
        m = MatMul (x, w)
        a = Add (m, b)
        y = Relu (a)
    }
    """
    rng = np.random.default_rng(11)
    model = with_weights(text, w=rng.normal(size=(16, 8)), b=rng.normal(size=8))
    calib = [{"x": rng.normal(size=(1, 5, 16)).astype(np.float32)} for _ in range(6)]
    # onnxsim would rewrite MatMul + Add into Gemm: keep the exporter's form here
    result, program, int_model = _integer(model, calib, simplify=False)
    assert len(result.sites.fused_biases) == 1
    assert "m" not in result.sites.tensors  # the pre-bias product is never quantized
    assert program.float_ops == []
    matmul = next(op for op in program.ops if type(op).__name__ == "MatMul")
    assert matmul.bias is not None and matmul.requant.lo == program.quant[matmul.output].zero_point
    _assert_bit_exact(program, int_model, calib)


@pytest.mark.parametrize("activation", ["LeakyRelu <alpha = 0.1>", "PRelu"])
def test_leaky_relu_and_prelu_have_dyadic_slopes(activation):
    slope_input = ", slope" if activation == "PRelu" else ""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w1)
        a = {activation} (c{slope_input})
        y = Conv (a, w2)
    }}
    """
    rng = np.random.default_rng(12)
    weights = {"w1": rng.normal(size=(4, 3, 3, 3)), "w2": rng.normal(size=(4, 4, 1, 1))}
    if activation == "PRelu":
        weights["slope"] = np.array([0.05, 0.1, 0.2, 0.3]).reshape(4, 1, 1)
    model = with_weights(text, **weights)
    calib = calibration((1, 3, 6, 6), rng, n=6)
    result, program, int_model = _integer(model, calib)
    assert program.float_ops == []
    assert any(type(op).__name__ == "LeakyRelu" for op in program.ops)
    _assert_bit_exact(program, int_model, calib)
    agreement = simulation_agreement(program, export_qdq_model(result), int_model, calib)
    assert agreement["max_output_diff_lsb"] <= 3.0


@pytest.mark.parametrize("act_signed", [False, True])
def test_attention_style_matmuls_bit_exact_with_either_activation_sign(act_signed):
    """Weight and activation x activation MatMuls (q @ k^T) and convs with u8 or s8
    activations: each integer product is u8 x u8 or s8 x s8, the forms onnxruntime computes
    exactly on every CPU (tests/test_cpu_exactness.py runs this on an emulated AVX2 CPU)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 6, 16] x) => (float[1, 6, 6] y) {
        q = MatMul (x, wq)
        k = MatMul (x, wk)
        kt = Transpose <perm = [0, 2, 1]> (k)
        y = MatMul (q, kt)
    }
    """
    rng = np.random.default_rng(13)
    model = with_weights(text, wq=rng.normal(size=(16, 8)), wk=rng.normal(size=(16, 8)))
    calib = [{"x": rng.normal(size=(1, 6, 16)).astype(np.float32)} for _ in range(6)]

    def plan_fn(g):
        return PrecisionPlan.uniform(g, act_signed=act_signed)

    _, program, int_model = _integer(model, calib, plan_fn, simplify=False)
    assert any(type(op).__name__ == "MatMul" and op.weight_input is not None for op in program.ops)
    products = [n for n in int_model.graph.node if n.op_type.endswith("Integer")]
    assert products
    _assert_bit_exact(program, int_model, calib)

    conv_calib = calibration((1, 3, 8, 8), rng, n=8)
    _, program, int_model = _integer(conv_relu_pool_fc(rng), conv_calib, plan_fn)
    _assert_bit_exact(program, int_model, conv_calib)


def test_float_island_reading_one_constant_several_times_exports():
    """A BatchNormalization left in float (after a Concat, nothing to fold into) whose scale,
    bias, mean and variance are one tensor, as in the onnx wheel's DenseNet121: the integer
    model lists that constant once (it failed onnx.checker as a duplicate initializer)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1)
        b = Conv <pads = [1, 1, 1, 1]> (x, w2)
        c = Concat <axis = 1> (a, b)
        n = BatchNormalization (c, p, p, p, p)
        r = Relu (n)
        y = Conv (r, w3)
    }
    """
    rng = np.random.default_rng(14)
    model = with_weights(
        text,
        w1=rng.normal(size=(2, 3, 3, 3)),
        w2=rng.normal(size=(2, 3, 3, 3)),
        p=np.full(4, 0.5),
        w3=rng.normal(size=(4, 4, 1, 1)),
    )
    calib = calibration((1, 3, 6, 6), rng, n=6)
    _, program, int_model = _integer(model, calib, simplify=False)
    names = [t.name for t in int_model.graph.initializer]
    assert len(names) == len(set(names))
    if program.float_ops:  # the BatchNormalization ran as a float island
        assert any("BatchNormalization" in op for op in program.float_ops)
    _assert_bit_exact(program, int_model, calib)


def test_standard_op_without_a_rule_runs_as_a_float_island():
    """LRN (AlexNet, Inception v1) has no quantization rule: it runs in float instead of
    refusing the whole model, and so does the Add (the frontend's spelling of Sum) reading it."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1)
        n = LRN <size = 3> (a)
        s = Sum (n, a)
        y = Conv (s, w2)
    }
    """
    rng = np.random.default_rng(15)
    model = with_weights(text, w1=rng.normal(size=(4, 3, 3, 3)), w2=rng.normal(size=(4, 4, 1, 1)))
    calib = calibration((1, 3, 6, 6), rng, n=6)
    _, program, int_model = _integer(model, calib, simplify=False)
    assert any(op.startswith("LRN") for op in program.float_ops)
    assert any(op.startswith("Add") for op in program.float_ops)
    _assert_bit_exact(program, int_model, calib)


def test_near_zero_channel_with_a_bias_gets_a_scale_its_bias_fits():
    """After BatchNorm folding, EfficientNet-class models have channels with max|w| ~ 1e-9 and
    a bias near 1: max-abs made s_w so small that the bias code left int32 and the model was
    refused for accumulator overflow. Such a channel's scale is raised until its bias fits."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        y = Conv (r, w2, b2)
    }
    """
    rng = np.random.default_rng(16)
    w1 = rng.normal(size=(4, 3, 3, 3))
    w1[1] = 1e-9  # a dead channel whose output is its bias
    b1 = np.array([0.1, 1.0, -0.2, 0.3])
    model = with_weights(
        text, w1=w1, b1=b1, w2=rng.normal(size=(4, 4, 1, 1)), b2=rng.normal(size=4) * 0.1
    )
    calib = calibration((1, 3, 6, 6), rng, n=6)
    result, program, int_model = _integer(model, calib, simplify=False)
    first = next(op for op in program.ops if isinstance(op, Conv))
    assert first.bias is not None and np.abs(first.bias).max() <= 2**30
    _assert_bit_exact(program, int_model, calib)
    agreement = simulation_agreement(program, export_qdq_model(result), int_model, calib)
    assert agreement["max_output_diff_lsb"] <= 2.0


@pytest.mark.parametrize(("kernel", "integer"), [(6, True), (3, False)])
def test_average_pool_over_its_whole_input_is_an_integer_global_pool(kernel, integer):
    """ResNet-50's older exports end in AveragePool 7x7 on a 7x7 map: the same numbers as
    GlobalAveragePool, so the same integer kernel. A smaller window stays a float island, and
    inspect says which."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 5] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c)
        p = AveragePool <kernel_shape = [{kernel}, {kernel}], strides = [{kernel}, {kernel}]> (r)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, w2, b2)
    }}
    """
    rng = np.random.default_rng(21)
    features = 4 * (6 // kernel) ** 2
    model = with_weights(
        text,
        w1=rng.normal(size=(4, 3, 3, 3)) / 3,
        b1=rng.normal(size=4) * 0.1,
        w2=rng.normal(size=(5, features)) / 2,
        b2=rng.normal(size=5) * 0.1,
    )
    calib = calibration((1, 3, 6, 6), rng, n=6)
    _, program, int_model = _integer(model, calib)
    pools = [op for op in program.float_ops if op.startswith("AveragePool")]
    assert (pools == []) is integer, program.float_ops
    _assert_bit_exact(program, int_model, calib)
    label = next(
        layer["reason"]
        for layer in describe(load_onnx(model))["layers"]
        if layer["op"] == "AveragePool"
    )
    assert ("float island in --integer" in label) is not integer, label


@pytest.mark.parametrize("activation", ["Relu (cat)", "Clip (cat, lo, hi)"])
def test_activation_after_a_concat_is_a_requantizing_integer_op(activation):
    """ShuffleNet's Concat -> Relu: the Relu cannot be a clip of the Concat's scale group (it
    would clip the Concat's inputs too), so it gets its own output range and integerize
    requantizes and clips (a Clip with a negative lower bound keeps part of the negative side);
    the Add that reads it is then integer as well, and inspect labels both as integer ops."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {{
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        c2 = Conv <pads = [1, 1, 1, 1]> (x, w2, b2)
        cat = Concat <axis = 1> (c1, c2)
        r = {activation}
        c3 = Conv (r, w3, b3)
        s = Add (c3, r)
        y = Conv (s, w4, b4)
    }}
    """
    rng = np.random.default_rng(23)
    model = with_weights(
        text,
        w1=rng.normal(size=(2, 3, 3, 3)) / 3,
        b1=rng.normal(size=2) * 0.1,
        w2=rng.normal(size=(2, 3, 3, 3)) / 3,
        b2=rng.normal(size=2) * 0.1,
        w3=rng.normal(size=(4, 4, 1, 1)) / 2,
        b3=rng.normal(size=4) * 0.1,
        w4=rng.normal(size=(4, 4, 1, 1)) / 2,
        b4=rng.normal(size=4) * 0.1,
        lo=np.array(-0.5),
        hi=np.array(2.0),
    )
    calib = calibration((1, 3, 6, 6), rng, n=6)
    _, program, int_model = _integer(model, calib)
    assert program.float_ops == []
    assert any(op.__class__.__name__ == "LeakyRelu" for op in program.ops)
    _assert_bit_exact(program, int_model, calib)
    labels = {layer["op"]: layer for layer in describe(load_onnx(model))["layers"]}
    for op in ("Add", activation.split()[0]):
        assert labels[op]["quantizable"], labels[op]
