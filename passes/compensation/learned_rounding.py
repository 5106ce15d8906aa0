"""Learned rounding (AdaRound, Nagel et al. 2020): each weight goes up or down, chosen by
gradient descent on a soft relaxation of the layer's reconstruction error.

Every code is floor(w / s) + h, h in [0, 1] a rectified sigmoid of a free variable v,

    h(v) = clip(sigmoid(v) (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1,

and v minimises, per layer (all output channels at once, every group of a grouped conv),

    L(v) = sum_rows e H e^T / L0  +  lambda * mean_free (1 - |2 h - 1|^beta),
    e = w - s (floor(w / s) + h(v)),

H the layer's input second moment (the objective GPTQ and the range search use), L0 the error
of the codes the pass starts from (so the first term starts near 1 whatever the layer's scale),
beta annealed from 20 to 2 after a warm-up so the regulariser pushes h to 0 or 1 late. The
start, h = frac(w / s), is the relaxation's own optimum (e = 0), so the regulariser is what
moves anything: lambda = 10 against the normalised error (on a random 3-bit layer with
correlated inputs, 300 steps: 0.43 of rounding-to-nearest's error at lambda 10, 0.84 at 0.01;
GPTQ, free to leave floor/ceil, 0.41). The
gradient is analytic: dL/dh = -2 s (e H) / L0 plus the regulariser's, times dh/dv; Adam steps.
At the end h is rounded (h >= 1/2 goes up), and per output channel the pass keeps whichever of
its codes and the codes it was given has the lower e H e^T, so on the calibration objective it
is never worse than its start (GPTQ's codes, or rounding to nearest).

Codes stay in AdaRound's space, the floor or ceiling of w / s (clamped to the code range):
``refine`` measured that free moves fit the calibration Hessian and lose held-out accuracy.
Opt-in (``--compensate range,gptq,adaround,bias``): not measured to help yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dyadiq.passes.compensation.range_search import qmax_of

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class RoundingProblem:
    """One layer's rounding choice: the grid below each weight, which weights may move up,
    the per-row scales, the objective H and the normaliser L0."""

    weights: np.ndarray  # [G, R, d]
    scales: np.ndarray  # [G, R, 1]
    low: np.ndarray  # [G, R, d] code when rounded down (clamped to the range)
    free: np.ndarray  # [G, R, d] bool: floor and floor + 1 both in range
    objective: np.ndarray  # [G, d, d]
    normaliser: float

    def codes(self, h: np.ndarray) -> np.ndarray:
        return self.low + np.where(self.free, h, 0.0)

    def row_errors(self, codes: np.ndarray) -> np.ndarray:
        """e H e^T per output row [G, R]."""
        error = self.weights - codes * self.scales
        return np.einsum("grd,gde,gre->gr", error, self.objective, error)


def rectified_sigmoid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h(v) and dh/dv (0 where h is clipped)."""
    sigmoid = 1.0 / (1.0 + np.exp(-v))
    h = np.clip(sigmoid * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    slope = np.where((h > 0) & (h < 1), sigmoid * (1 - sigmoid) * (ZETA - GAMMA), 0.0)
    return h, slope


def loss_and_gradient(
    problem: RoundingProblem, v: np.ndarray, regulariser: float, beta: float | None
) -> tuple[float, np.ndarray]:
    """L(v) and dL/dv (module docstring); ``beta`` None: no regulariser (warm-up)."""
    h, slope = rectified_sigmoid(v)
    error = problem.weights - problem.codes(h) * problem.scales
    product = np.matmul(error, problem.objective)  # e H per row (H symmetric)
    loss = float(np.sum(product * error)) / problem.normaliser
    grad_h = -2.0 * product * problem.scales / problem.normaliser
    if beta is not None and regulariser > 0:
        weight = regulariser / max(int(problem.free.sum()), 1)  # lambda * mean over free
        centred = 2 * h - 1
        loss += weight * float(np.sum(np.where(problem.free, 1 - np.abs(centred) ** beta, 0)))
        grad_h = grad_h - weight * 2 * beta * np.abs(centred) ** (beta - 1) * np.sign(centred)
    grad_v = np.where(problem.free, grad_h * slope, 0.0)
    return loss, grad_v


def rounding_problem(
    weights: np.ndarray, codes: np.ndarray, scales: np.ndarray, objective: np.ndarray, bits: int
) -> RoundingProblem:
    qmax = qmax_of(bits)
    w = weights.astype(np.float64)
    s = scales.astype(np.float64)[..., None]
    floor = np.floor(w / s)
    free = (floor >= -qmax) & (floor + 1 <= qmax)
    low = np.clip(floor, -qmax, qmax)
    h = objective.astype(np.float64)
    start = RoundingProblem(w, s, low, free, h, 1.0)
    normaliser = float(start.row_errors(codes.astype(np.float64)).sum())
    return RoundingProblem(w, s, low, free, h, max(normaliser, 1e-30))


def learn_rounding(
    weights: np.ndarray,
    codes: np.ndarray,
    scales: np.ndarray,
    objective: np.ndarray,
    bits: int,
    *,
    iterations: int = 300,
    learning_rate: float = 0.02,
    regulariser: float = 10.0,
    warmup: float = 0.2,
    beta_range: tuple[float, float] = (20.0, 2.0),
) -> tuple[np.ndarray, int]:
    """Codes [G, R, d] on ``scales`` [G, R] with no larger e H e^T per row than ``codes``,
    and how many rows took the learned codes. ``weights``, ``codes`` [G, R, d]; ``objective``
    H [G, d, d] symmetric positive semidefinite."""
    problem = rounding_problem(weights, codes, scales, objective, bits)
    rest = np.clip(problem.weights / problem.scales - problem.low, 0.01, 0.99)
    v = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1)  # h(v) = the fractional part
    first, second = np.zeros_like(v), np.zeros_like(v)
    start = int(warmup * iterations)
    for step in range(1, iterations + 1):
        beta = None
        if step > start:
            progress = (step - start) / max(iterations - start, 1)
            beta = beta_range[0] + (beta_range[1] - beta_range[0]) * progress
        _, grad = loss_and_gradient(problem, v, regulariser, beta)
        first = 0.9 * first + 0.1 * grad
        second = 0.999 * second + 0.001 * grad**2
        corrected = first / (1 - 0.9**step) / (np.sqrt(second / (1 - 0.999**step)) + 1e-8)
        v -= learning_rate * corrected
    h, _ = rectified_sigmoid(v)
    learned = problem.codes((h >= 0.5).astype(np.float64))
    given = codes.astype(np.float64)
    better = problem.row_errors(learned) < problem.row_errors(given)
    return np.where(better[..., None], learned, given), int(better.sum())
