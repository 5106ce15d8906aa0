"""Bit allocation as an integer linear program (HAWQ-V3), solved with scipy's HiGHS ``milp``.

Variables x[i, f] in {0, 1}: layer i gets candidate format f; sum_f x[i, f] = 1.
Objective: sum damage[i][f] x[i, f] + sum over pair terms c_ij(f, g) y[i, f, j, g], where the
products y = x[i, f] x[j, g] are linearised exactly (y >= x_if + x_jg - 1, y <= x_if,
y <= x_jg, 0 <= y <= 1 is integral whenever the x are).
Constraints: any of total size (bytes), BOPs (MACs x weight bits x activation bits); tied
layers (shared weights, or a plan's own grouping) take identical formats.
An infeasible budget is an error that states the smallest feasible value.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.op_facts import OpKind
from dyadiq.passes.sensitivity.analysis import SensitivityReport, layer_damage, pair_damage
from dyadiq.plan import LayerFormat

log = logging.getLogger(__name__)


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
    ties: Sequence[Sequence[str]] = ()

    def __post_init__(self) -> None:
        empty = [k for k, v in self.candidates.items() if not v]
        if empty:
            raise ConfigError(f"layers with no allowed format (contradictory pins?): {empty}")
        for group in self.ties:
            shared = set.intersection(*(set(self.candidates[i]) for i in group))
            if not shared:
                raise ConfigError(f"tied layers {list(group)} have no format in common")


@dataclass(frozen=True)
class Budget:
    size_bytes: float | None = None
    bops: float | None = None


@dataclass(frozen=True)
class Allocation:
    formats: Mapping[str, LayerFormat]
    predicted_damage: float
    size_bytes: float
    bops: float
    optimal: bool = True  # False: HiGHS stopped at its time limit with a feasible plan


def _totals(problem: AllocationProblem, formats: Mapping[str, LayerFormat]) -> tuple[float, float]:
    size = sum(problem.size_bytes[i][f] for i, f in formats.items())
    bops = sum(problem.bops.get(i, {}).get(f, 0.0) for i, f in formats.items())
    return size, bops


def smallest_total(
    problem: AllocationProblem, table: Mapping[str, Mapping[LayerFormat, float]]
) -> float:
    """The smallest achievable total of a per-layer cost, honouring ties."""
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


def solve(problem: AllocationProblem, budget: Budget, *, time_limit: float = 60.0) -> Allocation:
    layers = list(problem.candidates)
    index: dict[tuple[str, LayerFormat], int] = {}
    for layer in layers:
        for fmt in problem.candidates[layer]:
            index[(layer, fmt)] = len(index)
    pair_vars: list[tuple[int, int, float]] = []  # (x_a index, x_b index, cost)
    for pair in problem.pairs:
        for fa in problem.candidates.get(pair.a, ()):
            for fb in problem.candidates.get(pair.b, ()):
                cost = pair.cost.get((fa, fb), 0.0)
                if cost != 0.0:
                    pair_vars.append((index[(pair.a, fa)], index[(pair.b, fb)], cost))
    n_x, n = len(index), len(index) + len(pair_vars)
    c = np.zeros(n)
    for (layer, fmt), k in index.items():
        c[k] = problem.damage[layer][fmt]
    for j, (_, _, cost) in enumerate(pair_vars):
        c[n_x + j] = cost

    rows: list[tuple[dict[int, float], float, float]] = []
    for layer in layers:
        rows.append(({index[(layer, f)]: 1.0 for f in problem.candidates[layer]}, 1.0, 1.0))
    for group in problem.ties:
        shared = set.intersection(*(set(problem.candidates[i]) for i in group))
        for layer in group:
            for fmt in set(problem.candidates[layer]) - shared:
                rows.append(({index[(layer, fmt)]: 1.0}, 0.0, 0.0))  # not allowed in the group
        for other in group[1:]:
            for fmt in shared:
                rows.append(({index[(group[0], fmt)]: 1.0, index[(other, fmt)]: -1.0}, 0.0, 0.0))
    for j, (ka, kb, _) in enumerate(pair_vars):
        y = n_x + j
        rows.append(({y: 1.0, ka: -1.0, kb: -1.0}, -1.0, np.inf))  # y >= xa + xb - 1
        rows.append(({y: 1.0, ka: -1.0}, -np.inf, 0.0))  # y <= xa
        rows.append(({y: 1.0, kb: -1.0}, -np.inf, 0.0))  # y <= xb
    for limit, table, name in (
        (budget.size_bytes, problem.size_bytes, "size"),
        (budget.bops, problem.bops, "BOPs"),
    ):
        if limit is None:
            continue
        smallest = smallest_total(problem, table)
        if smallest > limit * (1 + 1e-9):
            raise ConfigError(
                f"{name} budget {limit:,.0f} is infeasible: the smallest achievable {name} "
                f"with the allowed formats is {smallest:,.0f}"
            )
        rows.append(({index[k]: table[k[0]][k[1]] for k in index}, -np.inf, limit))

    matrix = lil_matrix((len(rows), n))
    lower, upper = np.empty(len(rows)), np.empty(len(rows))
    for r, (coeffs, lo, hi) in enumerate(rows):
        for k, v in coeffs.items():
            matrix[r, k] = v
        lower[r], upper[r] = lo, hi
    integrality = np.concatenate([np.ones(n_x), np.zeros(n - n_x)])
    with _silenced_stdout():  # scipy's HiGHS prints MIP diagnostics straight to fd 1
        result = milp(
            c,
            constraints=LinearConstraint(matrix.tocsr(), lower, upper),
            integrality=integrality,
            bounds=Bounds(np.zeros(n), np.ones(n)),
            options={"time_limit": time_limit},
        )
    if result.x is None:
        raise ConfigError(f"the allocation problem has no solution: {result.message}")
    formats = {layer: fmt for (layer, fmt), k in index.items() if result.x[k] > 0.5}
    size, bops = _totals(problem, formats)
    optimal = result.status == 0
    if not optimal:
        log.warning(
            "ILP stopped before proving optimality (%s); using its best plan", result.message
        )
    return Allocation(formats, float(result.fun), size, bops, optimal)


def brute_force(problem: AllocationProblem, budget: Budget) -> Allocation:
    """Exhaustive search (tests only): the optimum the ILP must reach."""
    import itertools

    layers = list(problem.candidates)
    best: Allocation | None = None
    for choice in itertools.product(*(problem.candidates[i] for i in layers)):
        formats = dict(zip(layers, choice, strict=True))
        if any(len({formats[i] for i in group}) > 1 for group in problem.ties):
            continue
        size, bops = _totals(problem, formats)
        if budget.size_bytes is not None and size > budget.size_bytes:
            continue
        if budget.bops is not None and bops > budget.bops:
            continue
        damage = sum(problem.damage[i][f] for i, f in formats.items())
        damage += sum(p.cost.get((formats[p.a], formats[p.b]), 0.0) for p in problem.pairs)
        if best is None or damage < best.predicted_damage:
            best = Allocation(formats, damage, size, bops)
    if best is None:
        raise ConfigError("no feasible allocation")
    return best


def layer_macs(graph: QGraph, layer_id: str) -> int:
    """Multiply-accumulates of one inference (batch dim counted as 1)."""
    node = graph.node(layer_id)
    weight = graph.weight(node)
    assert weight is not None
    out_shape = [d if isinstance(d, int) and d > 0 else 1 for d in (node.outputs[0].shape or [])]
    if out_shape:
        out_shape[0] = 1
    outputs = int(np.prod(out_shape)) if out_shape else 1
    if graph.kind(node) is OpKind.CONV:
        return outputs * int(np.prod(weight.values.shape[1:]))
    reduction = weight.values.shape[0] if weight_channel_axis(node) != 0 else weight.values.shape[1]
    return outputs * int(reduction)


def shared_weight_ties(graph: QGraph, layers: Sequence[str]) -> list[list[str]]:
    by_weight: dict[str, list[str]] = {}
    for layer in layers:
        weight = graph.weight(graph.node(layer))
        if weight is not None:
            by_weight.setdefault(weight.name, []).append(layer)
    return [group for group in by_weight.values() if len(group) > 1]


def problem_from_report(
    graph: QGraph,
    report: SensitivityReport,
    formats: Sequence[LayerFormat],
    proxy: str = "empirical",
    candidates: Mapping[str, Sequence[LayerFormat]] | None = None,
) -> AllocationProblem:
    """Damage from a sensitivity report (per weight width), size and BOPs from the graph."""
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
    damage = {
        i: {f: layer_damage(report.layers[i], f.weight_bits, proxy) for f in allowed[i]}
        for i in layers
    }
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
    return AllocationProblem(allowed, damage, size, bops, pairs, shared_weight_ties(graph, layers))


def _params(problem: AllocationProblem, layer: str) -> float:
    fmt, nbytes = next(iter(problem.size_bytes[layer].items()))
    return nbytes * 8 / fmt.weight_bits


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2}


def parse_budget(text: str, problem: AllocationProblem) -> Budget:
    """``size=2MB``, ``avg-wbits=5``, ``bops=0.5x`` (of all-W8A8), comma-separated."""
    size: float | None = None
    bops: float | None = None
    w8 = LayerFormat(8, 8)
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        value = value.strip().lower()
        try:
            if key == "size":
                number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
                unit = value[len(number) :] or "b"
                size = float(number) * _UNITS[unit]
            elif key == "avg-wbits":
                size = sum(_params(problem, i) for i in problem.size_bytes) * float(value) / 8
            elif key == "bops":
                reference = sum(
                    problem.bops[i].get(w8, max(problem.bops[i].values())) for i in problem.bops
                )
                bops = float(value.rstrip("x")) * reference if value.endswith("x") else float(value)
            elif key == "latency":
                raise ConfigError(
                    "latency budgets need a measured latency table from a backend; "
                    "none is available yet (size, avg-wbits and bops are)"
                )
            else:
                raise ConfigError(f"unknown budget {key!r}: use size, avg-wbits or bops")
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"cannot read budget {item!r}: {exc}") from exc
    if size is None and bops is None:
        raise ConfigError("empty budget: give e.g. size=2MB, avg-wbits=5 or bops=0.5x")
    return Budget(size, bops)


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
