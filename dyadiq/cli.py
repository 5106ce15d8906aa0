"""``dyadiq`` command line: inspect, quantize, analyze, frontier, run, eval, zoo.

Every user-facing failure is a :class:`DyadiqError`; the CLI prints its message and exits 2,
or 3 when a written model fails its bit-exactness check (:class:`VerificationError`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dyadiq.cli_allocation import (
    allocate,
    allocation_problem,
    bisect,
    candidate_weights,
    compensation_settings,
    plan_builder,
    plan_measurer,
    primary_metric,
)
from dyadiq.errors import ConfigError, DyadiqError, InternalError, VerificationError
from dyadiq.io import (
    check_output_dir,
    describe_os_error,
    relocated,
    staged_output_dir,
    write_text_atomic,
)
from dyadiq.targets import TARGETS as TARGET_NAMES

console = Console()


def _parse_shapes(values: Sequence[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in values:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError as exc:
            raise ConfigError(f"--input-shape wants NAME=1x3x224x224, got {item!r}") from exc
    return shapes


# --- inspect ---------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.inspection import describe

    graph = load_onnx(args.model, input_shapes=_parse_shapes(args.input_shape))
    summary = describe(graph)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    console.print(
        f"[bold]{escape(graph.source)}[/] opset {graph.opset}, {summary['parameters']:,} parameters"
    )
    for note in graph.notes:
        console.print(f"  note: {note}")
    ops = Table("op", "count", title="ops")
    for op, count in summary["op_counts"].items():
        ops.add_row(op, str(count))
    console.print(ops)
    layers = Table("id", "op", "params", "quantizable", "why", title="layers")
    for row in summary["layers"]:
        layers.add_row(
            row["id"],
            row["op"],
            str(row["params"]),
            "yes" if row["quantizable"] else "no",
            row["reason"],
        )
    console.print(layers)
    return 0


# --- quantize --------------------------------------------------------------------------------
def _model_file(path: Path, stack: contextlib.ExitStack) -> Path:
    """An ONNX file for ``path``: itself, or the ONNX translation of a saved Relax IRModule
    (``tvm.ir.save_json``) written to a temporary folder that lives as long as ``stack``."""
    if path.suffix != ".json":
        return path
    import onnx

    from dyadiq.frontends.relax_frontend import load_relax_file, relax_to_onnx

    model = relax_to_onnx(load_relax_file(path))
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dyadiq_relax_")))
    onnx_path = folder / (path.stem + ".onnx")
    onnx.save(model, str(onnx_path))
    return onnx_path


def cmd_quantize(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        return _quantize(args, stack)


def _quantize(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    from dyadiq.consistency import verification_problems
    from dyadiq.passes.calibration.observers import RangeMethod
    from dyadiq.pipeline import CalibrationConfig, quantize, verification_batches
    from dyadiq.plan import PrecisionPlan

    _refuse_conflicting_options(args)
    check_output_dir(Path(args.output), *_user_inputs(args, None))  # before any work
    artifacts = None
    if args.zoo:
        from dyadiq import zoo

        artifacts = zoo.get(args.zoo)
        model_path = artifacts.model_path
    elif args.model:
        model_path = _model_file(Path(args.model), stack)
    else:
        raise ConfigError("give a MODEL.onnx (or a Relax IRModule .json) or --zoo NAME")
    if args.calib:
        calibration: Any = args.calib
    elif artifacts is not None:
        calibration = list(artifacts.calibration_batches(args.calib_limit))
    else:
        raise ConfigError(
            "calibration data is required: --calib FOLDER (.npz/.npy files, or images with "
            "--calib-preset)"
        )
    config = CalibrationConfig(
        method=RangeMethod(args.calibrator),
        percentile=args.percentile,
        limit=args.calib_limit,
        image_preset=args.calib_preset,
    )
    plan = PrecisionPlan.load(Path(args.plan)) if args.plan else None
    # Everything is written to a hidden sibling of the output folder that replaces it only at
    # the end (kept on a verification failure, for inspection): a failure leaves it as it was.
    final = Path(args.output)
    out = stack.enter_context(
        staged_output_dir(final, *_user_inputs(args, artifacts), keep_on=(VerificationError,))
    )
    allocation_info = None
    compensation = compensation_settings(args)
    builder = weights = None
    measures_plans = args.budget or (args.max_drop and artifacts is not None)
    if measures_plans and compensation.enabled:
        # one compensated quantizer for the analysis, the measured plans and the output
        builder = plan_builder(model_path, calibration, args)
        weights = candidate_weights(builder, args)
    if args.max_drop:
        plan, allocation_info = bisect(
            model_path, calibration, args, artifacts, Path(args.output), builder
        )
    elif args.budget:
        plan, allocation_info = allocate(model_path, calibration, args, builder)
    result = quantize(
        model_path,
        out,
        calibration,
        weight_bits=args.wbits,
        act_bits=args.abits,
        act_signed=args.act_dtype == "int8",
        exclude=frozenset(args.exclude),
        config=config,
        input_shapes=_parse_shapes(args.input_shape) or None,
        plan=plan,
        integer=args.integer or args.target is not None,
        compensation=compensation,
        weights=weights,
    )
    report = json.loads((out / "report.json").read_text())
    if allocation_info is not None:
        report["allocation"] = allocation_info
    if args.target is not None:
        from dyadiq.targets import emit_for_target, single_inputs

        assert result.program is not None  # integer=True above
        if artifacts is not None:  # real held-out inputs
            batches = [f for f, _ in artifacts.evaluation_batches(args.check_inputs)]
        else:
            batches = verification_batches(
                calibration, result.graph, config.image_preset, args.check_inputs
            )
        feeds = single_inputs(batches, args.check_inputs)
        target_info = emit_for_target(
            result.program,
            args.target,
            out / args.target,
            feeds,
            tune_trials=args.tune_trials,
            tuning_db=Path(args.tuning_db) if args.tuning_db else None,
            layer_latency_ids=list(result.plan.layers) if args.layer_latency else None,
        )
        report["target"] = relocated(target_info, out, final)  # paths as they will be
    if artifacts is not None and not args.no_eval:
        report["metrics"] = _evaluate_zoo(artifacts, out, calibration, args)

    problems = verification_problems(report)
    report["verification"] = {
        "passed": not problems,
        "problems": problems,
        "mismatch_allowed": bool(problems) and args.allow_mismatch,
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    _print_summary(report, result.plan.to_json(), final)
    if problems and not args.allow_mismatch:
        raise VerificationError(
            "verification failed:\n  - "
            + "\n  - ".join(problems)
            + f"\n{final} is written for inspection; --allow-mismatch accepts such a result"
        )
    return 0


def _refuse_conflicting_options(args: argparse.Namespace) -> None:
    """Options that contradict each other or mean nothing are refused, never ignored."""
    if args.zoo and args.model:
        raise ConfigError(
            f"give a MODEL or --zoo {args.zoo}, not both (the model {args.model} would be ignored)"
        )
    if args.plan and (args.budget or args.max_drop):
        chooser = "--budget" if args.budget else "--max-drop"
        raise ConfigError(
            f"--plan gives every layer's format; {chooser} would choose them: pick one"
        )
    if args.pin and not (args.budget or args.max_drop):
        raise ConfigError("--pin restricts what --budget / --max-drop may choose: add one of them")
    if args.calib_limit is not None and args.calib_limit < 1:
        raise ConfigError(f"--calib-limit must be at least 1 batch, got {args.calib_limit}")
    if not 0.0 < args.percentile <= 100.0:  # also false for NaN
        raise ConfigError(f"--percentile must be in (0, 100], got {args.percentile}")
    if args.check_inputs < 1:
        raise ConfigError(f"--check-inputs must be at least 1, got {args.check_inputs}")


def _user_inputs(args: argparse.Namespace, artifacts: Any) -> list[Path]:
    """Every file or folder the run reads, as the user named it (the Relax JSON, not its ONNX
    translation): the output folder may be none of them, hold none, nor lie in one."""
    named = [
        args.model,
        args.calib,
        args.plan,
        args.latency_table,
        args.memory_plan,
        args.tuning_db,
    ]
    inputs = [Path(item) for item in named if item]
    if artifacts is not None:
        inputs.append(Path(artifacts.model_path))
    return inputs


# --- run -------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from dyadiq.io import save_npz_atomic
    from dyadiq.runner import run_artifact

    outputs = run_artifact(Path(args.artifact), Path(args.input))
    for name, value in outputs.items():
        console.print(f"{escape(name)}: {value.dtype} {list(value.shape)}")
        if value.size <= 20:
            console.print(f"  {np.array2string(value.ravel(), max_line_width=100)}")
    if args.output:
        save_npz_atomic(Path(args.output), outputs)
        console.print(f"wrote {args.output}")
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    """Pareto frontier of a zoo model: ILP plans over a size sweep, each measured."""

    from dyadiq import zoo
    from dyadiq.frontier import save, sweep
    from dyadiq.io import prepare_output_dir

    artifacts = zoo.get(args.zoo)
    out = prepare_output_dir(Path(args.output), artifacts.model_path)
    calibration = list(artifacts.calibration_batches(args.calib_limit))
    builder = None
    if compensation_settings(args).enabled:
        builder = plan_builder(artifacts.model_path, calibration, args)
    graph, _, problem, floats, _ = allocation_problem(
        artifacts.model_path, calibration, args, builder
    )
    metric_name = primary_metric(artifacts)
    measure = plan_measurer(graph, artifacts, calibration, floats, args, metric_name, builder)

    frontier = sweep(problem, args.points, measure)
    save(frontier, out, metric_name)
    table = Table("budget (B)", "size (B)", "predicted damage", metric_name, title="frontier")
    for point in frontier:
        table.add_row(
            f"{point.budget_bytes:,.0f}",
            f"{point.size_bytes:,.0f}",
            f"{point.predicted_damage:.4g}",
            f"{point.metric:.4f}" if point.metric is not None else "",
        )
    console.print(table)
    console.print(f"  wrote {out / 'frontier.json'}, {out / 'frontier.png'}")
    return 0


def _evaluate_zoo(artifacts: Any, out: Path, calibration: Any, args: argparse.Namespace) -> Any:
    from dyadiq.evaluation import evaluate

    mixed = args.plan or args.budget or args.max_drop
    label = "dyadiq plan" if mixed else f"dyadiq W{args.wbits}A{args.abits}"
    models = {label: out / "model.qdq.onnx"}
    if args.integer:
        models[f"{label} integer"] = out / "model.int.onnx"
    if args.compare_ort:
        from dyadiq.ort_baseline import quantize_static_baseline

        ort_path = out / "ort_quantize_static.qdq.onnx"
        quantize_static_baseline(artifacts.model_path, ort_path, calibration)
        models["onnxruntime quantize_static W8A8"] = ort_path
    return evaluate(artifacts, models, limit=args.eval_limit, runtime_kernels=args.runtime_kernels)


def _print_summary(report: dict[str, Any], plan: dict[str, Any], out: Path) -> None:
    sizes = report["sizes"]
    console.print(
        f"[bold green]quantized[/] {report['source']}: "
        f"{len(plan['layers'])} layers, {report['quantized_activation_tensors']} activation "
        f"tensors in {report['scale_groups']} scale groups, "
        f"{report['calibration_batches']} calibration batches"
    )
    console.print(
        f"  weights {sizes['quantized_weight_bytes_packed']:,} B packed; model file "
        f"{sizes['float_model_bytes']:,} B float -> {sizes['qdq_model_bytes']:,} B QDQ; "
        f"{report['timings']['total_s']:.1f} s"
    )
    integer = report.get("integer")
    if integer:
        exact = integer.get("bit_exact_vs_reference", {})
        agreement = integer.get("qdq_vs_integer", {})
        matched = exact.get("exact_tensors", 0) == exact.get("tensors", 0)
        verdict = "[green]bit-exact[/]" if matched else "[bold red]NOT bit-exact[/]"
        lsb = agreement.get("max_output_diff_lsb")
        console.print(
            f"  integer model: {'fully integer' if integer['fully_integer'] else 'float ops: '}"
            f"{', '.join(integer['float_ops'])}; {verdict} vs reference on "
            f"{exact.get('exact_tensors', 0)}/{exact.get('tensors', 0)} tensors; QDQ vs "
            "integer max "
            + (f"{lsb:.1f} LSB" if lsb is not None else "n/a (no integer outputs)")
            + f", top-1 agreement {_fmt(agreement.get('top1_agreement_qdq_vs_integer'))}"
        )
    target = report.get("target")
    if target:
        exact = target.get("bit_exact_vs_reference")
        checked = (
            f"output codes equal to the reference's on {exact['exact']}/{exact['inputs']} inputs"
            if exact
            else target.get("ran_on", target.get("built", ""))
        )
        if exact and target.get("code_tolerance"):
            checked += (
                f" (float islands: within {exact['max_code_diff']} codes"
                + (
                    f", float outputs within {exact['max_float_diff_of_range']:.3%} of range"
                    if "max_float_diff_of_range" in exact
                    else ""
                )
                + f"; tolerance {target['code_tolerance']} codes)"
            )
        extras = [
            f"{key.replace('_', ' ')} {target[key]:,}"
            for key in ("flash_bytes", "arena_bytes", "instructions_per_inference")
            if key in target
        ]
        console.print(
            f"  target {target['target']}: {checked}"
            + (f"; {', '.join(extras)}" if extras else "")
            + f" -> {out / target['target']}"
        )
    verification = report.get("verification", {})
    for problem in verification.get("problems", []):
        label = "warning (--allow-mismatch)" if verification.get("mismatch_allowed") else "FAILED"
        console.print(f"  [bold red]verification {label}:[/] {escape(problem)}")
    if report["float_layers"]:
        console.print(f"  kept in float: {', '.join(f['id'] for f in report['float_layers'])}")
    metrics = report.get("metrics")
    if metrics:
        console.print(_metrics_table(metrics))
    written = ["model.qdq.onnx", "plan.json", "report.json"]
    if integer:
        written.insert(1, "model.int.onnx")
    console.print(f"  wrote {', '.join(str(out / name) for name in written)}")


def _metrics_table(metrics: dict[str, dict[str, float]]) -> Table:
    """One row per metric, one column per model (float first), samples as a count."""
    names = sorted({k for m in metrics.values() for k in m} - {"samples"})
    table = Table("metric", *metrics, title="evaluation on held-out data (exact simulation)")
    for name in [*names, "samples"]:
        table.add_row(name, *[_fmt(m.get(name)) for m in metrics.values()])
    return table


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}" if float(value).is_integer() and value > 1 else f"{value:.4f}"


# --- analyze -------------------------------------------------------------------------------
def cmd_analyze(args: argparse.Namespace) -> int:
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.io import prepare_output_dir
    from dyadiq.passes.calibration.data import validated_batches
    from dyadiq.passes.sensitivity.analysis import (
        SensitivityConfig,
        analyze_cached,
        output_kind_of,
    )
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind
    from dyadiq.pipeline import prepare_graph

    if args.zoo:
        from dyadiq import zoo

        artifacts = zoo.get(args.zoo)
        model_path = artifacts.model_path
        batches = list(artifacts.calibration_batches(args.calib_limit))
    elif args.model and args.calib:
        model_path = Path(args.model)
        batches = []
    else:
        raise ConfigError("give MODEL.onnx with --calib DATA, or --zoo NAME")
    out = prepare_output_dir(Path(args.output), model_path)
    graph = prepare_graph(load_onnx(model_path))
    if not batches:
        batches = list(
            validated_batches(
                args.calib,
                graph.input_specs(),
                image_preset=args.calib_preset,
                limit=args.calib_limit,
            )
        )
    given = args.output_kind
    kind = OutputKind(given) if given else output_kind_of(graph, batches)
    config = SensitivityConfig(
        weight_bits=tuple(int(b) for b in args.wbits.split(",")),
        pairs=not args.no_pairs,
        gradients=args.gradients,
    )
    report, cached = analyze_cached(graph, batches, kind, config)
    write_text_atomic(out / "sensitivity.json", json.dumps(report.to_json(), indent=1))
    table = Table(
        "layer",
        "op",
        "params",
        "avg trace",
        *(f"dL W{b}" for b in config.weight_bits),
        title=f"sensitivity ({kind.value} loss, {report.forward_passes} forward passes, "
        f"{report.seconds:.0f} s{', cached' if cached else ''})",
    )
    for layer_id, layer in report.layers.items():
        trace = f"{layer.trace.mean:.3g}±{layer.trace.stderr:.1g}" if layer.trace else ""
        table.add_row(
            layer_id,
            layer.op,
            f"{layer.params:,}",
            trace,
            *(f"{layer.empirical_damage.get(b, float('nan')):.2g}" for b in config.weight_bits),
        )
    console.print(table)
    console.print(f"  {len(report.pairs)} pair terms; wrote {out / 'sensitivity.json'}")
    return 0


# --- eval ------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from dyadiq import zoo
    from dyadiq.evaluation import evaluate

    artifacts = zoo.get(args.zoo)
    metrics = evaluate(
        artifacts,
        {Path(m).name: Path(m) for m in args.models},
        limit=args.limit,
        runtime_kernels=args.runtime_kernels,
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        console.print(_metrics_table(metrics))
    return 0


def _add_compensate(p: argparse.ArgumentParser) -> None:
    from dyadiq.passes.compensation.settings import DEFAULT_COMPENSATION

    p.add_argument(
        "--compensate",
        default=DEFAULT_COMPENSATION,
        metavar="none|all|range,gptq,bias,cle",
        help="weight-rounding compensation passes, per width (default: %(default)s, the best "
        "in benchmarks/results/compensation.md); the analysis prices the compensated weights",
    )


# --- zoo -------------------------------------------------------------------------------------
def cmd_zoo(args: argparse.Namespace) -> int:
    from dyadiq import zoo

    if args.zoo_command == "list":
        table = Table("name", "task", "labels", "description")
        for entry in zoo.list_models():
            table.add_row(entry.name, entry.task.value, str(entry.has_labels), entry.description)
        console.print(table)
        return 0
    artifacts = zoo.get(args.name)
    console.print(f"{args.name}: {artifacts.model_path}")
    return 0


def _add_runtime_kernels(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime-kernels",
        action="store_true",
        help="also score each model with onnxruntime's fused kernels on this CPU (scores are "
        "exact simulations otherwise, the same on every CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyadiq", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list layers, op counts, parameters, quantizability")
    p.add_argument("model")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("quantize", help="quantize a model (uniform formats in this release)")
    p.add_argument("model", nargs="?", help="float ONNX model (or use --zoo)")
    p.add_argument("--zoo", help="quantize a zoo model with its own calibration/eval data")
    p.add_argument("-o", "--output", required=True, help="output folder (never the input's)")
    p.add_argument("--calib", help="folder of .npz/.npy batches or images")
    p.add_argument("--calib-preset", help="image preprocessing preset for an image folder")
    p.add_argument("--calib-limit", type=int, help="use at most this many calibration batches")
    p.add_argument(
        "--calibrator",
        default="percentile",
        choices=["minmax", "percentile", "mse", "entropy"],
        help="activation range estimator (default percentile 99.99; minmax suits transformers)",
    )
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--wbits", type=int, default=8, help="weight bits, 2..8 (per channel)")
    p.add_argument("--abits", type=int, default=8, choices=[4, 8], help="activation bits")
    p.add_argument("--act-dtype", default="uint8", choices=["uint8", "int8"])
    p.add_argument("--exclude", action="append", default=[], metavar="NODE_ID")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224")
    p.add_argument("--plan", help="a plan.json (per-layer formats) instead of --wbits/--abits")
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
    p.add_argument(
        "--proxy",
        default="empirical",
        choices=["hessian", "hessian+pairs", "empirical", "empirical+pairs"],
        help="sensitivity model the ILP minimises (pair terms measured worse in "
        "benchmarks/results/proxy_quality.md, so they are opt-in)",
    )
    p.add_argument("--analysis-samples", type=int, default=8)
    p.add_argument(
        "--max-drop",
        help="accuracy mode: smallest plan within this drop of float on held-out data (0.5%%)",
    )
    p.add_argument("--bisect-steps", type=int, default=6)
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="ID_OR_PATTERN=W8A8",
        help="restrict a layer's formats under --budget (node id beats a pattern)",
    )
    p.add_argument(
        "--integer",
        action="store_true",
        help="also write model.int.onnx: integer-only (dyadic), verified bit-exact",
    )
    p.add_argument(
        "--target",
        choices=list(TARGET_NAMES),
        help="also compile the integer model: a TVM library (+ runner) or Cortex-M C sources "
        "(+ ELF), written to OUT/TARGET and checked bit-exact where it can run here; x86 "
        "builds for this CPU's x86-64 ISA level, x86-64-v3 (AVX2) / x86-64-v4-vnni name one",
    )
    p.add_argument("--check-inputs", type=int, default=8, help="inputs to verify a target on")
    p.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials (TVM CPU)")
    p.add_argument("--tuning-db", help="MetaSchedule database folder (reused, tune once)")
    p.add_argument(
        "--layer-latency",
        action="store_true",
        help="with --target x86: also time each layer's kernel per candidate format here and "
        "write OUT/x86/layer_latency.json (input for --latency-table)",
    )
    p.add_argument("--compare-ort", action="store_true", help="also run onnxruntime's quantizer")
    _add_compensate(p)
    p.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="accept an integer model or target build that is not bit-exact against the "
        "reference (a warning in the summary and report.json instead of exit status 3)",
    )
    _add_runtime_kernels(p)
    p.add_argument("--no-eval", action="store_true", help="skip zoo evaluation")
    p.add_argument("--eval-limit", type=int, help="evaluate on at most this many samples")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("run", help="run a compiled target folder (OUT/x86, OUT/cortex-m4, ...)")
    p.add_argument("artifact", help="a folder written by quantize --target")
    p.add_argument("--input", required=True, help=".npy (the model's one input) or .npz")
    p.add_argument("-o", "--output", help="write the outputs to this .npz")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("analyze", help="per-layer sensitivity to fewer bits (cached)")
    p.add_argument("model", nargs="?")
    p.add_argument("--zoo")
    p.add_argument("--calib")
    p.add_argument("--calib-preset")
    p.add_argument("--calib-limit", type=int, default=8, help="calibration samples (default 8)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--wbits", default="2,3,4,6,8", help="candidate weight widths")
    p.add_argument("--no-pairs", action="store_true", help="skip inter-layer pair terms")
    p.add_argument("--output-kind", choices=["logits", "probabilities", "embedding"])
    p.add_argument(
        "--gradients",
        action="store_true",
        help="also top Hessian eigenvalue, Fisher diagonal and Taylor proxies (TVM reverse mode)",
    )
    p.set_defaults(func=cmd_analyze)

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
    p.add_argument(
        "--proxy",
        default="empirical",
        choices=["hessian", "hessian+pairs", "empirical", "empirical+pairs"],
    )
    p.add_argument(
        "--calibrator", default="percentile", choices=["minmax", "percentile", "mse", "entropy"]
    )
    p.add_argument("--pin", action="append", default=[])
    p.add_argument("--exclude", action="append", default=[])
    _add_compensate(p)
    p.set_defaults(func=cmd_frontier)

    p = sub.add_parser("eval", help="score models against a zoo model's float original")
    p.add_argument("--zoo", required=True)
    p.add_argument("models", nargs="+")
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_runtime_kernels(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("zoo", help="real pretrained models and their data")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    zsub.add_parser("list")
    g = zsub.add_parser("get")
    g.add_argument("name")
    p.set_defaults(func=cmd_zoo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except DyadiqError as exc:
        _print_error(f"{type(exc).__name__}: {exc}", exc)
        return 3 if isinstance(exc, VerificationError) else 2
    except InternalError as exc:
        # A bug, not a bad input: keep the traceback, which is what a bug report needs.
        traceback.print_exc()
        _print_error(f"internal error (a bug in dyadiq, please report it): {exc}", exc)
        return 70
    except KeyboardInterrupt as exc:
        _print_error("interrupted", exc)
        return 130
    except OSError as exc:
        if exc.errno not in FAULT_ERRNOS:
            raise
        _print_error(f"{type(exc).__name__}: {describe_os_error(exc)}", exc)
        return 2


# Faults of the machine, not of dyadiq: reported in one line like a bad input.
FAULT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG}
)


def _print_error(message: str, exc: BaseException) -> None:
    """One line (plus the message's own lines): what failed, and what became of the output."""
    notes = "; ".join(getattr(exc, "__notes__", []))
    text = f"{message}; {notes}" if notes else message
    Console(stderr=True).print(f"[bold red]error:[/] {escape(text)}")


if __name__ == "__main__":
    sys.exit(main())
