"""``dyadiq analyze``: per-layer sensitivity to fewer bits, cached, written as JSON.

Without ``--proxy`` it computes every proxy that needs no reverse mode (empirical damage, SNR,
the Hutchinson trace, entropy) and the activation sites; ``--proxy NAME`` computes what that
proxy needs and nothing else; ``--pairs`` (or a ``+pairs`` proxy) adds the pair terms. Runs
serially, or on Ray with ``--workers N`` / ``--ray-address``; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from dyadiq.cli import output
from dyadiq.cli.allocation import PROXY_CHOICES, add_executor_flags
from dyadiq.errors import ConfigError
from dyadiq.io import write_text_atomic


def cmd_analyze(args: argparse.Namespace) -> int:
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.io import prepare_output_dir
    from dyadiq.passes.calibration.data import validated_batches
    from dyadiq.passes.sensitivity.analysis import analyze_cached, output_kind_of
    from dyadiq.passes.sensitivity.executor import make_executor
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind
    from dyadiq.passes.sensitivity.proxy import Proxy
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
    config = _config(args)
    with make_executor(workers=args.workers, ray_address=args.ray_address) as executor:
        report, cached = analyze_cached(graph, batches, kind, config, executor=executor)
    write_text_atomic(out / "sensitivity.json", json.dumps(report.to_json(), indent=1))
    # the chosen proxy's damage per width (the measured one without --proxy)
    field = Proxy.parse(args.proxy).damage_field if args.proxy else "empirical_damage"
    base = Proxy.parse(args.proxy).base.value if args.proxy else "dL"
    label = {"empirical_damage": "dL", "snr_db": "SNR dB"}.get(field, base)
    table = Table(
        "layer",
        "op",
        "params",
        "avg trace",
        *(f"{label} W{b}" for b in config.weight_bits),
        title=f"sensitivity ({kind.value} loss, {report.forward_passes} forward passes, "
        f"{report.seconds:.0f} s{', cached' if cached else ''})",
    )
    for layer_id, layer in report.layers.items():
        trace = ""
        if layer.trace:  # the estimate, its relative standard error and its probe count
            t = layer.trace
            trace = f"{t.mean:.3g} ±{100 * t.relative_stderr:.0f}% ({t.samples})"
        table.add_row(
            layer_id,
            layer.op,
            f"{layer.params:,}",
            trace,
            *(f"{getattr(layer, field).get(b, float('nan')):.2g}" for b in config.weight_bits),
        )
    output.console.print(table)
    pairs = {(p.a, p.b) for p in report.pairs}
    output.console.print(
        f"  {len(pairs)} layer pairs ({len(report.pairs)} width pairs); "
        f"wrote {out / 'sensitivity.json'}"
    )
    return 0


def _config(args: argparse.Namespace) -> Any:
    from dyadiq.passes.sensitivity.analysis import SensitivityConfig
    from dyadiq.passes.sensitivity.proxy import Proxy

    widths = tuple(int(b) for b in args.wbits.split(","))
    if args.proxy:
        proxy = Proxy.parse(args.proxy)
        fields = proxy.analysis_fields()
        fields["pairs"] = fields["pairs"] or args.pairs
        fields["gradients"] = fields["gradients"] or args.gradients
        # the trace proxy prices activation sites by their Hessian trace too
        fields["activation_trace"] = proxy.base is Proxy.TRACE
        return SensitivityConfig(weight_bits=widths, **fields)
    return SensitivityConfig(
        weight_bits=widths,
        pairs=args.pairs,
        gradients=args.gradients,
        activation_trace=args.activation_trace,
    )


def add_analyze(sub: Any) -> None:
    p = sub.add_parser("analyze", help="per-layer sensitivity to fewer bits (cached)")
    p.add_argument("model", nargs="?")
    p.add_argument("--zoo")
    p.add_argument("--calib")
    p.add_argument("--calib-preset")
    p.add_argument("--calib-limit", type=int, default=8, help="calibration samples (default 8)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--wbits", default="2,3,4,6,8", help="candidate weight widths")
    p.add_argument(
        "--proxy",
        choices=PROXY_CHOICES,
        help="compute only what this proxy needs (default: every proxy without reverse mode)",
    )
    p.add_argument(
        "--pairs",
        action="store_true",
        help="also the inter-layer pair terms at every width pair of 2,3,4 bits",
    )
    p.add_argument(
        "--no-pairs", action="store_true", help="no pair terms (the default; kept for scripts)"
    )
    p.add_argument(
        "--activation-trace",
        action="store_true",
        help="also each activation site's Hessian trace (HAWQ-V2; on with --proxy trace)",
    )
    p.add_argument("--output-kind", choices=["logits", "probabilities", "embedding"])
    p.add_argument(
        "--gradients",
        action="store_true",
        help="also top Hessian eigenvalue, Fisher diagonal and Taylor proxies (TVM reverse mode)",
    )
    add_executor_flags(p)
    p.set_defaults(func=cmd_analyze)
