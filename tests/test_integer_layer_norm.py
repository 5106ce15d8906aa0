"""Integer LayerNorm (I-BERT): the integer square root, the rewrite (a residual Add absorbed and
summed wide), closeness to the float LayerNorm in output codes, and bit-exactness of integer
ONNX (onnxruntime) against the reference interpreter. The TVM and Cortex-M checks of the same
one-block transformer are in tests/test_integer_transformer_block.py."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dyadiq import integer_program as ip
from dyadiq.backends.onnx.integer import export_integer_onnx
from dyadiq.consistency import bit_exactness
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.inspection import describe
from dyadiq.passes.integerize import integerize
from dyadiq.pipeline import quantize_graph
from dyadiq.plan import PrecisionPlan
from dyadiq.reference_interpreter import ReferenceInterpreter, integer_sqrt
from tests.builders import with_weights
from tests.transformer_block import block_model, quantized_block


def test_integer_sqrt_is_the_floor_square_root_at_every_bit_length() -> None:
    rng = np.random.default_rng(0)
    values = [1, 2, 3, 4, 5, (1 << 62) - 1]
    for bits in range(1, 62):
        low, high = 1 << (bits - 1), (1 << bits) - 1
        values += [low, high, *rng.integers(low, high, size=200, endpoint=True).tolist()]
        root = math.isqrt(high)
        values += [root * root - 1, root * root, root * root + 1]
    values += list(range(1, 5000))
    n = np.array([v for v in values if 1 <= v < 1 << 62], np.int64)
    want = np.array([math.isqrt(int(v)) for v in n], np.int64)
    assert np.array_equal(integer_sqrt(n), want)


def _layer_norms(program: ip.IntegerProgram) -> list[ip.LayerNorm]:
    return [op for op in program.ops if isinstance(op, ip.LayerNorm)]


def test_every_layer_norm_is_integer_and_absorbs_its_residual_add() -> None:
    block = quantized_block()
    program = block.program
    assert program.float_ops == []
    norms = _layer_norms(program)
    assert [op.output for op in norms] == ["ln0_q", "ln1_q", "ln2_q"]
    assert [op.inputs for op in norms] == [("xi_q",), ("o_q", "ln0_q"), ("d_q", "ln1_q")]
    assert all(op.wide_output is None for op in norms)  # MatMuls quantize them right away
    assert not any(isinstance(op, ip.Add) for op in program.ops)
    sites = set(block.result.sites.tensors)
    # the residual sums stay unquantized in the simulator too: the integer op sums them wide
    assert {"r1", "r2"}.isdisjoint(sites) and {"ln0", "ln1", "ln2"} <= sites
    for op in norms[1:]:  # the scale ratio of the two operands, exact to 2^-13
        q = [program.quant[name] for name in op.inputs]
        ratio = q[1].scale / q[0].scale
        assert abs(op.input_mults[1] / op.input_mults[0] - ratio) <= ratio * 2.0**-12


def test_a_residual_stream_the_simulator_keeps_in_float_passes_on_wide() -> None:
    """[1, tokens, hidden] tensors: a Reshape sits between each LayerNorm and its MatMuls,
    so the simulator quantizes the Reshape, not the residual stream; the integer LayerNorm
    writes 8-bit codes for the MatMuls and int32 codes for the next LayerNorm."""
    block = quantized_block(batched=True)
    program = block.program
    assert [op.split()[0] for op in program.float_ops] == ["Reshape"]  # of the float input
    norms = _layer_norms(program)
    assert [op.wide_output for op in norms] == ["ln0_wide", "ln1_wide", None]
    assert [op.inputs for op in norms] == [("xi_q",), ("o_q", "ln0_wide"), ("d_q", "ln1_wide")]
    assert program.code_dtype("ln0_wide") == np.int32
    assert {"ln0", "ln1"}.isdisjoint(block.result.sites.tensors)
    report = bit_exactness(program, export_integer_onnx(program), block.feeds)
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


def _float_layer_norm(
    op: ip.LayerNorm, program: ip.IntegerProgram, env: dict[str, np.ndarray], gamma, beta
) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The float LayerNorm of the op's dequantized (summed) inputs, quantized to its output."""
    x = sum(
        (env[name].astype(np.float64) - zp) * program.quant[name].scale
        for name, zp in zip(op.inputs, op.zero_points, strict=True)
    )
    assert isinstance(x, np.ndarray)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + 1e-5) * gamma + beta
    q = program.quant[op.output]
    return np.clip(np.round(y / q.scale) + q.zero_point, q.qmin, q.qmax).astype(np.int64)


@pytest.mark.parametrize(("act_signed", "batched"), [(False, False), (True, False), (False, True)])
def test_integer_layer_norm_is_within_one_code_of_the_float_layer_norm(
    act_signed: bool, batched: bool
) -> None:
    block = quantized_block(act_signed=act_signed, batched=batched)
    program = block.program
    model = block_model()
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    reference = ReferenceInterpreter(program)
    diffs = []
    for feeds in block.feeds:
        env = reference.run(feeds)
        for i, op in enumerate(_layer_norms(program)):
            assert op.output is not None
            want = _float_layer_norm(op, program, env, weights[f"g{i}"], weights[f"b{i}"])
            diffs.append(np.abs(env[op.output].astype(np.int64) - want).ravel())
    diff = np.concatenate(diffs)
    assert diff.max() <= 1, diff.max()
    assert (diff == 0).mean() >= 0.97, (diff == 0).mean()


@pytest.mark.parametrize("act_signed", [False, True])
def test_integer_onnx_is_bit_exact(act_signed: bool) -> None:
    block = quantized_block(act_signed=act_signed)
    report = bit_exactness(block.program, export_integer_onnx(block.program), block.feeds)
    assert report["tensors"] > 0
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


def _float_input_model() -> onnx.ModelProto:
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    net (float[4, 8] x) => (float[4, 8] y) {
        n = LayerNormalization <axis = -1> (x, g, b)
        y = MatMul (n, w)
    }
    """
    rng = np.random.default_rng(2)
    return with_weights(text, g=rng.normal(size=8), b=rng.normal(size=8), w=rng.normal(size=(8, 8)))


def test_layer_norm_of_a_float_input_stays_float_and_says_why() -> None:
    """Its input (a model input here, the embeddings' float sum in MiniLM) has no codes."""
    graph = load_onnx(_float_input_model())
    plan = PrecisionPlan.uniform(graph)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.normal(size=(4, 8)).astype(np.float32)} for _ in range(4)]
    result = quantize_graph(graph, plan, feeds)
    program = integerize(result.graph, plan, result.sites, result.qdq.act_params)
    assert [op.split()[0] for op in program.float_ops] == ["LayerNormalization"]
    assert any("neither quantized nor a residual Add" in note for note in program.notes)
    report = bit_exactness(program, export_integer_onnx(program), feeds)
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


@pytest.mark.parametrize("batched", [False, True])
def test_inspect_says_what_integerize_does_with_layer_norms(batched: bool) -> None:
    layers = describe(load_onnx(block_model(batched=batched)))["layers"]
    norms = [layer for layer in layers if layer["op"] == "LayerNormalization"]
    assert len(norms) == 3
    for layer in norms:
        assert layer["quantizable"], layer
        assert "integer LayerNorm" in layer["reason"], layer
    residual = [layer for layer in layers if "summed wide inside" in layer["reason"]]
    assert len(residual) == 2  # the two residual Adds


def test_inspect_says_a_layer_norm_of_a_float_input_runs_in_float() -> None:
    layers = describe(load_onnx(_float_input_model()))["layers"]
    (norm,) = [layer for layer in layers if layer["op"] == "LayerNormalization"]
    assert not norm["quantizable"] and "in float" in norm["reason"], norm
