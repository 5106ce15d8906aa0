"""Randomised linear algebra on implicit matrices, with seeds and error bars.

``hutchinson_trace``: Tr(A) = E[v^T A v] for Rademacher v (HAWQ-V2), stopping once the
standard error falls below ``rtol`` times the running mean (after ``min_iters``).
``hutchinson_stop``: that stopping rule on samples already drawn, so that a caller drawing
probes in parallel rounds (the analysis executor) stops at exactly the sample a sequential
loop would have stopped at, whatever the round sizes.
``power_iteration``: the top eigenvalue of a symmetric PSD A from A v products (HAWQ),
stopping when successive Rayleigh quotients agree to ``rtol``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    mean: float
    stderr: float
    samples: int

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "stderr": self.stderr, "samples": self.samples}

    @property
    def relative_stderr(self) -> float:
        return self.stderr / abs(self.mean) if self.mean else float("inf")


def rademacher(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 2, size=shape).astype(np.float32) * 2 - 1


def _converged(head: np.ndarray, rtol: float) -> bool:
    mean = float(head.mean())
    stderr = float(head.std(ddof=1) / np.sqrt(head.size))
    return abs(mean) > 0 and stderr <= rtol * abs(mean)


def hutchinson_stop(
    values: Sequence[float], *, min_iters: int, rtol: float, checked: int = 0
) -> int | None:
    """The smallest n >= ``min_iters`` at which the first n samples' standard error is within
    ``rtol`` of their mean (None: no prefix of ``values`` meets it). ``checked``: prefixes up
    to this length are known not to meet it (an earlier round looked at them)."""
    arr = np.asarray(values, np.float64)
    for n in range(max(min_iters, 2, checked + 1), arr.size + 1):
        if _converged(arr[:n], rtol):
            return n
    return None


def estimate_of(values: Sequence[float]) -> Estimate:
    """Mean and standard error of the mean of independent samples."""
    arr = np.asarray(values, np.float64)
    stderr = float(arr.std(ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else float("inf")
    return Estimate(float(arr.mean()), stderr, int(arr.size))


def hutchinson_trace(
    quadratic_form: Callable[[np.ndarray], float],
    shape: tuple[int, ...],
    *,
    rng: np.random.Generator,
    max_iters: int = 100,
    min_iters: int = 8,
    rtol: float = 0.05,
) -> Estimate:
    """Estimate Tr(A) from ``quadratic_form(v) = v^T A v``."""
    values: list[float] = []
    for _ in range(max_iters):
        values.append(float(quadratic_form(rademacher(rng, shape))))
        if len(values) >= max(min_iters, 2) and _converged(np.asarray(values), rtol):
            break
    return estimate_of(values)


def power_iteration(
    matvec: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, ...],
    *,
    rng: np.random.Generator,
    max_iters: int = 50,
    rtol: float = 1e-3,
) -> Estimate:
    """Top eigenvalue of a symmetric PSD operator; stderr is the last relative change."""
    v = rng.normal(size=shape).astype(np.float64)
    v /= np.linalg.norm(v)
    eigenvalue, change = 0.0, float("inf")
    for i in range(max_iters):
        w = np.asarray(matvec(v.astype(np.float32)), np.float64)
        new = float(np.vdot(v, w))
        change = abs(new - eigenvalue)
        eigenvalue = new
        norm = np.linalg.norm(w)
        if norm == 0:
            return Estimate(0.0, 0.0, i + 1)
        v = w / norm
        if i > 0 and change <= rtol * abs(eigenvalue):
            return Estimate(eigenvalue, change, i + 1)
    return Estimate(eigenvalue, change, max_iters)
