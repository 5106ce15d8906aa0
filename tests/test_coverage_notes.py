"""coverage.md's follow-up notes: rendered as sections and kept when results are merged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import coverage


def _results(command: str, notes: dict[str, list[str]] | None = None) -> dict[str, Any]:
    machine = {"cpu_model": "cpu", "nproc": 2, "load_avg_start": [1.0, 1.0, 1.0],
               "git_commit": "abc", "git_dirty": False}  # fmt: skip
    data: dict[str, Any] = {"command": command, "machine": machine, "stages": ["qdq"]}
    data.update(timeout_s=60.0, work="/w", models=[], seconds=1.0)
    if notes is not None:
        data["notes"] = notes
    return data


def test_notes_are_sections_and_survive_a_merge(tmp_path: Path) -> None:
    first = _results("run a", {"Follow-up one": ["First paragraph.", "Second paragraph."]})
    text = coverage.render(first)
    assert "## Follow-up one\n\nFirst paragraph.\n\nSecond paragraph.\n" in text
    second = _results("run b", {"Follow-up two": ["Later."]})
    files = []
    for name, data in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps(data))
        files.append(str(tmp_path / name))
    coverage.rescore(files, tmp_path / "work", tmp_path / "out", "merged", recompute=False)
    merged = (tmp_path / "out" / "merged.md").read_text()
    assert "## Follow-up one" in merged and "## Follow-up two\n\nLater.\n" in merged
    assert "    run a" in merged and "    run b" in merged
