"""Weight-rounding compensation on the zoo models, in one run (issue 12).

Per model, all in this process and on the same calibration batches:
- uniform W8A8 / W4A8 / W3A8 with no compensation, each pass alone and all passes together;
- the ILP (measured single-layer damage, HAWQ-V3) at avg-wbits=4.5 and 4.0, once with the
  plain round-to-nearest quantizer and once with the compensated one (the analysis then prices
  the compensated weights at every width);
- onnxruntime ``quantize_static`` W8A8 with each of its calibrators (``benchmarks.baseline``'s
  worker), best of them reported;
- the compensated ILP with 5 and 7 bits among its candidates (rows `range,gptq,bias (widths
  2-8)`, the tool's default candidates; every width compensated like the others), and once
  more priced by damage measured on top of the A8 model (rows `... A8 damage`: each layer's
  loss with every activation site quantized as the plan does, less the A8 model's own);
- with ``--plan-aware``: the ILP plans once more with weights compensated for that plan itself
  (every layer on its plan width and the plan's own quantized prefix,
  ``SequentialCompensator.for_plan``);
- the time compensation takes at all seven widths (2-8) with the best passes.
Every QDQ model is scored on the zoo's held-out split by :func:`dyadiq.evaluation.evaluate`,
whose sessions run with graph optimisation off (exact float simulation, CPU-independent).
MobileNetV2's ILP, W8A8 and onnxruntime rows are also scored on a 3x larger split of the same
evaluation photos (:mod:`benchmarks.photo_split`), compared paired with onnxruntime's best.

    .venv/bin/python -m benchmarks.compensation          # fashion_cnn, mobilenet_v2, ppocr_cls
    .venv/bin/python -m benchmarks.compensation --models minilm --grid reduced
    .venv/bin/python -m benchmarks.compensation --models fashion_cnn --quick   # smoke test
    .venv/bin/python -m benchmarks.compensation --merge a.json b.json   # one file from parts
"""

from __future__ import annotations

import argparse
import dataclasses
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

from benchmarks import baseline, common, photo_split

DEFAULT_MODELS = ("fashion_cnn", "mobilenet_v2", "ppocr_cls")
UNIFORM_WIDTHS = (8, 4, 3)
ALL_WIDTHS = (2, 3, 4, 6, 8)
# the ILP once more with 5 and 7 bits among its candidates (MobileNetV2 at 4.5 bits: +0.040
# top-1 agreement on the 744-crop split, paired, against the 2/3/4/6/8 candidates)
FINE_WIDTHS = (2, 3, 4, 5, 6, 7, 8)
FINE_SUFFIX = " (widths 2-8)"
A8_SUFFIX = ", A8 damage"  # the analysis measured each layer on top of the A8 model
SINGLE_PASSES = ("range", "gptq", "bias")
COMBINED = "range,gptq,bias"
BUDGETS = ("avg-wbits=4.5", "avg-wbits=4.0")
PLAN_AWARE = COMBINED + "+plan"  # the ILP plan recompensated on its own prefix
# --grid reduced (MiniLM on 2 shared cores: one width of its 36 Gemms costs minutes): the
# single passes at W4 only and no `all` column (CLE rescales Conv pairs; MiniLM has none, so
# `all` would repeat range,gptq,bias), everything else as in the full grid
REDUCED_SINGLE_WIDTHS = (4,)
LARGER_SPLIT_MODELS = ("mobilenet_v2",)
LARGER_SPLIT_W8A8 = ("dyadiq_w8a8_none", f"dyadiq_w8a8_{COMBINED}")
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


def _ort_models(
    artifacts: Any,
    name: str,
    work: Path,
    timeout: float,
    calib_limit: int | None,
    calibrators: tuple[str, ...] = baseline.ORT_CALIBRATORS,
) -> dict[str, Any]:
    """onnxruntime quantize_static W8A8 with each calibrator (baseline's worker processes)."""
    calib_dir = work / "calibration"
    baseline.materialise_calibration(artifacts, calib_dir)
    runs: dict[str, Any] = {}
    for calibrator in calibrators:
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
            "calib_limit": calib_limit,  # the same leading batches dyadiq calibrates on
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
    calibration = list(artifacts.calibration_batches(args.calib_limit))
    raw = load_onnx(artifacts.model_path)
    runs: dict[str, dict[str, Any]] = _ort_models(
        artifacts, name, work, args.timeout, args.calib_limit
    )
    paths = {k: Path(r["output"]) for k, r in runs.items() if r.get("status") == "ok"}

    variants = ["none", *SINGLE_PASSES, COMBINED, "all"]
    if args.grid == "reduced":
        variants.remove("all")  # MiniLM has no Conv: CLE finds no pair, `all` = COMBINED
    if args.grid == "ilp":
        variants = ["none", COMBINED]  # the uniform rows' other columns: an earlier run
    builders: dict[str, Any] = {}
    compensation_time: dict[str, Any] = {}
    for variant in variants:
        settings = CompensationSettings.parse(variant)
        builder = PlanBuilder(raw, calibration, compensation=settings)
        builders[variant] = builder
        widths = FINE_WIDTHS if variant == COMBINED else UNIFORM_WIDTHS
        if args.grid == "reduced" and variant in SINGLE_PASSES:
            widths = REDUCED_SINGLE_WIDTHS
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
        for bits in sorted(set(UNIFORM_WIDTHS) & set(widths), reverse=True):
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
    analysis: dict[str, Any] = {}
    ilps = (
        ("none", FINE_WIDTHS, False),
        (COMBINED, ALL_WIDTHS, False),
        (COMBINED, FINE_WIDTHS, False),
        (COMBINED, FINE_WIDTHS, True),
    )
    for variant, widths, a8 in ilps:
        builder = builders[variant]
        fine = widths == FINE_WIDTHS
        builder.compensator.ensure(widths)  # 5 and 7 bits: compensated like the others
        config = dataclasses.replace(sensitivity, weight_bits=widths)
        t = time.perf_counter()
        report, cached = analyze_cached(
            graph,
            batches,
            kind,
            config,
            weights=builder.compensator.result,
            activation_quant=builder.compensator.act_params if a8 else None,
        )
        analysis[variant + (FINE_SUFFIX if fine else "") + (A8_SUFFIX if a8 else "")] = {
            "seconds": time.perf_counter() - t,
            "cached": cached,
            "notes": list(report.notes),
        }
        formats = [LayerFormat(b, 8) for b in widths]
        problem = problem_from_report(graph, report, formats, "empirical")
        for budget in BUDGETS:
            allocation = solve(problem, parse_budget(budget, problem))
            plan = PrecisionPlan(dict(allocation.formats), 8)
            label = (
                f"dyadiq_ilp_{budget.split('=')[1]}_{variant}"
                + ("_w2-8" if fine else "")
                + ("_a8" if a8 else "")
            )
            path = work / f"{label}.onnx"
            onnx.save(builder.build(plan), path)
            runs[label] = {
                "kind": "ilp",
                "budget": budget,
                "compensation": variant,
                "candidates": list(widths),
                "a8_damage": a8,
                "avg_weight_bits": _avg_bits(plan, params),
                "bits_histogram": {
                    str(b): sum(1 for f in plan.layers.values() if f.weight_bits == b)
                    for b in FINE_WIDTHS
                },
                "predicted_damage": allocation.predicted_damage,
            }
            paths[label] = path
            if args.plan_aware and variant == COMBINED and not fine:
                aware = f"dyadiq_ilp_{budget.split('=')[1]}_{PLAN_AWARE}"
                runs[aware], paths[aware] = _plan_aware(builder, plan, runs[label], work / aware)

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
    larger = None
    if name in LARGER_SPLIT_MODELS and not args.quick:
        larger = _larger_split(artifacts, paths, runs)
    reports = builders[COMBINED].compensator.result.report()
    equalization = builders["all"].equalization if "all" in builders else None
    return {
        "primary_metric": metric,
        "grid": args.grid,
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
        "larger_split": larger,
        "eval_s": eval_s,
        "total_s": time.perf_counter() - start,
    }


def _plan_aware(
    builder: Any, plan: Any, per_width_run: dict[str, Any], stem: Path
) -> tuple[dict[str, Any], Path]:
    """The ILP ``plan`` built with weights compensated for it (its own prefix, one pass)."""
    import onnx

    from dyadiq.pipeline import export_qdq, insert_qdq

    t = time.perf_counter()
    weights = builder.compensator.for_plan({k: f.weight_bits for k, f in plan.layers.items()})
    seconds = time.perf_counter() - t
    qdq = insert_qdq(builder.graph, plan, builder.sites, builder.ranges, weights)
    path = stem.with_suffix(".onnx")
    onnx.save(export_qdq(qdq.graph), path)
    run = {**per_width_run, "compensation": PLAN_AWARE, "plan_compensation_s": seconds}
    return run, path


def _larger_split(artifacts: Any, paths: dict[str, Path], runs: dict[str, Any]) -> dict[str, Any]:
    """The ILP, W8A8 and onnxruntime rows on :mod:`benchmarks.photo_split`, each dyadiq row
    compared paired with onnxruntime's best on that split."""
    chosen = {
        k: p
        for k, p in paths.items()
        # W8A8 without and with the default passes only (the other columns: the zoo split)
        if k.startswith(("ort_", "dyadiq_ilp_")) or k in LARGER_SPLIT_W8A8
    }
    t = time.perf_counter()
    scores = photo_split.score(Path(artifacts.model_path), chosen)
    ort = [k for k in chosen if k.startswith("ort_")]
    best = max(ort, key=scores.agreement) if ort else None
    rows = {}
    for k in chosen:
        rows[k] = {
            "top1_agreement": scores.agreement(k),
            "standard_error": scores.standard_error(k),
            "vs_best_ort": scores.paired(k, best) if best and k != best else None,
        }
        if k in runs:
            runs[k].setdefault("larger_split", rows[k])
    return {
        "crops": scores.crops,
        "photos": int(np.unique(scores.photo).size),
        "crops_per_photo": photo_split.CROPS_PER_PHOTO,
        "best_ort": best,
        "rows": rows,
        "seconds": time.perf_counter() - t,
    }


def _larger_split_table(model: dict[str, Any]) -> list[str]:
    split = model.get("larger_split")
    if not split:
        return []
    lines = [
        f"Larger split ({split['crops']} crops: {split['photos']} evaluation photos x "
        f"{split['crops_per_photo']} crops, seed {photo_split.SEED}; standard errors and "
        "intervals by a photo bootstrap, differences paired on the same crops against "
        f"{split['best_ort']}):",
        "",
        "| model | top1_agreement | std err | minus best onnxruntime | 95% interval | "
        "P(not worse) |",
        "|---|---|---|---|---|---|",
    ]
    for k, row in split["rows"].items():
        diff = row["vs_best_ort"]
        cells = (
            [
                _f(diff["difference"], "+.4f"),
                f"[{diff['ci95_low']:+.3f}, {diff['ci95_high']:+.3f}]",
                _f(diff["p_not_worse"], ".3f"),
            ]
            if diff
            else ["-", "-", "-"]
        )
        lines.append(
            f"| {k} | {row['top1_agreement']:.4f} | {row['standard_error']:.4f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


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
        "| ILP budget | compensation | avg weight bits | layers at 2/3/4/5/6/7/8 bits "
        f"| {metric} |",
        "|---|---|---|---|---|",
    ]
    for _label, run in model["runs"].items():
        if run.get("kind") != "ilp":
            continue
        hist = "/".join(str(run["bits_histogram"].get(str(b), 0)) for b in FINE_WIDTHS)
        if run["compensation"] == PLAN_AWARE:
            hist += " (same plan)"
        lines.append(
            f"| {run['budget']} | {run['compensation']}{_candidates(run)} | "
            f"{run['avg_weight_bits']:.3f} | {hist} "
            f"| {_f(run.get('metrics', {}).get(metric))} |"
        )
    return lines


def _candidates(run: dict[str, Any]) -> str:
    widths = tuple(run.get("candidates", ALL_WIDTHS))
    label = "widths 2-8" if widths == FINE_WIDTHS else ""
    if run.get("a8_damage"):
        label = f"{label}{A8_SUFFIX}" if label else A8_SUFFIX.removeprefix(", ")
    return f" ({label})" if label else ""


def _layer_error_summary(model: dict[str, Any]) -> list[str]:
    """Median relative layer output error per width and stage, over the model's layers."""
    stages = ("error_round_to_nearest", "error_after_range", "error_after_gptq", "error_after_bias")
    lines = [
        "| width | " + " | ".join(s.removeprefix("error_") for s in stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    layers = model["layer_reports"]["layers"]
    for bits in FINE_WIDTHS:
        cells = []
        for stage in stages:
            values = [
                e[str(bits)][stage]
                for e in layers.values()
                if str(bits) in e and e[str(bits)].get(stage) is not None
            ]
            cells.append(_f(float(np.median(values)), ".3g") if values else "-")
        if any(c != "-" for c in cells):  # older results have no 5- and 7-bit entries
            lines.append(f"| W{bits} | " + " | ".join(cells) + " |")
    return lines


def _run_header(data: dict[str, Any]) -> list[str]:
    machine = data["machine"]
    return [
        f"Command: `{data['command']}`  ",
        f"Date: {data['date']}  ",
        f"Machine: {machine['cpu_model']}, {machine['affinity_cpus']} CPUs usable, "
        f"CPU flags {', '.join(data['cpu_flags']) or 'none of interest'}; load average at "
        f"start {', '.join(f'{x:.2f}' for x in machine['load_avg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in data['load_avg_end'])} (the machine was shared).  ",
        f"onnxruntime {machine['onnxruntime']}, git {machine['git_commit']}"
        f"{' (dirty)' if machine['git_dirty'] else ''}."
        + _GRID_NOTES.get(data.get("grid", "full"), ""),
    ]


_GRID_NOTES = {
    "reduced": "  \nGrid: reduced (single passes at W4 only, no `all`: CLE finds no Conv pair "
    "in MiniLM; `-` where not run).",
    "ilp": "  \nGrid: ilp (uniform rows without compensation and with range,gptq,bias only, "
    "every ILP row; single passes and `all` not run: `-`).",
}


def render_markdown(data: dict[str, Any]) -> str:
    header: list[str] = []
    if "parts" in data:
        header += [
            f"This file joins {len(data['parts'])} separate runs (`--merge`), each with its own "
            "command, date and load below; a model appears once, from the run named with it."
        ]
    for part in data.get("parts", [data]):
        if "parts" in data:
            header += ["", f"Run for {', '.join(part['model_names'])}:", ""]
        header += _run_header(part)
    out = [
        "# Weight-rounding compensation (issue 12)",
        "",
        *header,
        "",
        "QDQ models are scored on each zoo model's held-out split by "
        "`dyadiq.evaluation.evaluate` with onnxruntime graph optimisation disabled (an exact "
        "float simulation of the QDQ model, independent of the CPU). Activations are 8-bit, "
        "calibrated by dyadiq's default `auto` (the 99.99th percentile; MSE for LayerNorm "
        "outputs). `range,gptq,bias` is every pass applied in "
        "that order: clipping-scale search on the layer output error, GPTQ, bias correction. "
        "Compensation reads each layer's inputs from the already quantized prefix "
        f"({data['compensation_samples']} calibration batches). `all` adds cross-layer "
        "equalisation (CLE) before them; the pairs it equalised and declined are listed per "
        "model.",
        "",
    ]
    for name, model in data["models"].items():
        out += [f"## {name}", ""]
        if "error" in model:
            out += [f"failed: {model['error']}", ""]
            continue
        metric = model["primary_metric"]
        out += [
            f"Float {metric}: {_f(model['float'].get(metric))}. Calibration batches "
            f"(dyadiq's activation ranges and onnxruntime's): {model['calibration_batches']}.",
            "",
        ]
        out += [*_uniform_table(model), ""]
        out += [*_ilp_table(model), ""]
        plan_s = [
            r["plan_compensation_s"] for r in model["runs"].values() if "plan_compensation_s" in r
        ]
        if plan_s:
            out += [
                f"`{PLAN_AWARE}`: the same plan as the `{COMBINED}` row above, its weights "
                "compensated once more for that plan (each layer on its plan width and the "
                "plan's own quantized prefix instead of a uniform one): "
                + ", ".join(f"{s:.1f} s" for s in plan_s)
                + ".",
                "",
            ]
        larger = _larger_split_table(model)
        if larger:
            out += [*larger, ""]
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
        cle = model.get("cross_layer_equalization")
        declined: dict[str, int] = {}
        for item in (cle or {}).get("declined", []):
            reason = item["reason"].split(":")[0]
            declined[reason] = declined.get(reason, 0) + 1
        out += [
            f"CLE (`all`): not run (`--grid {model.get('grid', data.get('grid'))}`)."
            if cle is None
            else f"CLE (`all`): {len(cle.get('equalized_pairs', []))} pair(s) equalised; "
            "declined: "
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
    p.add_argument("--stem", default="compensation", help="results file name, without suffix")
    p.add_argument(
        "--calib-limit",
        type=int,
        default=None,
        help="calibrate dyadiq and onnxruntime on the first N calibration batches only",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        help="write one results file from these JSON results of separate runs (no run)",
    )
    p.add_argument(
        "--grid",
        choices=["full", "reduced", "ilp"],
        default="full",
        help="reduced: single passes at W4 only, no `all` (for MiniLM on a shared machine); "
        "ilp: no single passes and no `all` (the ILP rows and their uniform references)",
    )
    p.add_argument(
        "--plan-aware",
        action="store_true",
        help="also the ILP plans recompensated for themselves (measured: no gain; slow)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dyadiq.passes.compensation.settings import CompensationSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output, args.stem, args.notes)
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
    data["grid"] = args.grid
    stem = "compensation_quick" if args.quick and args.stem == "compensation" else args.stem
    common.write_results(data, args.output, stem, render_markdown)
    return data


def merge(parts: list[Path], output: Path, stem: str, notes: list[str]) -> dict[str, Any]:
    """One results file from separate runs: the models of each, every run's own header
    (command, date, load) kept; a model measured twice keeps its last run. A part that is
    itself a merged file contributes its own runs; a run none of whose models is kept is
    dropped."""
    import json

    runs: list[dict[str, Any]] = []
    for path in parts:
        data = json.loads(path.read_text())
        for run in data.get("parts", [data]):
            names = run.get("model_names", list(data["models"]))
            header = {k: v for k, v in run.items() if k not in ("models", "model_names", "parts")}
            runs.append({**header, "models": {k: data["models"][k] for k in names}})
    source = {name: i for i, r in enumerate(runs) for name in r["models"]}
    kept = [(i, r) for i, r in enumerate(runs) if any(source[name] == i for name in r["models"])]
    data = {
        "parts": [
            {
                **{k: v for k, v in r.items() if k != "models"},
                "model_names": [name for name in r["models"] if source[name] == i],
            }
            for i, r in kept
        ],
        "compensation_samples": runs[0]["compensation_samples"],
        "models": {name: runs[i]["models"][name] for name, i in source.items()},
        "notes": notes,
    }
    common.write_results(data, output, stem, render_markdown)
    return data


if __name__ == "__main__":
    main()
