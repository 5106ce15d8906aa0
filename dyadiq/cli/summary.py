"""The lines ``dyadiq quantize`` prints when it is done: what was quantized, how the integer
model and the target build checked against the reference, what verification found, the
held-out metrics and the files written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from dyadiq.cli import output


def print_summary(report: dict[str, Any], plan: dict[str, Any], out: Path) -> None:
    sizes = report["sizes"]
    output.console.print(
        f"[bold green]quantized[/] {report['source']}: "
        f"{len(plan['layers'])} layers, {report['quantized_activation_tensors']} activation "
        f"tensors in {report['scale_groups']} scale groups, "
        f"{report['calibration_batches']} calibration batches"
    )
    output.console.print(
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
        output.console.print(
            f"  integer model: {'fully integer' if integer['fully_integer'] else 'float ops: '}"
            f"{', '.join(integer['float_ops'])}; {verdict} vs reference on "
            f"{exact.get('exact_tensors', 0)}/{exact.get('tensors', 0)} tensors; QDQ vs "
            "integer max "
            + (f"{lsb:.1f} LSB" if lsb is not None else "n/a (no integer outputs)")
            + f", top-1 agreement {output.fmt(agreement.get('top1_agreement_qdq_vs_integer'))}"
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
        output.console.print(
            f"  target {target['target']}: {checked}"
            + (f"; {', '.join(extras)}" if extras else "")
            + f" -> {out / target['target']}"
        )
    verification = report.get("verification", {})
    for problem in verification.get("problems", []):
        label = "warning (--allow-mismatch)" if verification.get("mismatch_allowed") else "FAILED"
        output.console.print(f"  [bold red]verification {label}:[/] {escape(problem)}")
    if report["float_layers"]:
        kept = ", ".join(f["id"] for f in report["float_layers"])
        output.console.print(f"  kept in float: {kept}")
    metrics = report.get("metrics")
    if metrics:
        output.console.print(output.metrics_table(metrics))
    written = ["model.qdq.onnx", "plan.json", "report.json", "report.html"]
    if integer:
        written.insert(1, "model.int.onnx")
    output.console.print(f"  wrote {', '.join(str(out / name) for name in written)}")
