"""Per-layer, per-format cost tables and activation-width ties for the allocation ILP, derived
from the graph (or read from a backend's measured tables).

- activation ties: layers that read one quantized activation (one tensor feeding two convs, a
  scale group of ``passes/activation_sites.py``) get one activation width; a layer whose input
  is also read by an op outside the plan cannot go below the plan's default width, because
  ``find_activation_sites`` gives a group the widest width any consumer asks for;
- latency: a backend's measured table, or a cost model (MACs x w x a / 64) labelled as such;
- flash: a backend's table, or an estimate (packed weights + int32 bias + int32 multiplier +
  int8 shift per output channel);
- peak RAM: a schedule's live sets (tensors live at once at each step) and each tensor's bytes
  per activation width, which becomes one exact linear constraint per live set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.op_facts import OpKind
from dyadiq.plan import LayerFormat, PrecisionPlan

CostTable = Mapping[str, Mapping[LayerFormat, float]]  # layer -> format -> cost

LATENCY_COST_MODEL = "cost model: MACs x weight bits x activation bits / 64 (not measured)"
FLASH_ESTIMATE = (
    "estimate: packed weights + per output channel int32 bias, int32 multiplier, int8 shift"
)
FLASH_BYTES_PER_CHANNEL = 4 + 4 + 1
INT8_CONTAINER_RAM = "graph shapes, one byte per activation code (int8 containers at A4 and A8)"


@dataclass(frozen=True)
class RamModel:
    """Activation RAM of a static schedule: peak = max over steps of the live tensors' bytes.

    A tensor listed in ``reader`` is stored at the activation width of that layer (the layer
    that reads it; tied layers share it); any other tensor has a fixed size.
    """

    live_sets: tuple[tuple[str, ...], ...]
    bytes_by_width: Mapping[str, Mapping[int, float]]  # tensor -> activation bits -> bytes
    reader: Mapping[str, str] = field(default_factory=dict)  # tensor -> layer id
    fixed_bits: int = 8
    source: str = ""

    def __post_init__(self) -> None:
        unknown = sorted({t for s in self.live_sets for t in s} - set(self.bytes_by_width))
        if unknown:
            raise ConfigError(f"the memory plan's live sets name tensors without sizes: {unknown}")

    def fixed_bytes(self, tensor: str) -> float:
        table = self.bytes_by_width[tensor]
        return float(table.get(self.fixed_bits, max(table.values())))

    def tensor_bytes(self, tensor: str, act_bits: int) -> float:
        table = self.bytes_by_width[tensor]
        return float(table.get(act_bits, self.fixed_bytes(tensor)))

    def peak(self, formats: Mapping[str, LayerFormat]) -> float:
        """Peak bytes when each layer takes ``formats[layer]`` (the others: fixed width)."""

        def size(t: str) -> float:
            layer = self.reader.get(t)
            if layer is None or layer not in formats:
                return self.fixed_bytes(t)
            return self.tensor_bytes(t, formats[layer].act_bits)

        return max((sum(size(t) for t in live) for live in self.live_sets), default=0.0)


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


def latency_cost_model(
    graph: QGraph, candidates: Mapping[str, Sequence[LayerFormat]]
) -> dict[str, dict[LayerFormat, float]]:
    """MACs x w x a / 64: an all-W8A8 layer costs its MAC count (relative units only)."""
    out = {}
    for layer, formats in candidates.items():
        macs = layer_macs(graph, layer)
        out[layer] = {f: macs * f.weight_bits * f.act_bits / 64 for f in formats}
    return out


def flash_estimate(
    graph: QGraph, candidates: Mapping[str, Sequence[LayerFormat]]
) -> dict[str, dict[LayerFormat, float]]:
    """Bytes of a layer's constants: its weight codes packed at w bits, plus its per-channel
    int32 bias and dyadic requantization constants (the same at every width)."""
    out: dict[str, dict[LayerFormat, float]] = {}
    for layer, formats in candidates.items():
        node = graph.node(layer)
        weight = graph.weight(node)
        assert weight is not None
        params = int(weight.values.size)
        channels = int(weight.values.shape[weight_channel_axis(node)])
        fixed = channels * FLASH_BYTES_PER_CHANNEL
        out[layer] = {f: float(math.ceil(params * f.weight_bits / 8) + fixed) for f in formats}
    return out


@dataclass(frozen=True)
class ActivationTies:
    ties: tuple[tuple[str, ...], ...]  # layers that must share one activation width
    shared_with_others: frozenset[str]  # layers whose input an op outside the plan also reads
    inputs: Mapping[str, tuple[str, ...]]  # layer -> the quantized activation tensors it reads
    group_of: Mapping[str, int]  # quantized tensor -> scale group


def activation_ties(graph: QGraph, layers: Sequence[str], default_act_bits: int) -> ActivationTies:
    """Which layers' activation widths are one variable, from the plan's activation sites."""
    from dyadiq.passes.activation_sites import find_activation_sites

    plan = PrecisionPlan({i: LayerFormat(8, default_act_bits) for i in layers}, default_act_bits)
    sites = find_activation_sites(graph, plan)
    in_plan = set(layers)
    tensors = graph.tensors()
    members = sites.groups()
    inputs: dict[str, tuple[str, ...]] = {}
    parent = {i: i for i in layers}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    shared: set[str] = set()
    readers_of_group: dict[int, list[str]] = {}
    for layer in layers:
        node = graph.node(layer)
        facts = graph.facts(node)
        skip = {facts.weight_input, facts.bias_input}
        reads = tuple(
            t.name for k, t in enumerate(node.inputs) if k not in skip and t.name in sites.group_of
        )
        inputs[layer] = reads
        for name in reads:
            group = sites.group_of[name]
            readers_of_group.setdefault(group, []).append(layer)
            consumers = {c.name for t in members[group] for c in tensors[t].outputs}
            if consumers - in_plan:
                shared.add(layer)
    for readers in readers_of_group.values():
        for other in readers[1:]:
            parent[find(other)] = find(readers[0])
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(find(layer), []).append(layer)
    ties = tuple(tuple(g) for g in groups.values() if len(g) > 1)
    return ActivationTies(ties, frozenset(shared), inputs, dict(sites.group_of))


def ram_model(
    graph: QGraph,
    live_sets: Sequence[Sequence[str]],
    tensor_bytes: Mapping[str, float | Mapping[int, float]] | None,
    act: ActivationTies,
    default_act_bits: int,
) -> RamModel:
    """Live sets from a backend's memory plan (e.g. ``ArenaPlan.live_sets``); a tensor's width
    follows the layers reading its scale group. Sizes: {tensor: bytes} (the same at every
    width, as in int8 containers) or {tensor: {act bits: bytes}}; without them, graph shapes
    at one byte per code."""
    reader: dict[str, str] = {}
    group_reader: dict[int, str] = {}
    for layer, reads in act.inputs.items():
        for name in reads:
            group_reader.setdefault(act.group_of[name], layer)
    for name, group in act.group_of.items():
        if group in group_reader:
            reader[name] = group_reader[group]
    source = "memory plan"
    sizes_by_width: dict[str, dict[int, float]] = {}
    if tensor_bytes is not None:
        for name, value in tensor_bytes.items():
            if isinstance(value, Mapping):
                sizes_by_width[name] = {int(k): float(v) for k, v in value.items()}
            else:
                sizes_by_width[name] = {default_act_bits: float(value)}
    else:
        tensors = graph.tensors()
        sizes: dict[str, dict[int, float]] = {}
        for live in live_sets:
            for name in live:
                if name not in tensors or tensors[name].shape is None:
                    raise ConfigError(f"no shape for tensor {name!r}: give its bytes")
                shape = [d if isinstance(d, int) and d > 0 else 1 for d in tensors[name].shape]
                sizes[name] = {default_act_bits: float(np.prod(shape))}
        sizes_by_width, source = sizes, INT8_CONTAINER_RAM
    return RamModel(
        tuple(tuple(s) for s in live_sets), sizes_by_width, reader, default_act_bits, source
    )


# --- measured tables from backends (JSON) ------------------------------------------------------


def parse_format(label: str) -> LayerFormat:
    """``W4A8`` -> LayerFormat(4, 8)."""
    text = label.strip().upper()
    try:
        if not text.startswith("W") or "A" not in text:
            raise ValueError(label)
        return LayerFormat(int(text[1 : text.index("A")]), int(text[text.index("A") + 1 :]))
    except ValueError as exc:
        raise ConfigError(f"not a format label like W4A8: {label!r}") from exc


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def as_cost_table(table: Mapping[str, Mapping[Any, float]]) -> dict[str, dict[LayerFormat, float]]:
    """A {layer: {format: value}} table keyed by LayerFormat or by label ("W4A8"), as a
    backend's LatencyTable.layers is."""
    return {
        str(layer): {
            f if isinstance(f, LayerFormat) else parse_format(str(f)): float(v)
            for f, v in row.items()
        }
        for layer, row in table.items()
    }


def cost_table_from_json(data: Any, what: str) -> dict[str, dict[LayerFormat, float]]:
    """``{layer id: {"W4A8": value, ...}}`` (optionally under a ``"layers"`` key)."""
    if isinstance(data, Mapping) and isinstance(data.get("layers"), Mapping):
        data = data["layers"]
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what}: expected {{layer id: {{format: value}}}}")
    table: dict[str, dict[LayerFormat, float]] = {}
    for layer, row in data.items():
        if not isinstance(row, Mapping):
            raise ConfigError(f"{what}: layer {layer!r} needs {{format: value}}")
        try:
            table[str(layer)] = {parse_format(k): float(v) for k, v in row.items()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what}: layer {layer!r}: {exc}") from exc
    return table


def load_latency_table(path: Path) -> dict[str, dict[LayerFormat, float]]:
    """A backend's measured LatencyTable JSON: ``{layer id: {"W4A8": ms, ...}}``."""
    return cost_table_from_json(_read_json(path, "latency table"), f"latency table {path}")


@dataclass(frozen=True)
class MemoryPlan:
    live_sets: tuple[tuple[str, ...], ...]
    tensor_bytes: Mapping[str, Mapping[int, float]] | None
    flash: Mapping[str, Mapping[LayerFormat, float]] | None


def load_memory_plan(path: Path) -> MemoryPlan:
    """``{"live_sets": [[tensor, ...], ...], "tensor_bytes": {tensor: bytes | {"4": b, "8": b}},
    "flash": {layer id: {"W4A8": bytes}}}``; ``tensor_bytes`` and ``flash`` are optional."""
    data = _read_json(path, "memory plan")
    if not isinstance(data, Mapping) or not isinstance(data.get("live_sets"), list):
        raise ConfigError(f"memory plan {path}: needs a 'live_sets' list of tensor-name lists")
    try:
        live_sets = tuple(tuple(str(t) for t in live) for live in data["live_sets"])
        sizes: dict[str, dict[int, float]] | None = None
        if "tensor_bytes" in data:
            sizes = {}
            for name, value in data["tensor_bytes"].items():
                if isinstance(value, Mapping):
                    sizes[str(name)] = {int(k): float(v) for k, v in value.items()}
                else:
                    sizes[str(name)] = {8: float(value)}
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"memory plan {path}: {exc}") from exc
    flash = cost_table_from_json(data["flash"], f"memory plan {path}") if "flash" in data else None
    return MemoryPlan(live_sets, sizes, flash)
