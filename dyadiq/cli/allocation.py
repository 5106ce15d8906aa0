"""The allocation side of the command line: flags -> :class:`MixedPrecisionOptions` (built
once, the only place that reads them), a call into :mod:`dyadiq.mixed_precision`, and the lines
printed about the plan it chose. ``quantize --budget`` / ``--max-drop`` and ``frontier``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from dyadiq.cli import output
from dyadiq.cli.flags import CALIBRATORS, add_compensate, parse_shapes
from dyadiq.errors import ConfigError
from dyadiq.passes.sensitivity.proxy import ALLOCATION_PROXIES

if TYPE_CHECKING:
    from dyadiq.api import SearchOptions
    from dyadiq.mixed_precision import MixedPrecisionOptions
    from dyadiq.passes.compensation.settings import CompensationSettings

# every proxy, alone or +pairs; hessian[+pairs]: the older name of trace[+pairs]
PROXY_CHOICES = [p.value for p in ALLOCATION_PROXIES] + ["hessian", "hessian+pairs"]
PROXY_HELP = (
    "sensitivity model the ILP minimises: the measured single-layer damage (empirical, the "
    "default), HAWQ-V2's trace, HAWQ's eigenvalue, fisher, taylor (these three need TVM's "
    "reverse mode), snr or entropy; +pairs adds measured inter-layer terms (opt-in: they "
    "ranked plans no better in benchmarks/results/proxy_quality.md). The analysis computes "
    "only what the proxy needs"
)


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    """Where the sensitivity analysis and plan measurements run."""
    p.add_argument(
        "--workers",
        type=int,
        help="run the analysis (and plan measurements) on this many local Ray workers "
        "(pip install 'dyadiq[scale]'); default: serial, in this process",
    )
    p.add_argument(
        "--ray-address",
        help="run them on an existing Ray cluster (e.g. 10.0.0.1:6379, from 'ray start "
        "--head'); every CPU of it unless --workers caps it",
    )


def compensation_settings(args: argparse.Namespace) -> CompensationSettings:
    """--compensate as settings (none where the command has no such option)."""
    from dyadiq.passes.compensation.settings import CompensationSettings

    return CompensationSettings.parse(getattr(args, "compensate", None) or "none")


def widths(text: str, option: str) -> tuple[int, ...]:
    """``4,8`` -> (4, 8); anything else names the flag."""
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"{option} wants comma-separated widths like 4,8, got {text!r}") from exc


def search_options(args: argparse.Namespace) -> SearchOptions:
    """The search flags of ``quantize`` or ``frontier`` as the API's :class:`SearchOptions`."""
    from dyadiq.api import SearchOptions

    abits = getattr(args, "abits_candidates", None)
    latency_table = getattr(args, "latency_table", None)
    memory_plan = getattr(args, "memory_plan", None)
    return SearchOptions(
        wbits_candidates=(
            widths(args.wbits_candidates, "--wbits-candidates")
            if args.wbits_candidates
            else SearchOptions.wbits_candidates
        ),
        abits_candidates=widths(abits, "--abits-candidates") if abits else None,
        proxy=args.proxy,
        a8_damage=getattr(args, "a8_damage", False),
        refine_plan=getattr(args, "refine_plan", SearchOptions.refine_plan),
        analysis_samples=args.analysis_samples,
        bisect_steps=getattr(args, "bisect_steps", SearchOptions.bisect_steps),
        latency_table=Path(latency_table) if latency_table else None,
        memory_plan=Path(memory_plan) if memory_plan else None,
        workers=getattr(args, "workers", None),
        ray_address=getattr(args, "ray_address", None),
    )


def mixed_precision_options(
    args: argparse.Namespace, compensation: CompensationSettings | None = None
) -> MixedPrecisionOptions:
    """The flags of ``quantize`` or ``frontier`` as typed options, through the API's one
    builder (:func:`dyadiq.quantize_run.mixed_precision_options`)."""
    from dyadiq.quantize_run import mixed_precision_options as build

    options: MixedPrecisionOptions = build(
        search_options(args),
        compensation=compensation if compensation is not None else compensation_settings(args),
        abits=args.abits,
        act_dtype=getattr(args, "act_dtype", "uint8"),
        calibrator=args.calibrator,
        calib_preset=getattr(args, "calib_preset", None),
        calib_limit=getattr(args, "calib_limit", None),
        pin=tuple(args.pin),
        exclude=tuple(args.exclude),
        integer=getattr(args, "integer", False),
        target=getattr(args, "target", None),
        eval_limit=getattr(args, "eval_limit", None),
        input_shapes=parse_shapes(getattr(args, "input_shape", None) or ()) or None,
    )
    return options


def add_allocation_flags(p: argparse.ArgumentParser) -> None:
    """quantize's flags that choose per-layer formats."""
    p.add_argument(
        "--budget",
        help="allocate per-layer formats by ILP, any of size=2MB, avg-wbits=5, bops=0.5x, "
        "latency=0.7x (or 3ms with --latency-table), flash=256KB, ram=64KB (--memory-plan); "
        "Nx is relative to all-W8A8",
    )
    p.add_argument(
        "--wbits-candidates",
        help="widths the ILP may pick (default 2,3,4,5,6,7,8; with --weight-only 3,4,5,6)",
    )
    p.add_argument(
        "--abits-candidates",
        help="activation widths the ILP may pick, e.g. 4,8 (needs activation damage in the "
        "sensitivity report; otherwise activations stay at --abits)",
    )
    p.add_argument("--latency-table", help="a backend's measured {layer: {format: ms}} JSON")
    p.add_argument("--memory-plan", help="live sets (+ tensor bytes, flash) JSON for ram=/flash=")
    p.add_argument("--proxy", default="empirical", choices=PROXY_CHOICES, help=PROXY_HELP)
    p.add_argument(
        "--analysis-samples",
        type=int,
        default=8,
        help="calibration batches the sensitivity analysis reads (default %(default)s)",
    )
    p.add_argument(
        "--a8-damage",
        action="store_true",
        help="measure each layer's empirical damage with every activation quantized as the "
        "plan will be (on top of the A8 model) instead of with float activations. "
        "Experimental, measured worse: bias correction makes most such damages negative, "
        "which the ILP takes as free (ppocr_cls at avg-wbits=4.5: accuracy 0.688 against "
        "0.887; benchmarks/results/compensation.md)",
    )
    p.add_argument(
        "--refine-plan",
        type=int,
        default=0,
        metavar="N",
        help="--budget: refine the ILP's plan by budget-neutral moves (one layer a width up, "
        "another down), keeping a move when the whole quantized model's KL to float falls on "
        "calibration batches compensation did not read; at most N plans scored (default 0: off)",
    )
    p.add_argument(
        "--max-drop",
        help="accuracy mode: the smallest plan within this drop of float, measured on --val "
        "(or a zoo model's held-out data) and reported on --test (or the other half): 0.01 in "
        "the metric's units, 0.5%% of its scale (half a point of accuracy / agreement)",
    )
    p.add_argument(
        "--bisect-steps",
        type=int,
        default=6,
        help="--max-drop: plans measured at most while bisecting (default %(default)s)",
    )
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="ID_OR_PATTERN=W8A8",
        help="restrict a layer's formats under --budget (node id beats a pattern)",
    )


def add_quality_data_flags(p: argparse.ArgumentParser) -> None:
    """Your own held-out data, for --max-drop / frontier (a zoo model brings its own)."""
    p.add_argument(
        "--val",
        metavar="DIR",
        help="held-out batches (as --calib reads them) that plans are measured on: accuracy "
        "with --labels, else agreement with float, by what the first output holds",
    )
    p.add_argument("--labels", metavar="FILE", help="--val's class indices (.npy or one a line)")


def cmd_frontier(args: argparse.Namespace) -> int:
    """Pareto frontier: ILP plans over a size sweep, each measured on held-out data (a zoo
    model's, or --val)."""
    from dyadiq.frontier import save
    from dyadiq.io import prepare_output_dir
    from dyadiq.mixed_precision import analyzed_problem, executor_for, plan_builder, plan_measurer
    from dyadiq.passes.allocation import sweep
    from dyadiq.plan_scores import float_score

    model_path, calibration, scorer, data = _frontier_sources(args)
    out = prepare_output_dir(Path(args.output), model_path)
    options = mixed_precision_options(args)
    builder = None
    if options.compensation.enabled:
        builder = plan_builder(model_path, calibration, options)
    # one executor (one Ray start) for the analysis and the plans' measurements
    with executor_for(options) as executor:
        analysis = analyzed_problem(model_path, calibration, options, builder, executor)
        measure = plan_measurer(
            analysis.graph,
            scorer,
            calibration,
            analysis.model.floats,
            options,
            builder,
            executor,
        )
        frontier = sweep(analysis.model.problem, args.points, measure)
    # the float model on the same held-out data: the line every plan is judged against
    float_metric = float_score(scorer, model_path)
    metric = scorer.metric
    save(frontier, out, metric.name, float_metric, {"metric_info": metric.describe(), **data})
    table = Table("budget (B)", "size (B)", "predicted damage", metric.name, title="frontier")
    for point in frontier:
        table.add_row(
            f"{point.budget_bytes:,.0f}",
            f"{point.size_bytes:,.0f}",
            f"{point.predicted_damage:.4g}",
            f"{point.metric:.4f}" if point.metric is not None else "",
        )
    output.console.print(table)
    output.console.print(f"  {metric.name}: {metric.meaning}; float {float_metric:.4f}")
    output.console.print(f"  wrote {out / 'frontier.json'}, {out / 'frontier.png'}")
    return 0


def _frontier_sources(args: argparse.Namespace) -> tuple[Path, Any, Any, dict[str, Any]]:
    """(float model, calibration batches, plan scorer, where the scores come from): a zoo
    model's own data, or MODEL --calib DIR --val DIR [--labels FILE]; every problem at once."""
    from dyadiq.plan_scores import ZooScorer, zoo_metric

    problems = []
    if args.zoo and args.model:
        problems.append(f"give a MODEL or --zoo {args.zoo}, not both")
    if not (args.zoo or args.model):
        problems.append("give --zoo NAME, or MODEL.onnx --calib DIR --val DIR")
    if args.zoo and (args.calib or args.val or args.labels):
        problems.append(
            "--calib / --val / --labels are for your own model: a zoo model has its own"
        )
    if args.model and not (args.calib and args.val):
        missing = " and ".join(
            f for f, v in (("--calib", args.calib), ("--val", args.val)) if not v
        )
        problems.append(f"MODEL needs {missing} DIR (its calibration and held-out batches)")
    if args.labels and not args.val:
        problems.append("--labels are --val's labels: give --val DIR too")
    if problems:
        raise ConfigError(
            "\n  - ".join(["frontier:", *problems]) if len(problems) > 1 else problems[0]
        )
    if args.zoo:
        from dyadiq import zoo

        artifacts = zoo.get(args.zoo)
        calibration = list(artifacts.calibration_batches(args.calib_limit))
        metric = zoo_metric(artifacts.model.primary_metric)
        scorer = ZooScorer(artifacts, metric, eval_limit=args.eval_limit)
        return Path(artifacts.model_path), calibration, scorer, {"data": f"zoo {args.zoo}"}
    from dyadiq.evaluation import input_specs
    from dyadiq.held_out import read_held_out
    from dyadiq.passes.calibration.data import validated_batches
    from dyadiq.plan_scores import data_scorer
    from dyadiq.quality_sources import QualityInputs, input_problems, labels_array

    model = Path(args.model)
    inputs = QualityInputs(validation=args.val, labels=args.labels)
    folder_problems = input_problems(inputs, zoo=False, max_drop=None, calibration=args.calib)
    if folder_problems:
        raise ConfigError("\n  - ".join(["frontier:", *folder_problems]))
    specs = input_specs(model)
    calibration = list(
        validated_batches(args.calib, specs, image_preset=args.calib_preset, limit=args.calib_limit)
    )
    val = read_held_out(
        args.val,
        specs,
        option="--val",
        labels=labels_array(args.labels, "--labels"),
        image_preset=args.calib_preset,
    )
    return model, calibration, data_scorer(model, val), {"data": val.describe()}


def add_frontier(sub: Any) -> None:
    p = sub.add_parser(
        "frontier",
        help="Pareto frontier: ILP plans over a size sweep, each measured on held-out data "
        "(--zoo NAME, or MODEL --calib DIR --val DIR)",
    )
    p.add_argument("model", nargs="?", help="float ONNX model (with --calib and --val)")
    p.add_argument("--zoo", help="a zoo model, with its own calibration and held-out data")
    p.add_argument("--calib", metavar="DIR", help="calibration batches (a folder, as quantize)")
    add_quality_data_flags(p)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--points", type=int, default=6)
    p.add_argument("--calib-limit", type=int, default=None)
    p.add_argument("--calib-preset")
    p.add_argument("--analysis-samples", type=int, default=8)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--wbits-candidates", default="2,3,4,5,6,7,8")
    p.add_argument("--abits", type=int, default=8, choices=[4, 8])
    p.add_argument("--proxy", default="empirical", choices=PROXY_CHOICES, help=PROXY_HELP)
    p.add_argument("--calibrator", default="auto", choices=CALIBRATORS)
    p.add_argument("--pin", action="append", default=[])
    p.add_argument("--exclude", action="append", default=[])
    add_compensate(p)
    add_executor_flags(p)
    p.set_defaults(func=cmd_frontier)
