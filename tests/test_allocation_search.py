"""The budget searches with plans measured in batches: the frontier measures all its plans in
one call; bisection with several probes per round (one per worker) narrows faster and still
keeps the smallest passing plan; a rerun measures nothing again."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from dyadiq.passes.allocation import (
    AllocationProblem,
    Resource,
    bisect_budget,
    size_range,
    sweep,
    totals,
)
from dyadiq.plan import LayerFormat

FORMATS = [LayerFormat(b, 8) for b in (2, 4, 8)]


def _problem() -> AllocationProblem:
    """Six layers; damage falls with width, larger layers are less sensitive per byte."""
    layers = [f"l{i}" for i in range(6)]
    params = {i: 100 * (k + 1) for k, i in enumerate(layers)}
    damage = {
        i: {f: 4.0 ** (2 - f.weight_bits / 2) / (k + 1) for f in FORMATS}
        for k, i in enumerate(layers)
    }
    size = {i: {f: params[i] * f.weight_bits / 8 for f in FORMATS} for i in layers}
    bops = {i: {f: 1.0 for f in FORMATS} for i in layers}
    return AllocationProblem({i: list(FORMATS) for i in layers}, damage, size, bops)


class _Metric:
    """A metric that grows with the plan's size; records how many plans each call measured."""

    def __init__(self, problem: AllocationProblem) -> None:
        self.problem = problem
        self.calls: list[int] = []

    def __call__(self, plans: Sequence[dict[str, LayerFormat]]) -> list[float]:
        self.calls.append(len(plans))
        lo, hi = size_range(self.problem)
        return [(totals(self.problem, p)[Resource.SIZE] - lo) / (hi - lo) for p in plans]


@pytest.mark.parametrize("probes", [1, 3])
def test_bisection_with_several_probes_per_round_keeps_the_smallest_passing_plan(tmp_path, probes):
    problem = _problem()
    measure = _Metric(problem)
    state = tmp_path / "state.json"
    result = bisect_budget(
        problem, measure, threshold=0.5, iterations=3, state_path=state, probes=probes
    )
    assert result.metric is not None and result.metric >= 0.5
    passing = [h for h in result.history if h["passed"]]
    assert result.size_bytes == min(h["size"] for h in passing)
    assert max(measure.calls) <= probes  # one plan per worker per round
    assert len(measure.calls) <= 1 + 3  # the largest plan, then one call per round
    again = _Metric(problem)
    rerun = bisect_budget(
        problem, again, threshold=0.5, iterations=3, state_path=state, probes=probes
    )
    assert again.calls == [] and rerun.size_bytes == result.size_bytes
    assert len(json.loads(state.read_text())) == sum(measure.calls)


def test_more_probes_per_round_get_at_least_as_close_to_the_threshold(tmp_path):
    problem = _problem()
    sizes = {}
    for probes in (1, 4):
        result = bisect_budget(
            problem,
            _Metric(problem),
            threshold=0.3,
            iterations=2,
            state_path=tmp_path / f"s{probes}.json",
            probes=probes,
        )
        sizes[probes] = result.size_bytes
    assert sizes[4] <= sizes[1]


def test_the_frontier_measures_all_its_plans_in_one_call():
    problem = _problem()
    measure = _Metric(problem)
    frontier = sweep(problem, 4, measure)
    assert measure.calls == [4] and len(frontier) == 4
    assert [p.metric for p in frontier] == sorted(p.metric for p in frontier)
