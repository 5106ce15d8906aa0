"""``--refine-plan N``: the ILP's plan refined by measured, budget-neutral local moves.

The search itself is :func:`dyadiq.passes.allocation.refine_plan`; this module gives it what
sits above allocation: the plans' QDQ models (one ``PlanBuilder``, so every plan shares one
calibration pass and the compensated weights) and their score, the label-free output loss
(:class:`dyadiq.plan_scores.OutputLossScorer`: KL to float) on calibration batches that
compensation did not read. No evaluation data is spent on choosing the plan, so the metrics
reported on held-out data stay honest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dyadiq.passes.allocation import Allocation, AllocationProblem, Budget, refine_plan
from dyadiq.passes.allocation.problem import allocation_of
from dyadiq.plan import LayerFormat

# calibration batches each refined plan is scored on (after the ones compensation reads)
REFINE_BATCHES = 32


def scoring_batches(
    calibration: Sequence[Mapping[str, Any]], compensation_samples: int
) -> tuple[list[dict[str, Any]], str]:
    """The batches plans are scored on, and a note saying which they are: the ones after
    those compensation reads, or (too few batches) the last ones, which it also read."""
    batches = [dict(b) for b in calibration]
    unread = batches[compensation_samples : compensation_samples + REFINE_BATCHES]
    if unread:
        first = compensation_samples
        return unread, (
            f"calibration batches {first}-{first + len(unread) - 1}, which compensation "
            f"(first {compensation_samples}) did not read"
        )
    tail = batches[-REFINE_BATCHES:]
    return tail, (
        f"the last {len(tail)} calibration batches: compensation read all {len(batches)} "
        "(give more calibration data to score plans on batches it did not read)"
    )


def refine_allocation(
    model_path: Path,
    problem: AllocationProblem,
    budget: Budget,
    allocation: Allocation,
    evaluations: int,
    measure_with: Any,
    calibration: Sequence[Mapping[str, Any]],
    compensation_samples: int,
    output_kind: Any,
) -> tuple[Allocation, dict[str, Any]]:
    """The refined allocation and report.json's ``refinement`` section.

    ``measure_with(scorer)``: plans -> scores with that scorer (``mixed_precision``'s plan
    measurer on the run's builder and executor)."""
    from dyadiq.plan_scores import output_loss_scorer

    batches, note = scoring_batches(calibration, compensation_samples)
    scorer = output_loss_scorer(model_path, batches, output_kind)
    measure = measure_with(scorer)
    result = refine_plan(problem, dict(allocation.formats), budget, measure, evaluations)
    formats: dict[str, LayerFormat] = result.formats
    damage = sum(problem.damage[i][f] for i, f in formats.items())
    refined = allocation_of(problem, formats, damage, allocation.optimal)
    info = {
        "evaluations_limit": evaluations,
        "scored_on": note,
        "metric": scorer.metric.describe(),
        **result.summary(),
    }
    return refined, info
