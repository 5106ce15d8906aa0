"""On-disk cache of sensitivity reports, keyed by model + calibration data + settings.

A rerun with the same float model, the same calibration arrays and the same settings reads
the report instead of recomputing it (minutes of forward passes on a large model). While an
analysis runs, :class:`PartialResults` appends each finished task to ``<key>.partial.jsonl``, so
an interrupted analysis resumes with only the remaining tasks; the file goes once the report is
stored. The executor (serial or Ray, how many workers) is not part of the key: it does not
change the results.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dyadiq.io import write_text_atomic
from dyadiq.passes.sensitivity.analysis import SensitivityReport


def cache_dir() -> Path:
    root = Path(os.environ.get("DYADIQ_CACHE", Path.home() / ".cache" / "dyadiq" / "zoo"))
    return root.parent / "analysis" if root.name == "zoo" else root / "analysis"


def fingerprint(
    model: onnx.ModelProto,
    batches: Sequence[Mapping[str, np.ndarray]],
    settings: Mapping[str, Any],
) -> str:
    digest = hashlib.sha256(model.SerializeToString(deterministic=True))
    for feeds in batches:
        for name in sorted(feeds):
            array = np.ascontiguousarray(feeds[name])
            digest.update(name.encode())
            digest.update(str(array.dtype).encode() + str(array.shape).encode())
            digest.update(array.tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def load(key: str) -> SensitivityReport | None:
    path = cache_dir() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return SensitivityReport.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache entry is recomputed, never trusted


def store(key: str, report: SensitivityReport) -> Path:
    path = cache_dir() / f"{key}.json"
    write_text_atomic(path, json.dumps(report.to_json(), indent=1))
    PartialResults(key).discard()
    return path


class PartialResults(dict[str, Any]):
    """Finished task results of one analysis (by task key), appended to a JSON-lines file as
    they arrive. Results are JSON numbers, which round-trip exactly, so a resumed analysis
    equals an uninterrupted one. A torn last line (the process died mid-write) is ignored."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.path = cache_dir() / f"{key}.partial.jsonl"
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self[str(entry["key"])] = entry["value"]
                except (ValueError, KeyError, TypeError):
                    continue

    def record(self, key: str, value: Any) -> None:
        self[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"key": key, "value": value}) + "\n")

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
