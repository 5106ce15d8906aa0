"""GPTQ (Frantar et al. 2022): optimal-brain-quantization column by column, batched.

Minimises E||(W - Q) x||^2 = tr((W - Q) H (W - Q)^T) with H = E[x x^T] over the rows of W
(each row is one output channel on its own fixed scale grid). Column j is rounded to the grid,
and its error e_j = (w_j - q_j) / [H^-1]_jj is pushed onto the not-yet-quantized columns,
w_k -= e_j [H^-1]_jk, with H^-1 the inverse restricted to the remaining columns. GPTQ gets
every such restricted inverse row at once from the upper Cholesky factor U of H^-1
(H^-1 = U^T U; row j of U, scaled, is the needed row), and applies updates lazily: inside a
block of B columns immediately, to the columns after the block in one matrix product.

Preconditions and choices:
- dampening: H + lambda I with lambda = ``damp`` * mean(diag H) keeps the Cholesky stable;
  inputs that are always zero (diag 0) get H_jj = 1 and weight 0 (they never matter);
- act order: quantize columns by decreasing H_jj (the largest inputs first, while the most
  columns remain free to compensate);
- all groups of a grouped / depthwise convolution run together ([G, R, d] arrays);
- group-wise grids (weight-only LLM quantization, :func:`gptq_group_codes`): one scale and
  zero point per ``group_size`` consecutive inputs of a row, fixed before the sweep; the same
  sweep runs with a different rounding of each column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dyadiq.passes.compensation.range_search import qmax_of


@dataclass(frozen=True)
class GptqFactor:
    """What GPTQ needs from H, computed once per layer and reused for any scales."""

    order: np.ndarray  # [G, d] column order (act order, or natural)
    inverse_factor: np.ndarray  # [G, d, d] upper U with (H + lambda I)^-1 = U^T U, permuted
    dead: np.ndarray  # [G, d] inputs that are always zero (their weights quantize to 0)


def gptq_factor(
    hessian: np.ndarray,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    last: np.ndarray | None = None,
) -> GptqFactor:
    """``last``: optional [G, d] mask of columns swept after all others (columns a caller
    keeps at high precision: every other column's error can still be pushed onto them)."""
    h = hessian.astype(np.float64).copy()
    diagonal = np.einsum("gii->gi", h)  # a writable view of each diagonal
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal += damp * diagonal.mean(axis=1, keepdims=True)
    groups, columns = diagonal.shape
    order = (
        np.argsort(-diagonal, axis=1, kind="stable")
        if act_order
        else np.broadcast_to(np.arange(columns), (groups, columns))
    )
    if last is not None:  # a stable sort on "is kept" moves them to the end, in order
        order = np.take_along_axis(
            order, np.argsort(np.take_along_axis(last, order, 1), axis=1, kind="stable"), 1
        )
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], 2)
    return GptqFactor(order, _inverse_factor(h, damp), dead)


# Relative dampening tried, in order, after the caller's: a Hessian of nearly collinear or
# huge inputs (seen on models outside the zoo) can defeat the first one numerically.
_MORE_DAMPING = (0.1, 1.0)


def _inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper U with ``(h + extra I)^-1 = U^T U``, ``h`` already damped by ``damp``. More
    dampening is added until the factorisation succeeds; a Hessian that is not finite, or
    that no dampening makes positive definite, is replaced by its diagonal, for which GPTQ
    is plain rounding to nearest (no error is pushed onto other columns)."""
    eye = np.eye(h.shape[-1])
    mean_diag = np.einsum("gii->gi", h).mean(axis=1)[:, None, None]
    if np.isfinite(h).all():
        for extra in (0.0, *(m - damp for m in _MORE_DAMPING if m > damp)):
            try:
                inverse = np.linalg.inv(h + extra * mean_diag * eye)
                inverse = (inverse + inverse.transpose(0, 2, 1)) / 2
                upper: np.ndarray = np.linalg.cholesky(inverse).transpose(0, 2, 1)
            except np.linalg.LinAlgError:
                continue
            if np.isfinite(upper).all():
                return upper
    diagonal = np.einsum("gii->gi", h)
    safe = np.where(np.isfinite(diagonal) & (diagonal > 0), diagonal, 1.0)
    return eye * (1.0 / np.sqrt(safe))[:, None, :]


def gptq_codes(
    weights: np.ndarray,
    hessian: np.ndarray | GptqFactor,
    scales: np.ndarray,
    bits: int,
    *,
    block: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> np.ndarray:
    """Integer codes [G, R, d] for ``weights`` [G, R, d] on the per-row ``scales`` [G, R].

    ``hessian``: H [G, d, d], or its :func:`gptq_factor` (``damp`` / ``act_order`` then come
    from the factor)."""
    factor = (
        hessian
        if isinstance(hessian, GptqFactor)
        else gptq_factor(hessian, damp=damp, act_order=act_order)
    )
    qmax = qmax_of(bits)
    s = scales.astype(np.float64)[..., None]  # [G, R, 1]

    def round_column(column: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.clip(np.round(column / s), -qmax, qmax)
        return q, q * s

    return _obq_sweep(weights, factor, round_column, block)


RoundColumn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _obq_sweep(
    weights: np.ndarray, factor: GptqFactor, round_column: RoundColumn, block: int
) -> np.ndarray:
    """The OBQ sweep shared by every grid: ``round_column(column [G, R, 1], positions [G])``
    returns the codes and the dequantised values of the column at original index
    ``positions`` (per group); its error is pushed onto the later columns. Codes come back
    in the original column order, [G, R, d] float64."""
    w = weights.astype(np.float64).copy()
    w[np.broadcast_to(factor.dead[:, None, :], w.shape)] = 0.0
    columns = w.shape[2]
    order = factor.order
    w = np.take_along_axis(w, order[:, None, :], axis=2)
    u = factor.inverse_factor
    codes = np.zeros_like(w)
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        w_block = w[:, :, start:stop].copy()
        u_block = u[:, start:stop, start:stop]
        errors = np.zeros_like(w_block)
        for j in range(stop - start):
            column = w_block[:, :, j : j + 1]  # [G, R, 1]
            q, value = round_column(column, order[:, start + j])
            codes[:, :, start + j] = q[..., 0]
            error = (column - value) / u_block[:, j, j][:, None, None]
            w_block[:, :, j:] -= error * u_block[:, None, j, j:]
            errors[:, :, j] = error[..., 0]
        w[:, :, stop:] -= np.matmul(errors, u[:, start:stop, stop:])
    inverse_order = np.argsort(order, axis=1)
    return np.take_along_axis(codes, inverse_order[:, None, :], axis=2)


def gptq_group_codes(
    weights: np.ndarray,
    hessian: np.ndarray | GptqFactor,
    scales: np.ndarray,
    zero_points: np.ndarray,
    group_size: int,
    code_range: tuple[int, int],
    *,
    block: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    row_chunk: int = 8192,
    kept: np.ndarray | None = None,
    kept_values: np.ndarray | None = None,
) -> np.ndarray:
    """Integer codes [R, K] (int16) for ``weights`` [R, K] on a group-wise grid: column k
    uses ``scales[:, k // group_size]`` and ``zero_points[:, k // group_size]`` (value
    ``s (q - z)``, codes clipped to ``code_range``).

    The grid is fixed before the sweep ("static groups"), so act order only changes which
    column is rounded first, never which scale a weight is stored with: the result exports
    as plain blocks. ``hessian``: H [K, K] or its :func:`gptq_factor` of one group
    ([1, K, K]). Rows are independent given H, so they are swept ``row_chunk`` at a time
    (bounded memory for a 262,144-row LM head).

    ``kept`` [K] (bool) marks columns left unrounded: their compensated float values are
    written into ``kept_values`` [R, K] (their codes are meaningless); the factor should
    sweep them last (:func:`gptq_factor` ``last=``)."""
    if kept is not None and kept_values is None:
        raise ValueError("kept columns need a kept_values array to receive them")
    factor = (
        hessian
        if isinstance(hessian, GptqFactor)
        else gptq_factor(hessian[None], damp=damp, act_order=act_order)
    )
    lo, hi = code_range
    group_of = np.arange(weights.shape[1]) // group_size
    out = np.empty(weights.shape, np.int16)
    for first in range(0, weights.shape[0], row_chunk):
        rows = slice(first, first + row_chunk)
        s = scales[rows].astype(np.float64)
        z = zero_points[rows].astype(np.float64)

        def round_column(
            column: np.ndarray,
            positions: np.ndarray,
            s: np.ndarray = s,
            z: np.ndarray = z,
            rows: slice = rows,
        ) -> tuple[np.ndarray, np.ndarray]:
            g = group_of[positions[0]]
            scale, zero = s[None, :, g : g + 1], z[None, :, g : g + 1]
            q = np.clip(np.round(column / scale) + zero, lo, hi)
            if kept_values is not None and kept is not None and kept[positions[0]]:
                # kept exact: no error to push; its compensated value is the result
                kept_values[rows, positions[0]] = column[0, :, 0]
                return q, column
            return q, (q - zero) * scale

        codes = _obq_sweep(weights[None, rows], factor, round_column, block)
        out[rows] = codes[0].astype(np.int16)
    return out
