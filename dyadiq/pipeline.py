"""The quantize pipeline: frontend -> analysis -> calibration -> rewrite -> backend.

Each step is an explicit call on explicit data (graph, plan, sites, statistics); nothing runs
implicitly. :func:`quantize` is what ``dyadiq quantize`` and the Python API run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from dyadiq.backends.capabilities import INTEGER_ONNX, ONNX_QDQ, validate_plan
from dyadiq.backends.onnx.integer import export_integer_onnx
from dyadiq.backends.onnx.qdq import QDQStyle, export_qdq, write_qdq
from dyadiq.consistency import bit_exactness, simulation_agreement
from dyadiq.errors import ConfigError
from dyadiq.frontends.onnx_frontend import ModelSource, load_onnx, read_model, upgrade_opset
from dyadiq.graph import QGraph
from dyadiq.integer_program import IntegerProgram
from dyadiq.io import save_model_atomic, staged_output_dir, write_text_atomic
from dyadiq.passes.activation_sites import ActivationSites, find_activation_sites
from dyadiq.passes.calibration.collector import (
    CalibrationStatistics,
    StatisticsRequest,
    collect_statistics,
)
from dyadiq.passes.calibration.data import CalibrationSource, validated_batches
from dyadiq.passes.calibration.observers import RangeMethod, auto_method, estimate_range
from dyadiq.passes.calibration.range_search import (
    ActivationRangeEvaluator,
    RangeSearchOptions,
    search_ranges,
)
from dyadiq.passes.canonicalize_hard_swish import canonicalize_hard_swish
from dyadiq.passes.compensation.compensated_weights import CompensatedWeights
from dyadiq.passes.compensation.cross_layer_equalization import equalize_cross_layer
from dyadiq.passes.compensation.sequential import SequentialCompensator
from dyadiq.passes.compensation.settings import CompensationPass, CompensationSettings
from dyadiq.passes.decompose_lstm import decompose_lstm
from dyadiq.passes.fold_batch_norm import fold_batch_norm
from dyadiq.passes.insert_qdq import QDQResult, group_quantizers, insert_qdq
from dyadiq.passes.integerize import AccumulatorOverflowError, integerize
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import ROUND_TO_NEAREST, WeightQuantizer

log = logging.getLogger(__name__)

QDQ_MIN_OPSET = 14  # per-axis DequantizeLinear (13), HardSwish (14)
INT4_OPSET = 21


@dataclass(frozen=True)
class CalibrationConfig:
    """How activation ranges are estimated: the range method (and its percentile), how many
    batches are read, the image preset for a folder of images, the histogram resolution, and
    the end-to-end search that may then change them (``range_search``)."""

    method: RangeMethod = RangeMethod.AUTO
    percentile: float = 99.99
    limit: int | None = None  # batches
    image_preset: str | None = None
    bins: int = 2048
    range_search: RangeSearchOptions = field(default_factory=RangeSearchOptions)

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:  # also false for NaN
            raise ConfigError(f"--percentile must be in (0, 100], got {self.percentile}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--calib-limit must be at least 1 batch, got {self.limit}")
        if self.bins < 2:
            raise ConfigError(f"a histogram needs at least 2 bins, got {self.bins}")


@dataclass(repr=False)
class QuantizeResult:
    """What :func:`quantize_graph` / :func:`quantize` made: the prepared graph, the plan, the
    activation sites and statistics, the QDQ simulator, and (with ``integer``) the program."""

    graph: QGraph
    plan: PrecisionPlan
    sites: ActivationSites
    qdq: QDQResult
    statistics: CalibrationStatistics
    model: onnx.ModelProto | None = None
    program: IntegerProgram | None = None
    timings: dict[str, float] = field(default_factory=dict)
    weights: WeightQuantizer = ROUND_TO_NEAREST  # what insert_qdq quantized the weights with
    compensation: dict[str, Any] | None = None  # its report, when compensated
    range_search: dict[str, Any] | None = None  # its report, when activation ranges were searched
    qdq_style: QDQStyle = QDQStyle.ORT

    def __repr__(self) -> str:
        # one line: the default dataclass repr printed the whole graph (20,000+ characters)
        integer = "integer program" if self.program is not None else "no integer program"
        return (
            f"<QuantizeResult {self.graph.source!s}: {len(self.plan.layers)} layers, "
            f"{len(self.sites.tensors)} activation tensors, {self.statistics.batches} "
            f"calibration batches, {self.qdq_style.value} QDQ, {integer}>"
        )


def calibrated_ranges(
    statistics: CalibrationStatistics,
    sites: ActivationSites,
    config: CalibrationConfig,
    graph: QGraph,
) -> dict[str, tuple[float, float]]:
    """Each quantized tensor's ``(lo, hi)`` from its histogram, by ``config``'s method at its
    scale group's width (the auto method resolved per tensor by the op that made it)."""
    tensors = graph.tensors()
    return {
        name: estimate_range(
            statistics.histograms[name],
            auto_method(_origin_op(graph, tensors[name]))
            if config.method is RangeMethod.AUTO
            else config.method,
            bits=sites.group_bits[sites.group_of[name]],
            percentile=config.percentile,
        )
        for name in sites.tensors
    }


def searched_ranges(
    graph: QGraph,
    sites: ActivationSites,
    statistics: CalibrationStatistics,
    ranges: dict[str, tuple[float, float]],
    calibration: CalibrationSource,
    config: CalibrationConfig,
    *,
    signed: bool,
) -> tuple[dict[str, tuple[float, float]], dict[str, Any] | None]:
    """``ranges`` after the end-to-end range search (``config.range_search``) on the leading
    calibration batches, with its report; unchanged (and no report) when it is off. A
    calibration reader that cannot be read twice is not searched (the report says so)."""
    options = config.range_search
    if not options.enabled:
        return ranges, None
    batches = verification_batches(calibration, graph, config.image_preset, options.samples)
    if not batches:
        return ranges, {"skipped": "the calibration source can be read only once"}
    evaluator = ActivationRangeEvaluator(
        graph,
        sites,
        batches,
        signed=signed,
        before_output_quantizer=options.before_output_quantizer,
    )
    searched, report = search_ranges(
        evaluator, statistics.histograms, ranges, options.evaluations, options
    )
    return searched, report.to_json()


def _origin_op(graph: QGraph, tensor: gs.Tensor) -> str | None:
    """The op type whose values ``tensor`` holds, looking through ops that keep their input's
    quantization (op_facts ``shares_input_scale``: data movement, order-preserving selection)."""
    node = graph.producer(tensor)
    while node is not None and graph.facts(node).shares_input_scale and node.inputs:
        node = graph.producer(node.inputs[0])
    return node.op if node is not None else None


def symmetric_ranges(ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Each range widened to ``(-128 s, 127 s)`` with ``s = max(|lo|, |hi|) / 127``: the range
    whose signed 8-bit affine quantizer has zero point 0 and scale ``amax / 127`` (TensorRT's
    symmetric activations). ``activation_quant`` of it gives ``(hi - lo) / 255 = s``."""
    out = {}
    for name, (lo, hi) in ranges.items():
        step = max(abs(lo), abs(hi)) / 127.0
        out[name] = (-128.0 * step, 127.0 * step)
    return out


def without_output_sites(graph: QGraph, sites: ActivationSites) -> ActivationSites:
    """``sites`` less the model outputs that no node reads: TensorRT's placement quantizes the
    inputs of quantized ops, not the results a model returns."""
    outputs = {t.name for t in graph.graph.outputs if not t.outputs}
    if not outputs & set(sites.tensors):
        return sites
    fused = {
        layer: act
        for layer, act in sites.fused_activations.items()
        if graph.node(act).outputs[0].name not in outputs
    }
    return dataclasses.replace(
        sites,
        tensors=tuple(t for t in sites.tensors if t not in outputs),
        group_of={t: g for t, g in sites.group_of.items() if t not in outputs},
        fused_activations=fused,
    )


def prepare_graph(graph: QGraph, *, needs_int4: bool = False) -> QGraph:
    """Float rewrites every backend wants: opset upgrade, BN folding, hard-swish as one op.

    Returns a new graph; node ids of weighted layers are unchanged, so plans made on either
    graph apply to both.
    """
    target = INT4_OPSET if needs_int4 else QDQ_MIN_OPSET
    prepared = upgrade_opset(graph, target)
    prepared = prepared.copy() if prepared is graph else prepared
    folded = fold_batch_norm(prepared)
    if folded.changed:
        prepared.notes.append(f"folded {len(folded.changed)} BatchNorm/Mul/Add node(s)")
    swish = canonicalize_hard_swish(prepared)
    if swish.changed:
        prepared.notes.append(f"rewrote {len(swish.changed)} nodes into HardSwish")
    lstm = decompose_lstm(prepared)  # its cell's ops run on every backend; LSTM does not
    prepared.rewrites.extend([folded, swish, *([lstm] if lstm.changed or lstm.skipped else [])])
    return prepared


def equalize_if_asked(graph: QGraph, compensation: CompensationSettings) -> dict[str, Any] | None:
    """Cross-layer equalisation of a prepared graph, in place, when ``compensation`` asks:
    a float-equivalent rewrite, so every later step (calibration, compensation, analysis)
    sees the equalised weights. Deterministic: each graph prepared from one model gets the
    same weights, so a quantizer computed on one applies to the other."""
    if not compensation.uses(CompensationPass.CLE):
        return None
    report = equalize_cross_layer(graph)
    graph.notes.append(f"cross-layer equalisation: {len(report.equalized)} pair(s)")
    return report.to_json()


def compensation_batches(
    calibration: CalibrationSource, graph: QGraph, image_preset: str | None, count: int
) -> list[dict[str, Any]]:
    """The leading calibration batches compensation reads its layer inputs from."""
    return verification_batches(calibration, graph, image_preset, count)


def quantize_graph(
    graph: QGraph,
    plan: PrecisionPlan,
    calibration: CalibrationSource,
    config: CalibrationConfig = CalibrationConfig(),
    *,
    compensation: CompensationSettings = CompensationSettings(),
    weights: WeightQuantizer | None = None,
    qdq_style: QDQStyle = QDQStyle.ORT,
) -> QuantizeResult:
    """Calibrate and insert QDQ for ``plan``; returns the simulator graph and what it used.

    Weights are quantized by ``weights`` when given (a quantizer computed once for many
    plans), else compensated as ``compensation`` asks (round to nearest for none).
    ``qdq_style`` TENSORRT makes activation ranges symmetric (zero point 0; the plan must
    ask for signed activations) and leaves the model's outputs unquantized.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    graph = prepare_graph(graph, needs_int4=plan.uses_4bit_types)
    equalization = equalize_if_asked(graph, compensation)
    sites = find_activation_sites(graph, plan)
    if qdq_style is QDQStyle.TENSORRT:
        sites = without_output_sites(graph, sites)
    request = StatisticsRequest(frozenset(sites.tensors), bins=config.bins)
    statistics = collect_statistics(
        graph, request, calibration, image_preset=config.image_preset, limit=config.limit
    )
    timings["calibrate_s"] = statistics.seconds
    ranges = calibrated_ranges(statistics, sites, config, graph)
    t = time.perf_counter()
    ranges, range_search = searched_ranges(
        graph, sites, statistics, ranges, calibration, config, signed=plan.act_signed
    )
    if range_search is not None:
        timings["range_search_s"] = time.perf_counter() - t
    if qdq_style is QDQStyle.TENSORRT:
        ranges = symmetric_ranges(ranges)
    report = None
    if weights is None and compensation.enabled:
        t = time.perf_counter()
        batches = compensation_batches(
            calibration, graph, config.image_preset, compensation.samples
        )
        params = group_quantizers(sites, ranges, signed=plan.act_signed)
        compensator = SequentialCompensator(graph, batches, compensation, act_params=params)
        weights = compensator.ensure({f.weight_bits for f in plan.layers.values()})
        timings["compensate_s"] = time.perf_counter() - t
    if isinstance(weights, CompensatedWeights):
        report = weights.report({k: f.weight_bits for k, f in plan.layers.items()})
    if equalization is not None:
        report = {**(report or {}), "cross_layer_equalization": equalization}
    weights = weights if weights is not None else ROUND_TO_NEAREST
    t = time.perf_counter()
    qdq = insert_qdq(graph, plan, sites, ranges, weights)
    if qdq.shared_weights.changed:  # report.json lists the layers that read one stored weight
        graph.rewrites.append(qdq.shared_weights)
    timings["rewrite_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    return QuantizeResult(
        graph,
        plan,
        sites,
        qdq,
        statistics,
        timings=timings,
        weights=weights,
        compensation=report,
        range_search=range_search,
        qdq_style=qdq_style,
    )


class PlanBuilder:
    """QDQ models for many plans of one model from a single calibration pass.

    Activation statistics depend on which tensors are quantized and at what width, not on
    the weight widths; plans that differ only in weight bits (search, frontier, bisection,
    benchmarks) therefore share one pass. A plan whose activation sites or widths differ from
    the first one is calibrated on its own (counted in ``fallbacks``).
    """

    def __init__(
        self,
        graph: QGraph,
        calibration: Sequence[dict[str, Any]],
        config: CalibrationConfig = CalibrationConfig(),
        *,
        act_bits: int = 8,
        exclude: frozenset[str] = frozenset(),
        compensation: CompensationSettings = CompensationSettings(),
    ) -> None:
        self.source = graph
        self.graph = prepare_graph(graph, needs_int4=True)
        self.equalization = equalize_if_asked(self.graph, compensation)
        self.calibration = list(calibration)
        self.config = config
        base = PrecisionPlan.uniform(self.graph, act_bits=act_bits, exclude=exclude)
        self.sites = find_activation_sites(self.graph, base)
        request = StatisticsRequest(frozenset(self.sites.tensors), bins=config.bins)
        statistics = collect_statistics(
            self.graph, request, self.calibration, image_preset=config.image_preset
        )
        self.calibration_s = statistics.seconds
        ranges = calibrated_ranges(statistics, self.sites, config, self.graph)
        t = time.perf_counter()
        self.ranges, self.range_search = searched_ranges(
            self.graph, self.sites, statistics, ranges, self.calibration, config, signed=False
        )
        self.range_search_s = time.perf_counter() - t
        self.fallbacks = 0
        self.compensation = compensation
        self.compensator = SequentialCompensator(
            self.graph,
            self.calibration,
            compensation,
            act_params=group_quantizers(self.sites, self.ranges, signed=False),
        )

    def build(self, plan: PrecisionPlan) -> onnx.ModelProto:
        """The QDQ model of ``plan`` (calibrated again only when its sites differ)."""
        sites = find_activation_sites(self.graph, plan)
        same = (
            sites.tensors == self.sites.tensors
            and sites.group_of == self.sites.group_of
            and sites.group_bits == self.sites.group_bits
        )
        weights = self.compensator.ensure({f.weight_bits for f in plan.layers.values()})
        if same:
            qdq = insert_qdq(self.graph, plan, sites, self.ranges, weights)
        else:
            self.fallbacks += 1
            qdq = quantize_graph(
                self.source, plan, self.calibration, self.config, weights=weights
            ).qdq
        return export_qdq(qdq.graph)


def verification_batches(
    calibration: CalibrationSource, graph: QGraph, image_preset: str | None, count: int
) -> list[dict[str, Any]]:
    """A few calibration batches to verify the integer model on (re-reading the source)."""
    if isinstance(calibration, Sequence) and not isinstance(calibration, str):
        return [dict(b) for b in list(calibration)[:count]]
    if isinstance(calibration, str | Path):
        specs = graph.input_specs()
        return list(validated_batches(calibration, specs, image_preset=image_preset, limit=count))
    return []


def integer_program(result: QuantizeResult) -> IntegerProgram:
    """The integer program of a quantized result (raises AccumulatorOverflowError)."""
    return integerize(
        result.graph, result.plan, result.sites, result.qdq.act_params, weights=result.weights
    )


OVERFLOW_REASON = (
    "its int32 accumulator could overflow (worst case |acc| {acc:,} > 2^31 - 1): kept in float "
    "in both models (--strict-integer refuses instead)"
)


def overflowing_layers_in_float(
    result: QuantizeResult,
    source: QGraph,
    calibration: CalibrationSource,
    config: CalibrationConfig,
    *,
    compensation: CompensationSettings,
    strict: bool,
) -> tuple[QuantizeResult, IntegerProgram, dict[str, int]]:
    """``result`` and its integer program, with every layer whose accumulator could overflow
    moved to float (a float island of the integer model, and float in the QDQ model too, so
    that the two still agree); the moved layers with their worst-case |accumulator|.
    ``source`` is the graph ``result`` was quantized from, before :func:`prepare_graph`.

    The bound is a worst case over all inputs, so this only drops layers that could
    overflow; ``strict`` raises the error instead, as integerize does."""
    try:
        return result, integer_program(result), {}
    except AccumulatorOverflowError as error:
        if strict or not error.layers:
            raise
        overflowing = error.layers
    log.warning("keeping %d layer(s) in float: %s", len(overflowing), OVERFLOW_REASON)
    plan = dataclasses.replace(
        result.plan,
        layers={k: v for k, v in result.plan.layers.items() if k not in overflowing},
        excluded=result.plan.excluded | frozenset(overflowing),
    )
    redone = quantize_graph(
        source,
        plan,
        calibration,
        config,
        compensation=compensation,  # for its equalisation, which the weights were made on
        weights=result.weights,  # the compensation already computed; float layers skip it
        qdq_style=result.qdq_style,
    )
    redone.compensation = result.compensation
    redone.timings = {**result.timings, "overflow_requantize_s": redone.timings["total_s"]}
    return redone, integer_program(redone), overflowing


def build_integer(
    result: QuantizeResult,
    check_batches: list[dict[str, Any]],
    program: IntegerProgram | None = None,
) -> tuple[IntegerProgram, onnx.ModelProto, dict[str, Any]]:
    """Integerize a quantized result (unless ``program`` is given), export it, and verify it
    against the reference."""
    if program is None:
        program = integer_program(result)
    model = export_integer_onnx(program)
    report: dict[str, Any] = {
        "float_ops": program.float_ops,
        "fully_integer": not program.float_ops,
        "weights_stored_as": "int8 containers (codes of 2..8 bits)",
        "check_batches": len(check_batches),
    }
    if check_batches:
        report["bit_exact_vs_reference"] = bit_exactness(program, model, check_batches)
        qdq_model = result.model if result.model is not None else export_qdq(result.qdq.graph)
        report["qdq_vs_integer"] = simulation_agreement(program, qdq_model, model, check_batches)
    return program, model, report


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
    plan: PrecisionPlan | None = None,
    integer: bool = False,
    check_batches: int = 8,
    compensation: CompensationSettings = CompensationSettings(),
    weights: WeightQuantizer | None = None,
    qdq_style: QDQStyle = QDQStyle.ORT,
    strict_integer: bool = False,
) -> QuantizeResult:
    """Quantize a model file; writes plan.json, model.qdq.onnx, report.json and, with
    ``integer``, model.int.onnx (verified bit-exact against the reference interpreter).

    ``plan`` (e.g. a mixed-precision plan.json) replaces the uniform plan made from
    ``weight_bits`` / ``act_bits`` / ``exclude``. ``compensation`` selects the weight-rounding
    compensation passes (``weights``: a compensated quantizer already computed, e.g. the one
    the sensitivity analysis priced). ``qdq_style`` TENSORRT writes TensorRT's explicit
    quantization (:mod:`dyadiq.backends.onnx.qdq`): signed symmetric activations, which it
    sets on the plan, and a float bias. With ``integer``, a layer whose int32 accumulator
    could overflow is kept in float (named in report.json's ``float_layers``), unless
    ``strict_integer``.

    This is the pipeline step; :func:`dyadiq.quantize` adds budgets, targets, evaluation and
    a summary of the run around it.
    """
    inputs = [Path(model)] if not isinstance(model, onnx.ModelProto) else []
    if isinstance(calibration, str | Path):
        inputs.append(Path(calibration))
    # Built in a hidden sibling folder that replaces output_dir only when everything is written.
    with staged_output_dir(output_dir, *inputs) as out:
        t0 = time.perf_counter()
        graph = load_onnx(model, input_shapes=input_shapes)
        load_s = time.perf_counter() - t0
        if plan is None:
            plan = PrecisionPlan.uniform(
                graph,
                weight_bits=weight_bits,
                act_bits=act_bits,
                act_signed=act_signed,
                exclude=exclude,
            )
        if qdq_style is QDQStyle.TENSORRT:
            check_tensorrt_plan(plan, integer)
            plan = dataclasses.replace(plan, act_signed=True)
        plan.validate_for(graph)
        validate_plan(plan, graph, *((ONNX_QDQ, INTEGER_ONNX) if integer else (ONNX_QDQ,)))
        result = quantize_graph(
            graph,
            plan,
            calibration,
            config,
            compensation=compensation,
            weights=weights,
            qdq_style=qdq_style,
        )
        result.timings["load_s"] = load_s
        program: IntegerProgram | None = None
        overflowing: dict[str, int] = {}
        if integer:
            result, program, overflowing = overflowing_layers_in_float(
                result, graph, calibration, config, compensation=compensation, strict=strict_integer
            )
            plan = result.plan
        plan.save(out / "plan.json")
        t = time.perf_counter()
        result.model = write_qdq(result.qdq.graph, out / "model.qdq.onnx", qdq_style)
        result.timings["export_s"] = time.perf_counter() - t
        float_bytes = read_model(model)[0].ByteSize()
        report = build_report(result, float_bytes)
        for entry in report["float_layers"]:
            if entry["id"] in overflowing:
                entry["reason"] = OVERFLOW_REASON.format(acc=overflowing[entry["id"]])
        if integer:
            t = time.perf_counter()
            batches = verification_batches(calibration, graph, config.image_preset, check_batches)
            result.program, int_model, report["integer"] = build_integer(result, batches, program)
            report["integer"]["overflow_float_layers"] = sorted(overflowing)
            save_model_atomic(int_model, out / "model.int.onnx")
            report["sizes"]["integer_model_bytes"] = int_model.ByteSize()
            result.timings["integer_s"] = time.perf_counter() - t
        write_text_atomic(out / "report.json", json.dumps(report, indent=2))
        return result


def check_tensorrt_plan(plan: PrecisionPlan, integer: bool) -> None:
    """TensorRT's explicit quantization runs int8 x int8 kernels: W8A8 layers only. The
    integer-only model and the compiled targets follow onnxruntime's layout (style ``ort``)."""
    if integer:
        raise ConfigError(
            "--qdq-style tensorrt writes a QDQ model for TensorRT; the integer model and "
            "--target builds use the default style: drop --integer / --target, or the style"
        )
    narrow = sorted(k for k, f in plan.layers.items() if f.weight_bits != 8 or f.act_bits != 8)
    if narrow or plan.default_act_bits != 8:
        raise ConfigError(
            "--qdq-style tensorrt needs W8A8 layers (TensorRT's int8 Q/DQ kernels); the plan "
            f"has other widths at {', '.join(narrow[:5]) or 'its activations'}"
        )


def build_report(result: QuantizeResult, float_bytes: int) -> dict[str, Any]:
    """report.json's pipeline sections: source, rewrites, sites, sizes, timings, layers."""
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
    report = {
        "source": graph.source,
        "opset": graph.opset,
        "notes": graph.notes,
        "rewrites": [rewrite.to_json() for rewrite in graph.rewrites],
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
        "compensation": result.compensation,
    }
    if result.range_search is not None:  # absent when off: reports stay as they were
        report["activation_range_search"] = result.range_search
    if result.qdq_style is not QDQStyle.ORT:  # absent for the default: reports stay as they were
        report["qdq_style"] = result.qdq_style.value
    return report
