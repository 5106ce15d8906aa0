"""``OUT/report.html``: one self-contained page (inline CSS, inline SVG figures, no network) that
reads what a run already wrote, report.json and plan.json, plus the sensitivity analysis and
the measured frontier where they exist.

The page opens with a verdict (which file to deploy on which runtime, size before and after,
quality against float, bit-exactness, every warning), then the per-layer table, the sensitivity
chart, the Pareto frontier and the verification details. Each number carries its unit.

Sensitivity error bars: the empirical damage is one mean over the calibration batches (the
analysis keeps no per-batch spread), so the bars are those of the Hessian-trace estimate,
1/2 Tr(H)/n ||dW||^2, whose Hutchinson standard error the analysis does keep.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyadiq import plots
from dyadiq.io import write_text_atomic

REPORT_FILE = "report.html"
# held-out metrics, most telling first: the zoo's primary metric (ZooModel.primary_metric)
HEADLINE_METRICS = ("mean_cosine", "accuracy", "top1_agreement")
QUALITY_DROP_WARNING = 0.01  # an absolute drop of the headline metric worth a warning (1 point)

_FILE_USES = {
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
_TARGET_USES = {
    "x86": "TVM runtime on x86-64: load model.so with tvm.runtime (run_model.py shows how)",
    "aarch64": "TVM runtime on 64-bit Arm Linux: model.so cross-built for aarch64",
    "cortex-m": "Cortex-M firmware: the C sources (weights, kernels, arena) to build into it",
}

_CSS = """
:root { --ok: #1a7f37; --bad: #b42318; --warn: #9a6700; --line: #d0d7de; --muted: #57606a; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
  max-width: 62rem; margin: 0 auto; padding: 0 1rem 3rem; }
h1 { font-size: 1.45rem; margin: 1.2rem 0 0.3rem; overflow-wrap: anywhere; }
h2 { font-size: 1.15rem; margin: 2rem 0 0.5rem; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 1rem; overflow-wrap: anywhere; }
.verdict { border: 2px solid var(--ok); border-radius: 8px; padding: 0.6rem 1rem; }
.verdict.failed { border-color: var(--bad); }
.verdict.warned { border-color: var(--warn); }
.badge { display: inline-block; font-weight: 700; padding: 0.05rem 0.5rem; border-radius: 4px;
  color: white; background: var(--ok); }
.failed .badge { background: var(--bad); } .warned .badge { background: var(--warn); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem;
  margin: 0.6rem 0; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.good { color: var(--ok); font-weight: 600; } .bad { color: var(--bad); font-weight: 600; }
.warn { color: var(--warn); font-weight: 600; }
ul.warnings li { color: var(--warn); } ul.warnings li.error { color: var(--bad); }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.86rem; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 0.2rem 0.5rem; text-align: left;
  vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; }
td.num, th.num { text-align: right; white-space: nowrap; }
tr.total td { font-weight: 600; border-top: 2px solid var(--line); }
code { font-size: 0.86em; overflow-wrap: anywhere; }
td code { white-space: nowrap; }
.fmt { display: inline-block; min-width: 3.6em; text-align: center; color: white;
  border-radius: 3px; padding: 0 0.3em; font-weight: 600; }
figure { margin: 1rem 0; }
figure svg { width: 100%; max-width: 48rem; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 0.86rem; }
.note { color: var(--muted); font-size: 0.9rem; }
@media (max-width: 720px) {
  body { font-size: 14px; padding: 0 0.5rem 2rem; }
  dl.facts { grid-template-columns: 1fr; } dl.facts dd { margin-bottom: 0.4rem; }
  th, td { padding: 0.15rem 0.3rem; }
}
"""


def write_report_html(
    out_dir: Path,
    report: Mapping[str, Any],
    *,
    plan: Mapping[str, Any] | None = None,
    sensitivity: Any = None,
    frontier: Mapping[str, Any] | None = None,
    metric_name: str | None = None,
) -> Path:
    """Write ``out_dir/report.html`` for a finished run and return its path.

    ``report``: report.json's content. ``plan``: plan.json's (read from ``out_dir`` when not
    given). ``sensitivity``: a ``SensitivityReport`` or its JSON; when None, the analysis
    cache entry named by ``report["allocation"]["sensitivity_fingerprint"]`` if there is one.
    ``frontier``: frontier.json's content (``{"metric", "points"}``); when None,
    ``out_dir/frontier.json`` if present. ``metric_name``: the headline metric (default: the
    frontier's, else the first of :data:`HEADLINE_METRICS` the run measured).
    """
    out_dir = Path(out_dir)
    if plan is None and (out_dir / "plan.json").is_file():
        plan = json.loads((out_dir / "plan.json").read_text())
    if sensitivity is None:
        sensitivity = cached_sensitivity(report)
    elif hasattr(sensitivity, "to_json"):
        sensitivity = sensitivity.to_json()
    if frontier is None and (out_dir / "frontier.json").is_file():
        frontier = json.loads((out_dir / "frontier.json").read_text())
    page = render_report_html(
        report,
        plan=plan or {},
        sensitivity=sensitivity,
        frontier=frontier,
        files=written_files(out_dir),
        layer_latency_ms=measured_layer_latency(out_dir, report),
        metric_name=metric_name,
    )
    path = out_dir / REPORT_FILE
    write_text_atomic(path, page)
    return path


def cached_sensitivity(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The sensitivity report the allocation priced its plan with, from the analysis cache
    (its JSON), or None when the run had no allocation or the entry is gone."""
    key = (report.get("allocation") or {}).get("sensitivity_fingerprint")
    if not key:
        return None
    from dyadiq.passes.sensitivity import cache

    loaded = cache.load(str(key))
    return loaded.to_json() if loaded is not None else None


@dataclass(frozen=True)
class Written:
    """One entry of the output folder: a file, or a folder (a target's build) as a whole."""

    name: str  # relative; a folder's ends with "/"
    bytes: int
    files: int = 1


def written_files(out_dir: Path) -> list[Written]:
    """What the run wrote: each top-level file, and each folder with its file count and total
    size (a Cortex-M build holds dozens of objects), report.html itself excluded."""
    found = []
    for path in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if path.name.startswith(".") or path.name == REPORT_FILE:
            continue
        if path.is_dir():
            inside = [p for p in path.rglob("*") if p.is_file()]
            found.append(
                Written(f"{path.name}/", sum(p.stat().st_size for p in inside), len(inside))
            )
        elif path.is_file():
            found.append(Written(path.name, path.stat().st_size))
    return found


def measured_layer_latency(out_dir: Path, report: Mapping[str, Any]) -> dict[str, float]:
    """Per-layer kernel latency in ms at the plan's formats, where it was measured: the
    target's ``layer_latency.json`` (``--layer-latency``), else an allocation that read a
    measured ``--latency-table``. Empty when only the cost model priced latency."""
    target = report.get("target") or {}
    table_path = out_dir / str(target.get("target", "")) / "layer_latency.json"
    formats = {
        k: v.get("format") for k, v in (report.get("allocation") or {}).get("layers", {}).items()
    }
    formats |= {layer["id"]: layer.get("format") for layer in report.get("layers", [])}
    if target and table_path.is_file():
        data = json.loads(table_path.read_text())
        rows = data.get("layers", data) if isinstance(data, Mapping) else {}
        return {
            layer: float(row[formats[layer]])
            for layer, row in rows.items()
            if isinstance(row, Mapping) and formats.get(layer) in row
        }
    allocation = report.get("allocation") or {}
    if allocation.get("latency_source") == "measured table":
        return {
            layer: float(row["latency"])
            for layer, row in allocation.get("layers", {}).items()
            if row.get("latency") is not None
        }
    return {}


# ---------------------------------------------------------------------------------------------
# What the page says, computed from the report (no HTML here)


@dataclass(frozen=True)
class Finding:
    text: str
    error: bool = False  # failed verification, not merely worth a look


@dataclass(frozen=True)
class Quality:
    metric: str
    model: str
    value: float
    reference: float
    samples: float | None

    @property
    def drop(self) -> float:
        return self.reference - self.value


def headline_quality(report: Mapping[str, Any], metric_name: str | None) -> list[Quality]:
    """Each of dyadiq's evaluated models (onnxruntime's own quantizer, a comparison, left out)
    on the headline metric against float's; empty when the run measured none."""
    metrics = report.get("metrics") or {}
    reference = metrics.get("float")
    models = [m for m in metrics if m != "float" and not m.startswith("onnxruntime")]
    if not reference or not models:
        return []
    candidates = [metric_name] if metric_name else list(HEADLINE_METRICS)
    candidates += [k for k in reference if k != "samples"]
    name = next((c for c in candidates if c in reference and c in metrics[models[0]]), None)
    if name is None:
        return []
    return [
        Quality(
            name,
            model,
            float(metrics[model][name]),
            float(reference[name]),
            metrics[model].get("samples"),
        )
        for model in models
        if name in metrics[model]
    ]


def warnings_of(report: Mapping[str, Any], quality: Sequence[Quality]) -> list[Finding]:
    """Everything in the report a user should look at before shipping, worst first."""
    found: list[Finding] = []
    verification = report.get("verification") or {}
    for problem in verification.get("problems", []):
        allowed = verification.get("mismatch_allowed")
        found.append(
            Finding(
                f"verification {'accepted with --allow-mismatch' if allowed else 'FAILED'}: "
                f"{problem}",
                error=not allowed,
            )
        )
    integer = report.get("integer") or {}
    agreement = integer.get("qdq_vs_integer") or {}
    lsb = agreement.get("max_output_diff_lsb")
    integer_evaluated = any(m.endswith(" integer") for m in report.get("metrics") or {})
    if lsb is not None and lsb > 1:
        found.append(
            Finding(
                f"the QDQ model and the integer model (what ships) differ by up to {lsb:.1f} "
                "output LSB, beyond rounding; top-1 agreement "
                f"{_pct(agreement.get('top1_agreement_qdq_vs_integer'))}"
                + (
                    ": see the integer model's own metrics below"
                    if integer_evaluated
                    else ": the QDQ model's metrics may not hold for model.int.onnx"
                )
            )
        )
    if integer.get("float_ops"):
        found.append(
            Finding(
                "the integer model keeps float ops (float islands): "
                + ", ".join(integer["float_ops"])
            )
        )
    for layer in report.get("float_layers", []):
        found.append(Finding(f"layer {layer['id']} kept in float: {layer.get('reason', '')}"))
    for measured in quality:
        if measured.drop > QUALITY_DROP_WARNING:
            found.append(
                Finding(
                    f"{measured.metric} of {measured.model} drops {measured.drop * 100:.2f} "
                    f"points against float ({measured.value:.4f} vs {measured.reference:.4f})"
                )
            )
    if not report.get("metrics"):
        found.append(
            Finding("no held-out evaluation in this run: quality against float is not known")
        )
    allocation = report.get("allocation") or {}
    if allocation and not allocation.get("proven_optimal", True):
        found.append(Finding("the allocation's ILP stopped before proving its plan optimal"))
    return found


def notes_of(report: Mapping[str, Any], sensitivity: Mapping[str, Any] | None) -> list[str]:
    """Facts worth knowing that are not problems: rewrites, declined compensation, estimates."""
    notes = list(report.get("notes", []))
    for rewrite in report.get("rewrites", []):
        nodes_by_reason: dict[str, list[str]] = {}
        for skipped in rewrite.get("skipped", []):
            nodes_by_reason.setdefault(str(skipped.get("reason")), []).append(
                str(skipped.get("node"))
            )
        for reason, nodes in nodes_by_reason.items():  # one line per reason, not per node
            example = f" (e.g. {nodes[0]})" if len(nodes) > 1 else f" ({nodes[0]})"
            notes.append(f"{rewrite['pass']} skipped {len(nodes)} node(s){example}: {reason}")
    compensation = report.get("compensation") or {}
    declined: dict[tuple[str, str, str], list[str]] = {}
    for layer, widths in (compensation.get("layers") or {}).items():
        for bits, entry in widths.items():
            for step, reason in (entry.get("declined") or {}).items():
                declined.setdefault((str(step), str(bits), str(reason)), []).append(layer)
    for (step, bits, reason), layers in declined.items():  # one line per reason
        which = layers[0] if len(layers) == 1 else f"{len(layers)} layers, e.g. {layers[0]}"
        notes.append(f"compensation {step} declined at W{bits} for {which}: {reason}")
    notes += [str(n) for n in (sensitivity or {}).get("notes", [])]
    allocation = report.get("allocation") or {}
    for source in ("latency_source", "flash_source", "ram_source"):
        if allocation.get(source):
            notes.append(f"allocation {source.removesuffix('_source')}: {allocation[source]}")
    target = report.get("target") or {}
    if target.get("code_tolerance"):
        notes.append(
            f"target check allows {target['code_tolerance']} output codes of difference "
            "(float islands round differently on the target)"
        )
    return notes


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
            f"<b>{_e(kind)}</b>: <code>{_e(kind)}/</code> "
            f"({_e(Path(str(artifact)).name)}): "
            + _e(_TARGET_USES.get(family, "the compiled target"))
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


# ---------------------------------------------------------------------------------------------
# HTML


def render_report_html(
    report: Mapping[str, Any],
    *,
    plan: Mapping[str, Any],
    sensitivity: Mapping[str, Any] | None = None,
    frontier: Mapping[str, Any] | None = None,
    files: Sequence[Written] = (),
    layer_latency_ms: Mapping[str, float] | None = None,
    metric_name: str | None = None,
) -> str:
    """The page as a string (see :func:`write_report_html` for the arguments)."""
    metric = (
        metric_name
        or (frontier or {}).get("metric")
        or (report.get("allocation") or {}).get("metric")  # --max-drop's
    )
    quality = headline_quality(report, metric)
    warnings = warnings_of(report, quality)
    layers = layer_rows(report, plan, sensitivity)
    source = str(report.get("source", "model"))
    sections = [
        f"<h1>dyadiq report: {_e(Path(source).name)}</h1>",
        f'<p class="sub">{_e(source)}</p>',
        _verdict_section(report, files, quality, warnings),
        _files_section(report, files),
        _quality_section(report),
        _layers_section(report, layers, layer_latency_ms or {}),
        _sensitivity_section(layers, sensitivity, report),
        _frontier_section(frontier, report),
        _verification_section(report),
        _notes_section(notes_of(report, sensitivity)),
        _run_section(report),
    ]
    body = "\n".join(s for s in sections if s)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>dyadiq report: {_e(Path(source).name)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _verdict_section(
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
                f"{_e(measured.metric)} <b>{measured.value:.4f}</b> vs float "
                f'{measured.reference:.4f} (<span class="{drop_class}">'
                f"{-measured.drop * 100:+.2f} points</span>): {_e(measured.model)}"
            )
        samples = quality[0].samples
        if samples:
            lines.append(f'<span class="note">on {samples:,.0f} held-out samples</span>')
        facts.append(("quality", "<br>".join(lines)))
    facts.append(("bit-exactness", _exactness_line(report)))
    items = "".join(f'<li class="{"error" if w.error else ""}">{_e(w.text)}</li>' for w in warnings)
    warning_html = f'<p><b>Warnings</b></p><ul class="warnings">{items}</ul>' if warnings else ""
    return (
        f'<section class="verdict {state}"><p><span class="badge">{_e(badge)}</span></p>'
        f"{_facts(facts)}{warning_html}</section>"
    )


def _size_line(report: Mapping[str, Any]) -> str:
    sizes = report.get("sizes") or {}
    parts = []
    before = sizes.get("float_model_bytes")
    for key, label in (("qdq_model_bytes", "QDQ"), ("integer_model_bytes", "integer")):
        after = sizes.get(key)
        if before and after:
            parts.append(
                f"model file {_bytes(before)} float &rarr; <b>{_bytes(after)}</b> {label} "
                f"({before / after:.1f}&times; smaller)"
            )
    if sizes.get("quantized_weight_bytes_packed") is not None:
        parts.append(
            f"weights stored in {_bytes(sizes['quantized_weight_bytes_packed'])} (codes of "
            "up to 4 bits two per byte, wider ones one per byte)"
        )
    allocation = report.get("allocation") or {}
    if allocation.get("weight_bytes") is not None:
        parts.append(
            f"{_bytes(allocation['weight_bytes'])} at exactly each layer's bit width (the "
            f"allocation's accounting, budget {_e(allocation.get('budget', ''))})"
        )
    target = report.get("target") or {}
    for key, label in (("flash_bytes", "flash"), ("static_ram_bytes", "static RAM")):
        if target.get(key) is not None:
            parts.append(f"{_e(str(target.get('target')))} {label} {_bytes(target[key])}")
    return "<br>".join(parts) or "not recorded"


def _exactness_line(report: Mapping[str, Any]) -> str:
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
            f'{_e(str(target.get("target")))} build: <span class="{"good" if matched else "bad"}">'
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


def _files_section(report: Mapping[str, Any], files: Sequence[Written]) -> str:
    if not files:
        return ""
    target = str((report.get("target") or {}).get("target", ""))
    family = "cortex-m" if target.startswith("cortex-m") else target
    rows = []
    for entry in files:
        use = _FILE_USES.get(entry.name, "")
        if target and entry.name == f"{target}/":
            use = _TARGET_USES.get(family, f"the {target} build")
        count = f" ({entry.files} files)" if entry.name.endswith("/") else ""
        rows.append(
            f"<tr><td><code>{_e(entry.name)}</code>{count}</td>"
            f'<td class="num">{_bytes(entry.bytes)}</td><td>{_e(use)}</td></tr>'
        )
    return (
        '<h2>Files written</h2><div class="scroll"><table><tr><th>file</th>'
        f'<th class="num">size</th><th>use</th></tr>{"".join(rows)}</table></div>'
    )


def _quality_section(report: Mapping[str, Any]) -> str:
    metrics = report.get("metrics") or {}
    if not metrics:
        return ""
    models = list(metrics)
    names = [k for k in metrics[models[0]] if k != "samples"]
    head = "".join(f'<th class="num">{_e(m)}</th>' for m in models)
    rows = []
    reference = metrics.get("float", {})
    for name in names:
        cells = []
        for model in models:
            value = metrics[model].get(name)
            delta = ""
            if model != "float" and value is not None and name in reference:
                delta = f' <span class="note">({(value - reference[name]) * 100:+.2f})</span>'
            cells.append(f'<td class="num">{_num(value)}{delta}</td>')
        rows.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}</tr>")
    samples = metrics[models[0]].get("samples")
    caption = (
        f"Held-out data{f', {samples:,.0f} samples' if samples else ''}; metrics are fractions "
        "(1 = identical to float / all correct); in brackets the difference from float in "
        "points (hundredths)."
    )
    return (
        f'<h2>Quality against float</h2><div class="scroll"><table><tr><th>metric</th>{head}</tr>'
        f'{"".join(rows)}</table></div><p class="note">{caption}</p>'
    )


@dataclass(frozen=True)
class LayerRow:
    id: str
    op: str
    params: int
    format: str
    weight_bits: int | None  # None: kept in float
    runs_as: str
    weight_damage: float | None  # the analysis' proxy at the plan's weight width
    act_damage: float | None  # the layer's input activation alone at the plan's width
    priced_damage: float | None  # what the allocation's ILP charged (weights + activation)
    other_widths: Mapping[int, float]  # weight damage at every analysed width
    estimate: float | None  # Hessian-trace estimate of the weight damage
    estimate_stderr: float | None
    weight_bytes: float | None
    error_reduction: str  # compensation: weight error after / before, with the passes

    @property
    def damage(self) -> float | None:
        """The bar of the sensitivity chart: weight damage, else the allocation's price."""
        return self.weight_damage if self.weight_damage is not None else self.priced_damage


def layer_rows(
    report: Mapping[str, Any],
    plan: Mapping[str, Any],
    sensitivity: Mapping[str, Any] | None,
) -> list[LayerRow]:
    """One row per weighted layer, in graph order, joining report, plan and sensitivity."""
    allocation = report.get("allocation") or {}
    priced = allocation.get("layers") or {}
    field = _damage_field(allocation.get("proxy"), sensitivity)
    analysed = (sensitivity or {}).get("layers") or {}
    floats = {f["id"]: f.get("reason", "") for f in report.get("float_layers", [])}
    compensated = (report.get("compensation") or {}).get("layers") or {}
    integer = "integer" in report
    plan_layers = plan.get("layers") or {}
    rows = []
    for layer in report.get("layers", []):
        lid = layer["id"]
        planned = plan_layers.get(lid) or {}
        fmt = layer.get("format") or planned.get("format", "")
        bits = planned.get("weight_bits") or _weight_bits(fmt)
        act_bits = planned.get("act_bits") or plan.get("default_act_bits")
        if lid in floats:
            bits, fmt, runs_as = None, "float", f"float island: {floats[lid]}"
        else:
            runs_as = "integer" if integer else "QDQ"
        entry = analysed.get(lid) or {}
        per_width = {int(b): float(v) for b, v in (entry.get(field) or {}).items()}
        act = (entry.get("activation_damage") or {}).get(str(act_bits))
        estimate = stderr = None
        trace = entry.get("trace")
        perturbation = (entry.get("perturbation_sq") or {}).get(str(bits))
        if trace and perturbation is not None:
            estimate = 0.5 * float(trace["mean"]) * float(perturbation)
            stderr = 0.5 * float(trace["stderr"]) * float(perturbation)
        size = (priced.get(lid) or {}).get("size_bytes")
        if size is None and bits is not None:
            size = layer.get("params", 0) * bits / 8
        rows.append(
            LayerRow(
                lid,
                layer.get("op", ""),
                int(layer.get("params", 0)),
                fmt,
                bits,
                runs_as,
                per_width.get(bits) if bits is not None else None,
                float(act) if act is not None and bits is not None else None,
                (priced.get(lid) or {}).get("damage"),
                per_width,
                estimate,
                stderr,
                size,
                _error_reduction(compensated.get(lid, {}).get(str(bits))),
            )
        )
    return rows


def _damage_field(proxy: str | None, sensitivity: Mapping[str, Any] | None) -> str:
    """The sensitivity field the allocation priced layers with (empirical when no allocation,
    or Hessian when the analysis measured no empirical damage)."""
    from dyadiq.passes.sensitivity.proxy import Proxy

    if proxy:
        field = Proxy.parse(proxy).damage_field
        if field != "snr_db":
            return field
    layers = (sensitivity or {}).get("layers") or {}
    if layers and not any(entry.get("empirical_damage") for entry in layers.values()):
        return "hessian_damage"
    return "empirical_damage"


def _weight_bits(fmt: str) -> int | None:
    if fmt.startswith("W") and "A" in fmt:
        try:
            return int(fmt[1 : fmt.index("A")])
        except ValueError:
            return None
    return None


def _tail(layer: str) -> str:
    """The last two parts of a path-like node id (``conv.0.0/Conv``): a chart label that the
    table's # column ties back to the full id."""
    parts = [p for p in layer.split("/") if p]
    return "/".join(parts[-2:]) if parts else layer


def _error_reduction(entry: Mapping[str, Any] | None) -> str:
    """How much compensation cut the layer's output error against plain rounding."""
    if not entry:
        return ""
    before = entry.get("error_round_to_nearest")
    after_keys = [k for k in entry if k.startswith("error_after_")]
    if not before or not after_keys:
        return ""
    after = float(entry[after_keys[-1]])
    return f"{(after / before - 1) * 100:+.0f}% ({','.join(entry.get('passes', []))})"


def _damage_label(sensitivity: Mapping[str, Any] | None, field: str) -> str:
    kind = (sensitivity or {}).get("output_kind")
    if kind == "embedding":
        unit = "1/2 |d embedding|^2 per sample"
    elif kind in ("logits", "probabilities"):
        unit = "KL(float || quantized) of the output, nats per sample"
    else:
        unit = "predicted loss increase per sample"
    name = {"hessian_damage": "Hessian-trace", "empirical_damage": "measured"}.get(field, "")
    return f"{name} damage: {unit}".strip()


@dataclass(frozen=True)
class _Column:
    """One column of the per-layer table: its header, its cell, and its total (None: blank)."""

    header: str
    cell: Callable[[LayerRow], str]
    total: str | None = None
    numeric: bool = True


def _layer_columns(rows: Sequence[LayerRow], latency: Mapping[str, float]) -> list[_Column]:
    def total_of(values: Sequence[float | None], fmt: Callable[[float], str]) -> str:
        return fmt(sum(v for v in values if v is not None))

    order = {r.id: i for i, r in enumerate(rows)}
    columns = [
        _Column("#", lambda r: str(order[r.id])),
        _Column(
            "layer",
            lambda r: f'<code>{_e(r.id)}</code> <span class="note">{_e(r.op)}</span>',
            "total",
            numeric=False,
        ),
        _Column("params", lambda r: f"{r.params:,}", f"{sum(r.params for r in rows):,}"),
        _Column(
            "format",
            lambda r: (
                f'<span class="fmt" style="background:{plots.width_colour(r.weight_bits)}">'
                f"{_e(r.format)}</span>"
            ),
            numeric=False,
        ),
        _Column("runs as", lambda r: _e(r.runs_as), numeric=False),
    ]

    def damage(header: str, value: Callable[[LayerRow], float | None]) -> _Column:
        """A damage column, in scientific notation, with the sum over layers as its total."""
        return _Column(header, lambda r: _sci(value(r)), total_of([value(r) for r in rows], _sci))

    if any(r.weight_damage is not None for r in rows):
        columns.append(damage("damage: weights", lambda r: r.weight_damage))
    if any(r.act_damage is not None for r in rows):
        columns.append(damage("damage: input act.", lambda r: r.act_damage))
    if any(r.weight_damage is None and r.priced_damage is not None for r in rows):
        columns.append(damage("damage (allocation)", lambda r: r.priced_damage))
    if any(r.estimate is not None for r in rows):
        columns.append(
            _Column(
                "Hessian est. &plusmn; s.e.",
                lambda r: (
                    f"{_sci(r.estimate)} &plusmn; {_sci(r.estimate_stderr)}"
                    if r.estimate is not None
                    else ""
                ),
            )
        )
    columns.append(
        _Column(
            "weights (B)",
            lambda r: f"{r.weight_bytes:,.0f}" if r.weight_bytes is not None else "",
            total_of([r.weight_bytes for r in rows], lambda v: f"{v:,.0f}"),
        )
    )
    if latency:
        columns.append(
            _Column(
                "latency (ms)",
                lambda r: f"{latency[r.id]:.4f}" if r.id in latency else "",
                total_of([latency.get(r.id) for r in rows], lambda v: f"{v:.4f}"),
            )
        )
    if any(r.error_reduction for r in rows):
        columns.append(_Column("compensation", lambda r: _e(r.error_reduction)))
    return columns


def _layers_section(
    report: Mapping[str, Any], rows: Sequence[LayerRow], latency: Mapping[str, float]
) -> str:
    if not rows:
        return ""
    columns = _layer_columns(rows, latency)

    def td(column: _Column, text: str) -> str:
        return f'<td class="num">{text}</td>' if column.numeric else f"<td>{text}</td>"

    head = "".join(
        f'<th class="num">{c.header}</th>' if c.numeric else f"<th>{c.header}</th>" for c in columns
    )
    lines = [f"<tr>{head}</tr>"]
    lines += ["<tr>" + "".join(td(c, c.cell(r)) for c in columns) + "</tr>" for r in rows]
    lines.append('<tr class="total">' + "".join(td(c, c.total or "") for c in columns) + "</tr>")
    allocation = report.get("allocation") or {}
    notes = ["Weights: bytes at exactly the layer's bit width."]
    if any(r.damage is not None for r in rows):
        priced = ""
        if allocation:
            total = allocation.get("predicted_damage")
            priced = "; the allocation priced each layer at weights + input activation" + (
                f", predicted total {_sci(total)}" if total is not None else ""
            )
        notes.insert(
            0,
            "Damage: the loss increase with that layer alone at its plan width, everything "
            f"else float ({_e(allocation.get('proxy', 'empirical'))} proxy{priced}).",
        )
    if any(r.estimate is not None for r in rows):
        notes.append(
            "Hessian est.: 1/2 Tr(H)/n &middot; |Q(W) &minus; W|&sup2; with the Hutchinson "
            "standard error of the trace (the measured damage keeps no per-batch spread)."
        )
    if latency:
        notes.append("Latency: each layer's kernel timed alone on the target, at its plan format.")
    else:
        notes.append(
            "Latency: not measured in this run (<code>--target x86 --layer-latency</code> "
            "times every layer's kernel)."
        )
    if any(r.error_reduction for r in rows):
        notes.append(
            "Compensation: change of the layer's output error on calibration data against "
            "plain rounding, and the passes that ran."
        )
    return (
        f'<h2>Per-layer plan</h2><div class="scroll"><table>{"".join(lines)}</table></div>'
        f'<p class="note">{" ".join(notes)}</p>'
    )


def _sensitivity_section(
    rows: Sequence[LayerRow], sensitivity: Mapping[str, Any] | None, report: Mapping[str, Any]
) -> str:
    if not any(r.damage is not None for r in rows):
        return (
            '<h2>Sensitivity</h2><p class="note">No sensitivity analysis in this run (uniform '
            "formats). <code>--budget</code> or <code>dyadiq analyze</code> measures one.</p>"
        )
    field = _damage_field((report.get("allocation") or {}).get("proxy"), sensitivity)
    figure = plots.sensitivity_figure(
        [
            plots.LayerDamage(
                f"{index}: {_tail(r.id)}",
                r.weight_bits,
                r.damage,
                r.other_widths,
                r.estimate,
                r.estimate_stderr,
            )
            for index, r in enumerate(rows)
        ],
        _damage_label(sensitivity, field),
    )
    source = (
        f"sensitivity analysis of {sensitivity.get('forward_passes', 0):,} forward passes "
        f"({float(sensitivity.get('seconds', 0.0)):.0f} s)"
        if sensitivity
        else "the allocation's per-layer damage (the analysis itself was not found in the cache)"
    )
    return (
        f"<h2>Sensitivity</h2><figure>{plots.figure_svg(figure)}<figcaption>Bars: each layer's "
        "weight damage at the width the plan gave it (log scale), coloured by that width; "
        "digits: the damage at that many bits; diamonds: the Hessian-trace estimate with "
        f"&plusmn;1 standard error. From the {_e(source)}.</figcaption></figure>"
    )


def _frontier_section(frontier: Mapping[str, Any] | None, report: Mapping[str, Any]) -> str:
    allocation = report.get("allocation") or {}
    if frontier and frontier.get("points"):
        metric, points = str(frontier.get("metric", "")), list(frontier["points"])
        series = "ILP plan at a swept size budget (measured)"
        caption = (
            f"{len(points)} plans chosen by the ILP at evenly spaced size budgets, each measured "
            f"on held-out data ({_e(metric)})"
        )
    elif allocation.get("history") and allocation.get("metric"):
        # --max-drop measured every plan its bisection visited: real points of the frontier
        metric = str(allocation["metric"])
        points = [
            {"size_bytes": h["size"], "metric": h["metric"]}
            for h in allocation["history"]
            if h.get("size") is not None
        ]
        series = "plan measured by the --max-drop bisection"
        caption = (
            f"the {len(points)} plans the --max-drop {_e(allocation.get('max_drop'))} "
            f"bisection measured on held-out data ({_e(metric)})"
        )
    else:
        return (
            '<h2>Pareto frontier</h2><p class="note">Not measured for this run: '
            "<code>dyadiq frontier --zoo NAME -o DIR</code> measures one, and a "
            "frontier.json in the output folder is drawn here.</p>"
        )
    metrics = report.get("metrics") or {}
    float_metric = (metrics.get("float") or {}).get(
        metric, allocation.get("float_metric", (frontier or {}).get("float_metric"))
    )
    chosen = None
    weight_bytes = allocation.get("weight_bytes")
    models = [m for m in metrics if m != "float"]
    if weight_bytes is not None and models and metric in metrics[models[0]]:
        chosen = plots.PlanMarker(float(weight_bytes), float(metrics[models[0]][metric]))
    figure = plots.frontier_figure(
        points, metric, float_metric=float_metric, chosen=chosen, series_label=series
    )
    return (
        f"<h2>Pareto frontier</h2><figure>{plots.figure_svg(figure)}<figcaption>{caption}; "
        "dashed: the float model; star: this run's plan.</figcaption></figure>"
    )


def _verification_section(report: Mapping[str, Any]) -> str:
    facts: list[tuple[str, str]] = []
    verification = report.get("verification") or {}
    if verification:
        passed = verification.get("passed")
        facts.append(
            (
                "verdict",
                f'<span class="{"good" if passed else "bad"}">'
                f"{'passed' if passed else 'failed'}</span>"
                + (
                    " (accepted with --allow-mismatch)"
                    if verification.get("mismatch_allowed")
                    else ""
                ),
            )
        )
    integer = report.get("integer") or {}
    if integer:
        exact = integer.get("bit_exact_vs_reference") or {}
        facts.append(("integer model", _exactness_line({"integer": integer})))
        facts.append(
            (
                "integer ops",
                "fully integer"
                if integer.get("fully_integer")
                else "float ops: " + _e(", ".join(integer.get("float_ops", []))),
            )
        )
        for mismatch in exact.get("mismatches", []):
            facts.append(("mismatch", _e(mismatch)))
        agreement = integer.get("qdq_vs_integer") or {}
        if agreement:
            lsb = agreement.get("max_output_diff_lsb")
            verdict = (
                '<span class="good">identical</span>'
                if lsb == 0
                else '<span class="good">within rounding</span>'
                if lsb is not None and lsb <= 1
                else '<span class="warn">differ beyond rounding</span>'
                if lsb is not None
                else "no integer outputs to compare"
            )
            facts.append(
                (
                    "QDQ vs integer",
                    f"{verdict}: max output difference "
                    + (f"{lsb:.1f} LSB" if lsb is not None else "n/a")
                    + f", max float difference {_num(agreement.get('max_float_output_abs_diff'))}"
                    f", top-1 agreement {_pct(agreement.get('top1_agreement_qdq_vs_integer'))} "
                    f"over {agreement.get('compared_rows', 0)} output rows",
                )
            )
        if integer.get("weights_stored_as"):
            facts.append(("integer weights", _e(integer["weights_stored_as"])))
    target = report.get("target") or {}
    if target:
        facts.append(("target", _e(str(target.get("target")))))
        facts.append(("target check", _exactness_line({"target": target})))
        for key, label in (
            ("ran_on", "ran on"),
            ("isa_level", "ISA level"),
            ("weights_stored_as", "target weights"),
            ("instructions_per_inference", "instructions / inference"),
            ("arena_bytes", "arena (B)"),
            ("stack_bytes_estimate", "stack estimate (B)"),
            ("seconds", "build + check (s)"),
        ):
            if target.get(key) is not None:
                value = target[key]
                facts.append((label, f"{value:,}" if isinstance(value, int) else _e(str(value))))
    if not facts:
        return ""
    return f"<h2>Verification</h2>{_facts(facts)}"


def _notes_section(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return f"<h2>Notes</h2><ul>{items}</ul>"


def _run_section(report: Mapping[str, Any]) -> str:
    facts = [
        ("source", f"<code>{_e(str(report.get('source', '')))}</code>"),
        ("opset", _e(str(report.get("opset", "")))),
        (
            "calibration",
            f"{report.get('calibration_batches', 0)} batches; "
            f"{report.get('quantized_activation_tensors', 0)} activation tensors in "
            f"{report.get('scale_groups', 0)} scale groups",
        ),
    ]
    allocation = report.get("allocation") or {}
    if allocation:
        limits = ", ".join(
            f"{k} {v:,.0f}" for k, v in (allocation.get("budget_limits") or {}).items()
        )
        facts.append(
            (
                "allocation",
                f"budget {_e(str(allocation.get('budget')))} ({_e(limits)}); proxy "
                f"{_e(str(allocation.get('proxy')))}; predicted damage "
                f"{_sci(allocation.get('predicted_damage'))}; "
                f"{'proven optimal' if allocation.get('proven_optimal') else 'not proven optimal'}"
                f"; {_num(allocation.get('bops'), '{:,.0f}')} BOPs",
            )
        )
    compensation = (report.get("compensation") or {}).get("settings")
    if compensation:
        facts.append(("compensation", _e(str(compensation.get("passes")))))
    timings = report.get("timings") or {}
    if timings:
        facts.append(
            (
                "timings (s)",
                ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in timings.items()),
            )
        )
    return f"<h2>Run</h2>{_facts(facts)}"


# ---------------------------------------------------------------------------------------------
# formatting


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _facts(facts: Sequence[tuple[str, str]]) -> str:
    """Label/value pairs; values are HTML already (escaped where they carry report text)."""
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return f'<dl class="facts">{rows}</dl>'


def _bytes(value: float) -> str:
    """Bytes with a unit a reader can compare: B below 10 kB, kB (1000 B) and MB above."""
    value = float(value)
    if value < 1e4:
        return f"{value:,.0f} B"
    if value < 1e7:
        return f"{value / 1e3:,.1f} kB"
    return f"{value / 1e6:,.2f} MB"


def _sci(value: float | None) -> str:
    if value is None:
        return ""
    return "0" if value == 0 else f"{value:.2e}"


def _num(value: Any, pattern: str = "{:.4f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return pattern.format(value)


def _pct(value: Any) -> str:
    return f"{float(value) * 100:.1f}%" if value is not None else "n/a"
