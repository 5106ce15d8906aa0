"""One streaming pass over calibration data that gathers every requested tensor statistic.

Passes declare the tensors they need observed (:class:`StatisticsRequest`); the collector
exposes exactly those tensors as extra outputs of an onnxruntime session, runs each batch once
and folds the values into a :class:`RunningHistogram` per tensor, so memory stays bounded by
one batch's activations plus O(bins) per tensor, however much data streams past.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from dyadiq.errors import CalibrationDataError, UnsupportedModelError
from dyadiq.frontends.runtime_validation import onnxruntime_reason
from dyadiq.graph import QGraph
from dyadiq.ort_sessions import Kernels, open_session
from dyadiq.passes.calibration.data import CalibrationSource, validated_batches
from dyadiq.passes.calibration.observers import RunningHistogram
from dyadiq.progress import track


@dataclass(frozen=True)
class StatisticsRequest:
    """The float tensors a pass needs ranges for."""

    tensors: frozenset[str]
    bins: int = 2048


@dataclass
class CalibrationStatistics:
    histograms: dict[str, RunningHistogram]
    batches: int = 0
    seconds: float = 0.0


def augmented_model(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (float intermediates)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in sorted(set(tensors) - existing):
        augmented.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    return augmented


def session(model: onnx.ModelProto, threads: int = 2) -> ort.InferenceSession:
    # Keep the graph as written (exact kernels): the collector must observe the tensors we
    # asked for, and dyadiq's own simulator must not be refused or rewritten by fusions.
    return open_session(model, kernels=Kernels.EXACT, threads=threads)


def collect_statistics(
    graph: QGraph,
    request: StatisticsRequest,
    source: CalibrationSource,
    *,
    image_preset: str | None = None,
    limit: int | None = None,
) -> CalibrationStatistics:
    start = time.perf_counter()
    model = augmented_model(graph.to_onnx(), request.tensors)
    try:
        sess = session(model)
    except Exception as exc:  # onnxruntime raises its own exception types
        # The frontend validated the model as loaded, so this is a graph a rewrite made.
        raise UnsupportedModelError(
            f"onnxruntime cannot run the prepared model for calibration: {onnxruntime_reason(exc)}"
        ) from exc
    names = sorted(request.tensors)
    histograms = {name: RunningHistogram(bins=request.bins) for name in names}
    batches = 0
    for feeds in track(
        validated_batches(source, graph.input_specs(), image_preset=image_preset, limit=limit),
        "calibrating",
        total=limit,
    ):
        if not names:  # nothing to observe; still validate every batch
            batches += 1
            continue
        try:
            values = sess.run(names, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CalibrationDataError(
                f"the model failed on calibration batch {batches}: {exc}"
            ) from exc
        for name, value in zip(names, values, strict=True):
            if not np.isfinite(value).all():
                raise CalibrationDataError(
                    f"the model produced NaN/Inf in tensor {name} on calibration batch {batches}"
                )
            histograms[name].update(value)
        batches += 1
    empty = [n for n, h in histograms.items() if h.samples == 0]
    if empty:
        raise CalibrationDataError(f"tensors received no values during calibration: {empty}")
    return CalibrationStatistics(histograms, batches, time.perf_counter() - start)
