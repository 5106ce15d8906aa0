"""Sensitivity analysis: estimators against closed-form Gauss-Newton matrices, and the pass."""

from __future__ import annotations

import numpy as np
import pytest

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.sensitivity.analysis import (
    PROXIES,
    SensitivityConfig,
    SensitivityReport,
    analyze,
    predict_damage,
)
from dyadiq.passes.sensitivity.estimators import hutchinson_trace, power_iteration
from dyadiq.passes.sensitivity.perturbable_model import OutputKind, PerturbableModel, softmax
from dyadiq.passes.sensitivity.report import SCHEMA_VERSION
from tests.builders import with_weights

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[8, 6] x) => (float[8, 3] y) {
    a = Gemm <transB = 1> (x, w1)
    h = Relu (a)
    y = Gemm <transB = 1> (h, w2)
}
"""


def _mlp(rng):
    w1 = rng.normal(size=(5, 6)).astype(np.float32)
    w2 = rng.normal(size=(3, 5)).astype(np.float32)
    return with_weights(MLP, w1=w1, w2=w2), w1, w2


def _exact_gauss_newton(w1, w2, xs):
    """Mean over rows of J^T (diag(p) - p p^T) J for both layers, in float64."""
    blocks = {"w1": np.zeros((30, 30)), "w2": np.zeros((15, 15))}
    rows = 0
    for x in xs:
        for xr in x.astype(np.float64):
            a = w1 @ xr
            h = np.maximum(a, 0)
            p = softmax((w2 @ h)[None])[0]
            hess = np.diag(p) - np.outer(p, p)
            # z = W2 relu(W1 x): dz_r/dW2[k, j] = [r == k] h_j;
            # dz_r/dW1[i, j] = W2[r, i] 1[a_i > 0] x_j
            j2 = np.zeros((3, 15))
            for r in range(3):
                j2[r, r * 5 : (r + 1) * 5] = h
            j1 = (w2 * (a > 0))[:, :, None] * xr[None, None, :]
            j1 = j1.reshape(3, 30)
            blocks["w1"] += j1.T @ hess @ j1
            blocks["w2"] += j2.T @ hess @ j2
            rows += 1
    return {k: v / rows for k, v in blocks.items()}


def test_hutchinson_trace_matches_the_closed_form_gauss_newton_trace():
    rng = np.random.default_rng(0)
    model, w1, w2 = _mlp(rng)
    xs = [rng.normal(size=(8, 6)).astype(np.float32) for _ in range(4)]
    exact = _exact_gauss_newton(w1, w2, xs)
    graph = load_onnx(model, simplify=False)
    perturbable = PerturbableModel(graph, [{"x": x} for x in xs], OutputKind.LOGITS)
    ids = {perturbable.weight_input[k]: k for k in perturbable.weights}
    for name, fisher in exact.items():
        layer = ids[name]
        shape = perturbable.weights[layer].shape
        estimate = hutchinson_trace(
            lambda v, layer=layer: perturbable.fisher_quadratic_form(layer, v, 1e-3),
            shape,
            rng=np.random.default_rng(1),
            max_iters=400,
            min_iters=50,
            rtol=0.02,
        )
        truth = float(np.trace(fisher))
        # within three reported standard errors (plus 0.5% for the finite difference)
        assert abs(estimate.mean - truth) <= 3 * estimate.stderr + 0.005 * truth, (
            name,
            estimate,
            truth,
        )


def test_power_iteration_finds_the_top_eigenvalue_within_one_percent():
    rng = np.random.default_rng(2)
    _, w1, w2 = _mlp(rng)
    xs = [rng.normal(size=(8, 6)) for _ in range(4)]
    for fisher in _exact_gauss_newton(w1, w2, xs).values():
        estimate = power_iteration(
            lambda v, f=fisher: f @ v.reshape(-1),
            (fisher.shape[0],),
            rng=np.random.default_rng(3),
            max_iters=500,
            rtol=1e-6,
        )
        truth = float(np.linalg.eigvalsh(fisher).max())
        assert abs(estimate.mean - truth) <= 0.01 * truth


def test_analysis_report_is_consistent_and_round_trips():
    rng = np.random.default_rng(4)
    model, _, _ = _mlp(rng)
    graph = load_onnx(model, simplify=False)
    batches = [{"x": rng.normal(size=(8, 6)).astype(np.float32)} for _ in range(4)]
    config = SensitivityConfig(
        weight_bits=(2, 4, 8), hutchinson_max_iters=32, gradients=True, pairs=True
    )
    report = analyze(graph, batches, OutputKind.LOGITS, config)
    assert report.reverse_passes > 0 and not report.notes
    assert set(report.layers) == {n.name for n in graph.weighted_layers()}
    # two layers: one pair, measured at each width pair of pair_bits (2, 3, 4) & (2, 4, 8)
    assert {(p.bits_a, p.bits_b) for p in report.pairs} == {(2, 2), (2, 4), (4, 2), (4, 4)}
    for term in report.pairs:
        assert term.stderr > 0
        assert term.single_a == report.layers[term.a].empirical_damage[term.bits_a]
    for layer in report.layers.values():
        # fewer bits, more damage, measured and predicted
        assert layer.empirical_damage[2] > layer.empirical_damage[4] > layer.empirical_damage[8]
        assert layer.hessian_damage[2] > layer.hessian_damage[4] > layer.hessian_damage[8]
        assert layer.snr_db[8] > layer.snr_db[4] > layer.snr_db[2]
        assert layer.trace is not None and layer.trace.mean > 0
        assert layer.top_eigenvalue is not None
        # the top eigenvalue bounds the average eigenvalue from above
        assert layer.top_eigenvalue.mean >= layer.trace.mean
        for proxy in ("eigen_damage", "fisher_damage", "taylor_damage", "entropy_damage"):
            damage = getattr(layer, proxy)
            assert damage[2] > damage[8] >= 0, proxy
        assert layer.entropy is not None and 0 < layer.entropy <= 8
    # activation sites: the input x feeds the first Gemm, h the second; 4 bits hurt more
    assert {a.tensor: a.consumers for a in report.activations.values()} == {
        "x": ("Gemm_0",),
        "h": ("Gemm_2",),
    }
    for layer_id, site in (("Gemm_0", "x"), ("Gemm_2", "h")):
        layer = report.layers[layer_id]
        assert layer.input_activation == site
        assert layer.activation_damage[4] > layer.activation_damage[8] > 0
    again = SensitivityReport.from_json(report.to_json())
    assert again.to_json() == report.to_json()
    low = dict.fromkeys(report.layers, 2)
    high = dict.fromkeys(report.layers, 8)
    for proxy in PROXIES:
        assert predict_damage(report, low, proxy) > predict_damage(report, high, proxy)
    with pytest.raises(ValueError, match="unknown proxy"):
        predict_damage(report, low, "astrology")


def test_empirical_damage_of_a_quadratic_regime_matches_the_hessian_prediction():
    """At 8 bits the perturbation is small: 1/2 Tr/n ||dW||^2 predicts the measured KL."""
    rng = np.random.default_rng(5)
    model, _, _ = _mlp(rng)
    graph = load_onnx(model, simplify=False)
    batches = [{"x": rng.normal(size=(8, 6)).astype(np.float32)} for _ in range(8)]
    config = SensitivityConfig(weight_bits=(6, 8), hutchinson_max_iters=200, pairs=False)
    report = analyze(graph, batches, OutputKind.LOGITS, config)
    for layer in report.layers.values():
        ratio = layer.hessian_damage[8] / layer.empirical_damage[8]
        assert 0.2 < ratio < 5  # same order: the isotropic trace model, not the exact form


def test_cli_analyze_writes_a_report_and_reruns_from_the_cache(tmp_path, monkeypatch, capsys):
    import json

    import onnx

    from dyadiq.cli import main

    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(6)
    model, _, _ = _mlp(rng)
    (tmp_path / "m").mkdir()
    onnx.save(model, str(tmp_path / "m" / "mlp.onnx"))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(3):
        np.savez(calib / f"{i}.npz", x=rng.normal(size=(8, 6)).astype(np.float32))
    args = ["analyze", str(tmp_path / "m" / "mlp.onnx"), "--calib", str(calib), "-o"]
    assert main([*args, str(tmp_path / "a"), "--wbits", "2,8"]) == 0
    first = json.loads((tmp_path / "a" / "sensitivity.json").read_text())
    assert first["output_kind"] == "logits" and len(first["layers"]) == 2
    assert first["forward_passes"] > 0 and first["fingerprint"]
    capsys.readouterr()
    assert main([*args, str(tmp_path / "b"), "--wbits", "2,8"]) == 0
    assert "cached" in capsys.readouterr().out
    second = json.loads((tmp_path / "b" / "sensitivity.json").read_text())
    assert second == first
    # other settings are another cache entry
    assert main([*args, str(tmp_path / "c"), "--wbits", "4,8", "--no-pairs", "--gradients"]) == 0
    third = json.loads((tmp_path / "c" / "sensitivity.json").read_text())
    assert third["fingerprint"] != first["fingerprint"] and third["pairs"] == []
    assert third["reverse_passes"] > 0 and first["reverse_passes"] == 0
    for layer in third["layers"].values():
        assert layer["top_eigenvalue"]["mean"] > 0 and set(layer["taylor_damage"]) == {"4", "8"}


def test_a_cached_report_of_an_older_schema_is_recomputed(tmp_path, monkeypatch):
    import json

    from dyadiq.passes.sensitivity import cache
    from dyadiq.passes.sensitivity.analysis import analyze_cached

    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(8)
    model, _, _ = _mlp(rng)
    graph = load_onnx(model, simplify=False)
    batches = [{"x": rng.normal(size=(8, 6)).astype(np.float32)} for _ in range(2)]
    config = SensitivityConfig(weight_bits=(4, 8), hutchinson_max_iters=8, pairs=False)
    report, cached = analyze_cached(graph, batches, OutputKind.LOGITS, config)
    assert not cached
    path = cache.cache_dir() / f"{report.fingerprint}.json"
    old = json.loads(path.read_text())
    del old["schema_version"], old["activations"]  # what a schema-1 report lacked
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="schema 1"):
        SensitivityReport.from_json(old)
    again, cached = analyze_cached(graph, batches, OutputKind.LOGITS, config)
    assert not cached and again.to_json() == report.to_json() | {"seconds": again.seconds}
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


def test_output_kind_detection():
    from dyadiq.passes.sensitivity.analysis import detect_output_kind

    rng = np.random.default_rng(7)
    logits = rng.normal(size=(4, 10))
    assert detect_output_kind([logits]) is OutputKind.LOGITS
    assert detect_output_kind([softmax(logits)]) is OutputKind.PROBABILITIES
    emb = rng.normal(size=(2, 384))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    assert detect_output_kind([emb]) is OutputKind.EMBEDDING
