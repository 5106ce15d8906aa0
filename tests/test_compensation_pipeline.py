"""The compensated quantizer through the tool: QDQ, integer model, analysis cache, CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from dyadiq.backends.onnx.integer import export_integer_onnx
from dyadiq.consistency import bit_exactness
from dyadiq.errors import ConfigError
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.compensation.segment_runner import SegmentRunner
from dyadiq.passes.compensation.settings import CompensationPass, CompensationSettings
from dyadiq.passes.integerize import integerize
from dyadiq.passes.sensitivity.analysis import SensitivityConfig, analyze_cached
from dyadiq.passes.sensitivity.perturbable_model import OutputKind
from dyadiq.pipeline import PlanBuilder, quantize_graph
from dyadiq.plan import LayerFormat, PrecisionPlan
from tests.builders import calibration, conv_relu_pool_fc, with_weights

ALL = CompensationSettings.parse("range,gptq,bias")


def depthwise_pointwise_matmul(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> Relu -> depthwise Conv -> Clip -> pointwise Conv -> Flatten -> MatMul + Add."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 8, 8] x) => (float[1, 5] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        d = Conv <group = 6, pads = [1, 1, 1, 1], strides = [2, 2]> (r, wd, bd)
        lo = Constant <value = float {0.0}> ()
        hi = Constant <value = float {6.0}> ()
        c = Clip (d, lo, hi)
        p = Conv (c, wp, bp)
        f = Flatten (p)
        m = MatMul (f, wm)
        y = Add (m, bm)
    }
    """
    return with_weights(
        text,
        w1=rng.normal(size=(6, 3, 3, 3)) * 0.4,
        b1=rng.normal(size=6) * 0.1,
        wd=rng.normal(size=(6, 1, 3, 3)) * 0.5,
        bd=rng.normal(size=6) * 0.1,
        wp=rng.normal(size=(4, 6, 1, 1)) * 0.5,
        bp=rng.normal(size=4) * 0.1,
        wm=rng.normal(size=(64, 5)) * 0.2,
        bm=rng.normal(size=5) * 0.1,
    )


# 5 and 7 bits: widths the ILP may pick by default (--wbits-candidates 2,3,4,5,6,7,8)
@pytest.mark.parametrize("wbits", [7, 5, 4, 3])
@pytest.mark.parametrize("builder", [conv_relu_pool_fc, depthwise_pointwise_matmul])
def test_integer_model_from_compensated_weights_is_bit_exact(builder, wbits: int) -> None:
    rng = np.random.default_rng(wbits)
    model = builder(rng)
    calib = calibration((1, 3, 8, 8), rng, n=12)
    graph = load_onnx(model)
    plan = PrecisionPlan.uniform(graph, weight_bits=wbits)
    result = quantize_graph(graph, plan, calib, compensation=ALL)
    compensated = result.weights
    program = integerize(
        result.graph, plan, result.sites, result.qdq.act_params, weights=compensated
    )
    # every weighted op holds codes of the plan's width (5 and 7 bits in int8 containers)
    weighted = [op for op in program.ops if getattr(op, "weight_bits", None) is not None]
    assert weighted and all(op.weight_bits == wbits for op in weighted)
    assert all(np.abs(op.weight).max() <= 2 ** (wbits - 1) for op in weighted)
    int_model = export_integer_onnx(program)
    report = bit_exactness(program, int_model, calib)
    assert report["tensors"] > 0
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]
    # the integer model really carries the compensated codes, not round-to-nearest ones
    layers = result.compensation["layers"]
    assert set(layers) == set(plan.layers)
    for entry in layers.values():
        assert entry[str(wbits)]["passes"] == ["range", "gptq", "bias"]
        assert entry[str(wbits)]["error_after_bias"] <= entry[str(wbits)]["error_round_to_nearest"]


def test_compensation_lowers_the_output_error_of_the_qdq_model() -> None:
    rng = np.random.default_rng(7)
    model = depthwise_pointwise_matmul(rng)
    calib = calibration((1, 3, 8, 8), rng, n=16)
    graph = load_onnx(model)
    float_out = [_run(model, b) for b in calib]
    errors = {}
    for label in ("none", "range,gptq,bias"):
        builder = PlanBuilder(graph, calib, compensation=CompensationSettings.parse(label))
        qdq = builder.build(PrecisionPlan.uniform(builder.graph, weight_bits=3))
        errors[label] = np.mean(
            [np.mean((_run(qdq, b) - f) ** 2) for b, f in zip(calib, float_out, strict=True)]
        )
    assert errors["range,gptq,bias"] < errors["none"]


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return _session(model).run(None, feeds)[0]


def test_segment_runner_matches_the_whole_model() -> None:
    rng = np.random.default_rng(8)
    model = depthwise_pointwise_matmul(rng)
    calib = calibration((1, 3, 8, 8), rng, n=3)
    graph = load_onnx(model)
    targets = [n.inputs[0].name for n in graph.weighted_layers()]
    runner = SegmentRunner(graph.to_onnx(), targets)
    full = graph.to_onnx()
    full.graph.output.extend(
        onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
        for t in targets
        if t != "x"
    )
    session = _session(full)
    for position, target in enumerate(targets):
        got = runner.values(position, calib, {})
        for batch, value in zip(calib, got, strict=True):
            expected = batch["x"] if target == "x" else session.run([target], batch)[0]
            np.testing.assert_array_equal(value, expected)  # the same kernels, unfused


def test_analysis_cache_keys_on_the_compensation(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path))
    rng = np.random.default_rng(9)
    calib = calibration((1, 3, 8, 8), rng, n=4)
    graph = load_onnx(conv_relu_pool_fc(rng))
    config = SensitivityConfig(
        weight_bits=(3, 8), trace=False, pairs=False, entropy=False, activations=False
    )
    builders = {
        label: PlanBuilder(graph, calib, compensation=CompensationSettings.parse(label))
        for label in ("none", "gptq", "range,gptq,bias")
    }
    reports = {}
    for label, builder in builders.items():
        weights = builder.compensator.ensure((3, 8))
        report, cached = analyze_cached(
            builder.graph, calib, OutputKind.LOGITS, config, weights=weights
        )
        assert not cached
        reports[label] = report
    assert len({r.fingerprint for r in reports.values()}) == 3
    again, cached = analyze_cached(
        builders["gptq"].graph,
        calib,
        OutputKind.LOGITS,
        config,
        weights=builders["gptq"].compensator.result,
    )
    assert cached and again.fingerprint == reports["gptq"].fingerprint
    # the analysis priced the compensated weights: less damage at 3 bits than round to nearest
    plain = sum(lay.empirical_damage[3] for lay in reports["none"].layers.values())
    compensated = sum(lay.empirical_damage[3] for lay in reports["range,gptq,bias"].layers.values())
    assert compensated < plain


def test_mixed_plan_uses_each_layers_own_width() -> None:
    rng = np.random.default_rng(10)
    calib = calibration((1, 3, 8, 8), rng, n=8)
    graph = load_onnx(conv_relu_pool_fc(rng))
    builder = PlanBuilder(graph, calib, compensation=ALL)
    conv, gemm = (n.name for n in builder.graph.weighted_layers())
    builder.build(PrecisionPlan({conv: LayerFormat(3, 8), gemm: LayerFormat(6, 8)}))
    assert set(builder.compensator.result.seconds) == {3, 6}
    assert (conv, 3) in builder.compensator.result.layers
    assert (gemm, 6) in builder.compensator.result.layers


def test_settings_parse() -> None:
    assert CompensationSettings.parse("none").passes == frozenset()
    # learned rounding is opt-in: not in `all`
    every = frozenset(CompensationPass) - {CompensationPass.ADAROUND}
    assert CompensationSettings.parse("all").passes == every
    assert CompensationSettings.parse("gptq,adaround").label == "gptq,adaround"
    assert CompensationSettings.parse("gptq, bias").label == "gptq,bias"
    with pytest.raises(ConfigError, match="--compensate"):
        CompensationSettings.parse("gptq,brecq")


def test_layers_too_wide_for_a_bounded_hessian_are_compensated_without_one(monkeypatch) -> None:
    """VGG19's 25088-input classifier needs a 4.7 GiB H and was killed for memory: layers over
    MAX_HESSIAN_COLUMNS inputs keep a weight-MSE range search, GPTQ and bias correction are
    declined with the reason, and the layers after them are still compensated."""
    from dyadiq.passes.compensation import sequential

    monkeypatch.setattr(sequential, "MAX_HESSIAN_COLUMNS", 40)  # conv: 27 inputs, Gemm: 64
    rng = np.random.default_rng(7)
    calib = calibration((1, 3, 8, 8), rng, n=12)
    graph = load_onnx(conv_relu_pool_fc(rng))
    plan = PrecisionPlan.uniform(graph, weight_bits=4)
    result = quantize_graph(graph, plan, calib, compensation=ALL)
    program = integerize(
        result.graph, plan, result.sites, result.qdq.act_params, weights=result.weights
    )
    report = bit_exactness(program, export_integer_onnx(program), calib)
    assert report["exact_tensors"] == report["tensors"]
    entries = [entry["4"] for entry in result.compensation["layers"].values()]
    wide = [e for e in entries if "gptq" not in e["passes"]]
    assert len(wide) == 1 and "64 inputs per channel" in str(wide[0])
    assert any("gptq" in e["passes"] for e in entries)  # the narrower conv still gets GPTQ
