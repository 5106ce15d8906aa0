"""Every timing result names its CPU flags and the load around the run."""

from benchmarks.common import results_header


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
