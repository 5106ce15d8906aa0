"""The quantize pipeline: frontend -> analysis -> calibration -> rewrite -> backend.

Each step is an explicit call on explicit data (graph, plan, sites, statistics); nothing runs
implicitly. :func:`quantize` is what ``dyadiq quantize`` and the Python API run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from dyadiq.backends.onnx_qdq import write_qdq
from dyadiq.frontends.onnx_frontend import ModelSource, load_onnx, read_model, upgrade_opset
from dyadiq.graph import QGraph
from dyadiq.io import prepare_output_dir, write_text_atomic
from dyadiq.passes.activation_sites import ActivationSites, find_activation_sites
from dyadiq.passes.calibration.collector import (
    CalibrationStatistics,
    StatisticsRequest,
    collect_statistics,
)
from dyadiq.passes.calibration.data import CalibrationSource
from dyadiq.passes.calibration.observers import RangeMethod, estimate_range
from dyadiq.passes.insert_qdq import QDQResult, insert_qdq
from dyadiq.plan import PrecisionPlan

log = logging.getLogger(__name__)

QDQ_MIN_OPSET = 13  # per-axis DequantizeLinear
INT4_OPSET = 21


@dataclass(frozen=True)
class CalibrationConfig:
    method: RangeMethod = RangeMethod.PERCENTILE
    percentile: float = 99.99
    limit: int | None = None  # batches
    image_preset: str | None = None
    bins: int = 2048


@dataclass
class QuantizeResult:
    graph: QGraph
    plan: PrecisionPlan
    sites: ActivationSites
    qdq: QDQResult
    statistics: CalibrationStatistics
    model: onnx.ModelProto | None = None
    timings: dict[str, float] = field(default_factory=dict)


def calibrated_ranges(
    statistics: CalibrationStatistics, sites: ActivationSites, config: CalibrationConfig
) -> dict[str, tuple[float, float]]:
    return {
        name: estimate_range(
            statistics.histograms[name],
            config.method,
            bits=sites.group_bits[sites.group_of[name]],
            percentile=config.percentile,
        )
        for name in sites.tensors
    }


def prepare_graph(graph: QGraph, plan: PrecisionPlan) -> QGraph:
    """Upgrade the opset when the plan's formats need a newer one."""
    target = INT4_OPSET if plan.uses_4bit_types else QDQ_MIN_OPSET
    return upgrade_opset(graph, target)


def quantize_graph(
    graph: QGraph,
    plan: PrecisionPlan,
    calibration: CalibrationSource,
    config: CalibrationConfig = CalibrationConfig(),
) -> QuantizeResult:
    """Calibrate and insert QDQ for ``plan``; returns the simulator graph and what it used."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    graph = prepare_graph(graph, plan)
    sites = find_activation_sites(graph, plan)
    request = StatisticsRequest(frozenset(sites.tensors), bins=config.bins)
    statistics = collect_statistics(
        graph, request, calibration, image_preset=config.image_preset, limit=config.limit
    )
    timings["calibrate_s"] = statistics.seconds
    t = time.perf_counter()
    qdq = insert_qdq(graph, plan, sites, calibrated_ranges(statistics, sites, config))
    timings["rewrite_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    return QuantizeResult(graph, plan, sites, qdq, statistics, timings=timings)


def quantize(
    model: ModelSource,
    output_dir: Path,
    calibration: CalibrationSource,
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    act_signed: bool = False,
    exclude: frozenset[str] = frozenset(),
    config: CalibrationConfig = CalibrationConfig(),
    input_shapes: dict[str, list[int]] | None = None,
) -> QuantizeResult:
    """Uniform quantization of a model file; writes plan.json, model.qdq.onnx, report.json."""
    inputs = [Path(model)] if not isinstance(model, onnx.ModelProto) else []
    out = prepare_output_dir(output_dir, *inputs)
    t0 = time.perf_counter()
    graph = load_onnx(model, input_shapes=input_shapes)
    load_s = time.perf_counter() - t0
    plan = PrecisionPlan.uniform(
        graph, weight_bits=weight_bits, act_bits=act_bits, act_signed=act_signed, exclude=exclude
    )
    result = quantize_graph(graph, plan, calibration, config)
    result.timings["load_s"] = load_s
    plan.save(out / "plan.json")
    t = time.perf_counter()
    result.model = write_qdq(result.qdq.graph, out / "model.qdq.onnx")
    result.timings["export_s"] = time.perf_counter() - t
    float_bytes = read_model(model)[0].ByteSize()
    write_text_atomic(out / "report.json", json.dumps(build_report(result, float_bytes), indent=2))
    return result


def build_report(result: QuantizeResult, float_bytes: int) -> dict[str, Any]:
    plan = result.plan
    graph = result.graph
    layers = []
    for node in graph.weighted_layers():
        weight = graph.weight(node)
        fmt = plan.layers.get(node.name)
        layers.append(
            {
                "id": node.name,
                "op": node.op,
                "params": int(weight.values.size) if weight is not None else 0,
                "format": fmt.label if fmt else "float",
                "fused_activation": result.sites.fused_activations.get(node.name),
            }
        )
    return {
        "source": graph.source,
        "opset": graph.opset,
        "notes": graph.notes,
        "calibration_batches": result.statistics.batches,
        "quantized_activation_tensors": len(result.sites.tensors),
        "scale_groups": len(result.sites.groups()),
        "float_layers": [{"id": i, "reason": r} for i, r in result.sites.float_layers],
        "removed_activations": result.qdq.removed_activations,
        "sizes": {
            "float_model_bytes": float_bytes,
            "qdq_model_bytes": result.model.ByteSize() if result.model is not None else None,
            "quantized_weight_bytes_packed": result.qdq.weight_bytes,
        },
        "timings": result.timings,
        "layers": layers,
    }
