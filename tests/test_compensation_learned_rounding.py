"""Learned rounding (AdaRound): analytic gradient, and the codes it learns on a random layer."""

from __future__ import annotations

import numpy as np
import pytest

from dyadiq.passes.compensation.learned_rounding import (
    learn_rounding,
    loss_and_gradient,
    rounding_problem,
)
from dyadiq.passes.compensation.range_search import max_abs_scales, round_to_grid


def _layer(rng: np.random.Generator, rows: int = 12, columns: int = 24, bits: int = 3):
    """A random linear layer [1, R, d] whose inputs are correlated (rounding errors interact)."""
    mixing = rng.normal(size=(columns, columns))
    x = rng.normal(size=(256, columns)) @ mixing
    hessian = (x.T @ x / len(x))[None]
    w = rng.normal(size=(1, rows, columns)).astype(np.float32)
    scales = max_abs_scales(w, bits)
    return w, scales, hessian, round_to_grid(w, scales, bits)


@pytest.mark.parametrize("beta", [None, 8.0])
def test_the_analytic_gradient_matches_finite_differences(beta) -> None:
    rng = np.random.default_rng(0)
    w, scales, hessian, codes = _layer(rng, rows=3, columns=5)
    problem = rounding_problem(w, codes, scales, hessian, 3)
    v = rng.normal(size=w.shape) * 0.8
    _, grad = loss_and_gradient(problem, v, 0.5, beta)
    step = 1e-6
    numeric = np.zeros_like(v)
    for index in np.ndindex(v.shape):
        up, down = v.copy(), v.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (
            loss_and_gradient(problem, up, 0.5, beta)[0]
            - loss_and_gradient(problem, down, 0.5, beta)[0]
        ) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-7)


def test_learned_codes_beat_rounding_to_nearest_and_stay_on_floor_or_ceiling() -> None:
    rng = np.random.default_rng(1)
    w, scales, hessian, nearest = _layer(rng)
    codes, improved = learn_rounding(w, nearest, scales, hessian, 3)
    problem = rounding_problem(w, nearest, scales, hessian, 3)
    before = problem.row_errors(nearest.astype(np.float64))
    after = problem.row_errors(codes)
    assert np.all(after <= before)  # per row never worse than its start
    assert improved > 0 and after.sum() < 0.6 * before.sum()  # measured: 0.43
    ratio = w / scales[..., None]
    assert np.all((codes == np.floor(ratio)) | (codes == np.ceil(ratio)) | (np.abs(codes) == 3))


def test_adaround_through_the_pipeline_lowers_the_error_and_stays_bit_exact() -> None:
    from dyadiq.backends.onnx.integer import export_integer_onnx
    from dyadiq.consistency import bit_exactness
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.compensation.settings import CompensationSettings
    from dyadiq.passes.integerize import integerize
    from dyadiq.pipeline import quantize_graph
    from dyadiq.plan import PrecisionPlan
    from tests.builders import calibration, conv_relu_pool_fc

    rng = np.random.default_rng(4)
    graph = load_onnx(conv_relu_pool_fc(rng))
    calib = calibration((1, 3, 8, 8), rng, n=12)
    plan = PrecisionPlan.uniform(graph, weight_bits=3)
    settings = CompensationSettings.parse("range,gptq,adaround,bias")
    result = quantize_graph(graph, plan, calib, compensation=settings)
    for entry in result.compensation["layers"].values():
        layer = entry["3"]
        assert layer["passes"] == ["range", "gptq", "adaround", "bias"]
        assert layer["error_after_adaround"] <= layer["error_after_gptq"] + 1e-12
    program = integerize(
        result.graph, plan, result.sites, result.qdq.act_params, weights=result.weights
    )
    report = bit_exactness(program, export_integer_onnx(program), calib)
    assert report["exact_tensors"] == report["tensors"] > 0, report["mismatches"]
