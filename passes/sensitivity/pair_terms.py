"""Measuring inter-layer pair terms (which pairs, and the safe model over them: ``pairs.py``).

For each selected pair (a, b) and each width pair (b_a, b_b) of the pair widths, one
:class:`WeightLoss` task quantizes both layers together; with the single-layer tasks' losses:

    Delta_ab(b_a, b_b) = L(Q_a, Q_b) - L(Q_a) - L(Q_b)       (L(float) = 0)

and its standard error from the per-row differences over the calibration samples (each row's
joint loss minus its two single losses), the noise that ``pairs.safe_cross_term`` filters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dyadiq.graph import QGraph
from dyadiq.passes.sensitivity.executor import Executor, Journal, run_tasks
from dyadiq.passes.sensitivity.pairs import pairs_to_measure
from dyadiq.passes.sensitivity.perturbable_model import PerturbableModel
from dyadiq.passes.sensitivity.report import PairTerm, SensitivityConfig
from dyadiq.passes.sensitivity.tasks import AnalysisSpec, WeightLoss


def loss_key(layer: str, bits: int) -> str:
    """The key of the single-layer task of ``layer`` at ``bits``."""
    return f"loss/{layer}/{bits}"


def measure_pair_terms(
    graph: QGraph,
    executor: Executor,
    spec: AnalysisSpec,
    model: PerturbableModel,
    config: SensitivityConfig,
    quantized: Mapping[str, Mapping[int, np.ndarray]],
    biases: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]],
    singles: Mapping[str, Any],
    widths: Sequence[int],
    journal: Journal | None,
) -> tuple[list[PairTerm], int]:
    """Delta_ab at every width pair of ``widths`` for the selected pairs, with the standard
    error of its per-row differences. ``singles``: the analysis's single-layer results (keyed
    by :func:`loss_key`); ``biases[layer][bits]``: the corrected biases of that layer at that
    width (empty when the quantizer corrects none)."""
    layers = list(model.weights)
    low = min(widths)
    damage = {layer: float(np.mean(singles[loss_key(layer, low)]["batch"])) for layer in layers}
    chosen = pairs_to_measure(
        graph, layers, damage, all_pairs_up_to=config.all_pairs_up_to, top_k=config.top_k_pairs
    )
    tasks = [
        WeightLoss(
            f"pair/{a}/{b}/{ba}/{bb}",
            {a: quantized[a][ba], b: quantized[b][bb]},
            {**biases[a][ba], **biases[b][bb]},
        )
        for a, b in chosen
        for ba in widths
        for bb in widths
    ]
    results = run_tasks(executor, spec, tasks, "sensitivity: pair terms", journal)
    terms = []
    passes = 0
    for a, b in chosen:
        for ba in widths:
            for bb in widths:
                both = results[f"pair/{a}/{b}/{ba}/{bb}"]
                one, two = singles[loss_key(a, ba)], singles[loss_key(b, bb)]
                rows = np.asarray(both["rows"]) - np.asarray(one["rows"]) - np.asarray(two["rows"])
                stderr = float(rows.std(ddof=1) / np.sqrt(rows.size)) if rows.size > 1 else 0.0
                d_one, d_two = float(np.mean(one["batch"])), float(np.mean(two["batch"]))
                delta = float(np.mean(both["batch"])) - d_one - d_two
                terms.append(PairTerm(a, b, ba, bb, delta, stderr, d_one, d_two))
                passes += int(both["passes"])
    return terms, passes
