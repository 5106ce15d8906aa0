"""Float islands in Cortex-M C (backends/mcu/float_c.py, float_ops.py), run on QEMU Cortex-M4.

Integer tensors that no island feeds must equal the reference interpreter's codes bit for bit;
codes computed from an island's floats (onnxruntime in the reference, newlib's libm and the
FPU on the device) may differ by at most ``ISLAND_CODE_TOLERANCE`` codes.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from dyadiq import integer_program as ip
from dyadiq.backends.mcu.build import build, run_qemu
from dyadiq.backends.mcu.emit_c import emit_c_project, unsupported_ops
from dyadiq.backends.mcu.float_c import downstream_of_islands, island_report
from dyadiq.errors import UnsupportedModelError
from dyadiq.quantizers import ActQuant
from dyadiq.reference_interpreter import ReferenceInterpreter
from dyadiq.targets import ISLAND_CODE_TOLERANCE, emit_for_target
from tests.builders import calibration, with_weights
from tests.tvm_helpers import integer_program

needs_toolchain = pytest.mark.skipif(
    not (shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm")),
    reason="needs gcc-arm-none-eabi and qemu-system-arm",
)


def _device_vs_reference(
    program: ip.IntegerProgram,
    calib: list[dict[str, np.ndarray]],
    tmp_path,
    cpu: str = "cortex-m4",
) -> dict[str, int]:
    """Largest |device code - reference code| per output, over ``calib``, on QEMU."""
    project = emit_c_project(program, tmp_path / "m4", cpu=cpu)
    inputs = np.stack([feeds["x"] for feeds in calib])
    run = run_qemu(project, build(project, jobs=2).app_elf, inputs, timeout_s=120)
    device = project.decode_outputs(run.outputs)
    reference = ReferenceInterpreter(program)
    worst = {spec.name: 0 for spec in project.outputs}
    for i, feeds in enumerate(calib):
        env = reference.run(feeds)
        for spec in project.outputs:
            want = env[spec.name].reshape(spec.shape).astype(np.int64)
            diff = int(np.abs(device[spec.name][i].astype(np.int64) - want).max())
            worst[spec.name] = max(worst[spec.name], diff)
    return worst


LAYER_NORM_BETWEEN_CONVS = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y, float[1, 4, 6, 6] z) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w1)
    m = ReduceMean <axes = [1]> (c)
    d = Sub (c, m)
    d2 = Pow (d, two)
    v = ReduceMean <axes = [1]> (d2)
    ve = Add (v, eps)
    sd = Sqrt (ve)
    n = Div (d, sd)
    g = Mul (n, gamma)
    b = Add (g, beta)
    y = Conv (b, w2)
    z = Conv (c, w3)
}
"""


@needs_toolchain
def test_layer_norm_island_between_integer_convs_on_qemu(tmp_path):
    """Conv -> LayerNorm written out as float ops (channel axis) -> Conv, and a second conv
    branch that no island feeds: z exact, y within the island tolerance."""
    rng = np.random.default_rng(0)
    model = with_weights(
        LAYER_NORM_BETWEEN_CONVS,
        w1=rng.normal(size=(4, 3, 3, 3)), w2=rng.normal(size=(4, 4, 1, 1)),
        w3=rng.normal(size=(4, 4, 1, 1)), two=np.array(2.0), eps=np.array(1e-5),
        gamma=rng.normal(size=(1, 4, 1, 1)), beta=rng.normal(size=(1, 4, 1, 1)),
    )  # fmt: skip
    calib = calibration((1, 3, 6, 6), rng, n=4)
    program = integer_program(model, calib)
    assert {"ReduceMean", "Sqrt", "Div"} <= {op.split()[0] for op in program.float_ops}
    assert unsupported_ops(program) == []
    tainted = downstream_of_islands(program)
    assert "y_q" in tainted and "z_q" not in tainted
    report = island_report(program, ["y_q", "z_q"])
    assert report["fully_integer"] is False
    assert report["outputs_compared_exactly"] == ["z_q"]
    assert report["outputs_compared_with_tolerance"] == ["y_q"]
    islands = report["float_c_islands"]
    assert isinstance(islands, list) and any("Sqrt" in op for i in islands for op in i["ops"])
    worst = _device_vs_reference(program, calib, tmp_path)
    assert worst["z_q"] == 0  # integer only: bit-exact
    assert worst["y_q"] <= ISLAND_CODE_TOLERANCE


FLOAT_INPUT = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y) {
    s = Softmax <axis = 1> (x)
    p = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (s)
    t = Transpose <perm = [0, 1, 3, 2]> (p)
    y = Conv (t, w1)
}
"""


@needs_toolchain
def test_model_whose_first_op_is_a_float_island_reads_its_float_input(tmp_path):
    rng = np.random.default_rng(1)
    model = with_weights(FLOAT_INPUT, w1=rng.normal(size=(4, 4, 1, 1)))
    calib = calibration((1, 4, 6, 6), rng, n=4)
    program = integer_program(model, calib)
    assert not any(isinstance(op, ip.QuantizeInput) for op in program.ops)
    assert isinstance(program.ops[0], ip.FloatIsland) and program.ops[0].inputs == ("x",)
    worst = _device_vs_reference(program, calib, tmp_path)
    assert worst["y_q"] <= ISLAND_CODE_TOLERANCE
    header = (tmp_path / "m4" / "model.h").read_text()
    assert "#define DQ_INPUT_BYTES 576" in header  # 144 floats passed through as bytes


def _island_program(
    body: str,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    inits: dict[str, np.ndarray],
    out_scale: float,
) -> ip.IntegerProgram:
    """x -> QuantizeInput -> Dequantize -> island(body: xf -> yf) -> Quantize -> y."""
    graph = onnx.parser.parse_graph(
        f"island (float{list(in_shape)} xf) => (float{list(out_shape)} yf) {{ {body} }}"
    )
    tensors = [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()]
    island = ip.FloatIsland(tuple(graph.node), tuple(tensors), ("xf",), ("yf",))
    quant = {"x_q": ActQuant(1 / 32, 0, 8, True), "y_q": ActQuant(out_scale, 0, 8, True)}
    ops: list[ip.IntOp] = [
        ip.QuantizeInput("x_q", "x"), ip.Dequantize("xf", "x_q"), island,
        ip.Quantize("y_q", "yf"), ip.Dequantize("y", "y_q"),
    ]  # fmt: skip
    return ip.IntegerProgram(
        ops, quant, {"x_q": in_shape, "y_q": out_shape}, {"x": (np.dtype(np.float32), in_shape)},
        ["y"], {"y": "y_q"}, [n.op_type for n in graph.node], opset=17,
    )  # fmt: skip


KERNEL_MIX = """
    p = Pad <mode = "constant"> (xf, pads, pv)
    s = Slice (p, starts, ends, axes, steps)
    g = Gather <axis = 3> (s, idx)
    bn = BatchNormalization (g, bn_s, bn_b, bn_m, bn_v)
    c = Conv <pads = [1, 1, 1, 1], group = 2> (bn, cw, cb)
    ap = AveragePool <kernel_shape = [2, 2], strides = [1, 1]> (c)
    t = Tanh (ap)
    sg = Sigmoid (t)
    e = Erf (sg)
    gt = GreaterOrEqual (t, zero)
    w = Where (gt, e, t)
    r = ReduceMax <axes = [2], keepdims = 1> (w)
    sub = Sub (w, r)
    ex = Exp (sub)
    cc = Concat <axis = 1> (ex, w)
    a1, a2 = Split <axis = 1> (cc, sizes)
    cc2 = Concat <axis = 1> (a2, a1)
    fl = Flatten <axis = 1> (cc2)
    mm = MatMul (fl, mw)
    gm = Gemm <transB = 1, alpha = 0.5> (mm, gw, gb)
    cs = Cast <to = 1> (gm)
    yf = LeakyRelu <alpha = 0.1> (cs)
"""


@needs_toolchain
@pytest.mark.parametrize("cpu", ["cortex-m4", "cortex-m3"])  # FPU (hard-float ABI), soft-float
def test_float_kernels_on_qemu_match_onnxruntime_within_one_code(tmp_path, cpu):
    """A hand-made island through data movement, normalisation, float Conv / pooling, the
    transcendental functions, comparisons, reductions, MatMul and Gemm (one build)."""
    rng = np.random.default_rng(2)
    f32 = np.float32
    inits = {
        "pads": np.array([0, 0, 1, 2, 0, 0, 1, 2], np.int64), "pv": np.array(0.5, f32),
        "starts": np.array([0, 1], np.int64), "ends": np.array([4, 100], np.int64),
        "axes": np.array([1, 3], np.int64), "steps": np.array([1, 2], np.int64),
        "idx": np.array([2, 0, -1, 1], np.int64), "sizes": np.array([3, 5], np.int64),
        "bn_s": rng.normal(size=4).astype(f32), "bn_b": rng.normal(size=4).astype(f32),
        "bn_m": rng.normal(size=4).astype(f32), "bn_v": rng.uniform(0.5, 2, 4).astype(f32),
        "cw": rng.normal(size=(4, 2, 3, 3)).astype(f32), "cb": rng.normal(size=4).astype(f32),
        "zero": np.array(0.0, f32), "mw": rng.normal(size=(8 * 6 * 3, 5)).astype(f32) * 0.1,
        "gw": rng.normal(size=(3, 5)).astype(f32), "gb": rng.normal(size=3).astype(f32),
    }  # fmt: skip
    program = _island_program(KERNEL_MIX, (1, 4, 5, 4), (1, 3), inits, out_scale=1 / 16)
    assert unsupported_ops(program) == []
    calib = [{"x": rng.uniform(-3, 3, (1, 4, 5, 4)).astype(f32)} for _ in range(4)]
    assert _device_vs_reference(program, calib, tmp_path, cpu)["y_q"] <= 1


def test_ops_without_a_c_kernel_are_refused_all_in_one_message(tmp_path):
    body = "a = LRN <size = 3> (xf)\n b = Hardmax (a)\n yf = Relu (b)"
    program = _island_program(body, (1, 4, 3, 3), (1, 4, 3, 3), {}, out_scale=1 / 16)
    problems = unsupported_ops(program)
    assert any("LRN" in p for p in problems) and any("Hardmax" in p for p in problems)
    with pytest.raises(UnsupportedModelError, match=r"Hardmax.*LRN"):
        emit_c_project(program, tmp_path / "p")


def test_constant_only_nodes_need_no_kernel():
    """Shape -> Gather -> Reshape target: computed once on the host, stored in flash."""
    body = (
        "s = Shape (xf)\n k = Gather <axis = 0> (s, i0)\n t = Concat <axis = 0> (k, m1)\n"
        " n = Range (z, k, o)\n yf = Reshape (xf, t)"
    )
    inits = {"i0": np.array([0], np.int64), "m1": np.array([-1], np.int64),
             "z": np.array(0, np.int64), "o": np.array(1, np.int64)}  # fmt: skip
    program = _island_program(body, (1, 4, 3, 3), (1, 36), inits, out_scale=1 / 16)
    assert unsupported_ops(program) == []  # Shape, Range: constant, no kernel needed


@needs_toolchain
def test_integer_input_and_float_output_through_the_target_check(tmp_path):
    """Magika's shape: int32 byte values in, one-hot by Equal + Cast, a float Softmax out
    (no codes): the C build passes them through and the target check compares the floats."""
    graph = onnx.parser.parse_graph(
        "island (int32[1, 6] x) => (float[1, 6, 4] yf) {"
        " u = Unsqueeze (x, ax)\n e = Equal (u, classes)\n f = Cast <to = 1> (e)\n"
        " m = Mul (f, w)\n yf = Softmax <axis = -1> (m) }"
    )
    inits = {"ax": np.array([2], np.int64), "classes": np.arange(4, dtype=np.int32),
             "w": np.linspace(-2, 2, 4).astype(np.float32)}  # fmt: skip
    tensors = [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()]
    island = ip.FloatIsland(
        tuple(graph.node), tuple(tensors), ("x",), ("yf",), (onnx.TensorProto.INT32,)
    )
    program = ip.IntegerProgram(
        [island], {}, {}, {"x": (np.dtype(np.int32), (1, 6))}, ["yf"], {}, ["Softmax"], opset=17
    )
    assert unsupported_ops(program) == []
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.integers(0, 5, (1, 6)).astype(np.int32)} for _ in range(3)]
    info = emit_for_target(program, "cortex-m4", tmp_path / "m4", feeds)
    check = info["bit_exact_vs_reference"]
    assert check["inputs"] == 3 and check["max_float_diff_of_range"] < 1e-5
    assert info["fully_integer"] is False and info["outputs_compared_with_tolerance"] == ["yf"]


IF_ON_DATA = """
    s = ReduceSum <keepdims = 0> (xf)
    c = Greater (s, zero)
    yf = If (c) <
        then_branch = verify () => (float[1, 2, 3] a) { m = Mul (xf, two)
 a = Tanh (m) },
        else_branch = keep () => (float[1, 2, 3] b) { b = Neg (xf) }
    >
"""


@needs_toolchain
def test_if_on_data_runs_as_c_if_else(tmp_path):
    """openWakeWord's verifier head: an If on the detector's score, both branches taken."""
    inits = {"zero": np.array(0.0, np.float32), "two": np.array(2.0, np.float32)}
    program = _island_program(IF_ON_DATA, (1, 2, 3), (1, 2, 3), inits, out_scale=1 / 64)
    assert unsupported_ops(program) == []
    rng = np.random.default_rng(4)
    calib = [{"x": (rng.uniform(-1, 1, (1, 2, 3)) + sign).astype(np.float32)} for sign in (-1, 1)]
    assert _device_vs_reference(program, calib, tmp_path)["y_q"] <= 1
    model_c = (tmp_path / "m4" / "model.c").read_text()
    assert "if (" in model_c and "else" in model_c


def test_a_model_too_large_for_flash_is_refused_with_the_sizes():
    from dyadiq.backends.mcu.build import _does_not_fit, cpu_preset

    linker = "ld: app.elf section `.rodata' will not fit in region `FLASH'\n"
    linker += "ld: region `FLASH' overflowed by 1000 bytes"
    refusal = _does_not_fit(linker, cpu_preset("m4"))
    assert refusal is not None
    assert (
        str(refusal)
        == f"does not fit: {4 * 2**20 + 1000} bytes > {4 * 2**20} bytes of flash on cortex-m4"
    )
    assert _does_not_fit("undefined reference to `foo'", cpu_preset("m4")) is None


def test_infinite_constants_are_written_with_math_h_names():
    """A -inf mask value in an island constant (magika) must compile: C has no ``inff``."""
    from dyadiq.backends.mcu.float_ops import c_constant

    text = c_constant("mask", np.array([-np.inf, np.inf, 1.5], np.float32))
    assert "(-INFINITY), INFINITY, 0x1.8000000000000p+0f" in text


@needs_toolchain
def test_shape_island_feeds_a_later_island_as_a_constant(tmp_path):
    """SqueezeNet's head: Reshape(Softmax(..), Shape(p)) with Shape in its own island: the
    Reshape island reads the shape as a constant (probed with its value, not zeros)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 1, 1] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        p = GlobalAveragePool (c)
        s = Shape (p)
        f = Flatten (p)
        g = Softmax <axis = 1> (f)
        y = Reshape (g, s)
    }
    """
    rng = np.random.default_rng(6)
    model = with_weights(text, w=rng.normal(size=(4, 3, 3, 3)))
    calib = calibration((1, 3, 6, 6), rng, n=4)
    program = integer_program(model, calib, simplify=False)
    islands = [op for op in program.ops if isinstance(op, ip.FloatIsland)]
    shape_island = next(op for op in islands if op.nodes[0].op_type == "Shape")
    assert any(shape_island.outputs[0] in op.inputs for op in islands)
    info = emit_for_target(program, "cortex-m4", tmp_path / "m4", calib[:3])
    check = info["bit_exact_vs_reference"]
    assert check["inputs"] == 3 and check["max_float_diff_of_range"] < 1e-5


@needs_toolchain
def test_gather_with_indices_computed_on_the_device(tmp_path):
    body = (
        "a = Abs (xf)\n m = ReduceMax <axes = [1, 2, 3], keepdims = 0> (a)\n"
        " n = Min (m, three)\n f = Floor (n)\n i = Cast <to = 7> (f)\n"
        " yf = Gather <axis = 1> (xf, i)"
    )
    program = _island_program(
        body, (1, 4, 3, 3), (1, 1, 3, 3), {"three": np.array(3.0, np.float32)}, 1 / 16
    )
    rng = np.random.default_rng(7)
    calib = [{"x": rng.uniform(-s, s, (1, 4, 3, 3)).astype(np.float32)} for s in (0.9, 1.9, 3.5)]
    assert _device_vs_reference(program, calib, tmp_path)["y_q"] == 0  # a copy: exact
