"""The Hessian-weighted per-group range search (groupwise.hessian_clipped_group_scales)."""

from __future__ import annotations

import numpy as np
import pytest

from dyadiq.passes.weight_only.groupwise import (
    ClipObjective,
    GroupwiseFormat,
    clipped_group_scales,
    dequantize,
    group_scales,
    hessian_clipped_group_scales,
    quantize,
)


def _rounding_error(
    w: np.ndarray, scales: np.ndarray, zeros: np.ndarray, fmt: GroupwiseFormat
) -> np.ndarray:
    return dequantize(quantize(w, scales, zeros, fmt), scales, zeros, fmt) - w


def _group_output_error(d: np.ndarray, h: np.ndarray, g: int) -> np.ndarray:
    """d H_gg d^T per row and group, computed directly (no padding: K is a multiple of g)."""
    rows, columns = d.shape
    out = np.zeros((rows, columns // g))
    for k in range(columns // g):
        part = d[:, k * g : (k + 1) * g].astype(np.float64)
        block = h[k * g : (k + 1) * g, k * g : (k + 1) * g]
        out[:, k] = np.einsum("ra,ab,rb->r", part, block, part)
    return out


def test_important_outlier_column_keeps_its_range() -> None:
    """One input column holds each row's outlier and has a huge H diagonal: the plain search
    clips it (the bulk rounds finer), the H-weighted one keeps it unclipped."""
    rng = np.random.default_rng(0)
    rows, g = 32, 64
    w = rng.normal(size=(rows, g)).astype(np.float32)
    w[:, 5] = 6.0 * np.sign(rng.normal(size=rows)).astype(np.float32)
    h = np.eye(g)
    h[5, 5] = 1e4
    fmt = GroupwiseFormat(3, g)

    plain = _rounding_error(w, *clipped_group_scales(w, fmt), fmt)
    weighted = _rounding_error(w, *hessian_clipped_group_scales(w, fmt, h), fmt)
    # the plain search does clip the outlier column on most rows (else the test shows nothing)
    assert np.mean(np.abs(plain[:, 5]) > 0.5) > 0.5
    assert np.sum(weighted[:, 5] ** 2) < 0.1 * np.sum(plain[:, 5] ** 2)
    assert _group_output_error(weighted, h, g).sum() < _group_output_error(plain, h, g).sum()


@pytest.mark.parametrize("symmetric", [False, True])
def test_never_worse_than_min_max_on_the_weighted_objective(symmetric: bool) -> None:
    rng = np.random.default_rng(1)
    k, g = 256, 64
    w = rng.standard_t(3, size=(40, k)).astype(np.float32)
    x = rng.normal(size=(500, k)) * rng.uniform(0.1, 3.0, size=k)  # uneven input scales
    x[:, :8] += x[:, 8:16]  # and correlated inputs: off-diagonal H counts
    h = x.T @ x / len(x)
    fmt = GroupwiseFormat(3, g, symmetric)

    weighted = _group_output_error(
        _rounding_error(w, *hessian_clipped_group_scales(w, fmt, h, row_chunk=7), fmt), h, g
    )
    minmax = _group_output_error(_rounding_error(w, *group_scales(w, fmt), fmt), h, g)
    plain = _group_output_error(_rounding_error(w, *clipped_group_scales(w, fmt), fmt), h, g)
    assert np.all(weighted <= minmax * (1 + 1e-5))
    assert np.all(weighted <= plain * (1 + 1e-5))  # every plain candidate is also tried
    assert weighted.sum() < 0.9 * minmax.sum()  # heavy tails: shrinking pays somewhere


def test_short_last_group_and_shape_check() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 200)).astype(np.float32)  # 200 = 128 + a 72-wide last group
    fmt = GroupwiseFormat(4, 128)
    scales, zeros = hessian_clipped_group_scales(w, fmt, np.eye(200))
    assert scales.shape == zeros.shape == (5, 2)
    assert scales.dtype == np.float32 and zeros.dtype == np.int16
    # with H = I the objective is the plain squared error: the same grid as the plain search
    plain_scales, plain_zeros = clipped_group_scales(w, fmt)
    np.testing.assert_array_equal(zeros, plain_zeros)
    np.testing.assert_allclose(scales, plain_scales, rtol=1e-6)
    with pytest.raises(Exception, match="does not match"):
        hessian_clipped_group_scales(w, fmt, np.eye(199))


def test_gptq_layer_quantizer_uses_the_hessian_objective() -> None:
    """The settings' objective reaches the grid GPTQ runs on (RTN has no H: unchanged)."""
    from dyadiq.passes.weight_only.layers import Orientation, Reader, Use, WeightLayer
    from dyadiq.passes.weight_only.quantize import LayerQuantizer, Method, WeightOnlySettings

    rng = np.random.default_rng(3)
    rows, k = 16, 128
    w = rng.normal(size=(rows, k)).astype(np.float32)
    w[:, 3] = 7.0
    x = rng.normal(size=(400, k))
    x[:, 3] *= 100.0
    h = x.T @ x / len(x)
    reader = Reader("mm", Use.MATMUL, "x", "MatMul")
    layer = WeightLayer("mm", "mm_w", Orientation.TRANSPOSED, rows, k, (reader,))
    by_objective = {
        objective: LayerQuantizer(
            WeightOnlySettings(method=Method.GPTQ, clip_objective=objective), {"x": h}
        )(layer, w, 3)
        for objective in ClipObjective
    }
    plain, weighted = by_objective[ClipObjective.WEIGHT], by_objective[ClipObjective.HESSIAN]
    assert not np.array_equal(plain.scales, weighted.scales)
    err = {o: q.dequantize() - w for o, q in by_objective.items()}
    out = {o: float(np.sum((e @ h) * e)) for o, e in err.items()}
    assert out[ClipObjective.HESSIAN] < out[ClipObjective.WEIGHT]


def test_salient_columns_do_not_steer_the_range_search() -> None:
    """With salient channels (stored apart at 8 bits) the H-weighted search ignores them:
    their huge H would otherwise keep every group's range wide for nothing."""
    from dyadiq.passes.weight_only.layers import Orientation, Reader, Use, WeightLayer
    from dyadiq.passes.weight_only.quantize import LayerQuantizer, Method, WeightOnlySettings

    rng = np.random.default_rng(5)
    rows, k = 8, 128
    x = rng.normal(size=(300, k))
    x[:, 7] *= 50.0  # the one salient channel at 1%
    h = x.T @ x / len(x)
    reader = Reader("mm", Use.MATMUL, "x", "MatMul")
    layer = WeightLayer("mm", "mm_w", Orientation.TRANSPOSED, rows, k, (reader,))
    settings = WeightOnlySettings(
        method=Method.GPTQ, clip_objective=ClipObjective.HESSIAN, salient_fraction=0.01
    )
    clip_h = LayerQuantizer(settings, {"x": h})._clip_hessian(layer, h)
    assert clip_h is not None
    assert not clip_h[7].any() and not clip_h[:, 7].any()
    assert clip_h[6, 6] > h[6, 6]  # the others keep their (dampened) H
