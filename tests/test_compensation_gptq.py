"""GPTQ, the clipping-scale search and bias correction on random linear layers."""

from __future__ import annotations

import numpy as np
import pytest

from dyadiq.passes.compensation.bias_correction import bias_correction
from dyadiq.passes.compensation.gptq import gptq_codes
from dyadiq.passes.compensation.input_statistics import InputStatistics, output_error
from dyadiq.passes.compensation.range_search import (
    max_abs_scales,
    round_to_grid,
    search_clipping_scales,
)


def _layer(rng: np.random.Generator, rows: int, columns: int, samples: int):
    """Weights [1, R, d] and correlated, non-centred inputs [1, P, d] with their statistics."""
    w = rng.normal(size=(1, rows, columns)).astype(np.float32)
    mixing = rng.normal(size=(columns, columns)) / np.sqrt(columns)
    x = (rng.normal(size=(samples, columns)) @ mixing + 0.3).astype(np.float32)[None]
    stats = InputStatistics(1, columns)
    stats.update(x)
    return w, x, stats


def _obq_reference(w: np.ndarray, h: np.ndarray, scales: np.ndarray, bits: int, damp: float):
    """Slow, literal OBQ in natural column order: quantize column j, spread its error with the
    inverse Hessian of the remaining columns, then remove j from that inverse (Schur)."""
    qmax = 2 ** (bits - 1) - 1
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    h_inv = np.linalg.inv(h)
    codes = np.zeros_like(w)
    for j in range(w.shape[1]):
        q = np.clip(np.round(w[:, j] / scales), -qmax, qmax)
        codes[:, j] = q
        error = (w[:, j] - q * scales) / h_inv[j, j]
        w[:, j + 1 :] -= np.outer(error, h_inv[j, j + 1 :])
        h_inv -= np.outer(h_inv[:, j], h_inv[j, :]) / h_inv[j, j]
    return codes


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_round_to_nearest_on_output_error(bits: int) -> None:
    rng = np.random.default_rng(0)
    w, x, stats = _layer(rng, rows=32, columns=64, samples=2048)
    scales = max_abs_scales(w, bits)
    rtn = round_to_grid(w, scales, bits) * scales[..., None]
    gptq = gptq_codes(w, stats.hessian, scales, bits) * scales[..., None]
    rtn_error = np.mean(((w - rtn)[0] @ x[0].T) ** 2)
    gptq_error = np.mean(((w - gptq)[0] @ x[0].T) ** 2)
    assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)
    # the Hessian form is the same quantity as the error measured on the inputs
    assert np.isclose(output_error(w - gptq, stats.hessian).sum() / 32, gptq_error, rtol=1e-4)


def test_gptq_matches_the_literal_obq_reference() -> None:
    rng = np.random.default_rng(1)
    w, _, stats = _layer(rng, rows=8, columns=40, samples=512)
    scales = max_abs_scales(w, 4)
    # small blocks exercise the lazy updates across block boundaries
    fast = gptq_codes(w, stats.hessian, scales, 4, block=7, damp=0.01, act_order=False)
    slow = _obq_reference(w[0], stats.hessian[0], scales[0].astype(np.float64), 4, damp=0.01)
    assert np.array_equal(fast[0], slow)


def test_gptq_groups_run_independently() -> None:
    """A depthwise-like layer: each group's result equals GPTQ on that group alone."""
    rng = np.random.default_rng(2)
    layers = [_layer(rng, rows=1, columns=9, samples=256) for _ in range(5)]
    w = np.concatenate([lw for lw, _, _ in layers])
    h = np.concatenate([s.hessian for _, _, s in layers])
    scales = max_abs_scales(w, 3)
    together = gptq_codes(w, h, scales, 3)
    for g in range(5):
        alone = gptq_codes(w[g : g + 1], h[g : g + 1], scales[g : g + 1], 3)
        assert np.array_equal(together[g], alone[0])


def test_gptq_handles_a_minilm_sized_matmul() -> None:
    """MiniLM's FFN-down shape (384 rows of 1536 inputs): valid 4-bit codes that beat round to
    nearest. How long it takes is measured in benchmarks/compensation.py, not here."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(1, 384, 1536)).astype(np.float32)
    x = rng.normal(size=(1, 2048, 1536)).astype(np.float32)
    stats = InputStatistics(1, 1536)
    stats.update(x)
    scales = max_abs_scales(w, 4)
    codes = gptq_codes(w, stats.hessian, scales, 4)
    assert codes.shape == w.shape and np.abs(codes).max() <= 7
    rtn = round_to_grid(w, scales, 4) * scales[..., None]
    gptq = codes * scales[..., None]
    assert output_error(w - gptq, stats.hessian).sum() < output_error(w - rtn, stats.hessian).sum()


def test_range_search_never_worse_than_max_abs() -> None:
    rng = np.random.default_rng(4)
    w, _, stats = _layer(rng, rows=16, columns=32, samples=1024)
    w[0, :, 0] *= 6  # outliers: clipping them pays
    for bits in (2, 3, 4):
        base = max_abs_scales(w, bits)
        searched = search_clipping_scales(w, bits, stats.hessian)
        err = [
            output_error(w - round_to_grid(w, s, bits) * s[..., None], stats.hessian)
            for s in (base, searched)
        ]
        assert np.all(err[1] <= err[0] + 1e-9)
        assert err[1].sum() < err[0].sum()


def test_bias_correction_zeroes_the_mean_output_error() -> None:
    rng = np.random.default_rng(5)
    w, x, stats = _layer(rng, rows=16, columns=24, samples=4096)
    scales = max_abs_scales(w, 3)
    q = round_to_grid(w, scales, 3) * scales[..., None]
    shift = bias_correction(w, q, stats.mean)
    error = x[0].astype(np.float64) @ (w - q)[0].T.astype(np.float64)  # [P, R]
    assert np.abs(error.mean(axis=0)).max() > 1e-2  # there was a mean error to remove
    np.testing.assert_allclose((error - shift).mean(axis=0), 0.0, atol=1e-9)


def test_gptq_survives_hessians_that_defeat_its_dampening():
    """Huge, nearly collinear inputs (a model outside the zoo made the Cholesky fail) get more
    dampening; a Hessian that is not finite falls back to its diagonal, for which GPTQ is
    rounding to nearest. Neither raises."""
    rng = np.random.default_rng(40)
    d = 24
    w = rng.normal(size=(1, 6, d))
    scales = np.abs(w).max(axis=2) / 7
    x = np.repeat(rng.normal(size=(200, 1)) * 1e6, d, axis=1)  # every input the same: rank 1
    h = (x.T @ x)[None]
    codes = gptq_codes(w, h, scales, 4, damp=0.0)
    assert np.isfinite(codes).all() and np.abs(codes).max() <= 7
    broken = h.copy()
    broken[0, 3, 5] = np.nan
    rtn = np.clip(np.round(w / scales[..., None]), -7, 7)
    assert np.array_equal(gptq_codes(w, broken, scales, 4), rtn)
