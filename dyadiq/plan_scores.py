"""How ``--max-drop`` and ``frontier`` score a plan: one interface, three sources of the score.

A *scorer* is picklable worker data (``passes/sensitivity/executor.py``'s WorkerSpec) with a
:class:`Metric`; ``open(threads)`` gives ``score(model_path, plan) -> float``, which reads a
complete QDQ model from disk (``plan`` names the plan being measured, for errors). Scoring the
float model itself gives the reference every plan is compared with. The sources:

- :class:`ZooScorer`: a zoo model's own metric on (a split of) its held-out data;
- :class:`DataScorer`: the user's held-out data, scored against the float model's outputs by
  what the first output holds (:func:`data_metric`): accuracy with labels, else agreement with
  float (top-1 answers, embedding cosine, or relative error);
- :class:`CallbackScorer`: the user's ``evaluate(model_path) -> float`` (higher is better), as
  in NNCF's ``quantize_with_accuracy_control(validation_fn=...)``.

The tolerance (:class:`Tolerance`) is in the metric's units: ``0.01`` is an absolute drop,
``0.5%`` is 0.5 % of the metric's scale. Every built-in metric is a fraction (scale 1), so
there ``0.5%`` is 0.005, half a percentage point - what ``--max-drop`` has always meant for
zoo models. A callback's scale is unknown, so there ``0.5%`` is relative: 0.5 % of the float
model's score.
"""

from __future__ import annotations

import math
import numbers
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.errors import ConfigError
from dyadiq.evaluation import OutputKind, run_outputs, score_output
from dyadiq.held_out import HeldOut, Part
from dyadiq.plan import LayerFormat

Score = Callable[[Path, str], float]  # (QDQ model path, plan description) -> metric


@dataclass(frozen=True)
class Metric:
    """What a scorer measures: its key in the metrics, what it means (with units), whether
    higher is better, and whether it is a fraction of 1 (so "0.5%" is 0.005)."""

    name: str
    meaning: str
    higher_is_better: bool = True
    fraction: bool = True
    units: str | None = None  # what the value counts, where it is neither case above

    def describe(self) -> dict[str, Any]:
        units = "fraction of 1" if self.fraction else "the callback's own units"
        return {
            "name": self.name,
            "meaning": self.meaning,
            "higher_is_better": self.higher_is_better,
            "units": self.units or units,
        }


_MEANINGS = {
    "accuracy": "fraction of samples whose top-1 class is the label",
    "top1_agreement": "fraction of samples whose top-1 class is the float model's",
    "mean_cosine": "mean cosine similarity of each output vector to the float model's",
    "mean_abs_error_rel": "mean |output - float output| as a fraction of float's output range",
}


def zoo_metric(name: str) -> Metric:
    """A zoo model's primary metric (always a higher-is-better fraction)."""
    return Metric(name, _MEANINGS.get(name, name) + ", held-out zoo data")


def data_metric(kind: OutputKind, labelled: bool, output: str) -> Metric:
    """The metric a plan is searched on for an output of ``kind`` (the first output)."""
    if labelled and kind is not OutputKind.CLASSES:
        raise ConfigError(
            f"labels score a classifier, but output {output!r} holds {kind.value} values: "
            "drop --labels (plans are then scored by agreement with float)"
        )
    if kind is OutputKind.CLASSES:
        name = "accuracy" if labelled else "top1_agreement"
        return Metric(name, f"{_MEANINGS[name]} (output {output!r})")
    if kind is OutputKind.EMBEDDING:
        return Metric("mean_cosine", f"{_MEANINGS['mean_cosine']} (output {output!r})")
    meaning = f"{_MEANINGS['mean_abs_error_rel']} (output {output!r}, {kind.value})"
    return Metric("mean_abs_error_rel", meaning, higher_is_better=False)


CALLBACK_METRIC = Metric(
    "evaluate",
    "the evaluate(model_path) callback's score (higher is better, in its own units)",
    fraction=False,
)


@dataclass(frozen=True)
class Tolerance:
    """A --max-drop: ``0.01`` (absolute) or ``0.5%`` (of the metric's scale)."""

    text: str
    value: float
    percent: bool

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        stripped = str(text).strip()
        percent = stripped.endswith("%")
        try:
            value = float(stripped.rstrip("%"))
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"--max-drop wants a drop >= 0 like 0.5% or 0.01 (in the metric's units), "
                f"got {text!r}"
            )
        return cls(stripped, value / 100 if percent else value, percent)

    def absolute(self, metric: Metric, reference: float) -> float:
        """The drop in the metric's units: a percentage of a fraction metric is points of it;
        of any other metric, that share of the float model's score."""
        if self.percent and not metric.fraction:
            return self.value * abs(reference)
        return self.value

    def threshold(self, metric: Metric, reference: float) -> float:
        """The worst score a plan may measure and still pass."""
        drop = self.absolute(metric, reference)
        return reference - drop if metric.higher_is_better else reference + drop


@dataclass(frozen=True)
class ZooScorer:
    """A zoo model's metric on its held-out data (``part`` of it), for each plan's model."""

    artifacts: Any
    metric: Metric
    part: Part = Part.ALL
    eval_limit: int | None = None

    def open(self, threads: int) -> Score:
        return self._score

    def _score(self, path: Path, plan: str) -> float:
        from dyadiq.evaluation import evaluate

        metrics = evaluate(self.artifacts, {"plan": path}, limit=self.eval_limit, part=self.part)
        return float(metrics["plan"][self.metric.name])


@dataclass(frozen=True)
class DataScorer:
    """The user's held-out data: each plan's first output against the float model's
    (``reference``, computed once by :func:`data_scorer`), with ``metric``."""

    data: HeldOut
    kind: OutputKind
    output: str
    reference: np.ndarray
    metric: Metric

    def open(self, threads: int) -> Score:
        return self._score

    def _score(self, path: Path, plan: str) -> float:
        out = run_outputs(path, self.data.batches, [self.output])[self.output]
        labels = self.data.labels if self.kind is OutputKind.CLASSES else None
        return float(score_output(self.kind, self.reference, out, labels)[self.metric.name])


def data_scorer(float_model: Path, data: HeldOut) -> DataScorer:
    """A :class:`DataScorer` on ``data``, its kind judged from the float model's first output."""
    from dyadiq.evaluation import output_kind, output_names

    output = output_names(float_model)[0]
    reference = run_outputs(float_model, data.batches, [output])[output]
    kind = output_kind(reference, has_labels=data.labels is not None)
    metric = data_metric(kind, data.labels is not None, output)
    return DataScorer(data, kind, output, reference, metric)


@dataclass(frozen=True)
class CallbackScorer:
    """The user's ``evaluate(model_path) -> float``; a failure or a non-number names the plan."""

    evaluate: Callable[[Path], Any]
    metric: Metric = field(default=CALLBACK_METRIC)

    def open(self, threads: int) -> Score:
        return self._score

    def _score(self, path: Path, plan: str) -> float:
        try:
            value = self.evaluate(path)
        except Exception as exc:
            raise ConfigError(
                f"evaluate({path.name!r}) raised {type(exc).__name__}: {exc} "
                f"(while measuring {plan})"
            ) from exc
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(
                f"evaluate({path.name!r}) returned {value!r} ({type(value).__name__}), not a "
                f"number (while measuring {plan}): return a float, higher is better"
            )
        if not math.isfinite(float(value)):
            raise ConfigError(
                f"evaluate({path.name!r}) returned {value!r} (while measuring {plan}): the "
                "score must be finite"
            )
        return float(value)


@dataclass(frozen=True)
class OutputLossScorer:
    """Each plan's mean loss against the float model's first output on ``batches``: KL of
    the softmax (logits, probabilities) or 0.5 ||y - y_float||^2 (embeddings), as the
    sensitivity analysis measures damage (``passes/sensitivity/perturbable_model.row_losses``).
    Built by :func:`output_loss_scorer`, which runs the float model once."""

    batches: tuple[dict[str, np.ndarray], ...]
    output: str
    reference: np.ndarray
    kind: Any  # passes.sensitivity.perturbable_model.OutputKind
    metric: Metric = field(
        default=Metric(
            "output_loss",
            "mean KL to the float model's output (0.5 squared distance for embeddings) on "
            "calibration batches (report.json's refinement.scored_on says which)",
            higher_is_better=False,
            fraction=False,
            units="nats per sample (KL), or squared output units (embeddings)",
        )
    )

    def open(self, threads: int) -> Score:
        return self._score

    def _score(self, path: Path, plan: str) -> float:
        from dyadiq.passes.sensitivity.perturbable_model import loss

        out = run_outputs(path, self.batches, [self.output])[self.output]
        return loss(self.reference, out, self.kind)


def output_loss_scorer(float_model: Path, batches: Any, kind: Any) -> OutputLossScorer:
    """An :class:`OutputLossScorer` on ``batches`` with the float model's outputs."""
    from dyadiq.evaluation import output_names

    held = tuple(dict(b) for b in batches)
    if not held:
        raise ConfigError("plan refinement needs at least one calibration batch to score on")
    output = output_names(float_model)[0]
    reference = run_outputs(float_model, held, [output])[output]
    return OutputLossScorer(held, output, reference, kind)


def describe_plan(formats: dict[str, LayerFormat]) -> str:
    """``plan W4A8: conv, fc; W8A8: conv2`` - a plan as an error message can show it."""
    by_format: dict[str, list[str]] = {}
    for layer, fmt in sorted(formats.items()):
        by_format.setdefault(fmt.label, []).append(layer)
    parts = []
    for label, layers in sorted(by_format.items()):
        shown = ", ".join(layers[:6]) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
        parts.append(f"{label}: {shown}")
    return "plan " + "; ".join(parts) if parts else "the float model"


@dataclass(frozen=True)
class ScorePlan:
    """One plan's QDQ model (serialized, built by the driver), written to a file and scored."""

    key: str
    model: bytes
    plan: str  # describe_plan(...)

    def run(self, score: Score) -> float:
        with tempfile.TemporaryDirectory(prefix="dyadiq_plan_") as tmp:
            path = Path(tmp) / "model.qdq.onnx"
            path.write_bytes(self.model)
            return score(path, self.plan)


def float_score(scorer: Any, float_model: Path) -> float:
    """The float model's score on the scorer's data: what every plan is compared with."""
    return float(scorer.open(1)(Path(float_model), "the float model"))
