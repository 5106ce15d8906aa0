"""Analysis pass: how much each weighted layer suffers from fewer bits (METHODS.md section 3).

For every weighted layer i and candidate weight width b, on label-free calibration data:
- average Fisher/Hessian trace Tr(H_i)/n_i by Hutchinson (HAWQ-V2), v^T H_i v from two
  forward passes (central difference of the output, closed-form output Hessian), and the
  HAWQ-V2 damage Omega_i(b) = 1/2 Tr(H_i)/n_i ||Q_b(W_i) - W_i||^2 (predicted KL);
- empirical damage Delta L_i(b): the loss with layer i alone at b bits;
- output SNR (dB) of that single-layer perturbation, a cheap baseline proxy;
- inter-layer terms Delta_ij = L(Q_i, Q_j) - L(Q_i) - L(Q_j) + L(none) at ``pair_bits`` for all
  pairs of small models, or neighbours plus pairs among the most sensitive layers otherwise.
The report is data (JSON); :func:`predict_damage` turns it into a damage model over plans.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.passes.sensitivity.estimators import Estimate, hutchinson_trace
from dyadiq.passes.sensitivity.perturbable_model import OutputKind, PerturbableModel, loss
from dyadiq.quantizers import quantize_weight_per_channel


@dataclass(frozen=True)
class SensitivityConfig:
    weight_bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    hutchinson_max_iters: int = 64
    hutchinson_min_iters: int = 8
    hutchinson_rtol: float = 0.1
    epsilon_rel: float = 1e-3  # finite-difference step, relative to the layer's RMS weight
    pair_bits: int = 3
    all_pairs_up_to: int = 24  # layers; above this, neighbours + top-k sensitive pairs
    top_k_pairs: int = 8
    seed: int = 0
    trace: bool = True
    empirical: bool = True
    pairs: bool = True

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class LayerSensitivity:
    op: str
    params: int
    perturbation_sq: Mapping[int, float]  # ||Q_b(W) - W||^2
    trace: Estimate | None = None  # average trace Tr(H)/n
    hessian_damage: Mapping[int, float] = field(default_factory=dict)
    empirical_damage: Mapping[int, float] = field(default_factory=dict)
    snr_db: Mapping[int, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "params": self.params,
            "perturbation_sq": {str(b): v for b, v in self.perturbation_sq.items()},
            "trace": self.trace.to_json() if self.trace else None,
            "hessian_damage": {str(b): v for b, v in self.hessian_damage.items()},
            "empirical_damage": {str(b): v for b, v in self.empirical_damage.items()},
            "snr_db": {str(b): v for b, v in self.snr_db.items()},
        }


@dataclass(frozen=True)
class PairTerm:
    a: str
    b: str
    bits: int
    delta: float


@dataclass(frozen=True)
class SensitivityReport:
    layers: Mapping[str, LayerSensitivity]
    pairs: tuple[PairTerm, ...]
    output_kind: str
    forward_passes: int
    seconds: float
    settings: Mapping[str, Any]
    fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "output_kind": self.output_kind,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
            "settings": dict(self.settings),
            "layers": {k: v.to_json() for k, v in self.layers.items()},
            "pairs": [p.__dict__ for p in self.pairs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SensitivityReport:
        def bits_map(m: Mapping[str, float]) -> dict[int, float]:
            return {int(k): float(v) for k, v in m.items()}

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
            )
        pairs = tuple(PairTerm(**p) for p in data["pairs"])
        return cls(
            layers,
            pairs,
            data["output_kind"],
            int(data["forward_passes"]),
            float(data["seconds"]),
            data["settings"],
            data.get("fingerprint", ""),
        )


def quantized_weight(graph: QGraph, layer_id: str, bits: int) -> np.ndarray:
    node = graph.node(layer_id)
    weight = graph.weight(node)
    assert weight is not None
    values = np.asarray(weight.values, np.float32)
    return quantize_weight_per_channel(values, bits, weight_channel_axis(node)).dequantize()


def _snr_db(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    noise = sum(
        float(np.sum((o.astype(np.float64) - r) ** 2))
        for r, o in zip(reference, outputs, strict=True)
    )
    return float(10 * np.log10(signal / max(noise, 1e-30)))


def _pairs_to_measure(
    layer_ids: list[str], damage: Mapping[str, float], config: SensitivityConfig
) -> list[tuple[str, str]]:
    if len(layer_ids) <= config.all_pairs_up_to:
        return list(itertools.combinations(layer_ids, 2))
    chosen = set(itertools.pairwise(layer_ids))  # graph neighbours
    top = sorted(layer_ids, key=lambda i: -damage.get(i, 0.0))[: config.top_k_pairs]
    chosen |= {tuple(sorted(p)) for p in itertools.combinations(top, 2)}  # type: ignore[misc]
    order = {k: i for i, k in enumerate(layer_ids)}
    return sorted(chosen, key=lambda p: (order[p[0]], order[p[1]]))


def detect_output_kind(outputs: Sequence[np.ndarray]) -> OutputKind:
    """Probabilities if rows are non-negative and sum to 1; embeddings if rows have unit
    norm and the output is not one row per class (rank 2, >= 64 wide); logits otherwise."""
    rows = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outputs]).astype(np.float64)
    if (rows >= 0).all() and np.allclose(rows.sum(-1), 1.0, atol=1e-3):
        return OutputKind.PROBABILITIES
    if rows.shape[-1] >= 64 and np.allclose(np.linalg.norm(rows, axis=-1), 1.0, atol=1e-3):
        return OutputKind.EMBEDDING
    return OutputKind.LOGITS


def output_kind_of(graph: QGraph, batches: Sequence[Mapping[str, np.ndarray]]) -> OutputKind:
    """Detect the loss to use from the float model's output on the first batch."""
    probe = PerturbableModel(graph, batches[:1], OutputKind.LOGITS)
    return detect_output_kind(probe.reference)


def analyze_cached(
    graph: QGraph,
    batches: Sequence[Mapping[str, np.ndarray]],
    kind: OutputKind,
    config: SensitivityConfig = SensitivityConfig(),
) -> tuple[SensitivityReport, bool]:
    """``analyze`` with the on-disk cache; returns (report, whether it came from the cache)."""
    from dyadiq.passes.sensitivity import cache

    settings = {**config.to_json(), "output_kind": kind.value}
    key = cache.fingerprint(graph.to_onnx(), batches, settings)
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    report = analyze(graph, batches, kind, config)
    report = SensitivityReport(
        report.layers,
        report.pairs,
        report.output_kind,
        report.forward_passes,
        report.seconds,
        report.settings,
        key,
    )
    cache.store(key, report)
    return report, False


def analyze(
    graph: QGraph,
    batches: Sequence[Mapping[str, np.ndarray]],
    kind: OutputKind,
    config: SensitivityConfig = SensitivityConfig(),
    layer_ids: Sequence[str] | None = None,
) -> SensitivityReport:
    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    model = PerturbableModel(graph, batches, kind, layer_ids)
    layers: dict[str, LayerSensitivity] = {}
    low_damage: dict[str, float] = {}
    for layer_id, weight in model.weights.items():
        quantized = {b: quantized_weight(graph, layer_id, b) for b in config.weight_bits}
        widths = sorted({*config.weight_bits, config.pair_bits})  # pair terms rescale by these
        for b in widths:
            if b not in quantized:
                quantized[b] = quantized_weight(graph, layer_id, b)
        pert_sq = {b: float(np.sum((quantized[b] - weight) ** 2)) for b in widths}
        trace = None
        hessian: dict[int, float] = {}
        if config.trace:
            epsilon = config.epsilon_rel * float(np.sqrt(np.mean(weight**2)) or 1.0)

            def quadratic_form(v: np.ndarray, lid: str = layer_id, eps: float = epsilon) -> float:
                return model.fisher_quadratic_form(lid, v, eps)

            total = hutchinson_trace(
                quadratic_form,
                weight.shape,
                rng=rng,
                max_iters=config.hutchinson_max_iters,
                min_iters=config.hutchinson_min_iters,
                rtol=config.hutchinson_rtol,
            )
            n = weight.size
            trace = Estimate(total.mean / n, total.stderr / n, total.samples)
            hessian = {b: 0.5 * trace.mean * pert_sq[b] for b in config.weight_bits}
        empirical: dict[int, float] = {}
        snr: dict[int, float] = {}
        if config.empirical:
            for b in config.weight_bits:
                q = quantized[b]
                outs = model.outputs({layer_id: q})
                pairs_ro = zip(model.reference, outs, strict=True)
                empirical[b] = float(np.mean([loss(r, o, kind) for r, o in pairs_ro]))
                snr[b] = _snr_db(model.reference, outs)
        low = min(config.weight_bits)
        low_damage[layer_id] = empirical.get(low, hessian.get(low, 0.0))
        layers[layer_id] = LayerSensitivity(
            graph.node(layer_id).op,
            int(weight.size),
            pert_sq,
            trace,
            hessian,
            empirical,
            snr,
        )
    pairs: list[PairTerm] = []
    if config.pairs and config.empirical:
        pb = config.pair_bits
        single: dict[str, float] = {}
        for layer_id in model.weights:
            measured = layers[layer_id].empirical_damage
            single[layer_id] = (
                measured[pb]
                if pb in measured
                else model.loss({layer_id: quantized_weight(graph, layer_id, pb)})
            )
        for first, second in _pairs_to_measure(list(model.weights), low_damage, config):
            both = model.loss(
                {
                    first: quantized_weight(graph, first, pb),
                    second: quantized_weight(graph, second, pb),
                }
            )
            pairs.append(PairTerm(first, second, pb, both - single[first] - single[second]))
    return SensitivityReport(
        layers,
        tuple(pairs),
        kind.value,
        model.forward_passes,
        time.perf_counter() - start,
        config.to_json(),
    )


PROXIES = ("hessian", "hessian+pairs", "empirical", "empirical+pairs", "snr")


def layer_damage(layer: LayerSensitivity, bits: int, proxy: str) -> float:
    """One layer's predicted damage at ``bits`` weight bits (0 when left in float)."""
    if proxy.startswith("hessian"):
        return layer.hessian_damage.get(bits, 0.0)
    if proxy.startswith("empirical"):
        return layer.empirical_damage.get(bits, 0.0)
    if proxy == "snr":
        return 10 ** (-layer.snr_db.get(bits, 300.0) / 10) if bits < 32 else 0.0
    raise ValueError(f"unknown proxy {proxy!r}; choose one of {PROXIES}")


def pair_damage(report: SensitivityReport, pair: PairTerm, bits_a: int, bits_b: int) -> float:
    """A pair term measured at ``pair.bits``, rescaled to other widths by the product of the
    two layers' relative perturbation norms: exact for a quadratic loss whose cross term is
    bilinear in the two perturbations."""
    la, lb = report.layers[pair.a], report.layers[pair.b]
    ref_a = la.perturbation_sq.get(pair.bits, 0.0)
    ref_b = lb.perturbation_sq.get(pair.bits, 0.0)
    if ref_a <= 0 or ref_b <= 0:
        return 0.0
    scale = np.sqrt(la.perturbation_sq.get(bits_a, 0.0) / ref_a) * np.sqrt(
        lb.perturbation_sq.get(bits_b, 0.0) / ref_b
    )
    return pair.delta * float(scale)


def predict_damage(report: SensitivityReport, bits: Mapping[str, int], proxy: str) -> float:
    """Predicted damage of giving each layer ``bits[layer]`` weight bits (8 where absent)."""
    total = sum(layer_damage(layer, bits.get(i, 8), proxy) for i, layer in report.layers.items())
    if proxy.endswith("+pairs"):
        total += sum(
            pair_damage(report, p, bits.get(p.a, 8), bits.get(p.b, 8)) for p in report.pairs
        )
    return total
