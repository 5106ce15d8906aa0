"""What a finished run left behind for report.html to read: the output folder's files, the
sensitivity analysis the allocation used (from the cache), measured per-layer latency."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT_FILE = "report.html"


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
