"""Where a ``--target`` TVM build spends its time: the phases of
:meth:`dyadiq.backends.tvm.target.TvmTarget.emit` timed one by one for a zoo model's integer
program (lower to Relax, legalize + fuse, default schedules, compile, export), with the
largest scheduled PrimFunc (TVMScript characters) and the kernels by schedule source.

MiniLM's x86 build never finished until the integer LayerNorm's square root became one TIR
loop (benchmarks/results/coverage.md, MiniLM follow-up); this keeps the phases measurable.

    nice -n 10 .venv/bin/python -m benchmarks.coverage_build_phases --zoo minilm --target x86

Quantization uses ``--compensate none`` (the build does not depend on the weights' values,
only on the program's ops and shapes) and no evaluation. Timings are wall seconds of this
process: run it on an otherwise idle machine to report them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, machine_info, write_results


def build_phases(program: Any, target_name: str, out_dir: Path) -> dict[str, Any]:
    """Seconds per build phase, as ``TvmTarget.emit`` runs them, and what was built."""
    import tvm

    from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
    from dyadiq.backends.tvm.lower import lower_program
    from dyadiq.backends.tvm.tuning import schedule_module_with_report

    target = target_for(target_name)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    mod = lower_program(program, target=target, float_islands=True)
    seconds["lower"] = time.perf_counter() - start
    start = time.perf_counter()
    prepared = prepare(mod, target)
    seconds["prepare"] = time.perf_counter() - start
    start = time.perf_counter()
    scheduled, report = schedule_module_with_report(prepared, target, database_dir=None, trials=0)
    seconds["schedule"] = time.perf_counter() - start
    start = time.perf_counter()
    executable = compile_prepared(scheduled, target)
    seconds["compile"] = time.perf_counter() - start
    start = time.perf_counter()
    executable.export_library(str(out_dir / "model.so"))
    seconds["export"] = time.perf_counter() - start
    sizes = {
        gv.name_hint: len(str(func))
        for gv, func in scheduled.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc)
    }
    largest = max(sizes, key=sizes.__getitem__)
    sources: dict[str, int] = {}
    for source in report.source.values():
        sources[source] = sources.get(source, 0) + 1
    return {
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 2),
        "primfuncs": len(sizes),
        "largest_primfunc": {"name": largest, "chars": sizes[largest]},
        "kernels_by_schedule_source": sources,
    }


def render(data: dict[str, Any]) -> str:
    lines = [
        "# TVM build phases of a zoo model's integer program",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Date {data['date']}, commit {data['commit']}, load average at start "
        f"{data['load_at_start']}, {data['machine']['cpu_model']} "
        f"({data['machine']['affinity_cpus']} CPUs).",
        "",
        "| model | target | " + " | ".join(data["phases"]) + " | total s | largest PrimFunc |",
        "|---|---|" + "---|" * (len(data["phases"]) + 2),
    ]
    for row in data["rows"]:
        cells = [str(row["seconds"][p]) for p in data["phases"]]
        largest = row["largest_primfunc"]
        lines.append(
            f"| {row['model']} | {row['target']} | "
            + " | ".join(cells)
            + f" | {row['total_seconds']} | {largest['chars']} chars ({largest['name'][:40]}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default="minilm")
    parser.add_argument("--target", default="x86")
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--stem", default="coverage_build_phases")
    args = parser.parse_args()

    from dyadiq.api import quantize

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        quantized = quantize(
            f"zoo:{args.zoo}",
            integer=True,
            evaluate=False,
            compensate="none",
            out=Path(tmp) / "q",
        )
        program = quantized.pipeline.program
        row = {"model": args.zoo, "target": args.target}
        row.update(build_phases(program, args.target, Path(tmp)))
    commit = os.popen(f"git -C {REPO} rev-parse --short HEAD").read().strip()
    data = {
        "command": f"python -m benchmarks.coverage_build_phases --zoo {args.zoo} "
        f"--target {args.target}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "load_at_start": [round(x, 2) for x in load],
        "machine": machine_info(),
        "phases": list(row["seconds"]),
        "rows": [row],
    }
    print(render(data))
    write_results(data, args.output_dir, args.stem, render)


if __name__ == "__main__":
    main()
