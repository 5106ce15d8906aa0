"""Accuracy-tolerance mode: bisect the size budget until the measured metric is within
``max_drop`` of the float model's (the 2023 "Augmenting Hessians" procedure).

Each step solves the ILP at the middle budget, builds the plan and measures it on held-out
data. The best passing plan found so far is kept and every measurement is written to a state
file after each step, so an interrupted run resumes without re-measuring.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyadiq.io import write_text_atomic
from dyadiq.passes.allocation import AllocationProblem, Budget, smallest_total, solve
from dyadiq.plan import LayerFormat


@dataclass
class BisectionResult:
    formats: dict[str, LayerFormat] | None  # best passing plan (None if none passed)
    size_bytes: float | None
    metric: float | None
    history: list[dict[str, Any]]


def bisect_budget(
    problem: AllocationProblem,
    measure: Callable[[dict[str, LayerFormat]], float],
    *,
    threshold: float,
    iterations: int,
    state_path: Path,
) -> BisectionResult:
    """Smallest size (within ``iterations`` halvings) whose plan measures >= ``threshold``."""
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

    lo = smallest_total(problem, problem.size_bytes)
    hi = -smallest_total(
        problem, {i: {f: -v for f, v in t.items()} for i, t in problem.size_bytes.items()}
    )
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
