"""What ``dyadiq quantize`` prints when it is done: a verdict a user can act on.

In order: what was quantized; one size accounting (the model file before and after, and the
weights as stored; an allocation's own figure, weights at their bit-widths, is labelled as
that); quality against float with its metric and a judgement; bit-exactness with a
judgement (41/44 is a failure, not a number); every warning; the held-out metrics table; and
the files written with the runtime each one is for. Every figure carries its unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.markup import escape

from dyadiq.cli import output

# Quality drop against float (percentage points of the metric) that the verdict calls
# "close to float"; beyond it the summary says "drops", beyond 5x it says "large drop".
CLOSE_DROP_PT = 0.5

# Top-1 agreement with float (models without labels) that the verdict calls "close to float".
CLOSE_AGREEMENT = 0.99

# What to deploy where, by the role of the file (dyadiq.api's paths).
DEPLOY = {
    "qdq": "onnxruntime (CPU / GPU) or any ONNX runtime with QDQ support",
    "integer": "integer-only ONNX (ConvInteger / MatMulInteger + dyadic rescale); onnxruntime",
    "ort_baseline": "onnxruntime quantize_static's model, for comparison only",
}


def print_summary(report: dict[str, Any], plan: dict[str, Any], paths: Mapping[str, Path]) -> None:
    """The closing lines of a quantize run (``paths``: the files written, by role)."""
    say = output.console.print
    warnings: list[str] = []
    formats = sorted({layer["format"] for layer in plan["layers"].values()})
    say(
        f"[bold green]quantized[/] {escape(report['source'])}: {len(plan['layers'])} layers "
        f"({', '.join(formats)}), {report['quantized_activation_tensors']} activation tensors "
        f"in {report['scale_groups']} scale groups, {_count(report['calibration_batches'])}, "
        f"{report['timings']['total_s']:.1f} s"
    )
    for line in _size_lines(report):
        say(f"  {line}")
    for line in _held_out_lines(report):
        say(f"  {line}")
    quality = _quality_line(report.get("metrics"), warnings)
    if quality:
        say(f"  {quality}")
    for line in _exactness_lines(report, paths, warnings):
        say(f"  {line}")
    excluded = [f["id"] for f in report["float_layers"] if f["reason"] == "excluded by the plan"]
    for layer in report["float_layers"]:
        if layer["id"] not in excluded:  # dyadiq's decision, not the user's
            warnings.append(f"layer {layer['id']} kept in float ({layer['reason']})")
    for warning in warnings:
        say(f"  [bold yellow]warning:[/] {escape(warning)}")
    if excluded:
        say(f"  note: kept in float as asked (--exclude / plan): {escape(', '.join(excluded))}")
    bound = report.get("bound_inputs") or {}
    if bound:  # the written models take the other inputs only
        values = ", ".join(f"{k}={v}" for k, v in bound.items())
        say(
            f"  note: inputs bound to constants (--bind), not inputs of the written models: "
            f"{escape(values)}"
        )
    verification = report.get("verification", {})
    for problem in verification.get("problems", []):
        allowed = verification.get("mismatch_allowed")
        label = "warning (--allow-mismatch)" if allowed else "verification FAILED"
        say(f"  [bold red]{label}:[/] {escape(problem)}")
    metrics = report.get("metrics")
    if metrics:
        say(output.metrics_table(metrics))
    _print_files(report, paths, say)


def _count(batches: int) -> str:
    return f"{batches} calibration batch" + ("" if batches == 1 else "es")


def _size_lines(report: dict[str, Any]) -> list[str]:
    """Sizes, every one in bytes with what it counts."""
    sizes = report["sizes"]
    before, after = sizes["float_model_bytes"], sizes["qdq_model_bytes"]
    ratio = f" ({before / after:.1f}x smaller)" if after else ""
    lines = [
        f"size: model file {before:,} B float -> {after:,} B QDQ{ratio}; weights "
        f"{sizes['quantized_weight_bytes_packed']:,} B as stored (int8 codes, int4 two per byte)"
    ]
    allocation = report.get("allocation")
    if allocation and allocation.get("weight_bytes") is not None:
        chooser = (
            f"--budget {allocation['budget']}"
            if "budget" in allocation
            else _max_drop_text(allocation)
        )
        extra = _resource_text(allocation)
        lines.append(
            f"allocation ({chooser}): {allocation['weight_bytes']:,.0f} B of weights counted at "
            "their bit-widths (params x bits / 8, what budgets count; the stored figure above "
            f"rounds 3-bit up to int4 and 6-bit to int8){extra}"
        )
    return lines


def _max_drop_text(allocation: dict[str, Any]) -> str:
    """``--max-drop 0.5%: within 0.5 points of float accuracy``: a fraction metric's drop in
    points, any other (a callback's) in its own units."""
    given = allocation["max_drop"]
    drop = float(allocation.get("drop", given if not isinstance(given, str) else 0.0))
    units = (allocation.get("metric_info") or {}).get("units", "fraction of 1")
    amount = f"{drop * 100:g} points" if units == "fraction of 1" else f"{drop:.4g}"
    head = f"--max-drop {given}" if isinstance(given, str) else "--max-drop"
    return f"{head}: within {amount} of float {allocation.get('metric', '')}"


def _held_out_lines(report: dict[str, Any]) -> list[str]:
    """Which data chose the plan and which data the quality figures come from (a plan is
    chosen on one split and reported on another), and what the search's metric means."""
    held_out = report.get("held_out") or {}
    allocation = report.get("allocation") or {}
    lines = []
    search = held_out.get("search")
    if search and "plan_metric" in allocation:
        metric = held_out.get("metric") or allocation.get("metric_info") or {}
        samples = f" ({search['samples']:,} samples)" if search.get("samples") else ""
        lines.append(
            f"plan chosen on {search['source']}{samples}: {allocation['metric']} "
            f"{allocation['plan_metric']:.4f} vs float {allocation['float_metric']:.4f}, "
            f"allowed {allocation['threshold']:.4f} ({metric.get('meaning', '')}; "
            f"{metric.get('units', '')})"
        )
    report_split = held_out.get("report")
    if report_split:
        samples = f" ({report_split['samples']:,} samples)" if report_split.get("samples") else ""
        lines.append(f"quality reported on {report_split['source']}{samples}")
    if held_out.get("note"):
        lines.append(f"note: {held_out['note']}")
    return lines


def _resource_text(allocation: dict[str, Any]) -> str:
    parts = []
    if allocation.get("latency") is not None:
        measured = "table" in str(allocation.get("latency_source", "")).lower()
        unit = "ms (measured table)" if measured else "MAC x bit units (relative cost model)"
        parts.append(f"latency {allocation['latency']:,.4g} {unit}")
    if allocation.get("flash_bytes") is not None:
        parts.append(f"flash {allocation['flash_bytes']:,.0f} B")
    if allocation.get("peak_ram_bytes") is not None:
        parts.append(f"peak RAM {allocation['peak_ram_bytes']:,.0f} B")
    if allocation.get("predicted_damage") is not None:
        parts.append(f"predicted damage {allocation['predicted_damage']:.4g} (loss units)")
    return "; " + ", ".join(parts) if parts else ""


def _quality_line(metrics: dict[str, dict[str, float]] | None, warnings: list[str]) -> str:
    """The first quantized model against float on its headline metric, with a judgement (and
    onnxruntime's quantizer beside it when it was run)."""
    if not metrics or "float" not in metrics:
        return ""
    names = [n for n in metrics if n != "float" and not n.startswith("onnxruntime")]
    baselines = [n for n in metrics if n.startswith("onnxruntime quantize_static")]
    if not names:
        return ""
    model = metrics[names[0]]
    samples = int(model.get("samples", 0))
    if "accuracy" in model:
        return _accuracy_line(metrics, names[0], baselines, warnings)
    if "evaluate" in model and "top1_agreement" not in model and "mean_cosine" not in model:
        return (
            f"quality (your evaluate callback): {model['evaluate']:.4f} vs float "
            f"{metrics['float'].get('evaluate', float('nan')):.4f}"
        )
    if "mean_abs_error_rel" in model and "top1_agreement" not in model:
        return (
            f"quality: outputs differ from float's by {model['mean_abs_error_rel']:.2%} of "
            f"float's output range on average, on {samples:,} held-out samples"
        )
    # No labels: the quantized model is judged by how often its top-1 answer is float's.
    for metric, what in (("top1_agreement", "top-1 answers"), ("mean_cosine", "mean cosine")):
        if metric not in model:
            continue
        value = float(model[metric])
        beside = "".join(
            f"; {b}: {metrics[b][metric]:.2%}" for b in baselines if metric in metrics[b]
        )
        if value >= CLOSE_AGREEMENT:
            verdict = "[green]close to float[/]"
        else:
            better = all(value >= metrics[b].get(metric, 1.0) for b in baselines) and baselines
            verdict = "[yellow]differs from float[/]" + (
                " (better than onnxruntime's quantizer)" if better else ""
            )
            warnings.append(f"{what} differ from float's on {1 - value:.2%} of the samples")
        shown = (
            f"agree with float's on {value:.2%}"
            if metric == "top1_agreement"
            else (f"{value:.4f} against float")
        )
        return (
            f"quality (no labels): {what} {shown} of {samples:,} held-out samples{beside}: "
            f"{verdict}"
        )
    return ""


def _accuracy_line(
    metrics: dict[str, dict[str, float]], name: str, baselines: list[str], warnings: list[str]
) -> str:
    model = metrics[name]
    reference = metrics["float"]["accuracy"]
    drop_pt = (reference - model["accuracy"]) * 100
    samples = int(model.get("samples", 0))
    noise_pt = _noise_points(model, "accuracy", samples)
    spread = f" ± {noise_pt:.2f}, 95%" if noise_pt is not None else ""
    beside = "".join(f"; {b}: {metrics[b]['accuracy']:.4f}" for b in baselines)
    if drop_pt <= CLOSE_DROP_PT:
        verdict = "[green]close to float[/]"
    elif noise_pt is not None and drop_pt <= noise_pt:
        verdict = "[yellow]within sampling noise of float[/] (more samples would tell)"
    else:
        verdict = "[bold red]large drop[/]" if drop_pt > 5 * CLOSE_DROP_PT else "[yellow]drops[/]"
        warnings.append(f"accuracy drops {drop_pt:.2f} points against float")
    return (
        f"quality: accuracy {model['accuracy']:.4f} vs float {reference:.4f} "
        f"({-drop_pt:+.2f} points{spread}) on {samples:,} held-out samples{beside}: {verdict}"
    )


def _noise_points(model: Mapping[str, float], metric: str, samples: int) -> float | None:
    """Half-width of a 95% interval of the accuracy difference, in points. The models are
    scored on the same samples, and a sample moves the difference only where their top-1
    answers differ, so its per-sample variance is at most the disagreement rate."""
    if metric != "accuracy" or "top1_agreement" not in model or samples < 1:
        return None
    disagreement = max(0.0, 1.0 - float(model["top1_agreement"]))
    return 196.0 * (disagreement / samples) ** 0.5


def _exactness_lines(
    report: dict[str, Any], paths: Mapping[str, Path], warnings: list[str]
) -> list[str]:
    lines = []
    integer = report.get("integer")
    if integer:
        exact = integer.get("bit_exact_vs_reference", {})
        n, ok = exact.get("tensors", 0), exact.get("exact_tensors", 0)
        if not n:
            verdict = "[yellow]not checked[/] (no check batches)"
        elif ok == n:
            verdict = f"[green]bit-exact[/] vs the reference on all {n} tensors"
        else:
            verdict = f"[bold red]NOT bit-exact[/]: {n - ok} of {n} tensors differ"
        islands = integer["float_ops"]
        kind = "fully integer" if not islands else f"float islands: {', '.join(islands)}"
        lines.append(f"integer model ({kind}): {verdict}")
        agreement = integer.get("qdq_vs_integer", {})
        lsb = agreement.get("max_output_diff_lsb")
        if lsb is not None:
            lines.append(
                f"QDQ vs integer model: outputs differ by at most {lsb:.1f} LSB (output codes), "
                f"top-1 agreement {output.fmt(agreement.get('top1_agreement_qdq_vs_integer'))}: "
                + _lsb_verdict(lsb, bool(islands), warnings)
            )
    target = report.get("target")
    if target:
        lines.append(_target_line(target, paths))
    return lines


def _lsb_verdict(lsb: float, islands: bool, warnings: list[str]) -> str:
    """The QDQ simulator rounds in float, the integer model with dyadic multipliers: a code
    or two apart is the expected rounding difference; more is worth a look."""
    if lsb <= 2:
        return "[green]agree[/] (rounding differences only)"
    why = "float islands round differently" if islands else "dyadic requantization error"
    warnings.append(f"QDQ and integer outputs differ by up to {lsb:.1f} LSB ({why})")
    return f"[yellow]differ[/] ({why}; compare their metrics above)"


def _target_line(target: dict[str, Any], paths: Mapping[str, Path]) -> str:
    exact = target.get("bit_exact_vs_reference")
    if exact:
        same = exact["exact"] == exact["inputs"]
        verdict = "[green]bit-exact[/]" if same else "[bold red]NOT bit-exact[/]"
        checked = (
            f"{verdict}: output codes equal to the reference's on {exact['exact']}/"
            f"{exact['inputs']} inputs"
        )
        if target.get("code_tolerance"):
            checked += (
                f" (float islands: within {exact['max_code_diff']} codes"
                + (
                    f", float outputs within {exact['max_float_diff_of_range']:.3%} of range"
                    if "max_float_diff_of_range" in exact
                    else ""
                )
                + f"; tolerance {target['code_tolerance']} codes)"
            )
    else:
        checked = f"[yellow]not run here[/]: {target.get('ran_on', target.get('built', ''))}"
    figures = {
        "flash_bytes": "flash {:,} B",
        "arena_bytes": "arena {:,} B",
        "instructions_per_inference": "{:,} instructions per inference",
    }
    extras = [text.format(target[key]) for key, text in figures.items() if key in target]
    return f"target {target['target']}: {checked}" + (f"; {', '.join(extras)}" if extras else "")


def _print_files(report: dict[str, Any], paths: Mapping[str, Path], say: Any) -> None:
    """Which file to deploy for which runtime, then the rest."""
    say("  deploy:")
    qdq_for = DEPLOY["qdq"]
    if report.get("qdq_style") == "tensorrt":
        qdq_for = "TensorRT (explicit quantization: trtexec --onnx=... --stronglyTyped)"
    roles = {"qdq": qdq_for, **{k: v for k, v in DEPLOY.items() if k != "qdq"}}
    target = report.get("target")
    if target and "target" in paths:
        roles["target"] = _target_use(str(target["target"]), paths["target"])
    for role, use in roles.items():
        if role in paths:
            say(f"    {escape(str(paths[role]))}  {escape(use)}")
    rest = [paths[r] for r in ("plan", "report", "report_html") if r in paths]
    say(f"  also wrote {', '.join(escape(str(p)) for p in rest)}")


def _target_use(name: str, folder: Path) -> str:
    if name.startswith("cortex-m"):
        return f"C sources (+ Makefile, app.elf) for {name}: build into your firmware"
    return f"TVM library for {name}: `dyadiq run {folder} --input x.npy` or run_model.py"
