"""Salient input channels in weight-only GPTQ: chosen by E[x^2], swept last, stored at 8 bits
beside the group-wise codes, exported as a side product that onnxruntime adds back."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dyadiq.backends.onnx.weight_only import WeightOnlyForm, export_weight_only
from dyadiq.errors import ConfigError
from dyadiq.io import save_model_atomic
from dyadiq.passes.weight_only.groupwise import dequantize
from dyadiq.passes.weight_only.layers import find_weights, weight_matrix
from dyadiq.passes.weight_only.model_file import ModelFile
from dyadiq.passes.weight_only.pipeline import MODEL_FILE, prepare, run
from dyadiq.passes.weight_only.quantize import (
    LayerQuantizer,
    Method,
    WeightOnlySettings,
    relative_output_error,
)
from dyadiq.passes.weight_only.salient import salient_channels

K, N, SEQ, VOCAB = 256, 96, 16, 64
# onnxruntime's default optimizations fuse DequantizeLinear -> MatMul into MatMulNBits
# computed with int8 activations (session.qdq_matmulnbits_accuracy_level 4); float compute:
FLOAT_COMPUTE = {"session.qdq_matmulnbits_accuracy_level": "0"}


def _session(path: pathlib.Path, *, optimized: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if optimized:
        for key, value in FLOAT_COMPUTE.items():
            options.add_session_config_entry(key, value)
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


LOUD = [5, 77, 130, 201]  # input channels with a large second moment


def _inputs(rng: np.random.Generator, rows: int = 4096) -> np.ndarray:
    """Correlated inputs whose LOUD channels carry most of the energy."""
    mix = rng.normal(size=(K, K)) / np.sqrt(K) + np.eye(K)
    x = rng.normal(size=(rows, K)) @ mix
    x[:, LOUD] *= 12.0
    return x.astype(np.float32)


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    """x [1, SEQ, K] -> MatMul(W^T) -> y [1, SEQ, N]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"], name="proj")],
        "salient",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, N])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _quantized(fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, object]:
    rng = np.random.default_rng(seed)
    x = _inputs(rng)
    h = (x.T.astype(np.float64) @ x) / len(x)
    w = (rng.normal(size=(N, K)) / 16).astype(np.float32)
    layer = find_weights(_matmul_model(w)).layers[0]
    quantizer = LayerQuantizer(WeightOnlySettings(salient_fraction=fraction), {"x": h})
    return w, h, quantizer(layer, w, 4)


def test_salient_set_is_the_top_second_moment_channels() -> None:
    rng = np.random.default_rng(1)
    x = _inputs(rng)
    h = (x.T.astype(np.float64) @ x) / len(x)
    assert salient_channels(h, 4 / K).tolist() == LOUD
    # 1% of 256 rounds to 3: the three loudest of the four
    top3 = np.argsort(-np.diag(h))[:3]
    assert salient_channels(h, 0.01).tolist() == sorted(top3.tolist())
    assert salient_channels(h, 0.0001).size == 1  # at least one


def test_gptq_sweeps_salient_columns_last_and_compensates_onto_them() -> None:
    fraction = 4 / K
    w, h, q = _quantized(fraction)
    salient = q.salient
    assert salient is not None and salient.columns.tolist() == LOUD
    # their group-wise codes are zero points: that part contributes exactly 0 there
    dense = dequantize(q.codes, q.scales, q.zero_points, q.format)
    assert np.all(dense[:, LOUD] == 0.0)
    # swept last, the salient columns end as the least-squares best given the rounded rest:
    # W_S + (W_N - Q_N) H_NS H_SS^-1 on the dampened H that GPTQ used (up to the 8-bit step)
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(K)
    rest = np.setdiff1d(np.arange(K), LOUD)
    pushed = (w[:, rest] - dense[:, rest]) @ damped[np.ix_(rest, LOUD)]
    best = w[:, LOUD] + pushed @ np.linalg.inv(damped[np.ix_(LOUD, LOUD)])
    step = salient.scales[:, None]
    assert np.all(np.abs(salient.values() - best) <= step / 2 + 1e-5)
    assert np.abs(best - w[:, LOUD]).max() > step.max()  # moved by more than a step
    # and that beats keeping the salient columns' own values, and no salient columns at all
    kept_own = dense.copy()
    kept_own[:, LOUD] = w[:, LOUD]
    ours = relative_output_error(w, q, h)
    d = w - kept_own
    own = float(np.sum((d @ h) * d) / np.sum((w @ h) * w))
    _, _, plain = _quantized(0.0)
    assert ours < own and ours < 0.8 * relative_output_error(w, plain, h)


def test_salient_bits_are_counted() -> None:
    _, _, q = _quantized(4 / K)
    _, _, plain = _quantized(0.0)
    extra = q.storage_bits - plain.storage_bits
    assert extra == N * 4 * 8 + N * 32 + 4 * 64  # codes, per-row scales, column indices


@pytest.mark.parametrize("form", list(WeightOnlyForm))
def test_exported_salient_matmul_equals_numpy(tmp_path: pathlib.Path, form: WeightOnlyForm) -> None:
    w, _, q = _quantized(4 / K)
    model = _matmul_model(w)
    layer = find_weights(model).layers[0]
    header, report = export_weight_only(model, [layer], {layer.id: q}, form)
    assert report.salient == {layer.id: 4}
    onnx.checker.check_model(header)
    save_model_atomic(header, tmp_path / "wo.onnx")
    x = _inputs(np.random.default_rng(3), SEQ)[None]
    want = x @ q.dequantize().T  # the fed path: one product with the summed weight
    for optimized in (False, True):  # as written, and after onnxruntime's fusions
        got = _session(tmp_path / "wo.onnx", optimized=optimized).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    ops = [n.op_type for n in header.graph.node]
    main = "MatMulNBits" if form is WeightOnlyForm.MATMUL_NBITS else "MatMul"
    assert ops.count(main) >= 1 and ops.count("Add") == 1 and "Gather" in ops


def _tied_lm(rng: np.random.Generator) -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(B) -> Tanh -> MatMul(Transpose(E)): a tied table."""
    width, hidden = 128, 64
    e = rng.normal(size=(VOCAB, width)).astype(np.float32)
    e[:, [3, 40]] *= 6.0
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "B"], ["h"], name="up"),
        helper.make_node("Tanh", ["h"], ["t"], name="act"),
        helper.make_node("MatMul", ["t", "B2"], ["d"], name="down"),
        helper.make_node("Transpose", ["E"], ["Et"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["d", "Et"], ["logits"], name="head"),
    ]
    inits = [
        numpy_helper.from_array(e, "E"),
        numpy_helper.from_array((rng.normal(size=(width, hidden)) / 16).astype(np.float32), "B"),
        numpy_helper.from_array((rng.normal(size=(hidden, width)) / 8).astype(np.float32), "B2"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, SEQ, VOCAB])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("form", list(WeightOnlyForm))
def test_pipeline_exports_salient_tied_table_as_fed(
    tmp_path: pathlib.Path, form: WeightOnlyForm
) -> None:
    """The whole run (Hessians, GPTQ with salient columns, export) on a tied embedding /
    LM head: the written model computes what the dequantised weights compute, both the
    embedding lookup (rows) and the head (columns) with the 8-bit columns added."""
    rng = np.random.default_rng(5)
    save_model_atomic(_tied_lm(rng), tmp_path / "float.onnx")
    batches = [{"ids": rng.integers(0, VOCAB, (1, SEQ)).astype(np.int64)} for _ in range(8)]
    settings = WeightOnlySettings(group_size=32, salient_fraction=0.02)
    prepared = prepare(tmp_path / "float.onnx", batches, settings)
    bits = {x.id: 4 for x in prepared.inventory.layers}
    report = run(tmp_path / "float.onnx", tmp_path / "out", prepared, bits, form)
    assert set(report["export"]["salient_columns"]) == {"head", "up", "down"}
    source = ModelFile.load(tmp_path / "float.onnx")
    float_model = source.materialised(source.header)
    weights = {}
    for layer in prepared.inventory.layers:
        q = prepared.quantize(layer, 4)
        assert q.salient is not None
        weights[layer.initializer] = layer.stored(q.dequantize())
        w = weight_matrix(float_model, layer)
        assert np.abs(q.dequantize() - w).max() < np.abs(w).max()  # sanity: near the weight
    ids = batches[0]["ids"]
    e, b, b2 = weights["E"], weights["B"], weights["B2"]
    want = (np.tanh(e[ids] @ b) @ b2) @ e.T
    for optimized in (False, True):
        session = _session(tmp_path / "out" / MODEL_FILE, optimized=optimized)
        np.testing.assert_allclose(session.run(None, {"ids": ids})[0], want, rtol=1e-5, atol=1e-4)


def test_salient_needs_gptq_and_a_sane_fraction() -> None:
    with pytest.raises(ConfigError, match="GPTQ"):
        WeightOnlySettings(method=Method.RTN, salient_fraction=0.01)
    with pytest.raises(ConfigError, match="salient fraction"):
        WeightOnlySettings(salient_fraction=0.7)


def test_cli_salient_fraction(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dyadiq.cli.weight_only import main

    rng = np.random.default_rng(4)
    save_model_atomic(_tied_lm(rng), tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(4):
        np.savez(calib / f"{k}.npz", ids=rng.integers(0, VOCAB, (1, SEQ)).astype(np.int64))
    argv = [str(tmp_path / "m.onnx"), "--calib", str(calib), "--group-size", "32"]
    assert main([*argv, "-o", str(tmp_path / "plain"), "--salient-fraction", "0"]) == 0
    assert main([*argv, "-o", str(tmp_path / "out"), "--salient-fraction", "0.02"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    # 2% of 128 and of 64 input columns: 3 and 1 (at least one)
    assert report["export"]["salient_columns"] == {"up": 3, "down": 1, "head": 3}
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["salient_fraction"] == 0.02
    extra = report["stored_weight_bytes"] - plain["stored_weight_bytes"]
    # 8-bit codes, a float32 scale per row, int64 indices: up 64 rows x 3, down 128 x 1,
    # the tied table 64 x 3
    assert extra == (64 * 3 + 64 * 4 + 3 * 8) + (128 * 1 + 128 * 4 + 8) + (64 * 3 + 64 * 4 + 24)
    with pytest.raises(ConfigError, match="GPTQ"):
        main([*argv, "-o", str(tmp_path / "r"), "--wo-method", "rtn", "--salient-fraction", "0.01"])
