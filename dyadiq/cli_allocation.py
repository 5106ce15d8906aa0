"""The allocation side of the CLI: sensitivity -> ILP plans (--budget), accuracy-tolerance
bisection (--max-drop) and the measured frontier, shared by ``quantize`` and ``frontier``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from dyadiq.errors import ConfigError

console = Console()


def compensation_settings(args: argparse.Namespace) -> Any:
    """--compensate as settings (none where the command has no such option)."""
    from dyadiq.passes.compensation.settings import CompensationSettings

    return CompensationSettings.parse(getattr(args, "compensate", None) or "none")


def plan_builder(model_path: Path, calibration: Any, args: argparse.Namespace) -> Any:
    """One calibration pass and one compensated quantizer for every plan of this model:
    the sensitivity analysis prices the weights that the plans it chooses are built with."""
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.calibration.data import validated_batches
    from dyadiq.passes.calibration.observers import RangeMethod
    from dyadiq.pipeline import CalibrationConfig, PlanBuilder

    preset = getattr(args, "calib_preset", None)
    config = CalibrationConfig(method=RangeMethod(args.calibrator), image_preset=preset)
    graph = load_onnx(model_path)
    if not isinstance(calibration, list):  # a folder: read (at most --calib-limit) batches once
        limit = getattr(args, "calib_limit", None)
        specs = graph.input_specs()
        calibration = list(validated_batches(calibration, specs, image_preset=preset, limit=limit))
    return PlanBuilder(
        graph,
        calibration,
        config,
        act_bits=args.abits,
        exclude=frozenset(args.exclude),
        compensation=compensation_settings(args),
    )


def candidate_weights(builder: Any, args: argparse.Namespace) -> Any:
    """The builder's quantizer, compensated at every width the ILP may pick."""
    return builder.compensator.ensure(_widths(args.wbits_candidates, "--wbits-candidates"))


def allocation_problem(
    model_path: Path, calibration: Any, args: argparse.Namespace, builder: Any = None
) -> Any:
    """Sensitivity (cached) -> the ILP's problem: (graph, report, problem, floats, cached).

    ``builder``: a :func:`plan_builder`; the analysis then runs on its graph (equalised when
    asked) and measures the damage of its compensated weights at every candidate width."""
    from dataclasses import replace

    from dyadiq.backends.capabilities import INTEGER_ONNX, ONNX_QDQ, allowed_formats
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.allocation import apply_overrides, problem_from_report
    from dyadiq.passes.calibration.data import validated_batches
    from dyadiq.passes.sensitivity.analysis import (
        SensitivityConfig,
        analyze_cached,
        output_kind_of,
    )
    from dyadiq.pipeline import prepare_graph
    from dyadiq.plan import LayerFormat

    graph = builder.graph if builder is not None else prepare_graph(load_onnx(model_path))
    weights = candidate_weights(builder, args) if builder is not None else None
    batches = list(
        validated_batches(
            calibration,
            graph.input_specs(),
            image_preset=args.calib_preset,
            limit=args.analysis_samples,
        )
    )
    kind = output_kind_of(graph, batches)
    widths = _widths(args.wbits_candidates, "--wbits-candidates")
    act_widths = _widths(getattr(args, "abits_candidates", None) or str(args.abits), "--abits")
    report, cached = analyze_cached(
        graph,
        batches,
        kind,
        SensitivityConfig(weight_bits=widths),
        **({"weights": weights} if weights is not None else {}),
    )
    formats = [LayerFormat(w, a) for w in widths for a in act_widths]
    candidates, floats = apply_overrides(
        graph, list(report.layers), formats, overrides_from_args(args, graph)
    )
    # offer only what every target backend runs (QDQ, plus integer ONNX with --integer)
    targets = (ONNX_QDQ, INTEGER_ONNX) if getattr(args, "integer", False) else (ONNX_QDQ,)
    for layer, allowed in candidates.items():
        op_kind = graph.kind(graph.node(layer))
        for caps in targets:
            allowed = allowed_formats(caps, op_kind, allowed)
        candidates[layer] = allowed
    kept = {k: v for k, v in report.layers.items() if k in candidates}
    report = replace(
        report, layers=kept, pairs=tuple(p for p in report.pairs if p.a in kept and p.b in kept)
    )
    tables = measured_tables(args)
    problem = problem_from_report(
        graph, report, formats, args.proxy, candidates, act_bits=args.abits, **tables
    )
    return graph, report, problem, floats, cached


def _widths(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"{option} wants comma-separated widths like 4,8, got {text!r}") from exc


def measured_tables(args: argparse.Namespace) -> dict[str, Any]:
    """--latency-table FILE and --memory-plan FILE as problem_from_report's keyword args."""
    from dyadiq.passes.allocation_costs import load_latency_table, load_memory_plan

    tables: dict[str, Any] = {}
    if getattr(args, "latency_table", None):
        tables["latency"] = load_latency_table(Path(args.latency_table))
    if getattr(args, "memory_plan", None):
        memory = load_memory_plan(Path(args.memory_plan))
        tables["ram_live_sets"] = memory.live_sets
        tables["tensor_bytes"] = memory.tensor_bytes
        if memory.flash is not None:
            tables["flash"] = memory.flash
    return tables


def allocate(
    model_path: Path, calibration: Any, args: argparse.Namespace, builder: Any = None
) -> tuple[Any, Any]:
    """Sensitivity (cached) -> ILP under the budget -> a mixed-precision plan."""
    from dyadiq.passes.allocation import layer_table, parse_budget, solve
    from dyadiq.plan import PrecisionPlan

    _, report, problem, floats, cached = allocation_problem(model_path, calibration, args, builder)
    budget = parse_budget(args.budget, problem)
    allocation = solve(problem, budget)
    plan = PrecisionPlan(
        dict(allocation.formats), args.abits, args.act_dtype == "int8", frozenset(floats)
    )
    extra = "".join(
        f", {name} {value:,.4g}"
        for name, value in (
            ("latency", allocation.latency),
            ("flash B", allocation.flash_bytes),
            ("peak RAM B", allocation.peak_ram_bytes),
        )
        if value is not None
    )
    console.print(
        f"  allocated {len(allocation.formats)} layers under {args.budget}: weights "
        f"{allocation.size_bytes:,.0f} B{extra}, predicted damage "
        f"{allocation.predicted_damage:.4g} "
        f"({report.forward_passes} forward passes of analysis{', cached' if cached else ''})"
    )
    info = {
        "budget": args.budget,
        "budget_limits": budget.limits(),
        "proxy": args.proxy,
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
        "sensitivity_fingerprint": report.fingerprint,
        "compensation": compensation_settings(args).label,
        "layers": layer_table(problem, allocation),
    }
    return plan, info


def primary_metric(artifacts: Any) -> str:
    return str(artifacts.model.primary_metric)


def plan_measurer(
    graph: Any,
    artifacts: Any,
    calibration: Any,
    floats: Any,
    args: argparse.Namespace,
    metric: str,
    builder: Any = None,
) -> Any:
    """formats -> the plan's QDQ model measured on the zoo model's held-out split.

    All plans share one calibration pass (``PlanBuilder``): they differ in weight bits only.
    ``builder``: one already made (with its compensated quantizer), else a new one.
    """
    import tempfile

    import onnx

    from dyadiq.evaluation import evaluate
    from dyadiq.passes.calibration.observers import RangeMethod
    from dyadiq.pipeline import CalibrationConfig, PlanBuilder
    from dyadiq.plan import PrecisionPlan

    config = CalibrationConfig(method=RangeMethod(args.calibrator))
    excluded = frozenset(floats)
    if builder is None:
        builder = PlanBuilder(
            graph,
            calibration,
            config,
            act_bits=args.abits,
            exclude=excluded,
            compensation=compensation_settings(args),
        )

    def measure(formats: dict[str, Any]) -> float:
        plan = PrecisionPlan(formats, args.abits, False, excluded)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.qdq.onnx"
            onnx.save(builder.build(plan), str(path))
            metrics = evaluate(artifacts, {"plan": path}, limit=args.eval_limit)
        return float(metrics["plan"][metric])

    return measure


def bisect(
    model_path: Path,
    calibration: Any,
    args: argparse.Namespace,
    artifacts: Any,
    out: Path,
    builder: Any = None,
) -> tuple[Any, Any]:
    """--max-drop: bisect the size budget until the held-out metric is within tolerance."""
    from dyadiq.bisection import bisect_budget
    from dyadiq.evaluation import evaluate
    from dyadiq.io import prepare_output_dir
    from dyadiq.plan import PrecisionPlan

    if artifacts is None:
        raise ConfigError("--max-drop measures on held-out data: use it with --zoo NAME")
    text = args.max_drop.strip()
    drop = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    graph, report, problem, floats, _ = allocation_problem(model_path, calibration, args, builder)
    metric = primary_metric(artifacts)
    reference = evaluate(artifacts, {}, limit=args.eval_limit)["float"][metric]
    prepare_output_dir(out, model_path)  # refuse the input's folder before writing state
    result = bisect_budget(
        problem,
        plan_measurer(graph, artifacts, calibration, floats, args, metric, builder),
        threshold=reference - drop,
        iterations=args.bisect_steps,
        state_path=out / "bisection_state.json",
    )
    if result.formats is None:
        raise ConfigError(
            f"even the largest plan (all W8) measures below float {metric} {reference:.4f} - "
            f"{drop:g}; no plan meets --max-drop {args.max_drop}"
        )
    console.print(
        f"  --max-drop {args.max_drop}: {metric} {result.metric:.4f} (float {reference:.4f}) "
        f"at {result.size_bytes:,.0f} B of weights after {len(result.history)} measurements"
    )
    plan = PrecisionPlan(result.formats, args.abits, args.act_dtype == "int8", frozenset(floats))
    info = {
        "max_drop": drop,
        "metric": metric,
        "float_metric": reference,
        "plan_metric": result.metric,
        "weight_bytes": result.size_bytes,
        "history": result.history,
        "sensitivity_fingerprint": report.fingerprint,
    }
    return plan, info


def overrides_from_args(args: argparse.Namespace, graph: Any) -> Any:
    """--pin ID_OR_PATTERN=W8A8[,W4A8] and --exclude ID, as allocation overrides."""
    import fnmatch

    from dyadiq.passes.allocation import Overrides
    from dyadiq.plan import LayerFormat

    ids = set(graph.node_ids())
    by_id: dict[str, tuple[LayerFormat, ...]] = {}
    by_pattern: dict[str, tuple[LayerFormat, ...]] = {}
    for item in args.pin:
        target, _, labels = item.partition("=")
        try:
            allowed = tuple(
                LayerFormat(int(x[1 : x.index("A")]), int(x[x.index("A") + 1 :]))
                for x in labels.upper().split(",")
            )
        except ValueError as exc:
            raise ConfigError(f"--pin wants ID=W8A8[,W4A8], got {item!r}") from exc
        (by_id if target in ids else by_pattern)[target] = allowed
    unmatched = [p for p in by_pattern if not fnmatch.filter(sorted(ids), p)]
    if unmatched:
        raise ConfigError(
            f"--pin {', '.join(map(repr, unmatched))} matches no layer id "
            f"(ids look like {', '.join(sorted(ids)[:4])}; `dyadiq inspect` lists them)"
        )
    for layer in args.exclude:
        by_id[layer] = ()
    return Overrides(by_pattern=by_pattern, by_id=by_id)
