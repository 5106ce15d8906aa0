"""report.html as a whole: gather what the run wrote, render every section, write the page
atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dyadiq.html_report.findings import headline_quality, notes_of, warnings_of
from dyadiq.html_report.layer_table import layer_rows, layers_section
from dyadiq.html_report.markup import CSS, esc
from dyadiq.html_report.run_outputs import (
    REPORT_FILE,
    Written,
    cached_sensitivity,
    measured_layer_latency,
    written_files,
)
from dyadiq.html_report.sections import (
    files_section,
    frontier_section,
    notes_section,
    quality_section,
    run_section,
    sensitivity_section,
    verification_section,
)
from dyadiq.html_report.verdict import verdict_section
from dyadiq.io import write_text_atomic


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
        f"<h1>dyadiq report: {esc(Path(source).name)}</h1>",
        f'<p class="sub">{esc(source)}</p>',
        verdict_section(report, files, quality, warnings),
        files_section(report, files),
        quality_section(report),
        layers_section(report, layers, layer_latency_ms or {}),
        sensitivity_section(layers, sensitivity, report),
        frontier_section(frontier, report),
        verification_section(report),
        notes_section(notes_of(report, sensitivity)),
        run_section(report),
    ]
    body = "\n".join(s for s in sections if s)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>dyadiq report: {esc(Path(source).name)}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
