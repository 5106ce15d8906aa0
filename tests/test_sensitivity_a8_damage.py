"""Empirical damage measured on top of the A8 model (``activation_quant``): each layer's loss
with its weights at b bits and every activation site fake-quantized, less the loss of the A8
model with float weights, both against the float model's output."""

from __future__ import annotations

import numpy as np

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.sensitivity.analysis import (
    SensitivityConfig,
    analyze,
    analyze_cached,
    quantized_weight,
)
from dyadiq.passes.sensitivity.perturbable_model import (
    OutputKind,
    PerturbableModel,
    log_softmax,
)
from dyadiq.quantizers import ActQuant, activation_quant
from tests.builders import with_weights
from tests.test_sensitivity import MLP

CONFIG = SensitivityConfig(
    weight_bits=(2, 4), trace=False, pairs=False, entropy=False, activations=False
)


def _setup():
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(5, 6)).astype(np.float32)
    w2 = rng.normal(size=(3, 5)).astype(np.float32)
    # four batches of 8 rows: stacked 16 rows per run, equal batches, so the mean over
    # batches is the mean over rows
    xs = [rng.normal(size=(8, 6)).astype(np.float32) for _ in range(4)]
    graph = load_onnx(with_weights(MLP, w1=w1, w2=w2), simplify=False)
    # 8-bit quantizers that clip h at a third of its range: the A8 model's own loss is far
    # from zero, so subtracting it matters
    h_max = max(float(np.maximum(x @ w1.T, 0).max()) for x in xs)
    lo, hi = min(float(x.min()) for x in xs), max(float(x.max()) for x in xs)
    quant = {
        "x": activation_quant(lo, hi, 8, signed=False),
        "h": activation_quant(0.0, h_max / 3, 8, signed=False),
    }
    return graph, w1, w2, xs, quant


def _fake_quant(t: np.ndarray, q: ActQuant) -> np.ndarray:
    codes = np.clip(np.round(t / np.float32(q.scale)) + q.zero_point, q.qmin, q.qmax)
    return ((codes - q.zero_point) * np.float32(q.scale)).astype(np.float32)


def _kl(reference: np.ndarray, output: np.ndarray) -> np.ndarray:
    log_p = log_softmax(reference.astype(np.float64))
    log_q = log_softmax(output.astype(np.float64))
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def test_a8_damage_is_the_a8_models_loss_less_its_float_weight_baseline():
    graph, w1, w2, xs, quant = _setup()
    report = analyze(
        graph, [{"x": x} for x in xs], OutputKind.LOGITS, CONFIG, activation_quant=quant
    )
    by_weight = {"w1": None, "w2": None}
    model = PerturbableModel(graph, [{"x": x} for x in xs[:1]], OutputKind.LOGITS)
    for layer, name in model.weight_input.items():
        by_weight[name] = layer

    def a8(v1: np.ndarray, v2: np.ndarray, x: np.ndarray) -> np.ndarray:
        h = np.maximum(_fake_quant(x, quant["x"]) @ v1.T, 0)
        return _fake_quant(h, quant["h"]) @ v2.T

    float_out = [np.maximum(x @ w1.T, 0) @ w2.T for x in xs]
    baseline = np.mean([_kl(f, a8(w1, w2, x)) for f, x in zip(float_out, xs, strict=True)])
    assert baseline > 1e-3  # the A8 model alone loses something: the subtraction matters
    for bits in (2, 4):
        q1 = quantized_weight(graph, by_weight["w1"], bits)
        q2 = quantized_weight(graph, by_weight["w2"], bits)
        for layer, (v1, v2) in ((by_weight["w1"], (q1, w2)), (by_weight["w2"], (w1, q2))):
            loss = np.mean([_kl(f, a8(v1, v2, x)) for f, x in zip(float_out, xs, strict=True)])
            measured = report.layers[layer].empirical_damage[bits]
            np.testing.assert_allclose(measured, loss - baseline, rtol=1e-4, atol=1e-6)
    assert any("A8 baseline loss" in note for note in report.notes)


def test_a8_damage_differs_from_float_damage_and_has_its_own_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path))
    graph, _, _, xs, quant = _setup()
    batches = [{"x": x} for x in xs]
    plain, cached = analyze_cached(graph, batches, OutputKind.LOGITS, CONFIG)
    assert not cached
    a8, cached = analyze_cached(graph, batches, OutputKind.LOGITS, CONFIG, activation_quant=quant)
    assert not cached and a8.fingerprint != plain.fingerprint
    layer = next(iter(plain.layers))
    assert a8.layers[layer].empirical_damage != plain.layers[layer].empirical_damage
    again, cached = analyze_cached(
        graph, batches, OutputKind.LOGITS, CONFIG, activation_quant=quant
    )
    assert cached and again.layers[layer].empirical_damage == a8.layers[layer].empirical_damage
    other = {**quant, "h": activation_quant(0.0, 1.0, 8, signed=False)}
    _, cached = analyze_cached(graph, batches, OutputKind.LOGITS, CONFIG, activation_quant=other)
    assert not cached  # other activation quantizers: other damage, never the cached one


def test_the_a8_model_with_float_weights_has_zero_damage():
    graph, _, _, xs, quant = _setup()
    model = PerturbableModel(
        graph, [{"x": x} for x in xs], OutputKind.LOGITS, activation_quant=quant
    )
    assert model.baseline_loss > 0
    assert abs(model.loss({})) < 1e-9
    rebuilt = PerturbableModel.from_spec(model.spec())
    assert abs(rebuilt.loss({})) < 1e-9


def test_quantize_a8_damage_prices_the_plan_on_the_a8_model(tiny_cnn_path, tmp_path, monkeypatch):
    """--a8-damage (SearchOptions.a8_damage) reaches the analysis: another cached report,
    whose notes say it was measured on top of the quantized activations."""
    from conftest import TINY_INPUT_SHAPE, random_batches

    import dyadiq
    from dyadiq.api import SearchOptions
    from dyadiq.cli import build_parser
    from dyadiq.cli.allocation import search_options
    from dyadiq.passes.sensitivity import cache

    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "cache"))
    batches = random_batches({"x": TINY_INPUT_SHAPE}, 4)
    made = {}
    for a8 in (False, True):
        search = SearchOptions(wbits_candidates=(2, 8), analysis_samples=2, a8_damage=a8)
        made[a8] = dyadiq.quantize(
            tiny_cnn_path, batches, budget="avg-wbits=5", search=search, compensate="none"
        )
    keys = {a8: m.allocation.info["sensitivity_fingerprint"] for a8, m in made.items()}
    assert keys[True] != keys[False]
    report = cache.load(keys[True])
    assert report is not None and any("A8 baseline loss" in n for n in report.notes)
    args = build_parser().parse_args(["quantize", "m.onnx", "-o", "OUT", "--a8-damage"])
    assert search_options(args).a8_damage and not SearchOptions().a8_damage
