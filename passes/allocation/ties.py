"""Which layers' formats are one variable: layers that share a weight take identical formats
(and store that weight once: :func:`weight_stored_once` counts its bytes once);
layers that read one quantized activation (one tensor feeding two convs, a scale group of
``passes/activation_sites.py``) take one activation width. A layer whose input is also read by
an op outside the plan cannot go below the plan's default width, because
``find_activation_sites`` gives a group the widest width any consumer asks for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dyadiq.graph import QGraph
from dyadiq.plan import LayerFormat, PrecisionPlan


def shared_weight_ties(graph: QGraph, layers: Sequence[str]) -> list[list[str]]:
    """Groups of layers that read one weight initializer (they must take one format)."""
    by_weight: dict[str, list[str]] = {}
    for layer in layers:
        weight = graph.weight(graph.node(layer))
        if weight is not None:
            by_weight.setdefault(weight.name, []).append(layer)
    return [group for group in by_weight.values() if len(group) > 1]


def weight_stored_once(
    table: Mapping[str, Mapping[LayerFormat, float]],
    ties: Sequence[Sequence[str]],
    weight_bytes: Mapping[str, Mapping[LayerFormat, float]],
) -> dict[str, dict[LayerFormat, float]]:
    """``table`` (bytes per layer and format) with the weight bytes of every tied reader but
    the first removed: the quantized model stores a shared weight once
    (``passes/shared_weights.py``), and tied readers take one format, so the group's total
    is one copy of the weight plus each reader's own constants (bias, requantization)."""
    out = {layer: dict(row) for layer, row in table.items()}
    for group in ties:
        for layer in group[1:]:
            if layer in out:
                out[layer] = {f: v - weight_bytes[layer][f] for f, v in out[layer].items()}
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
