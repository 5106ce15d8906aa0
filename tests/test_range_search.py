"""End-to-end activation range search (passes/calibration/range_search.py): it never ends above
its start on the calibration KL, clips a tensor whose range an outlier spoils, and its ranges
are the ones the QDQ model and the integer model are built with (still bit-exact)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from dyadiq.errors import ConfigError
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.calibration.collector import StatisticsRequest, collect_statistics
from dyadiq.passes.calibration.observers import RangeMethod, RunningHistogram
from dyadiq.passes.calibration.range_search import (
    DEFAULT_EVALUATIONS,
    ActivationRangeEvaluator,
    Objective,
    RangeSearchOptions,
    aggregate,
    group_range,
    search_ranges,
)
from dyadiq.pipeline import (
    CalibrationConfig,
    PlanBuilder,
    calibrated_ranges,
    prepare_graph,
    quantize,
    quantize_graph,
)
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import activation_quant
from tests.builders import calibration, conv_relu_pool_fc, residual_concat, with_weights


def _outlier_mlp() -> object:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    mlp (float[64, 16] x) => (float[64, 10] y) {
        h = MatMul (x, w1)
        r = Relu (h)
        y = MatMul (r, w2)
    }
    """
    rng = np.random.default_rng(3)
    return with_weights(text, w1=rng.normal(size=(16, 16)) * 0.3, w2=rng.normal(size=(16, 10)))


def _outlier_batches() -> list[dict[str, np.ndarray]]:
    """Normal rows, and one row of 2048 400x larger: min/max spends the 8-bit grid on it."""
    rng = np.random.default_rng(4)
    batches = [{"x": rng.normal(size=(64, 16)).astype(np.float32)} for _ in range(32)]
    batches[2]["x"][5] *= 400.0
    return batches


def _static_shape(dims: Sequence[int | str | None]) -> tuple[int, ...]:
    shape = tuple(d for d in dims if isinstance(d, int))
    assert len(shape) == len(dims), dims
    return shape


MINMAX_SEARCH = CalibrationConfig(
    method=RangeMethod.MINMAX, range_search=RangeSearchOptions(evaluations=40, samples=8)
)


def test_an_outlier_tensor_gets_a_clipped_range() -> None:
    graph = load_onnx(_outlier_mlp())
    batches = _outlier_batches()
    plain = quantize_graph(
        graph, PrecisionPlan.uniform(graph), batches, CalibrationConfig(method=RangeMethod.MINMAX)
    )
    searched = quantize_graph(graph, PrecisionPlan.uniform(graph), batches, MINMAX_SEARCH)
    report = searched.range_search
    assert report is not None
    assert report["loss_after"] < report["loss_before"], report
    changed = {t: c for c in report["changes"] for t in c["tensors"]}
    assert "r" in changed, report["changes"]
    before, after = changed["r"]["before"], changed["r"]["after"]
    assert after[1] < 0.7 * before[1]
    # the QDQ model quantizes r on the searched range (a finer scale than min/max gives)
    scale = searched.qdq.act_params["r"].scale
    assert scale == activation_quant(0.0, after[1], 8, signed=False).scale
    assert scale < 0.7 * plain.qdq.act_params["r"].scale


@pytest.mark.parametrize("build", [conv_relu_pool_fc, residual_concat])
def test_search_never_raises_the_calibration_loss(build) -> None:  # type: ignore[no-untyped-def]
    model = build(np.random.default_rng(5))
    graph = prepare_graph(load_onnx(model))
    shape = _static_shape(graph.input_specs()["x"][1])
    batches = calibration(shape, np.random.default_rng(6), n=8)
    sites = PlanBuilder(graph, batches).sites
    statistics = collect_statistics(graph, StatisticsRequest(frozenset(sites.tensors)), batches)
    ranges = calibrated_ranges(statistics, sites, CalibrationConfig(), graph)
    evaluator = ActivationRangeEvaluator(graph, sites, batches)
    # the mean objective: its guarantee is on the mean loss (the others' on their own number)
    mean = RangeSearchOptions(evaluations=30, objective=Objective.MEAN, race_batches=0)
    new, report = search_ranges(evaluator, statistics.histograms, ranges, 30, mean)
    assert report.loss_after <= report.loss_before
    assert 0 < report.evaluations <= 30
    # the report's loss is the loss of the ranges returned (the write-back is the search's)
    fresh = ActivationRangeEvaluator(graph, sites, batches)
    as_groups = {g: group_range(new, members) for g, members in fresh.groups.items()}
    assert fresh.loss(as_groups) == pytest.approx(report.loss_after, rel=1e-9)
    unchanged = {t for t in ranges if all(t not in c.tensors for c in report.changes)}
    assert all(new[t] == ranges[t] for t in unchanged)
    # the model output's range is the user's: never searched
    assert evaluator.output_groups
    outputs = {t for g in evaluator.output_groups for t in evaluator.groups[g]}
    assert outputs <= unchanged


def test_off_in_the_library_config_and_zero_evaluations_change_nothing() -> None:
    graph = load_onnx(_outlier_mlp())
    batches = _outlier_batches()
    assert not CalibrationConfig().range_search.enabled
    off = quantize_graph(graph, PrecisionPlan.uniform(graph), batches)
    assert off.range_search is None
    with pytest.raises(ConfigError):
        RangeSearchOptions(evaluations=-1)


def test_integer_model_with_searched_ranges_is_bit_exact(tmp_path: Path) -> None:
    batches = _outlier_batches()
    result = quantize(_outlier_mlp(), tmp_path / "out", batches, config=MINMAX_SEARCH, integer=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    search = report["activation_range_search"]
    assert search["changes"], search
    exact = report["integer"]["bit_exact_vs_reference"]
    assert exact["tensors"] > 0 and exact["exact_tensors"] == exact["tensors"], exact
    # the integer program's activation quantizers are the searched ones
    assert result.program is not None
    lo, hi = next(c["after"] for c in search["changes"] if "r" in c["tensors"])
    assert result.qdq.act_params["r"].scale == activation_quant(lo, hi, 8, signed=False).scale


def test_cli_flag_reaches_the_report(
    tiny_cnn_path: Path, calib_npz_folder: Path, tmp_path: Path
) -> None:
    from dyadiq.cli import main

    out = tmp_path / "OUT"
    argv = ["quantize", str(tiny_cnn_path), "-o", str(out), "--calib", str(calib_npz_folder)]
    assert main([*argv, "--range-search", "6", "--no-eval"]) == 0
    search = json.loads((out / "report.json").read_text())["activation_range_search"]
    assert 0 < search["evaluations"] <= 6
    assert search["loss_after"] <= search["loss_before"]
    assert main([*argv, "--range-search", "-1"]) == 2
    assert main([*argv, "--no-eval"]) == 0  # on by default: the section is there
    default = json.loads((out / "report.json").read_text())["activation_range_search"]
    assert 0 < default["evaluations"] <= DEFAULT_EVALUATIONS
    assert main([*argv, "--range-search", "0", "--no-eval"]) == 0  # off: no section
    assert "activation_range_search" not in json.loads((out / "report.json").read_text())


def test_robust_objectives_are_not_decided_by_one_sample() -> None:
    start = np.array([0.01] * 9 + [1.0])
    # the last sample's KL halves, every other one doubles: the mean calls that a gain
    candidate = np.array([0.02] * 9 + [0.5])
    assert aggregate(candidate, start, Objective.MEAN) < aggregate(start, start, Objective.MEAN)
    for objective in (Objective.TRIMMED, Objective.MEDIAN, Objective.RELATIVE):
        assert aggregate(candidate, start, objective) > aggregate(start, start, objective)
    # trimmed: the largest 10% left out; relative: 1 at the start, each sample counts the same
    assert aggregate(start, start, Objective.TRIMMED) == pytest.approx(0.01)
    assert aggregate(start, start, Objective.RELATIVE) == pytest.approx(1.0)


@pytest.mark.parametrize("objective", list(Objective))
def test_every_objective_never_ends_above_its_start(objective: Objective) -> None:
    graph = prepare_graph(load_onnx(conv_relu_pool_fc(np.random.default_rng(5))))
    shape = _static_shape(graph.input_specs()["x"][1])
    batches = calibration(shape, np.random.default_rng(6), n=8)
    sites = PlanBuilder(graph, batches).sites
    statistics = collect_statistics(graph, StatisticsRequest(frozenset(sites.tensors)), batches)
    ranges = calibrated_ranges(statistics, sites, CalibrationConfig(), graph)
    options = RangeSearchOptions(
        evaluations=12, objective=objective, screen_batches=2, race_batches=2
    )
    evaluator = ActivationRangeEvaluator(graph, sites, batches, before_output_quantizer=True)
    trace: list[dict[str, object]] = []
    _, report = search_ranges(evaluator, statistics.histograms, ranges, 12, options, trace)
    assert report.objective == objective.value
    assert report.objective_after <= report.objective_before
    assert len(trace) == report.evaluations <= 12
    # a candidate dropped by the race costs 2 batches, not 8
    raced = sum(1 for t in trace if "value" not in t)
    full = report.evaluations - raced
    groups = report.groups
    assert report.forward_passes == 8 + 2 * groups + 2 * report.evaluations + 8 * full


class _ScriptedEvaluator:
    """Ten samples in one batch; clipping group 0 below its start helps nine of them a little
    and makes the tenth far worse (what the trimmed mean alone cannot see)."""

    def __init__(self, start_high: float) -> None:
        self.groups = {0: ["a"]}
        self.output_groups: set[int] = set()
        self.bits = {0: 8}
        self.batches: list[dict[str, np.ndarray]] = [{}]
        self.forward_passes = 0
        self.start_high = start_high

    def rows_in(self, batches: int) -> int:
        return 10 * batches

    def sample_losses(self, ranges: dict[int, object], batches: int | None = None) -> np.ndarray:
        self.forward_passes += 1
        r = ranges.get(0)
        if isinstance(r, tuple) and r[1] < 0.99 * self.start_high:
            return np.array([0.008] * 9 + [5.0])
        return np.array([0.01] * 9 + [1.0])


@pytest.mark.parametrize("guard", [True, False])
def test_the_mean_guard_refuses_a_range_that_trades_few_samples_for_many(guard: bool) -> None:
    histogram = RunningHistogram()
    histogram.update(np.random.default_rng(7).normal(size=4096))
    ranges = {"a": (histogram.minimum, histogram.maximum)}
    evaluator = _ScriptedEvaluator(histogram.maximum)
    options = RangeSearchOptions(
        evaluations=10, objective=Objective.TRIMMED, race_batches=0, mean_guard=guard
    )
    new, report = search_ranges(
        cast(ActivationRangeEvaluator, evaluator), {"a": histogram}, ranges, 10, options
    )
    assert report.objective_after <= report.objective_before
    if guard:
        # every clipped candidate lowered the trimmed mean and raised the mean: all refused
        assert new == ranges and not report.changes
        assert report.refused_by_mean_guard > 0
        assert report.loss_after == pytest.approx(report.loss_before)
    else:
        assert new["a"][1] < ranges["a"][1] and report.refused_by_mean_guard == 0
        assert report.loss_after > 4 * report.loss_before


@pytest.mark.realmodel
def test_fashion_cnn_searched_ranges_stay_bit_exact(tmp_path: Path) -> None:
    """A real model through the CLI with --range-search N and the options' defaults: the
    search runs, and the integer model built on its ranges is bit-exact."""
    from dyadiq.cli import main

    out = tmp_path / "OUT"
    argv = ["quantize", "--zoo", "fashion_cnn", "-o", str(out), "--integer", "--no-eval"]
    assert main([*argv, "--range-search", str(DEFAULT_EVALUATIONS)]) == 0
    report = json.loads((out / "report.json").read_text())
    search = report["activation_range_search"]
    assert 0 < search["evaluations"] <= DEFAULT_EVALUATIONS
    assert search["objective"] == Objective.TRIMMED.value
    assert search["objective_after"] <= search["objective_before"]
    exact = report["integer"]["bit_exact_vs_reference"]
    assert exact["tensors"] > 0 and exact["exact_tensors"] == exact["tensors"], exact
