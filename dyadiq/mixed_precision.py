"""Choosing a model's per-layer formats end to end: sensitivity analysis -> allocation problem ->
a plan under a budget (ILP), the smallest plan within an accuracy tolerance (bisection), or the
measured frontier.

This is the driver above :mod:`dyadiq.passes.allocation`: it runs the calibration and
compensation (``pipeline.PlanBuilder``) and scores plans (``plan_scores``: held-out zoo data,
the user's data, or the user's callback), which the allocation package, lower in the flow,
must not import. The sensitivity analysis and
the plan measurements run on one executor (``passes/sensitivity/executor.py``: serial, or Ray
with ``workers`` / ``ray_address``): plans are built here and scored by the workers. Options
come in typed (:class:`MixedPrecisionOptions`, built once by the CLI) and results go out
typed; printing is the CLI's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph
from dyadiq.passes.allocation import (
    Allocation,
    AllocationOptions,
    BisectionResult,
    ModelProblem,
    layer_table,
    model_problem,
    parse_budget,
    solve,
)
from dyadiq.passes.allocation.search import Measure, bisect_budget
from dyadiq.passes.calibration.observers import RangeMethod
from dyadiq.passes.calibration.range_search import DEFAULT_EVALUATIONS
from dyadiq.passes.compensation.settings import CompensationSettings
from dyadiq.passes.sensitivity.analysis import SensitivityReport
from dyadiq.passes.sensitivity.executor import Executor, make_executor, run_tasks
from dyadiq.plan import LayerFormat, PrecisionPlan
from dyadiq.plan_scores import ScorePlan, Tolerance, describe_plan, float_score

Calibration = Any  # a folder of batches, or batches already read (a list)


@dataclass(frozen=True)
class MixedPrecisionOptions:
    """Everything a mixed-precision run reads, besides the model and its data."""

    allocation: AllocationOptions
    calibrator: RangeMethod = RangeMethod.AUTO
    range_search: int = DEFAULT_EVALUATIONS  # the activation range search's evaluations (0: off)
    calib_preset: str | None = None  # image preprocessing for a folder of images
    calib_limit: int | None = None  # calibration batches read from a folder
    analysis_samples: int = 8  # calibration batches the sensitivity analysis uses
    compensation: CompensationSettings = CompensationSettings()
    act_signed: bool = False  # int8 activations in the written plan (else uint8)
    eval_limit: int | None = None  # held-out samples per measured plan
    workers: int | None = None  # > 1: a local Ray with this many workers (None/1: serial)
    ray_address: str | None = None  # an existing Ray cluster
    # --input-shape: the analysis must see the graph the output is built from (static shapes
    # fold more: captcha_crnn's first LSTM step loses a Gemm on h0 = 0, and a plan naming it
    # was refused after the whole analysis)
    input_shapes: Mapping[str, Sequence[int]] | None = None

    @property
    def act_bits(self) -> int:
        return self.allocation.default_act_bits


def executor_for(options: MixedPrecisionOptions) -> Executor:
    """The executor the options ask for (serial by default); the caller closes it."""
    return make_executor(workers=options.workers, ray_address=options.ray_address)


@dataclass(frozen=True)
class AnalyzedProblem:
    """A model's allocation problem with the graph and analysis it came from."""

    graph: QGraph
    model: ModelProblem
    cached: bool  # the sensitivity report came from the cache

    @property
    def report(self) -> SensitivityReport:
        return self.model.report


@dataclass(frozen=True)
class ChosenPlan:
    """A plan and the ``allocation`` section of report.json that says how it was chosen."""

    plan: PrecisionPlan
    info: dict[str, Any]


@dataclass(frozen=True)
class BudgetPlan(ChosenPlan):
    """The ILP's plan under a budget."""

    allocation: Allocation
    analysis: AnalyzedProblem


@dataclass(frozen=True)
class ToleranceSearch:
    """What --max-drop compares: the search split's metric, float's value on it, the
    tolerance in the metric's units."""

    metric: str
    reference: float  # the float model's value
    drop: float  # absolute, in the metric's units


@dataclass(frozen=True)
class BisectedPlan(ChosenPlan):
    """The smallest plan within the tolerance that the bisection measured."""

    search: ToleranceSearch
    result: BisectionResult


def plan_builder(model_path: Path, calibration: Calibration, options: MixedPrecisionOptions) -> Any:
    """One calibration pass and one compensated quantizer for every plan of this model:
    the sensitivity analysis prices the weights that the plans it chooses are built with."""
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.calibration.data import validated_batches
    from dyadiq.passes.calibration.range_search import RangeSearchOptions
    from dyadiq.pipeline import CalibrationConfig, PlanBuilder

    preset = options.calib_preset
    config = CalibrationConfig(
        method=options.calibrator,
        image_preset=preset,
        range_search=RangeSearchOptions(evaluations=options.range_search),
    )
    graph = load_onnx(model_path, input_shapes=options.input_shapes)
    if not isinstance(calibration, list):  # a folder: read (at most calib_limit) batches once
        specs = graph.input_specs()
        calibration = list(
            validated_batches(calibration, specs, image_preset=preset, limit=options.calib_limit)
        )
    return PlanBuilder(
        graph,
        calibration,
        config,
        act_bits=options.act_bits,
        exclude=frozenset(options.allocation.exclude),
        compensation=options.compensation,
    )


def candidate_weights(builder: Any, options: MixedPrecisionOptions) -> Any:
    """The builder's quantizer, compensated at every width the ILP may pick."""
    return builder.compensator.ensure(options.allocation.weight_bits)


def analysis_config(options: MixedPrecisionOptions) -> Any:
    """The sensitivity analysis the allocation needs: the proxy's quantities at the candidate
    widths, activation sites only when activation widths are chosen (with their Hessian
    trace under the trace proxy), and nothing else."""
    from dyadiq.passes.sensitivity.analysis import SensitivityConfig

    allocation = options.allocation
    activations = any(b != allocation.default_act_bits for b in allocation.act_bits)
    return SensitivityConfig(
        weight_bits=allocation.weight_bits,
        activations=activations,
        # the trace proxy prices activation widths by the activation Hessian trace too
        activation_trace=activations and allocation.proxy.base.value == "trace",
        **allocation.proxy.analysis_fields(),
    )


def analyzed_problem(
    model_path: Path,
    calibration: Calibration,
    options: MixedPrecisionOptions,
    builder: Any = None,
    executor: Executor | None = None,
) -> AnalyzedProblem:
    """Sensitivity (cached) -> the model's allocation problem.

    ``builder``: a :func:`plan_builder`; the analysis then runs on its graph (equalised when
    asked) and measures the damage of its compensated weights at every candidate width.
    ``executor``: where the analysis's evaluations run (else the options' own, closed after)."""
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.calibration.data import validated_batches
    from dyadiq.passes.sensitivity.analysis import analyze_cached, output_kind_of
    from dyadiq.pipeline import prepare_graph

    if builder is not None:
        graph = builder.graph
    else:
        graph = prepare_graph(load_onnx(model_path, input_shapes=options.input_shapes))
    weights = candidate_weights(builder, options) if builder is not None else None
    batches = list(
        validated_batches(
            calibration,
            graph.input_specs(),
            image_preset=options.calib_preset,
            limit=options.analysis_samples,
        )
    )
    kind = output_kind_of(graph, batches)
    own = executor is None
    executor = executor if executor is not None else executor_for(options)
    try:
        report, cached = analyze_cached(
            graph,
            batches,
            kind,
            analysis_config(options),
            executor=executor,
            **({"weights": weights} if weights is not None else {}),
            **(
                {"activation_quant": builder.compensator.act_params}
                if builder is not None and options.allocation.a8_damage
                else {}
            ),
        )
    finally:
        if own:
            executor.close()
    return AnalyzedProblem(graph, model_problem(graph, report, options.allocation), cached)


def allocate(
    model_path: Path,
    calibration: Calibration,
    options: MixedPrecisionOptions,
    budget_text: str,
    builder: Any = None,
) -> BudgetPlan:
    """Sensitivity (cached) -> ILP under the budget -> a mixed-precision plan."""
    analysis = analyzed_problem(model_path, calibration, options, builder)
    problem = analysis.model.problem
    budget = parse_budget(budget_text, problem)
    allocation = solve(problem, budget)
    refinement = None
    if options.allocation.refine_plan > 0:  # measured moves around the ILP's plan
        from dyadiq.passes.sensitivity.perturbable_model import OutputKind
        from dyadiq.plan_refinement import refine_allocation

        builder = builder if builder is not None else plan_builder(model_path, calibration, options)
        floats = analysis.model.floats
        with executor_for(options) as executor:
            allocation, refinement = refine_allocation(
                model_path,
                problem,
                budget,
                allocation,
                options.allocation.refine_plan,
                lambda scorer: plan_measurer(
                    analysis.graph, scorer, calibration, floats, options, builder, executor
                ),
                builder.calibration,
                options.compensation.samples,
                OutputKind(analysis.report.output_kind),
            )
    plan = PrecisionPlan(
        dict(allocation.formats),
        options.act_bits,
        options.act_signed,
        frozenset(analysis.model.floats),
    )
    info = {
        "budget": budget_text,
        "budget_limits": budget.limits(),
        "proxy": options.allocation.proxy,
        "predicted_damage": allocation.predicted_damage,
        "weight_bytes": allocation.size_bytes,
        "bops": allocation.bops,
        "latency": allocation.latency,
        "latency_source": problem.latency_source,
        "flash_bytes": allocation.flash_bytes,
        "flash_source": problem.flash_source,
        "peak_ram_bytes": allocation.peak_ram_bytes,
        "ram_source": problem.ram.source if problem.ram is not None else None,
        "activation_ties": [list(g) for g in problem.act_ties],
        "proven_optimal": allocation.optimal,
        "sensitivity_fingerprint": analysis.report.fingerprint,
        "compensation": options.compensation.label,
        "layers": layer_table(problem, allocation),
        **({"refinement": refinement} if refinement is not None else {}),
    }
    return BudgetPlan(plan, info, allocation, analysis)


def plan_measurer(
    graph: QGraph,
    scorer: Any,
    calibration: Calibration,
    floats: Sequence[str],
    options: MixedPrecisionOptions,
    builder: Any = None,
    executor: Executor | None = None,
) -> Measure:
    """plans -> each plan's QDQ model scored by ``scorer`` (:mod:`dyadiq.plan_scores`: a zoo
    model's held-out data, the user's data, or the user's callback), the measurements run on
    ``executor`` (serial when None).

    All plans share one calibration pass (``PlanBuilder``): they differ in weight bits only.
    ``builder``: one already made (with its compensated quantizer), else a new one.
    """
    from dyadiq.passes.calibration.range_search import RangeSearchOptions
    from dyadiq.passes.sensitivity.executor import SerialExecutor
    from dyadiq.pipeline import CalibrationConfig, PlanBuilder

    config = CalibrationConfig(
        method=options.calibrator, range_search=RangeSearchOptions(evaluations=options.range_search)
    )
    excluded = frozenset(floats)
    if builder is None:
        builder = PlanBuilder(
            graph,
            calibration,
            config,
            act_bits=options.act_bits,
            exclude=excluded,
            compensation=options.compensation,
        )
    runner = executor if executor is not None else SerialExecutor()

    def measure(plans: Sequence[dict[str, LayerFormat]]) -> list[float]:
        tasks = []
        for formats in plans:
            plan = PrecisionPlan(dict(formats), options.act_bits, False, excluded)
            model = builder.build(plan).SerializeToString()
            key = hashlib.sha256(model).hexdigest()[:16]
            tasks.append(ScorePlan(key, model, describe_plan(formats)))
        unique = list({t.key: t for t in tasks}.values())
        results = run_tasks(runner, scorer, unique, f"measuring {len(unique)} plan(s)")
        return [float(results[t.key]) for t in tasks]

    return measure


def bisect(
    model_path: Path,
    calibration: Calibration,
    options: MixedPrecisionOptions,
    max_drop: str,
    bisect_steps: int,
    scorer: Any,
    out: Path,
    builder: Any = None,
) -> BisectedPlan:
    """--max-drop: bisect the size budget until the plan's score (``scorer``, on the search
    split) is within the tolerance of the float model's score on the same data."""
    from dyadiq.io import prepare_output_dir

    tolerance = Tolerance.parse(max_drop)
    metric = scorer.metric
    with executor_for(options) as executor:
        analysis = analyzed_problem(model_path, calibration, options, builder, executor)
        floats = analysis.model.floats
        reference = float_score(scorer, model_path)
        threshold = tolerance.threshold(metric, reference)
        prepare_output_dir(out, model_path)  # refuse the input's folder before writing state
        measure = plan_measurer(
            analysis.graph, scorer, calibration, floats, options, builder, executor
        )
        result = bisect_budget(
            analysis.model.problem,
            measure,
            threshold=threshold,
            iterations=bisect_steps,
            state_path=out / "bisection_state.json",
            probes=executor.workers,  # one plan per worker per round
            higher_is_better=metric.higher_is_better,
        )
    if result.formats is None:
        raise ConfigError(
            f"even the largest plan (all W8) measures {metric.name} "
            f"{result.history[0]['metric']:.4g}, beyond float's {reference:.4g} by more than "
            f"--max-drop {max_drop} ({tolerance.absolute(metric, reference):.4g}); no plan meets it"
        )
    plan = PrecisionPlan(result.formats, options.act_bits, options.act_signed, frozenset(floats))
    drop = tolerance.absolute(metric, reference)
    info = {
        "max_drop": tolerance.text,
        "drop": drop,  # in the metric's units
        "threshold": threshold,
        "metric": metric.name,
        "metric_info": metric.describe(),
        "float_metric": reference,
        "plan_metric": result.metric,
        "weight_bytes": result.size_bytes,
        "history": result.history,
        "sensitivity_fingerprint": analysis.report.fingerprint,
    }
    return BisectedPlan(plan, info, ToleranceSearch(metric.name, reference, drop), result)
