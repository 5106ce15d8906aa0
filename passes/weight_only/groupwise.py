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
from enum import StrEnum

import numpy as np

from dyadiq.errors import ConfigError
from dyadiq.passes.weight_only.salient import SalientColumns

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
    zero points [R, G] (int16; all zero when symmetric); optionally ``salient`` input
    columns stored apart at 8 bits (:mod:`.salient`), whose group-wise codes are then their
    zero points (exactly 0), so the weight is the sum of the two parts."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    format: GroupwiseFormat
    salient: SalientColumns | None = None

    def dequantize(self) -> np.ndarray:
        dense = dequantize(self.codes, self.scales, self.zero_points, self.format)
        return dense if self.salient is None else self.salient.add_to(dense)

    @property
    def storage_bits(self) -> int:
        """Bits this weight takes stored: packed codes, float32 scales and (asymmetric)
        zero points packed at the code width, plus the salient columns' 8-bit copy (their
        group-wise codes stay stored too)."""
        rows, groups = self.scales.shape
        zero_bits = 0 if self.format.symmetric else rows * groups * self.format.bits
        salient_bits = 0 if self.salient is None else self.salient.storage_bits
        return int(
            self.codes.size * self.format.bits + rows * groups * 32 + zero_bits + salient_bits
        )


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


class ClipObjective(StrEnum):
    """What the per-group range search minimises over the shrink candidates."""

    WEIGHT = "weight"  # the squared rounding error of the group's own weights
    # the group's output error on the layer's inputs: d H_gg d^T, with d the group's rounding
    # error and H_gg its block of the input Hessian (GPTQ's objective restricted to the group)
    HESSIAN = "hessian"


def hessian_clipped_group_scales(
    w: np.ndarray,
    fmt: GroupwiseFormat,
    hessian: np.ndarray,
    shrinks: tuple[float, ...] = CLIP_SHRINKS,
    row_chunk: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the shrunk range whose round-to-nearest error ``d`` has the least output
    error ``d H_gg d^T`` (``H_gg``: the group's diagonal block of ``hessian`` [K, K]); min-max
    (shrink 1) is always a candidate and wins ties, so no group ends worse than min-max on
    that objective. Inputs that matter more (large H) keep a range that does not clip them,
    where the plain search (:func:`clipped_group_scales`) weighs every weight alike. Rows
    are processed ``row_chunk`` at a time (an LM head has 262,144)."""
    w = np.asarray(w, np.float32)
    rows, columns = w.shape
    if hessian.shape != (columns, columns):
        raise ConfigError(f"Hessian {hessian.shape} does not match {columns} input columns")
    g = fmt.group_size
    groups = fmt.groups(columns)
    pad = groups * g - columns
    # padded columns get zero rows and columns of H: they never count
    h = np.zeros((groups * g, groups * g), np.float32)
    h[:columns, :columns] = hessian
    blocks = np.stack([h[k * g : (k + 1) * g, k * g : (k + 1) * g] for k in range(groups)])
    candidates = (1.0, *(s for s in shrinks if s != 1.0))
    best_scales = np.empty((rows, groups), np.float32)
    best_zeros = np.empty((rows, groups), np.int16)
    for start in range(0, rows, row_chunk):
        part = w[start : start + row_chunk]
        lo, hi = _grouped_extremes(part, g)
        padded = np.pad(part, ((0, 0), (0, pad))) if pad else part
        chunk_best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        for shrink in candidates:
            scales, zeros = _grid(lo * np.float32(shrink), hi * np.float32(shrink), fmt)
            d = dequantize(quantize(padded, scales, zeros, fmt), scales, zeros, fmt) - padded
            d = d.reshape(len(part), groups, g).transpose(1, 0, 2)  # [G, r, g]
            error = np.einsum("grb,grb->rg", d @ blocks, d)
            if chunk_best is None:
                chunk_best = (error, scales, zeros)
                continue
            better = error < chunk_best[0]
            chunk_best = (
                np.where(better, error, chunk_best[0]),
                np.where(better, scales, chunk_best[1]),
                np.where(better, zeros, chunk_best[2]),
            )
        assert chunk_best is not None
        best_scales[start : start + len(part)] = chunk_best[1]
        best_zeros[start : start + len(part)] = chunk_best[2]
    return best_scales, best_zeros


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
