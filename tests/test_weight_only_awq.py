"""AWQ input scaling in weight-only quantization: the search, where 1/s goes in the graph,
float equivalence of the rescaled model, both exported forms, the report, the refusals."""

from __future__ import annotations

import json
import pathlib
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dyadiq.backends.onnx.weight_only import WeightOnlyForm
from dyadiq.errors import ConfigError
from dyadiq.io import save_model_atomic
from dyadiq.passes.weight_only.awq import (
    ScaledInputs,
    candidate_scales,
    dampened,
    has_input_scales,
    input_groups,
    rescale_graph,
    scaled_rtn_error,
    search_alpha,
)
from dyadiq.passes.weight_only.groupwise import GroupwiseFormat
from dyadiq.passes.weight_only.layers import find_weights, weight_matrix
from dyadiq.passes.weight_only.model_file import ModelFile
from dyadiq.passes.weight_only.pipeline import MODEL_FILE, prepare, run
from dyadiq.passes.weight_only.quantize import (
    Method,
    WeightOnlySettings,
    layer_hessian,
    relative_output_error,
)
from dyadiq.passes.weight_only.statistics import activation_hessians
from dyadiq.passes.weight_only.transfer import read_groupwise_codes

SEQ, VOCAB, WIDTH, HIDDEN = 16, 64, 128, 64
LOUD = [3, 40, 99]  # hidden channels with large activations (as LLMs' outlier channels)
# onnxruntime's default optimizations fuse DequantizeLinear -> MatMul into MatMulNBits
# computed with int8 activations (accuracy level 4); float compute:
FLOAT_COMPUTE = {"session.qdq_matmulnbits_accuracy_level": "0"}


def _session(
    model: pathlib.Path | onnx.ModelProto, *, optimized: bool = False
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if optimized:
        for key, value in FLOAT_COMPUTE.items():
            options.add_session_config_entry(key, value)
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, pathlib.Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _lm(rng: np.random.Generator) -> onnx.ModelProto:
    """A tied embedding / LM head around an MLP with two norm-like per-channel Muls:

    ids -> Gather(E) -> *c -> *gamma -> {MatMul B1, MatMul B2} -> Tanh(u1) * u2 -> MatMul B3
    -> + residual -> *gamma2 -> MatMul(Transpose(E)) -> logits
    """
    e = (rng.normal(size=(VOCAB, WIDTH)) / 4).astype(np.float32)
    e[:, LOUD] *= 8.0
    gamma = (1 + rng.uniform(-0.3, 0.3, WIDTH)).astype(np.float32)
    gamma2 = (1 + rng.uniform(-0.3, 0.3, WIDTH)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
        helper.make_node("Mul", ["emb", "c"], ["e2"], name="embed_scale"),
        helper.make_node("Mul", ["e2", "gamma"], ["n1"], name="norm1"),
        helper.make_node("MatMul", ["n1", "B1"], ["u1"], name="gate"),
        helper.make_node("MatMul", ["n1", "B2"], ["u2"], name="up"),
        helper.make_node("Tanh", ["u1"], ["t1"], name="act"),
        helper.make_node("Mul", ["t1", "u2"], ["t"], name="glu"),
        helper.make_node("MatMul", ["t", "B3"], ["d"], name="down"),
        helper.make_node("Add", ["d", "e2"], ["r"], name="residual"),
        helper.make_node("Mul", ["r", "gamma2"], ["n2"], name="norm2"),
        helper.make_node("Transpose", ["E"], ["Et"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["n2", "Et"], ["logits"], name="head"),
    ]
    w = {
        "B1": rng.normal(size=(WIDTH, HIDDEN)) / 16,
        "B2": rng.normal(size=(WIDTH, HIDDEN)) / 16,
        "B3": rng.normal(size=(HIDDEN, WIDTH)) / 8,
    }
    inits = [
        numpy_helper.from_array(e, "E"),
        numpy_helper.from_array(np.array(1.5, np.float32), "c"),
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(gamma2, "gamma2"),
        *(numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()),
    ]
    graph = helper.make_graph(
        nodes,
        "awq",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, SEQ, VOCAB])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _batches(rng: np.random.Generator, n: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"ids": rng.integers(0, VOCAB, (1, SEQ)).astype(np.int64)} for _ in range(n)]


def _with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named initializers hold ``weights`` (stored layouts)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [t for t in out.graph.initializer if t.name not in weights]
    del out.graph.initializer[:]
    out.graph.initializer.extend(
        [*kept, *(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())]
    )
    return out


def _fixed_scalings(model: onnx.ModelProto, alpha: float) -> list[ScaledInputs]:
    """Every input set scaled with s = m^alpha for made-up magnitudes (loud channels large)."""
    out = []
    for activations, members in input_groups(find_weights(model).layers):
        k = members[0].columns
        magnitude = np.linspace(0.5, 2.0, k)
        if k == WIDTH:
            magnitude[LOUD] = 40.0
        s = candidate_scales(magnitude, alpha)
        out.append(ScaledInputs(activations, tuple(x.id for x in members), alpha, s, {}))
    return out


def test_input_groups_share_inputs() -> None:
    layers = find_weights(_lm(np.random.default_rng(0))).layers
    groups = {a: sorted(x.id for x in m) for a, m in input_groups(layers)}
    assert groups == {("n1",): ["gate", "up"], ("t",): ["down"], ("n2",): ["head"]}


def test_rescaled_float_model_equals_the_original() -> None:
    """W diag(s) stored, 1/s folded into both norms' weights, an explicit Mul before the
    down projection and after the embedding lookup: the float model is unchanged."""
    rng = np.random.default_rng(1)
    model = _lm(rng)
    layers = find_weights(model).layers
    scalings = _fixed_scalings(model, 0.7)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    header, where = rescale_graph(model, layers, scalings, arrays.__getitem__)
    assert where == {
        "n1": "folded into Mul norm1",
        "t": "Mul by 1/s before 1 reader(s)",
        "n2": "folded into Mul norm2",
        "embed": "Mul by 1/s after the row lookup",
    }
    ops = [n.op_type for n in header.graph.node]
    assert ops.count("Mul") == [n.op_type for n in model.graph.node].count("Mul") + 2
    names = {t.name for t in header.graph.initializer}
    assert "gamma" not in names and "gamma2" not in names and "n1/awq_folded" in names
    assert has_input_scales(header) and not has_input_scales(model)
    s_of = {k: x.scales for x in scalings for k in x.layers}
    scaled = {
        x.initializer: x.stored(weight_matrix(model, x) * s_of[x.id][None, :]) for x in layers
    }
    rescaled = _with_weights(header, scaled)
    onnx.checker.check_model(rescaled, full_check=True)
    ids = _batches(rng, 1)[0]
    want = _session(model).run(None, ids)[0]
    got = _session(rescaled).run(None, ids)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not np.array_equal(scaled["B3"], arrays["B3"])  # the weights did change


def test_not_folded_when_the_norm_output_has_other_readers() -> None:
    """n1 also read by a float node: 1/s must not reach it, so an explicit Mul is used."""
    model = _lm(np.random.default_rng(2))
    model.graph.node.append(helper.make_node("Relu", ["n1"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    layers = find_weights(model).layers
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    header, where = rescale_graph(model, layers, _fixed_scalings(model, 0.5), arrays.__getitem__)
    assert where["n1"] == "Mul by 1/s before 2 reader(s)"
    relu = next(n for n in header.graph.node if n.name == "side")
    assert list(relu.input) == ["n1"]
    assert "gamma" in {t.name for t in header.graph.initializer}


def test_alpha_zero_is_unscaled_and_search_never_worse() -> None:
    rng = np.random.default_rng(3)
    k, rows = 256, 96
    x = rng.normal(size=(4096, k))
    x[:, :4] *= 30.0  # loud channels
    h = x.T @ x / len(x)
    w = (rng.normal(size=(rows, k)) / 16).astype(np.float32)
    fmt = GroupwiseFormat(4, 128)
    magnitude = np.sqrt(np.diag(h))
    assert np.all(candidate_scales(magnitude, 0.0) == 1.0)
    hd = dampened(h, 0.01)
    result = search_alpha(("x",), {"w": w}, {"w": hd}, magnitude, fmt)
    before, after = result.errors["w"]
    unscaled = scaled_rtn_error(w, np.ones(k, np.float32), hd, fmt)
    total = float(np.sum((w.astype(np.float64) @ hd) * w))
    assert before == pytest.approx(unscaled / total)
    assert result.alpha > 0 and after < 0.8 * before  # loud channels: scaling pays
    # uniform inputs: nothing to gain, and a tie keeps alpha 0
    flat = search_alpha(("x",), {"w": w}, {"w": np.eye(k)}, np.ones(k), fmt)
    assert flat.alpha == 0.0 and flat.errors["w"][0] == flat.errors["w"][1]


@pytest.mark.parametrize("form", list(WeightOnlyForm))
@pytest.mark.parametrize("method", list(Method))
def test_pipeline_exports_scaled_weights_as_fed(
    tmp_path: pathlib.Path, form: WeightOnlyForm, method: Method
) -> None:
    """The whole run (Hessians, AWQ search, GPTQ or RTN on W diag(s), export with 1/s) on a
    tied table: the written model computes what the fed weights Q(W diag(s)) diag(1/s)
    compute in the original graph, the embedding rows and the head alike."""
    rng = np.random.default_rng(5)
    model = _lm(rng)
    save_model_atomic(model, tmp_path / "float.onnx")
    batches = _batches(rng)
    settings = WeightOnlySettings(method=method, group_size=32, awq=True)
    prepared = prepare(tmp_path / "float.onnx", batches, settings)
    assert prepared.scaling is not None
    assert {x.alpha > 0 for x in prepared.scaling.scalings} >= {True}
    bits = {x.id: 4 for x in prepared.inventory.layers}
    report = run(tmp_path / "float.onnx", tmp_path / "out", prepared, bits, form)
    fed = {}
    s_of = {k: x.scales for x in prepared.scaling.scalings if x.scaled for k in x.layers}
    for layer in prepared.inventory.layers:
        q = prepared.quantize(layer, 4).dequantize()
        s = s_of.get(layer.id, np.ones(layer.columns, np.float32))
        fed[layer.initializer] = layer.stored(q / s[None, :])
    want = _session(_with_weights(model, fed)).run(None, batches[0])[0]
    for optimized in (False, True):  # as written, and after onnxruntime's fusions
        session = _session(tmp_path / "out" / MODEL_FILE, optimized=optimized)
        got = session.run(None, batches[0])[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    written = onnx.load(str(tmp_path / "out" / MODEL_FILE))
    ops = [n.op_type for n in written.graph.node]
    if form is WeightOnlyForm.MATMUL_NBITS:
        assert ops.count("MatMulNBits") == 4 and "GatherBlockQuantized" in ops
    assert has_input_scales(written)
    # the report: per layer its alpha and the search quantizer's error without / with s
    for row in report["layers"].values():
        awq = row["awq"]
        before, after = awq["rtn_relative_output_error"]
        assert after <= before and awq["reduction"] == pytest.approx(1 - after / before)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    head = next(x for x in saved["input_scaling"]["sets"] if x["layers"] == ["head"])
    if head["alpha"] > 0:  # the tied table's rows are looked up scaled: 1/s after the Gather
        assert saved["input_scaling"]["inverse_scale"]["embed"] == "Mul by 1/s after the row lookup"
    print({x["layers"][0]: x["alpha"] for x in saved["input_scaling"]["sets"]})
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["awq"] is True


def test_awq_lowers_round_to_nearest_output_error(tmp_path: pathlib.Path) -> None:
    """Round to nearest on the min-max grid (the search's own quantizer, AWQ's setting):
    every scaled weight's relative output error on its calibration inputs drops against
    the same quantizer without scales (the report's numbers, checked here independently)."""
    rng = np.random.default_rng(6)
    save_model_atomic(_lm(rng), tmp_path / "float.onnx")
    batches = _batches(rng)
    rtn = WeightOnlySettings(method=Method.RTN, group_size=32, clip_search=False)
    plain = prepare(tmp_path / "float.onnx", batches, rtn)
    awq = prepare(tmp_path / "float.onnx", batches, replace(rtn, awq=True))
    bits = {x.id: 4 for x in plain.inventory.layers}
    form = WeightOnlyForm.DEQUANTIZE_LINEAR
    a = run(tmp_path / "float.onnx", tmp_path / "a", plain, bits, form)
    b = run(tmp_path / "float.onnx", tmp_path / "b", awq, bits, form)
    assert awq.scaling is not None
    scaled = [k for x in awq.scaling.scalings if x.scaled for k in x.layers]
    assert scaled
    hessians = activation_hessians(plain.source, plain.inventory.layers, batches)
    for k in scaled:
        layer = plain.inventory.by_id()[k]
        h = layer_hessian(layer, hessians)
        assert h is not None and a["layers"][k]["relative_output_error"] is None  # RTN: no H
        before = relative_output_error(plain.weight(layer), plain.quantize(layer, 4), h)
        after = b["layers"][k]["relative_output_error"]  # on W diag(s) and H': the same ratio
        assert after < before


def test_refusals(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="sequential"):
        WeightOnlySettings(awq=True, sequential=True)
    with pytest.raises(ConfigError, match="salient"):
        WeightOnlySettings(awq=True, salient_fraction=0.01)
    with pytest.raises(ConfigError, match="bits"):
        WeightOnlySettings(awq=True, awq_bits=9)
    # the code transfer (decode graph, TVM --target) refuses codes of W diag(s)
    rng = np.random.default_rng(7)
    save_model_atomic(_lm(rng), tmp_path / "float.onnx")
    settings = WeightOnlySettings(group_size=32, awq=True)
    prepared = prepare(tmp_path / "float.onnx", _batches(rng, 2), settings)
    bits = {x.id: 4 for x in prepared.inventory.layers}
    run(tmp_path / "float.onnx", tmp_path / "o", prepared, bits, WeightOnlyForm.DEQUANTIZE_LINEAR)
    with pytest.raises(ConfigError, match="AWQ"):
        read_groupwise_codes(ModelFile.load(tmp_path / "o" / MODEL_FILE))


def test_cli_awq(tmp_path: pathlib.Path) -> None:
    from dyadiq.cli.weight_only import main

    rng = np.random.default_rng(8)
    save_model_atomic(_lm(rng), tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for k, feeds in enumerate(_batches(rng, 4)):
        np.savez(calib / f"{k}.npz", ids=feeds["ids"])
    argv = [str(tmp_path / "m.onnx"), "--calib", str(calib), "--group-size", "32"]
    assert main([*argv, "-o", str(tmp_path / "out"), "--awq", "--wbits", "3"]) == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["awq"] is True and plan["awq_bits"] == 3
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["layers"]["head"]["awq"]) == {
        "alpha",
        "rtn_relative_output_error",
        "reduction",
    }


def test_cli_awq_refuses_a_compiled_target(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`quantize --weight-only --awq --target x86` stops before quantizing: the decode step
    the target compiles would not divide its inputs by s."""
    from dyadiq.cli import main

    rng = np.random.default_rng(9)
    save_model_atomic(_lm(rng), tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "0.npz", ids=_batches(rng, 1)[0]["ids"])
    argv = ["quantize", str(tmp_path / "m.onnx"), "--weight-only", "--awq", "--target", "x86"]
    assert main([*argv, "--calib", str(calib), "-o", str(tmp_path / "out")]) == 2
    assert "--awq does not combine with --target" in capsys.readouterr().err
    assert not (tmp_path / "out" / MODEL_FILE).exists()
