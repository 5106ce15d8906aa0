"""Searches over the size budget, each step an ILP solve whose plan a caller measures:

- :func:`bisect_budget` (accuracy-tolerance mode, the 2023 "Augmenting Hessians" procedure):
  narrow the size interval until the measured metric is within tolerance - by halving, or,
  with ``probes`` > 1 plans measured at once (one per worker), by splitting it into
  ``probes + 1`` parts per round;
- :func:`sweep` (the Pareto frontier, HAWQ-V2): budgets evenly spaced over the interval.

Both move in :func:`size_range`'s interval. Measuring plans (building their models,
evaluating them on held-out data) is the caller's ``measure`` callback, which takes a list of
plans so that it can score them in parallel (the analysis executor): that needs the pipeline
and the evaluation, which sit above allocation in the flow, so only the search logic lives
here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.io import write_text_atomic
from dyadiq.passes.allocation.ilp import solve
from dyadiq.passes.allocation.problem import AllocationProblem, Budget, size_range
from dyadiq.plan import LayerFormat

Measure = Callable[[Sequence[dict[str, LayerFormat]]], list[float]]  # plans -> metrics


def measure_each(measure_one: Callable[[dict[str, LayerFormat]], float]) -> Measure:
    """A one-plan measure as a :data:`Measure` (plans one after the other)."""
    return lambda plans: [measure_one(p) for p in plans]


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
    probes: int = 1,
    higher_is_better: bool = True,
) -> BisectionResult:
    """Smallest size (within ``iterations`` rounds) whose plan measures >= ``threshold``
    (<= it for a metric where lower is better, such as an error).

    Each round measures ``probes`` budgets evenly inside the interval (1: its midpoint, a
    bisection); the interval becomes (largest failing budget below the smallest passing one,
    smallest passing one). The best passing plan found so far is kept, and every
    measurement is written to ``state_path`` after each round, so an interrupted run resumes
    without re-measuring."""
    state: dict[str, float] = {}
    if state_path.is_file():
        state = {k: float(v) for k, v in json.loads(state_path.read_text()).items()}
    history: list[dict[str, Any]] = []

    def ok(metric: float) -> bool:
        return metric >= threshold if higher_is_better else metric <= threshold

    def evaluate(budgets: Sequence[float]) -> list[tuple[dict[str, LayerFormat], float, float]]:
        allocations = [solve(problem, Budget(size_bytes=b)) for b in budgets]
        keys = [json.dumps({k: v.label for k, v in sorted(a.formats.items())}) for a in allocations]
        todo = [i for i, key in enumerate(keys) if key not in state]
        todo = [i for n, i in enumerate(todo) if keys[i] not in {keys[j] for j in todo[:n]}]
        if todo:
            values = measure([dict(allocations[i].formats) for i in todo])
            state.update({keys[i]: float(v) for i, v in zip(todo, values, strict=True)})
            write_text_atomic(state_path, json.dumps(state, indent=1))
        out = []
        for budget, allocation, key in zip(budgets, allocations, keys, strict=True):
            history.append(
                {
                    "budget": budget,
                    "size": allocation.size_bytes,
                    "bops": allocation.bops,
                    "latency": allocation.latency,
                    "metric": state[key],
                    "passed": ok(state[key]),
                }
            )
            out.append((dict(allocation.formats), allocation.size_bytes, state[key]))
        return out

    lo, hi = size_range(problem)
    best: tuple[dict[str, LayerFormat], float, float] | None = None
    ((formats, size, metric),) = evaluate([hi])
    if ok(metric):
        best = (formats, size, metric)
        for _ in range(iterations):
            budgets = [lo + (hi - lo) * (j + 1) / (probes + 1) for j in range(probes)]
            measured = list(zip(budgets, evaluate(budgets), strict=True))
            passing = [(b, m) for b, m in measured if ok(m[2])]
            if passing:
                hi, best = passing[0]  # budgets ascend: the smallest passing one
            failing = [b for b, m in measured if not ok(m[2]) and b < hi]
            if failing:
                lo = failing[-1]
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
    measure: Callable[[Sequence[dict[str, LayerFormat]]], Sequence[float | None]],
) -> list[FrontierPoint]:
    """Budgets evenly spaced from the smallest feasible size to the largest useful one; every
    plan is solved first, then all are measured in one call (in parallel where it can)."""
    smallest, largest = size_range(problem)
    budgets = [float(b) for b in np.linspace(smallest, largest, points)]
    allocations = [solve(problem, Budget(size_bytes=b)) for b in budgets]
    metrics = measure([dict(a.formats) for a in allocations])
    frontier = []
    for budget, allocation, metric in zip(budgets, allocations, metrics, strict=True):
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
