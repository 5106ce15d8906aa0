"""What every benchmark records the same way: the machine it ran on, and atomic result files."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _proc_field(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> list[str]:
    """The SIMD feature flags that decide onnxruntime's and TVM's integer kernels."""
    flags = (
        _proc_field("/proc/cpuinfo", "flags") or _proc_field("/proc/cpuinfo", "Features")
    ) or ""
    wanted = ("avx", "fma", "asimd", "dotprod", "i8mm", "sve")
    return sorted({f for f in flags.split() if f.startswith(wanted) or "vnni" in f})


def machine_info() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import scipy

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    mem = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or "unknown",
        "cpu_flags": cpu_flags(),
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "mem_total_mib": int(mem.split()[0]) / 1024.0 if mem else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain")),
        "load_avg_start": list(os.getloadavg()),
    }


def _loads(values: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def results_header(machine: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The lines every timing result opens with: the command, the CPU with its SIMD flags,
    and the load average around the run (a timing is only read together with these)."""
    threads = f", {run['threads']} threads" if "threads" in run else ""
    commit = f", git {machine['git_commit']}" if machine.get("git_commit") else ""
    date = f" ({run['date']}{commit})" if "date" in run else (f" ({commit[2:]})" if commit else "")
    load = f"Load average at start {_loads(machine['load_avg_start'])}"
    if "load_avg_end" in run:
        load += f", at end {_loads(run['load_avg_end'])}"
    return [
        f"Command: `{run['command']}`{date}.  ",
        f"CPU: {machine['cpu_model']}{threads}; flags {' '.join(machine.get('cpu_flags', []))}.  ",
        f"{load}.  ",
    ]


# headings of the hand-written sections appended to a results file after its run; a re-run
# renders the tables afresh but must not delete what people wrote below them
_FOLLOW_UP_HEADING = re.compile(r"^## (Follow-up|Earlier notes and follow-ups)", re.MULTILINE)


def follow_ups(markdown: str) -> str:
    """The hand-written tail of a results file: from its first follow-up heading to the end
    ("" when it has none)."""
    found = _FOLLOW_UP_HEADING.search(markdown)
    return markdown[found.start() :] if found else ""


def write_results(
    data: dict[str, Any], output_dir: Path, stem: str, render: Callable[[dict[str, Any]], str]
) -> None:
    """``STEM.json`` and ``STEM.md``, each written atomically (a crash leaves the old file).

    The follow-up sections of an existing ``STEM.md`` are kept after the new tables, so a
    re-run into ``benchmarks/results`` replaces the generated part only."""
    from dyadiq.io import write_text_atomic

    output_dir.mkdir(parents=True, exist_ok=True)
    markdown_path = output_dir / f"{stem}.md"
    rendered = render(data)
    kept = follow_ups(markdown_path.read_text()) if markdown_path.exists() else ""
    if kept and not follow_ups(rendered):
        rendered = rendered.rstrip("\n") + "\n\n" + kept
    write_text_atomic(output_dir / f"{stem}.json", json.dumps(data, indent=2, default=str) + "\n")
    write_text_atomic(markdown_path, rendered)
