"""The small subcommands: ``inspect`` (a model's layers), ``run`` (a compiled target folder),
``eval`` (score quantized models against their float original, on a zoo model's data or
yours) and ``zoo`` (list, fetch)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from dyadiq.cli import output
from dyadiq.cli.flags import add_runtime_kernels, parse_shapes


def cmd_inspect(args: argparse.Namespace) -> int:
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.inspection import describe

    graph = load_onnx(args.model, input_shapes=parse_shapes(args.input_shape))
    summary = describe(graph)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    output.console.print(
        f"[bold]{escape(graph.source)}[/] opset {graph.opset}, {summary['parameters']:,} parameters"
    )
    for note in graph.notes:
        output.console.print(f"  note: {note}")
    ops = Table("op", "count", title="ops")
    for op, count in summary["op_counts"].items():
        ops.add_row(op, str(count))
    output.console.print(ops)
    layers = Table("id", "op", "params", "quantizable", "why", title="layers")
    for row in summary["layers"]:
        layers.add_row(
            row["id"],
            row["op"],
            str(row["params"]),
            "yes" if row["quantizable"] else "no",
            row["reason"],
        )
    output.console.print(layers)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a compiled target folder; outputs are named alike on every target: ``NAME_codes``
    (the integer output codes) and, where the target returns them, ``NAME`` (floats)."""
    import numpy as np

    from dyadiq.io import save_npz_atomic
    from dyadiq.runner import run_artifact

    folder = Path(args.artifact)
    outputs = output.uniform_output_names(run_artifact(folder, Path(args.input)), folder)
    for name, value in outputs.items():
        output.console.print(f"{escape(name)}: {value.dtype} {list(value.shape)}")
        if value.size <= 20:
            output.console.print(f"  {np.array2string(value.ravel(), max_line_width=100)}")
    if all(name.endswith(output.CODES_SUFFIX) for name in outputs):
        output.console.print("(this target returns output codes only; the QDQ model's output")
        output.console.print(" scale and zero point turn them into floats)")
    if args.output:
        save_npz_atomic(Path(args.output), outputs)
        output.console.print(f"wrote {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dyadiq import zoo
    from dyadiq.errors import ConfigError
    from dyadiq.evaluation import evaluate

    if args.zoo is None:
        if args.data is None or len(args.models) < 2:
            raise ConfigError(
                "eval wants MODEL QUANTIZED... --data DIR (your float model, the quantized "
                "models, a folder of .npz/.npy input batches), or --zoo NAME QUANTIZED..."
            )
        return _eval_on_data(args)
    if args.data is not None or args.labels is not None:
        raise ConfigError("--data and --labels are for your own model; --zoo brings its data")
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
        output.console.print(output.metrics_table(metrics))
    return 0


def _eval_on_data(args: argparse.Namespace) -> int:
    """``eval MODEL QUANTIZED... --data DIR [--labels FILE]``: metrics by output kind."""
    from dyadiq.evaluation import OutputKind, evaluate_on_data, read_labels
    from dyadiq.run_inputs import bound_model, parse_bindings

    float_model, *candidates = (Path(m) for m in args.models)
    with tempfile.TemporaryDirectory(prefix="dyadiq_bound_") as folder:
        if args.bind:  # the float model as quantize --bind saw it
            float_model = bound_model(float_model, parse_bindings(args.bind), Path(folder))
        kinds, metrics = evaluate_on_data(
            float_model,
            {m.name: m for m in candidates},
            Path(args.data),
            labels=read_labels(Path(args.labels)) if args.labels else None,
            kind=OutputKind.parse(args.output_kind),
            limit=args.limit,
            runtime_kernels=args.runtime_kernels,
        )
    if args.json:
        print(json.dumps({"kinds": {k: v.value for k, v in kinds.items()}, **metrics}, indent=2))
        return 0
    for name, kind in kinds.items():
        output.console.print(f"output {escape(name)}: scored as {kind.value} (--output-kind)")
    output.console.print(output.metrics_table(metrics))
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from dyadiq import zoo

    if args.zoo_command == "list":
        table = Table("name", "task", "labels", "description")
        for entry in zoo.list_models():
            table.add_row(entry.name, entry.task.value, str(entry.has_labels), entry.description)
        output.console.print(table)
        return 0
    artifacts = zoo.get(args.name)
    output.console.print(f"{args.name}: {artifacts.model_path}")
    return 0


def add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="list layers, op counts, parameters, quantizability")
    p.add_argument("model")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run a compiled target folder (OUT/x86, OUT/cortex-m4, ...)")
    p.add_argument("artifact", help="a folder written by quantize --target")
    p.add_argument("--input", required=True, help=".npy (the model's one input) or .npz")
    p.add_argument("-o", "--output", help="write the outputs to this .npz")
    p.set_defaults(func=cmd_run)
    from dyadiq.cli.generate import add_generate  # runs a compiled decode target, as run does

    add_generate(sub)


def add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="score quantized models against their float original: MODEL QUANTIZED... --data "
        "DIR, or --zoo NAME QUANTIZED...",
    )
    p.add_argument("--zoo", help="a zoo model: its float model and held-out data")
    p.add_argument(
        "models", nargs="+", help="with --data: the float model first, then quantized copies"
    )
    p.add_argument("--data", help="folder of .npz / .npy input batches (as --calib reads)")
    p.add_argument("--labels", help="class indices, one per sample (.npy or one a line)")
    p.add_argument(
        "--output-kind",
        default="auto",
        help="how to score outputs: auto (from the float outputs), classes, embedding, map, other",
    )
    p.add_argument(
        "--bind",
        action="append",
        metavar="NAME=VALUE",
        help="the float model's inputs made constants, as quantize --bind did",
    )
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_runtime_kernels(p)
    p.set_defaults(func=cmd_eval)


def add_zoo(sub: Any) -> None:
    p = sub.add_parser("zoo", help="real pretrained models and their data")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    zsub.add_parser("list")
    g = zsub.add_parser("get")
    g.add_argument("name")
    p.set_defaults(func=cmd_zoo)
