"""What the user allows each layer: ``--pin ID_OR_PATTERN=W8A8[,W4A8]`` and ``--exclude ID`` as
:class:`Overrides`, and the per-layer candidate lists they leave.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph
from dyadiq.plan import LayerFormat


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


def overrides_from_pins(
    pins: Iterable[str], exclude: Iterable[str], node_ids: Iterable[str]
) -> Overrides:
    """``ID_OR_PATTERN=W8A8[,W4A8]`` pins (an exact node id beats a pattern) and excluded ids
    (kept in float) as :class:`Overrides`; a pattern that matches no node is an error."""
    ids = set(node_ids)
    by_id: dict[str, tuple[LayerFormat, ...]] = {}
    by_pattern: dict[str, tuple[LayerFormat, ...]] = {}
    for item in pins:
        target, _, labels = item.partition("=")
        try:
            allowed = tuple(LayerFormat.parse(x) for x in labels.split(","))
        except ConfigError as exc:
            raise ConfigError(f"--pin wants ID=W8A8[,W4A8], got {item!r}: {exc}") from exc
        (by_id if target in ids else by_pattern)[target] = allowed
    unmatched = [p for p in by_pattern if not fnmatch.filter(sorted(ids), p)]
    if unmatched:
        raise ConfigError(
            f"--pin {', '.join(map(repr, unmatched))} matches no layer id "
            f"(ids look like {', '.join(sorted(ids)[:4])}; `dyadiq inspect` lists them)"
        )
    for layer in exclude:
        by_id[layer] = ()
    return Overrides(by_pattern=by_pattern, by_id=by_id)
