"""Streaming second moments of a layer's input rows: all GPTQ, the output-error range search
and bias correction need.

For each group g: H[g] = E[x x^T] (d x d) and mu[g] = E[x], accumulated batch by batch over
the rows ``LayerGeometry.input_rows`` yields, so memory is one batch of patches plus G d^2
floats whatever the amount of calibration data (MiniLM's widest MatMul input, d = 1536:
1536^2 float64 = 18 MiB). The layer output error of weights W' against W on these inputs is

    E ||(W - W') x||^2 = sum_rows (w - w')^T H (w - w')      (GPTQ's objective, H = 2 X X^T / n
                                                             up to the constant factor),
and its mean  E[(W - W') x] = (W - W') mu, what bias correction removes.
"""

from __future__ import annotations

import numpy as np

_ROWS_PER_STEP = 65536  # im2col rows processed at once: bounds the temporary patch memory
_CONTIGUOUS_FROM_COLUMNS = 64


class InputStatistics:
    def __init__(self, groups: int, columns: int) -> None:
        self.second = np.zeros((groups, columns, columns), np.float64)
        self.first = np.zeros((groups, columns), np.float64)
        self.count = 0

    def update(self, rows: np.ndarray) -> None:
        """Add rows [G, P, d]."""
        for start in range(0, rows.shape[1], _ROWS_PER_STEP):
            chunk = rows[:, start : start + _ROWS_PER_STEP].astype(np.float32, copy=False)
            transposed = chunk.transpose(0, 2, 1)
            if chunk.shape[2] >= _CONTIGUOUS_FROM_COLUMNS:
                # numpy takes a slow path for x^T x on a transposed view of wide rows (measured
                # 20x slower at d = 144); a contiguous copy gets the plain BLAS product
                transposed = np.ascontiguousarray(transposed)
            self.second += np.matmul(transposed, chunk).astype(np.float64)
            self.first += chunk.sum(axis=1, dtype=np.float64)  # float64: bias correction
            self.count += chunk.shape[1]

    @property
    def hessian(self) -> np.ndarray:
        """E[x x^T] per group, [G, d, d]."""
        return self.second / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        """E[x] per group, [G, d]."""
        return self.first / max(self.count, 1)


def output_error(delta: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """E ||delta x||^2 per row: delta [G, R, d], hessian [G, d, d] -> [G, R].

    In float32 (an error measure, compared and reported, never accumulated): the d x d
    products are most of compensation's time and float32 halves them."""
    delta32 = delta.astype(np.float32, copy=False)
    product = np.matmul(delta32, hessian.astype(np.float32, copy=False))
    return np.einsum("grd,grd->gr", product, delta32).astype(np.float64)
