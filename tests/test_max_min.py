"""Elementwise Max / Min of two activations, the worked example of adding an integer op.

Both inputs and the output share one scale group, so the integer op compares codes: the QDQ
simulator's own codes satisfy ``Q(max(a, b)) = max(Q(a), Q(b))``, integer ONNX (onnxruntime),
the x86 TVM build and the Cortex-M C (QEMU) reproduce the reference interpreter bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyadiq import integer_program as ip
from dyadiq.backends.onnx.integer import export_integer_onnx
from dyadiq.backends.onnx.qdq import export_qdq
from dyadiq.consistency import bit_exactness
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.inspection import describe
from dyadiq.passes.integerize import integerize
from dyadiq.pipeline import quantize_graph
from dyadiq.plan import PrecisionPlan
from dyadiq.reference_interpreter import ReferenceInterpreter
from tests.builders import calibration, with_weights

SHAPE = (1, 3, 6, 6)


def max_min_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Max of two convs (same shape), then Min against a [1, 4, 1, 1] pool (broadcast)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 5, 6, 6] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, wa)
        b = Conv (x, wb)
        m = Max (a, b)
        g = GlobalAveragePool (b)
        n = Min (m, g)
        y = Conv (n, wy)
    }
    """
    return with_weights(
        text,
        wa=rng.normal(size=(4, 3, 3, 3)) * 0.3,
        wb=rng.normal(size=(4, 3, 1, 1)),
        wy=rng.normal(size=(5, 4, 1, 1)),
    )


def _quantized(act_signed: bool, model: onnx.ModelProto | None = None):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(11)
    model = model or max_min_model(rng)
    calib = calibration(SHAPE, rng, n=6)
    graph = load_onnx(model)
    plan = PrecisionPlan.uniform(graph, act_signed=act_signed)
    result = quantize_graph(graph, plan, calib)
    program = integerize(result.graph, plan, result.sites, result.qdq.act_params)
    return result, program, calib


def _op(program: ip.IntegerProgram, op_type: type) -> ip.IntOp:
    return next(op for op in program.ops if isinstance(op, op_type))


@pytest.mark.parametrize("act_signed", [False, True])
def test_max_and_min_are_integer_ops_on_one_scale_group(act_signed: bool) -> None:
    result, program, calib = _quantized(act_signed)
    assert program.float_ops == []
    max_op, min_op = _op(program, ip.Max), _op(program, ip.Min)
    assert isinstance(max_op, ip.Max) and isinstance(min_op, ip.Min)
    group = {result.sites.group_of[t] for t in ("a", "b", "m", "g", "n")}
    assert len(group) == 1  # Min joins the pool into Max's group
    quantizers = {program.quant[t] for t in (*max_op.inputs, max_op.output, *min_op.inputs)}
    assert len(quantizers) == 1 and quantizers.pop().signed is act_signed
    _assert_integer_onnx_exact(program, calib)


def _assert_integer_onnx_exact(program: ip.IntegerProgram, calib) -> None:  # type: ignore[no-untyped-def]
    report = bit_exactness(program, export_integer_onnx(program), calib)
    assert report["tensors"] > 0
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


def test_max_on_codes_is_what_the_qdq_simulator_computes() -> None:
    """Given the simulator's input codes, the integer Max and Min give its output codes."""
    result, program, calib = _quantized(act_signed=False)
    model = export_qdq(result.qdq.graph)
    names = ["a_q", "b_q", "m_q", "g_q", "n_q"]  # the simulator names its codes as the program
    for name in names:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None)
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    interpreter = ReferenceInterpreter(program)
    compared = 0
    for feeds in calib:
        sim = dict(zip(names, sess.run(names, feeds), strict=True))
        for op_type in (ip.Max, ip.Min):
            op = _op(program, op_type)
            env = {name: sim[name] for name in op.inputs}  # type: ignore[attr-defined]
            interpreter.step(op, env)
            out = op.output  # type: ignore[attr-defined]
            assert np.array_equal(env[out], sim[out]), op_type.__name__
            compared += env[out].size
    assert compared > 0


def test_max_with_a_constant_operand_runs_in_float_and_stays_exact() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, wa)
        floor = Constant <value = float {0.25}> ()
        m = Max (a, floor)
        y = Conv (m, wy)
    }
    """
    rng = np.random.default_rng(3)
    model = with_weights(text, wa=rng.normal(size=(4, 3, 3, 3)), wy=rng.normal(size=(4, 4, 1, 1)))
    _, program, calib = _quantized(act_signed=False, model=model)
    assert [op.split()[0] for op in program.float_ops] == ["Max"]
    assert not any(isinstance(op, ip.Max) for op in program.ops)
    _assert_integer_onnx_exact(program, calib)


def test_inspect_reports_max_and_min_quantizable() -> None:
    layers = {
        layer["op"]: layer
        for layer in describe(load_onnx(max_min_model(np.random.default_rng(0))))["layers"]
    }
    for op in ("Max", "Min"):
        assert layers[op]["quantizable"], layers[op]
        assert "share one scale" in layers[op]["reason"]


def test_every_consumer_has_max_and_min() -> None:
    from dyadiq.backends.mcu.emit_c import _Emitter
    from dyadiq.backends.onnx.integer import _Lowering as OnnxLowering

    for visitor in (ReferenceInterpreter, OnnxLowering, _Emitter):
        assert {ip.Max, ip.Min} <= visitor.supported_ops(), visitor.__name__


def test_x86_tvm_build_is_bit_exact() -> None:
    pytest.importorskip("tvm")

    from dyadiq.backends.tvm import model_runner
    from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
    from dyadiq.backends.tvm.lower import lower_program
    from tests.tvm_helpers import assert_cpu_build_matches_reference

    if "avx2" not in model_runner.cpu_flags():
        pytest.skip("host CPU lacks AVX2")
    target = target_for("x86-64-v3")
    _, program, calib = _quantized(act_signed=False)
    lowered = lower_program(program, target=target)
    main = str(lowered["main"])
    assert "R.maximum" in main and "R.minimum" in main
    executable = compile_prepared(prepare(lowered, target), target)
    assert_cpu_build_matches_reference(executable, program, calib)


@pytest.mark.parametrize("act_signed", [False, True])
def test_cortex_m_is_bit_exact_under_qemu(tmp_path, act_signed: bool) -> None:  # type: ignore[no-untyped-def]
    from dyadiq.backends.mcu.build import ToolchainError, find_toolchain
    from dyadiq.backends.mcu.emit_c import emit_c_project
    from tests.mcu_helpers import assert_bit_exact_on_qemu

    try:
        find_toolchain(need_qemu=True)
    except ToolchainError as exc:
        pytest.skip(str(exc))
    _, program, calib = _quantized(act_signed)
    project = emit_c_project(program, tmp_path, cpu="cortex-m4")
    model_c = (tmp_path / "model.c").read_text()
    assert "dq_max(" in model_c and "dq_min(" in model_c
    assert_bit_exact_on_qemu(project, program, calib)
