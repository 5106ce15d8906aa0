"""Pareto frontier (HAWQ-V2): sweep the size budget, solve the ILP at each point, build each
plan's QDQ model and measure it on held-out data; save JSON and a PNG plot.

Measured metric: the zoo model's own metric (agreement, accuracy, embedding cosine) on its
held-out split, so every point is a real measurement, not a prediction.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.io import write_bytes_atomic, write_text_atomic
from dyadiq.passes.allocation import AllocationProblem, Budget, smallest_total, solve


@dataclass(frozen=True)
class FrontierPoint:
    budget_bytes: float
    size_bytes: float
    bops: float
    predicted_damage: float
    metric: float | None
    formats: dict[str, str]
    latency: float | None = None  # the problem's latency table (measured, or its cost model)


def sweep(
    problem: AllocationProblem,
    points: int,
    measure: Callable[[dict[str, Any]], float | None],
) -> list[FrontierPoint]:
    """Budgets evenly spaced from the smallest feasible size to the largest useful one."""
    smallest = smallest_total(problem, problem.size_bytes)
    largest = -smallest_total(
        problem, {i: {f: -v for f, v in t.items()} for i, t in problem.size_bytes.items()}
    )
    frontier = []
    for budget in np.linspace(smallest, largest, points):
        allocation = solve(problem, Budget(size_bytes=float(budget)))
        metric = measure(dict(allocation.formats))
        frontier.append(
            FrontierPoint(
                float(budget),
                allocation.size_bytes,
                allocation.bops,
                allocation.predicted_damage,
                metric,
                {k: v.label for k, v in allocation.formats.items()},
                allocation.latency,
            )
        )
    return frontier


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
