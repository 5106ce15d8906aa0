"""The allocation side of the command line: flags -> :class:`MixedPrecisionOptions` (built
once, the only place that reads them), a call into :mod:`dyadiq.mixed_precision`, and the lines
printed about the plan it chose. ``quantize --budget`` / ``--max-drop`` and ``frontier``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from dyadiq.cli import output
from dyadiq.cli.flags import CALIBRATORS, add_compensate
from dyadiq.errors import ConfigError
from dyadiq.passes.sensitivity.proxy import ALLOCATION_PROXIES, Proxy

if TYPE_CHECKING:
    from dyadiq.backends.capabilities import Capabilities
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


def _widths(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"{option} wants comma-separated widths like 4,8, got {text!r}") from exc


def target_backends(args: argparse.Namespace) -> tuple[Capabilities, ...]:
    """Every backend the plan must run on: the QDQ model always; the integer model with
    --integer and with --target (which writes and compiles it); and the --target's own
    backend (``TARGETS[name].capabilities``)."""
    from dyadiq.backends.capabilities import INTEGER_ONNX, ONNX_QDQ
    from dyadiq.targets import TARGETS

    target = getattr(args, "target", None)
    backends = [ONNX_QDQ]
    if getattr(args, "integer", False) or target is not None:
        backends.append(INTEGER_ONNX)
    if target is not None:
        backends.append(TARGETS[target].capabilities)
    return tuple(backends)


def mixed_precision_options(
    args: argparse.Namespace, compensation: CompensationSettings | None = None
) -> MixedPrecisionOptions:
    """The flags of ``quantize`` or ``frontier`` as typed options, read once."""
    from dyadiq.mixed_precision import MixedPrecisionOptions
    from dyadiq.passes.allocation import AllocationOptions
    from dyadiq.passes.calibration.observers import RangeMethod

    latency_table = getattr(args, "latency_table", None)
    memory_plan = getattr(args, "memory_plan", None)
    allocation = AllocationOptions(
        weight_bits=_widths(args.wbits_candidates, "--wbits-candidates"),
        act_bits=_widths(getattr(args, "abits_candidates", None) or str(args.abits), "--abits"),
        default_act_bits=args.abits,
        proxy=Proxy.parse(args.proxy),
        pins=tuple(args.pin),
        exclude=tuple(args.exclude),
        runs_on=target_backends(args),
        latency_table=Path(latency_table) if latency_table else None,
        memory_plan=Path(memory_plan) if memory_plan else None,
    )
    return MixedPrecisionOptions(
        allocation,
        calibrator=RangeMethod(args.calibrator),
        calib_preset=getattr(args, "calib_preset", None),
        calib_limit=getattr(args, "calib_limit", None),
        analysis_samples=args.analysis_samples,
        compensation=compensation if compensation is not None else compensation_settings(args),
        act_signed=getattr(args, "act_dtype", "uint8") == "int8",
        eval_limit=getattr(args, "eval_limit", None),
        workers=getattr(args, "workers", None),
        ray_address=getattr(args, "ray_address", None),
    )


def add_allocation_flags(p: argparse.ArgumentParser) -> None:
    """quantize's flags that choose per-layer formats."""
    p.add_argument(
        "--budget",
        help="allocate per-layer formats by ILP, any of size=2MB, avg-wbits=5, bops=0.5x, "
        "latency=0.7x (or 3ms with --latency-table), flash=256KB, ram=64KB (--memory-plan); "
        "Nx is relative to all-W8A8",
    )
    p.add_argument("--wbits-candidates", default="2,3,4,6,8", help="widths the ILP may pick")
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
        "--max-drop",
        help="accuracy mode: smallest plan within this drop of float on held-out data (0.5%%)",
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


def cmd_frontier(args: argparse.Namespace) -> int:
    """Pareto frontier of a zoo model: ILP plans over a size sweep, each measured."""
    from dyadiq import zoo
    from dyadiq.evaluation import evaluate
    from dyadiq.frontier import save
    from dyadiq.io import prepare_output_dir
    from dyadiq.mixed_precision import (
        analyzed_problem,
        executor_for,
        plan_builder,
        plan_measurer,
        primary_metric,
    )
    from dyadiq.passes.allocation import sweep

    artifacts = zoo.get(args.zoo)
    out = prepare_output_dir(Path(args.output), artifacts.model_path)
    calibration = list(artifacts.calibration_batches(args.calib_limit))
    options = mixed_precision_options(args)
    builder = None
    if options.compensation.enabled:
        builder = plan_builder(artifacts.model_path, calibration, options)
    # one executor (one Ray start) for the analysis and the plans' measurements
    with executor_for(options) as executor:
        analysis = analyzed_problem(artifacts.model_path, calibration, options, builder, executor)
        metric_name = primary_metric(artifacts)
        measure = plan_measurer(
            analysis.graph,
            artifacts,
            calibration,
            analysis.model.floats,
            options,
            metric_name,
            builder,
            executor,
        )
        frontier = sweep(analysis.model.problem, args.points, measure)
    # the float model on the same held-out data: the line every plan is judged against
    float_metric = evaluate(artifacts, {}, limit=options.eval_limit)["float"].get(metric_name)
    save(frontier, out, metric_name, float_metric)
    table = Table("budget (B)", "size (B)", "predicted damage", metric_name, title="frontier")
    for point in frontier:
        table.add_row(
            f"{point.budget_bytes:,.0f}",
            f"{point.size_bytes:,.0f}",
            f"{point.predicted_damage:.4g}",
            f"{point.metric:.4f}" if point.metric is not None else "",
        )
    output.console.print(table)
    output.console.print(f"  wrote {out / 'frontier.json'}, {out / 'frontier.png'}")
    return 0


def add_frontier(sub: Any) -> None:
    p = sub.add_parser("frontier", help="Pareto frontier: ILP plans over a size sweep, measured")
    p.add_argument("--zoo", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--points", type=int, default=6)
    p.add_argument("--calib-limit", type=int, default=None)
    p.add_argument("--calib-preset")
    p.add_argument("--analysis-samples", type=int, default=8)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--wbits-candidates", default="2,3,4,6,8")
    p.add_argument("--abits", type=int, default=8, choices=[4, 8])
    p.add_argument("--proxy", default="empirical", choices=PROXY_CHOICES, help=PROXY_HELP)
    p.add_argument("--calibrator", default="percentile", choices=CALIBRATORS)
    p.add_argument("--pin", action="append", default=[])
    p.add_argument("--exclude", action="append", default=[])
    add_compensate(p)
    add_executor_flags(p)
    p.set_defaults(func=cmd_frontier)
