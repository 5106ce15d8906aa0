"""Pareto frontier (HAWQ-V2) output: the points of ``passes.allocation.sweep`` (the ILP at
evenly spaced size budgets, each plan's QDQ model measured on held-out data) as JSON and a PNG
plot (matplotlib, :mod:`dyadiq.plots`).

Measured metric: a zoo model's own metric (agreement, accuracy, embedding cosine) on its
held-out data, or on the user's ``--val`` data the metric chosen by what the model's first
output holds (:mod:`dyadiq.plan_scores`), so every point is a real measurement, not a
prediction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dyadiq.io import write_bytes_atomic, write_text_atomic
from dyadiq.passes.allocation import FrontierPoint
from dyadiq.plots import plot_frontier_png


def save(
    frontier: Sequence[FrontierPoint],
    out: Path,
    metric_name: str,
    float_metric: float | None = None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """frontier.json and frontier.png; ``float_metric``: the float model's score on the same
    data, drawn as the line every plan is judged against; ``details``: what the metric means
    and which data it was measured on, written beside it."""
    points = [p.__dict__ for p in frontier]
    data = {"metric": metric_name, "float_metric": float_metric, **(details or {})}
    data["points"] = points
    write_text_atomic(out / "frontier.json", json.dumps(data, indent=2))
    png = plot_frontier_png(frontier, metric_name, float_metric=float_metric)
    write_bytes_atomic(out / "frontier.png", png)
