"""The per-layer table of report.html: one row per weighted layer joining report.json,
plan.json and the sensitivity analysis, and the columns shown for it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dyadiq import plots
from dyadiq.html_report.markup import esc, fmt_sci


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
    field = damage_field(allocation.get("proxy"), sensitivity)
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
        bits = planned.get("weight_bits") or weight_bits_of(fmt)
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


def damage_field(proxy: str | None, sensitivity: Mapping[str, Any] | None) -> str:
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


def weight_bits_of(fmt: str) -> int | None:
    if fmt.startswith("W") and "A" in fmt:
        try:
            return int(fmt[1 : fmt.index("A")])
        except ValueError:
            return None
    return None


def layer_tail(layer: str) -> str:
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


def damage_label(sensitivity: Mapping[str, Any] | None, field: str) -> str:
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
            lambda r: f'<code>{esc(r.id)}</code> <span class="note">{esc(r.op)}</span>',
            "total",
            numeric=False,
        ),
        _Column("params", lambda r: f"{r.params:,}", f"{sum(r.params for r in rows):,}"),
        _Column(
            "format",
            lambda r: (
                f'<span class="fmt" style="background:{plots.width_colour(r.weight_bits)}">'
                f"{esc(r.format)}</span>"
            ),
            numeric=False,
        ),
        _Column("runs as", lambda r: esc(r.runs_as), numeric=False),
    ]

    def damage(header: str, value: Callable[[LayerRow], float | None]) -> _Column:
        """A damage column, in scientific notation, with the sum over layers as its total."""
        return _Column(
            header, lambda r: fmt_sci(value(r)), total_of([value(r) for r in rows], fmt_sci)
        )

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
                    f"{fmt_sci(r.estimate)} &plusmn; {fmt_sci(r.estimate_stderr)}"
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
        columns.append(_Column("compensation", lambda r: esc(r.error_reduction)))
    return columns


def layers_section(
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
                f", predicted total {fmt_sci(total)}" if total is not None else ""
            )
        notes.insert(
            0,
            "Damage: the loss increase with that layer alone at its plan width, everything "
            f"else float ({esc(allocation.get('proxy', 'empirical'))} proxy{priced}).",
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
