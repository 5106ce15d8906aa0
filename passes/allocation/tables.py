"""Readers of the cost files backends write for the allocator, one reader per format:

- :class:`LatencyTable`: per-layer, per-format kernel latency in ms (``--latency-table``),
  written by ``backends.tvm.layer_latency.measure_layer_latency``;
- :class:`MemoryPlanFile`: the static schedule's live sets, tensor bytes and per-layer flash
  (``--memory-plan``), written by ``backends.mcu.costs.allocator_memory_plan`` for the Cortex-M
  target. It is a file for the allocator, not the arena layout itself
  (``backends.mcu.arena.ArenaPlan``), from which it is derived.

Formats are keyed by label in the files ("W4A8") and read with :meth:`LayerFormat.parse`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dyadiq.errors import ConfigError
from dyadiq.io import write_text_atomic
from dyadiq.passes.allocation.costs import tensor_sizes
from dyadiq.plan import LayerFormat

FormatTable = dict[str, dict[LayerFormat, float]]  # layer -> format -> value


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def as_cost_table(table: Mapping[str, Mapping[Any, float]]) -> FormatTable:
    """A {layer: {format: value}} table keyed by LayerFormat or by label ("W4A8"), as a
    :class:`LatencyTable`'s ``layers`` is."""
    return {
        str(layer): {
            f if isinstance(f, LayerFormat) else LayerFormat.parse(str(f)): float(v)
            for f, v in row.items()
        }
        for layer, row in table.items()
    }


def cost_table_from_json(data: Any, what: str) -> FormatTable:
    """``{layer id: {"W4A8": value, ...}}`` (optionally under a ``"layers"`` key)."""
    if isinstance(data, Mapping) and isinstance(data.get("layers"), Mapping):
        data = data["layers"]
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what}: expected {{layer id: {{format: value}}}}")
    table: FormatTable = {}
    for layer, row in data.items():
        if not isinstance(row, Mapping):
            raise ConfigError(f"{what}: layer {layer!r} needs {{format: value}}")
        try:
            table[str(layer)] = {LayerFormat.parse(k): float(v) for k, v in row.items()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what}: layer {layer!r}: {exc}") from exc
    return table


@dataclass
class LatencyTable:
    """``{layer id: {format label: median ms}}`` plus how it was measured."""

    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    target: str = ""
    repeat: int = 0
    threads: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": "ms (median of time_evaluator repeats, kernel alone)",
            "target": self.target,
            "repeat": self.repeat,
            "threads": self.threads,
            "layers": self.layers,
        }

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> LatencyTable:
        """The file :meth:`save` writes; a bare ``{layer id: {"W4A8": ms}}`` is read too.
        Every label is checked (:meth:`LayerFormat.parse`) and every value is a number."""
        data = _read_json(path, "latency table")
        table = cost_table_from_json(data, f"latency table {path}")
        layers = {layer: {f.label: ms for f, ms in row.items()} for layer, row in table.items()}
        if not (isinstance(data, Mapping) and isinstance(data.get("layers"), Mapping)):
            return cls(layers)
        try:
            return cls(
                layers,
                str(data.get("target", "")),
                int(data.get("repeat", 0)),
                None if data.get("threads") is None else int(data["threads"]),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot read latency table {path}: {exc}") from exc

    def cost_table(self) -> FormatTable:
        """The table as the allocator reads it: keyed by :class:`LayerFormat`."""
        return as_cost_table(self.layers)


def load_latency_table(path: Path) -> FormatTable:
    """A backend's measured latency table (``--latency-table``), keyed by LayerFormat."""
    return LatencyTable.load(path).cost_table()


@dataclass(frozen=True)
class MemoryPlanFile:
    """What ``--memory-plan FILE`` holds: the tensors live at each step of a static schedule,
    optionally their bytes per activation width, and optionally each layer's flash bytes per
    format (``--target cortex-m*`` writes one, ``backends.mcu.costs.allocator_memory_plan``)."""

    live_sets: tuple[tuple[str, ...], ...]
    tensor_bytes: Mapping[str, Mapping[int, float]] | None
    flash: FormatTable | None


def load_memory_plan(path: Path) -> MemoryPlanFile:
    """``{"live_sets": [[tensor, ...], ...], "tensor_bytes": {tensor: bytes | {"4": b, "8": b}},
    "flash": {layer id: {"W4A8": bytes}}}``; ``tensor_bytes`` and ``flash`` are optional."""
    data = _read_json(path, "memory plan")
    if not isinstance(data, Mapping) or not isinstance(data.get("live_sets"), list):
        raise ConfigError(f"memory plan {path}: needs a 'live_sets' list of tensor-name lists")
    try:
        live_sets = tuple(tuple(str(t) for t in live) for live in data["live_sets"])
        sizes = tensor_sizes(data["tensor_bytes"], 8) if "tensor_bytes" in data else None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"memory plan {path}: {exc}") from exc
    flash = cost_table_from_json(data["flash"], f"memory plan {path}") if "flash" in data else None
    return MemoryPlanFile(live_sets, sizes, flash)
