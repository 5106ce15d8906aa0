"""benchmarks/llm.py's results file: separate stage runs merge into one table (no model)."""

from __future__ import annotations

import json
import pathlib

from benchmarks import llm


def _part(path: pathlib.Path, rows: dict[str, dict[str, float]], command: str) -> pathlib.Path:
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
