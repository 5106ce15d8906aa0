"""``--refine-plan`` measured: the ILP's plan against the refined one (issue 12).

Per model and budget, in one process: range,gptq,bias compensation at widths 2-8 on the zoo's
calibration batches (``PlanBuilder``), the empirical analysis on the first 8, the ILP, then
:func:`dyadiq.plan_refinement.refine_allocation` with at most ``--evaluations`` plans scored
by KL to float on the calibration batches compensation did not read (32-63). Both plans are
scored on the zoo's held-out split, and MobileNetV2's also on the 744-crop split
(:mod:`benchmarks.photo_split`), paired against each other and against ``--ort`` (an
onnxruntime W8A8 QDQ file, e.g. the compensation benchmark's ``ort_w8a8_percentile``).

    .venv/bin/python -m benchmarks.refine_plan --models mobilenet_v2 ppocr_cls \\
        --budgets avg-wbits=4.5 avg-wbits=4.0 --ort mobilenet_v2=PATH -o OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

from benchmarks import photo_split

WIDTHS = (2, 3, 4, 5, 6, 7, 8)
ANALYSIS_SAMPLES = 8
COMPENSATION = "range,gptq,bias"


def _builder(name: str, weights_cache: Path | None) -> tuple[Any, Any]:
    from dyadiq import zoo
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.compensation.settings import CompensationSettings
    from dyadiq.pipeline import PlanBuilder

    artifacts = zoo.get(name)
    calibration = list(artifacts.calibration_batches(None))
    settings = CompensationSettings.parse(COMPENSATION)
    builder = PlanBuilder(load_onnx(artifacts.model_path), calibration, compensation=settings)
    cached = weights_cache / f"{name}.pkl" if weights_cache else None
    if cached is not None and cached.is_file():  # compensation is deterministic (same code)
        builder.compensator.result = pickle.loads(cached.read_bytes())
    builder.compensator.ensure(WIDTHS)
    if cached is not None and not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(pickle.dumps(builder.compensator.result))
    return artifacts, builder


def benchmark_model(
    name: str, budgets: list[str], evaluations: int, ort: Path | None, work: Path, cache: Any
) -> dict[str, Any]:
    import onnx

    from dyadiq.evaluation import evaluate
    from dyadiq.mixed_precision import MixedPrecisionOptions, plan_measurer
    from dyadiq.passes.allocation import AllocationOptions, parse_budget, problem_from_report, solve
    from dyadiq.passes.sensitivity.analysis import (
        SensitivityConfig,
        analyze_cached,
        output_kind_of,
    )
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind
    from dyadiq.plan import LayerFormat, PrecisionPlan
    from dyadiq.plan_refinement import refine_allocation

    artifacts, builder = _builder(name, cache)
    graph = builder.graph
    params = {n.name: int(graph.weight(n).values.size) for n in graph.weighted_layers()}
    batches = builder.calibration[:ANALYSIS_SAMPLES]
    kind = output_kind_of(graph, batches)
    config = SensitivityConfig(
        weight_bits=WIDTHS, trace=False, pairs=False, entropy=False, activations=False
    )
    report, _ = analyze_cached(graph, batches, kind, config, weights=builder.compensator.result)
    problem = problem_from_report(graph, report, [LayerFormat(w, 8) for w in WIDTHS])
    options = MixedPrecisionOptions(AllocationOptions(), compensation=builder.compensation)
    paths: dict[str, Path] = {}
    rows: dict[str, Any] = {}
    for text in budgets:
        budget = parse_budget(text, problem)
        start = solve(problem, budget)
        t = time.perf_counter()
        refined, info = refine_allocation(
            Path(artifacts.model_path),
            problem,
            budget,
            start,
            evaluations,
            lambda scorer: plan_measurer(graph, scorer, [], (), options, builder),
            builder.calibration,
            builder.compensation.samples,
            OutputKind(kind.value),
        )
        seconds = time.perf_counter() - t
        for label, allocation in (("ilp", start), ("refined", refined)):
            key = f"{label}_{text.split('=')[1]}"
            bits = {k: f.weight_bits for k, f in allocation.formats.items()}
            path = work / f"{name}_{key}.onnx"
            onnx.save(builder.build(PrecisionPlan(dict(allocation.formats), 8)), path)
            paths[key] = path
            rows[key] = {
                "budget": text,
                "avg_weight_bits": sum(params[k] * b for k, b in bits.items())
                / sum(params.values()),
                "bits_histogram": {str(w): sum(1 for b in bits.values() if b == w) for w in WIDTHS},
                "predicted_damage": allocation.predicted_damage,
            }
        rows[f"refined_{text.split('=')[1]}"]["refinement"] = {**info, "seconds": seconds}
    if ort is not None:
        paths["ort"] = ort
    metrics = evaluate(artifacts, paths)
    for key, values in metrics.items():
        rows.setdefault(key, {})["zoo_split"] = values
    larger = None
    if name == "mobilenet_v2":
        scores = photo_split.score(Path(artifacts.model_path), paths)
        larger = {}
        for key in paths:
            larger[key] = {
                "top1_agreement": scores.agreement(key),
                "standard_error": scores.standard_error(key),
                "vs_ort": scores.paired(key, "ort") if ort is not None and key != "ort" else None,
            }
        for text in budgets:
            b = text.split("=")[1]
            larger[f"refined_{b}"]["vs_ilp"] = scores.paired(f"refined_{b}", f"ilp_{b}")
    return {"rows": rows, "larger_split": larger, "files": {k: str(p) for k, p in paths.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "ppocr_cls"])
    p.add_argument("--budgets", nargs="+", default=["avg-wbits=4.5", "avg-wbits=4.0"])
    p.add_argument("--evaluations", type=int, default=40)
    p.add_argument("--ort", action="append", default=[], metavar="MODEL=PATH")
    p.add_argument("--weights-cache", type=Path, help="pickled compensated weights per model")
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    ort = {k: Path(v) for k, v in (s.split("=", 1) for s in args.ort)}
    work = args.output.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "python -m benchmarks.refine_plan " + " ".join(argv or []),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_avg_start": os.getloadavg(),
        "models": {},
    }
    for name in args.models:
        result["models"][name] = benchmark_model(
            name, args.budgets, args.evaluations, ort.get(name), work, args.weights_cache
        )
        args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["load_avg_end"] = os.getloadavg()
    args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
