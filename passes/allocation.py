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
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph
from dyadiq.passes.allocation_costs import (
    FLASH_ESTIMATE,
    LATENCY_COST_MODEL,
    CostTable,
    RamModel,
    activation_ties,
    as_cost_table,
    flash_estimate,
    latency_cost_model,
    layer_macs,
    ram_model,
)
from dyadiq.passes.sensitivity.analysis import SensitivityReport, layer_damage, pair_damage
from dyadiq.plan import LayerFormat

log = logging.getLogger(__name__)

RESOURCES = ("size", "bops", "latency", "flash", "ram")
W8A8 = LayerFormat(8, 8)


@dataclass(frozen=True)
class PairCost:
    a: str
    b: str
    cost: Mapping[tuple[LayerFormat, LayerFormat], float]  # (format of a, format of b) -> cost


@dataclass(frozen=True)
class AllocationProblem:
    candidates: Mapping[str, Sequence[LayerFormat]]  # layer -> formats it may take
    damage: Mapping[str, Mapping[LayerFormat, float]]
    size_bytes: Mapping[str, Mapping[LayerFormat, float]]
    bops: Mapping[str, Mapping[LayerFormat, float]] = field(default_factory=dict)
    pairs: Sequence[PairCost] = ()
    ties: Sequence[Sequence[str]] = ()  # identical formats
    act_ties: Sequence[Sequence[str]] = ()  # identical activation widths only
    latency: CostTable = field(default_factory=dict)
    flash: CostTable = field(default_factory=dict)
    ram: RamModel | None = None
    latency_measured: bool = False  # a backend's table in ms; else a relative cost model
    latency_source: str = ""
    flash_source: str = ""

    def __post_init__(self) -> None:
        empty = [k for k, v in self.candidates.items() if not v]
        if empty:
            raise ConfigError(f"layers with no allowed format (contradictory pins?): {empty}")
        for group in self.ties:
            shared = set.intersection(*(set(self.candidates[i]) for i in group))
            if not shared:
                raise ConfigError(f"tied layers {list(group)} have no format in common")
        for group in self.act_ties:
            widths = [{f.act_bits for f in self.candidates[i]} for i in group]
            if not set.intersection(*widths):
                raise ConfigError(
                    f"layers {list(group)} read one activation but have no activation width "
                    "in common (contradictory pins?)"
                )
        for name, table in (("latency", self.latency), ("flash", self.flash)):
            if not table:
                continue
            missing = [
                f"{i} {f.label}"
                for i, formats in self.candidates.items()
                for f in formats
                if f not in table.get(i, {})
            ]
            if missing:
                raise ConfigError(f"the {name} table has no entry for: {', '.join(missing)}")

    def table(self, resource: str) -> CostTable:
        """The per-layer cost table of a linear resource (size, bops, latency, flash)."""
        return {
            "size": self.size_bytes,
            "bops": self.bops,
            "latency": self.latency,
            "flash": self.flash,
        }[resource]

    def has(self, resource: str) -> bool:
        return self.ram is not None if resource == "ram" else bool(self.table(resource))


@dataclass(frozen=True)
class Budget:
    size_bytes: float | None = None
    bops: float | None = None
    latency: float | None = None  # ms with a measured table, else the cost model's units
    flash_bytes: float | None = None
    ram_bytes: float | None = None

    def limits(self) -> dict[str, float]:
        values = (self.size_bytes, self.bops, self.latency, self.flash_bytes, self.ram_bytes)
        return {r: v for r, v in zip(RESOURCES, values, strict=True) if v is not None}


@dataclass(frozen=True)
class Allocation:
    formats: Mapping[str, LayerFormat]
    predicted_damage: float
    size_bytes: float
    bops: float
    optimal: bool = True  # False: HiGHS stopped at its time limit with a feasible plan
    latency: float | None = None
    flash_bytes: float | None = None
    peak_ram_bytes: float | None = None


def totals(problem: AllocationProblem, formats: Mapping[str, LayerFormat]) -> dict[str, float]:
    """Every resource the problem models, for one assignment of formats."""
    out = {}
    for resource in RESOURCES:
        if resource == "ram":
            if problem.ram is not None:
                out["ram"] = problem.ram.peak(formats)
        elif problem.has(resource) or resource in ("size", "bops"):
            table = problem.table(resource)
            out[resource] = float(sum(table.get(i, {}).get(f, 0.0) for i, f in formats.items()))
    return out


def _allocation(
    problem: AllocationProblem, formats: Mapping[str, LayerFormat], damage: float, optimal: bool
) -> Allocation:
    t = totals(problem, formats)
    return Allocation(
        dict(formats),
        damage,
        t["size"],
        t["bops"],
        optimal,
        t.get("latency"),
        t.get("flash"),
        t.get("ram"),
    )


def smallest_total(
    problem: AllocationProblem, table: Mapping[str, Mapping[LayerFormat, float]]
) -> float:
    """The smallest achievable total of a per-layer cost, honouring (full-format) ties."""
    tied = {i for group in problem.ties for i in group}
    total = sum(
        min(table[i][f] for f in problem.candidates[i]) for i in problem.candidates if i not in tied
    )
    for group in problem.ties:
        shared = set.intersection(*(set(problem.candidates[i]) for i in group))
        total += min(sum(table[i][f] for i in group) for f in shared)
    return total


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


def resource_expressions(problem: AllocationProblem, resource: str) -> list[Expression]:
    """A resource as linear expressions over x; its value is the largest (RAM: one per live
    set; the others: one). A tensor read at the activation width of layer i costs
    sum_f x[i, f] bytes(width of f), exact because exactly one x[i, .] is 1."""
    if resource == "ram":
        ram = problem.ram
        if ram is None:
            raise ConfigError("a RAM budget needs a memory plan (live sets): --memory-plan FILE")
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
    if not problem.has(resource):
        raise ConfigError(f"no {resource} table for this problem: cannot budget {resource}")
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
            raise ValueError(f"unknown linearisation {linearisation!r}")

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

    def add_budget(self, resource: str, limit: float) -> None:
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
    resource: str,
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


def _amount(problem: AllocationProblem, resource: str, value: float) -> str:
    if resource in ("size", "flash", "ram"):
        return f"{value:,.0f} B"
    if resource == "latency":
        return f"{value:.4g} ms" if problem.latency_measured else f"{value:,.0f} (cost model)"
    return f"{value:,.0f}"


def infeasibility_message(problem: AllocationProblem, budget: Budget) -> str:
    """Name every budget that cannot be met with the smallest feasible value of each: the
    budgets below what any plan reaches on its own; or, when each is feasible alone but not
    together, every budget with its smallest value within the others."""
    limits = budget.limits()

    def fits(value: float | None, limit: float) -> bool:
        return value is not None and value <= limit * (1 + 1e-9)

    parts = []
    for resource, limit in limits.items():
        alone = smallest_feasible(problem, resource)
        if fits(alone, limit):
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
        if not problem.has(resource):
            resource_expressions(problem, resource)  # raises the error that names the table
    # cheap necessary condition first: a size / BOPs / latency / flash total under its limit
    for resource, limit in limits.items():
        if resource != "ram" and smallest_total(problem, problem.table(resource)) > limit * (
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
    return _allocation(problem, model.formats(result.x), float(result.fun), optimal)


def brute_force(problem: AllocationProblem, budget: Budget) -> Allocation:
    """Exhaustive search (tests only): the optimum the ILP must reach."""
    import itertools

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
            best = _allocation(problem, formats, damage, True)
    if best is None:
        raise ConfigError("no feasible allocation")
    return best


def shared_weight_ties(graph: QGraph, layers: Sequence[str]) -> list[list[str]]:
    by_weight: dict[str, list[str]] = {}
    for layer in layers:
        weight = graph.weight(graph.node(layer))
        if weight is not None:
            by_weight.setdefault(weight.name, []).append(layer)
    return [group for group in by_weight.values() if len(group) > 1]


def report_activation_damage(report: SensitivityReport) -> Mapping[str, Mapping[int, float]] | None:
    """{layer id: {activation bits: damage}} for the layers whose input is one activation site
    the report measured (that site alone quantized); None when it measured none."""
    table = {i: layer.activation_damage for i, layer in report.layers.items()}
    return {i: d for i, d in table.items() if d} or None


def problem_from_report(
    graph: QGraph,
    report: SensitivityReport,
    formats: Sequence[LayerFormat],
    proxy: str = "empirical",
    candidates: Mapping[str, Sequence[LayerFormat]] | None = None,
    *,
    act_bits: int = 8,
    activation_damage: Mapping[str, Mapping[int, float]] | None = None,
    latency: Mapping[str, Mapping[Any, float]] | None = None,
    flash: Mapping[str, Mapping[Any, float]] | None = None,
    ram_live_sets: Sequence[Iterable[str]] | None = None,
    tensor_bytes: Mapping[str, float | Mapping[int, float]] | None = None,
) -> AllocationProblem:
    """The ILP for a model: damage(layer, W w A a) = weight damage(w) + activation damage(a).

    Without activation damage (argument or report), activations stay at ``act_bits`` (pinned
    layers keep their pins). Activation ties and the layers that cannot go below
    ``act_bits`` come from the activation sites. Tables: ``latency`` a backend's measured
    {layer: {format: ms}} (else the MACs x w x a cost model), ``flash`` {layer: {format:
    bytes}} (else an estimate), ``ram_live_sets`` the tensors live at each step of a static
    schedule with ``tensor_bytes`` {tensor: bytes or {act bits: bytes}} (else graph shapes,
    int8 containers). Table rows may be keyed by LayerFormat or by label ("W4A8").
    """
    layers = list(report.layers)
    missing = [f for f in formats if f.weight_bits not in report.layers[layers[0]].empirical_damage]
    if missing:
        raise ConfigError(
            f"the sensitivity report has no data for {[f.label for f in missing]}; "
            "rerun analyze with those widths"
        )
    allowed = {
        i: list(candidates[i]) if candidates and i in candidates else list(formats) for i in layers
    }
    act_damage = activation_damage
    if act_damage is None:
        act_damage = report_activation_damage(report)
    act = activation_ties(graph, layers, act_bits)
    if act_damage is None and any(f.act_bits != act_bits for f in formats):
        log.warning(
            "the sensitivity report has no activation damage: activations stay at A%d", act_bits
        )
    for i in layers:
        at_default = [f for f in allowed[i] if f.act_bits == act_bits]
        if at_default and (act_damage is None or i not in act_damage):
            allowed[i] = at_default  # no measured damage: activation width stays fixed
        if i in act.shared_with_others:
            narrowed = [f for f in allowed[i] if f.act_bits >= act_bits]
            if not narrowed:
                raise ConfigError(
                    f"layer {i}'s input activation is also read by ops outside the plan, which "
                    f"keep it at A{act_bits}: {[f.label for f in allowed[i]]} cannot apply"
                )
            allowed[i] = narrowed
    counted: set[tuple[str, ...]] = set()
    damage: dict[str, dict[LayerFormat, float]] = {}
    for i in layers:
        own_input = bool(act.inputs[i]) and act.inputs[i] not in counted
        counted.add(act.inputs[i])  # one tensor read by two layers: its damage counts once
        row = {}
        for f in allowed[i]:
            value = layer_damage(report.layers[i], f.weight_bits, proxy)
            if act_damage is not None and own_input and i in act_damage:
                if f.act_bits not in act_damage[i]:
                    raise ConfigError(f"no activation damage for layer {i} at A{f.act_bits}")
                value += float(act_damage[i][f.act_bits])
            row[f] = value
        damage[i] = row
    size = {i: {f: report.layers[i].params * f.weight_bits / 8 for f in allowed[i]} for i in layers}
    macs = {i: layer_macs(graph, i) for i in layers}
    bops = {i: {f: macs[i] * f.weight_bits * f.act_bits for f in allowed[i]} for i in layers}
    pairs = []
    if proxy.endswith("+pairs"):
        for term in report.pairs:
            cost = {
                (fa, fb): pair_damage(report, term, fa.weight_bits, fb.weight_bits)
                for fa in allowed[term.a]
                for fb in allowed[term.b]
            }
            pairs.append(PairCost(term.a, term.b, cost))
    ram = None
    if ram_live_sets is not None:
        live = [sorted(s) for s in ram_live_sets]
        ram = ram_model(graph, live, tensor_bytes, act, act_bits)
    return AllocationProblem(
        allowed,
        damage,
        size,
        bops,
        pairs,
        shared_weight_ties(graph, layers),
        act.ties,
        latency=as_cost_table(latency)
        if latency is not None
        else latency_cost_model(graph, allowed),
        flash=as_cost_table(flash) if flash is not None else flash_estimate(graph, allowed),
        ram=ram,
        latency_measured=latency is not None,
        latency_source="measured table" if latency is not None else LATENCY_COST_MODEL,
        flash_source="backend table" if flash is not None else FLASH_ESTIMATE,
    )


def layer_table(problem: AllocationProblem, allocation: Allocation) -> dict[str, dict[str, Any]]:
    """Per layer: chosen format, its predicted damage, and its share of each resource."""
    out: dict[str, dict[str, Any]] = {}
    for i, f in allocation.formats.items():
        row: dict[str, Any] = {"format": f.label, "damage": problem.damage[i][f]}
        for resource, key in (
            ("size", "size_bytes"),
            ("bops", "bops"),
            ("latency", "latency"),
            ("flash", "flash_bytes"),
        ):
            if problem.has(resource):
                row[key] = problem.table(resource)[i][f]
        out[i] = row
    return out


# --- budgets -----------------------------------------------------------------------------------

_BYTES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2}
_MS = {"ms": 1.0, "us": 1e-3, "s": 1e3}


def _params(problem: AllocationProblem, layer: str) -> float:
    fmt, nbytes = next(iter(problem.size_bytes[layer].items()))
    return nbytes * 8 / fmt.weight_bits


def uniform_w8a8(problem: AllocationProblem) -> dict[str, LayerFormat]:
    """All-W8A8, or each layer's widest candidate where W8A8 is not allowed (pins)."""
    return {
        i: W8A8 if W8A8 in fs else max(fs, key=lambda f: (f.weight_bits, f.act_bits))
        for i, fs in problem.candidates.items()
    }


def _split_unit(value: str) -> tuple[float, str]:
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    return float(number), value[len(number) :]


def _parse_amount(problem: AllocationProblem, resource: str, value: str) -> float:
    if value.endswith("x"):  # relative to all-W8A8
        return float(value[:-1]) * totals(problem, uniform_w8a8(problem))[resource]
    number, unit = _split_unit(value)
    if resource in ("size", "flash", "ram"):
        if unit not in _BYTES:
            raise ValueError(f"unknown unit {unit!r} (B, KB, MB, GB, KiB, MiB)")
        return number * _BYTES[unit]
    if resource == "latency":
        if not problem.latency_measured:
            raise ConfigError(
                f"latency={value} needs a measured latency table (--latency-table FILE); the "
                "cost model (MACs x w x a) is relative only: use e.g. latency=0.7x"
            )
        if unit not in _MS:
            raise ValueError(f"unknown unit {unit!r} (ms, us, s)")
        return number * _MS[unit]
    if unit:
        raise ValueError(f"BOPs take a plain number or Nx, not {unit!r}")
    return number


def parse_budget(text: str, problem: AllocationProblem) -> Budget:
    """Comma-separated ``size=2MB``, ``avg-wbits=5``, ``bops=0.5x``, ``latency=0.7x`` or
    ``latency=3ms``, ``flash=256KB``, ``ram=64KB``; ``Nx`` is relative to all-W8A8."""
    values: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = (s.strip().lower() for s in item.partition("="))
        resource = "size" if key == "avg-wbits" else key
        if resource not in RESOURCES:
            raise ConfigError(
                f"unknown budget {key!r}: use size, avg-wbits, bops, latency, flash or ram"
            )
        if not sep or not value:
            raise ConfigError(f"budget {item!r} needs a value, e.g. {key}=0.5x")
        if resource in values:
            raise ConfigError(f"budget {resource} given twice in {text!r}")
        if not problem.has(resource):
            resource_expressions(problem, resource)  # raises the error that names the table
        try:
            if key == "avg-wbits":
                amount = sum(_params(problem, i) for i in problem.size_bytes) * float(value) / 8
            else:
                amount = _parse_amount(problem, resource, value)
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"cannot read budget {item!r}: {exc}") from exc
        if not amount > 0:
            raise ConfigError(f"budget {item!r} must be positive")
        values[resource] = amount
    if not values:
        raise ConfigError(
            "empty budget: give e.g. size=2MB, avg-wbits=5, bops=0.5x, latency=0.7x, "
            "flash=256KB or ram=64KB"
        )
    return Budget(
        values.get("size"),
        values.get("bops"),
        values.get("latency"),
        values.get("flash"),
        values.get("ram"),
    )


@dataclass(frozen=True)
class Overrides:
    """User restrictions on the formats a layer may take.

    Priority, lowest to highest: ``default`` (all layers) < ``by_kind`` (op type, e.g.
    "Gemm") < ``by_pattern`` (fnmatch on the node id, in insertion order, later wins) <
    ``by_id`` (one node). The most specific rule that matches a layer replaces the others
    entirely. An empty tuple means "keep this layer in float" (it leaves the problem).
    """

    default: tuple[LayerFormat, ...] | None = None
    by_kind: Mapping[str, tuple[LayerFormat, ...]] = field(default_factory=dict)
    by_pattern: Mapping[str, tuple[LayerFormat, ...]] = field(default_factory=dict)
    by_id: Mapping[str, tuple[LayerFormat, ...]] = field(default_factory=dict)

    def formats_for(
        self, layer_id: str, op_type: str, formats: Sequence[LayerFormat]
    ) -> tuple[LayerFormat, ...]:
        import fnmatch

        chosen: tuple[LayerFormat, ...] = tuple(formats)
        if self.default is not None:
            chosen = self.default
        if op_type in self.by_kind:
            chosen = self.by_kind[op_type]
        for pattern, allowed in self.by_pattern.items():
            if fnmatch.fnmatchcase(layer_id, pattern):
                chosen = allowed
        if layer_id in self.by_id:
            chosen = self.by_id[layer_id]
        return chosen


def apply_overrides(
    graph: QGraph, layers: Sequence[str], formats: Sequence[LayerFormat], overrides: Overrides
) -> tuple[dict[str, list[LayerFormat]], list[str]]:
    """Per-layer candidate lists and the layers kept in float; unknown ids are an error."""
    unknown = sorted(set(overrides.by_id) - set(layers))
    if unknown:
        raise ConfigError(f"overrides name layers that are not weighted layers: {unknown}")
    candidates: dict[str, list[LayerFormat]] = {}
    floats: list[str] = []
    for layer in layers:
        allowed = overrides.formats_for(layer, graph.node(layer).op, formats)
        if allowed:
            candidates[layer] = list(allowed)
        else:
            floats.append(layer)
    return candidates, floats
