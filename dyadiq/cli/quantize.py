"""``dyadiq quantize``: a model (ONNX, a saved Relax IRModule, or a zoo model) to a QDQ model,
optionally an integer-only model and a compiled target, with uniform formats, a plan file, or
formats chosen under a budget / accuracy tolerance (:mod:`dyadiq.cli.allocation`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from dyadiq.cli.allocation import add_allocation_flags, choose_plan, compensation_settings
from dyadiq.cli.flags import CALIBRATORS, add_compensate, add_runtime_kernels, parse_shapes
from dyadiq.cli.summary import print_summary
from dyadiq.errors import ConfigError, VerificationError
from dyadiq.io import check_output_dir, relocated, staged_output_dir, write_text_atomic
from dyadiq.report_html import write_report_html


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
    weights = None
    if args.budget or args.max_drop:
        chosen = choose_plan(args, model_path, calibration, artifacts, compensation)
        plan, allocation_info, weights = chosen.plan, chosen.info, chosen.weights
    result = quantize(
        model_path,
        out,
        calibration,
        weight_bits=args.wbits,
        act_bits=args.abits,
        act_signed=args.act_dtype == "int8",
        exclude=frozenset(args.exclude),
        config=config,
        input_shapes=parse_shapes(args.input_shape) or None,
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
    # Written for failed verifications too: the kept folder's page says what failed.
    write_report_html(out, report, plan=result.plan.to_json())
    print_summary(report, result.plan.to_json(), final)
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


def add_quantize(sub: Any) -> None:
    from dyadiq.targets import TARGETS

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
        choices=CALIBRATORS,
        help="activation range estimator (default percentile 99.99; minmax suits transformers)",
    )
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--wbits", type=int, default=8, help="weight bits, 2..8 (per channel)")
    p.add_argument("--abits", type=int, default=8, choices=[4, 8], help="activation bits")
    p.add_argument("--act-dtype", default="uint8", choices=["uint8", "int8"])
    p.add_argument("--exclude", action="append", default=[], metavar="NODE_ID")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224")
    p.add_argument("--plan", help="a plan.json (per-layer formats) instead of --wbits/--abits")
    add_allocation_flags(p)
    p.add_argument(
        "--integer",
        action="store_true",
        help="also write model.int.onnx: integer-only (dyadic), verified bit-exact",
    )
    p.add_argument(
        "--target",
        choices=list(TARGETS),
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
    add_compensate(p)
    p.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="accept an integer model or target build that is not bit-exact against the "
        "reference (a warning in the summary and report.json instead of exit status 3)",
    )
    add_runtime_kernels(p)
    p.add_argument("--no-eval", action="store_true", help="skip zoo evaluation")
    p.add_argument("--eval-limit", type=int, help="evaluate on at most this many samples")
    p.set_defaults(func=cmd_quantize)
