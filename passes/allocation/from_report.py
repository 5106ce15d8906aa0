"""Building the allocation problem of a model: from its sensitivity report and the user's
:class:`AllocationOptions` (built once, e.g. from the command line) to an
:class:`AllocationProblem` whose candidates every target backend can run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph
from dyadiq.op_facts import OpKind
from dyadiq.passes.allocation.costs import (
    FLASH_ESTIMATE,
    LATENCY_COST_MODEL,
    TensorBytes,
    flash_estimate,
    latency_cost_model,
    layer_macs,
    ram_model,
)
from dyadiq.passes.allocation.overrides import apply_overrides, overrides_from_pins
from dyadiq.passes.allocation.problem import AllocationProblem, PairCost
from dyadiq.passes.allocation.tables import as_cost_table, load_latency_table, load_memory_plan
from dyadiq.passes.allocation.ties import (
    activation_ties,
    shared_weight_ties,
    weight_stored_once,
)
from dyadiq.passes.sensitivity.analysis import (
    Proxy,
    SensitivityReport,
    layer_damage,
    pair_damage,
)
from dyadiq.passes.sensitivity.pairs import PairModel
from dyadiq.plan import LayerFormat

log = logging.getLogger(__name__)


class FormatFilter(Protocol):
    """What a backend can run (``backends.capabilities.Capabilities`` is one)."""

    def allows(self, kind: OpKind, fmt: LayerFormat) -> bool: ...


@dataclass(frozen=True)
class AllocationOptions:
    """What the allocator may choose from and how it prices it, built once (the CLI builds it
    from its flags) and read everywhere after, instead of the flags themselves."""

    weight_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)  # candidate weight widths
    act_bits: tuple[int, ...] = (8,)  # candidate activation widths (need activation damage)
    default_act_bits: int = 8  # activations no candidate decides, and the fallback width
    proxy: Proxy = Proxy.EMPIRICAL
    # the empirical damage measured on top of the plan's activation quantization (A8 damage,
    # ``analyze(activation_quant=...)``) instead of with float activations; off: not better on
    # MobileNetV2 at 8 analysis samples (benchmarks/results/compensation.md)
    a8_damage: bool = False
    # > 0: refine the ILP's plan by measured local moves, at most this many plans scored as
    # whole models on calibration batches compensation did not read (``refine.py``)
    refine_plan: int = 0
    pins: tuple[str, ...] = ()  # ID_OR_PATTERN=W8A8[,W4A8]
    exclude: tuple[str, ...] = ()  # layers kept in float
    runs_on: tuple[FormatFilter, ...] = ()  # every backend the plan must run on
    latency_table: Path | None = None  # a backend's measured LatencyTable
    memory_plan: Path | None = None  # live sets, tensor bytes, flash (MemoryPlanFile)

    @property
    def formats(self) -> list[LayerFormat]:
        return [LayerFormat(w, a) for w in self.weight_bits for a in self.act_bits]


@dataclass(frozen=True)
class ModelProblem:
    """A model's allocation problem and what it was built from."""

    problem: AllocationProblem
    report: SensitivityReport  # restricted to the layers the problem allocates
    floats: tuple[str, ...]  # layers kept in float (--exclude, or pinned to no format)


def measured_tables(options: AllocationOptions) -> dict[str, Any]:
    """The latency table and memory plan files, as :func:`problem_from_report`'s arguments."""
    tables: dict[str, Any] = {}
    if options.latency_table is not None:
        tables["latency"] = load_latency_table(options.latency_table)
    if options.memory_plan is not None:
        memory = load_memory_plan(options.memory_plan)
        tables["ram_live_sets"] = memory.live_sets
        tables["tensor_bytes"] = memory.tensor_bytes
        if memory.flash is not None:
            tables["flash"] = memory.flash
    return tables


def model_problem(
    graph: QGraph, report: SensitivityReport, options: AllocationOptions
) -> ModelProblem:
    """The problem for ``graph``: the options' formats, narrowed per layer by the pins and by
    what every backend in ``options.runs_on`` can run; excluded layers leave it."""
    formats = options.formats
    overrides = overrides_from_pins(options.pins, options.exclude, graph.node_ids())
    candidates, floats = apply_overrides(graph, list(report.layers), formats, overrides)
    for layer, allowed in candidates.items():
        kind = graph.kind(graph.node(layer))
        for backend in options.runs_on:
            allowed = [f for f in allowed if backend.allows(kind, f)]
        candidates[layer] = allowed
    kept = {k: v for k, v in report.layers.items() if k in candidates}
    report = replace(
        report, layers=kept, pairs=tuple(p for p in report.pairs if p.a in kept and p.b in kept)
    )
    problem = problem_from_report(
        graph,
        report,
        formats,
        options.proxy,
        candidates,
        act_bits=options.default_act_bits,
        **measured_tables(options),
    )
    return ModelProblem(problem, report, tuple(floats))


def report_activation_damage(
    report: SensitivityReport, proxy: Proxy | str = Proxy.EMPIRICAL
) -> Mapping[str, Mapping[int, float]] | None:
    """{layer id: {activation bits: damage}} for the layers whose input is one activation site
    the report measured (that site alone quantized); None when it measured none. Under the
    trace proxy, the sites' HAWQ-V2 damage (1/2 Tr(H_a)/n_a ||Q(a) - a||^2) where the report
    has it (``SensitivityConfig(activation_trace=True)``)."""
    table = {i: layer.activation_damage for i, layer in report.layers.items()}
    if Proxy.parse(proxy).base is Proxy.TRACE:
        hessian = {i: layer.activation_hessian_damage for i, layer in report.layers.items()}
        if any(hessian.values()):
            table = hessian
    return {i: d for i, d in table.items() if d} or None


def _pair_costs(
    report: SensitivityReport,
    proxy: Proxy,
    allowed: Mapping[str, Sequence[LayerFormat]],
    pair_model: PairModel,
) -> list[PairCost]:
    """One :class:`PairCost` per measured layer pair: the safe cross term of each width pair
    it was measured at (``damage_model.pair_damage``); other width pairs cost nothing, and
    all-zero pairs are left out of the ILP."""
    by_pair: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    for term in report.pairs:
        value = pair_damage(report, term, proxy, model=pair_model)
        by_pair.setdefault((term.a, term.b), {})[(term.bits_a, term.bits_b)] = value
    costs = []
    for (a, b), table in by_pair.items():
        cost = {
            (fa, fb): table.get((fa.weight_bits, fb.weight_bits), 0.0)
            for fa in allowed[a]
            for fb in allowed[b]
        }
        if any(cost.values()):
            costs.append(PairCost(a, b, cost))
    return costs


def problem_from_report(
    graph: QGraph,
    report: SensitivityReport,
    formats: Sequence[LayerFormat],
    proxy: Proxy | str = Proxy.EMPIRICAL,
    candidates: Mapping[str, Sequence[LayerFormat]] | None = None,
    *,
    act_bits: int = 8,
    activation_damage: Mapping[str, Mapping[int, float]] | None = None,
    latency: Mapping[str, Mapping[Any, float]] | None = None,
    flash: Mapping[str, Mapping[Any, float]] | None = None,
    ram_live_sets: Sequence[Iterable[str]] | None = None,
    tensor_bytes: TensorBytes | None = None,
    pair_model: PairModel = PairModel.NONNEGATIVE,
) -> AllocationProblem:
    """The ILP for a model: damage(layer, W w A a) = weight damage(w) + activation damage(a).

    Without activation damage (argument or report), activations stay at ``act_bits`` (pinned
    layers keep their pins). Activation ties and the layers that cannot go below
    ``act_bits`` come from the activation sites. Tables: ``latency`` a backend's measured
    {layer: {format: ms}} (else the MACs x w x a cost model), ``flash`` {layer: {format:
    bytes}} (else an estimate), ``ram_live_sets`` the tensors live at each step of a static
    schedule with ``tensor_bytes`` {tensor: bytes or {act bits: bytes}} (else graph shapes,
    int8 containers). Table rows may be keyed by LayerFormat or by label ("W4A8").
    ``pair_model``: how a +pairs proxy's measured cross terms are priced (``pairs.py``; the
    raw terms only for benchmarks that show why they are not).
    """
    layers = list(report.layers)
    chosen = Proxy.parse(proxy)
    first = report.layers[layers[0]]
    layer_damage(first, 8, chosen)  # MissingProxyError when the report lacks this proxy
    measured = getattr(first, chosen.damage_field)
    missing = [f for f in formats if f.weight_bits not in measured]
    if missing:
        raise ConfigError(
            f"the sensitivity report has no {chosen.base.value} data for "
            f"{[f.label for f in missing]}; rerun analyze with those widths"
        )
    allowed = {
        i: list(candidates[i]) if candidates and i in candidates else list(formats) for i in layers
    }
    act_damage = activation_damage
    if act_damage is None:
        act_damage = report_activation_damage(report, chosen)
    act = activation_ties(graph, layers, act_bits)
    if act_damage is None and any(f.act_bits != act_bits for f in formats):
        log.warning(
            "the sensitivity report has no activation damage: activations stay at A%d", act_bits
        )
    for i in layers:
        at_default = [f for f in allowed[i] if f.act_bits == act_bits]
        if at_default and (act_damage is None or i not in act_damage):
            allowed[i] = at_default  # no measured damage: activation width stays fixed
        if i in act.shared_with_others:
            narrowed = [f for f in allowed[i] if f.act_bits >= act_bits]
            if not narrowed:
                raise ConfigError(
                    f"layer {i}'s input activation is also read by ops outside the plan, which "
                    f"keep it at A{act_bits}: {[f.label for f in allowed[i]]} cannot apply"
                )
            allowed[i] = narrowed
    counted: set[tuple[str, ...]] = set()
    damage: dict[str, dict[LayerFormat, float]] = {}
    weight_ties = shared_weight_ties(graph, layers)
    # the analysis perturbs a shared weight for all its readers at once (one input of the
    # perturbable model), so each reader measured the whole group's damage: count it once
    later_readers = {reader for group in weight_ties for reader in group[1:]}
    for i in layers:
        own_input = bool(act.inputs[i]) and act.inputs[i] not in counted
        counted.add(act.inputs[i])  # one tensor read by two layers: its damage counts once
        row = {}
        for f in allowed[i]:
            value = 0.0
            if i not in later_readers:
                value = layer_damage(report.layers[i], f.weight_bits, proxy)
            if act_damage is not None and own_input and i in act_damage:
                if f.act_bits not in act_damage[i]:
                    raise ConfigError(f"no activation damage for layer {i} at A{f.act_bits}")
                value += float(act_damage[i][f.act_bits])
            row[f] = value
        damage[i] = row
    size = {i: {f: report.layers[i].params * f.weight_bits / 8 for f in allowed[i]} for i in layers}
    # the estimate's codes, as the C stores them: once per weight (a backend table is as built)
    codes = {i: {f: float(math.ceil(v)) for f, v in row.items()} for i, row in size.items()}
    estimate = weight_stored_once(flash_estimate(graph, allowed), weight_ties, codes)
    size = weight_stored_once(size, weight_ties, size)  # a shared weight is stored once
    macs = {i: layer_macs(graph, i) for i in layers}
    bops = {i: {f: macs[i] * f.weight_bits * f.act_bits for f in allowed[i]} for i in layers}
    pairs: list[PairCost] = []
    if chosen.with_pairs:
        pairs = _pair_costs(report, chosen, allowed, pair_model)
    ram = None
    if ram_live_sets is not None:
        live = [sorted(s) for s in ram_live_sets]
        ram = ram_model(graph, live, tensor_bytes, act, act_bits)
    return AllocationProblem(
        allowed,
        damage,
        size,
        bops,
        pairs,
        weight_ties,
        act.ties,
        latency=as_cost_table(latency)
        if latency is not None
        else latency_cost_model(graph, allowed),
        flash=as_cost_table(flash) if flash is not None else estimate,
        ram=ram,
        latency_measured=latency is not None,
        latency_source="measured table" if latency is not None else LATENCY_COST_MODEL,
        flash_source="backend table" if flash is not None else FLASH_ESTIMATE,
    )
