"""The HAWQ-V2 average Hessian trace of every layer (and activation site) by Hutchinson's
method, as executor tasks.

Tr(H_l) = E_v[v^T H_l v], v Rademacher, H_l = J_l^T H_out J_l (the Fisher / Gauss-Newton block of
the label-free loss, ``perturbable_model.py``); one sample is one :class:`TraceProbe` task
(two forward passes), seeded by (analysis seed, layer index, sample index). Samples are drawn
in rounds: the first (``hutchinson_min_iters`` per layer) with the analysis's other tasks,
then each layer whose standard error is still above ``hutchinson_rtol`` of its mean doubles its
samples, up to ``hutchinson_max_iters``. The stopping sample is the one a sequential loop would
stop at (``estimators.hutchinson_stop``), so the estimate does not depend on the rounds, the
workers or the order. The report keeps each layer's estimate with its standard error and
sample count. Activation sites work the same way with :class:`SiteTraceProbe` tasks
(``activation_probe.py``: the probe vector is hashed inside the graph from a seed).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dyadiq.passes.sensitivity.activation_probe import ActivationProbe
from dyadiq.passes.sensitivity.estimators import Estimate, estimate_of, hutchinson_stop
from dyadiq.passes.sensitivity.executor import Executor, Journal, run_tasks
from dyadiq.passes.sensitivity.perturbable_model import PerturbableModel
from dyadiq.passes.sensitivity.report import SensitivityConfig
from dyadiq.passes.sensitivity.tasks import AnalysisSpec, SiteTraceProbe, TraceProbe

ProbeFactory = Callable[[str, int], Any]  # (unit, sample index) -> a task with a .key


def layer_probes(model: PerturbableModel, config: SensitivityConfig) -> ProbeFactory:
    """Weight-trace probes: (layer, k) -> :class:`TraceProbe`."""
    epsilon = epsilons(model, config)
    index = {layer: i for i, layer in enumerate(model.weights)}

    def make(layer: str, k: int) -> TraceProbe:
        return TraceProbe(
            probe_key(layer, k), layer, (config.seed, index[layer], k), epsilon[layer]
        )

    return make


def site_probes(probe: ActivationProbe, config: SensitivityConfig) -> ProbeFactory:
    """Activation-trace probes: (site, k) -> :class:`SiteTraceProbe`; the hash seed is drawn
    from (analysis seed, a stream of its own, site index, k), the step is ``epsilon_rel``
    times the site's RMS value."""
    index = {site: i for i, site in enumerate(probe.sites)}

    def make(site: str, k: int) -> SiteTraceProbe:
        rng = np.random.default_rng([config.seed, 2, index[site], k])
        seed = float(rng.integers(0, 2**20))
        step = config.epsilon_rel * (probe.rms[site] or 1.0)
        return SiteTraceProbe(f"act_trace/{site}/{k}", index[site], seed, step)

    return make


def first_round(units: Sequence[str], make: ProbeFactory, config: SensitivityConfig) -> list[Any]:
    """The ``hutchinson_min_iters`` first probes of every unit (layer or site)."""
    return [make(unit, k) for unit in units for k in range(config.hutchinson_min_iters)]


def hutchinson_rounds(
    executor: Executor,
    spec: AnalysisSpec,
    units: Sequence[str],
    make: ProbeFactory,
    config: SensitivityConfig,
    first: Mapping[str, Any],
    journal: Journal | None,
    label: str,
) -> tuple[dict[str, Estimate], int]:
    """The mean of each unit's probe values with its standard error: probes in rounds (the
    first, ``min_iters`` per unit, already in ``first``), each round doubling a unit's
    samples until its standard error is within ``hutchinson_rtol`` of its mean. The stopping
    sample is the one a sequential loop would stop at (``hutchinson_stop``), so the estimate
    does not depend on the rounds."""
    values = {
        unit: [first[make(unit, k).key]["value"] for k in range(config.hutchinson_min_iters)]
        for unit in units
    }
    passes = 0
    checked = dict.fromkeys(units, 0)
    stop: dict[str, int | None] = {}
    for round_index in itertools.count(1):
        for unit in units:
            if stop.get(unit) is None:
                stop[unit] = hutchinson_stop(
                    values[unit],
                    min_iters=config.hutchinson_min_iters,
                    rtol=config.hutchinson_rtol,
                    checked=checked[unit],
                )
                checked[unit] = len(values[unit])
        pending = [
            unit
            for unit in units
            if stop[unit] is None and len(values[unit]) < config.hutchinson_max_iters
        ]
        if not pending:
            break
        tasks = []
        for unit in pending:
            drawn = len(values[unit])
            more = min(config.hutchinson_max_iters, 2 * drawn)
            tasks += [(unit, make(unit, k)) for k in range(drawn, more)]
        results = run_tasks(
            executor, spec, [t for _, t in tasks], f"{label} round {round_index}", journal
        )
        for unit, task in tasks:
            values[unit].append(results[task.key]["value"])
            passes += int(results[task.key]["passes"])
    estimates = {u: estimate_of(values[u][: stop[u] or len(values[u])]) for u in units}
    return estimates, passes


def per_weight(model: PerturbableModel, totals: Mapping[str, Estimate]) -> dict[str, Estimate]:
    """Tr(H)/n: a layer's trace estimate divided by its weight count."""
    out = {}
    for layer, total in totals.items():
        n = model.weights[layer].size
        out[layer] = Estimate(total.mean / n, total.stderr / n, total.samples)
    return out


def epsilons(model: PerturbableModel, config: SensitivityConfig) -> dict[str, float]:
    """Finite-difference steps: ``epsilon_rel`` times each layer's RMS weight."""
    return {
        layer: config.epsilon_rel * float(np.sqrt(np.mean(w**2)) or 1.0)
        for layer, w in model.weights.items()
    }


def probe_key(layer: str, k: int) -> str:
    return f"trace/{layer}/{k}"
