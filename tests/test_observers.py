import numpy as np
import pytest

from dyadiq.errors import ConfigError
from dyadiq.passes.calibration.observers import (
    RangeMethod,
    RunningHistogram,
    entropy_range,
    estimate_range,
    mse_range,
    percentile_range,
)
from dyadiq.quantizers import activation_quant, fake_quantize


def test_streamed_histogram_equals_one_shot_after_range_doubling():
    rng = np.random.default_rng(0)
    first = rng.normal(size=1000).astype(np.float32)
    later = [rng.normal(scale=s, size=5000).astype(np.float32) for s in (1, 3, 10, 40)]
    streamed, one_shot = RunningHistogram(bins=512), RunningHistogram(bins=512)
    streamed.update(first)
    one_shot.update(first)
    for batch in later:
        streamed.update(batch)
    one_shot.update(np.concatenate(later))
    assert streamed.half_range == one_shot.half_range > 40
    np.testing.assert_array_equal(streamed.counts, one_shot.counts)
    assert streamed.counts.sum() == 21000 == streamed.samples
    everything = np.concatenate([first, *later])
    assert streamed.minimum == everything.min() and streamed.maximum == everything.max()


def test_histogram_counts_match_numpy_histogram():
    rng = np.random.default_rng(1)
    x = rng.uniform(-3, 5, size=20000).astype(np.float32)
    hist = RunningHistogram(bins=256)
    hist.update(x)
    expected, _ = np.histogram(x, bins=hist.edges)
    assert np.abs(hist.counts - expected).sum() <= 2  # only exact-edge ties may differ


def test_percentile_of_a_gaussian():
    x = np.random.default_rng(2).normal(size=400_000).astype(np.float32)
    hist = RunningHistogram()
    hist.update(x)
    lo, hi = percentile_range(hist, 99.0)
    width = 2 * hist.half_range / hist.bins
    assert abs(hi - 2.5758) < 2 * width + 0.02
    assert abs(lo + 2.5758) < 2 * width + 0.02


def _heavy_tailed(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    outliers = rng.uniform(30, 80, size=40) * rng.choice([-1, 1], size=40)
    return np.concatenate([rng.laplace(size=200_000), outliers]).astype(np.float32)


def test_mse_clip_beats_minmax_on_measured_error():
    x = _heavy_tailed(3)
    hist = RunningHistogram()
    hist.update(x)
    lo, hi = mse_range(hist, 8)
    assert hi < x.max() and lo > x.min()
    clipped = fake_quantize(x, activation_quant(lo, hi, 8, signed=True))
    full = fake_quantize(x, activation_quant(x.min(), x.max(), 8, signed=True))
    assert np.mean((clipped - x) ** 2) < 0.9 * np.mean((full - x) ** 2)


def test_entropy_threshold_clips_outliers_but_keeps_the_bulk():
    x = _heavy_tailed(4)
    hist = RunningHistogram()
    hist.update(x)
    lo, hi = entropy_range(hist, 8)
    assert hi < 0.5 * x.max()
    assert hi > np.percentile(np.abs(x), 99)
    assert lo == -hi


def test_minmax_is_exact_and_dispatch_works():
    hist = RunningHistogram()
    hist.update(np.array([-0.5, 0.25, 3.0], np.float32))
    assert estimate_range(hist, RangeMethod.MINMAX) == (-0.5, 3.0)


def test_bins_must_be_multiple_of_four():
    with pytest.raises(ConfigError, match="multiple of 4"):
        RunningHistogram(bins=6)
