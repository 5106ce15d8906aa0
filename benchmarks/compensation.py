"""Weight-rounding compensation on the zoo models, in one run (issue 12).

Per model, all in this process and on the same calibration batches:
- uniform W8A8 / W4A8 / W3A8 with no compensation, each pass alone and all passes together;
- the ILP (measured single-layer damage, HAWQ-V3) at avg-wbits=4.5 and 4.0, once with the
  plain round-to-nearest quantizer and once with the compensated one (the analysis then prices
  the compensated weights at every width);
- onnxruntime ``quantize_static`` W8A8 with each of its calibrators (``benchmarks.baseline``'s
  worker), best of them reported;
- the time compensation takes at all five widths (2, 3, 4, 6, 8) with the best passes.
Every QDQ model is scored on the zoo's held-out split by :func:`dyadiq.evaluation.evaluate`,
whose sessions run with graph optimisation off (exact float simulation, CPU-independent).

    .venv/bin/python -m benchmarks.compensation          # fashion_cnn, mobilenet_v2, ppocr_cls
    .venv/bin/python -m benchmarks.compensation --models fashion_cnn --quick   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import baseline, common

DEFAULT_MODELS = ("fashion_cnn", "mobilenet_v2", "ppocr_cls")
UNIFORM_WIDTHS = (8, 4, 3)
ALL_WIDTHS = (2, 3, 4, 6, 8)
SINGLE_PASSES = ("range", "gptq", "bias")
COMBINED = "range,gptq,bias"
BUDGETS = ("avg-wbits=4.5", "avg-wbits=4.0")
ANALYSIS_SAMPLES = 8
QUICK_EVAL = 64
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c")

log = logging.getLogger("benchmarks.compensation")


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS if f in present]
    except OSError:
        pass
    return []


def _avg_bits(plan: Any, params: dict[str, int]) -> float:
    total = sum(params[k] for k in plan.layers)
    return sum(params[k] * f.weight_bits for k, f in plan.layers.items()) / total


def _ort_models(artifacts: Any, name: str, work: Path, timeout: float) -> dict[str, Any]:
    """onnxruntime quantize_static W8A8 with each calibrator (baseline's worker processes)."""
    calib_dir = work / "calibration"
    baseline.materialise_calibration(artifacts, calib_dir)
    runs: dict[str, Any] = {}
    for calibrator in baseline.ORT_CALIBRATORS:
        label = f"ort_w8a8_{calibrator.lower()}"
        if (name, calibrator) in baseline.ORT_SKIPS:
            runs[label] = {"status": baseline.ORT_SKIPS[(name, calibrator)]}
            continue
        spec = {
            "tool": "ort",
            "method": calibrator,
            "weight_bits": 8,
            "act_bits": 8,
            "model_path": str(artifacts.model_path),
            "calib_dir": str(calib_dir),
            "calib_limit": None,
            "output": str(work / label / "model.onnx"),
            "integer": False,
        }
        runs[label] = baseline.run_quantization(
            spec, work / label / "_run", timeout_s=timeout, mem_cap_mib=8192
        )
    return runs


def benchmark_model(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import onnx

    from dyadiq import zoo
    from dyadiq.evaluation import evaluate
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.allocation import parse_budget, problem_from_report, solve
    from dyadiq.passes.compensation.settings import CompensationSettings
    from dyadiq.passes.sensitivity.analysis import (
        SensitivityConfig,
        analyze_cached,
        output_kind_of,
    )
    from dyadiq.pipeline import PlanBuilder
    from dyadiq.plan import LayerFormat, PrecisionPlan

    log.info("== %s", name)
    start = time.perf_counter()
    artifacts = zoo.get(name)
    metric = artifacts.model.primary_metric
    calibration = list(artifacts.calibration_batches())
    raw = load_onnx(artifacts.model_path)
    runs: dict[str, dict[str, Any]] = _ort_models(artifacts, name, work, args.timeout)
    paths = {k: Path(r["output"]) for k, r in runs.items() if r.get("status") == "ok"}

    variants = ["none", *SINGLE_PASSES, COMBINED, "all"]
    builders: dict[str, Any] = {}
    compensation_time: dict[str, Any] = {}
    for variant in variants:
        settings = CompensationSettings.parse(variant)
        builder = PlanBuilder(raw, calibration, compensation=settings)
        builders[variant] = builder
        widths = ALL_WIDTHS if variant == COMBINED else UNIFORM_WIDTHS
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        builder.compensator.ensure(widths)
        if settings.enabled:
            compensation_time[variant] = {
                "widths": list(widths),
                "seconds_total": time.perf_counter() - t,
                "seconds_per_width": dict(builder.compensator.result.seconds),
                "load_avg_1min_before": load_before,
                "load_avg_1min_after": os.getloadavg()[0],
            }
            log.info("  %s: compensated %s in %.1f s", variant, widths, time.perf_counter() - t)
        for bits in UNIFORM_WIDTHS:
            label = f"dyadiq_w{bits}a8_{variant}"
            path = work / f"{label}.onnx"
            onnx.save(builder.build(PrecisionPlan.uniform(builder.graph, weight_bits=bits)), path)
            runs[label] = {"kind": "uniform", "weight_bits": bits, "compensation": variant}
            paths[label] = path

    graph = builders["none"].graph
    params = {n.name: int(graph.weight(n).values.size) for n in graph.weighted_layers()}
    batches = list(artifacts.calibration_batches(ANALYSIS_SAMPLES))
    kind = output_kind_of(graph, batches)
    sensitivity = SensitivityConfig(
        weight_bits=ALL_WIDTHS,
        trace=False,
        pairs=False,
        entropy=False,
        activations=False,
    )
    formats = [LayerFormat(b, 8) for b in ALL_WIDTHS]
    analysis: dict[str, Any] = {}
    for variant in ("none", COMBINED):
        builder = builders[variant]
        t = time.perf_counter()
        report, cached = analyze_cached(
            graph, batches, kind, sensitivity, weights=builder.compensator.result
        )
        analysis[variant] = {"seconds": time.perf_counter() - t, "cached": cached}
        problem = problem_from_report(graph, report, formats, "empirical")
        for budget in BUDGETS:
            allocation = solve(problem, parse_budget(budget, problem))
            plan = PrecisionPlan(dict(allocation.formats), 8)
            label = f"dyadiq_ilp_{budget.split('=')[1]}_{variant}"
            path = work / f"{label}.onnx"
            onnx.save(builder.build(plan), path)
            runs[label] = {
                "kind": "ilp",
                "budget": budget,
                "compensation": variant,
                "avg_weight_bits": _avg_bits(plan, params),
                "bits_histogram": {
                    str(b): sum(1 for f in plan.layers.values() if f.weight_bits == b)
                    for b in ALL_WIDTHS
                },
                "predicted_damage": allocation.predicted_damage,
            }
            paths[label] = path

    t = time.perf_counter()
    limit = QUICK_EVAL if args.quick else None
    metrics = evaluate(artifacts, paths, limit=limit)
    eval_s = time.perf_counter() - t
    for label, values in metrics.items():
        if label != "float":
            runs[label]["metrics"] = values
    ort_scores = {
        k: r["metrics"][metric] for k, r in runs.items() if k.startswith("ort_") and "metrics" in r
    }
    best_ort = max(ort_scores, key=lambda k: ort_scores[k]) if ort_scores else None
    reports = builders[COMBINED].compensator.result.report()
    equalization = builders["all"].equalization
    return {
        "primary_metric": metric,
        "reported_metrics": list(baseline.REPORTED_METRICS[name]),
        "calibration_batches": len(calibration),
        "evaluation_limit": limit,
        "float": metrics["float"],
        "runs": runs,
        "best_ort": best_ort,
        "compensation_time": compensation_time,
        "analysis": analysis,
        "layer_reports": reports,
        "cross_layer_equalization": equalization,
        "eval_s": eval_s,
        "total_s": time.perf_counter() - start,
    }


def _f(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _uniform_table(model: dict[str, Any]) -> list[str]:
    metric = model["primary_metric"]
    variants = ["none", *SINGLE_PASSES, COMBINED, "all"]
    lines = [
        f"| uniform ({metric}) | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for bits in UNIFORM_WIDTHS:
        cells = []
        for v in variants:
            run = model["runs"].get(f"dyadiq_w{bits}a8_{v}", {})
            cells.append(_f(run.get("metrics", {}).get(metric)))
        lines.append(f"| W{bits}A8 | " + " | ".join(cells) + " |")
    return lines


def _ilp_table(model: dict[str, Any]) -> list[str]:
    metric = model["primary_metric"]
    lines = [
        f"| ILP budget | compensation | avg weight bits | layers at 2/3/4/6/8 bits | {metric} |",
        "|---|---|---|---|---|",
    ]
    for _label, run in model["runs"].items():
        if run.get("kind") != "ilp":
            continue
        hist = "/".join(str(run["bits_histogram"][str(b)]) for b in ALL_WIDTHS)
        lines.append(
            f"| {run['budget']} | {run['compensation']} | {run['avg_weight_bits']:.3f} | {hist} "
            f"| {_f(run.get('metrics', {}).get(metric))} |"
        )
    return lines


def _layer_error_summary(model: dict[str, Any]) -> list[str]:
    """Median relative layer output error per width and stage, over the model's layers."""
    stages = ("error_round_to_nearest", "error_after_range", "error_after_gptq", "error_after_bias")
    lines = [
        "| width | " + " | ".join(s.removeprefix("error_") for s in stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    layers = model["layer_reports"]["layers"]
    for bits in ALL_WIDTHS:
        cells = []
        for stage in stages:
            values = [
                e[str(bits)][stage]
                for e in layers.values()
                if str(bits) in e and e[str(bits)].get(stage) is not None
            ]
            cells.append(_f(float(np.median(values)), ".3g") if values else "-")
        lines.append(f"| W{bits} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    machine = data["machine"]
    out = [
        "# Weight-rounding compensation (issue 12)",
        "",
        f"Command: `{data['command']}`  ",
        f"Date: {data['date']}  ",
        f"Machine: {machine['cpu_model']}, {machine['affinity_cpus']} CPUs usable, "
        f"CPU flags {', '.join(data['cpu_flags']) or 'none of interest'}; load average at "
        f"start {', '.join(f'{x:.2f}' for x in machine['load_avg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in data['load_avg_end'])} (the machine was shared).  ",
        f"onnxruntime {machine['onnxruntime']}, git {machine['git_commit']}"
        f"{' (dirty)' if machine['git_dirty'] else ''}.",
        "",
        "QDQ models are scored on each zoo model's held-out split by "
        "`dyadiq.evaluation.evaluate` with onnxruntime graph optimisation disabled (an exact "
        "float simulation of the QDQ model, independent of the CPU). Activations are 8-bit, "
        "percentile-calibrated (dyadiq's default). `range,gptq,bias` is every pass applied in "
        "that order: clipping-scale search on the layer output error, GPTQ, bias correction. "
        "Compensation reads each layer's inputs from the already quantized prefix "
        f"({data['compensation_samples']} calibration batches). `all` adds cross-layer "
        "equalisation (CLE) before them; the pairs it equalised and declined are listed per "
        "model.",
        "",
    ]
    for name, model in data["models"].items():
        metric = model["primary_metric"]
        out += [f"## {name}", ""]
        if "error" in model:
            out += [f"failed: {model['error']}", ""]
            continue
        out += [f"Float {metric}: {_f(model['float'].get(metric))}.", ""]
        out += [*_uniform_table(model), ""]
        out += [*_ilp_table(model), ""]
        ort = [
            f"{k}: {_f(r.get('metrics', {}).get(metric))}"
            if "metrics" in r
            else f"{k}: {r.get('status')}"
            for k, r in model["runs"].items()
            if k.startswith("ort_")
        ]
        out += [
            f"onnxruntime quantize_static W8A8 (per-channel QDQ): {'; '.join(ort)}. "
            f"Best: {model['best_ort']}.",
            "",
        ]
        times = model["compensation_time"].get(COMBINED)
        if times:
            per = ", ".join(
                f"W{b} {s:.1f} s" for b, s in sorted(times["seconds_per_width"].items())
            )
            out += [
                f"Compensation time ({COMBINED}, widths {times['widths']}): "
                f"{times['seconds_total']:.1f} s ({per}); 1-minute load average "
                f"{times['load_avg_1min_before']:.2f} before, {times['load_avg_1min_after']:.2f} "
                "after.",
                "",
            ]
        cle = model.get("cross_layer_equalization") or {}
        declined: dict[str, int] = {}
        for item in cle.get("declined", []):
            reason = item["reason"].split(":")[0]
            declined[reason] = declined.get(reason, 0) + 1
        out += [
            f"CLE (`all`): {len(cle.get('equalized_pairs', []))} pair(s) equalised; declined: "
            + ("; ".join(f"{n} x {r}" for r, n in sorted(declined.items())) or "none")
            + ".",
            "",
        ]
        out += [
            "Median relative layer output error E||(W - Q)x||^2 / E||Wx||^2 over layers, "
            "after each stage (range, gptq, bias: with all three on):",
            "",
        ]
        out += [*_layer_error_summary(model), ""]
    if data.get("notes"):
        out += ["## Notes", "", *data["notes"], ""]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--quick", action="store_true", help=f"evaluate on {QUICK_EVAL} samples only")
    p.add_argument("--timeout", type=float, default=1800.0, help="per onnxruntime run, seconds")
    p.add_argument("--output", type=Path, default=baseline.DEFAULT_OUTPUT)
    p.add_argument("--notes", nargs="*", default=[], help="lines appended to the results file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dyadiq.passes.compensation.settings import CompensationSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    command = " ".join(
        [".venv/bin/python -m benchmarks.compensation", *map(shlex.quote, sys.argv[1:])]
    )
    data: dict[str, Any] = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "cpu_flags": _cpu_flags(),
        "compensation_samples": CompensationSettings().samples,
        "models": {},
        "notes": args.notes,
    }
    with tempfile.TemporaryDirectory(prefix="dyadiq-compensation-") as tmp:
        for name in args.models:
            try:
                data["models"][name] = benchmark_model(name, Path(tmp) / name, args)
            except Exception as exc:  # one model's failure is recorded, not fatal
                log.exception("%s failed", name)
                data["models"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    data["load_avg_end"] = list(os.getloadavg())
    stem = "compensation_quick" if args.quick else "compensation"
    common.write_results(data, args.output, stem, render_markdown)
    return data


if __name__ == "__main__":
    main()
