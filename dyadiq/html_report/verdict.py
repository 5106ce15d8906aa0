"""The verdict at the top of report.html: which file to deploy where, sizes before and after,
quality against float, bit-exactness and every warning."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dyadiq.html_report.findings import QUALITY_DROP_WARNING, Finding, Quality
from dyadiq.html_report.markup import esc, facts_table, fmt_bytes
from dyadiq.html_report.run_outputs import REPORT_FILE, Written

FILE_USES = {
    "model.qdq.onnx": "onnxruntime (CPU/GPU) and other QDQ-aware runtimes: the fake-quantized "
    "graph the runtime turns into integer kernels; what the held-out metrics measured",
    "model.int.onnx": "onnxruntime, integer-only: every weighted layer an integer kernel "
    "with dyadic requantization, bit-exact with dyadiq's reference interpreter",
    "plan.json": "the per-layer formats: `dyadiq quantize --plan plan.json` rebuilds this model",
    "report.json": "everything on this page, as data",
    "frontier.json": "the measured Pareto frontier, as data",
    "frontier.png": "the Pareto frontier plot",
    "ort_quantize_static.qdq.onnx": "onnxruntime's own quantizer, for comparison only",
    REPORT_FILE: "this page",
}
TARGET_USES = {
    "x86": "TVM runtime on x86-64: load model.so with tvm.runtime (run_model.py shows how)",
    "aarch64": "TVM runtime on 64-bit Arm Linux: model.so cross-built for aarch64",
    "cortex-m": "Cortex-M firmware: the C sources (weights, kernels, arena) to build into it",
}


def deployment(report: Mapping[str, Any], files: Sequence[Written]) -> list[str]:
    """Which written file to deploy on which runtime, most specific first."""
    names = {f.name for f in files}
    advice = []
    target = report.get("target") or {}
    if target:
        kind = str(target.get("target", ""))
        family = "cortex-m" if kind.startswith("cortex-m") else kind
        artifact = target.get("library") or target.get("elf") or target.get("sources") or kind
        advice.append(
            f"<b>{esc(kind)}</b>: <code>{esc(kind)}/</code> "
            f"({esc(Path(str(artifact)).name)}): "
            + esc(TARGET_USES.get(family, "the compiled target"))
        )
    if "model.int.onnx" in names:
        advice.append(
            "<b>onnxruntime, integer-only</b>: <code>model.int.onnx</code> (bit-exact with the "
            "reference; what the target builds compile)"
        )
    if "model.qdq.onnx" in names:
        advice.append(
            "<b>onnxruntime / QDQ-aware runtimes</b>: <code>model.qdq.onnx</code> (fake-quantized: "
            "the runtime fuses its Q/DQ pairs into its own integer kernels)"
        )
    return advice


def verdict_section(
    report: Mapping[str, Any],
    files: Sequence[Written],
    quality: Sequence[Quality],
    warnings: Sequence[Finding],
) -> str:
    failed = any(w.error for w in warnings)
    state, badge = (
        ("failed", "verification failed")
        if failed
        else ("warned", f"{len(warnings)} warning(s)")
        if warnings
        else ("", "verified, no warnings")
    )
    facts: list[tuple[str, str]] = []
    advice = deployment(report, files)
    if advice:
        facts.append(("deploy", "<br>".join(advice)))
    facts.append(("size", _size_line(report)))
    if quality:
        lines = []
        for measured in quality:
            drop_class = "bad" if measured.drop > QUALITY_DROP_WARNING else "good"
            lines.append(
                f"{esc(measured.metric)} <b>{measured.value:.4f}</b> vs float "
                f'{measured.reference:.4f} (<span class="{drop_class}">'
                f"{-measured.drop * 100:+.2f} points</span>): {esc(measured.model)}"
            )
        samples = quality[0].samples
        if samples:
            lines.append(f'<span class="note">on {samples:,.0f} held-out samples</span>')
        facts.append(("quality", "<br>".join(lines)))
    facts.append(("bit-exactness", exactness_line(report)))
    items = "".join(
        f'<li class="{"error" if w.error else ""}">{esc(w.text)}</li>' for w in warnings
    )
    warning_html = f'<p><b>Warnings</b></p><ul class="warnings">{items}</ul>' if warnings else ""
    return (
        f'<section class="verdict {state}"><p><span class="badge">{esc(badge)}</span></p>'
        f"{facts_table(facts)}{warning_html}</section>"
    )


def _size_line(report: Mapping[str, Any]) -> str:
    sizes = report.get("sizes") or {}
    parts = []
    before = sizes.get("float_model_bytes")
    for key, label in (("qdq_model_bytes", "QDQ"), ("integer_model_bytes", "integer")):
        after = sizes.get(key)
        if before and after:
            parts.append(
                f"model file {fmt_bytes(before)} float &rarr; <b>{fmt_bytes(after)}</b> {label} "
                f"({before / after:.1f}&times; smaller)"
            )
    if sizes.get("quantized_weight_bytes_packed") is not None:
        parts.append(
            f"weights stored in {fmt_bytes(sizes['quantized_weight_bytes_packed'])} (codes of "
            "up to 4 bits two per byte, wider ones one per byte)"
        )
    allocation = report.get("allocation") or {}
    if allocation.get("weight_bytes") is not None:
        parts.append(
            f"{fmt_bytes(allocation['weight_bytes'])} at exactly each layer's bit width (the "
            f"allocation's accounting, budget {esc(allocation.get('budget', ''))})"
        )
    target = report.get("target") or {}
    for key, label in (("flash_bytes", "flash"), ("static_ram_bytes", "static RAM")):
        if target.get(key) is not None:
            parts.append(f"{esc(str(target.get('target')))} {label} {fmt_bytes(target[key])}")
    return "<br>".join(parts) or "not recorded"


def exactness_line(report: Mapping[str, Any]) -> str:
    parts = []
    integer = report.get("integer") or {}
    exact = integer.get("bit_exact_vs_reference")
    if exact:
        matched = exact.get("exact_tensors") == exact.get("tensors")
        parts.append(
            f'integer model: <span class="{"good" if matched else "bad"}">'
            f"{'bit-exact' if matched else 'NOT bit-exact'}</span> against the reference "
            f"interpreter on {exact.get('exact_tensors')}/{exact.get('tensors')} tensors"
        )
    target = report.get("target") or {}
    checked = target.get("bit_exact_vs_reference")
    if checked:
        matched = checked.get("exact") == checked.get("inputs")
        parts.append(
            f'{esc(str(target.get("target")))} build: <span class="{"good" if matched else "bad"}">'
            f"output codes equal on {checked.get('exact')}/{checked.get('inputs')} inputs</span>"
            + (
                f" (max code difference {checked['max_code_diff']})"
                if checked.get("max_code_diff")
                else ""
            )
        )
    if not parts:
        return (
            '<span class="note">not checked: this run wrote no integer model '
            "(add <code>--integer</code> or <code>--target</code>)</span>"
        )
    return "<br>".join(parts)
