"""The sections of report.html below the verdict: files written, quality, sensitivity chart,
frontier, verification details, notes and how the run was made."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dyadiq import plots
from dyadiq.html_report.layer_table import LayerRow, damage_field, damage_label, layer_tail
from dyadiq.html_report.markup import esc, facts_table, fmt_bytes, fmt_num, fmt_pct, fmt_sci
from dyadiq.html_report.run_outputs import Written
from dyadiq.html_report.verdict import FILE_USES, TARGET_USES, exactness_line


def files_section(report: Mapping[str, Any], files: Sequence[Written]) -> str:
    if not files:
        return ""
    target = str((report.get("target") or {}).get("target", ""))
    family = "cortex-m" if target.startswith("cortex-m") else target
    rows = []
    for entry in files:
        use = FILE_USES.get(entry.name, "")
        if target and entry.name == f"{target}/":
            use = TARGET_USES.get(family, f"the {target} build")
        count = f" ({entry.files} files)" if entry.name.endswith("/") else ""
        rows.append(
            f"<tr><td><code>{esc(entry.name)}</code>{count}</td>"
            f'<td class="num">{fmt_bytes(entry.bytes)}</td><td>{esc(use)}</td></tr>'
        )
    return (
        '<h2>Files written</h2><div class="scroll"><table><tr><th>file</th>'
        f'<th class="num">size</th><th>use</th></tr>{"".join(rows)}</table></div>'
    )


def quality_section(report: Mapping[str, Any]) -> str:
    metrics = report.get("metrics") or {}
    if not metrics:
        return ""
    models = list(metrics)
    names = [k for k in metrics[models[0]] if k != "samples"]
    head = "".join(f'<th class="num">{esc(m)}</th>' for m in models)
    rows = []
    reference = metrics.get("float", {})
    for name in names:
        cells = []
        for model in models:
            value = metrics[model].get(name)
            delta = ""
            if model != "float" and value is not None and name in reference:
                delta = f' <span class="note">({(value - reference[name]) * 100:+.2f})</span>'
            cells.append(f'<td class="num">{fmt_num(value)}{delta}</td>')
        rows.append(f"<tr><td>{esc(name)}</td>{''.join(cells)}</tr>")
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


def sensitivity_section(
    rows: Sequence[LayerRow], sensitivity: Mapping[str, Any] | None, report: Mapping[str, Any]
) -> str:
    if not any(r.damage is not None for r in rows):
        return (
            '<h2>Sensitivity</h2><p class="note">No sensitivity analysis in this run (uniform '
            "formats). <code>--budget</code> or <code>dyadiq analyze</code> measures one.</p>"
        )
    field = damage_field((report.get("allocation") or {}).get("proxy"), sensitivity)
    figure = plots.sensitivity_figure(
        [
            plots.LayerDamage(
                f"{index}: {layer_tail(r.id)}",
                r.weight_bits,
                r.damage,
                r.other_widths,
                r.estimate,
                r.estimate_stderr,
            )
            for index, r in enumerate(rows)
        ],
        damage_label(sensitivity, field),
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
        f"&plusmn;1 standard error. From the {esc(source)}.</figcaption></figure>"
    )


def frontier_section(frontier: Mapping[str, Any] | None, report: Mapping[str, Any]) -> str:
    allocation = report.get("allocation") or {}
    if frontier and frontier.get("points"):
        metric, points = str(frontier.get("metric", "")), list(frontier["points"])
        series = "ILP plan at a swept size budget (measured)"
        caption = (
            f"{len(points)} plans chosen by the ILP at evenly spaced size budgets, each measured "
            f"on held-out data ({esc(metric)})"
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
            f"the {len(points)} plans the --max-drop {esc(allocation.get('max_drop'))} "
            f"bisection measured on its search split of the held-out data ({esc(metric)}; the "
            "quality table reports the chosen plan on the other split)"
        )
        if allocation.get("float_metric") is not None:
            # every point, the float line and the star on the one split the search read
            chosen_size, chosen_metric = (
                allocation.get("weight_bytes"),
                allocation.get("plan_metric"),
            )
            star = (
                plots.PlanMarker(float(chosen_size), float(chosen_metric))
                if chosen_size is not None and chosen_metric is not None
                else None
            )
            figure = plots.frontier_figure(
                points,
                metric,
                float_metric=float(allocation["float_metric"]),
                chosen=star,
                series_label=series,
            )
            return (
                f"<h2>Pareto frontier</h2><figure>{plots.figure_svg(figure)}<figcaption>"
                f"{caption}; dashed: the float model; star: this run's plan.</figcaption></figure>"
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


def verification_section(report: Mapping[str, Any]) -> str:
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
        facts.append(("integer model", exactness_line({"integer": integer})))
        facts.append(
            (
                "integer ops",
                "fully integer"
                if integer.get("fully_integer")
                else "float ops: " + esc(", ".join(integer.get("float_ops", []))),
            )
        )
        for mismatch in exact.get("mismatches", []):
            facts.append(("mismatch", esc(mismatch)))
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
                    + ", max float difference "
                    + f"{fmt_num(agreement.get('max_float_output_abs_diff'))}"
                    f", top-1 agreement {fmt_pct(agreement.get('top1_agreement_qdq_vs_integer'))} "
                    f"over {agreement.get('compared_rows', 0)} output rows",
                )
            )
        if integer.get("weights_stored_as"):
            facts.append(("integer weights", esc(integer["weights_stored_as"])))
    target = report.get("target") or {}
    if target:
        facts.append(("target", esc(str(target.get("target")))))
        facts.append(("target check", exactness_line({"target": target})))
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
                facts.append((label, f"{value:,}" if isinstance(value, int) else esc(str(value))))
    if not facts:
        return ""
    return f"<h2>Verification</h2>{facts_table(facts)}"


def notes_section(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return f"<h2>Notes</h2><ul>{items}</ul>"


def run_section(report: Mapping[str, Any]) -> str:
    facts = [
        ("source", f"<code>{esc(str(report.get('source', '')))}</code>"),
        ("opset", esc(str(report.get("opset", "")))),
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
                f"budget {esc(str(allocation.get('budget')))} ({esc(limits)}); proxy "
                f"{esc(str(allocation.get('proxy')))}; predicted damage "
                f"{fmt_sci(allocation.get('predicted_damage'))}; "
                f"{'proven optimal' if allocation.get('proven_optimal') else 'not proven optimal'}"
                f"; {fmt_num(allocation.get('bops'), '{:,.0f}')} BOPs",
            )
        )
    compensation = (report.get("compensation") or {}).get("settings")
    if compensation:
        facts.append(("compensation", esc(str(compensation.get("passes")))))
    timings = report.get("timings") or {}
    if timings:
        facts.append(
            (
                "timings (s)",
                ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in timings.items()),
            )
        )
    return f"<h2>Run</h2>{facts_table(facts)}"


# ---------------------------------------------------------------------------------------------
# formatting
