"""A plan chosen under a latency budget, then built and measured: does it meet the budget?

    .venv/bin/python -m benchmarks.latency_budget                  # mobilenet_v2
    .venv/bin/python -m benchmarks.latency_budget --slack 1.05 --size 0.6x

Steps, each the way a user would do it:

1. the model's per-layer latency table on this CPU (``measure_layer_latency``: each weighted
   layer's TVM kernel timed alone, per candidate weight width, in the lowering ``--target
   x86`` builds), keyed by the plan's layer ids;
2. ``dyadiq quantize --zoo MODEL --budget size=SIZE,latency=BUDGETms --latency-table TABLE
   --target x86``: the ILP picks per-layer formats under both budgets, the integer model is
   compiled for this CPU and checked bit-exact there. The latency budget is ``slack`` times
   the all-W8A8 sum of the table;
3. the chosen plan's kernels are timed again, each at its chosen format (a fresh measurement,
   not the table), and the built library is timed end to end, next to onnxruntime float.

The budget constrains the sum of the weighted layers' kernel times (what the table covers);
end-to-end time also includes the unweighted kernels (adds, input quantization, pooling) and
the VM's calls, reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, machine_info, write_results
from benchmarks.latency import median_ms, ort_session

FORMATS = ((8, 8), (6, 8), (4, 8), (3, 8), (2, 8))


def run(model: str, *, slack: float, size: str, threads: int, repeat: int) -> dict[str, Any]:
    import tvm
    from tvm import relax

    from dyadiq import zoo
    from dyadiq.backends.tvm.build import LIBRARY_NAME, host_x86_target
    from dyadiq.backends.tvm.layer_latency import measure_layer_latency
    from dyadiq.pipeline import quantize
    from dyadiq.plan import LayerFormat, PrecisionPlan

    artifacts = zoo.get(model)
    calibration = list(artifacts.calibration_batches())
    target = tvm.target.Target({**host_x86_target(), "num-cores": threads})
    result: dict[str, Any] = {"model": model, "slack": slack, "size_budget": size}
    with tempfile.TemporaryDirectory(prefix="dyadiq-latency-budget-") as tmp:
        work = Path(tmp)
        # 1. the table, measured on the W8A8 program (every format runs the same kernel)
        w8 = quantize(artifacts.model_path, work / "w8", calibration, integer=True, check_batches=1)
        assert w8.program is not None
        layer_ids = list(w8.plan.layers)
        formats = [LayerFormat(w, a) for w, a in FORMATS]
        start = time.perf_counter()
        table = measure_layer_latency(w8.program, formats, target, layer_ids=layer_ids, repeat=20)
        table.threads = threads
        result["table_s"] = time.perf_counter() - start
        table_path = work / "latency.json"
        table.save(table_path)
        result["table"] = table.layers
        w8_sum = sum(row["W8A8"] for row in table.layers.values())
        budget_ms = slack * w8_sum
        result["table_w8a8_sum_ms"] = w8_sum
        result["latency_budget_ms"] = budget_ms
        # 2. the CLI: allocation under both budgets, integer build for x86, bit-exact check
        out = work / "out"
        command = [
            sys.executable, "-m", "dyadiq.cli", "quantize", "--zoo", model, "-o", str(out),
            "--budget", f"size={size},latency={budget_ms:.4f}ms",
            "--latency-table", str(table_path), "--proxy", "empirical",
            "--analysis-samples", "4", "--target", "x86", "--no-eval",
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        result["quantize_s"] = time.perf_counter() - start
        result["command"] = " ".join(command[1:])
        if proc.returncode != 0:
            raise RuntimeError(
                f"dyadiq quantize failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        report = json.loads((out / "report.json").read_text())
        allocation = report.get("allocation", {})
        result["predicted_latency_ms"] = allocation.get("latency")
        result["weight_bytes"] = allocation.get("weight_bytes")
        result["target_report"] = report.get("targets", report.get("target"))
        plan = PrecisionPlan.load(out / "plan.json")
        chosen = {layer: fmt.label for layer, fmt in plan.layers.items()}
        result["plan_formats"] = chosen
        result["plan_histogram"] = {
            label: sum(1 for v in chosen.values() if v == label)
            for label in sorted(set(chosen.values()))
        }
        # 3. re-measure the chosen plan's kernels, each at its own format
        built = quantize(
            artifacts.model_path,
            work / "plan",
            calibration,
            plan=plan,
            integer=True,
            check_batches=1,
        )
        assert built.program is not None
        used = sorted({fmt for fmt in plan.layers.values()}, key=lambda f: f.label)
        again = measure_layer_latency(built.program, used, target, layer_ids=layer_ids, repeat=20)
        measured = sum(again.layers[layer][chosen[layer]] for layer in layer_ids)
        result["measured_plan_kernels_ms"] = measured
        result["meets_budget"] = measured <= budget_ms
        # end to end: the library the CLI built, and onnxruntime float on the same input
        feeds_batch, _ = next(iter(artifacts.evaluation_batches(1)))
        feeds = {k: np.ascontiguousarray(v[:1]) for k, v in feeds_batch.items()}
        library = next((out / "x86").rglob(LIBRARY_NAME))
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
        args = [tvm.runtime.tensor(feeds[name]) for name in built.program.inputs]
        session = ort_session(artifacts.model_path, threads, spin=False)
        result["end_to_end_ms"] = median_ms(lambda: vm["main"](*args), warmup=5, repeat=repeat)
        result["ort_float_ms"] = median_ms(
            lambda: session.run(None, feeds), warmup=5, repeat=repeat
        )
    result["load_avg_after"] = list(os.getloadavg())
    return result


def render(data: dict[str, Any]) -> str:
    r = data["result"]
    lines = [
        "# A plan chosen under a latency budget, built and measured",
        "",
        f"Command: `{data['run']['command']}`  ",
        f"Threads: {data['run']['threads']}; CPU: {data['machine']['cpu_model']}; load average "
        f"at start {', '.join(f'{x:.1f}' for x in data['run']['load_avg_start'])}, after "
        f"{', '.join(f'{x:.1f}' for x in r['load_avg_after'])}.",
        "",
        f"- model: {r['model']}; per-layer table measured through TVM (x86 lowering) in "
        f"{r['table_s']:.0f} s; all-W8A8 sum of the table {r['table_w8a8_sum_ms']:.3f} ms",
        f"- budget: size={r['size_budget']}, latency={r['latency_budget_ms']:.3f} ms "
        f"({r['slack']} x the W8A8 sum); `dyadiq {r['command'].split(' ', 2)[-1]}` took "
        f"{r['quantize_s']:.0f} s",
        f"- plan: {r['plan_histogram']}; weights {r['weight_bytes']:,} B; predicted latency "
        f"(table) {r['predicted_latency_ms']:.3f} ms",
        "- measured again, each kernel at its chosen format: "
        f"**{r['measured_plan_kernels_ms']:.3f} ms "
        f"{'<=' if r['meets_budget'] else '>'} budget {r['latency_budget_ms']:.3f} ms** "
        f"({'met' if r['meets_budget'] else 'NOT met'})",
        f"- end to end (the built library, all kernels and VM calls): {r['end_to_end_ms']:.3f} ms; "
        f"onnxruntime float, same input and threads: {r['ort_float_ms']:.3f} ms "
        f"(ratio {r['end_to_end_ms'] / r['ort_float_ms']:.2f})",
        "",
        "Per-layer table (ms, kernel alone; all formats run the same int8-container kernel, so "
        "rows differ only by noise):",
        "",
        "| layer | " + " | ".join(f"W{w}A{a}" for w, a in FORMATS) + " | chosen |",
        "|---|" + "---:|" * len(FORMATS) + "---|",
    ]
    for layer, row in r["table"].items():
        cells = " | ".join(f"{row[f'W{w}A{a}']:.3f}" for w, a in FORMATS)
        lines.append(f"| {layer} | {cells} | {r['plan_formats'][layer]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--slack", type=float, default=1.05)
    parser.add_argument("--size", default="0.6x")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
    data: dict[str, Any] = {
        "machine": machine_info(),
        "run": {
            "command": "python -m benchmarks.latency_budget "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "threads": args.threads,
            "load_avg_start": list(os.getloadavg()),
        },
    }
    data["result"] = run(
        args.model, slack=args.slack, size=args.size, threads=args.threads, repeat=args.repeat
    )
    write_results(data, args.output_dir, "latency_budget", render)
    print(render(data))


if __name__ == "__main__":
    main()
