"""Measured refinement of a plan: local, budget-neutral moves around the ILP's choice, each
candidate plan scored as a whole model.

The ILP minimises a sum of single-layer damages measured with every other layer in float. It
cannot see what a whole plan costs once every layer and every 8-bit activation are quantized
together (benchmarks/results/compensation.md: on MobileNetV2 at 4.5 average weight bits the
additive model predicts the weight-only loss well, the A8 interaction is what it misses). Here
the ILP's plan is the start; each step tries plans one move away, where a move raises one
layer (or tie group) one candidate width and, if the budget needs it, lowers another one
width. Moves are tried in the order of the ILP's own damage table (the smallest predicted
increase first); a plan is kept when the caller's ``loss`` (lower is better, e.g. KL to the
float model on calibration batches the compensation did not read) falls below the current
plan's. The search stops after ``evaluations`` measured plans or when no move improves.

Measuring plans is the caller's (it needs the pipeline and the model, which sit above
allocation); the search, like :mod:`.search`, only decides which plans to measure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dyadiq.passes.allocation.problem import AllocationProblem, Budget, totals, within_limit
from dyadiq.plan import LayerFormat

Loss = Callable[[Sequence[dict[str, LayerFormat]]], list[float]]  # plans -> loss, lower better


@dataclass(frozen=True)
class Move:
    """New formats for some layers, and the change of the ILP's predicted damage."""

    changes: Mapping[str, LayerFormat]
    predicted_change: float

    def describe(self) -> list[dict[str, str]]:
        return [{"layer": k, "format": f.label} for k, f in sorted(self.changes.items())]


@dataclass
class RefinementResult:
    formats: dict[str, LayerFormat]
    start_loss: float
    loss: float
    evaluations: int  # plans measured, the start plan included
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(1 for h in self.history if h["accepted"])

    def summary(self) -> dict[str, Any]:
        return {
            "start_loss": self.start_loss,
            "loss": self.loss,
            "evaluations": self.evaluations,
            "accepted_moves": self.accepted,
            "history": self.history,
        }


def _units(problem: AllocationProblem) -> list[tuple[str, ...]]:
    """Layers that move together: each tie group, and every untied layer alone."""
    tied = [tuple(group) for group in problem.ties]
    in_groups = {i for group in tied for i in group}
    return tied + [(i,) for i in problem.candidates if i not in in_groups]


def _neighbour(
    problem: AllocationProblem, unit: tuple[str, ...], formats: Mapping[str, LayerFormat], step: int
) -> LayerFormat | None:
    """The unit's next wider (step +1) or narrower (-1) weight width at its activation width,
    allowed for every layer of the unit; None at the end of its candidates."""
    current = formats[unit[0]]
    shared = set.intersection(*(set(problem.candidates[i]) for i in unit))
    widths = sorted(f.weight_bits for f in shared if f.act_bits == current.act_bits)
    if current.weight_bits not in widths:
        return None
    position = widths.index(current.weight_bits) + step
    if not 0 <= position < len(widths):
        return None
    return LayerFormat(widths[position], current.act_bits)


def _fits(problem: AllocationProblem, formats: Mapping[str, LayerFormat], budget: Budget) -> bool:
    used = totals(problem, formats)
    return all(within_limit(used[r], limit) for r, limit in budget.limits().items())


def _damage(problem: AllocationProblem, unit: tuple[str, ...], fmt: LayerFormat) -> float:
    return sum(problem.damage[i][fmt] for i in unit)


def neighbour_moves(
    problem: AllocationProblem, formats: Mapping[str, LayerFormat], budget: Budget
) -> list[Move]:
    """Every move one step from ``formats`` that stays within ``budget``: a unit one width up
    alone (where the budget has room), or one width up with another unit one width down;
    sorted by the predicted damage change (smallest first)."""
    units = _units(problem)
    ups: list[tuple[tuple[str, ...], LayerFormat, float]] = []
    downs: list[tuple[tuple[str, ...], LayerFormat, float]] = []
    for unit in units:
        current = formats[unit[0]]
        for step, into in ((1, ups), (-1, downs)):
            fmt = _neighbour(problem, unit, formats, step)
            if fmt is not None:
                change = _damage(problem, unit, fmt) - _damage(problem, unit, current)
                into.append((unit, fmt, change))
    moves: list[Move] = []
    for up_unit, up_fmt, up_change in ups:
        raised = {**formats, **{i: up_fmt for i in up_unit}}
        if _fits(problem, raised, budget):
            moves.append(Move({i: up_fmt for i in up_unit}, up_change))
        for down_unit, down_fmt, down_change in downs:
            if down_unit == up_unit:
                continue
            changes = {**{i: up_fmt for i in up_unit}, **{i: down_fmt for i in down_unit}}
            if _fits(problem, {**formats, **changes}, budget):
                moves.append(Move(changes, up_change + down_change))
    moves.sort(key=lambda m: m.predicted_change)
    return moves


def _key(formats: Mapping[str, LayerFormat]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, f.label) for k, f in formats.items()))


def refine_plan(
    problem: AllocationProblem,
    formats: Mapping[str, LayerFormat],
    budget: Budget,
    loss: Loss,
    evaluations: int,
    *,
    probes: int = 1,
) -> RefinementResult:
    """Greedy first-improvement local search from ``formats`` (see the module docstring):
    at most ``evaluations`` plans measured, the start plan included; ``probes`` plans are
    measured per call to ``loss`` (one per worker), the best improving one kept."""
    current = dict(formats)
    (start,) = loss([current])
    result = RefinementResult(dict(current), start, start, 1)
    seen = {_key(current)}
    while result.evaluations < evaluations:
        batch: list[Move] = []
        for move in neighbour_moves(problem, current, budget):
            key = _key({**current, **move.changes})
            if key in seen:
                continue
            batch.append(move)
            if len(batch) == min(probes, evaluations - result.evaluations):
                break
        if not batch:
            break  # a local optimum of the measured loss: no untried move left
        plans = [{**current, **m.changes} for m in batch]
        losses = loss(plans)
        result.evaluations += len(plans)
        best = min(range(len(plans)), key=lambda k: losses[k])
        for k, (move, value) in enumerate(zip(batch, losses, strict=True)):
            seen.add(_key(plans[k]))
            result.history.append(
                {
                    "moves": move.describe(),
                    "predicted_change": move.predicted_change,
                    "loss": value,
                    "accepted": k == best and value < result.loss,
                }
            )
        if losses[best] < result.loss:
            current, result.loss = plans[best], losses[best]
            result.formats = dict(current)
    return result
