"""A weight initializer that several layers read is quantized once and stored once
(passes/shared_weights.py): in the QDQ model, the integer model and the Cortex-M C sources."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyadiq.backends.mcu.costs import program_weight_flash_bytes
from dyadiq.backends.onnx.integer import export_integer_onnx
from dyadiq.backends.onnx.qdq import export_qdq
from dyadiq.consistency import bit_exactness, simulation_agreement
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.integerize import integerize
from dyadiq.pipeline import prepare_graph, quantize_graph
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import (
    WeightQuant,
    fake_quantize,
    quantize_weight_per_channel,
)
from tests.builders import calibration, with_weights

TIED_MATMULS = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[2, 8] x) => (float[2, 8] y) {
    m1 = MatMul (x, w)
    h = Relu (m1)
    y = MatMul (h, w)
}
"""

TIED_CONVS = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    h = Relu (c1)
    y = Conv <pads = [1, 1, 1, 1]> (h, w, b)
}
"""


def _tied_matmuls(rng: np.random.Generator) -> onnx.ModelProto:
    return with_weights(TIED_MATMULS, w=rng.normal(size=(8, 8)) * 0.4)


def _tied_convs(rng: np.random.Generator) -> onnx.ModelProto:
    return with_weights(
        TIED_CONVS, w=rng.normal(size=(4, 4, 3, 3)) * 0.3, b=rng.normal(size=4) * 0.5
    )


def _stored_weights(model: onnx.ModelProto) -> list[str]:
    """Initializers read as the weight of a DequantizeLinear (QDQ), ConvInteger or
    MatMulInteger (integer), one entry per distinct stored tensor."""
    inits = {t.name: t for t in model.graph.initializer}
    names = set()
    for node in model.graph.node:
        if node.op_type in ("ConvInteger", "MatMulInteger") and node.input[1] in inits:
            names.add(node.input[1])
        codes = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if codes is not None and codes.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4):
            names.add(node.input[0])
    return sorted(names)


def _quantize(model: onnx.ModelProto, calib, *, wbits: int = 8, weights=None):
    graph = load_onnx(model, simplify=False)
    # the plan covers the prepared graph's layers (an LSTM's are made by unrolling it)
    plan = PrecisionPlan.uniform(prepare_graph(graph), weight_bits=wbits)
    result = quantize_graph(graph, plan, calib, weights=weights)
    program = integerize(
        result.graph, plan, result.sites, result.qdq.act_params, weights=result.weights
    )
    return result, program, export_qdq(result.qdq.graph), export_integer_onnx(program)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("wbits", [8, 4])
def test_two_matmuls_reading_one_weight_store_it_once(wbits):
    rng = np.random.default_rng(0)
    model = _tied_matmuls(rng)
    calib = calibration((2, 8), rng, n=8)
    result, program, qdq, integer = _quantize(model, calib, wbits=wbits)
    # one int8 (int4) tensor of codes in each model, read by both layers
    assert len(_stored_weights(qdq)) == 1
    assert len(_stored_weights(integer)) == 1
    assert sum(n.op_type == "MatMulInteger" for n in integer.graph.node) == 2
    assert result.qdq.weight_bytes == (32 if wbits == 4 else 64)  # int4: two per byte
    assert next(r for r in result.graph.rewrites if r.name == "share_weights").changed
    report = bit_exactness(program, integer, calib)
    assert report["tensors"] > 0 and report["exact_tensors"] == report["tensors"]
    # the QDQ model computes the float simulation with the one quantized weight
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    w_dq = quantize_weight_per_channel(w, wbits, axis=1).dequantize()
    params = result.qdq.act_params
    for feeds in calib[:4]:
        x = fake_quantize(feeds["x"], params["x"])
        h = fake_quantize(np.maximum(x @ w_dq, 0).astype(np.float32), params["h"])
        want = fake_quantize((h @ w_dq).astype(np.float32), params["y"])
        got = _run(qdq, feeds)
        # float summation order differs between numpy and onnxruntime: one LSB at most
        assert np.abs(got - want).max() <= params["y"].scale * 1.001
    agreement = simulation_agreement(program, qdq, integer, calib)
    assert agreement["max_output_diff_lsb"] <= 2.0


def test_two_convs_reading_one_weight_and_bias_store_the_weight_once():
    rng = np.random.default_rng(1)
    model = _tied_convs(rng)
    calib = calibration((1, 4, 6, 6), rng, n=8)
    result, program, qdq, integer = _quantize(model, calib)
    assert len(_stored_weights(qdq)) == 1
    assert len(_stored_weights(integer)) == 1
    assert result.qdq.weight_bytes == 4 * 4 * 3 * 3
    # the shared float bias is quantized per layer, at that layer's own input scale
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    w_scales = quantize_weight_per_channel(
        onnx.numpy_helper.to_array(model.graph.initializer[0]), 8, axis=0
    ).scales
    params = result.qdq.act_params
    convs = [n for n in qdq.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    bias_scales = []
    for conv in convs:
        bias_dq = producer[conv.input[2]]
        data = producer[conv.input[0]]  # the input's DequantizeLinear
        s_x = float(inits[data.input[1]])
        np.testing.assert_allclose(inits[bias_dq.input[1]], w_scales * np.float32(s_x))
        bias_scales.append(bias_dq.input[1])
    assert len(set(bias_scales)) == 2 and params["x"].scale != params["h"].scale
    report = bit_exactness(program, integer, calib)
    assert report["tensors"] > 0 and report["exact_tensors"] == report["tensors"]
    agreement = simulation_agreement(program, qdq, integer, calib)
    assert agreement["max_output_diff_lsb"] <= 2.0


class _CodesPerLayer:
    """A stand-in for a compensated quantizer: each layer gets other codes (its weight
    scaled by a per-layer factor before rounding) and a bias correction."""

    def __init__(self, factors: dict[str, float]) -> None:
        self.factors = factors

    def weight_quant(self, layer_id: str, weight: np.ndarray, bits: int, axis: int) -> WeightQuant:
        return quantize_weight_per_channel(weight * self.factors[layer_id], bits, axis)

    def bias(self, layer_id: str, bits: int, bias: np.ndarray) -> np.ndarray:
        return (np.asarray(bias, np.float32) + np.float32(0.25)).astype(np.float32)


def test_readers_with_different_compensated_codes_take_the_first_readers():
    rng = np.random.default_rng(2)
    model = _tied_convs(rng)
    calib = calibration((1, 4, 6, 6), rng, n=6)
    graph = load_onnx(model, simplify=False)
    first, second = [n.name for n in graph.graph.nodes if n.op == "Conv"]
    weights = _CodesPerLayer({first: 1.0, second: 0.5})
    result, program, qdq, integer = _quantize(model, calib, weights=weights)
    assert len(_stored_weights(qdq)) == 1 and len(_stored_weights(integer)) == 1
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    codes = inits[_stored_weights(qdq)[0]]
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(codes, quantize_weight_per_channel(w, 8, 0).values)
    shared = next(r for r in result.graph.rewrites if r.name == "share_weights")
    assert [node for node, _ in shared.skipped] == [second]
    assert "bias correction" in shared.skipped[0][1]
    assert any(second in note for note in program.notes)
    # the first reader keeps its bias correction, the second does not
    producer = {o: n for n in qdq.graph.node for o in n.output}
    b = onnx.numpy_helper.to_array(model.graph.initializer[1])
    convs = [n for n in qdq.graph.node if n.op_type == "Conv"]
    for conv, shift in zip(convs, (0.25, 0.0), strict=True):
        dq = producer[conv.input[2]]
        restored = inits[dq.input[0]] * inits[dq.input[1]]
        np.testing.assert_allclose(restored, b + shift, atol=float(inits[dq.input[1]].max()))
    report = bit_exactness(program, integer, calib)
    assert report["tensors"] > 0 and report["exact_tensors"] == report["tensors"]
    assert simulation_agreement(program, qdq, integer, calib)["max_output_diff_lsb"] <= 2.0


def test_cortex_m_flash_counts_a_shared_weight_once():
    rng = np.random.default_rng(3)
    calib = calibration((1, 4, 6, 6), rng, n=4)
    _, program, _, _ = _quantize(_tied_convs(rng), calib)
    # codes once (144 B); an int32 bias, multiplier and an int8 shift per channel per layer
    assert program_weight_flash_bytes(program) == 144 + 2 * (4 * 4 + 5 * 4)


LSTM_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[6, 1, 8] x) => (float[6, 1, 1, 8] y) {
    y = LSTM <hidden_size = 8> (x, w, r, b)
}
"""


def test_an_unrolled_lstm_stores_its_weights_once():
    rng = np.random.default_rng(4)
    model = with_weights(
        LSTM_TEXT,
        w=rng.normal(size=(1, 32, 8)) * 0.4,
        r=rng.normal(size=(1, 32, 8)) * 0.4,
        b=rng.normal(size=(1, 64)) * 0.1,
    )
    calib = calibration((6, 1, 8), rng, n=6)
    result, program, qdq, integer = _quantize(model, calib)
    # 4 gates x (W, R): 8 stored weights for 6 steps x 8 MatMuls
    assert len(result.plan.layers) == 6 * 8
    assert len(_stored_weights(qdq)) == 8
    assert len(_stored_weights(integer)) == 8
    assert result.qdq.weight_bytes == 32 * 8 + 32 * 8
    report = bit_exactness(program, integer, calib)
    assert report["tensors"] > 0 and report["exact_tensors"] == report["tensors"]


def test_cortex_m_c_emits_a_shared_weight_once_and_runs_bit_exact(tmp_path):
    from dyadiq.backends.mcu.build import ToolchainError, find_toolchain
    from dyadiq.backends.mcu.emit_c import emit_c_project
    from tests.mcu_helpers import assert_bit_exact_on_qemu

    rng = np.random.default_rng(5)
    calib = calibration((1, 4, 6, 6), rng, n=4)
    _, program, _, _ = _quantize(_tied_convs(rng), calib)
    project = emit_c_project(program, tmp_path, cpu="cortex-m4")
    source = (tmp_path / "model.c").read_text()
    weight_arrays = re.findall(r"static const int8_t (op\d+_w)\[", source)
    assert len(weight_arrays) == 1  # both convolutions' params point at it
    assert source.count(f".data = {weight_arrays[0]}") == 2
    assert project.weight_flash_bytes == program_weight_flash_bytes(program)
    try:
        find_toolchain(need_qemu=True)
    except ToolchainError as exc:
        pytest.skip(str(exc))
    assert_bit_exact_on_qemu(project, program, calib)


def test_allocation_counts_a_shared_weight_once_in_size_and_flash():
    from dyadiq.passes.allocation import parse_budget, problem_from_report, solve
    from dyadiq.passes.sensitivity.report import LayerSensitivity, SensitivityReport
    from dyadiq.plan import LayerFormat

    rng = np.random.default_rng(6)
    graph = load_onnx(_tied_convs(rng), simplify=False)
    params = 4 * 4 * 3 * 3
    # a hand-made report, so the test pins the damage values
    layer = LayerSensitivity(
        "Conv", params, {4: 1.0, 8: 0.1}, empirical_damage={4: 0.1, 8: 0.01}, snr_db={4: 20.0}
    )
    readers = [n.name for n in graph.graph.nodes if n.op == "Conv"]
    report = SensitivityReport(dict.fromkeys(readers, layer), (), "logits", 0, 0.0, {})
    problem = problem_from_report(graph, report, [LayerFormat(b, 8) for b in (4, 8)], "empirical")
    assert [sorted(group) for group in problem.ties] == [sorted(readers)]
    # each reader's analysis perturbed the one shared weight: the group's damage counts once
    damages = sorted(problem.damage[r][LayerFormat(4, 8)] for r in readers)
    assert damages == [0.0, 0.1], damages
    w8 = LayerFormat(8, 8)
    # one stored copy of the 144 weights: bytes at W8 over both readers, not twice that
    assert sum(row[w8] for row in problem.size_bytes.values()) == params
    assert problem.flash is not None
    per_channel = problem.flash[readers[0]][w8] - params  # the first reader's own constants
    assert per_channel > 0
    assert sum(row[w8] for row in problem.flash.values()) == params + 2 * per_channel
    allocation = solve(problem, parse_budget("size=100", problem))  # 144 B at W8: too big
    assert {f.weight_bits for f in allocation.formats.values()} == {4}
    assert allocation.size_bytes == params / 2


def test_compensation_rounds_a_shared_weight_to_nearest_for_every_reader():
    from dyadiq.passes.compensation.settings import CompensationSettings

    rng = np.random.default_rng(7)
    model = _tied_convs(rng)
    calib = calibration((1, 4, 6, 6), rng, n=6)
    graph = load_onnx(model, simplify=False)
    first, second = [n.name for n in graph.graph.nodes if n.op == "Conv"]
    plan = PrecisionPlan.uniform(prepare_graph(graph), weight_bits=4)
    settings = CompensationSettings.parse("range,gptq,bias")
    result = quantize_graph(graph, plan, calib, compensation=settings)
    entries = result.weights.layers  # type: ignore[attr-defined]
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    nearest = quantize_weight_per_channel(w, 4, 0)
    for layer in (first, second):
        np.testing.assert_array_equal(entries[(layer, 4)].quant.values, nearest.values)
        assert entries[(layer, 4)].bias_shift is None
        assert "shared" in entries[(layer, 4)].report["declined"]["all"]
    shared = next(r for r in result.graph.rewrites if r.name == "share_weights")
    assert shared.changed == [second] and not shared.skipped  # one set of codes: none dropped
    program = integerize(
        result.graph, plan, result.sites, result.qdq.act_params, weights=result.weights
    )
    qdq, integer = export_qdq(result.qdq.graph), export_integer_onnx(program)
    assert len(_stored_weights(qdq)) == 1 and len(_stored_weights(integer)) == 1
    report = bit_exactness(program, integer, calib)
    assert report["tensors"] > 0 and report["exact_tensors"] == report["tensors"]
    assert simulation_agreement(program, qdq, integer, calib)["max_output_diff_lsb"] <= 2.0


def test_a_budget_runs_on_a_model_whose_layers_share_a_weight(tmp_path):
    """The sensitivity analysis feeds each weight as a graph input: two readers of one
    initializer declared it twice ("Duplicate definition-site" in onnxruntime), so --budget
    failed on captcha_crnn. Declared once, the analysis runs and the plan gives both readers
    one width."""
    from dyadiq import api

    rng = np.random.default_rng(8)
    calib = calibration((1, 4, 6, 6), rng, n=6)
    result = api.quantize(
        _tied_convs(rng),
        calib,
        validation=calibration((1, 4, 6, 6), rng, n=4),
        out=tmp_path / "out",
        budget="avg-wbits=6",
        evaluate=False,
    )
    widths = {fmt.weight_bits for fmt in result.plan.layers.values()}
    assert len(widths) == 1, result.plan.layers
