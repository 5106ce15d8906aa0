"""PrecisionPlan: the per-layer formats that allocation produces and rewrites consume.

A plan maps stable node ids of weighted layers (Conv, Gemm, MatMul with a constant weight) to a
:class:`LayerFormat`; activations that no weighted layer consumes use ``default_act_bits``.
Plans are frozen, validated at construction, and round-trip through JSON (``plan.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph

WEIGHT_BITS = range(2, 9)
ACT_BITS = (4, 8)


@dataclass(frozen=True)
class LayerFormat:
    """Symmetric per-output-channel weights of ``weight_bits``; inputs at ``act_bits``."""

    weight_bits: int
    act_bits: int

    def __post_init__(self) -> None:
        if self.weight_bits not in WEIGHT_BITS:
            raise ConfigError(f"weight bits must be 2..8, got {self.weight_bits}")
        if self.act_bits not in ACT_BITS:
            raise ConfigError(f"activation bits must be one of {ACT_BITS}, got {self.act_bits}")

    @property
    def label(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"

    @classmethod
    def parse(cls, label: str) -> LayerFormat:
        """``W4A8`` -> LayerFormat(4, 8): the inverse of :attr:`label` (any case, surrounding
        spaces ignored). The one reader of format labels (tables, --pin, plans)."""
        text = label.strip().upper()
        weight, sep, act = text.removeprefix("W").partition("A")
        if not (text.startswith("W") and sep and weight.isdecimal() and act.isdecimal()):
            raise ConfigError(f"not a format label like W4A8: {label!r}")
        return cls(int(weight), int(act))


@dataclass(frozen=True)
class PrecisionPlan:
    layers: Mapping[str, LayerFormat]
    default_act_bits: int = 8
    act_signed: bool = False  # uint activations (onnxruntime's fast kernels want u8) or int
    excluded: frozenset[str] = field(default_factory=frozenset)  # layers kept in float

    def __post_init__(self) -> None:
        if self.default_act_bits not in ACT_BITS:
            raise ConfigError(f"activation bits must be one of {ACT_BITS}")
        overlap = self.excluded & set(self.layers)
        if overlap:
            raise ConfigError(f"layers both quantized and excluded: {sorted(overlap)}")
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    @classmethod
    def uniform(
        cls,
        graph: QGraph,
        *,
        weight_bits: int = 8,
        act_bits: int = 8,
        act_signed: bool = False,
        exclude: frozenset[str] = frozenset(),
    ) -> PrecisionPlan:
        unknown = exclude - set(graph.node_ids())
        if unknown:
            raise ConfigError(f"excluded layers not in the model: {sorted(unknown)}")
        fmt = LayerFormat(weight_bits, act_bits)
        layers = {n.name: fmt for n in graph.weighted_layers() if n.name not in exclude}
        return cls(layers, act_bits, act_signed, frozenset(exclude))

    @classmethod
    def from_weight_bits(cls, bits: Mapping[str, int], act_bits: int = 8) -> PrecisionPlan:
        """A plan that chooses only weight widths (what search and sampling produce)."""
        return cls({k: LayerFormat(int(b), act_bits) for k, b in bits.items()}, act_bits)

    def validate_for(self, graph: QGraph) -> None:
        weighted = {n.name for n in graph.weighted_layers()}
        unknown = sorted(set(self.layers) - weighted)
        if unknown:
            raise ConfigError(f"plan names layers that are not weighted layers here: {unknown}")

    @property
    def uses_4bit_types(self) -> bool:
        return self.default_act_bits <= 4 or any(
            f.weight_bits <= 4 or f.act_bits <= 4 for f in self.layers.values()
        )

    # --- JSON --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "default_act_bits": self.default_act_bits,
            "act_signed": self.act_signed,
            "excluded": sorted(self.excluded),
            "layers": {
                k: {"weight_bits": f.weight_bits, "act_bits": f.act_bits, "format": f.label}
                for k, f in self.layers.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrecisionPlan:
        try:
            layers = {
                k: LayerFormat(int(v["weight_bits"]), int(v["act_bits"]))
                for k, v in data["layers"].items()
            }
            return cls(
                layers,
                int(data.get("default_act_bits", 8)),
                bool(data.get("act_signed", False)),
                frozenset(data.get("excluded", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # e.g. layers: []
            raise ConfigError(f"malformed plan: {exc}") from exc

    def save(self, path: Path) -> None:
        from dyadiq.io import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: Path) -> PrecisionPlan:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read plan {path}: {exc}") from exc
