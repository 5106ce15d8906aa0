"""Rounding refinement: never worse than its start, a local optimum of its search space (each
code on the floor or ceiling of w / s), nearer the exhaustive optimum than GPTQ on small layers."""

from __future__ import annotations

import itertools

import numpy as np

from dyadiq.passes.compensation.gptq import gptq_codes
from dyadiq.passes.compensation.input_statistics import output_error
from dyadiq.passes.compensation.range_search import max_abs_scales, round_to_grid
from dyadiq.passes.compensation.rounding_refinement import refine_rounding


def _layer(rng: np.random.Generator, groups: int, rows: int, d: int) -> tuple[np.ndarray, ...]:
    w = rng.normal(size=(groups, rows, d))
    # correlated inputs: the case where rounding decisions interact
    mixing = rng.normal(size=(groups, d, d)) + 2 * np.eye(d)
    x = rng.normal(size=(groups, 400, d)) @ mixing
    h = np.matmul(x.transpose(0, 2, 1), x) / x.shape[1]
    return w, h


def _loss(w: np.ndarray, codes: np.ndarray, scales: np.ndarray, h: np.ndarray) -> np.ndarray:
    return output_error(w - codes * scales[..., None], h)


def test_refinement_never_raises_the_error_and_ends_at_a_local_optimum() -> None:
    rng = np.random.default_rng(0)
    w, h = _layer(rng, groups=3, rows=16, d=24)
    bits = 4
    scales = max_abs_scales(w, bits)
    start = round_to_grid(w, scales, bits)
    refined, sweeps = refine_rounding(w, start, scales, h, bits, max_sweeps=50)
    before, after = _loss(w, start, scales, h), _loss(w, refined, scales, h)
    assert np.all(after <= before * (1 + 1e-6))
    assert after.sum() < 0.8 * before.sum()  # correlated inputs: rounding to nearest is poor
    assert sweeps < 50  # it stopped because nothing moved
    # no single +-1 move inside the search space (floor or ceiling of w / s) lowers any row's
    # error, and every code lies in it
    qmax = 2 ** (bits - 1) - 1
    ratio = w / scales[..., None]
    low, high = np.clip(np.floor(ratio), -qmax, qmax), np.clip(np.ceil(ratio), -qmax, qmax)
    assert np.all((refined >= low) & (refined <= high))
    for j in range(w.shape[2]):
        for step in (-1, 1):
            moved = refined.copy()
            moved[:, :, j] = np.clip(moved[:, :, j] + step, low[:, :, j], high[:, :, j])
            assert np.all(_loss(w, moved, scales, h) >= after * (1 - 1e-6))
    assert np.all(np.abs(refined) <= qmax) and np.all(refined == np.round(refined))


def test_refinement_improves_on_gptq_and_nears_the_exhaustive_optimum_for_depthwise() -> None:
    """d = 9 (a depthwise 3x3): every floor/ceil combination can be tried."""
    rng = np.random.default_rng(1)
    w, h = _layer(rng, groups=40, rows=1, d=9)
    bits = 3
    scales = max_abs_scales(w, bits)
    gptq = gptq_codes(w, h, scales, bits)
    refined, _ = refine_rounding(w, gptq, scales, h, bits)
    qmax = 2 ** (bits - 1) - 1
    low = np.clip(np.floor(w / scales[..., None]), -qmax, qmax)
    best = np.full(w.shape[:2], np.inf)
    for pattern in itertools.product((0.0, 1.0), repeat=9):
        codes = np.clip(low + np.array(pattern), -qmax, qmax)
        best = np.minimum(best, _loss(w, codes, scales, h))
    gptq_gap = (_loss(w, gptq, scales, h) - best).sum()
    refined_gap = (_loss(w, refined, scales, h) - best).sum()
    assert np.all(_loss(w, refined, scales, h) <= _loss(w, gptq, scales, h) * (1 + 1e-6))
    assert refined_gap < 0.6 * gptq_gap
