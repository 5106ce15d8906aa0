"""Weight-only quantization on small synthetic graphs: the group-wise grid against a numpy
formula, GPTQ against round to nearest, both ONNX forms against onnxruntime, tied weights."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dyadiq.backends.onnx.weight_only import (
    WeightOnlyForm,
    export_weight_only,
    pack_uint4,
    pack_zero_points,
)
from dyadiq.errors import ConfigError
from dyadiq.io import save_model_atomic
from dyadiq.passes.compensation.gptq import gptq_factor
from dyadiq.passes.weight_only.groupwise import GroupwiseFormat, round_to_nearest
from dyadiq.passes.weight_only.layers import Orientation, find_weights, weight_matrix
from dyadiq.passes.weight_only.model_file import ModelFile
from dyadiq.passes.weight_only.quantize import Method, quantize_weight

VOCAB, WIDTH, HIDDEN, SEQ = 64, 256, 192, 8


def tied_lm(rng: np.random.Generator) -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(B) -> MatMul(B2) -> MatMul(Transpose(E)): a tied LM head."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "B"], ["h"], name="up"),
        helper.make_node("Tanh", ["h"], ["t"], name="act"),
        helper.make_node("MatMul", ["t", "B2"], ["d"], name="down"),
        helper.make_node("Transpose", ["E"], ["Et"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["d", "Et"], ["logits"], name="head"),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(size=(VOCAB, WIDTH)).astype(np.float32), "E"),
        numpy_helper.from_array((rng.normal(size=(WIDTH, HIDDEN)) / 16).astype(np.float32), "B"),
        numpy_helper.from_array((rng.normal(size=(HIDDEN, WIDTH)) / 14).astype(np.float32), "B2"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, SEQ, VOCAB])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _reference_formula(w: np.ndarray, bits: int, g: int, symmetric: bool) -> np.ndarray:
    """The grid written out group by group with plain Python loops."""
    out = np.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], g):
            x = w[r, start : start + g]
            if symmetric:
                s = np.float32(np.abs(x).max() / np.float32(2 ** (bits - 1) - 1))
                q = np.clip(np.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                out[r, start : start + g] = q * s
            else:
                lo, hi = min(x.min(), 0), max(x.max(), 0)
                s = np.float32((hi - lo) / np.float32(2**bits - 1))
                z = np.clip(np.round(-lo / s), 0, 2**bits - 1)
                q = np.clip(np.round(x / s) + z, 0, 2**bits - 1)
                out[r, start : start + g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_groupwise_grid_matches_the_formula(bits: int, group: int, symmetric: bool) -> None:
    w = np.random.default_rng(bits * group).normal(size=(6, 256)).astype(np.float32)
    q = round_to_nearest(w, GroupwiseFormat(bits, group, symmetric))
    lo, hi = q.format.code_range
    assert q.codes.min() >= lo and q.codes.max() <= hi
    np.testing.assert_array_equal(q.dequantize(), _reference_formula(w, bits, group, symmetric))


def test_partial_last_group_and_zero_group() -> None:
    w = np.random.default_rng(1).normal(size=(3, 100)).astype(np.float32)
    w[1, :32] = 0
    q = round_to_nearest(w, GroupwiseFormat(4, 32))
    assert q.scales.shape == (3, 4)
    np.testing.assert_array_equal(q.dequantize()[1, :32], 0)
    assert np.abs(q.dequantize() - w).max() <= q.scales.max() / 2 + 1e-7


def test_bad_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        GroupwiseFormat(9)
    with pytest.raises(ConfigError):
        GroupwiseFormat(4, 48)


def test_gptq_beats_round_to_nearest_on_correlated_inputs() -> None:
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(128, 128))
    x = rng.normal(size=(4096, 128)) @ mix * rng.uniform(0.2, 3, size=128)
    h = x.T @ x / len(x)
    w = rng.normal(size=(64, 128)).astype(np.float32)
    fmt = GroupwiseFormat(3, 32)
    factor = gptq_factor(h[None])
    rtn = quantize_weight(w, fmt, method=Method.RTN)
    gptq = quantize_weight(w, fmt, method=Method.GPTQ, factor=factor)
    np.testing.assert_array_equal(gptq.scales, rtn.scales)  # static groups: the same grid
    lo, hi = fmt.code_range
    assert gptq.codes.min() >= lo and gptq.codes.max() <= hi

    def error(q: np.ndarray) -> float:
        d = w - q
        return float(np.einsum("rk,kl,rl->", d, h, d))

    assert error(gptq.dequantize()) < 0.7 * error(rtn.dequantize())


def test_finds_tied_weight_once() -> None:
    inventory = find_weights(tied_lm(np.random.default_rng(0)))
    by_id = inventory.by_id()
    assert sorted(by_id) == ["down", "head", "up"]
    head = by_id["head"]
    assert head.initializer == "E" and head.tied and head.orientation is Orientation.ROWS
    assert {r.node for r in head.readers} == {"embed", "head"}
    assert (head.rows, head.columns) == (VOCAB, WIDTH)
    assert by_id["up"].orientation is Orientation.TRANSPOSED
    assert (by_id["up"].rows, by_id["up"].columns) == (HIDDEN, WIDTH)


def _exported(
    tmp_path: pathlib.Path, form: WeightOnlyForm, bits: dict[str, int], symmetric: bool
) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray, dict[str, list[str]]]:
    """(exported model, its onnxruntime logits, the numpy reference logits, report)."""
    rng = np.random.default_rng(7)
    model = tied_lm(rng)
    save_model_atomic(model, tmp_path / "float.onnx", external_data=True)
    source = ModelFile.load(tmp_path / "float.onnx")
    inventory = find_weights(source.header)
    quantized = {}
    dequantized = {}
    for layer in inventory.layers:
        w = weight_matrix(source.materialised(source.header), layer)
        q = round_to_nearest(w, GroupwiseFormat(bits[layer.id], 64, symmetric))
        quantized[layer.id] = q
        dequantized[layer.initializer] = layer.stored(q.dequantize())
    header, report = export_weight_only(source.header, inventory.layers, quantized, form)
    out = source.materialised(header)
    onnx.checker.check_model(out, full_check=form is WeightOnlyForm.DEQUANTIZE_LINEAR)
    save_model_atomic(out, tmp_path / "wo.onnx")
    ids = rng.integers(0, VOCAB, size=(1, SEQ)).astype(np.int64)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "wo.onnx"), options)
    got = session.run(None, {"ids": ids})[0]
    e, b, b2 = dequantized["E"], dequantized["B"], dequantized["B2"]
    want = (np.tanh(e[ids] @ b) @ b2) @ e.T
    return out, got, want, report.to_json()  # type: ignore[return-value]


@pytest.mark.parametrize("symmetric", [False, True])
def test_blocked_dequantize_linear_matches_numpy(tmp_path: pathlib.Path, symmetric: bool) -> None:
    bits = {"up": 4, "down": 3, "head": 8}
    out, got, want, _ = _exported(tmp_path, WeightOnlyForm.DEQUANTIZE_LINEAR, bits, symmetric)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    names = {t.name for t in out.graph.initializer}
    assert "E" not in names and "E_wq" in names  # the tied table, stored once as codes
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 3 and {n.output[0] for n in dq} == {"E", "B", "B2"}
    types = {t.name: t.data_type for t in out.graph.initializer}
    small = TensorProto.INT4 if symmetric else TensorProto.UINT4
    assert types["B_wq"] == small and types["B2_wq"] == small
    assert types["E_wq"] == (TensorProto.INT8 if symmetric else TensorProto.UINT8)


@pytest.mark.parametrize("symmetric", [False, True])
def test_matmul_nbits_matches_numpy(tmp_path: pathlib.Path, symmetric: bool) -> None:
    bits = {"up": 4, "down": 3, "head": 4}
    out, got, want, report = _exported(tmp_path, WeightOnlyForm.MATMUL_NBITS, bits, symmetric)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert sorted(report["matmul_nbits"]) == ["head", "up"]
    assert report["dequantize_linear"] == ["down"] and "down" in report["fallbacks"]
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("GatherBlockQuantized") == 1
    assert "Transpose" not in ops  # the tied head's transpose is gone
    packed = [t for t in out.graph.initializer if t.name.startswith("E")]
    tables = [t for t in packed if t.data_type == TensorProto.UINT8 and len(t.dims) == 3]
    assert len(tables) == 1  # embedding and LM head read one packed copy
    assert int(np.prod(tables[0].dims)) == VOCAB * WIDTH // 2


def test_packing_agrees_with_onnxruntime_quantizer(tmp_path: pathlib.Path) -> None:
    """onnxruntime's own 4-bit quantizer (RTN, asymmetric, block 32) writes B, scales and
    zero points: unpacking them as our layout says and re-packing gives its bytes back, and
    our dequantisation of its codes computes its MatMulNBits output."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(11)
    k, n = 96, 40
    b = rng.normal(size=(k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=False)
    quantizer.process()
    ort_model = quantizer.model.model
    inits = {t.name: numpy_helper.to_array(t) for t in ort_model.graph.initializer}
    node = next(nd for nd in ort_model.graph.node if nd.op_type == "MatMulNBits")
    packed, scales, zeros = (inits[node.input[i]] for i in (1, 2, 3))
    blocks = -(-k // 32)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, blocks * 32)[:, :k]
    zp = np.stack([zeros & 15, zeros >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    np.testing.assert_array_equal(pack_uint4(codes, 32), packed.reshape(n, blocks, 16))
    np.testing.assert_array_equal(pack_zero_points(zp).reshape(-1), zeros.reshape(-1))
    fmt = GroupwiseFormat(4, 32)
    from dyadiq.passes.weight_only.groupwise import dequantize

    w = dequantize(codes, scales.reshape(n, blocks), zp, fmt)
    x = rng.normal(size=(3, k)).astype(np.float32)
    got = ort.InferenceSession(ort_model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-4, atol=1e-4)
    # and our round to nearest picks the same grid and codes as onnxruntime's
    ours = round_to_nearest(b.T, fmt)
    np.testing.assert_allclose(ours.scales, scales.reshape(n, blocks), rtol=1e-6)
    assert np.mean(ours.codes == codes) > 0.999


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_never_rounds_worse_than_min_max(symmetric: bool) -> None:
    from dyadiq.passes.weight_only.groupwise import clipped_group_scales, dequantize, quantize

    rng = np.random.default_rng(4)
    w = rng.standard_t(3, size=(16, 200)).astype(np.float32)  # heavy tails: clipping pays
    fmt = GroupwiseFormat(3, 64, symmetric)
    plain = round_to_nearest(w, fmt)
    scales, zeros = clipped_group_scales(w, fmt)
    clipped = dequantize(quantize(w, scales, zeros, fmt), scales, zeros, fmt)
    pad = np.zeros((16, 56), np.float32)

    def per_group(x: np.ndarray) -> np.ndarray:
        return np.concatenate([(x - w) ** 2, pad], axis=1).reshape(16, 4, 64).sum(axis=2)

    assert np.all(per_group(clipped) <= per_group(plain.dequantize()) * (1 + 1e-6))
    assert per_group(clipped).sum() < 0.9 * per_group(plain.dequantize()).sum()
