"""Searches over the size budget, each step an ILP solve whose plan a caller measures:

- :func:`bisect_budget` (accuracy-tolerance mode, the 2023 "Augmenting Hessians" procedure):
  halve the size interval until the measured metric is within tolerance;
- :func:`sweep` (the Pareto frontier, HAWQ-V2): budgets evenly spaced over the interval.

Both move in :func:`size_range`'s interval. Measuring a plan (building its model, evaluating
it on held-out data) is the caller's ``measure`` callback: that needs the pipeline and the
evaluation, which sit above allocation in the flow, so only the search logic lives here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.io import write_text_atomic
from dyadiq.passes.allocation.ilp import solve
from dyadiq.passes.allocation.problem import AllocationProblem, Budget, size_range
from dyadiq.plan import LayerFormat

Measure = Callable[[dict[str, LayerFormat]], float]


@dataclass
class BisectionResult:
    formats: dict[str, LayerFormat] | None  # best passing plan (None if none passed)
    size_bytes: float | None
    metric: float | None
    history: list[dict[str, Any]]


def bisect_budget(
    problem: AllocationProblem,
    measure: Measure,
    *,
    threshold: float,
    iterations: int,
    state_path: Path,
) -> BisectionResult:
    """Smallest size (within ``iterations`` halvings) whose plan measures >= ``threshold``.

    The best passing plan found so far is kept, and every measurement is written to
    ``state_path`` after each step, so an interrupted run resumes without re-measuring."""
    state: dict[str, float] = {}
    if state_path.is_file():
        state = {k: float(v) for k, v in json.loads(state_path.read_text()).items()}
    history: list[dict[str, Any]] = []

    def evaluate(budget: float) -> tuple[dict[str, LayerFormat], float, float]:
        allocation = solve(problem, Budget(size_bytes=budget))
        key = json.dumps({k: v.label for k, v in sorted(allocation.formats.items())})
        if key not in state:
            state[key] = measure(dict(allocation.formats))
            write_text_atomic(state_path, json.dumps(state, indent=1))
        history.append(
            {
                "budget": budget,
                "size": allocation.size_bytes,
                "bops": allocation.bops,
                "latency": allocation.latency,
                "metric": state[key],
                "passed": state[key] >= threshold,
            }
        )
        return dict(allocation.formats), allocation.size_bytes, state[key]

    lo, hi = size_range(problem)
    best: tuple[dict[str, LayerFormat], float, float] | None = None
    formats, size, metric = evaluate(hi)
    if metric >= threshold:
        best = (formats, size, metric)
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            formats, size, metric = evaluate(mid)
            if metric >= threshold:
                best, hi = (formats, size, metric), mid
            else:
                lo = mid
    if best is None:
        return BisectionResult(None, None, None, history)
    return BisectionResult(best[0], best[1], best[2], history)


@dataclass(frozen=True)
class FrontierPoint:
    budget_bytes: float
    size_bytes: float
    bops: float
    predicted_damage: float
    metric: float | None
    formats: dict[str, str]
    latency: float | None = None  # the problem's latency table (measured, or its cost model)


def sweep(
    problem: AllocationProblem,
    points: int,
    measure: Callable[[dict[str, LayerFormat]], float | None],
) -> list[FrontierPoint]:
    """Budgets evenly spaced from the smallest feasible size to the largest useful one."""
    smallest, largest = size_range(problem)
    frontier = []
    for budget in np.linspace(smallest, largest, points):
        allocation = solve(problem, Budget(size_bytes=float(budget)))
        metric = measure(dict(allocation.formats))
        frontier.append(
            FrontierPoint(
                float(budget),
                allocation.size_bytes,
                allocation.bops,
                allocation.predicted_damage,
                metric,
                {k: v.label for k, v in allocation.formats.items()},
                allocation.latency,
            )
        )
    return frontier
