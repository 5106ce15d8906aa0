"""What every subcommand prints through: one console (tests swap it for a wide one) and the
metrics table that ``quantize`` and ``eval`` share."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()


def metrics_table(metrics: dict[str, dict[str, float]]) -> Table:
    """One row per metric, one column per model (float first), samples as a count."""
    names = sorted({k for m in metrics.values() for k in m} - {"samples"})
    table = Table("metric", *metrics, title="evaluation on held-out data (exact simulation)")
    for name in [*names, "samples"]:
        table.add_row(name, *[fmt(m.get(name)) for m in metrics.values()])
    return table


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}" if float(value).is_integer() and value > 1 else f"{value:.4f}"
