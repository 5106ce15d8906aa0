"""Streaming range observers: one running histogram per tensor, and range estimators on it.

:class:`RunningHistogram` keeps exact min/max and a histogram over a symmetric range
``[-R, R]`` with an even number of bins. When a batch exceeds ``R`` the range doubles (as often
as needed) and pairs of old bins merge into one new bin, which is exact: old bin edges are new
bin edges. Memory is O(bins) per tensor whatever the amount of data.

Range estimators turn a histogram into a clipping range ``(lo, hi)``:
- min/max: the exact extremes;
- percentile: the central ``p`` % of the mass (two-sided);
- MSE: the clip that minimises the expected squared quantization error (clipping + rounding)
  of a ``bits``-bit quantizer over the histogram;
- entropy (KL): TensorRT's calibration, the clip minimising KL(P || Q) between the reference
  distribution and its quantized version.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from dyadiq.errors import CalibrationDataError, ConfigError


class RangeMethod(enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"
    # percentile, except MSE for tensors that come out of an op in AUTO_MSE_PRODUCERS: the
    # pipeline resolves it per tensor (it knows the graph), never estimate_range
    AUTO = "auto"


# Ops whose outputs the percentile clip serves badly. LayerNormalization: a few channels
# carry outliers far beyond the rest, so the 99.99th percentile still spends the 8-bit grid
# on them; MSE clips them. MiniLM W8A8 (percentile elsewhere): mean cosine 0.905 with
# percentile LayerNorm outputs, 0.957 with MSE (benchmarks/results/compensation.md); no
# LayerNorm in the CNNs, so their ranges do not change.
AUTO_MSE_PRODUCERS = frozenset({"LayerNormalization"})


def auto_method(producer_op: str | None) -> RangeMethod:
    """What :attr:`RangeMethod.AUTO` means for a tensor made by ``producer_op``."""
    return RangeMethod.MSE if producer_op in AUTO_MSE_PRODUCERS else RangeMethod.PERCENTILE


@dataclass
class RunningHistogram:
    """Exact min/max plus a mergeable histogram over a symmetric, doubling range."""

    bins: int = 2048
    minimum: float = np.inf
    maximum: float = -np.inf
    half_range: float = 0.0
    counts: np.ndarray | None = None
    samples: int = 0

    def __post_init__(self) -> None:
        if self.bins < 2 or self.bins % 4:
            raise ConfigError(f"histogram bins must be a positive multiple of 4, got {self.bins}")

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.minimum = min(self.minimum, lo)
        self.maximum = max(self.maximum, hi)
        self.samples += x.size
        extent = max(abs(lo), abs(hi))
        if self.counts is None:
            self.counts = np.zeros(self.bins, dtype=np.int64)
            self.half_range = extent if extent > 0 else 1e-8
        while extent > self.half_range:
            self._double_range()
        width = 2.0 * self.half_range / self.bins
        index = np.floor((x + self.half_range) / width).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def _double_range(self) -> None:
        assert self.counts is not None
        merged = self.counts.reshape(-1, 2).sum(axis=1)  # bins/2 bins of twice the width
        quarter = self.bins // 4
        grown = np.zeros_like(self.counts)
        grown[quarter : quarter + merged.size] = merged
        self.counts = grown
        self.half_range *= 2.0

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.half_range, self.half_range, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return 0.5 * (e[:-1] + e[1:])

    def require_data(self, name: str) -> np.ndarray:
        if self.counts is None or self.samples == 0:
            raise CalibrationDataError(f"tensor {name} received no calibration values")
        return self.counts


def minmax_range(hist: RunningHistogram) -> tuple[float, float]:
    return hist.minimum, hist.maximum


def percentile_range(hist: RunningHistogram, percentile: float = 99.99) -> tuple[float, float]:
    counts = hist.require_data("?")
    cdf = np.cumsum(counts) / counts.sum()
    tail = (1.0 - percentile / 100.0) / 2.0
    edges = hist.edges
    lo = edges[int(np.searchsorted(cdf, tail, side="left"))]
    hi = edges[min(int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1, hist.bins)]
    return max(float(lo), hist.minimum), min(float(hi), hist.maximum)


def _quantization_mse(
    centers: np.ndarray, weights: np.ndarray, lo: float, hi: float, levels: int
) -> float:
    """Expected squared error of uniform quantization on [lo, hi] with ``levels`` levels."""
    scale = max(hi - lo, 1e-12) / (levels - 1)
    q = np.clip(np.round((centers - lo) / scale), 0, levels - 1) * scale + lo
    return float(np.dot(weights, (centers - q) ** 2))


def mse_range(hist: RunningHistogram, bits: int = 8, candidates: int = 100) -> tuple[float, float]:
    """Shrink [min, max] towards zero and keep the clip with the least expected MSE."""
    counts = hist.require_data("?").astype(np.float64)
    centers = hist.centers
    weights = counts / counts.sum()
    lo0, hi0 = min(hist.minimum, 0.0), max(hist.maximum, 0.0)
    best = (float("inf"), lo0, hi0)
    for fraction in np.linspace(1.0, 0.05, candidates):
        lo, hi = lo0 * fraction, hi0 * fraction
        err = _quantization_mse(centers, weights, lo, hi, 2**bits)
        if err < best[0]:
            best = (err, lo, hi)
    return max(best[1], hist.minimum), min(best[2], hist.maximum)


def entropy_range(hist: RunningHistogram, bits: int = 8) -> tuple[float, float]:
    """TensorRT-style KL calibration of a symmetric clip threshold on |x|."""
    counts = hist.require_data("?").astype(np.float64)
    half = hist.bins // 2
    # Fold the signed histogram onto |x|: bin i of `absolute` covers [i*w, (i+1)*w].
    absolute = counts[half:] + counts[:half][::-1]
    # Exact zeros (half of every post-ReLU tensor) are represented exactly by any quantizer;
    # left in, their spike dominates the KL and drags the threshold far too low.
    absolute[0] = 0.0
    levels = 2 ** (bits - 1)
    width = hist.half_range / half
    best_kl, best_t = np.inf, absolute.size
    start = min(levels, absolute.size)
    for t in range(start, absolute.size + 1, max(1, (absolute.size - start) // 256)):
        reference = absolute[:t].copy()
        reference[t - 1] += absolute[t:].sum()  # outliers clip into the last bin
        if reference.sum() == 0:
            continue
        # Quantize the first t bins into `levels` buckets, spreading each bucket's mass
        # uniformly over its non-empty source bins.
        chunks = np.array_split(absolute[:t], levels)
        expanded = []
        for chunk in chunks:
            nonzero = chunk > 0
            fill = chunk.sum() / max(int(nonzero.sum()), 1)
            expanded.append(np.where(nonzero, fill, 0.0))
        candidate = np.concatenate(expanded)
        p = reference / reference.sum()
        q = candidate / max(candidate.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_t = kl, t
    threshold = best_t * width
    return max(-threshold, hist.minimum), min(threshold, hist.maximum)


def estimate_range(
    hist: RunningHistogram, method: RangeMethod, *, bits: int = 8, percentile: float = 99.99
) -> tuple[float, float]:
    if method is RangeMethod.MINMAX:
        return minmax_range(hist)
    if method is RangeMethod.PERCENTILE:
        return percentile_range(hist, percentile)
    if method is RangeMethod.MSE:
        return mse_range(hist, bits)
    if method is RangeMethod.AUTO:
        raise ConfigError("the auto calibrator is resolved per tensor (pipeline.calibrated_ranges)")
    return entropy_range(hist, bits)
