"""benchmarks/llm.py's results file: separate stage runs merge into one table (no model)."""

from __future__ import annotations

import json
import pathlib
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import llm


def _part(path: pathlib.Path, rows: dict[str, dict[str, Any]], command: str) -> pathlib.Path:
    data = {
        "command": command,
        "date": "2026-12-07T07:00:00+00:00",
        "partial": False,
        "eval_windows": 4,
        "calib_windows": 4,
        "sens_windows": 1,
        "widths": "2,3,4",
        "seconds": 10.0,
        "rows": rows,
    }
    path.write_text(json.dumps(data))
    return path


def test_merge_keeps_every_row_and_compares_with_float(tmp_path: pathlib.Path) -> None:
    row = {"perplexity": 20.0, "bits_per_byte": 1.0, "file_bytes": 1e9}
    a = _part(tmp_path / "a.json", {"float": row}, "python -m benchmarks.llm --stages float")
    b = _part(
        tmp_path / "b.json",
        {"ort": {**row, "perplexity": 21.0}, "broken": {"error": "RuntimeError: x"}},
        "python -m benchmarks.llm --stages ort",
    )
    assert llm.main(["--merge", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    merged = json.loads((tmp_path / "out" / "llm.json").read_text())
    assert list(merged["rows"]) == ["float", "ort", "broken"]  # float first, then in order
    table = (tmp_path / "out" / "llm.md").read_text()
    assert "| ort | 21.00 | +5.0% |" in table and "failed: RuntimeError" in table
    assert "dequantised to fp32" in table


class _StopError(Exception):
    """Ends ``main()`` once the settings are seen."""


def _gptq_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, *argv: str) -> Any:
    """The settings ``benchmarks.llm --stages gptq ARGV`` quantizes with (no model read)."""
    seen: dict[str, Any] = {}

    def prepare(path: object, batches: object, settings: object, **_: object) -> None:
        seen["settings"] = settings
        raise _StopError

    monkeypatch.setattr(llm.zoo, "get", lambda name: SimpleNamespace(model_path=tmp_path))
    monkeypatch.setattr(llm.gemma3, "evaluation_windows", lambda n: [])
    monkeypatch.setattr(llm.gemma3, "calibration_batches", lambda n, text: iter(()))
    monkeypatch.setattr(llm, "prepare", prepare)
    with pytest.raises(_StopError):
        llm.main(["--stages", "gptq", "--out", str(tmp_path / "out"), *argv])
    return seen["settings"]


def test_settings_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    from dyadiq.passes.weight_only.groupwise import ClipObjective
    from dyadiq.passes.weight_only.quantize import Method, WeightOnlySettings

    assert _gptq_settings(monkeypatch, tmp_path) == WeightOnlySettings(method=Method.GPTQ)
    flags = ["--clip-objective", "weight", "--sequential", "--salient-fraction", "0.02"]
    assert _gptq_settings(monkeypatch, tmp_path, *flags) == WeightOnlySettings(
        clip_objective=ClipObjective.WEIGHT, sequential=True, salient_fraction=0.02
    )
    # --awq here switches the stages' own scale searches: never the base settings' awq
    assert not _gptq_settings(monkeypatch, tmp_path, "--awq").awq
    with pytest.raises(SystemExit):  # the rows are named g128: no --group-size
        _gptq_settings(monkeypatch, tmp_path, "--group-size", "64")
