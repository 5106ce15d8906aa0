"""The allocation problem as data: per layer, the formats it may take and what each costs
(damage, size, BOPs, latency, flash, activation RAM); a budget on those resources; and the plan
a solver chooses. Nothing here solves: :mod:`.ilp` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dyadiq.errors import ConfigError
from dyadiq.passes.allocation.costs import CostTable, RamModel
from dyadiq.plan import LayerFormat


class Resource(StrEnum):
    """What a budget limits. A StrEnum: a member is its name wherever a string is read
    (``totals(...)["size"]``, messages, report.json keys)."""

    SIZE = "size"  # weight bytes
    BOPS = "bops"  # MACs x weight bits x activation bits
    LATENCY = "latency"  # ms with a measured table, else the cost model's relative units
    FLASH = "flash"  # bytes of a layer's constants on a microcontroller
    RAM = "ram"  # peak activation bytes of a static schedule

    @property
    def in_bytes(self) -> bool:
        return self in (Resource.SIZE, Resource.FLASH, Resource.RAM)


RESOURCES = tuple(Resource)
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

    def table(self, resource: Resource | str) -> CostTable:
        """The per-layer cost table of a linear resource (size, bops, latency, flash)."""
        return {
            Resource.SIZE: self.size_bytes,
            Resource.BOPS: self.bops,
            Resource.LATENCY: self.latency,
            Resource.FLASH: self.flash,
        }[Resource(resource)]

    def has(self, resource: Resource | str) -> bool:
        return self.ram is not None if resource == Resource.RAM else bool(self.table(resource))

    def require(self, resource: Resource | str) -> None:
        """Raise the error that names what a budget on ``resource`` needs, if it is missing."""
        if self.has(resource):
            return
        if resource == Resource.RAM:
            raise ConfigError("a RAM budget needs a memory plan (live sets): --memory-plan FILE")
        raise ConfigError(f"no {resource} table for this problem: cannot budget {resource}")


# relative: a total that lands on its limit up to float rounding of the sum stays within it
BUDGET_SLACK = 1e-9


def within_limit(value: float | None, limit: float) -> bool:
    """Whether a resource total (None: not reachable) stays within a budget limit."""
    return value is not None and value <= limit * (1 + BUDGET_SLACK)


@dataclass(frozen=True)
class Budget:
    size_bytes: float | None = None
    bops: float | None = None
    latency: float | None = None  # ms with a measured table, else the cost model's units
    flash_bytes: float | None = None
    ram_bytes: float | None = None

    def limits(self) -> dict[Resource, float]:
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
    out: dict[str, float] = {}
    for resource in RESOURCES:
        if resource is Resource.RAM:
            if problem.ram is not None:
                out[resource] = problem.ram.peak(formats)
        elif problem.has(resource) or resource in (Resource.SIZE, Resource.BOPS):
            table = problem.table(resource)
            out[resource] = float(sum(table.get(i, {}).get(f, 0.0) for i, f in formats.items()))
    return out


def allocation_of(
    problem: AllocationProblem, formats: Mapping[str, LayerFormat], damage: float, optimal: bool
) -> Allocation:
    """The :class:`Allocation` of ``formats``, with every resource total the problem models."""
    t = totals(problem, formats)
    return Allocation(
        dict(formats),
        damage,
        t[Resource.SIZE],
        t[Resource.BOPS],
        optimal,
        t.get(Resource.LATENCY),
        t.get(Resource.FLASH),
        t.get(Resource.RAM),
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


def size_range(problem: AllocationProblem) -> tuple[float, float]:
    """The smallest and largest weight size any plan reaches (ties honoured): the interval a
    size-budget search (bisection, frontier sweep) moves in. The largest is the smallest
    total of the negated sizes, negated."""
    negated = {i: {f: -v for f, v in t.items()} for i, t in problem.size_bytes.items()}
    return smallest_total(problem, problem.size_bytes), -smallest_total(problem, negated)


def uniform_w8a8(problem: AllocationProblem) -> dict[str, LayerFormat]:
    """All-W8A8, or each layer's widest candidate where W8A8 is not allowed (pins)."""
    return {
        i: W8A8 if W8A8 in fs else max(fs, key=lambda f: (f.weight_bits, f.act_bits))
        for i, fs in problem.candidates.items()
    }


def layer_table(problem: AllocationProblem, allocation: Allocation) -> dict[str, dict[str, Any]]:
    """Per layer: chosen format, its predicted damage, and its share of each resource."""
    out: dict[str, dict[str, Any]] = {}
    for i, f in allocation.formats.items():
        row: dict[str, Any] = {"format": f.label, "damage": problem.damage[i][f]}
        for resource, key in (
            (Resource.SIZE, "size_bytes"),
            (Resource.BOPS, "bops"),
            (Resource.LATENCY, "latency"),
            (Resource.FLASH, "flash_bytes"),
        ):
            if problem.has(resource):
                row[key] = problem.table(resource)[i][f]
        out[i] = row
    return out
