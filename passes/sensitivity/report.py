"""The sensitivity analysis's settings and result as data: per layer, every proxy's damage per
weight width; pair terms; activation sites. Versioned JSON (``SCHEMA_VERSION``), which the
on-disk cache stores and ``analyze --output`` writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dyadiq.passes.sensitivity.activation_probe import ActivationSite
from dyadiq.passes.sensitivity.estimators import Estimate


@dataclass(frozen=True)
class SensitivityConfig:
    weight_bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    hutchinson_max_iters: int = 100  # HAWQ-V2's cap
    hutchinson_min_iters: int = 8
    hutchinson_rtol: float = 0.02  # stop when the standard error is 2% of the estimate
    epsilon_rel: float = 1e-3  # finite-difference step, relative to the layer's RMS weight
    # widths (of weight_bits) at which every pair's cross term is measured, each width pair;
    # a cross term with a layer at another (wider) width is 0 in the model
    pair_bits: tuple[int, ...] = (2, 3, 4)
    pair_noise_z: float = 2.0  # a cross term within z standard errors of 0 is noise
    all_pairs_up_to: int = 24  # layers; above this, structural + top-k sensitive pairs
    top_k_pairs: int = 8
    seed: int = 0
    trace: bool = True
    empirical: bool = True
    pairs: bool = False  # costly (pairs x width pairs): on for a +pairs proxy
    gradients: bool = False  # eigenvalue, Fisher diagonal, Taylor: needs TVM, compiles once
    gradient_samples: int = 8  # leading analysis samples the reverse-mode proxies use
    eigen_max_iters: int = 20
    eigen_rtol: float = 1e-2
    fisher_draws: int = 4  # sampled cotangents per batch
    entropy: bool = True
    activations: bool = True
    activation_bits: tuple[int, ...] = (4, 8)
    # HAWQ-V2's Hessian trace of each activation site too (with ``activations``): the trace
    # proxy's price of activation widths
    activation_trace: bool = False

    def to_json(self) -> dict[str, Any]:
        data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        if not self.activation_trace:
            # absent when off, as before the field existed: the cache keys of analyses
            # without it (the settings are part of the key) stay what they were
            del data["activation_trace"]
        return data


@dataclass(frozen=True)
class LayerSensitivity:
    op: str
    params: int
    perturbation_sq: Mapping[int, float]  # ||Q_b(W) - W||^2
    trace: Estimate | None = None  # average trace Tr(H)/n
    hessian_damage: Mapping[int, float] = field(default_factory=dict)
    empirical_damage: Mapping[int, float] = field(default_factory=dict)
    snr_db: Mapping[int, float] = field(default_factory=dict)
    top_eigenvalue: Estimate | None = None  # of the Gauss-Newton block (HAWQ)
    eigen_damage: Mapping[int, float] = field(default_factory=dict)
    fisher_damage: Mapping[int, float] = field(default_factory=dict)
    taylor_damage: Mapping[int, float] = field(default_factory=dict)
    entropy: float | None = None  # bits, of the layer's output
    entropy_damage: Mapping[int, float] = field(default_factory=dict)
    input_activation: str | None = None  # the activation site this layer reads, if exactly one
    activation_damage: Mapping[int, float] = field(default_factory=dict)  # that site alone
    # that site's HAWQ-V2 damage, 1/2 Tr(H_a)/n_a ||Q(a) - a||^2 (activation_trace)
    activation_hessian_damage: Mapping[int, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def by_bits(m: Mapping[int, float]) -> dict[str, float]:
            return {str(b): v for b, v in m.items()}

        return {
            "op": self.op,
            "params": self.params,
            "perturbation_sq": by_bits(self.perturbation_sq),
            "trace": self.trace.to_json() if self.trace else None,
            "hessian_damage": by_bits(self.hessian_damage),
            "empirical_damage": by_bits(self.empirical_damage),
            "snr_db": by_bits(self.snr_db),
            "top_eigenvalue": self.top_eigenvalue.to_json() if self.top_eigenvalue else None,
            "eigen_damage": by_bits(self.eigen_damage),
            "fisher_damage": by_bits(self.fisher_damage),
            "taylor_damage": by_bits(self.taylor_damage),
            "entropy": self.entropy,
            "entropy_damage": by_bits(self.entropy_damage),
            "input_activation": self.input_activation,
            "activation_damage": by_bits(self.activation_damage),
            "activation_hessian_damage": by_bits(self.activation_hessian_damage),
        }


@dataclass(frozen=True)
class PairTerm:
    """Delta_ab = L(Q_a, Q_b) - L(Q_a) - L(Q_b) measured at (bits_a, bits_b), its standard
    error over the calibration rows, and the two single-layer losses it was measured with."""

    a: str
    b: str
    bits_a: int
    bits_b: int
    delta: float
    stderr: float
    single_a: float
    single_b: float


# 3: pair terms per width pair with their noise; 2: eigenvalue/Fisher/Taylor/entropy/activation
# fields; 1 had none
SCHEMA_VERSION = 3


class StaleReportError(ValueError):
    """A stored report of another schema version: not an error to show, a cache miss."""


@dataclass(frozen=True)
class SensitivityReport:
    layers: Mapping[str, LayerSensitivity]
    pairs: tuple[PairTerm, ...]
    output_kind: str
    forward_passes: int
    seconds: float
    settings: Mapping[str, Any]
    fingerprint: str = ""
    activations: Mapping[str, ActivationSite] = field(default_factory=dict)  # by tensor
    reverse_passes: int = 0
    notes: tuple[str, ...] = ()  # what could not be computed, and why

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": self.fingerprint,
            "reverse_passes": self.reverse_passes,
            "notes": list(self.notes),
            "output_kind": self.output_kind,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
            "settings": dict(self.settings),
            "layers": {k: v.to_json() for k, v in self.layers.items()},
            "pairs": [p.__dict__ for p in self.pairs],
            "activations": {t: a.to_json() for t, a in self.activations.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SensitivityReport:
        """Raises :class:`StaleReportError` (a ValueError) for another schema version (the
        cache then recomputes)."""
        if data.get("schema_version") != SCHEMA_VERSION:
            raise StaleReportError(
                f"sensitivity report schema {data.get('schema_version', 1)}, "
                f"expected {SCHEMA_VERSION}"
            )

        def bits_map(m: Mapping[str, float]) -> dict[int, float]:
            return {int(k): float(v) for k, v in m.items()}

        def estimate(d: Mapping[str, Any] | None) -> Estimate | None:
            return Estimate(d["mean"], d["stderr"], int(d["samples"])) if d else None

        layers = {}
        for name, d in data["layers"].items():
            trace = d.get("trace")
            layers[name] = LayerSensitivity(
                op=d["op"],
                params=int(d["params"]),
                perturbation_sq=bits_map(d["perturbation_sq"]),
                trace=Estimate(trace["mean"], trace["stderr"], int(trace["samples"]))
                if trace
                else None,
                hessian_damage=bits_map(d["hessian_damage"]),
                empirical_damage=bits_map(d["empirical_damage"]),
                snr_db=bits_map(d["snr_db"]),
                top_eigenvalue=estimate(d["top_eigenvalue"]),
                eigen_damage=bits_map(d["eigen_damage"]),
                fisher_damage=bits_map(d["fisher_damage"]),
                taylor_damage=bits_map(d["taylor_damage"]),
                entropy=None if d["entropy"] is None else float(d["entropy"]),
                entropy_damage=bits_map(d["entropy_damage"]),
                input_activation=d["input_activation"],
                activation_damage=bits_map(d["activation_damage"]),
                activation_hessian_damage=bits_map(d.get("activation_hessian_damage", {})),
            )
        pairs = tuple(PairTerm(**p) for p in data["pairs"])
        activations = {
            t: ActivationSite(
                t,
                tuple(a["consumers"]),
                bits_map(a["damage"]),
                estimate(a.get("trace")),
                bits_map(a.get("hessian_damage", {})),
            )
            for t, a in data["activations"].items()
        }
        return cls(
            layers,
            pairs,
            data["output_kind"],
            int(data["forward_passes"]),
            float(data["seconds"]),
            data["settings"],
            data.get("fingerprint", ""),
            activations,
            int(data["reverse_passes"]),
            tuple(data["notes"]),
        )
