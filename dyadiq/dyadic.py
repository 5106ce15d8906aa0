"""Dyadic numbers: real multipliers as ``m / 2^k`` with integer m and k (HAWQ-V3).

Requantization of an integer accumulator by a real multiplier M is done with integer multiply,
add and arithmetic shift only:

    M ~ m / 2^k,  0 <= m < 2^31,  0 <= k <= 31
    requantize(acc) = (acc * m + 2^(k-1)) >> k       (floor shift: rounds half up)

``dyadic`` picks the largest k (most precision) that keeps m below 2^31. The products are formed
in int64: |acc| < 2^31 and m < 2^31 keep them below 2^62.
"""

from __future__ import annotations

import numpy as np

from dyadiq.errors import RequantizationError

MAX_SHIFT = 31
MULTIPLIER_LIMIT = 2**31


def dyadic(multiplier: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (m, k) int64 arrays with m / 2^k closest to ``multiplier`` (elementwise)."""
    real = np.atleast_1d(np.asarray(multiplier, dtype=np.float64))
    if (real < 0).any() or not np.isfinite(real).all():
        raise RequantizationError(
            f"a rescale multiplier must be finite and >= 0, got {real}: the model's weights "
            "or activations are out of any integer range"
        )
    shift = np.full(real.shape, MAX_SHIFT, dtype=np.int64)
    nonzero = real > 0
    # The largest k with round(M * 2^k) < 2^31: k = 30 - floor(log2 M), capped to [0, 31].
    shift[nonzero] = np.clip(30 - np.floor(np.log2(real[nonzero])), 0, MAX_SHIFT)
    mult = np.round(real * np.exp2(shift)).astype(np.int64)
    overflow = mult >= MULTIPLIER_LIMIT
    if overflow.any():
        # Only at k = 0 can this happen: M >= 2^31 has no dyadic form with an int32 m.
        raise RequantizationError(
            f"rescale multiplier too large for an int32 dyadic form: {real[overflow]} (scales "
            "of wildly different magnitudes meet in one layer)"
        )
    return mult, shift


def requantize(acc: np.ndarray, mult: np.ndarray | int, shift: np.ndarray | int) -> np.ndarray:
    """``(acc * m + 2^(k-1)) >> k`` in int64; m and k broadcast against ``acc``."""
    acc = np.asarray(acc, dtype=np.int64)
    mult = np.asarray(mult, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    rounding = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 0)
    return np.right_shift(acc * mult + rounding, shift)
