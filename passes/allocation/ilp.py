"""Bit allocation as an integer linear program (HAWQ-V3), solved with scipy's HiGHS ``milp``.

Variables x[i, f] in {0, 1}: layer i gets candidate format f (weight and activation width);
sum_f x[i, f] = 1.
Objective: sum damage[i][f] x[i, f] + sum over pair terms c_ij(f, g) x[i, f] x[j, g]. Each
pair's products are linearised exactly with the marginal (RLT) constraints
sum_g y[i, f, j, g] = x[i, f] and sum_f y[i, f, j, g] = x[j, g], y >= 0: with one-hot x the
only feasible y is the outer product, and the LP relaxation is far tighter than the three
McCormick inequalities per product. Formats with identical cost rows (e.g. W4A4 and W4A8
when the pair terms depend on weight widths only) share one row of y.
Constraints (any combination): model size, BOPs (MACs x w x a), latency and flash (per-layer,
per-format tables), peak activation RAM (one row per live set of a static schedule).
Ties: layers tied by the graph take identical formats (shared weights); layers that read one
activation site take one activation width but may differ in weight width
(sum over formats of width a of x[i, f] equal across the group, for each a).
An infeasible budget is an error that names the smallest feasible value of each resource.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from dyadiq.errors import ConfigError
from dyadiq.passes.allocation.problem import (
    Allocation,
    AllocationProblem,
    Budget,
    Resource,
    allocation_of,
    smallest_total,
    totals,
    within_limit,
)
from dyadiq.plan import LayerFormat

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _silenced_stdout() -> Iterator[None]:
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


Expression = tuple[dict[tuple[str, LayerFormat], float], float]  # coefficients, constant


def resource_expressions(problem: AllocationProblem, resource: Resource | str) -> list[Expression]:
    """A resource as linear expressions over x; its value is the largest (RAM: one per live
    set; the others: one). A tensor read at the activation width of layer i costs
    sum_f x[i, f] bytes(width of f), exact because exactly one x[i, .] is 1."""
    problem.require(resource)
    if resource == Resource.RAM:
        ram = problem.ram
        assert ram is not None  # require() above
        expressions = []
        for live in ram.live_sets:
            coeffs: dict[tuple[str, LayerFormat], float] = {}
            constant = 0.0
            for tensor in live:
                layer = ram.reader.get(tensor)
                if layer is None or layer not in problem.candidates:
                    constant += ram.fixed_bytes(tensor)
                    continue
                for f in problem.candidates[layer]:
                    key = (layer, f)
                    coeffs[key] = coeffs.get(key, 0.0) + ram.tensor_bytes(tensor, f.act_bits)
            expressions.append((coeffs, constant))
        return expressions
    table = problem.table(resource)
    coeffs = {(i, f): float(table[i][f]) for i, fs in problem.candidates.items() for f in fs}
    return [(coeffs, 0.0)]


class _Formulation:
    """The ILP's variables and rows: x (one per layer and format), then auxiliaries."""

    def __init__(
        self, problem: AllocationProblem, *, with_pairs: bool, linearisation: str = "marginal"
    ) -> None:
        self.problem = problem
        self.index: dict[tuple[str, LayerFormat], int] = {}
        for layer, formats in problem.candidates.items():
            for fmt in formats:
                self.index[(layer, fmt)] = len(self.index)
        self.n_x = len(self.index)
        self.cost: list[float] = [0.0] * self.n_x
        self.upper: list[float] = [1.0] * self.n_x
        self.rows: list[tuple[dict[int, float], float, float]] = []
        for layer, formats in problem.candidates.items():
            self.rows.append(({self.index[(layer, f)]: 1.0 for f in formats}, 1.0, 1.0))
        self._ties()
        if with_pairs and linearisation == "marginal":
            self._pairs()
        elif with_pairs and linearisation == "mccormick":
            self._pairs_mccormick()
        elif with_pairs:
            raise ConfigError(f"unknown linearisation {linearisation!r}: marginal or mccormick")

    def add_variable(self, cost: float, upper: float = 1.0) -> int:
        self.cost.append(cost)
        self.upper.append(upper)
        return len(self.cost) - 1

    def _ties(self) -> None:
        problem, index = self.problem, self.index
        for group in problem.ties:
            shared = set.intersection(*(set(problem.candidates[i]) for i in group))
            for layer in group:
                for fmt in set(problem.candidates[layer]) - shared:
                    self.rows.append(({index[(layer, fmt)]: 1.0}, 0.0, 0.0))
            for other in group[1:]:
                for fmt in shared:
                    self.rows.append(
                        ({index[(group[0], fmt)]: 1.0, index[(other, fmt)]: -1.0}, 0.0, 0.0)
                    )
        for group in problem.act_ties:
            widths = sorted({f.act_bits for i in group for f in problem.candidates[i]})
            for other in group[1:]:
                for width in widths[:-1]:  # the last follows: each side sums to 1
                    row: dict[int, float] = {}
                    for layer, sign in ((group[0], 1.0), (other, -1.0)):
                        for f in problem.candidates[layer]:
                            if f.act_bits == width:
                                row[index[(layer, f)]] = sign
                    self.rows.append((row, 0.0, 0.0))

    def _pairs(self) -> None:
        for pair in self.problem.pairs:
            fa = list(self.problem.candidates.get(pair.a, ()))
            fb = list(self.problem.candidates.get(pair.b, ()))
            if not fa or not fb:
                continue
            if pair.a == pair.b:
                raise ConfigError(f"a pair term pairs layer {pair.a} with itself")
            costs = np.array([[pair.cost.get((f, g), 0.0) for g in fb] for f in fa])
            if not costs.any():
                continue
            row_class: dict[tuple[float, ...], list[int]] = {}
            for r in range(len(fa)):
                row_class.setdefault(tuple(costs[r]), []).append(r)
            col_class: dict[tuple[float, ...], list[int]] = {}
            for c in range(len(fb)):
                col_class.setdefault(tuple(costs[:, c]), []).append(c)
            rows = list(row_class.values())
            cols = list(col_class.values())
            y = [[self.add_variable(float(costs[r[0], c[0]])) for c in cols] for r in rows]
            for k, members in enumerate(rows):  # sum over b's classes = a's class indicator
                marginal = {y[k][m]: 1.0 for m in range(len(cols))}
                marginal.update({self.index[(pair.a, fa[r])]: -1.0 for r in members})
                self.rows.append((marginal, 0.0, 0.0))
            for m, members in enumerate(cols):
                marginal = {y[k][m]: 1.0 for k in range(len(rows))}
                marginal.update({self.index[(pair.b, fb[c])]: -1.0 for c in members})
                self.rows.append((marginal, 0.0, 0.0))

    def _pairs_mccormick(self) -> None:
        """One product variable per nonzero cost with the three McCormick inequalities (the
        first formulation; kept to measure against in benchmarks/allocation.py)."""
        index = self.index
        for pair in self.problem.pairs:
            for fa in self.problem.candidates.get(pair.a, ()):
                for fb in self.problem.candidates.get(pair.b, ()):
                    cost = pair.cost.get((fa, fb), 0.0)
                    if cost == 0.0:
                        continue
                    y, ka, kb = self.add_variable(cost), index[(pair.a, fa)], index[(pair.b, fb)]
                    self.rows.append(({y: 1.0, ka: -1.0, kb: -1.0}, -1.0, np.inf))
                    self.rows.append(({y: 1.0, ka: -1.0}, -np.inf, 0.0))
                    self.rows.append(({y: 1.0, kb: -1.0}, -np.inf, 0.0))

    def add_budget(self, resource: Resource | str, limit: float) -> None:
        for coeffs, constant in resource_expressions(self.problem, resource):
            row = {self.index[k]: v for k, v in coeffs.items()}
            self.rows.append((row, -np.inf, limit - constant))

    def run(self, time_limit: float) -> Any:
        n = len(self.cost)
        data: list[float] = []
        rr: list[int] = []
        cc: list[int] = []
        lower, upper = np.empty(len(self.rows)), np.empty(len(self.rows))
        for r, (coeffs, lo, hi) in enumerate(self.rows):
            rr.extend([r] * len(coeffs))
            cc.extend(coeffs)
            data.extend(coeffs.values())
            lower[r], upper[r] = lo, hi
        matrix = coo_matrix((data, (rr, cc)), shape=(len(self.rows), n)).tocsr()
        integrality = np.concatenate([np.ones(self.n_x), np.zeros(n - self.n_x)])
        with _silenced_stdout():  # scipy's HiGHS prints MIP diagnostics straight to fd 1
            return milp(
                np.asarray(self.cost),
                constraints=LinearConstraint(matrix, lower, upper),
                integrality=integrality,
                bounds=Bounds(np.zeros(n), np.asarray(self.upper)),
                options={"time_limit": time_limit},
            )

    def formats(self, x: np.ndarray) -> dict[str, LayerFormat]:
        return {layer: fmt for (layer, fmt), k in self.index.items() if x[k] > 0.5}


def smallest_feasible(
    problem: AllocationProblem,
    resource: Resource | str,
    budget: Budget | None = None,
    *,
    time_limit: float = 60.0,
) -> float | None:
    """The smallest value of ``resource`` any plan reaches within the other limits of
    ``budget`` (all ties honoured); None when those other limits alone are infeasible."""
    model = _Formulation(problem, with_pairs=False)
    expressions = resource_expressions(problem, resource)
    peak = model.add_variable(1.0, upper=np.inf)  # >= every expression: their maximum
    for coeffs, constant in expressions:
        row = {model.index[k]: v for k, v in coeffs.items()}
        row[peak] = -1.0
        model.rows.append((row, -np.inf, -constant))
    for other, limit in (budget.limits() if budget else {}).items():
        if other != resource:
            model.add_budget(other, limit)
    result = model.run(time_limit)
    if result.x is None:
        return None
    return float(result.x[peak])


def _amount(problem: AllocationProblem, resource: Resource, value: float) -> str:
    if resource.in_bytes:
        return f"{value:,.0f} B"
    if resource is Resource.LATENCY:
        return f"{value:.4g} ms" if problem.latency_measured else f"{value:,.0f} (cost model)"
    return f"{value:,.0f}"


def infeasibility_message(problem: AllocationProblem, budget: Budget) -> str:
    """Name every budget that cannot be met with the smallest feasible value of each: the
    budgets below what any plan reaches on its own; or, when each is feasible alone but not
    together, every budget with its smallest value within the others."""
    limits = budget.limits()

    parts = []
    for resource, limit in limits.items():
        alone = smallest_feasible(problem, resource)
        if within_limit(alone, limit):
            continue
        text = f"{resource} budget {_amount(problem, resource, limit)} is infeasible: "
        if alone is None:
            text += "no plan satisfies the ties and pins"
        else:
            text += (
                f"the smallest achievable {resource} with the allowed formats is "
                f"{_amount(problem, resource, alone)}"
            )
        parts.append(text)
    if parts:
        return "; ".join(parts)
    for resource, limit in limits.items():
        joint = smallest_feasible(problem, resource, budget)
        within = (
            f"it is {_amount(problem, resource, joint)}"
            if joint is not None
            else "none (they conflict among themselves)"
        )
        parts.append(
            f"{resource} budget {_amount(problem, resource, limit)} is infeasible together "
            f"with the others: the smallest achievable {resource} within the other budgets "
            f"{within}"
        )
    return "; ".join(parts)


def solve(
    problem: AllocationProblem,
    budget: Budget,
    *,
    time_limit: float = 60.0,
    linearisation: str = "marginal",
) -> Allocation:
    """The plan of least predicted damage within ``budget`` (pair products linearised by
    ``linearisation``: "marginal", or "mccormick" to compare against)."""
    limits = budget.limits()
    for resource in limits:
        problem.require(resource)
    # cheap necessary condition first: a size / BOPs / latency / flash total under its limit
    for resource, limit in limits.items():
        if resource != Resource.RAM and smallest_total(problem, problem.table(resource)) > limit * (
            1 + 1e-9
        ):
            raise ConfigError(infeasibility_message(problem, budget))
    model = _Formulation(problem, with_pairs=True, linearisation=linearisation)
    for (layer, fmt), k in model.index.items():
        model.cost[k] = float(problem.damage[layer][fmt])
    for resource, limit in limits.items():
        model.add_budget(resource, limit)
    result = model.run(time_limit)
    if result.x is None:
        if result.status == 2:  # infeasible
            raise ConfigError(infeasibility_message(problem, budget))
        raise ConfigError(f"the allocation problem has no solution: {result.message}")
    optimal = result.status == 0
    if not optimal:
        log.warning(
            "ILP stopped before proving optimality (%s); using its best plan", result.message
        )
    return allocation_of(problem, model.formats(result.x), float(result.fun), optimal)


def brute_force(problem: AllocationProblem, budget: Budget) -> Allocation:
    """Exhaustive search (tests only): the optimum the ILP must reach."""
    layers = list(problem.candidates)
    limits = budget.limits()
    best: Allocation | None = None
    for choice in itertools.product(*(problem.candidates[i] for i in layers)):
        formats = dict(zip(layers, choice, strict=True))
        if any(len({formats[i] for i in group}) > 1 for group in problem.ties):
            continue
        if any(len({formats[i].act_bits for i in g}) > 1 for g in problem.act_ties):
            continue
        values = totals(problem, formats)
        if any(values[r] > limit for r, limit in limits.items()):
            continue
        damage = sum(problem.damage[i][f] for i, f in formats.items())
        damage += sum(p.cost.get((formats[p.a], formats[p.b]), 0.0) for p in problem.pairs)
        if best is None or damage < best.predicted_damage:
            best = allocation_of(problem, formats, damage, True)
    if best is None:
        raise ConfigError("no feasible allocation")
    return best
