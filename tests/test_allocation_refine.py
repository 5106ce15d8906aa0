"""Measured plan refinement (passes/allocation/refine.py): budget-neutral moves around the
ILP's plan, kept only when the caller's measured loss falls."""

from __future__ import annotations

import numpy as np
import pytest

from dyadiq.passes.allocation import (
    AllocationProblem,
    Budget,
    neighbour_moves,
    refine_plan,
    solve,
    totals,
)
from dyadiq.plan import LayerFormat

FORMATS = [LayerFormat(b, 8) for b in (2, 3, 4, 5, 6, 7, 8)]


def _problem(layers: int = 6, ties: tuple[tuple[str, ...], ...] = ()):
    rng = np.random.default_rng(3)
    names = [f"l{i}" for i in range(layers)]
    params = {n: int(rng.integers(100, 3000)) for n in names}
    damage = {
        n: {f: float(rng.uniform(0.5, 2) * 4.0 ** (-f.weight_bits)) for f in FORMATS} for n in names
    }
    size = {n: {f: params[n] * f.weight_bits / 8 for f in FORMATS} for n in names}
    candidates = {n: list(FORMATS) for n in names}
    problem = AllocationProblem(candidates, damage, size, ties=ties)
    return problem, Budget(size_bytes=sum(params.values()) * 4.5 / 8)


def _fits(problem, formats, budget):
    return totals(problem, formats)["size"] <= budget.size_bytes * (1 + 1e-9)


def test_every_move_stays_within_the_budget_and_is_one_width_step():
    problem, budget = _problem()
    start = dict(solve(problem, budget).formats)
    moves = neighbour_moves(problem, start, budget)
    assert moves
    widths = [f.weight_bits for f in FORMATS]
    for move in moves:
        assert _fits(problem, {**start, **move.changes}, budget)
        for layer, fmt in move.changes.items():
            step = widths.index(fmt.weight_bits) - widths.index(start[layer].weight_bits)
            assert abs(step) == 1
        assert sum(1 for f in move.changes.values()) in (1, 2)
    predicted = [m.predicted_change for m in moves]
    assert predicted == sorted(predicted)
    # the ILP's plan is optimal for its own damage table: no move predicts an improvement
    assert min(predicted) >= -1e-12


def test_refinement_keeps_a_move_the_measured_loss_rewards():
    problem, budget = _problem()
    start = dict(solve(problem, budget).formats)
    # the measured loss disagrees with the table on one layer: l0 one width higher pays off
    target = next(
        m
        for m in neighbour_moves(problem, start, budget)
        if "l0" in m.changes and m.changes["l0"].weight_bits > start["l0"].weight_bits
    )
    wanted = target.changes["l0"]

    def loss(plans):
        return [
            sum(problem.damage[i][f] for i, f in p.items())
            - (1.0 if p["l0"].weight_bits >= wanted.weight_bits else 0.0)
            for p in plans
        ]

    result = refine_plan(problem, start, budget, loss, evaluations=400)
    assert result.formats["l0"].weight_bits >= wanted.weight_bits
    assert result.loss < result.start_loss - 0.5
    assert _fits(problem, result.formats, budget)
    assert result.accepted >= 1
    losses = [h["loss"] for h in result.history if h["accepted"]]
    assert losses == sorted(losses, reverse=True)  # every kept move lowered the loss


def test_refinement_stops_at_the_evaluation_limit_and_keeps_the_start_without_gain():
    problem, budget = _problem()
    start = dict(solve(problem, budget).formats)
    calls = []

    def loss(plans):
        calls.append(len(plans))
        return [sum(problem.damage[i][f] for i, f in p.items()) for p in plans]

    result = refine_plan(problem, start, budget, loss, evaluations=7)
    assert result.evaluations == sum(calls) == 7
    assert result.formats == start  # the table is the loss: the ILP's plan is already best
    assert result.loss == pytest.approx(result.start_loss)


def test_tied_layers_move_together():
    problem, budget = _problem(ties=(("l0", "l1"),))
    start = dict(solve(problem, budget).formats)
    for move in neighbour_moves(problem, start, budget):
        assert ("l0" in move.changes) == ("l1" in move.changes)
        if "l0" in move.changes:
            assert move.changes["l0"] == move.changes["l1"]


def test_scoring_batches_skip_what_compensation_read():
    from dyadiq.plan_refinement import REFINE_BATCHES, scoring_batches

    batches = [{"x": np.full((1,), float(k))} for k in range(40)]
    held, note = scoring_batches(batches, compensation_samples=32)
    assert [int(b["x"][0]) for b in held] == list(range(32, 40))
    assert "did not read" in note
    few, note = scoring_batches(batches[:4], compensation_samples=32)
    assert len(few) == 4 and "read all 4" in note
    many, _ = scoring_batches(batches * 3, compensation_samples=8)
    assert len(many) == REFINE_BATCHES


def test_quantize_refine_plan_scores_whole_plans_within_the_budget(
    tiny_cnn_path, tmp_path, monkeypatch
):
    """SearchOptions.refine_plan (--refine-plan) reaches the budget path: the chosen plan is
    one the refinement measured, no worse than the ILP's on its loss, within the budget."""
    from conftest import TINY_INPUT_SHAPE, random_batches

    import dyadiq
    from dyadiq.api import SearchOptions
    from dyadiq.cli import build_parser
    from dyadiq.cli.allocation import search_options

    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "cache"))
    batches = random_batches({"x": TINY_INPUT_SHAPE}, 6)
    search = SearchOptions(wbits_candidates=(2, 4, 8), analysis_samples=2, refine_plan=5)
    made = dyadiq.quantize(
        tiny_cnn_path, batches, budget="avg-wbits=5", search=search, compensate="none"
    )
    info = made.allocation.info
    refinement = info["refinement"]
    assert 1 < refinement["evaluations"] <= 5
    assert refinement["loss"] <= refinement["start_loss"]
    assert len(refinement["history"]) == refinement["evaluations"] - 1
    assert refinement["metric"]["higher_is_better"] is False
    assert info["weight_bytes"] <= info["budget_limits"]["size"] * (1 + 1e-9)
    chosen = {k: f.label for k, f in made.plan.layers.items()}
    assert set(chosen.values()) <= {"W2A8", "W4A8", "W8A8"}
    args = build_parser().parse_args(["quantize", "m.onnx", "-o", "OUT", "--refine-plan", "9"])
    assert search_options(args).refine_plan == 9 and SearchOptions().refine_plan == 0
