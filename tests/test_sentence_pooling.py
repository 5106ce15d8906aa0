"""A sentence embedder's head in integers: masked mean pooling (:class:`ip.MaskedMeanPool`) and
L2 normalisation (:class:`ip.L2Normalize`) over the last LayerNorm's wide codes, and the
attention mask's expansion read from the integer mask, so that a MiniLM-shaped model has no
float op from ids and mask to the embedding. The reference interpreter, integer ONNX and the
x86 TVM library and the Cortex-M C under QEMU agree bit for bit; inspect labels what
integerize does."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyadiq import integer_program as ip
from dyadiq.backends.onnx.integer import export_integer_onnx
from dyadiq.consistency import bit_exactness, simulation_agreement
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.inspection import describe
from dyadiq.passes.integerize import integerize
from dyadiq.pipeline import quantize_graph
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import ActQuant
from dyadiq.reference_interpreter import ReferenceInterpreter
from tests.minilm_shaped import (
    TOKENS,
    minilm_feeds,
    minilm_model,
    minilm_program,
    minilm_quantized,
)


def _round_half_away(value: Fraction) -> int:
    magnitude = abs(value)
    whole = int(magnitude + Fraction(1, 2))  # floor(|v| + 1/2)
    return whole if value >= 0 else -whole


def test_the_model_is_fully_integer_and_reads_the_integer_mask() -> None:
    program = minilm_program()
    assert program.float_ops == [], program.float_ops
    (pool,) = [op for op in program.ops if isinstance(op, ip.MaskedMeanPool)]
    (norm,) = [op for op in program.ops if isinstance(op, ip.L2Normalize)]
    (softmax,) = [op for op in program.ops if isinstance(op, ip.MaskedSoftmax)]
    assert pool.mask == softmax.mask == "attention_mask"  # no Cast / Flatten / Gather / And
    assert program.quant[pool.input].bits == 32 and pool.frac_bits == 0  # the wide stream
    assert norm.input == pool.output and program.int_outputs["embedding"] == norm.output
    assert program.quant[norm.output].scale == 2.0**-ip.L2_NORM_FRAC_BITS


def _run_op(op: ip.IntOp, quant: dict[str, ActQuant], env: dict[str, np.ndarray]) -> np.ndarray:
    shapes = {name: tuple(value.shape) for name, value in env.items()}
    program = ip.IntegerProgram([op], quant, shapes, {}, [])
    return ReferenceInterpreter(program).run(env)[op.output]  # type: ignore[union-attr]


def test_mean_pool_is_the_rounded_exact_mean_of_kept_tokens() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(2, 5, 4)).astype(np.uint8)
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]], np.int64)  # row 2: no token kept
    quant = {"x": ActQuant(0.1, 131, 8, False), "y": ActQuant(0.1 / 2**4, 0, 32, True)}
    op = ip.MaskedMeanPool("y", "x", 131, "m", 4)
    got = _run_op(op, quant, {"x": x, "m": mask})
    assert got.dtype == np.int32
    for b in range(2):
        kept = [t for t in range(5) if mask[b, t]]
        for d in range(4):
            total = sum(int(x[b, t, d]) - 131 for t in kept)
            want = _round_half_away(Fraction(total * 2**4, max(len(kept), 1)))
            assert got[b, d] == want, (b, d)
    ties = _run_op(op, quant, {"x": np.full((1, 2, 1), 130, np.uint8), "m": np.ones((1, 2))})
    assert ties[0, 0] == -16  # -1 exactly: no tie; and a half rounds away from zero below
    half = ip.MaskedMeanPool("y", "x", 131, "m", 0)
    x2 = np.array([[[130], [131]]], np.uint8)  # mean -1/2 -> -1
    assert _run_op(half, quant, {"x": x2, "m": np.ones((1, 2))})[0, 0] == -1


def test_l2_normalize_is_the_float_normalisation_within_its_rounding() -> None:
    rng = np.random.default_rng(4)
    v = rng.integers(-(2**30), 2**30, size=(3, 384)).astype(np.int32)
    v[1] = 0  # the norm is eps: zeros stay zero
    v[2, :] = 0
    v[2, 7] = -5
    quant = {"x": ActQuant(2.0**-20, 0, 32, True), "y": ActQuant(2.0**-24, 0, 32, True)}
    op = ip.L2Normalize("y", "x", 0, 26, 1, 24)  # 384 4^26 < 2^61
    got = _run_op(op, quant, {"x": v}).astype(np.float64) * 2.0**-24
    real = v.astype(np.float64)
    norms = np.maximum(np.linalg.norm(real, axis=-1, keepdims=True), 1.0)
    want = real / norms
    assert np.abs(got[0] - want[0]).max() < 1e-6
    assert not got[1].any()
    assert got[2, 7] == -1.0 and np.count_nonzero(got[2]) == 1  # a small row is exact too


def test_reference_is_the_float_model_within_quantization() -> None:
    program = minilm_program()
    session = ort.InferenceSession(minilm_model().SerializeToString())
    reference = ReferenceInterpreter(program)
    for feeds in minilm_feeds(2):
        if not feeds["attention_mask"].any():
            continue  # no token kept: the float model's softmax rows are all -inf + x
        (want,) = session.run(None, feeds)
        got = reference.run(feeds)["embedding"]
        cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cosine > 0.99, cosine
        assert abs(np.linalg.norm(got) - 1.0) < 1e-5


def test_integer_onnx_is_bit_exact() -> None:
    program = minilm_program()
    report = bit_exactness(program, export_integer_onnx(program), minilm_feeds(3))
    assert report["tensors"] > 0
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


def test_qdq_agreement_of_the_int32_embedding_is_in_float_units() -> None:
    """The QDQ model's embedding is float: a difference in 2^-24 LSB of the integer model's
    int32 codes (hundreds of thousands for 0.03) would read as a failure."""
    from dyadiq.backends.onnx.qdq import export_qdq

    result, program = minilm_quantized()
    feeds = [f for f in minilm_feeds(3) if f["attention_mask"].any()]
    agreement = simulation_agreement(
        program, export_qdq(result.qdq.graph), export_integer_onnx(program), feeds
    )
    assert agreement["max_output_diff_lsb"] is None
    assert 0.0 < agreement["max_float_output_abs_diff"] < 0.1


def test_x86_tvm_is_bit_exact() -> None:
    pytest.importorskip("tvm")

    from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
    from dyadiq.backends.tvm.lower import lower_program
    from tests.tvm_helpers import assert_cpu_build_matches_reference

    program = minilm_program()
    target = target_for("x86")
    lowered = lower_program(program, target=target, float_islands=False)
    executable = compile_prepared(prepare(lowered, target), target)
    assert_cpu_build_matches_reference(executable, program, minilm_feeds(4))


def test_inspect_labels_the_pooling_as_integer() -> None:
    labels = {layer["id"]: layer for layer in describe(load_onnx(minilm_model()))["layers"]}
    assert [n for n, layer in labels.items() if not layer["quantizable"]] == []
    by_op = {layer["op"]: layer["reason"] for layer in labels.values()}
    assert "masked mean pooling" in by_op["ReduceSum"]
    assert "L2 normalisation" in by_op["ReduceL2"]
    assert "not computed" in by_op["Flatten"] and "not computed" in by_op["And"]


def _with_clip_max(model: onnx.ModelProto) -> onnx.ModelProto:
    """The token count's Clip also takes a maximum: no longer the pattern."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    clip = next(n for n in changed.graph.node if n.op_type == "Clip" and n.output[0] == "count")
    clip.input.append("tiny")
    return changed


def test_a_clip_with_a_maximum_keeps_the_pooling_float_and_says_why() -> None:
    model = _with_clip_max(minilm_model())
    graph = load_onnx(model)
    plan = PrecisionPlan.uniform(graph)
    feeds = [f for f in minilm_feeds(1, 8) if f["attention_mask"].any()]
    result = quantize_graph(graph, plan, feeds)
    program = integerize(result.graph, plan, result.sites, result.qdq.act_params)
    assert not any(isinstance(op, ip.MaskedMeanPool | ip.L2Normalize) for op in program.ops)
    assert any("Clip is not a minimum" in note for note in program.notes), program.notes
    floats = {op.split(" ", 1)[0] for op in program.float_ops}
    assert {"ReduceSum", "ReduceL2", "Div"} <= floats
    labels = describe(load_onnx(model))["layers"]
    marked_float = {layer["id"] for layer in labels if not layer["quantizable"]}
    assert marked_float == {op.split(" ", 1)[1] for op in program.float_ops}


def test_cortex_m_target_is_bit_exact_under_qemu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The whole MiniLM-shaped model in C, through the cortex-m4 target (emit, build, run on
    QEMU, compare): ids and mask as one raw int64 input buffer, the embedding sum and residual
    stream as int32 arena buffers, the masked softmax reading the mask input, the pooling and
    L2 normalisation writing int32 codes (padding masks of every length, none kept included)."""
    from dyadiq.backends.mcu.build import ToolchainError, find_toolchain
    from dyadiq.targets import emit_for_target

    try:
        find_toolchain(need_qemu=True)
    except ToolchainError as exc:
        pytest.skip(str(exc))
    program = minilm_program()
    info = emit_for_target(program, "cortex-m4", tmp_path, minilm_feeds(6))
    model_c = (tmp_path / "model.c").read_text()
    kernels = ("dq_embedding(", "dq_layer_norm(", "dq_masked_softmax(", "dq_mean_pool(")
    for kernel in (*kernels, "dq_l2_norm("):
        assert kernel in model_c, kernel
    assert info["ran_on"].startswith("qemu-system-arm")
    assert info["bit_exact_vs_reference"]["exact"] == 6, info["bit_exact_vs_reference"]
    assert "float_islands" not in info


def test_all_tokens_masked_rows_agree_too() -> None:
    feeds = minilm_feeds(5, n=6)
    assert not feeds[-1]["attention_mask"].any()
    env = ReferenceInterpreter(minilm_program()).run(feeds[-1])
    assert not env["pooled_wide"].any() and not env["embedding_wide"].any()
    assert feeds[0]["attention_mask"].shape[1] == TOKENS


def test_cuda_compiles_every_transformer_kernel() -> None:
    """No GPU here: the CUDA build is compiled (device code generated for every op, pooling,
    L2 norm, LayerNorm's integer sqrt and the masked softmax included) but not run. With the
    square root as fused Relax ops this build ran for over ten minutes."""
    pytest.importorskip("tvm")

    from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
    from dyadiq.backends.tvm.lower import lower_program
    from tests.tvm_helpers import cuda_sources

    program = minilm_program()
    cuda = target_for("cuda")
    executable = compile_prepared(prepare(lower_program(program, target=cuda), cuda), cuda)
    sources = cuda_sources(executable.mod)
    assert len(sources) == 1 and sources[0].count("__global__") >= 1
    # the LayerNorm's square root is its own per-thread loop, not a 3^steps expression
    assert "dq_integer_sqrt" in sources[0]
