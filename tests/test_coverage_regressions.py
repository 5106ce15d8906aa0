"""Failures the support matrix (benchmarks/results/coverage.md) found in real packaged models,
each as a small graph of the same shape:

- ppocrv4_det: a ConvTranspose with stride = kernel (a DB head's upsampling) that ``inspect``
  called quantizable and ``--integer`` refused; now an integer 1x1 Conv plus Reshape /
  Transpose on codes in every consumer, and overlapping ones are float islands, as inspect says;
- oww_melspectrogram: a 1-D Conv declared its codes before falling back to float, so the
  integer model read codes nothing produced (Reshape before its producer);
- oww_hey_jarvis: an If whose branches read outer-scope tensors lost them in the integer model;
- silero_vad: an If output with a dynamic dim refused the integer model;
- magika, oww_embedding, ppocrv4_rec (TVM): an island Mul(x, x), a Pad that TVM's importer
  turns into a helper PrimFunc, and a Squeeze whose axes are a tensor (no static output shape).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from dyadiq import integer_program as ip
from dyadiq.backends.onnx.integer import export_integer_onnx
from dyadiq.consistency import bit_exactness
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.inspection import describe
from dyadiq.quantizers import ActQuant
from dyadiq.reference_interpreter import ReferenceInterpreter
from tests import tvm_helpers
from tests.builders import calibration, with_weights

SHAPE = (1, 3, 6, 6)


def conv_transpose_model(rng: np.random.Generator, *, overlapping: bool = False) -> onnx.ModelProto:
    """Conv -> Relu -> ConvTranspose (2x2 stride 2, or 3x3 stride 2 pad 1: overlapping) -> Conv."""
    attrs = "strides = [2, 2], pads = [1, 1, 1, 1]" if overlapping else "strides = [2, 2]"
    size = 11 if overlapping else 12
    kernel = 3 if overlapping else 2
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, {size}, {size}] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w1)
        r = Relu (c)
        u = ConvTranspose <{attrs}> (r, wt, bt)
        y = Conv (u, w2)
    }}
    """
    return with_weights(
        text,
        w1=rng.normal(size=(4, 3, 3, 3)),
        wt=rng.normal(size=(4, 5, kernel, kernel)),
        bt=rng.normal(size=(5,)),
        w2=rng.normal(size=(4, 5, 1, 1)),
    )


Feeds = list[dict[str, np.ndarray]]


def _program(model: onnx.ModelProto, **kwargs: bool) -> tuple[ip.IntegerProgram, Feeds]:
    rng = np.random.default_rng(5)
    calib = calibration(SHAPE, rng, n=4)
    return tvm_helpers.integer_program(model, calib, **kwargs), calib


def _assert_integer_onnx_exact(program: ip.IntegerProgram, calib: Feeds) -> None:
    model = export_integer_onnx(program)
    onnx.checker.check_model(model, full_check=True)
    report = bit_exactness(program, model, calib)
    assert report["tensors"] > 0
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


@pytest.mark.parametrize("act_signed", [False, True])
def test_conv_transpose_stride_equal_kernel_is_integer_and_bit_exact(act_signed: bool) -> None:
    program, calib = _program(conv_transpose_model(np.random.default_rng(1)), act_signed=act_signed)
    assert program.float_ops == []
    assert sum(isinstance(op, ip.Conv) for op in program.ops) == 3
    _assert_integer_onnx_exact(program, calib)


def test_conv_transpose_codes_are_the_qdq_simulators() -> None:
    """The interleaved 1x1 Conv computes the ConvTranspose the QDQ simulator computes: its
    float output is within one output step of the QDQ model's."""
    from dyadiq.pipeline import quantize_graph
    from dyadiq.plan import PrecisionPlan

    rng = np.random.default_rng(1)
    model = conv_transpose_model(rng)
    calib = calibration(SHAPE, np.random.default_rng(5), n=4)
    graph = load_onnx(model)
    plan = PrecisionPlan.uniform(graph)
    result = quantize_graph(graph, plan, calib)
    from dyadiq.backends.onnx.qdq import export_qdq
    from dyadiq.ort_sessions import open_session
    from dyadiq.passes.integerize import integerize

    program = integerize(result.graph, plan, result.sites, result.qdq.act_params)
    qdq = open_session(export_qdq(result.qdq.graph))
    reference = ReferenceInterpreter(program)
    step = program.quant[program.int_outputs["y"]].scale
    for feeds in calib:
        want = qdq.run(["y"], feeds)[0]
        got = reference.run(feeds)["y"]
        assert np.abs(got - want).max() <= step * 1.01


def test_overlapping_conv_transpose_is_a_float_island_and_inspect_says_so() -> None:
    model = conv_transpose_model(np.random.default_rng(2), overlapping=True)
    program, calib = _program(model)
    assert [op.split()[0] for op in program.float_ops] == ["ConvTranspose"]
    _assert_integer_onnx_exact(program, calib)
    layers = {row["op"]: row for row in describe(load_onnx(model))["layers"]}
    assert "float island" in layers["ConvTranspose"]["reason"]
    strided = {
        row["op"]: row
        for row in describe(load_onnx(conv_transpose_model(np.random.default_rng(2))))["layers"]
    }
    assert "float island" not in strided["ConvTranspose"]["reason"]


def test_tvm_conv_transpose_is_bit_exact() -> None:
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    from dyadiq.backends.tvm import model_runner
    from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
    from dyadiq.backends.tvm.lower import lower_program, main_output_names

    program, calib = _program(conv_transpose_model(np.random.default_rng(1)))
    reference = ReferenceInterpreter(program)
    targets = [None]
    if "avx2" in model_runner.cpu_flags():
        targets.append(target_for("x86-64-v3"))
    host = target_for("x86")
    for target in targets:
        lowered = lower_program(program, target=target)
        vm = relax.VirtualMachine(compile_prepared(prepare(lowered, host), host), tvm.cpu())
        for feeds in calib:
            values = vm["main"](tvm.runtime.tensor(feeds["x"]))
            got = dict(zip(main_output_names(program), (v.numpy() for v in values), strict=True))
            assert np.array_equal(got["y_codes"], reference.outputs(feeds)["y"]), target


def test_cortex_m_conv_transpose_is_bit_exact_under_qemu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dyadiq.backends.mcu.build import ToolchainError, find_toolchain
    from dyadiq.backends.mcu.emit_c import emit_c_project
    from tests.mcu_helpers import assert_bit_exact_on_qemu

    try:
        find_toolchain(need_qemu=True)
    except ToolchainError as exc:
        pytest.skip(str(exc))
    program, calib = _program(conv_transpose_model(np.random.default_rng(1)))
    project = emit_c_project(program, tmp_path, cpu="cortex-m4")
    assert_bit_exact_on_qemu(project, program, calib)


def test_float_conv1d_declares_no_codes_its_consumers_would_miss() -> None:
    """A 1-D Conv (a mel filterbank) runs in float; the Unsqueeze after it must quantize the
    float output rather than read codes the Conv never wrote (oww_melspectrogram)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 2, 16] x) => (float[1, 4, 14, 1] y) {
        axes = Constant <value = int64[1] {2}> ()
        c = Conv (x, w1)
        u = Unsqueeze (c, axes)
        t = Transpose <perm = [0, 1, 3, 2]> (u)
        y = Conv (t, w2)
    }
    """
    rng = np.random.default_rng(3)
    model = with_weights(text, w1=rng.normal(size=(3, 2, 3)), w2=rng.normal(size=(4, 3, 1, 1)))
    calib = calibration((1, 2, 16), rng, n=4)
    program = tvm_helpers.integer_program(model, calib)
    assert [op.split()[0] for op in program.float_ops] == ["Conv"]
    _assert_integer_onnx_exact(program, calib)


def _if_model(rng: np.random.Generator, *, branch_sizes: tuple[int, int]) -> onnx.ModelProto:
    """An If whose branches read the outer-scope tensor ``c`` and an outer initializer ``wb``."""
    then_size, else_size = branch_sizes
    pool = "GlobalAveragePool" if else_size != then_size else "Identity"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y, float[1, N] z) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w1)
        s = ReduceSum <keepdims = 0> (x)
        zero = Constant <value = float {{0.0}}> ()
        cond = Greater (s, zero)
        z = If (cond) <then_branch = then_g () => (float[1, {then_size}] a) {{
            f = Flatten (c)
            a = Mul (f, wb)
        }}, else_branch = else_g () => (float[1, {else_size}] b) {{
            g = {pool} (c)
            b = Flatten (g)
        }}>
        y = Conv (c, w2)
    }}
    """
    return with_weights(
        text,
        w1=rng.normal(size=(4, 3, 3, 3)),
        w2=rng.normal(size=(4, 4, 1, 1)),
        wb=rng.normal(size=(1, 144)),
    )


def test_if_branches_keep_their_outer_scope_tensors() -> None:
    """oww_hey_jarvis: the island holding the If takes ``c`` as an input, so it runs after
    ``c`` exists (dequantized); the outer initializer ``wb`` travels with the branch."""
    program, calib = _program(_if_model(np.random.default_rng(4), branch_sizes=(144, 144)))
    island = next(op for op in program.ops if isinstance(op, ip.FloatIsland) and "z" in op.outputs)
    assert "c" in island.inputs
    position = program.ops.index(island)
    assert any(isinstance(op, ip.Dequantize) and op.output == "c" for op in program.ops[:position])
    _assert_integer_onnx_exact(program, calib)


def test_if_output_with_a_dynamic_dim_is_a_float_output() -> None:
    """silero_vad: branches of different widths leave ``z``'s second dim unknown; it is a
    float output, so the integer model keeps it dynamic instead of refusing the model."""
    program, calib = _program(_if_model(np.random.default_rng(4), branch_sizes=(144, 4)))
    assert program.shapes["z"][1] == -1
    _assert_integer_onnx_exact(program, calib)


def _island(
    node: onnx.NodeProto, inputs: tuple[str, ...], *constants: np.ndarray
) -> ip.FloatIsland:
    names = [n for n in node.input if n not in inputs]
    initializers = tuple(
        numpy_helper.from_array(c, n) for c, n in zip(constants, names, strict=True)
    )
    return ip.FloatIsland((node,), initializers, inputs, tuple(node.output))


def island_chain_program() -> ip.IntegerProgram:
    """Codes -> float -> Squeeze(axes from a Constant island: only axis 0 of the two unit
    axes goes) -> Mul(t, t) -> Pad -> codes."""
    q_in = ActQuant(0.02, 128, 8, False)
    q_out = ActQuant(0.01, 0, 8, False)
    axes = helper.make_node(
        "Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0], np.int64))
    )
    ops: list[ip.IntOp] = [
        ip.QuantizeInput("x_q", "x"),
        ip.Dequantize("xf", "x_q"),
        ip.FloatIsland((axes,), (), (), ("axes",), (), (onnx.TensorProto.INT64,)),
        ip.FloatIsland(
            (helper.make_node("Squeeze", ["xf", "axes"], ["sq"]),),
            (),
            ("xf", "axes"),
            ("sq",),
            (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64),
        ),
        _island(helper.make_node("Mul", ["sq", "sq"], ["m"]), ("sq", "sq")),
        _island(
            helper.make_node("Pad", ["m", "pads"], ["p"]),
            ("m",),
            np.array([0, 1, 0, 0, 1, 0], np.int64),
        ),
        ip.Quantize("p_q", "p"),
        ip.Dequantize("y", "p_q"),
    ]
    return ip.IntegerProgram(
        ops,
        {"x_q": q_in, "p_q": q_out},
        {"x_q": (1, 4, 1, 5), "p_q": (4, 3, 5), "y": (4, 3, 5)},
        {"x": (np.dtype(np.float32), (1, 4, 1, 5))},
        ["y"],
        {"y": "p_q"},
        ["Constant", "Squeeze", "Mul", "Pad"],
        opset=17,
    )


@pytest.mark.parametrize("lowering", ["portable", "x86 kernels"])
def test_tvm_float_islands_of_real_models(lowering: str) -> None:
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
    from dyadiq.backends.tvm.lower import lower_program

    program = island_chain_program()
    host = target_for("x86")
    lowered = lower_program(
        program, target=host if lowering == "x86 kernels" else None, float_islands=True
    )
    vm = relax.VirtualMachine(compile_prepared(prepare(lowered, host), host), tvm.cpu())
    reference = ReferenceInterpreter(program)
    rng = np.random.default_rng(6)
    for _ in range(3):
        x = rng.uniform(-2.5, 2.5, size=(1, 4, 1, 5)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x))[0].numpy()
        want = reference.outputs({"x": x})["y"]
        # float islands: TVM's float kernels against onnxruntime's, within a code (and here exact)
        assert np.abs(got.astype(np.int64) - want).max() <= 1


def test_target_check_inputs_split_only_a_real_batch() -> None:
    """silero_vad: input 1x512, state 2x1x128 and a 0-d sample rate are one sample (their
    leading dims are not a batch); a batch of 3 is split, the 0-d input going whole to each."""
    from dyadiq.targets import single_inputs

    sample = {
        "input": np.zeros((1, 512), np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }
    (row,) = single_inputs([sample], limit=8)
    assert {k: v.shape for k, v in row.items()} == {k: v.shape for k, v in sample.items()}
    batch = {"x": np.zeros((3, 4), np.float32), "sr": np.array(16000, np.int64)}
    rows = single_inputs([batch], limit=8)
    assert len(rows) == 3
    assert all(r["x"].shape == (1, 4) and r["sr"].shape == () for r in rows)
