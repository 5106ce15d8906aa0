"""Activation range search variants on one model, compared on calibration KL only (issue 12).

The ranges start where ``PlanBuilder`` starts them (histograms of every calibration batch,
the default rule). One :class:`ActivationRangeEvaluator` holds every calibration batch and
memoises each (ranges, batch) output, so variants that retrace the same candidates do not pay
twice (the forward-pass counts are the search's own; ``seconds`` is only meaningful for the
first variant of a run). Each variant searches on the first ``samples`` batches; every
variant is checked on the same unread batches (``--unread`` to the end), mean KL after the
output's quantizer (the deployed model) and before it, and how many samples got better or
worse. No compensation, no plans, no held-out data: that is ``benchmarks.range_search``.

    .venv/bin/python -m benchmarks.range_search_variants ppocr_cls --unread 96 \\
        mean:32:8:0:60 trimmed:32:2:8:40:pre -o x.json

A variant is ``objective:samples:screen_batches:race_batches:evaluations[:pre]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.range_search import compare_sample_losses


def _check(
    evaluator: Any, start: Mapping[int, Any], found: Mapping[int, Any], lo: int, hi: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for where, before in (("after_output_quantizer", False), ("before_output_quantizer", True)):
        view = _view(evaluator, lo, hi, before)
        out[where] = compare_sample_losses(view.sample_losses(start), view.sample_losses(found))
    return out


def _view(evaluator: Any, lo: int, hi: int, before_output_quantizer: bool) -> Any:
    """The evaluator on batches lo..hi, reading the output before or after its quantizer; the
    session and the memo of outputs shared with ``evaluator``."""
    view = copy.copy(evaluator)
    view.batches = evaluator.batches[lo:hi]
    view.reference = evaluator.reference[lo:hi]
    view.rows = evaluator.rows[lo:hi]
    view.before_output_quantizer = before_output_quantizer
    memo: dict[Any, np.ndarray] = evaluator.memo
    plain = type(evaluator)._run

    def _run(batch: Mapping[str, np.ndarray], ranges: Mapping[int, Any]) -> np.ndarray:
        key = (id(batch), tuple(sorted(ranges.items())), before_output_quantizer)
        if key not in memo:
            memo[key] = plain(view, batch, ranges)
        return memo[key]

    view._run = _run
    return view


def run(name: str, variants: list[str], unread: int) -> dict[str, Any]:
    from dyadiq import zoo
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.activation_sites import find_activation_sites
    from dyadiq.passes.calibration.collector import StatisticsRequest, collect_statistics
    from dyadiq.passes.calibration.range_search import (
        ActivationRangeEvaluator,
        Objective,
        RangeSearchOptions,
        group_range,
        search_ranges,
    )
    from dyadiq.pipeline import CalibrationConfig, calibrated_ranges, prepare_graph
    from dyadiq.plan import PrecisionPlan

    artifacts = zoo.get(name)
    calibration = list(artifacts.calibration_batches(None))
    graph = prepare_graph(load_onnx(artifacts.model_path), needs_int4=True)
    sites = find_activation_sites(graph, PrecisionPlan.uniform(graph, act_bits=8))
    statistics = collect_statistics(graph, StatisticsRequest(frozenset(sites.tensors)), calibration)
    ranges = calibrated_ranges(statistics, sites, CalibrationConfig(), graph)
    evaluator = ActivationRangeEvaluator(graph, sites, calibration)
    evaluator.memo = {}
    start = {g: group_range(ranges, m) for g, m in evaluator.groups.items()}
    rows: dict[str, Any] = {}
    for spec in variants:
        objective, samples, screen, race, evaluations, *pre = spec.split(":")
        options = RangeSearchOptions(
            evaluations=int(evaluations),
            samples=int(samples),
            objective=Objective(objective),
            screen_batches=int(screen),
            race_batches=int(race),
            before_output_quantizer=pre == ["pre"],
        )
        scored = _view(evaluator, 0, options.samples, options.before_output_quantizer)
        trace: list[dict[str, Any]] = []
        t = time.perf_counter()
        found, report = search_ranges(
            scored, statistics.histograms, ranges, options.evaluations, options, trace
        )
        seconds = time.perf_counter() - t
        as_groups = {g: group_range(found, m) for g, m in evaluator.groups.items()}
        rows[spec] = {
            "report": report.to_json(),
            "seconds": seconds,
            "scored": _check(evaluator, start, as_groups, 0, options.samples),
            "unread": _check(evaluator, start, as_groups, unread, len(calibration)),
            "trace": trace,
        }
        print(spec, json.dumps({k: v for k, v in rows[spec].items() if k != "trace"}), flush=True)
    return {"model": name, "calibration_batches": len(calibration), "unread_from": unread, **rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("variants", nargs="+")
    p.add_argument("--unread", type=int, default=32, help="first calibration batch of the check")
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    result = run(args.model, args.variants, args.unread)
    args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
