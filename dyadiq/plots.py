"""The figures of a run, drawn with matplotlib (Agg, no display): the Pareto frontier of measured
plans and the per-layer sensitivity chart. Each figure comes as a :class:`Figure`, and as PNG
bytes or SVG text for files and for the self-contained HTML report (:mod:`dyadiq.html_report`).

Every axis names its quantity and unit; the float model's metric is drawn as a line on the
frontier so a point's distance from it reads off the axis.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# One colour per weight width, blue (wide, safe) through green and orange to dark red (narrow):
# the legend reads as a heat scale. Widths outside the table (float, 16) fall back to grey.
WIDTH_COLOURS = {
    8: "#4c72b0",
    7: "#5f8fc4",
    6: "#55a868",
    5: "#c7b542",
    4: "#dd8452",
    3: "#c44e52",
    2: "#8c1c13",
}
FLOAT_COLOUR = "#999999"
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "svg.fonttype": "none",  # text stays text in SVG: smaller, selectable, scales crisply
    "svg.hashsalt": "dyadiq",  # deterministic element ids: the same run gives the same file
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@dataclass(frozen=True)
class PlanMarker:
    """One plan to mark on the frontier (this run's): its weight size and measured metric."""

    size_bytes: float
    metric: float | None
    label: str = "this run's plan"


@dataclass(frozen=True)
class LayerDamage:
    """One bar of the sensitivity chart: a layer's predicted damage at its plan width, the
    other candidate widths' damage, and an estimate with a standard error where one exists."""

    layer: str
    weight_bits: int | None  # None: kept in float
    damage: float | None  # at weight_bits, by the allocation's proxy
    other_widths: Mapping[int, float] = dataclasses.field(default_factory=dict)
    estimate: float | None = None  # Hessian-trace estimate at weight_bits
    estimate_stderr: float | None = None


def _point_field(point: Any, name: str) -> Any:
    """A frontier point's field: FrontierPoint objects and frontier.json's dicts alike."""
    if isinstance(point, Mapping):
        return point.get(name)
    return getattr(point, name, None)


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(cast(Any, _STYLE)):  # typed stubs list every key as a Literal
        yield


def _new_figure(width_in: float, height_in: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot, so no display, no global backend switch in
    the caller's process (a notebook keeps its own), and nothing kept alive after use."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    with _style():
        figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def figure_svg(figure: Figure) -> str:
    """The figure as an inline-able <svg> element (no XML prolog, no DOCTYPE, no date)."""
    buffer = io.StringIO()
    with _style():  # svg.fonttype and svg.hashsalt are read when saving
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def frontier_figure(
    points: Sequence[Any],
    metric_name: str,
    *,
    float_metric: float | None = None,
    chosen: PlanMarker | None = None,
    series_label: str = "ILP plan at a swept size budget (measured)",
) -> Figure:
    """Measured metric (y) against weight size in kB (x) for each frontier point, the float
    model's metric as a dashed line, and ``chosen`` as a star. Points whose plan could not be
    measured (metric None) are ticked along the bottom axis, not dropped silently."""
    from matplotlib.ticker import MaxNLocator

    with _style():
        figure = _new_figure(6.4, 3.9)
        axes = figure.add_subplot()
        sized = sorted(
            (float(_point_field(p, "size_bytes")) / 1e3, _point_field(p, "metric")) for p in points
        )
        measured = [(x, float(y)) for x, y in sized if y is not None]
        unmeasured = [x for x, y in sized if y is None]
        if measured:
            xs, ys = zip(*measured, strict=True)
            axes.plot(
                xs,
                ys,
                "o-",
                color="#1f3d7a",
                markersize=5,
                linewidth=1.5,
                label=series_label,
            )
        if unmeasured:
            axes.plot(
                unmeasured,
                [0] * len(unmeasured),
                "|",
                color="#999999",
                markersize=10,
                transform=axes.get_xaxis_transform(),
                clip_on=False,
                label="plan not measured",
            )
        if float_metric is not None:
            axes.axhline(
                float_metric,
                color="#333333",
                linestyle="--",
                linewidth=1,
                label=f"float model ({float_metric:.4g})",
            )
        if chosen is not None and chosen.metric is not None:
            axes.plot(
                [chosen.size_bytes / 1e3],
                [chosen.metric],
                "*",
                color="#c44e52",
                markersize=14,
                markeredgecolor="black",
                markeredgewidth=0.6,
                zorder=5,
                label=f"{chosen.label} ({chosen.size_bytes / 1e3:,.1f} kB, {chosen.metric:.4g})",
            )
        axes.set_xlabel("quantized weights (kB, packed at each layer's width)")
        axes.set_ylabel(f"{metric_name} on held-out data")
        axes.set_title(f"Pareto frontier: measured {metric_name} against weight size")
        axes.xaxis.set_major_locator(MaxNLocator(nbins=8))
        axes.yaxis.set_major_locator(MaxNLocator(nbins=7))
        axes.grid(True, color="#e5e5e5", linewidth=0.6)
        axes.legend(loc="lower right", frameon=False)
        return figure


def plot_frontier_png(
    points: Sequence[Any],
    metric_name: str,
    *,
    float_metric: float | None = None,
    chosen: PlanMarker | None = None,
    dpi: int = 110,
) -> bytes:
    """:func:`frontier_figure` as PNG bytes (``frontier.png``). ``points``: FrontierPoint
    objects or frontier.json's point dicts (``size_bytes``, ``metric``); b"" when empty."""
    if not points:
        return b""
    return figure_png(
        frontier_figure(points, metric_name, float_metric=float_metric, chosen=chosen), dpi
    )


def width_colour(bits: int | None) -> str:
    return WIDTH_COLOURS.get(bits, FLOAT_COLOUR) if bits is not None else FLOAT_COLOUR


def sensitivity_figure(rows: Sequence[LayerDamage], damage_label: str) -> Figure:
    """One horizontal bar per layer (graph order, top to bottom): the predicted damage at the
    plan's width, coloured by that width, on a log axis; the other candidate widths as their
    bit count, drawn at their damage; the Hessian-trace estimate at the plan's width with a
    +-1 standard error bar."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    positive = [
        v
        for r in rows
        for v in (r.damage, r.estimate, *r.other_widths.values())
        if v is not None and v > 0
    ]
    floor = min(positive) / 3 if positive else 1e-9  # where a zero or float layer's bar ends
    with _style():
        height = 1.4 + 0.2 * max(len(rows), 3)
        figure = _new_figure(6.4, height)
        axes = figure.add_subplot()
        y = list(range(len(rows)))
        axes.barh(
            y,
            [max(r.damage, floor) if r.damage is not None else 0 for r in rows],
            left=floor,
            color=[width_colour(r.weight_bits) for r in rows],
            height=0.7,
        )
        for i, row in enumerate(rows):
            for bits, value in row.other_widths.items():
                if bits != row.weight_bits:  # the width itself is the marker: no legend lookup
                    axes.plot(
                        [max(value, floor)],
                        [i],
                        marker=f"${bits}$",
                        color="#555555",
                        markersize=5,
                        linestyle="",
                        zorder=3,
                    )
            if row.estimate is not None and row.estimate > 0:
                err = row.estimate_stderr or 0.0
                low = min(err, row.estimate - floor)  # a bar reaching below the axis' floor
                axes.errorbar(
                    [row.estimate],
                    [i],
                    xerr=[[low], [err]],
                    fmt="D",
                    color="black",
                    markersize=3,
                    elinewidth=1,
                    capsize=2,
                    zorder=4,
                )
        axes.set_xscale("log")
        axes.set_yticks(y, [_short(r.layer) for r in rows])
        axes.invert_yaxis()
        axes.set_ylim(len(rows) - 0.4, -0.6)
        axes.set_xlabel(damage_label)
        axes.set_title("Per-layer sensitivity at the plan's weight width")
        axes.grid(True, axis="x", color="#e5e5e5", linewidth=0.6)
        widths = sorted({r.weight_bits for r in rows if r.weight_bits is not None}, reverse=True)
        handles: list[Any] = [Patch(color=width_colour(b), label=f"W{b}") for b in widths]
        if any(r.weight_bits is None for r in rows):
            handles.append(Patch(color=FLOAT_COLOUR, label="float"))
        if any(r.other_widths for r in rows):
            handles.append(
                Line2D(
                    [],
                    [],
                    marker="$b$",
                    linestyle="",
                    color="#555555",
                    label="damage at b bits",
                )
            )
        if any(r.estimate is not None for r in rows):
            handles.append(
                Line2D(
                    [],
                    [],
                    marker="D",
                    linestyle="-",
                    color="black",
                    markersize=3,
                    label="Hessian-trace estimate ±1 s.e.",
                )
            )
        figure.legend(
            handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False
        )
        return figure


def _short(layer: str, limit: int = 28) -> str:
    """A layer id that fits a tick label: the tail is what tells layers apart."""
    return layer if len(layer) <= limit else "..." + layer[-(limit - 3) :]
