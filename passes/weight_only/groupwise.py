"""Group-wise weight quantization: one scale (and zero point) per group of ``group_size``
consecutive weights along a layer's input dimension.

A layer's weights are handled as a matrix W [R, K]: one row per output (a MatMul weight
B [K, N] is W = B^T; an embedding table E [V, d] is W = E, whose rows are also the tied LM
head's outputs), K the input dimension, split into G = ceil(K / g) groups (the last may be
shorter). For group j of row r, with qmax = 2^(b-1) - 1:

- symmetric: s = max|w| / qmax, q = clip(round(w / s), -qmax - 1, qmax), w' = s q;
- asymmetric: lo = min(min w, 0), hi = max(max w, 0), s = (hi - lo) / (2^b - 1),
  z = clip(round(-lo / s), 0, 2^b - 1), q = clip(round(w / s) + z, 0, 2^b - 1),
  w' = s (q - z).

An all-zero group gets s = 1 (its codes are then exact zeros). Scales are float32, as both
exported forms store them, and are computed in float32 so that quantize -> export ->
onnxruntime reproduces :func:`dequantize` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dyadiq.errors import ConfigError

WEIGHT_ONLY_BITS = range(2, 9)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class GroupwiseFormat:
    """``bits``-wide codes with one float32 scale per ``group_size`` inputs; ``symmetric``
    codes are signed without a zero point, asymmetric ones unsigned with one."""

    bits: int
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_ONLY_BITS:
            raise ConfigError(f"weight-only bits must be 2..8, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group size must be one of {GROUP_SIZES}, got {self.group_size}")

    @property
    def code_range(self) -> tuple[int, int]:
        """The smallest and largest code."""
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @property
    def label(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}-g{self.group_size}-{kind}"

    def groups(self, columns: int) -> int:
        return -(-columns // self.group_size)


@dataclass(frozen=True)
class GroupwiseWeight:
    """Codes [R, K] (int16 holding the signed or unsigned codes), scales [R, G] float32 and
    zero points [R, G] (int16; all zero when symmetric)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    format: GroupwiseFormat

    def dequantize(self) -> np.ndarray:
        return dequantize(self.codes, self.scales, self.zero_points, self.format)

    @property
    def storage_bits(self) -> int:
        """Bits this weight takes stored: packed codes, float32 scales and (asymmetric)
        zero points packed at the code width."""
        rows, groups = self.scales.shape
        zero_bits = 0 if self.format.symmetric else rows * groups * self.format.bits
        return int(self.codes.size * self.format.bits + rows * groups * 32 + zero_bits)


def per_column(values: np.ndarray, columns: int, group_size: int) -> np.ndarray:
    """A per-group array [R, G] repeated to one value per column [R, K]."""
    return np.repeat(values, group_size, axis=1)[:, :columns]


def _grouped_extremes(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, columns = w.shape
    groups = -(-columns // group_size)
    pad = groups * group_size - columns
    if pad:  # edge padding never widens a group's range
        w = np.pad(w, ((0, 0), (0, pad)), mode="edge")
    grouped = w.reshape(rows, groups, group_size)
    return grouped.min(axis=2), grouped.max(axis=2)


def group_scales(w: np.ndarray, fmt: GroupwiseFormat) -> tuple[np.ndarray, np.ndarray]:
    """Min-max scales [R, G] (float32) and zero points [R, G] (int16) of ``w`` [R, K]."""
    lo, hi = _grouped_extremes(np.asarray(w, np.float32), fmt.group_size)
    return _grid(lo, hi, fmt)


def _grid(lo: np.ndarray, hi: np.ndarray, fmt: GroupwiseFormat) -> tuple[np.ndarray, np.ndarray]:
    qlo, qhi = fmt.code_range
    if fmt.symmetric:
        scales = np.maximum(np.abs(lo), np.abs(hi)) / np.float32(qhi)
        scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
        return scales, np.zeros(scales.shape, np.int16)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scales = (hi - lo) / np.float32(qhi - qlo)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
    zeros = np.clip(np.round(-lo / scales), qlo, qhi).astype(np.int16)
    return scales, zeros


# Range shrink factors tried by the clipping search (1 = min-max): a narrower range rounds
# the bulk of a group more finely at the price of clipping its extremes.
CLIP_SHRINKS = tuple(np.round(np.arange(1.0, 0.69, -0.05), 2))


def clipped_group_scales(
    w: np.ndarray, fmt: GroupwiseFormat, shrinks: tuple[float, ...] = CLIP_SHRINKS
) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the shrunk range (min-max times a factor of ``shrinks``) whose grid has the
    least squared rounding error on the group's own weights; ties keep min-max."""
    w = np.asarray(w, np.float32)
    rows, columns = w.shape
    lo, hi = _grouped_extremes(w, fmt.group_size)
    best_scales, best_zeros = _grid(lo, hi, fmt)
    best_error = np.full(lo.shape, np.inf, np.float32)
    g, groups = fmt.group_size, lo.shape[1]
    pad = groups * g - columns
    padded = np.pad(w, ((0, 0), (0, pad))) if pad else w
    valid = np.ones((1, groups * g), bool)
    valid[:, columns:] = False
    for shrink in shrinks:
        scales, zeros = _grid(lo * np.float32(shrink), hi * np.float32(shrink), fmt)
        q = quantize(padded, scales, zeros, fmt)
        err = ((dequantize(q, scales, zeros, fmt) - padded) ** 2) * valid
        error = err.reshape(rows, groups, g).sum(axis=2)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scales = np.where(better, scales, best_scales)
        best_zeros = np.where(better, zeros, best_zeros)
    return best_scales.astype(np.float32), best_zeros.astype(np.int16)


def quantize(
    w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, fmt: GroupwiseFormat
) -> np.ndarray:
    """Round-to-nearest codes [R, K] (int16, in ``fmt.code_range``) on the given grid."""
    w = np.asarray(w, np.float32)
    columns = w.shape[1]
    s = per_column(scales, columns, fmt.group_size)
    z = per_column(zero_points, columns, fmt.group_size).astype(np.float32)
    qlo, qhi = fmt.code_range
    return np.clip(np.round(w / s) + z, qlo, qhi).astype(np.int16)


def dequantize(
    codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, fmt: GroupwiseFormat
) -> np.ndarray:
    """``s (q - z)`` per column, float32 (what DequantizeLinear and MatMulNBits compute)."""
    columns = codes.shape[1]
    s = per_column(scales, columns, fmt.group_size)
    z = per_column(zero_points, columns, fmt.group_size)
    return ((codes.astype(np.int32) - z.astype(np.int32)).astype(np.float32) * s).astype(np.float32)


def round_to_nearest(w: np.ndarray, fmt: GroupwiseFormat) -> GroupwiseWeight:
    """Min-max grid and nearest codes: the baseline GPTQ is compared with."""
    scales, zeros = group_scales(w, fmt)
    return GroupwiseWeight(quantize(w, scales, zeros, fmt), scales, zeros, fmt)
