"""On-disk cache of sensitivity reports, keyed by model + calibration data + settings.

A rerun with the same float model, the same calibration arrays and the same settings reads
the report instead of recomputing it (minutes of forward passes on a large model).
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
    return path
