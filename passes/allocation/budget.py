"""Budgets as the user writes them: ``size=2MB,latency=0.7x`` -> :class:`Budget`.

``Nx`` is relative to all-W8A8 (each layer's widest candidate where pins forbid W8A8);
``avg-wbits=5`` is the size of every weight at 5 bits.
"""

from __future__ import annotations

from dyadiq.errors import ConfigError
from dyadiq.passes.allocation.problem import (
    RESOURCES,
    AllocationProblem,
    Budget,
    Resource,
    totals,
    uniform_w8a8,
)

_BYTES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2}
_MS = {"ms": 1.0, "us": 1e-3, "s": 1e3}
AVERAGE_WEIGHT_BITS = "avg-wbits"  # a size budget written as bits per weight


class BudgetError(ConfigError):
    """A budget's text cannot be read (unknown resource or unit, missing value)."""


def _params(problem: AllocationProblem, layer: str) -> float:
    fmt, nbytes = next(iter(problem.size_bytes[layer].items()))
    return nbytes * 8 / fmt.weight_bits


def _split_unit(value: str) -> tuple[float, str]:
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    return float(number), value[len(number) :]


def _parse_amount(problem: AllocationProblem, resource: Resource, value: str) -> float:
    """One budget's value in the problem's units."""
    if value.endswith("x"):  # relative to all-W8A8
        return float(value[:-1]) * totals(problem, uniform_w8a8(problem))[resource]
    number, unit = _split_unit(value)
    if resource.in_bytes:
        if unit not in _BYTES:
            raise BudgetError(f"unknown unit {unit!r} (B, KB, MB, GB, KiB, MiB)")
        return number * _BYTES[unit]
    if resource is Resource.LATENCY:
        if not problem.latency_measured:
            raise ConfigError(
                f"latency={value} needs a measured latency table (--latency-table FILE); the "
                "cost model (MACs x w x a) is relative only: use e.g. latency=0.7x"
            )
        if unit not in _MS:
            raise BudgetError(f"unknown unit {unit!r} (ms, us, s)")
        return number * _MS[unit]
    if unit:
        raise BudgetError(f"BOPs take a plain number or Nx, not {unit!r}")
    return number


def parse_budget(text: str, problem: AllocationProblem) -> Budget:
    """Comma-separated ``size=2MB``, ``avg-wbits=5``, ``bops=0.5x``, ``latency=0.7x`` or
    ``latency=3ms``, ``flash=256KB``, ``ram=64KB``; ``Nx`` is relative to all-W8A8."""
    values: dict[Resource, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = (s.strip().lower() for s in item.partition("="))
        name = Resource.SIZE.value if key == AVERAGE_WEIGHT_BITS else key
        if name not in RESOURCES:
            raise BudgetError(
                f"unknown budget {key!r}: use size, avg-wbits, bops, latency, flash or ram"
            )
        resource = Resource(name)
        if not sep or not value:
            raise BudgetError(f"budget {item!r} needs a value, e.g. {key}=0.5x")
        if resource in values:
            raise BudgetError(f"budget {resource} given twice in {text!r}")
        problem.require(resource)
        try:
            if key == AVERAGE_WEIGHT_BITS:
                amount = sum(_params(problem, i) for i in problem.size_bytes) * float(value) / 8
            else:
                amount = _parse_amount(problem, resource, value)
        except (BudgetError, ValueError, KeyError) as exc:
            raise BudgetError(f"cannot read budget {item!r}: {exc}") from exc
        if not amount > 0:
            raise BudgetError(f"budget {item!r} must be positive")
        values[resource] = amount
    if not values:
        raise BudgetError(
            "empty budget: give e.g. size=2MB, avg-wbits=5, bops=0.5x, latency=0.7x, "
            "flash=256KB or ram=64KB"
        )
    return Budget(
        values.get(Resource.SIZE),
        values.get(Resource.BOPS),
        values.get(Resource.LATENCY),
        values.get(Resource.FLASH),
        values.get(Resource.RAM),
    )
