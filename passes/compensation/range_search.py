"""Per-channel clipping-scale search (METHODS.md section 5 / issue 12, item 1).

Max-abs scaling s_c = max|W_c| / qmax wastes levels on a channel's outliers; at 4 bits and
below a smaller clip s_c = alpha_c max|W_c| / qmax usually rounds the bulk of the channel
better than it hurts the clipped outliers. For each output channel we pick alpha_c from a grid
(1 included, so the result is never worse than max-abs on the objective) minimising
- the layer output error E||(w_c - Q(w_c)) x||^2 = e^T H e when the input second moment H is
  given (the error the network actually sees), or
- the weight error ||w_c - Q(w_c)||^2 otherwise.
"""

from __future__ import annotations

import numpy as np

from dyadiq.passes.compensation.input_statistics import output_error

_TINY = np.float32(1e-12)


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def max_abs_scales(weights: np.ndarray, bits: int) -> np.ndarray:
    """The max-abs rule of :func:`dyadiq.quantizers.quantize_weight_per_channel`, [G, R]."""
    max_abs = np.max(np.abs(weights), axis=-1).astype(np.float32)
    return np.maximum(max_abs / np.float32(qmax_of(bits)), _TINY).astype(np.float32)


def round_to_grid(weights: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Codes clip(round(w / s), -qmax, qmax) per row; ``scales`` broadcast as [..., R, 1]."""
    qmax = qmax_of(bits)
    return np.clip(np.round(weights / scales[..., None]), -qmax, qmax)


def search_clipping_scales(
    weights: np.ndarray,
    bits: int,
    hessian: np.ndarray | None = None,
    *,
    grid: int = 24,
    lowest: float = 0.35,
) -> np.ndarray:
    """Best per-row scale among alpha * max-abs, alpha in linspace(lowest, 1, grid); [G, R].

    ``weights`` [G, R, d]; ``hessian`` [G, d, d] selects the output-error objective.
    """
    w = weights.astype(np.float32)
    base = max_abs_scales(w, bits)
    best_scale = base.copy()
    best_error = np.full(base.shape, np.inf)
    h = None if hessian is None else hessian.astype(np.float32)
    for alpha in np.linspace(1.0, lowest, grid, dtype=np.float32):
        scales = np.maximum(base * alpha, _TINY)
        delta = w - round_to_grid(w, scales, bits) * scales[..., None]
        error = np.sum(delta * delta, axis=-1) if h is None else output_error(delta, h)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scales, best_scale)
    return best_scale.astype(np.float32)
