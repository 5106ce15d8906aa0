"""``dyadiq quantize --weight-only``: group-wise integer weights, float activations.

:func:`add_weight_only_arguments` adds the flags only this mode has (its settings flags, of
:data:`SETTINGS_FLAGS`, as :mod:`dyadiq.cli.weight_only_settings` declares them for the
benchmarks too); the mode also reads the ``quantize`` flags it shares (``MODEL`` / ``--zoo``,
``-o``, ``--calib``, ``--calib-limit``, ``--wbits``, ``--exclude``, ``--plan``, ``--budget``,
``--wbits-candidates``, ``--analysis-samples``), which :func:`add_shared_arguments` declares
for a parser of its own (tests, or a standalone entry point).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.cli.weight_only_settings import (
    add_settings_arguments,
    parse_widths,
    settings_from_args,
)
from dyadiq.errors import CalibrationDataError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_WEIGHT_ONLY_BITS = 4
# The ILP's widths in weight-only mode unless --wbits-candidates says otherwise: on Gemma 3 270M
# at avg-wbits=3.5, offering 2 bits put 47 weights there and perplexity rose to 155 (the
# additive damage model misses their interaction); widths 3-6 gave 59.2 against 84.98 for
# uniform round-to-nearest int4 (benchmarks/results/llm.md). Budgets near 3 bits do better
# with 2 offered (97.9 against 103.6 at 3.0): pass --wbits-candidates 2,3,4,5,6 there.
WEIGHT_ONLY_WIDTHS = "3,4,5,6"
DEFAULT_CALIBRATION_BATCHES = 32
# the settings flags this mode offers (dyadiq.cli.weight_only_settings declares them); the
# clip search and the dampening of other weights keep their defaults here
SETTINGS_FLAGS = (
    "group_size",
    "method",
    "symmetric",
    "act_order",
    "tied_damp",
    "sequential",
    "salient_fraction",
    "awq",
)


def add_weight_only_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of weight-only mode (none of them clashes with ``quantize``'s own)."""
    from dyadiq.backends.onnx.weight_only import WeightOnlyForm

    group = p.add_argument_group("weight-only (language models)")
    group.add_argument(
        "--weight-only",
        action="store_true",
        help="quantize weights only, group-wise (MatMul, Gemm and Gather weights; tied "
        "embeddings stored once); activations stay float",
    )
    add_settings_arguments(group, SETTINGS_FLAGS, defaults={"salient_fraction": None})
    group.add_argument(
        "--wo-format",
        default=str(WeightOnlyForm.DEQUANTIZE_LINEAR),
        choices=[str(f) for f in WeightOnlyForm],
        help="dequantize-linear: standard blocked DequantizeLinear (opset 21); matmul-nbits: "
        "onnxruntime's MatMulNBits / GatherBlockQuantized for 4-bit weights (default "
        "%(default)s)",
    )
    group.add_argument(
        "--decode-graph",
        help="with --target: the float KV-cache decode-step graph to compile with the codes "
        "(default for --zoo gemma3_270m: the zoo's); the build goes to OUT/x86 (x86-avx2, "
        "x86-avx512, aarch64) for `dyadiq generate`, checked on --check-inputs steps",
    )


def add_shared_arguments(p: argparse.ArgumentParser) -> None:
    """The ``quantize`` flags weight-only mode reads, for a parser without them."""
    p.add_argument("model", nargs="?", help="float ONNX model (external data allowed)")
    p.add_argument("--zoo", help="a zoo model with its own calibration text")
    p.add_argument("-o", "--output", required=True, help="output folder (never the input's)")
    p.add_argument("--calib", help="folder of .npz/.npy batches (one file per batch)")
    p.add_argument("--calib-limit", type=int, help="use at most this many calibration batches")
    p.add_argument("--wbits", type=int, help="weight bits, 2..8 (weight-only default 4)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="keep weights in float: a layer id, a glob over node names, or an op type "
        "(Gather); repeatable",
    )
    p.add_argument("--plan", help="a weight-only plan.json (layer -> bits)")
    p.add_argument("--budget", help="avg-wbits=3.5 or size=120MB: widths chosen by the ILP")
    p.add_argument("--wbits-candidates", help="widths the ILP may pick (default 3,4,5,6)")
    p.add_argument(
        "--analysis-samples", type=int, default=8, help="calibration batches for sensitivity"
    )


def _numpy_batches(folder: Path, input_names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    files = sorted([*folder.glob("*.npz"), *folder.glob("*.npy")])
    if not files:
        raise CalibrationDataError(f"no .npz / .npy calibration batches in {folder}")
    for path in files:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            if len(input_names) != 1:
                raise CalibrationDataError(
                    f"{path} is one array but the model has inputs {input_names}: use .npz"
                )
            yield {input_names[0]: data}
        else:
            yield {name: data[name] for name in data.files}


def _source(args: argparse.Namespace) -> tuple[Path, Any, Any]:
    """(model path, calibration batches factory(limit), zoo module or None)."""
    if args.zoo and args.model:
        raise ConfigError(f"give a MODEL or --zoo {args.zoo}, not both")
    if args.zoo:
        from dyadiq import zoo

        artifacts = zoo.get(args.zoo)
        return artifacts.model_path, artifacts.calibration_batches, artifacts
    if not args.model:
        raise ConfigError("give a MODEL.onnx or --zoo NAME")
    path = Path(args.model)
    if not args.calib:
        raise ConfigError("weight-only quantization of a model file needs --calib FOLDER")
    import onnx

    header = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in header.graph.initializer}
    names = [i.name for i in header.graph.input if i.name not in initializers]
    folder = Path(args.calib)

    def batches(limit: int | None) -> Iterator[dict[str, np.ndarray]]:
        for k, feeds in enumerate(_numpy_batches(folder, names)):
            if limit is not None and k >= limit:
                return
            yield feeds

    return path, batches, None


def run_weight_only(args: argparse.Namespace) -> int:
    """Run weight-only quantization from parsed flags; prints a summary, returns 0."""
    from dyadiq.backends.onnx.weight_only import WeightOnlyForm
    from dyadiq.passes.weight_only.allocation import allocate_widths
    from dyadiq.passes.weight_only.pipeline import prepare, read_plan, run
    from dyadiq.passes.weight_only.width_plans import measured_damage, uniform_widths

    # quantize's flags that mean nothing without integer activations: refused, not ignored
    unsupported = [
        flag
        for flag, attr in (
            ("--integer", "integer"),
            ("--max-drop", "max_drop"),
            ("--abits-candidates", "abits_candidates"),
            ("--compare-ort", "compare_ort"),
        )
        if getattr(args, attr, None)
    ]
    if unsupported:
        raise ConfigError(f"--weight-only does not take {', '.join(unsupported)}")
    chosen = [f for f in ("plan", "budget") if getattr(args, f, None)]
    if len(chosen) > 1:
        raise ConfigError("give --plan or --budget, not both")
    if args.calib_limit is not None and args.calib_limit < 1:
        raise ConfigError(f"--calib-limit must be at least 1 batch, got {args.calib_limit}")
    settings = settings_from_args(
        args,
        SETTINGS_FLAGS,
        # the search's width: the uniform width, else (a plan or budget) the default
        awq_bits=args.wbits if args.wbits is not None else DEFAULT_WEIGHT_ONLY_BITS,
    )
    model_path, batches, _ = _source(args)
    target = getattr(args, "target", None)
    if target and settings.awq:  # before the long part: the decode step cannot take 1/s
        raise ConfigError(
            "--awq does not combine with --target: the decode graph would need the same 1/s "
            "input scales, which the code transfer does not carry"
        )
    if target:  # checked before the long part: the target's name and its decode graph
        from dyadiq.cli import generate

        generate.quantize_target_folder(Path(args.output), target)
        decode_graph = generate.decode_graph_for(getattr(args, "decode_graph", None), args.zoo)
    limit = args.calib_limit or DEFAULT_CALIBRATION_BATCHES
    prepared = prepare(
        model_path, batches(limit), settings, exclude=args.exclude, memo=bool(args.budget)
    )
    layers = prepared.inventory.layers
    extra: dict[str, Any] = {}
    if args.plan:
        bits = read_plan(Path(args.plan))
        unknown = sorted(set(bits) - {layer.id for layer in layers})
        if unknown:
            raise ConfigError(f"the plan names layers this model lacks: {unknown[:5]}")
    elif args.budget:
        widths = parse_widths(args.wbits_candidates or WEIGHT_ONLY_WIDTHS)
        if args.analysis_samples < 1:
            raise ConfigError("--analysis-samples must be at least 1")
        damage = measured_damage(prepared, list(batches(args.analysis_samples)), widths)
        bits, allocation = allocate_widths(layers, damage, widths, args.budget)
        extra["allocation"] = {
            "budget": args.budget,
            "widths": list(widths),
            "predicted_damage": allocation.predicted_damage,
            "optimal": allocation.optimal,
            "damage": {k: {str(b): v for b, v in d.items()} for k, d in damage.items()},
        }
    else:
        width = args.wbits if args.wbits is not None else DEFAULT_WEIGHT_ONLY_BITS
        settings.format(width)  # validates
        bits = uniform_widths(layers, width)
    report = run(
        model_path,
        Path(args.output),
        prepared,
        bits,
        WeightOnlyForm(args.wo_format),
        extra_report=extra,
    )
    _print_summary(report, Path(args.output))
    if target:
        steps = getattr(args, "check_inputs", 8)
        generate.build_quantize_target(Path(args.output), target, decode_graph, steps)
    return 0


def _print_summary(report: Mapping[str, Any], out: Path) -> None:
    export = report["export"]
    files = ", ".join(f"{name} ({size / 1e6:.1f} MB)" for name, size in report["files"].items())
    print(f"weight-only model: {out} -> {files}")
    print(
        f"  {len(report['layers'])} weights, {report['quantized_params']:,} params at "
        f"{report['average_code_bits']:.3f} code bits on average "
        f"({report['stored_weight_bytes'] / 1e6:.1f} MB with scales and zero points)"
    )
    print(
        f"  form {export['form']}: {len(export['matmul_nbits'])} MatMulNBits weights, "
        f"{len(export['dequantize_linear'])} DequantizeLinear weights"
    )
    if report["float_layers"]:
        print(f"  kept float: {json.dumps(report['float_layers'])}")


def main(argv: list[str] | None = None) -> int:
    """``python -m dyadiq.cli.weight_only ...`` until ``quantize --weight-only`` is wired."""
    parser = argparse.ArgumentParser(prog="dyadiq-weight-only", description=__doc__)
    add_shared_arguments(parser)
    add_weight_only_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run_weight_only(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
