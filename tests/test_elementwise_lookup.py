"""Elementwise float chains between quantized tensors become integer lookup tables (ip.Lookup):
SiLU (nudenet's YOLOv8 has one after every convolution), the erf GELU; checked against the
QDQ simulator's own codes, then bit for bit in integer ONNX, TVM and Cortex-M C."""

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
SILU = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w1)
    s = Sigmoid (c)
    a = Mul (c, s)
    y = Conv (a, w2)
}
"""
GELU = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w1)
    d = Div (c, root2)
    e = Erf (d)
    f = Add (e, one)
    g = Mul (c, f)
    a = Mul (g, half)
    y = Conv (a, w2)
}
"""


def _model(text: str, **extra: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(8)
    return with_weights(
        text, w1=rng.normal(size=(4, 3, 3, 3)), w2=rng.normal(size=(4, 4, 1, 1)), **extra
    )


def _gelu() -> onnx.ModelProto:
    return _model(GELU, root2=np.array(np.sqrt(2.0)), one=np.array(1.0), half=np.array(0.5))


def _quantized(model: onnx.ModelProto, act_signed: bool = False):  # type: ignore[no-untyped-def]
    calib = calibration(SHAPE, np.random.default_rng(9), n=4)
    graph = load_onnx(model)
    plan = PrecisionPlan.uniform(graph, act_signed=act_signed)
    result = quantize_graph(graph, plan, calib)
    return result, integerize(result.graph, plan, result.sites, result.qdq.act_params), calib


@pytest.mark.parametrize("act_signed", [False, True])
@pytest.mark.parametrize("which", ["silu", "gelu"])
def test_chain_is_one_table_equal_to_the_qdq_simulators_codes(which: str, act_signed: bool) -> None:
    model = _model(SILU) if which == "silu" else _gelu()
    result, program, calib = _quantized(model, act_signed)
    assert program.float_ops == []
    lookups = [op for op in program.ops if isinstance(op, ip.Lookup)]
    # SiLU: a quantized Sigmoid (a table) and an integer Mul; GELU: the QDQ model quantizes
    # g = x * (1 + erf), so the table ends there (the integer program handles g * 0.5 itself)
    chains = [("c_q", "s_q")] if which == "silu" else [("c_q", "g_q")]
    if which == "silu":
        assert any(isinstance(op, ip.Mul) and op.output == "a_q" for op in program.ops)
    assert [(op.input, op.output) for op in lookups] == chains
    assert all(len(op.table) == 256 for op in lookups)
    report = bit_exactness(program, export_integer_onnx(program), calib)
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]
    qdq = export_qdq(result.qdq.graph)  # the simulator names its codes as the program does
    dtype = onnx.TensorProto.INT8 if act_signed else onnx.TensorProto.UINT8
    names = [op.output for op in lookups]
    for name in names:
        qdq.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(qdq.SerializeToString(), options, ["CPUExecutionProvider"])
    reference = ReferenceInterpreter(program)
    for feeds in calib:
        env = reference.run(feeds)
        for name, sim in zip(names, sess.run(names, feeds), strict=True):
            assert np.array_equal(env[name], sim), name


def test_a_per_channel_constant_keeps_the_chain_in_float() -> None:
    text = SILU.replace("a = Mul (c, s)", "a = Mul (s, k)")
    model = _model(text, k=np.linspace(0.5, 2.0, 4).reshape(1, 4, 1, 1))
    _, program, calib = _quantized(model)
    # Sigmoid alone may be a table (its output is quantized for the Mul); the Mul by a
    # per-channel constant depends on the channel, so it never joins one
    assert all(op.output != "a_q" for op in program.ops if isinstance(op, ip.Lookup))
    report = bit_exactness(program, export_integer_onnx(program), calib)
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


def test_inspect_says_elementwise_ops_become_tables() -> None:
    layers = {row["op"]: row for row in describe(load_onnx(_gelu()))["layers"]}
    assert "lookup table" in layers["Erf"]["reason"]
    layers = {row["op"]: row for row in describe(load_onnx(_model(SILU)))["layers"]}
    assert layers["Sigmoid"]["quantizable"] and "lookup table" in layers["Sigmoid"]["reason"]


@pytest.mark.parametrize("lowering", ["portable", "x86 kernels"])
def test_tvm_lookup_is_bit_exact(lowering: str) -> None:
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
    from dyadiq.backends.tvm.lower import lower_program, main_output_names

    _, program, calib = _quantized(_model(SILU), act_signed=lowering == "portable")
    host = target_for("x86")
    lowered = lower_program(program, target=host if lowering == "x86 kernels" else None)
    vm = relax.VirtualMachine(compile_prepared(prepare(lowered, host), host), tvm.cpu())
    reference = ReferenceInterpreter(program)
    for feeds in calib:
        values = vm["main"](tvm.runtime.tensor(feeds["x"]))
        got = dict(zip(main_output_names(program), (v.numpy() for v in values), strict=True))
        assert np.array_equal(got["y_codes"], reference.outputs(feeds)["y"])


def test_cortex_m_lookup_is_bit_exact_under_qemu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dyadiq.backends.mcu.build import ToolchainError, find_toolchain
    from dyadiq.backends.mcu.emit_c import emit_c_project
    from tests.mcu_helpers import assert_bit_exact_on_qemu

    try:
        find_toolchain(need_qemu=True)
    except ToolchainError as exc:
        pytest.skip(str(exc))
    _, program, calib = _quantized(_gelu(), act_signed=True)
    project = emit_c_project(program, tmp_path, cpu="cortex-m4")
    assert "dq_lookup(" in (tmp_path / "model.c").read_text()
    assert_bit_exact_on_qemu(project, program, calib)
