"""What every subcommand prints through: one console (tests swap it for a wide one), the
metrics table that ``quantize`` and ``eval`` share, and the names ``run`` gives outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Column, Table

console = Console()


def metrics_table(metrics: dict[str, dict[str, float]]) -> Table:
    """One row per metric, one column per model (float first), samples as a count."""
    names = sorted({k for m in metrics.values() for k in m} - {"samples"})
    # Readable at 80 columns: long metric and model names fold onto a second line instead of
    # being cut to "top5_cont…", and a figure column never gets narrower than its figures.
    columns = [Column("metric", overflow="fold", min_width=10)]
    columns += [Column(name, overflow="fold", min_width=7, justify="right") for name in metrics]
    table = Table(*columns, title="evaluation on held-out data (exact simulation)")
    for name in [*names, "samples"]:
        table.add_row(name, *[fmt(m.get(name)) for m in metrics.values()])
    return table


def fmt(value: float | None) -> str:
    """A metric for a table: counts as integers, scores to four decimals, None as blank."""
    if value is None:
        return ""
    return f"{value:.0f}" if float(value).is_integer() and value > 1 else f"{value:.4f}"


CODES_SUFFIX = "_codes"  # what TVM libraries name an output's codes (backends/tvm/lower.py)


def uniform_output_names(outputs: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A Cortex-M run's outputs (code tensors named as the integer program names them,
    ``NAME_q``, one ``[1, ...]`` row per input) renamed ``NAME_codes`` and stacked along the
    batch axis (``[inputs, ...]``), as a TVM library returns them; others unchanged."""
    info_path = folder / "model.json"
    if not info_path.is_file() or "cpu" not in json.loads(info_path.read_text()):
        return outputs
    renamed = {}
    for name, value in outputs.items():
        base = name.removesuffix("_q") if not name.endswith(CODES_SUFFIX) else name
        if value.ndim >= 2 and value.shape[1] == 1:  # [inputs, 1, ...] -> [inputs, ...]
            value = value.reshape(value.shape[0], *value.shape[2:])
        renamed[base if base.endswith(CODES_SUFFIX) else base + CODES_SUFFIX] = value
    return renamed
