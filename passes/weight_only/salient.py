"""Salient input channels (PB-LLM / PTQ1.61): a few input columns of a weight kept at 8 bits.

A weight W [R, K] multiplies inputs x [K]; the channels with the largest E[x_j^2] (the
diagonal of the layer's input Hessian H = E[x x^T]) carry most of the output error of any
rounding of column j. A ``fraction`` of them (at least one) is taken out of the group-wise
grid:

- GPTQ sweeps them last, so every other column's rounding error is pushed onto them, and
  they are not rounded to the 4-bit grid at all (their compensated float values are kept);
- those values are stored as symmetric 8-bit codes with one float32 scale per row
  (``s_r = max_j |v_rj| / 127``), :class:`SalientColumns`;
- the group-wise codes of those columns are set to their group's zero point, so the
  group-wise part contributes exactly 0 there, and the weight is the sum of the two parts:
  ``W = dequantize(groupwise) + scatter(columns, s_r q_rj)``. The group-wise grid is
  computed with those columns at 0, which always lies on the grid, so they do not widen it.

An exported model computes the same sum as two products
(:mod:`dyadiq.backends.onnx.weight_only`): the group-wise MatMul over all of x, plus
``x[..., columns] @ salient^T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dyadiq.errors import ConfigError
from dyadiq.passes.compensation.gptq import GptqFactor, gptq_group_codes

SALIENT_BITS = 8
_SALIENT_QMAX = 2 ** (SALIENT_BITS - 1) - 1  # symmetric codes -127..127


def check_fraction(fraction: float) -> None:
    if not 0 <= fraction < 0.5:
        raise ConfigError(f"salient fraction must be in [0, 0.5), got {fraction}")


def salient_channels(hessian: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (ascending, int64) of the ``fraction`` of input channels with the largest
    E[x_j^2] = H_jj, at least one; ties go to the lower index."""
    check_fraction(fraction)
    count = salient_count(hessian.shape[0], fraction)
    ranked = np.argsort(-np.diag(hessian), kind="stable")
    return np.sort(ranked[:count]).astype(np.int64)


def salient_mask(hessian: np.ndarray, fraction: float) -> np.ndarray:
    """:func:`salient_channels` as a [K] boolean mask (GPTQ's ``last`` / ``kept``)."""
    mask = np.zeros(hessian.shape[0], bool)
    mask[salient_channels(hessian, fraction)] = True
    return mask


@dataclass(frozen=True)
class SalientColumns:
    """``columns`` [k] (int64, ascending) of W [R, K], stored as ``codes`` [R, k] (int8,
    -127..127) times ``scales`` [R] (float32, one per row)."""

    columns: np.ndarray
    codes: np.ndarray
    scales: np.ndarray

    def values(self) -> np.ndarray:
        """The stored weights [R, k], float32: ``s_r q_rj`` (what DequantizeLinear gives)."""
        return (self.codes.astype(np.float32) * self.scales[:, None]).astype(np.float32)

    @property
    def storage_bits(self) -> int:
        """8-bit codes, a float32 scale per row and the int64 column indices."""
        rows = self.codes.shape[0]
        return int(self.codes.size * SALIENT_BITS + rows * 32 + self.columns.size * 64)

    def add_to(self, dense: np.ndarray) -> np.ndarray:
        """``dense`` [R, K] (the group-wise part, zero on these columns) plus these columns."""
        out = np.array(dense, np.float32, copy=True)
        out[:, self.columns] += self.values()
        return out


def quantize_salient(values: np.ndarray, columns: np.ndarray) -> SalientColumns:
    """Symmetric per-row 8-bit codes of ``values`` [R, k] (an all-zero row gets scale 1).
    Scales are computed in float32, as the exported DequantizeLinear stores them."""
    v = np.asarray(values, np.float32)
    scales = (np.abs(v).max(axis=1) / np.float32(_SALIENT_QMAX)).astype(np.float32)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.round(v / scales[:, None]), -_SALIENT_QMAX, _SALIENT_QMAX)
    return SalientColumns(np.asarray(columns, np.int64), codes.astype(np.int8), scales)


def salient_count(columns: int, fraction: float) -> int:
    """How many of ``columns`` input channels ``fraction`` keeps (at least one)."""
    return min(columns, max(1, round(fraction * columns)))


def salient_gptq_codes(
    w: np.ndarray,
    factor: GptqFactor,
    scales: np.ndarray,
    zero_points: np.ndarray,
    group_size: int,
    code_range: tuple[int, int],
    fraction: float,
    *,
    block: int = 128,
) -> tuple[np.ndarray, SalientColumns]:
    """GPTQ codes [R, K] of ``w`` on the given group-wise grid with the salient columns
    swept last and kept out of it: ``factor`` must come from ``gptq_factor(..., last=
    salient_mask(H, fraction))``, so those columns are the last ``salient_count`` of its
    order. Returns the group-wise codes (the salient columns at their zero points, i.e. 0)
    and the salient columns' compensated values at 8 bits."""
    columns = np.sort(factor.order[0, w.shape[1] - salient_count(w.shape[1], fraction) :])
    kept = np.zeros(w.shape[1], bool)
    kept[columns] = True
    # float32 holds the compensated values well below their 8-bit step; [R, K] because
    # gptq_group_codes writes by column index (670 MB for Gemma's 262,144 x 640 table)
    values = np.zeros(w.shape, np.float32)
    codes = gptq_group_codes(
        w,
        factor,
        scales,
        zero_points,
        group_size,
        code_range,
        block=block,
        kept=kept,
        kept_values=values,
    )
    codes[:, columns] = zero_points[:, columns // group_size]
    return codes, quantize_salient(values[:, columns], columns.astype(np.int64))
