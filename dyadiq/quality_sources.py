"""Where a quantize run measures quality: a zoo model's held-out data, the user's own data
(``--val`` / ``--test`` with optional labels), or the user's ``evaluate(model_path)`` callback.

:func:`input_problems` checks the options alone (before any work) and :func:`resolve` reads the
data, both listing every problem at once. The result, :class:`Quality`, holds the scorer that
``--max-drop`` searches with (:mod:`dyadiq.plan_scores`) on the *search* split, and what the
written model is reported on: the *report* split (``--test``, or the half of ``--val`` that the
search did not read, :mod:`dyadiq.held_out`), so the reported number is not the one the search
selected for. For a zoo model the two are its held-out samples at even and odd positions.
A callback's data is the user's own: dyadiq cannot hold any of it out, and the report says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.errors import CalibrationDataError, ConfigError
from dyadiq.held_out import HeldOut, Part, has_fixed_batch, read_held_out, split_in_two
from dyadiq.plan_scores import CallbackScorer, Tolerance, ZooScorer, data_scorer, zoo_metric

Evaluate = Callable[[Path], Any]


@dataclass(frozen=True)
class QualityInputs:
    """The quality options of a run, as the API takes them (``None``: not given)."""

    validation: Any = None  # --val: a folder of batches or an iterable of feed dicts
    test: Any = None  # --test
    labels: Any = None  # --labels: of --val's samples (a .npy / text file, or an array)
    test_labels: Any = None  # --test-labels
    evaluate: bool | Evaluate = True

    @property
    def callback(self) -> Evaluate | None:
        return self.evaluate if callable(self.evaluate) else None


def input_problems(
    inputs: QualityInputs,
    *,
    zoo: bool,
    max_drop: str | None,
    calibration: Any,
) -> list[str]:
    """Every contradiction or gap in the quality options, as one line each."""
    problems = []
    if not isinstance(inputs.evaluate, bool) and not callable(inputs.evaluate):
        problems.append(
            f"evaluate must be True, False or a callable evaluate(model_path) -> float, got "
            f"{type(inputs.evaluate).__name__}"
        )
    user_data = inputs.validation is not None or inputs.test is not None
    if zoo and user_data:
        problems.append(
            "--val / --test are for your own model: a zoo model brings its held-out data"
        )
    if max_drop is not None:
        try:
            Tolerance.parse(max_drop)
        except ConfigError as exc:
            problems.append(str(exc))
        if not zoo and inputs.validation is None and inputs.callback is None:
            problems.append(
                f"--max-drop {max_drop} measures plans on held-out data: give --val DIR (your "
                "held-out batches, as --calib reads them; --test DIR to report on), or from "
                "Python evaluate=callback; zoo models bring their own"
            )
    if inputs.labels is not None and inputs.validation is None:
        problems.append("--labels are --val's labels: give --val DIR too")
    if inputs.test_labels is not None and inputs.test is None:
        problems.append("--test-labels are --test's labels: give --test DIR too")
    if inputs.labels is not None and inputs.test is not None and inputs.test_labels is None:
        problems.append(
            "--labels make --max-drop search on accuracy: give --test-labels too, so that "
            "--test reports the same metric"
        )
    folders = {
        "--calib": calibration,
        "--val": inputs.validation,
        "--test": inputs.test,
    }
    paths = {k: Path(v).resolve() for k, v in folders.items() if isinstance(v, str | os.PathLike)}
    names = list(paths)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if paths[a] == paths[b]:
                problems.append(
                    f"{a} and {b} are the same folder ({paths[a]}): held-out data must be "
                    "other samples, or its numbers say nothing about unseen inputs"
                )
    return problems


@dataclass
class Quality:
    """What a run measures: ``search`` (the scorer --max-drop bisects with, on the search
    split), the report split's data (user data), the callback, and the description of the
    splits that report.json and the summary show."""

    search: Any = None
    report_data: HeldOut | None = None
    callback: Evaluate | None = None
    zoo_part: Part = Part.ALL
    held_out: dict[str, Any] = field(default_factory=dict)


def resolve(
    model_path: Path,
    artifacts: Any,
    inputs: QualityInputs,
    *,
    searching: bool,
    image_preset: str | None,
    eval_limit: int | None,
) -> Quality:
    """Read the user's data (every problem at once) and choose the search scorer and the
    report split. ``searching``: --max-drop will measure plans."""
    from dyadiq.evaluation import input_specs

    quality = Quality(callback=inputs.callback)
    validation, test = read_user_data(model_path, inputs, image_preset=image_preset)
    specs = input_specs(model_path) if validation is not None else {}
    if searching and inputs.callback is not None:
        quality.search = CallbackScorer(inputs.callback)
        quality.held_out["search"] = {"source": "the evaluate callback's own data"}
    elif searching and artifacts is not None:
        quality.search = ZooScorer(
            artifacts, zoo_metric(artifacts.model.primary_metric), Part.SEARCH, eval_limit
        )
        quality.zoo_part = Part.REPORT
        held = f"zoo {artifacts.model.name} held-out data"
        first = f"the first {eval_limit}" if eval_limit else "all"
        quality.held_out.update(
            search={"source": f"{held}, even positions of {first} samples"},
            report={"source": f"{held}, odd positions of {first} samples"},
            note=f"plan chosen on {held} at even sample positions, reported on the odd ones",
        )
    if validation is not None:
        searches_data = searching and quality.search is None  # no callback, not a zoo model
        search, report, note = validation, validation, ""  # nothing searched: report on all
        if test is not None:
            report = test
            if searches_data:
                note = f"plan chosen on {validation.source}, reported on {test.source}"
        elif searches_data:
            splits = split_in_two(validation, fixed_batch=has_fixed_batch(specs))
            search, report, note = splits.search, splits.report, splits.note
        if searches_data:
            quality.search = data_scorer(model_path, search)
            quality.held_out["search"] = search.describe()
        quality.report_data = report
        quality.held_out.update(report=report.describe(), **({"note": note} if note else {}))
    elif test is not None:
        quality.report_data = test
        quality.held_out.update(report=test.describe())
    if quality.callback is not None and quality.report_data is None and artifacts is None:
        note = "the evaluate callback scores the written model on its own data"
        if searching:
            note += (
                ", the same data the search measured on: give test= data to report on "
                "samples the search did not see"
            )
        quality.held_out.update(report={"source": "the evaluate callback's own data"}, note=note)
    if quality.search is not None:
        quality.held_out["metric"] = quality.search.metric.describe()
    if inputs.evaluate is False:  # nothing is reported (--no-eval)
        quality.report_data = None
        quality.held_out.pop("report", None)
    return quality


def read_user_data(
    model_path: Path, inputs: QualityInputs, *, image_preset: str | None
) -> tuple[HeldOut | None, HeldOut | None]:
    """(--val, --test) read and checked against the model's inputs (None where not given);
    every problem of both in one :class:`CalibrationDataError`."""
    from dyadiq.evaluation import input_specs

    if inputs.validation is None and inputs.test is None:
        return None, None
    specs = input_specs(model_path)
    problems: list[str] = []
    read = {}
    for option, source, labels in (
        ("--val", inputs.validation, inputs.labels),
        ("--test", inputs.test, inputs.test_labels),
    ):
        if source is None:
            continue
        try:
            read[option] = read_held_out(
                source,
                specs,
                option=option,
                labels=labels_array(labels, option),
                image_preset=image_preset,
            )
        except (CalibrationDataError, ConfigError) as exc:
            problems.append(str(exc))
    if problems:
        raise CalibrationDataError("\n".join(problems))
    return read.get("--val"), read.get("--test")


def labels_array(labels: Any, option: str) -> np.ndarray | None:
    from dyadiq.evaluation import read_labels

    if labels is None:
        return None
    if isinstance(labels, str | os.PathLike):
        return read_labels(Path(labels))
    array = np.asarray(labels).reshape(-1)
    if array.dtype.kind not in "iu":
        raise ConfigError(f"{option}'s labels must be class indices (integers), got {array.dtype}")
    return array.astype(np.int64)


def report_metrics(
    quality: Quality, float_model: Path, models: dict[str, Path]
) -> dict[str, dict[str, float]]:
    """The written models scored on the report split (the user's data, by output kind) and by
    the callback (as ``evaluate``), float first; {} when neither applies."""
    from dyadiq.evaluation import OutputKind, evaluate_on_data, run_outputs, score_output

    metrics: dict[str, dict[str, float]] = {"float": {}, **{name: {} for name in models}}
    data = quality.report_data
    if data is not None:
        kinds, scored = evaluate_on_data(
            float_model, models, list(data.batches), labels=data.labels
        )
        first = next(iter(kinds))
        for name in models:
            metrics[name].update(scored.get(name) or scored[f"{name}: {first}"])
        # the float model against itself: its accuracy with labels, perfect agreement else
        reference = run_outputs(float_model, data.batches, [first])[first]
        labels = data.labels if kinds[first] is OutputKind.CLASSES else None
        own = score_output(kinds[first], reference, reference, labels)
        metrics["float"].update({k: v for k, v in own.items() if np.isfinite(v)})
        metrics["float"]["samples"] = float(data.samples)
    if quality.callback is not None:
        scorer = CallbackScorer(quality.callback).open(1)
        metrics["float"]["evaluate"] = scorer(float_model, "the float model")
        for name, path in models.items():
            metrics[name]["evaluate"] = scorer(path, f"the written {path.name}")
    return metrics if any(metrics.values()) else {}
