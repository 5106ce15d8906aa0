"""Pareto frontier (HAWQ-V2) output: the points of ``passes.allocation.sweep`` (the ILP at
evenly spaced size budgets, each plan's QDQ model measured on held-out data) as JSON and a PNG
plot.

Measured metric: the zoo model's own metric (agreement, accuracy, embedding cosine) on its
held-out split, so every point is a real measurement, not a prediction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dyadiq.io import write_bytes_atomic, write_text_atomic
from dyadiq.passes.allocation import FrontierPoint


def save(frontier: Sequence[FrontierPoint], out: Path, metric_name: str) -> None:
    data = {"metric": metric_name, "points": [p.__dict__ for p in frontier]}
    write_text_atomic(out / "frontier.json", json.dumps(data, indent=2))
    write_bytes_atomic(out / "frontier.png", plot_png(frontier, metric_name))


def plot_png(frontier: Sequence[FrontierPoint], metric_name: str) -> bytes:
    """Size (x) against the measured metric (y) and predicted damage (second series)."""
    import io

    from PIL import Image, ImageDraw

    width, height, margin = 640, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = [p.size_bytes / 1e3 for p in frontier]
    ys = [p.metric for p in frontier if p.metric is not None]
    if not xs:
        return b""
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if y1 <= y0:
        y1 = y0 + 1e-3

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = margin + (x - x0) / (x1 - x0) * (width - 2 * margin)
        py = height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin)
        return px, py

    draw.line(
        [(margin, margin), (margin, height - margin), (width - margin, height - margin)],
        fill="black",
    )
    draw.text((width // 2 - 60, height - margin + 25), "weight size (kB)", fill="black")
    draw.text((5, 10), f"measured {metric_name} vs size (dyadiq ILP frontier)", fill="black")
    for value, label in ((x0, f"{x0:.0f}"), (x1, f"{x1:.0f}")):
        draw.text((to_px(value, y0)[0] - 10, height - margin + 5), label, fill="black")
    for value in (y0, y1):
        draw.text((5, to_px(x0, value)[1] - 6), f"{value:.3f}", fill="black")
    points = [to_px(x, p.metric) for x, p in zip(xs, frontier, strict=True) if p.metric is not None]
    if len(points) > 1:
        draw.line(points, fill="navy", width=2)
    for px, py in points:
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill="navy")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
