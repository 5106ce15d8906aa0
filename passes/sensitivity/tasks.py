"""The sensitivity analysis's independent evaluations, as executor tasks (``executor.py``).

The worker state is the float model with its weights as inputs (:class:`PerturbableModel`) and,
when activation sites are priced, the model with switchable fake quantizers
(:class:`ActivationProbe`), both rebuilt from plain specs; when the empirical damage is priced
on top of the A8 model, that model too (``damage``: :class:`WeightLoss` runs on it). Tasks:

- :class:`WeightLoss`: some layers' weights (and corrected biases) replaced - one layer at a
  width (empirical damage, SNR) or two (a pair's joint damage). Returns the loss per batch and
  per output row: the rows give each pair term its noise;
- :class:`TraceProbe`: one Hutchinson sample v^T J^T H_out J v, v Rademacher drawn from the
  task's own seed, so it is the same number wherever and whenever it runs;
- :class:`SiteLoss`: one activation site alone fake-quantized to a width;
- :class:`SiteTraceProbe`: one Hutchinson sample of an activation site's Hessian trace.

Every result is JSON (floats, lists of floats) and counts its forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dyadiq.passes.sensitivity.activation_probe import ActivationProbe, ProbeSpec
from dyadiq.passes.sensitivity.estimators import rademacher
from dyadiq.passes.sensitivity.perturbable_model import PerturbableModel, PerturbableSpec


@dataclass
class AnalysisState:
    model: PerturbableModel
    probe: ActivationProbe | None
    damage: PerturbableModel | None = None  # the A8 model weight losses are measured on


@dataclass(frozen=True)
class AnalysisSpec:
    perturbable: PerturbableSpec
    probe: ProbeSpec | None = None
    damage: PerturbableSpec | None = None

    def open(self, threads: int) -> AnalysisState:
        model = PerturbableModel.from_spec(self.perturbable, threads)
        probe = ActivationProbe.from_spec(self.probe, threads) if self.probe else None
        damage = PerturbableModel.from_spec(self.damage, threads) if self.damage else None
        return AnalysisState(model, probe, damage)


def _snr_db(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    noise = sum(
        float(np.sum((o.astype(np.float64) - r) ** 2))
        for r, o in zip(reference, outputs, strict=True)
    )
    return float(10 * np.log10(signal / max(noise, 1e-30)))


@dataclass(frozen=True)
class WeightLoss:
    key: str
    weights: dict[str, np.ndarray]
    biases: dict[str, np.ndarray] = field(default_factory=dict)

    def run(self, state: AnalysisState) -> dict[str, object]:
        model = state.damage if state.damage is not None else state.model
        before = model.forward_passes
        outs, rows = model.losses(self.weights, self.biases)
        return {
            "batch": [float(np.mean(r)) for r in rows],
            "rows": [float(v) for r in rows for v in r],
            "snr_db": _snr_db(model.reference, outs),
            "passes": model.forward_passes - before,
        }


@dataclass(frozen=True)
class TraceProbe:
    key: str
    layer: str
    seed: tuple[int, ...]  # (analysis seed, layer index, sample index)
    epsilon: float  # finite-difference step

    def run(self, state: AnalysisState) -> dict[str, object]:
        model = state.model
        before = model.forward_passes
        v = rademacher(np.random.default_rng(list(self.seed)), model.weights[self.layer].shape)
        value = model.fisher_quadratic_form(self.layer, v, self.epsilon)
        return {"value": float(value), "passes": model.forward_passes - before}


@dataclass(frozen=True)
class SiteTraceProbe:
    key: str
    index: int  # into the probe's sites
    seed: float  # of the in-graph hash that draws the probe vector
    epsilon: float  # finite-difference step

    def run(self, state: AnalysisState) -> dict[str, object]:
        probe = state.probe
        assert probe is not None and probe.traced  # made only with a traced probe spec
        before = probe.forward_passes
        value = probe.trace_sample(self.index, self.seed, self.epsilon)
        return {"value": float(value), "passes": probe.forward_passes - before}


@dataclass(frozen=True)
class SiteLoss:
    key: str
    index: int  # into the probe's sites
    bits: int

    def run(self, state: AnalysisState) -> dict[str, object]:
        probe = state.probe
        assert probe is not None  # the analysis only makes these with a probe spec
        before = probe.forward_passes
        value = probe.site_damage(self.index, self.bits)
        return {"value": float(value), "passes": probe.forward_passes - before}
