"""End-to-end activation range search measured (issue 12): the same plans with and without it.

Per model, in one process: one :class:`~dyadiq.pipeline.PlanBuilder` with the default
(histogram) activation ranges and range,gptq,bias compensation at widths 2-8, and the same
ranges after :mod:`dyadiq.passes.calibration.range_search` (``--evaluations`` candidate
evaluations on the first ``--samples`` calibration batches; never the evaluation split). The
searched ranges' calibration KL is also measured on calibration batches the search did not
read (``--samples`` to 2x that), the overfitting check. Then uniform W8A8 and the ILP at each
budget (the empirical analysis on the first 8 calibration batches, as the compensation
benchmark), each built twice: default ranges, searched ranges. With ``--recompensate`` the
searched variant's weights are compensated again on a prefix quantized with the searched
ranges, and its own analysis and ILP choose its plans (what a default-on search would do);
without it both variants share the default's compensated weights and plans, so the
difference is the activation ranges alone. Scored on the zoo's held-out split, and
MobileNetV2's also on the 744-crop split (:mod:`benchmarks.photo_split`), paired against
onnxruntime ``quantize_static`` W8A8 percentile built in the same run (the compensation
benchmark's code) and searched against default.

    .venv/bin/python -m benchmarks.range_search --models mobilenet_v2 ppocr_cls fashion_cnn \\
        -o benchmarks/results/range_search.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import photo_split

WIDTHS = (2, 3, 4, 5, 6, 7, 8)
ANALYSIS_SAMPLES = 8
COMPENSATION = "range,gptq,bias"
BUDGETS = ("avg-wbits=4.5", "avg-wbits=4.0")


def _compensated(builder: Any, cache: Path | None) -> None:
    """Compensate at every width, through a pickle cache (compensation is deterministic)."""
    if cache is not None and cache.is_file():
        builder.compensator.result = pickle.loads(cache.read_bytes())
    builder.compensator.ensure(WIDTHS)
    if cache is not None and not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(builder.compensator.result))


def _plans(builder: Any, budgets: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Uniform W8A8 and the ILP's plan per budget on ``builder``'s compensated weights."""
    from dyadiq.passes.allocation import parse_budget, problem_from_report, solve
    from dyadiq.passes.sensitivity.analysis import (
        SensitivityConfig,
        analyze_cached,
        output_kind_of,
    )
    from dyadiq.plan import LayerFormat, PrecisionPlan

    graph = builder.graph
    batches = builder.calibration[:ANALYSIS_SAMPLES]
    kind = output_kind_of(graph, batches)
    config = SensitivityConfig(
        weight_bits=WIDTHS, trace=False, pairs=False, entropy=False, activations=False
    )
    report, cached = analyze_cached(
        graph, batches, kind, config, weights=builder.compensator.result
    )
    problem = problem_from_report(graph, report, [LayerFormat(w, 8) for w in WIDTHS], "empirical")
    plans: dict[str, Any] = {"w8a8": PrecisionPlan.uniform(graph, weight_bits=8)}
    info: dict[str, Any] = {"analysis_cached": cached}
    params = {n.name: int(graph.weight(n).values.size) for n in graph.weighted_layers()}
    for text in budgets:
        allocation = solve(problem, parse_budget(text, problem))
        key = f"ilp_{text.split('=')[1]}"
        plans[key] = PrecisionPlan(dict(allocation.formats), 8)
        bits = {k: f.weight_bits for k, f in allocation.formats.items()}
        info[key] = {
            "avg_weight_bits": sum(params[k] * b for k, b in bits.items()) / sum(params.values()),
            "bits_histogram": {str(w): sum(1 for b in bits.values() if b == w) for w in WIDTHS},
            "predicted_damage": allocation.predicted_damage,
        }
    return plans, info


def compare_sample_losses(start: np.ndarray, found: np.ndarray) -> dict[str, Any]:
    """Per-sample KLs of two sets of ranges on the same samples: mean and median of each
    (start first), and how many samples the second made better or worse."""
    return {
        "mean": [float(np.mean(start)), float(np.mean(found))],
        "median": [float(np.median(start)), float(np.median(found))],
        "samples_better": int(np.sum(found < start)),
        "samples_worse": int(np.sum(found > start)),
    }


def _kl_check(builder: Any, default_ranges: Any, batches: list[Any]) -> dict[str, Any]:
    """The calibration KL (all activations 8-bit, float weights) of the histogram ranges and
    the searched ones on ``batches``, read after the output's quantizer (the deployed model)
    and before it: mean, median, and how many samples the search made better or worse."""
    from dyadiq.passes.calibration.range_search import ActivationRangeEvaluator, group_range

    out: dict[str, Any] = {"batches": len(batches)}
    for where, before in (("after_output_quantizer", False), ("before_output_quantizer", True)):
        check = ActivationRangeEvaluator(
            builder.graph, builder.sites, batches, before_output_quantizer=before
        )
        rows = {
            label: check.sample_losses({g: group_range(r, m) for g, m in check.groups.items()})
            for label, r in (("default", default_ranges), ("searched", builder.ranges))
        }
        out[where] = compare_sample_losses(rows["default"], rows["searched"])
    return out


def benchmark_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import onnx

    from benchmarks.compensation import _ort_models
    from dyadiq import zoo
    from dyadiq.evaluation import evaluate
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.calibration.range_search import Objective, RangeSearchOptions
    from dyadiq.passes.compensation.settings import CompensationSettings
    from dyadiq.passes.insert_qdq import insert_qdq
    from dyadiq.pipeline import CalibrationConfig, PlanBuilder, export_qdq

    artifacts = zoo.get(name)
    calibration = list(artifacts.calibration_batches(None))
    raw = load_onnx(artifacts.model_path)
    settings = CompensationSettings.parse(COMPENSATION)
    cache = args.weights_cache
    default = PlanBuilder(raw, calibration, compensation=settings)
    _compensated(default, cache / f"{name}.pkl" if cache else None)
    options = RangeSearchOptions(
        evaluations=args.evaluations,
        samples=args.samples,
        objective=Objective(args.objective),
        screen_batches=args.screen_batches,
        race_batches=args.race_batches,
        before_output_quantizer=args.before_output_quantizer,
    )
    searched = PlanBuilder(
        raw, calibration, CalibrationConfig(range_search=options), compensation=settings
    )
    search_report = dict(searched.range_search or {})
    search_report["seconds_with_setup"] = searched.range_search_s
    # the overfitting check: the same loss on calibration batches the search did not read
    unread = calibration[args.samples : 2 * args.samples]
    scored = calibration[: args.samples]
    search_report["check"] = {
        label: _kl_check(searched, default.ranges, data)
        for label, data in (("scored", scored), ("unread", unread))
        if data
    }
    if args.recompensate:
        _compensated(searched, cache / f"{name}_searched.pkl" if cache else None)
    else:
        searched.compensator.result = default.compensator.result
    plans, plan_info = _plans(default, args.budgets)
    searched_plans, searched_info = (
        _plans(searched, args.budgets) if args.recompensate else (plans, plan_info)
    )
    paths: dict[str, Path] = {}
    for variant, builder, chosen in (
        ("default", default, plans),
        ("searched", searched, searched_plans),
    ):
        for key, plan in chosen.items():
            qdq = insert_qdq(
                builder.graph, plan, builder.sites, builder.ranges, builder.compensator.result
            )
            path = work / f"{name}_{key}_{variant}.onnx"
            onnx.save(export_qdq(qdq.graph), path)
            paths[f"{key}_{variant}"] = path
    ort = _ort_models(artifacts, name, work / f"{name}_ort", 1800.0, None, ("Percentile",))
    ort_run = ort.get("ort_w8a8_percentile", {})
    if ort_run.get("status") == "ok":
        paths["ort_w8a8_percentile"] = Path(ort_run["output"])
    metrics = evaluate(artifacts, paths)
    larger: dict[str, Any] | None = None
    if name == "mobilenet_v2" and not args.zoo_split_only:
        scores = photo_split.score(Path(artifacts.model_path), paths)
        larger = {}
        for key in paths:
            row: dict[str, Any] = {
                "top1_agreement": scores.agreement(key),
                "standard_error": scores.standard_error(key),
            }
            if key != "ort_w8a8_percentile" and "ort_w8a8_percentile" in paths:
                row["vs_ort"] = scores.paired(key, "ort_w8a8_percentile")
            if key.endswith("_searched"):
                row["vs_default"] = scores.paired(key, key.replace("_searched", "_default"))
            larger[key] = row
    return {
        "primary_metric": artifacts.model.primary_metric,
        "calibration_batches": len(calibration),
        "range_search": search_report,
        "plans": {"default": plan_info, "searched": searched_info},
        "zoo_split": metrics,
        "larger_split": larger,
        "files": {k: str(p) for k, p in paths.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "ppocr_cls", "fashion_cnn"])
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    p.add_argument("--evaluations", type=int, default=40, help="the search's candidate budget")
    p.add_argument("--samples", type=int, default=32, help="calibration batches it scores")
    p.add_argument("--objective", default="trimmed", help="mean|trimmed|median|relative")
    p.add_argument("--screen-batches", type=int, default=2, help="batches of the screening")
    p.add_argument("--race-batches", type=int, default=8, help="a candidate's first test")
    p.add_argument(
        "--after-output-quantizer",
        dest="before_output_quantizer",
        action="store_false",
        help="score after the output's quantizer (default: before it)",
    )
    p.add_argument("--recompensate", action="store_true", help="compensate and plan again")
    p.add_argument("--zoo-split-only", action="store_true", help="no 744-crop MobileNetV2 split")
    p.add_argument("--weights-cache", type=Path, help="pickled compensated weights per model")
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    work = args.output.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "python -m benchmarks.range_search " + " ".join(argv or []),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_avg_start": os.getloadavg(),
        "models": {},
    }
    for name in args.models:
        t = time.perf_counter()
        result["models"][name] = benchmark_model(name, args, work)
        result["models"][name]["seconds"] = time.perf_counter() - t
        args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["load_avg_end"] = os.getloadavg()
    args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
