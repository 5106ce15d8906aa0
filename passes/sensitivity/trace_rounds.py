"""The HAWQ-V2 average Hessian trace of every layer by Hutchinson's method, as executor tasks.

Tr(H_l) = E_v[v^T H_l v], v Rademacher, H_l = J_l^T H_out J_l (the Fisher / Gauss-Newton block of
the label-free loss, ``perturbable_model.py``); one sample is one :class:`TraceProbe` task
(two forward passes), seeded by (analysis seed, layer index, sample index). Samples are drawn
in rounds: the first (``hutchinson_min_iters`` per layer) with the analysis's other tasks,
then each layer whose standard error is still above ``hutchinson_rtol`` of its mean doubles its
samples, up to ``hutchinson_max_iters``. The stopping sample is the one a sequential loop would
stop at (``estimators.hutchinson_stop``), so the estimate does not depend on the rounds, the
workers or the order. The report keeps each layer's estimate with its standard error and
sample count.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from dyadiq.passes.sensitivity.estimators import Estimate, estimate_of, hutchinson_stop
from dyadiq.passes.sensitivity.executor import Executor, Journal, run_tasks
from dyadiq.passes.sensitivity.perturbable_model import PerturbableModel
from dyadiq.passes.sensitivity.report import SensitivityConfig
from dyadiq.passes.sensitivity.tasks import AnalysisSpec, TraceProbe


def first_round(model: PerturbableModel, config: SensitivityConfig) -> list[TraceProbe]:
    """The ``hutchinson_min_iters`` first probes of every layer."""
    epsilon = epsilons(model, config)
    return [
        trace_probe(layer, i, k, config, epsilon)
        for i, layer in enumerate(model.weights)
        for k in range(config.hutchinson_min_iters)
    ]


def hutchinson_traces(
    executor: Executor,
    spec: AnalysisSpec,
    model: PerturbableModel,
    config: SensitivityConfig,
    first: Mapping[str, Any],
    journal: Journal | None,
) -> tuple[dict[str, Estimate], int]:
    """Average trace Tr(H)/n per layer: probes in rounds (the first, ``min_iters`` per layer,
    already in ``first``), each round doubling a layer's samples until its standard error is
    within ``hutchinson_rtol`` of its mean. The stopping sample is the one a sequential loop
    would stop at (``hutchinson_stop``), so the estimate does not depend on the rounds."""
    layers = list(model.weights)
    epsilon = epsilons(model, config)
    values = {
        layer: [first[probe_key(layer, k)]["value"] for k in range(config.hutchinson_min_iters)]
        for layer in layers
    }
    passes = 0
    checked = dict.fromkeys(layers, 0)
    stop: dict[str, int | None] = {}
    for round_index in itertools.count(1):
        for layer in layers:
            if stop.get(layer) is None:
                stop[layer] = hutchinson_stop(
                    values[layer],
                    min_iters=config.hutchinson_min_iters,
                    rtol=config.hutchinson_rtol,
                    checked=checked[layer],
                )
                checked[layer] = len(values[layer])
        pending = [
            layer
            for layer in layers
            if stop[layer] is None and len(values[layer]) < config.hutchinson_max_iters
        ]
        if not pending:
            break
        tasks = []
        for layer in pending:
            drawn = len(values[layer])
            more = min(config.hutchinson_max_iters, 2 * drawn)
            index = layers.index(layer)
            tasks += [trace_probe(layer, index, k, config, epsilon) for k in range(drawn, more)]
        results = run_tasks(
            executor, spec, tasks, f"sensitivity: Hutchinson round {round_index}", journal
        )
        for task in tasks:
            values[task.layer].append(results[task.key]["value"])
            passes += int(results[task.key]["passes"])
    traces = {}
    for layer in layers:
        used = values[layer][: stop[layer] or len(values[layer])]
        total = estimate_of(used)
        n = model.weights[layer].size
        traces[layer] = Estimate(total.mean / n, total.stderr / n, total.samples)
    return traces, passes


def epsilons(model: PerturbableModel, config: SensitivityConfig) -> dict[str, float]:
    """Finite-difference steps: ``epsilon_rel`` times each layer's RMS weight."""
    return {
        layer: config.epsilon_rel * float(np.sqrt(np.mean(w**2)) or 1.0)
        for layer, w in model.weights.items()
    }


def probe_key(layer: str, k: int) -> str:
    return f"trace/{layer}/{k}"


def trace_probe(
    layer: str, index: int, k: int, config: SensitivityConfig, epsilon: Mapping[str, float]
) -> TraceProbe:
    return TraceProbe(probe_key(layer, k), layer, (config.seed, index, k), epsilon[layer])
