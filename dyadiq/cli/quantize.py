"""``dyadiq quantize``: flags -> one call of :func:`dyadiq.api.quantize` -> the summary.

A model (ONNX, a saved Relax IRModule, or a zoo model) to a QDQ model, optionally an
integer-only model and a compiled target, with one format for every layer, a plan file, or
formats chosen under a budget / accuracy tolerance. The run itself lives in the API; this
module only reads flags, refuses what only the command line can get wrong, and prints."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dyadiq.cli.allocation import (
    add_allocation_flags,
    add_executor_flags,
    add_quality_data_flags,
    search_options,
)
from dyadiq.cli.flags import (
    CALIBRATORS,
    add_compensate,
    add_runtime_kernels,
    fill_missing_help,
    parse_shapes,
)
from dyadiq.cli.summary import print_summary
from dyadiq.cli.weight_only import add_weight_only_arguments, run_weight_only
from dyadiq.errors import ConfigError
from dyadiq.passes.calibration.range_search import DEFAULT_EVALUATIONS

DEFAULT_WBITS = 8


def cmd_quantize(args: argparse.Namespace) -> int:
    from dyadiq.api import TargetOptions, quantize
    from dyadiq.run_inputs import parse_bindings

    if args.zoo and args.model:
        raise ConfigError(
            f"give a MODEL or --zoo {args.zoo}, not both (the model {args.model} would be ignored)"
        )
    if not (args.zoo or args.model):
        raise ConfigError("give a MODEL.onnx (or a Relax IRModule .json) or --zoo NAME")
    if args.weight_only:  # language models: group-wise weights, float activations
        return run_weight_only(args)
    _refuse_bad_numbers(args)
    quantize(
        f"zoo:{args.zoo}" if args.zoo else args.model,
        args.calib,
        validation=args.val,
        test=args.test,
        labels=args.labels,
        test_labels=args.test_labels,
        out=args.output,
        budget=args.budget,
        max_drop=args.max_drop,
        target=args.target,
        wbits=DEFAULT_WBITS if args.wbits is None else args.wbits,
        abits=args.abits,
        act_dtype=args.act_dtype,
        qdq_style=args.qdq_style,
        calibrator=args.calibrator,
        percentile=args.percentile,
        range_search=args.range_search,
        calib_preset=args.calib_preset,
        calib_limit=args.calib_limit,
        compensate=args.compensate,
        exclude=args.exclude,
        pin=args.pin,
        plan=args.plan,
        integer=args.integer,
        strict_integer=args.strict_integer,
        bind=parse_bindings(args.bind) if args.bind else None,
        input_shapes=parse_shapes(args.input_shape) or None,
        evaluate=not args.no_eval,
        eval_limit=args.eval_limit,
        compare_ort=args.compare_ort,
        runtime_kernels=args.runtime_kernels,
        allow_mismatch=args.allow_mismatch,
        search=search_options(args),
        build=TargetOptions(
            check_inputs=args.check_inputs,
            tune_trials=args.tune_trials,
            tuning_db=Path(args.tuning_db) if args.tuning_db else None,
            layer_latency=args.layer_latency,
        ),
        # printed before a verification failure is raised: the summary says what failed
        on_written=lambda made: print_summary(made.report, made.plan.to_json(), made.paths),
    )
    return 0


def _refuse_bad_numbers(args: argparse.Namespace) -> None:
    """Counts that mean nothing are refused before any work, with the flag named."""
    if args.calib_limit is not None and args.calib_limit < 1:
        raise ConfigError(f"--calib-limit must be at least 1 batch, got {args.calib_limit}")
    if not 0.0 < args.percentile <= 100.0:  # also false for NaN
        raise ConfigError(f"--percentile must be in (0, 100], got {args.percentile}")
    if args.range_search < 0:
        raise ConfigError(f"--range-search must be 0 (off) or a count, got {args.range_search}")
    if args.check_inputs < 1:
        raise ConfigError(f"--check-inputs must be at least 1, got {args.check_inputs}")


def add_quantize(sub: Any) -> None:
    from dyadiq.targets import TARGETS

    p = sub.add_parser(
        "quantize",
        help="quantize a model: one format for every layer, a plan, or formats chosen under a "
        "budget / accuracy tolerance",
        description="Quantize a float model to a QDQ ONNX model (+ plan.json, report.json, "
        "report.html; optionally an integer-only model and a compiled target).",
    )
    p.add_argument("model", nargs="?", help="float ONNX model or Relax IRModule .json (or --zoo)")
    p.add_argument("--zoo", help="quantize a zoo model with its own calibration/eval data")
    p.add_argument("-o", "--output", required=True, help="output folder (never the input's)")
    p.add_argument(
        "--calib",
        help="calibration data: a folder of .npz/.npy batches or images, or one .npz file "
        "(one batch keyed by input name); a zoo model brings its own",
    )
    p.add_argument(
        "--calib-preset", help="image preprocessing preset for an image folder (e.g. imagenet)"
    )
    p.add_argument("--calib-limit", type=int, help="use at most this many calibration batches")
    p.add_argument(
        "--calibrator",
        default="auto",
        choices=CALIBRATORS,
        help="activation range estimator (default auto: percentile 99.99, MSE for LayerNorm "
        "outputs, whose outlier channels the percentile keeps)",
    )
    p.add_argument(
        "--percentile",
        type=float,
        default=99.99,
        help="the percentile calibrator's clipping point, in (0, 100] (default %(default)s)",
    )
    p.add_argument(
        "--range-search",
        type=int,
        default=DEFAULT_EVALUATIONS,
        metavar="N",
        help="then search the activation ranges end to end: up to N candidate ranges scored "
        "by the whole 8-bit model's KL to float (trimmed mean over samples) on 32 calibration "
        "batches (default %(default)s, about 770 forward passes on MobileNetV2; 0: off)",
    )
    # no default here: --weight-only has its own (4), the QDQ path DEFAULT_WBITS
    p.add_argument(
        "--wbits",
        type=int,
        help=f"weight bits, 2..8 (per channel; default {DEFAULT_WBITS}, 4 with --weight-only)",
    )
    p.add_argument("--abits", type=int, default=8, choices=[4, 8], help="activation bits")
    p.add_argument(
        "--act-dtype",
        default="uint8",
        choices=["uint8", "int8"],
        help="activation code type (asymmetric; default %(default)s, what onnxruntime's fast "
        "kernels want); --qdq-style tensorrt uses symmetric int8",
    )
    p.add_argument(
        "--qdq-style",
        default="ort",
        choices=["ort", "tensorrt"],
        help="QDQ layout: ort (default; onnxruntime's, asymmetric activations) or tensorrt "
        "(TensorRT explicit quantization: symmetric int8, zero point 0, float bias, float "
        "outputs; W8A8 only)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME|PATTERN|OP",
        help="keep layers in float: a node id, a glob pattern ('/classifier*') or an op type "
        "('Gemm'); repeatable; one that matches no layer is an error",
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=1x3x224x224",
        help="fix an input's dynamic dimensions; repeatable",
    )
    p.add_argument("--plan", help="a plan.json (per-layer formats) instead of --wbits/--abits")
    add_allocation_flags(p)
    add_quality_data_flags(p)
    p.add_argument(
        "--test",
        metavar="DIR",
        help="held-out batches the written model is reported on (--max-drop chose it on "
        "--val; without --test, --val is split in two: even samples search, odd ones report)",
    )
    p.add_argument("--test-labels", metavar="FILE", help="--test's class indices")
    fill_missing_help(p, _ALLOCATION_HELP)
    add_executor_flags(p)
    add_weight_only_arguments(p)
    p.add_argument(
        "--integer",
        action="store_true",
        help="also write model.int.onnx: integer-only (dyadic), verified bit-exact",
    )
    p.add_argument(
        "--bind",
        action="append",
        metavar="NAME=VALUE",
        help="make an input a constant before quantizing (e.g. a sample rate that selects an "
        "If branch, which then folds away); VALUE is a number or a comma list; repeatable; "
        "the data then feeds the other inputs",
    )
    p.add_argument(
        "--strict-integer",
        action="store_true",
        help="refuse a model with a layer whose int32 accumulator could overflow (by default "
        "that layer is kept in float, in both models, and named in the summary)",
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
    p.add_argument(
        "--compare-ort",
        action="store_true",
        help="also quantize with onnxruntime's quantize_static (W8A8) and score it beside "
        "dyadiq's model (zoo models)",
    )
    add_compensate(p)
    p.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="accept an integer model or target build that is not bit-exact against the "
        "reference (a warning in the summary and report.json instead of exit status 3)",
    )
    add_runtime_kernels(p)
    p.add_argument(
        "--no-eval",
        action="store_true",
        help="skip the held-out evaluation (a zoo model's data, --val / --test)",
    )
    p.add_argument("--eval-limit", type=int, help="evaluate on at most this many samples")
    p.set_defaults(func=cmd_quantize)


# Help for the allocation flags that dyadiq.cli.allocation declares without any (shown only
# where the flag has none of its own).
_ALLOCATION_HELP = {
    "--analysis-samples": "calibration batches the sensitivity analysis reads (default 8)",
    "--bisect-steps": "--max-drop: plans measured at most while bisecting (default 6)",
    "--wbits-candidates": "weight widths the ILP may pick (default 2,3,4,5,6,7,8)",
    "--latency-table": "a backend's measured {layer: {format: ms}} JSON, for latency=3ms",
    "--memory-plan": "live sets (+ tensor bytes, flash) JSON for ram= / flash= budgets",
}
