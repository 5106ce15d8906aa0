"""Every timing result names its CPU flags and the load around the run; re-runs keep follow-ups."""

import json
from pathlib import Path

from benchmarks.common import follow_ups, results_header, write_results


def test_results_header_names_the_flags_the_threads_and_both_loads() -> None:
    machine = {
        "cpu_model": "Xeon",
        "cpu_flags": ["avx2", "avx512_vnni"],
        "git_commit": "abc123",
        "load_avg_start": [0.25, 0.5, 1.0],
    }
    run = {
        "command": "python -m x",
        "date": "2026-12-07",
        "threads": 2,
        "load_avg_end": [1.5, 1, 1],
    }
    text = "\n".join(results_header(machine, run))
    assert "`python -m x` (2026-12-07, git abc123)" in text
    assert "Xeon, 2 threads; flags avx2 avx512_vnni" in text
    assert "at start 0.25, 0.50, 1.00, at end 1.50, 1.00, 1.00" in text


def test_results_header_without_end_load_or_threads_still_names_the_flags() -> None:
    machine = {"cpu_model": "Xeon", "cpu_flags": ["avx2"], "load_avg_start": [1.0, 1.0, 1.0]}
    text = "\n".join(results_header(machine, {"command": "c"}))
    assert "flags avx2" in text and "at end" not in text and "threads" not in text


def test_a_rerun_replaces_the_tables_and_keeps_the_follow_ups(tmp_path: Path) -> None:
    (tmp_path / "r.md").write_text(
        "# R\n\n| old | table |\n\n## Follow-up of today\n\nwritten by hand\n"
    )
    write_results({"x": 2}, tmp_path, "r", lambda data: f"# R\n\n| new | {data['x']} |\n")
    text = (tmp_path / "r.md").read_text()
    assert "| new | 2 |" in text and "old" not in text
    assert text.endswith("## Follow-up of today\n\nwritten by hand\n")
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 2}


def test_a_first_run_has_no_follow_ups_to_keep(tmp_path: Path) -> None:
    write_results({}, tmp_path, "r", lambda data: "# R\n")
    assert (tmp_path / "r.md").read_text() == "# R\n"
    assert follow_ups("# R\n\n## Notes\n") == ""
