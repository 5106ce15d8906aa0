"""Analysis pass: how much each weighted layer suffers from fewer bits (METHODS.md section 3).

For every weighted layer i and candidate weight width b, on label-free calibration data:
- average Fisher/Hessian trace Tr(H_i)/n_i by Hutchinson (HAWQ-V2), v^T H_i v from two
  forward passes (central difference of the output, closed-form output Hessian), and the
  HAWQ-V2 damage Omega_i(b) = 1/2 Tr(H_i)/n_i ||Q_b(W_i) - W_i||^2 (predicted KL);
- empirical damage Delta L_i(b): the loss with layer i alone at b bits; given the plan's
  activation quantizers (``activation_quant``), on top of the A8 model instead:
  L(A8, layer i at b) - L(A8), so the damage includes the weights' interaction with the
  activation rounding the deployed model has (``perturbable_model.py``);
- output SNR (dB) of that single-layer perturbation, a cheap baseline proxy;
- inter-layer terms Delta_ij = L(Q_i, Q_j) - L(Q_i) - L(Q_j) + L(none) at every width pair of
  ``pair_bits``, with their noise, for all pairs of small models, or pairs by structure plus
  pairs among the most sensitive layers otherwise (``pairs.py``; off unless asked);
- with ``gradients=True`` (reverse mode through TVM, ``gradient_proxies.py``): the top
  Gauss-Newton eigenvalue lambda_i (HAWQ; damage 1/2 lambda_i ||dW||^2), the Fisher diagonal
  (damage 1/2 sum F_jj dW_j^2) and the Taylor term |g . dW| with g the gradient of the
  labelled cross-entropy (labels given, else the float argmax; none for embeddings);
- feature-map entropy H_i of each layer's output (damage H_i ||dW||^2 / ||W||^2, a heuristic
  that gives the data-only score a width dependence);
- activation damage: the loss with one activation site alone fake-quantized to each of
  ``activation_bits`` (``activation_probe.py``); a layer whose data input is exactly one site
  carries that site's damage as ``activation_damage``.
Every evaluation above (a layer at a width, a pair, a probe vector, a site at a width) is an
independent task run by an executor (``executor.py``: serial, or Ray workers), with its own
seed, so the report does not depend on where or in what order they ran; finished tasks are
journalled so an interrupted analysis resumes. The Hutchinson estimate stops on its standard
error (``hutchinson_rtol`` of the mean, after ``hutchinson_min_iters``, at most
``hutchinson_max_iters``), reported with it.
The report is data (:mod:`.report`, versioned JSON); :func:`predict_damage`
(``damage_model.py``) turns it into a damage model over plans.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.passes.sensitivity.activation_probe import ActivationProbe, ActivationSite
from dyadiq.passes.sensitivity.damage_model import MissingProxyError as MissingProxyError
from dyadiq.passes.sensitivity.damage_model import layer_damage as layer_damage
from dyadiq.passes.sensitivity.damage_model import pair_damage as pair_damage
from dyadiq.passes.sensitivity.damage_model import predict_damage as predict_damage
from dyadiq.passes.sensitivity.estimators import Estimate
from dyadiq.passes.sensitivity.executor import Executor, Journal, SerialExecutor, run_tasks
from dyadiq.passes.sensitivity.pair_terms import loss_key, measure_pair_terms
from dyadiq.passes.sensitivity.perturbable_model import OutputKind, PerturbableModel
from dyadiq.passes.sensitivity.proxy import PROXIES as PROXIES  # re-exported: callers list them
from dyadiq.passes.sensitivity.proxy import Proxy as Proxy
from dyadiq.passes.sensitivity.report import (
    LayerSensitivity,
    PairTerm,
    SensitivityConfig,
    SensitivityReport,
)
from dyadiq.passes.sensitivity.tasks import AnalysisSpec, SiteLoss, WeightLoss
from dyadiq.passes.sensitivity.trace_rounds import (
    first_round,
    hutchinson_rounds,
    layer_probes,
    per_weight,
    site_probes,
)
from dyadiq.quantizers import ROUND_TO_NEAREST, ActQuant, WeightQuantizer

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


def activation_quant_digest(activation_quant: Mapping[str, ActQuant]) -> str:
    """A stable digest of activation quantizers (the cache key's part for them)."""
    import hashlib

    text = ";".join(
        f"{name}:{q.scale!r}:{q.zero_point}:{q.bits}:{q.signed}"
        for name, q in sorted(activation_quant.items())
    )
    return hashlib.sha256(text.encode()).hexdigest()


def analyze_cached(
    graph: QGraph,
    batches: Sequence[Mapping[str, np.ndarray]],
    kind: OutputKind,
    config: SensitivityConfig = DEFAULT_CONFIG,
    *,
    labels: np.ndarray | None = None,
    weights: WeightQuantizer = ROUND_TO_NEAREST,
    executor: Executor | None = None,
    activation_quant: Mapping[str, ActQuant] | None = None,
) -> tuple[SensitivityReport, bool]:
    """``analyze`` with the on-disk cache; returns (report, whether it came from the cache).

    The key covers the weight quantizer: a compensated one by the digest of its settings and
    every compensated array, so damage priced for other weights is never reused; and the
    activation quantizers the damage is measured under (absent for float activations, so
    those keys are what they were). Finished tasks are journalled under the same key, so an
    interrupted analysis resumes."""
    import hashlib

    from dyadiq.passes.sensitivity import cache

    settings: dict[str, Any] = {**config.to_json(), "output_kind": kind.value}
    fingerprint = getattr(weights, "fingerprint", None)
    if callable(fingerprint):
        settings["weight_quantizer"] = fingerprint()
    if labels is not None:
        settings["labels"] = hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest()
    if activation_quant:
        settings["activation_quant"] = activation_quant_digest(activation_quant)
    key = cache.fingerprint(graph.to_onnx(), batches, settings)
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    journal = cache.PartialResults(key)
    report = analyze(
        graph,
        batches,
        kind,
        config,
        labels=labels,
        weights=weights,
        executor=executor,
        journal=journal,
        activation_quant=activation_quant,
    )
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
    executor: Executor | None = None,
    journal: Journal | None = None,
    activation_quant: Mapping[str, ActQuant] | None = None,
) -> SensitivityReport:
    """``labels``: one class index per output row of ``batches`` (in order); they switch the
    Taylor proxy's loss from cross-entropy against the float argmax to the real task loss.
    ``weights``: the quantizer the plans will use (a compensated one prices the damage of its
    compensated weights and corrected biases). ``executor``: where the independent
    evaluations run (serial by default; the results do not depend on it). ``journal``:
    finished tasks (an interrupted run's are skipped). ``activation_quant``: the plan's
    activation quantizers (site -> quantizer); the empirical damage (and pair terms) are then
    measured on top of the model with all of them on (A8 damage), the other proxies as
    before."""
    start = time.perf_counter()
    own_executor = executor is None
    executor = executor if executor is not None else SerialExecutor()
    try:
        return _analyze(
            graph,
            batches,
            kind,
            config,
            layer_ids,
            labels,
            weights,
            executor,
            journal,
            start,
            activation_quant,
        )
    finally:
        if own_executor:
            executor.close()


def _analyze(
    graph: QGraph,
    batches: Sequence[Mapping[str, np.ndarray]],
    kind: OutputKind,
    config: SensitivityConfig,
    layer_ids: Sequence[str] | None,
    labels: np.ndarray | None,
    weights: WeightQuantizer,
    executor: Executor,
    journal: Journal | None,
    start: float,
    activation_quant: Mapping[str, ActQuant] | None = None,
) -> SensitivityReport:
    model = PerturbableModel(graph, batches, kind, layer_ids)
    notes: list[str] = []
    damage_model: PerturbableModel | None = None
    if activation_quant and (config.empirical or config.pairs):
        damage_model = PerturbableModel(
            graph, batches, kind, layer_ids, activation_quant=activation_quant
        )
        notes.append(
            f"empirical damage on top of the model with {len(activation_quant)} activation "
            f"sites quantized (A8 baseline loss {damage_model.baseline_loss:.6g} subtracted)"
        )
    extra: dict[str, dict[str, Any]] = {layer: {} for layer in model.weights}
    reverse_passes = extra_forward = 0
    if config.gradients:
        reverse_passes, extra_forward = _gradient_statistics(
            graph, batches, kind, config, layer_ids, labels, extra, notes
        )
    probe: ActivationProbe | None = None
    if config.entropy or config.activations:
        traced = config.activations and config.activation_trace
        probe = ActivationProbe(graph, batches, kind, trace=traced)
        if config.entropy:
            for layer, value in probe.feature_entropy().items():
                if layer in extra:
                    extra[layer]["entropy"] = value
        extra_forward += probe.forward_passes
    spec = AnalysisSpec(
        model.spec(),
        probe.spec() if probe and config.activations else None,
        damage_model.spec() if damage_model is not None else None,
    )
    layers = list(model.weights)
    pair_widths: tuple[int, ...] = ()
    if config.pairs:
        pair_widths = tuple(b for b in config.pair_bits if b in config.weight_bits) or (
            min(config.weight_bits),
        )
    loss_widths = sorted({*(config.weight_bits if config.empirical else ()), *pair_widths})
    widths = sorted({*config.weight_bits, *pair_widths})
    quantized = {
        layer: {b: quantized_weight(graph, layer, b, weights) for b in widths} for layer in layers
    }
    tasks: list[Any] = [
        WeightLoss(
            loss_key(layer, b),
            {layer: quantized[layer][b]},
            _corrected_biases(model, weights, {layer: b}),
        )
        for layer in layers
        for b in loss_widths
    ]
    if probe is not None and config.activations:
        tasks += [
            SiteLoss(f"act/{site}/{b}", i, b)
            for i, site in enumerate(probe.sites)
            for b in config.activation_bits
        ]
    layer_make = layer_probes(model, config)
    if config.trace:
        tasks += first_round(layers, layer_make, config)
    site_make = site_probes(probe, config) if probe is not None and probe.traced else None
    if probe is not None and site_make is not None:
        tasks += first_round(probe.sites, site_make, config)
    first = run_tasks(executor, spec, tasks, "sensitivity: layers and sites", journal)
    task_passes = sum(int(first[t.key]["passes"]) for t in tasks)
    traces: dict[str, Estimate] = {}
    if config.trace:
        totals, more = hutchinson_rounds(
            executor, spec, layers, layer_make, config, first, journal, "sensitivity: Hutchinson"
        )
        traces = per_weight(model, totals)
        task_passes += more
    activations: dict[str, ActivationSite] = {}
    if probe is not None and config.activations:
        site_traces: dict[str, Estimate] = {}
        if site_make is not None:
            site_traces, more = hutchinson_rounds(
                executor,
                spec,
                probe.sites,
                site_make,
                config,
                first,
                journal,
                "sensitivity: activation Hutchinson",
            )
            task_passes += more
        for site in probe.sites:
            damage = {b: float(first[f"act/{site}/{b}"]["value"]) for b in config.activation_bits}
            estimate = site_traces.get(site)
            hessian = (
                {
                    b: 0.5 * estimate.mean * probe.quantization_error(site, b)
                    for b in config.activation_bits
                }
                if estimate
                else {}
            )
            activations[site] = ActivationSite(
                site, probe.consumers[site], damage, estimate, hessian
            )
        for layer in extra:
            reading = [a for a in activations.values() if layer in a.consumers]
            if len(reading) == 1:
                extra[layer]["input_activation"] = reading[0].tensor
                extra[layer]["activation_damage"] = dict(reading[0].damage)
                if reading[0].hessian_damage:
                    extra[layer]["activation_hessian_damage"] = dict(reading[0].hessian_damage)
    result: dict[str, LayerSensitivity] = {}
    for layer in layers:
        weight = model.weights[layer]
        pert_sq = {b: float(np.sum((quantized[layer][b] - weight) ** 2)) for b in widths}
        trace = traces.get(layer)
        hessian = {b: 0.5 * trace.mean * pert_sq[b] for b in config.weight_bits} if trace else {}
        empirical: dict[int, float] = {}
        snr: dict[int, float] = {}
        if config.empirical:
            for b in config.weight_bits:
                measured = first[loss_key(layer, b)]
                empirical[b] = float(np.mean(measured["batch"]))
                snr[b] = float(measured["snr_db"])
        result[layer] = LayerSensitivity(
            graph.node(layer).op,
            int(weight.size),
            pert_sq,
            trace,
            hessian,
            empirical,
            snr,
            **_per_width_proxies(extra[layer], weight, quantized[layer], config.weight_bits),
        )
    pairs: list[PairTerm] = []
    if config.pairs:
        biases = {
            layer: {b: _corrected_biases(model, weights, {layer: b}) for b in pair_widths}
            for layer in layers
        }
        pairs, more = measure_pair_terms(
            graph, executor, spec, model, config, quantized, biases, first, pair_widths, journal
        )
        task_passes += more
    if damage_model is not None:
        extra_forward += damage_model.forward_passes
    return SensitivityReport(
        result,
        tuple(pairs),
        kind.value,
        model.forward_passes + extra_forward + task_passes,
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
    for key in ("input_activation", "activation_damage", "activation_hessian_damage"):
        if key in extra:
            fields[key] = extra[key]
    return fields
