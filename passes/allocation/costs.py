"""Per-layer, per-format costs for the allocation ILP, derived from the graph:

- latency: a cost model (MACs x w x a / 64) labelled as such, when no backend measured one;
- flash: an estimate (packed weights + int32 bias + int32 multiplier + int8 shift per output
  channel), when no backend table is given;
- peak RAM: a schedule's live sets (tensors live at once at each step) and each tensor's bytes
  per activation width, which becomes one exact linear constraint per live set.

Measured tables are read by :mod:`.tables`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.op_facts import OpKind
from dyadiq.passes.allocation.ties import ActivationTies
from dyadiq.plan import LayerFormat

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


TensorBytes = Mapping[str, float | Mapping[int | str, float]]  # tensor -> bytes | {bits: bytes}


def tensor_sizes(data: TensorBytes, default_bits: int) -> dict[str, dict[int, float]]:
    """``{tensor: bytes | {act bits: bytes}}`` as ``{tensor: {act bits: bytes}}``: a plain
    count is the tensor's size at ``default_bits`` (and, as :class:`RamModel` reads it, at
    every width: int8 containers). Bit keys may be strings, as JSON has them."""
    sizes: dict[str, dict[int, float]] = {}
    for name, value in data.items():
        if isinstance(value, Mapping):
            sizes[str(name)] = {int(k): float(v) for k, v in value.items()}
        else:
            sizes[str(name)] = {default_bits: float(value)}
    return sizes


def ram_model(
    graph: QGraph,
    live_sets: Sequence[Sequence[str]],
    tensor_bytes: TensorBytes | None,
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
    if tensor_bytes is not None:
        sizes_by_width = tensor_sizes(tensor_bytes, default_act_bits)
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
