"""What :func:`dyadiq.quantize` takes besides the model (:class:`SearchOptions`,
:class:`TargetOptions`) and what it returns (:class:`QuantizedModel`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dyadiq.pipeline import QuantizeResult
from dyadiq.plan import PrecisionPlan


@dataclass(frozen=True)
class SearchOptions:
    """How ``budget`` / ``max_drop`` search per-layer formats (``--wbits-candidates`` ...)."""

    # 5 and 7 bits too: MobileNetV2 at avg-wbits=4.5 (range,gptq,bias) gains +0.040 top-1
    # agreement over 2/3/4/6/8 on the 744-crop split, paired (benchmarks/results/compensation.md)
    wbits_candidates: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    abits_candidates: tuple[int, ...] | None = None  # None: activations stay at ``abits``
    proxy: str = "empirical"  # the damage model the ILP minimises
    # empirical damage measured with every activation site quantized as the plan does
    # (--a8-damage); off by default: not better on MobileNetV2 (compensation.md)
    a8_damage: bool = False
    # > 0: the ILP's plan refined by budget-neutral moves, at most this many whole plans
    # scored by KL to float on calibration batches compensation did not read (--refine-plan)
    refine_plan: int = 0
    analysis_samples: int = 8  # calibration batches the sensitivity analysis reads
    bisect_steps: int = 6  # --max-drop measurements
    latency_table: Path | None = None  # a backend's measured {layer: {format: ms}}
    memory_plan: Path | None = None  # live sets for ram= / flash= budgets
    workers: int | None = None  # > 1: analysis and plan measurements on a local Ray
    ray_address: str | None = None  # or on an existing Ray cluster


@dataclass(frozen=True)
class TargetOptions:
    """How ``target`` is built and checked (``--check-inputs``, ``--tune-trials`` ...)."""

    check_inputs: int = 8  # inputs the build is compared on, bit for bit
    tune_trials: int = 0  # MetaSchedule trials (TVM CPU); 0: a default schedule
    tuning_db: Path | None = None
    layer_latency: bool = False  # x86: time each layer's kernel per format


@dataclass(repr=False)
class QuantizedModel:
    """What :func:`quantize` made.

    ``paths``: the files written, by role (``qdq``, ``plan``, ``report``, ``report_html``,
    and ``integer``, ``target``, ``ort_baseline`` when made). ``report``: report.json as a
    dict. ``metrics``: metrics per model (``float`` first) on held-out data or by a callback.
    ``pipeline``: the graph, plan, activation sites and integer program behind them.
    ``report["held_out"]``: which data the plan was searched on and the metrics reported on.
    ``allocation``: the chosen plan's search (a ``BudgetPlan`` / ``BisectedPlan``) or None.
    """

    paths: dict[str, Path]
    report: dict[str, Any]
    pipeline: QuantizeResult
    allocation: Any = None
    _scratch: Any = field(default=None)  # a TemporaryDirectory holding ``paths`` (out=None)

    @property
    def plan(self) -> PrecisionPlan:
        """Every layer's format, as written to plan.json."""
        return self.pipeline.plan

    @property
    def metrics(self) -> dict[str, dict[str, float]] | None:
        """Metrics per model (``float`` first) on held-out data (a zoo model's, ``test`` or
        ``validation``) and by an ``evaluate`` callback; None when none was measured."""
        return self.report.get("metrics")

    @property
    def verified(self) -> bool:
        """True when every bit-exactness check that ran passed (or none had to run)."""
        return bool(self.report.get("verification", {}).get("passed", True))

    def __repr__(self) -> str:
        sizes = self.report["sizes"]
        quality = ""
        if self.metrics:
            name, value = headline_metric(self.metrics)
            if name:
                quality = f", {name} {value:.4f} (float {self.metrics['float'][name]:.4f})"
        return (
            f"<QuantizedModel {Path(self.report['source']).name}: {len(self.plan.layers)} "
            f"layers, {sizes['float_model_bytes']:,} B -> {sizes['qdq_model_bytes']:,} B"
            f"{quality}, {'verified' if self.verified else 'NOT verified'}; "
            f"{self.paths['qdq'].parent}>"
        )


def headline_metric(metrics: Mapping[str, Mapping[str, float]]) -> tuple[str, float]:
    """The first quantized model's accuracy (else top-1 agreement, else cosine)."""
    names = [n for n in metrics if n != "float"]
    if not names:
        return "", 0.0
    first = metrics[names[0]]
    for key in ("accuracy", "top1_agreement", "mean_cosine", "logit_cosine", "evaluate"):
        if key in first and key in metrics["float"]:
            return key, float(first[key])
    return "", 0.0
