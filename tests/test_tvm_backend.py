"""TVM backend: integer programs lowered to Relax, compiled, and run bit-exactly against the
reference interpreter (x86); cross-compiled for aarch64 and CUDA (built, not run here)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst

from dyadiq import integer_program as ip
from dyadiq import zoo
from dyadiq.backends.tvm.build import (
    RUNNER_NAME,
    build,
    compile_prepared,
    prepare,
    run_library,
    target_for,
)
from dyadiq.backends.tvm.lower import lower_program, main_output_names
from dyadiq.backends.tvm.lower_x86 import has_vnni
from dyadiq.errors import ConfigError, DyadiqError, UnsupportedModelError
from dyadiq.quantizers import ActQuant
from dyadiq.reference_interpreter import ReferenceInterpreter
from tests import tvm_helpers
from tests.builders import calibration, conv_relu_pool_fc, residual_concat, with_weights

X86 = target_for("x86")
HOST_HAS_VNNI = has_vnni(X86)
# "vnni": the channels-last lowering with hand-written VNNI kernels, which `dyadiq quantize
# --target x86` uses on such CPUs; "portable": the NCHW Relax lowering every other target gets
LOWERINGS = [
    "portable",
    pytest.param(
        "vnni", marks=pytest.mark.skipif(not HOST_HAS_VNNI, reason="host CPU lacks AVX-512 VNNI")
    ),
]


class CompiledProgram:
    """A program compiled for the host, callable like the reference's ``outputs``."""

    def __init__(
        self, program: ip.IntegerProgram, *, batch: int = 1, lowering: str = "portable"
    ) -> None:
        self.program = program
        start = time.perf_counter()
        lowered = lower_program(program, batch=batch, target=X86 if lowering == "vnni" else None)
        executable = compile_prepared(prepare(lowered, X86), X86)
        self.compile_s = time.perf_counter() - start
        self.vm = relax.VirtualMachine(executable, tvm.cpu())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in self.program.inputs]
        values = [field.numpy() for field in self.vm["main"](*args)]
        return dict(zip(main_output_names(self.program), values, strict=True))


def assert_bit_exact(
    compiled: CompiledProgram, feeds_list: list[dict[str, np.ndarray]], *, minimum: int
) -> None:
    """Codes and dequantized outputs equal the reference's, on at least ``minimum`` feeds."""
    program = compiled.program
    reference = ReferenceInterpreter(program)
    assert len(feeds_list) >= minimum
    for feeds in feeds_list:
        env = reference.run(feeds)
        got = compiled.run(feeds)
        for name in program.outputs:
            want_codes = env[program.int_outputs[name]]
            assert got[f"{name}_codes"].dtype == want_codes.dtype
            assert np.array_equal(got[f"{name}_codes"], want_codes), name
            assert np.array_equal(got[name], env[name]), name


def _kinds(program: ip.IntegerProgram) -> set[str]:
    return {type(op).__name__ for op in program.ops}


# --- (a) every op kind, on small synthetic programs -----------------------------------------
SYNTHETIC: dict[str, tuple[Callable[[np.random.Generator], onnx.ModelProto], tuple[int, ...]]] = {
    "conv_pool_fc": (conv_relu_pool_fc, (1, 3, 8, 8)),
    "residual_concat": (residual_concat, (1, 4, 6, 6)),
    "depthwise_se_hard_swish": (tvm_helpers.depthwise_se_hard_swish, (1, 3, 9, 9)),
    "dilated_grouped_leaky": (tvm_helpers.dilated_grouped_leaky, (1, 3, 8, 8)),
    "attention": (tvm_helpers.attention, (1, 6, 16)),
}
EXPECTED_KINDS = {
    "conv_pool_fc": {"QuantizeInput", "Conv", "MaxPool", "Reshape", "MatMul", "Dequantize"},
    "residual_concat": {"Conv", "Add", "Concat"},
    "depthwise_se_hard_swish": {"HardSwish", "GlobalAvgPool", "HardSigmoid", "Mul"},
    "dilated_grouped_leaky": {"LeakyRelu"},
    "attention": {"MatMul", "Transpose", "Softmax"},
}


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("act_signed", [False, True])
@pytest.mark.parametrize("case", sorted(SYNTHETIC))
def test_synthetic_program_is_bit_exact_on_x86(case, act_signed, lowering):
    build_model, shape = SYNTHETIC[case]
    rng = np.random.default_rng(20)
    program = tvm_helpers.integer_program(
        build_model(rng), calibration(shape, rng, n=8), act_signed=act_signed
    )
    assert program.float_ops == []
    assert EXPECTED_KINDS[case] <= _kinds(program)
    # unseen inputs, plus saturating extremes (the quantizer clips before its float->int cast)
    feeds = calibration(shape, rng, n=6)
    feeds += [{"x": np.full(shape, 1e6, np.float32)}, {"x": np.full(shape, -1e6, np.float32)}]
    assert_bit_exact(CompiledProgram(program, lowering=lowering), feeds, minimum=8)


def test_zero_points_are_exercised_by_the_synthetic_convolutions():
    """The padded convolutions run with non-zero input zero points (explicit padding path)."""
    rng = np.random.default_rng(20)
    model = tvm_helpers.dilated_grouped_leaky(rng)
    program = tvm_helpers.integer_program(model, calibration((1, 3, 8, 8), rng, n=8))
    padded = [op for op in program.ops if isinstance(op, ip.Conv) and any(op.pads)]
    assert padded and all(op.input_zero_point != 0 for op in padded)


def test_four_bit_weights_in_int8_containers_are_bit_exact():
    rng = np.random.default_rng(21)
    calib = calibration((1, 3, 8, 8), rng, n=8)
    program = tvm_helpers.integer_program(conv_relu_pool_fc(rng), calib, weight_bits=4)
    convs = [op for op in program.ops if isinstance(op, ip.Conv)]
    assert convs and all(op.weight_bits == 4 and np.abs(op.weight).max() <= 7 for op in convs)
    mod = lower_program(program)
    weights = [c for c in _constants(mod) if c.dtype == np.int8 and c.ndim == 4]
    assert weights and all(np.abs(w).max() <= 7 for w in weights)  # int4 values, int8 storage
    assert_bit_exact(CompiledProgram(program), calibration((1, 3, 8, 8), rng, n=6), minimum=6)


def _constants(mod: tvm.IRModule) -> list[np.ndarray]:
    """The tensor constants of ``main`` (weights, multipliers, shifts), as numpy arrays."""
    found: list[np.ndarray] = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: found.append(e.value.numpy()) if isinstance(e, GenericConst) else None,
    )
    return found


def test_multipliers_are_int64_constants():
    rng = np.random.default_rng(22)
    program = tvm_helpers.integer_program(
        conv_relu_pool_fc(rng), calibration((1, 3, 8, 8), rng, n=4)
    )
    conv = next(op for op in program.ops if isinstance(op, ip.Conv))
    per_channel = [c for c in _constants(lower_program(program)) if c.size == conv.weight.shape[0]]
    multipliers = [c for c in per_channel if np.array_equal(c.ravel(), conv.requant.mult)]
    assert multipliers and all(c.dtype == np.int64 for c in multipliers)
    # int32 would wrap: the products acc * m need 62 bits
    assert conv.requant.mult.max() > 2**16


@pytest.mark.parametrize("signed", [False, True])
def test_input_quantization_rounds_half_to_even_like_the_reference(signed):
    """A hand-built QuantizeInput -> Clip -> Dequantize program fed exact ties x / s = k + 1/2."""
    scale = np.float32(0.1)
    candidates = ((np.arange(-300, 300) + 0.5) * scale).astype(np.float32)
    ties = candidates[candidates / scale == np.trunc(candidates / scale) + np.sign(candidates) / 2]
    quotients = ties / scale
    half_away = np.trunc(quotients + np.sign(quotients) / 2)
    assert len(ties) >= 50 and (np.round(quotients) != half_away).sum() >= 20
    x = np.concatenate([ties, [1e6, -1e6, 0.04, -0.06]]).astype(np.float32).reshape(1, -1)
    quant = ActQuant(float(scale), -3 if signed else 120, 8, signed)
    program = ip.IntegerProgram(
        ops=[
            ip.QuantizeInput("x_q", "x"),
            ip.Clip("c_q", "x_q", quant.qmin + 5, quant.qmax - 7),
            ip.Dequantize("y", "c_q"),
        ],
        quant={"x_q": quant, "c_q": quant},
        shapes={"x_q": x.shape, "c_q": x.shape, "y": x.shape},
        inputs={"x": (np.dtype(np.float32), x.shape)},
        outputs=["y"],
        int_outputs={"y": "c_q"},
    )
    compiled = CompiledProgram(program)
    got = compiled.run({"x": x})["y_codes"]
    assert got.dtype == np.dtype(np.int8 if signed else np.uint8)
    assert got.min() == quant.qmin + 5 and got.max() == quant.qmax - 7  # the clip bites
    assert_bit_exact(compiled, [{"x": x}], minimum=1)


def test_wide_layer_accumulates_in_int64_when_raw_codes_could_overflow_int32():
    """The lowering multiplies raw codes (zero point folded into the bias): 255 * 127 * K
    passes 2^31 here although the centered sum, which the reference bounds, does not."""
    k = 70_000
    weight = np.full((k, 2), 127, np.int8)
    weight[::2, 1] = -127
    quant_x = ActQuant(1 / 255, 128, 8, False)
    quant_y = ActQuant(1.0, 128, 8, False)
    rq = ip.Requant(np.array([107]), np.array([30]), 128, 0, 255, axis=-1)  # ~1e-7
    program = ip.IntegerProgram(
        ops=[
            ip.QuantizeInput("x_q", "x"),
            ip.MatMul("y_q", "x_q", 128, rq, weight=weight),
            ip.Dequantize("y", "y_q"),
        ],
        quant={"x_q": quant_x, "y_q": quant_y},
        shapes={"x_q": (1, k), "y_q": (1, 2), "y": (1, 2)},
        inputs={"x": (np.dtype(np.float32), (1, k))},
        outputs=["y"],
        int_outputs={"y": "y_q"},
    )
    rng = np.random.default_rng(27)
    feeds = [
        {"x": np.full((1, k), 1e3, np.float32)},  # every code 255: raw sum 2.27e9 > 2^31
        {"x": rng.uniform(-0.5, 0.5, (1, k)).astype(np.float32)},
    ]
    assert 255 * 127 * k > 2**31 > 127 * 127 * k
    assert_bit_exact(CompiledProgram(program), feeds, minimum=2)
    assert ReferenceInterpreter(program).outputs(feeds[0])["y"][0, 0] > 128  # not wrapped


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_dynamic_batch_is_fixed_at_lowering(lowering):
    rng = np.random.default_rng(23)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 1, 6, 6] x) => (float[N, 3] y) {
        c = Conv (x, w1)
        r = Relu (c)
        f = Flatten (r)
        y = Gemm <transB = 1> (f, w2)
    }
    """
    model = with_weights(text, w1=rng.normal(size=(2, 1, 3, 3)), w2=rng.normal(size=(3, 32)))
    calib = [{"x": rng.normal(size=(4, 1, 6, 6)).astype(np.float32)} for _ in range(4)]
    program = tvm_helpers.integer_program(model, calib)
    assert program.inputs["x"][1][0] == 0  # dynamic
    compiled = CompiledProgram(program, batch=3, lowering=lowering)
    feeds = [{"x": rng.normal(size=(3, 1, 6, 6)).astype(np.float32)} for _ in range(3)]
    assert_bit_exact(compiled, feeds, minimum=3)


# --- (e) what has no lowering is refused, all at once ----------------------------------------
def test_float_islands_are_refused_with_every_op_listed():
    rng = np.random.default_rng(24)
    program = tvm_helpers.integer_program(
        tvm_helpers.float_islands(rng), calibration((1, 3, 6, 6), rng, n=4)
    )
    assert len([op for op in program.ops if isinstance(op, ip.FloatIsland)]) == 2
    with pytest.raises(UnsupportedModelError) as info:
        lower_program(program)
    message = str(info.value)
    assert "2 op(s)" in message and "Softmax" in message and "LRN" in message


@pytest.mark.parametrize("lowering", ["portable", "x86 kernels"])
def test_float_islands_run_through_tvms_onnx_importer(lowering):
    """With ``float_islands=True`` (what --target builds use) Softmax and LRN run as Relax
    functions imported from the island's ONNX nodes; the codes after them match the reference
    interpreter, which runs the islands in onnxruntime (float rounding may differ: at most
    dyadiq.targets.ISLAND_CODE_TOLERANCE codes, and on these inputs none)."""
    rng = np.random.default_rng(24)
    calib = calibration((1, 3, 6, 6), rng, n=6)
    program = tvm_helpers.integer_program(tvm_helpers.float_islands(rng), calib)
    target = X86 if lowering == "x86 kernels" else None
    lowered = lower_program(program, target=target, float_islands=True)
    assert sum(1 for gv in lowered.functions if "float_island" in gv.name_hint) == 2
    vm = relax.VirtualMachine(compile_prepared(prepare(lowered, X86), X86), tvm.cpu())
    reference = ReferenceInterpreter(program)
    for feeds in tvm_helpers.samples(calib, 6):
        got = vm["main"](tvm.runtime.tensor(feeds["x"]))
        assert np.array_equal(got[0].numpy(), reference.outputs(feeds)["y"])


def test_float_island_shapes_known_at_compile_time_become_constants():
    """Reshape(Sigmoid(p), Shape(p)) as in SqueezeNet's head: the Shape island's value is
    static, so the Reshape island is imported with it as a constant (TVM's importer needs
    one) and the float output matches the reference interpreter's."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 1, 1] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        p = GlobalAveragePool (c)
        s = Shape (p)
        g = Sigmoid (p)
        y = Reshape (g, s)
    }
    """
    rng = np.random.default_rng(25)
    calib = calibration((1, 3, 6, 6), rng, n=4)
    model = with_weights(text, w=rng.normal(size=(4, 3, 3, 3)))
    program = tvm_helpers.integer_program(model, calib, simplify=False)
    assert any("Shape" in op for op in program.float_ops)
    lowered = lower_program(program, float_islands=True)
    vm = relax.VirtualMachine(compile_prepared(prepare(lowered, X86), X86), tvm.cpu())
    reference = ReferenceInterpreter(program)
    for feeds in tvm_helpers.samples(calib, 4):
        got = vm["main"](tvm.runtime.tensor(feeds["x"]))
        np.testing.assert_allclose(got[-1].numpy(), reference.outputs(feeds)["y"], atol=1e-6)


def test_unknown_target_is_a_config_error():
    with pytest.raises(ConfigError, match="x86"):
        target_for("riscv")


# --- the fused module the tuning step schedules ----------------------------------------------
def test_each_weighted_layer_is_one_fused_primfunc():
    rng = np.random.default_rng(25)
    program = tvm_helpers.integer_program(
        tvm_helpers.depthwise_se_hard_swish(rng), calibration((1, 3, 9, 9), rng, n=4)
    )
    prepared = prepare(lower_program(program), X86)
    kernels = {
        gv.name_hint: f for gv, f in prepared.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
    }
    layers = {name: f for name, f in kernels.items() if "conv2d" in name}
    assert len(layers) == sum(isinstance(op, ip.Conv) for op in program.ops)
    # accumulator, bias, requantization, clip and the cast to codes in the same kernel
    for name, func in layers.items():
        for part in ("right_shift", "clip", "cast"):
            assert part in name, name
        written = func.ty.params[-1]  # destination-passing style: the output comes last
        assert str(written.dtype) in ("uint8", "int8"), name


# --- (b, c, d) real models ---------------------------------------------------------------------
def _zoo_program(
    name: str, *, mixed_w4: bool = False, calibration_samples: int | None = None
) -> tuple[ip.IntegerProgram, zoo.ZooArtifacts]:
    """The model's W8A8 (or mixed W4/W8) integer program; fewer calibration samples than the
    zoo's default keep the test fast (bit-exactness does not depend on the ranges)."""
    artifacts = zoo.get(name)
    calib = list(artifacts.calibration_batches(calibration_samples))
    program = tvm_helpers.integer_program(artifacts.model_path, calib, mixed_w4=mixed_w4)
    assert program.float_ops == []
    return program, artifacts


def _real_feeds(artifacts: zoo.ZooArtifacts, count: int) -> list[dict[str, np.ndarray]]:
    batches = (feeds for feeds, _ in artifacts.evaluation_batches(count))
    return list(tvm_helpers.samples(batches, count))


@pytest.fixture(scope="module")
def fashion_cnn() -> tuple[ip.IntegerProgram, zoo.ZooArtifacts]:
    return _zoo_program("fashion_cnn")


@pytest.mark.realmodel
def test_fashion_cnn_w8_is_bit_exact_on_real_images(fashion_cnn, tmp_path):
    program, artifacts = fashion_cnn
    library = build(lower_program(program), "x86", tmp_path / "fashion", program=program)
    feeds = _real_feeds(artifacts, 24)
    reference = ReferenceInterpreter(program)
    for one in feeds:
        got = run_library(library, one)
        assert np.array_equal(got["logits_codes"], reference.outputs(one)["logits"])
    # the standalone runner written next to the library gives the same codes
    np.savez(tmp_path / "in.npz", **feeds[0])
    subprocess.run(
        [
            sys.executable,
            str(library.parent / RUNNER_NAME),
            tmp_path / "in.npz",
            tmp_path / "o.npz",
        ],
        check=True,
        timeout=120,
    )
    with np.load(tmp_path / "o.npz") as stored:
        assert np.array_equal(stored["logits_codes"], reference.outputs(feeds[0])["logits"])
    with pytest.raises(DyadiqError, match="shape"):
        run_library(library, {"input": np.zeros((2, 1, 28, 28), np.float32)})


@pytest.mark.realmodel
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_fashion_cnn_mixed_w4_w8_is_bit_exact_on_real_images(lowering):
    program, artifacts = _zoo_program("fashion_cnn", mixed_w4=True)
    assert {op.weight_bits for op in program.ops if isinstance(op, ip.Conv | ip.MatMul)} == {4, 8}
    compiled = CompiledProgram(program, lowering=lowering)
    assert_bit_exact(compiled, _real_feeds(artifacts, 24), minimum=20)


# ppocr_cls and MobileNetV2 are checked through the lowering x86 users get (VNNI where the CPU
# has it); the portable lowering of the same op kinds is covered by the synthetic programs
X86_LOWERING = "vnni" if HOST_HAS_VNNI else "portable"


@pytest.mark.realmodel
def test_ppocr_cls_is_bit_exact_on_real_text_lines():
    program, artifacts = _zoo_program("ppocr_cls", calibration_samples=32)
    assert {"HardSwish", "HardSigmoid", "GlobalAvgPool", "Mul", "Add"} <= _kinds(program)
    compiled = CompiledProgram(program, lowering=X86_LOWERING)
    print(f"ppocr_cls compile ({X86_LOWERING}): {compiled.compile_s:.1f} s")
    assert_bit_exact(compiled, _real_feeds(artifacts, 20), minimum=20)


@pytest.mark.realmodel
def test_mobilenet_v2_is_bit_exact_on_real_crops():
    program, artifacts = _zoo_program("mobilenet_v2", calibration_samples=16)
    assert any(isinstance(op, ip.Conv) and op.group > 1 for op in program.ops)  # depthwise
    compiled = CompiledProgram(program, lowering=X86_LOWERING)
    print(f"mobilenet_v2 compile ({X86_LOWERING}): {compiled.compile_s:.1f} s")
    assert_bit_exact(compiled, _real_feeds(artifacts, 8), minimum=8)


@pytest.mark.realmodel
def test_fashion_cnn_cross_compiles_for_aarch64(fashion_cnn, tmp_path):
    program, _ = fashion_cnn
    library = build(lower_program(program), "aarch64", tmp_path / "arm", program=program)
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit ELF
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine EM_AARCH64
    with pytest.raises(ConfigError, match="aarch64"):
        run_library(library, {})


@pytest.mark.realmodel
def test_fashion_cnn_compiles_cuda_kernels(fashion_cnn):
    program, _ = fashion_cnn
    cuda = target_for("cuda")
    executable = compile_prepared(prepare(lower_program(program), cuda), cuda)
    sources = tvm_helpers.cuda_sources(executable.mod)
    assert len(sources) == 1 and "__global__" in sources[0]
    kernels = sources[0].count("__global__")
    layers = sum(isinstance(op, ip.Conv | ip.MatMul) for op in program.ops)
    assert kernels >= layers


def test_build_writes_metadata_with_quantizers(tmp_path):
    rng = np.random.default_rng(26)
    program = tvm_helpers.integer_program(conv_relu_pool_fc(rng), calibration((1, 3, 8, 8), rng))
    library = build(lower_program(program), "x86", tmp_path / "out", program=program)
    info = json.loads((library.parent / "model.json").read_text())
    assert [o["name"] for o in info["outputs"]] == ["y_codes", "y"]
    (x_q,) = [op.output for op in program.ops if isinstance(op, ip.QuantizeInput)]
    assert info["inputs"][0]["quant"]["zero_point"] == program.quant[x_q].zero_point
    assert info["outputs"][0]["dtype"] == "uint8" and info["target_name"] == "x86"
    feeds = calibration((1, 3, 8, 8), rng, n=1)[0]
    got = run_library(library.parent, feeds)
    assert np.array_equal(got["y_codes"], ReferenceInterpreter(program).outputs(feeds)["y"])
    assert Path(library).stat().st_size > 0
