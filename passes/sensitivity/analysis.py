"""Analysis pass: how much each weighted layer suffers from fewer bits (METHODS.md section 3).

For every weighted layer i and candidate weight width b, on label-free calibration data:
- average Fisher/Hessian trace Tr(H_i)/n_i by Hutchinson (HAWQ-V2), v^T H_i v from two
  forward passes (central difference of the output, closed-form output Hessian), and the
  HAWQ-V2 damage Omega_i(b) = 1/2 Tr(H_i)/n_i ||Q_b(W_i) - W_i||^2 (predicted KL);
- empirical damage Delta L_i(b): the loss with layer i alone at b bits;
- output SNR (dB) of that single-layer perturbation, a cheap baseline proxy;
- inter-layer terms Delta_ij = L(Q_i, Q_j) - L(Q_i) - L(Q_j) + L(none) at ``pair_bits`` for all
  pairs of small models, or neighbours plus pairs among the most sensitive layers otherwise;
- with ``gradients=True`` (reverse mode through TVM, ``gradient_proxies.py``): the top
  Gauss-Newton eigenvalue lambda_i (HAWQ; damage 1/2 lambda_i ||dW||^2), the Fisher diagonal
  (damage 1/2 sum F_jj dW_j^2) and the Taylor term |g . dW| with g the gradient of the
  labelled cross-entropy (labels given, else the float argmax; none for embeddings);
- feature-map entropy H_i of each layer's output (damage H_i ||dW||^2 / ||W||^2, a heuristic
  that gives the data-only score a width dependence);
- activation damage: the loss with one activation site alone fake-quantized to each of
  ``activation_bits`` (``activation_probe.py``); a layer whose data input is exactly one site
  carries that site's damage as ``activation_damage``.
The report is data (:mod:`.report`, versioned JSON); :func:`predict_damage` turns it into a damage
model over plans.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.passes.sensitivity.activation_probe import ActivationProbe, ActivationSite
from dyadiq.passes.sensitivity.estimators import Estimate, hutchinson_trace
from dyadiq.passes.sensitivity.perturbable_model import OutputKind, PerturbableModel, loss
from dyadiq.passes.sensitivity.proxy import PROXIES as PROXIES  # re-exported: callers list them
from dyadiq.passes.sensitivity.proxy import Proxy
from dyadiq.passes.sensitivity.report import (
    LayerSensitivity,
    PairTerm,
    SensitivityConfig,
    SensitivityReport,
)
from dyadiq.quantizers import ROUND_TO_NEAREST, WeightQuantizer

DEFAULT_CONFIG = SensitivityConfig()  # frozen: one shared default is safe


def quantized_weight(
    graph: QGraph, layer_id: str, bits: int, weights: WeightQuantizer = ROUND_TO_NEAREST
) -> np.ndarray:
    """The layer's weight as the QDQ model at ``bits`` holds it (dequantized)."""
    node = graph.node(layer_id)
    weight = graph.weight(node)
    assert weight is not None
    values = np.asarray(weight.values, np.float32)
    axis = weight_channel_axis(node) % values.ndim
    return weights.weight_quant(layer_id, values, bits, axis).dequantize()


def _corrected_biases(
    model: PerturbableModel, weights: WeightQuantizer, layers: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """The float biases the quantizer gives these layers at these widths (bias correction)."""
    return {
        layer: weights.bias(layer, bits, model.biases[layer])
        for layer, bits in layers.items()
        if layer in model.biases
    }


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
    config: SensitivityConfig = DEFAULT_CONFIG,
    *,
    labels: np.ndarray | None = None,
    weights: WeightQuantizer = ROUND_TO_NEAREST,
) -> tuple[SensitivityReport, bool]:
    """``analyze`` with the on-disk cache; returns (report, whether it came from the cache).

    The key covers the weight quantizer: a compensated one by the digest of its settings and
    every compensated array, so damage priced for other weights is never reused."""
    import hashlib

    from dyadiq.passes.sensitivity import cache

    settings: dict[str, Any] = {**config.to_json(), "output_kind": kind.value}
    fingerprint = getattr(weights, "fingerprint", None)
    if callable(fingerprint):
        settings["weight_quantizer"] = fingerprint()
    if labels is not None:
        settings["labels"] = hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest()
    key = cache.fingerprint(graph.to_onnx(), batches, settings)
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    report = analyze(graph, batches, kind, config, labels=labels, weights=weights)
    report = dataclasses.replace(report, fingerprint=key)
    cache.store(key, report)
    return report, False


def analyze(
    graph: QGraph,
    batches: Sequence[Mapping[str, np.ndarray]],
    kind: OutputKind,
    config: SensitivityConfig = DEFAULT_CONFIG,
    layer_ids: Sequence[str] | None = None,
    *,
    labels: np.ndarray | None = None,
    weights: WeightQuantizer = ROUND_TO_NEAREST,
) -> SensitivityReport:
    """``labels``: one class index per output row of ``batches`` (in order); they switch the
    Taylor proxy's loss from cross-entropy against the float argmax to the real task loss.
    ``weights``: the quantizer the plans will use (a compensated one prices the damage of its
    compensated weights and corrected biases)."""
    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    model = PerturbableModel(graph, batches, kind, layer_ids)
    notes: list[str] = []
    extra: dict[str, dict[str, Any]] = {layer: {} for layer in model.weights}
    reverse_passes = extra_forward = 0
    if config.gradients:
        reverse_passes, extra_forward = _gradient_statistics(
            graph, batches, kind, config, layer_ids, labels, extra, notes
        )
    activations: dict[str, ActivationSite] = {}
    if config.entropy or config.activations:
        probe = ActivationProbe(graph, batches, kind)
        if config.entropy:
            for layer, value in probe.feature_entropy().items():
                if layer in extra:
                    extra[layer]["entropy"] = value
        if config.activations:
            for site in probe.activation_sites(config.activation_bits):
                activations[site.tensor] = site
            for layer in extra:
                reading = [a for a in activations.values() if layer in a.consumers]
                if len(reading) == 1:
                    extra[layer]["input_activation"] = reading[0].tensor
                    extra[layer]["activation_damage"] = dict(reading[0].damage)
        extra_forward += probe.forward_passes
    layers: dict[str, LayerSensitivity] = {}
    low_damage: dict[str, float] = {}
    for layer_id, weight in model.weights.items():
        widths = sorted({*config.weight_bits, config.pair_bits})  # pair terms rescale by these
        quantized = {b: quantized_weight(graph, layer_id, b, weights) for b in widths}
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
                outs = model.outputs(
                    {layer_id: q}, _corrected_biases(model, weights, {layer_id: b})
                )
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
            **_per_width_proxies(extra[layer_id], weight, quantized, config.weight_bits),
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
                else model.loss(
                    {layer_id: quantized_weight(graph, layer_id, pb, weights)},
                    _corrected_biases(model, weights, {layer_id: pb}),
                )
            )
        for first, second in _pairs_to_measure(list(model.weights), low_damage, config):
            both = model.loss(
                {
                    first: quantized_weight(graph, first, pb, weights),
                    second: quantized_weight(graph, second, pb, weights),
                },
                _corrected_biases(model, weights, {first: pb, second: pb}),
            )
            pairs.append(PairTerm(first, second, pb, both - single[first] - single[second]))
    return SensitivityReport(
        layers,
        tuple(pairs),
        kind.value,
        model.forward_passes + extra_forward,
        time.perf_counter() - start,
        config.to_json(),
        activations=activations,
        reverse_passes=reverse_passes,
        notes=tuple(notes),
    )


def _gradient_statistics(
    graph: QGraph,
    batches: Sequence[Mapping[str, np.ndarray]],
    kind: OutputKind,
    config: SensitivityConfig,
    layer_ids: Sequence[str] | None,
    labels: np.ndarray | None,
    extra: dict[str, dict[str, Any]],
    notes: list[str],
) -> tuple[int, int]:
    """Top eigenvalue, Fisher diagonal and task gradient per layer into ``extra``; returns
    (reverse passes, forward passes). A model reverse mode cannot differentiate gets a note."""
    from dyadiq.passes.sensitivity.gradient_proxies import GradientProbe
    from dyadiq.passes.sensitivity.vjp import VjpUnsupportedError

    rng = np.random.default_rng([config.seed, 1])
    subset = list(batches[: config.gradient_samples])
    model = PerturbableModel(graph, subset, kind, layer_ids)
    if labels is not None:
        rows = sum(r.reshape(-1, r.shape[-1]).shape[0] for r in model.reference)
        labels = np.asarray(labels).reshape(-1)[:rows]
    probe = GradientProbe(model, graph.to_onnx())
    try:
        fisher = probe.fisher_diagonal(rng=rng, draws=config.fisher_draws)
    except VjpUnsupportedError as exc:
        notes.append(f"no eigenvalue/Fisher/Taylor proxies: {exc}")
        return 0, model.forward_passes
    gradient = probe.task_gradient(labels)
    if gradient is None:
        notes.append("no Taylor proxy: embedding outputs have no labelled task loss")
    for layer, weight in model.weights.items():
        epsilon = config.epsilon_rel * float(np.sqrt(np.mean(weight**2)) or 1.0)
        extra[layer]["top_eigenvalue"] = probe.top_eigenvalue(
            layer, epsilon, rng=rng, max_iters=config.eigen_max_iters, rtol=config.eigen_rtol
        )
        extra[layer]["fisher"] = fisher[layer]
        if gradient is not None:
            extra[layer]["gradient"] = gradient[layer]
    return probe.reverse_passes, model.forward_passes


def _per_width_proxies(
    extra: Mapping[str, Any],
    weight: np.ndarray,
    quantized: Mapping[int, np.ndarray],
    widths: Sequence[int],
) -> dict[str, Any]:
    """LayerSensitivity fields of the gradient, entropy and activation statistics."""
    delta = {b: quantized[b].astype(np.float64) - weight for b in widths}
    fields: dict[str, Any] = {}
    eigen = extra.get("top_eigenvalue")
    if eigen is not None:
        fields["top_eigenvalue"] = eigen
        fields["eigen_damage"] = {
            b: 0.5 * eigen.mean * float(np.sum(d**2)) for b, d in delta.items()
        }
    if "fisher" in extra:
        fields["fisher_damage"] = {
            b: 0.5 * float(np.sum(extra["fisher"] * d**2)) for b, d in delta.items()
        }
    if "gradient" in extra:
        fields["taylor_damage"] = {
            b: abs(float(np.sum(extra["gradient"] * d))) for b, d in delta.items()
        }
    if "entropy" in extra:
        norm = float(np.sum(weight.astype(np.float64) ** 2)) or 1.0
        fields["entropy"] = extra["entropy"]
        fields["entropy_damage"] = {
            b: extra["entropy"] * float(np.sum(d**2)) / norm for b, d in delta.items()
        }
    for key in ("input_activation", "activation_damage"):
        if key in extra:
            fields[key] = extra[key]
    return fields


# what an analysis needs to compute each proxy, for the error when a report lacks one
_HOW_TO_GET = {
    "hessian_damage": "SensitivityConfig(trace=True)",
    "empirical_damage": "SensitivityConfig(empirical=True)",
    "snr_db": "SensitivityConfig(empirical=True)",
    "eigen_damage": "analyze --gradients (SensitivityConfig(gradients=True))",
    "fisher_damage": "analyze --gradients (SensitivityConfig(gradients=True))",
    "taylor_damage": "analyze --gradients, on a model with a labelled task loss (not embeddings)",
    "entropy_damage": "SensitivityConfig(entropy=True)",
}


class MissingProxyError(ConfigError):
    """The sensitivity report has no data for the chosen proxy: pricing every layer at 0
    would let the allocator pick the narrowest widths for free."""


def layer_damage(layer: LayerSensitivity, bits: int, proxy: Proxy | str) -> float:
    """One layer's predicted damage at ``bits`` weight bits (0 when left in float, at 32
    bits). Raises :class:`MissingProxyError` when the report lacks that proxy."""
    chosen = Proxy.parse(proxy)
    values: Mapping[int, float] = getattr(layer, chosen.damage_field)
    if not values:
        raise MissingProxyError(
            f"the sensitivity report has no {chosen.value} damage for this {layer.op} layer: "
            f"rerun the analysis with {_HOW_TO_GET[chosen.damage_field]}, or choose another proxy"
        )
    if chosen is Proxy.SNR:
        return 10 ** (-values.get(bits, 300.0) / 10) if bits < 32 else 0.0
    return values.get(bits, 0.0)


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


def predict_damage(report: SensitivityReport, bits: Mapping[str, int], proxy: Proxy | str) -> float:
    """Predicted damage of giving each layer ``bits[layer]`` weight bits (8 where absent)."""
    chosen = Proxy.parse(proxy)
    total = sum(layer_damage(layer, bits.get(i, 8), chosen) for i, layer in report.layers.items())
    if chosen.with_pairs:
        total += sum(
            pair_damage(report, p, bits.get(p.a, 8), bits.get(p.b, 8)) for p in report.pairs
        )
    return total
