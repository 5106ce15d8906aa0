"""The weight-only run: a float ONNX model and calibration batches in; a weight-only model
(blocked DequantizeLinear or MatMulNBits), its plan and a report out.

    find weights -> input Hessians (GPTQ or AWQ) -> [AWQ input scales] ->
    [per-layer KL damage -> ILP] -> quantize each layer at its width -> export -> save
    (external data when needed)

The output folder is all-or-nothing (:func:`dyadiq.io.staged_output_dir`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dyadiq.backends.onnx.weight_only import ExportReport, WeightOnlyForm, export_weight_only
from dyadiq.errors import ConfigError
from dyadiq.io import save_model_atomic, staged_output_dir, write_text_atomic
from dyadiq.passes.weight_only.awq import (
    ScaledInputs,
    layer_scales,
    rescale_graph,
    scale_hessians,
    search_input_scales,
)
from dyadiq.passes.weight_only.groupwise import GroupwiseWeight
from dyadiq.passes.weight_only.layers import (
    WeightInventory,
    WeightLayer,
    find_weights,
    matches,
)
from dyadiq.passes.weight_only.model_file import ModelFile
from dyadiq.passes.weight_only.quantize import (
    LayerQuantizer,
    Method,
    WeightOnlySettings,
    layer_hessian,
    relative_output_error,
)
from dyadiq.passes.weight_only.sequential import sequential_quantize
from dyadiq.passes.weight_only.statistics import activation_hessians

log = logging.getLogger(__name__)

MODEL_FILE = "model.wo.onnx"
PLAN_FILE = "plan.json"
REPORT_FILE = "report.json"
WEIGHT_ONLY_OUTPUTS = frozenset({MODEL_FILE, MODEL_FILE + ".data", PLAN_FILE, REPORT_FILE})


@dataclass(frozen=True)
class InputScaling:
    """AWQ's result (:mod:`.awq`): the sets of scaled inputs, the graph with 1/s applied
    (the weights are stored as W diag(s)), where each 1/s went, and the search's seconds."""

    scalings: tuple[ScaledInputs, ...]
    header: onnx.ModelProto
    where: dict[str, str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "sets": [x.to_json() for x in self.scalings],
            "inverse_scale": self.where,
            "seconds": round(self.seconds, 1),
        }


@dataclass
class Prepared:
    """What every width of every layer needs: the source, its weights, the quantizer."""

    source: ModelFile
    inventory: WeightInventory
    quantizer: LayerQuantizer
    seconds: float
    # (layer id, bits) -> result, kept when ``memo``: the sensitivity analysis quantizes
    # every layer at every width, and the chosen plan then reuses those results
    memo: bool = False
    _done: dict[tuple[str, int], tuple[GroupwiseWeight, float]] = field(default_factory=dict)
    # the calibration batches, kept for sequential GPTQ's passes over the quantized prefix
    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)
    scaling: InputScaling | None = None

    def weight(self, layer: WeightLayer) -> np.ndarray:
        """W [R, K] as quantized: W diag(s) for a weight with AWQ input scales."""
        w = np.asarray(layer.matrix(self.source.array(layer.initializer)), np.float32)
        s = self.quantizer.input_scales.get(layer.id)
        return w if s is None else (w * s[None, :]).astype(np.float32)

    @property
    def header(self) -> onnx.ModelProto:
        """The graph the quantized weights go into (with 1/s applied under AWQ)."""
        return self.source.header if self.scaling is None else self.scaling.header

    def quantize(self, layer: WeightLayer, bits: int) -> GroupwiseWeight:
        return self.quantize_timed(layer, bits, self.weight(layer))[0]

    def quantize_timed(
        self, layer: WeightLayer, bits: int, w: np.ndarray
    ) -> tuple[GroupwiseWeight, float]:
        """The layer at ``bits`` and the seconds its quantization took (when first done)."""
        key = (layer.id, bits)
        if key in self._done:
            return self._done[key]
        t0 = time.perf_counter()
        result = (self.quantizer(layer, w, bits), time.perf_counter() - t0)
        if self.memo:
            self._done[key] = result
        return result


def prepare(
    model_path: Path,
    batches: Iterable[Mapping[str, np.ndarray]],
    settings: WeightOnlySettings,
    *,
    exclude: Sequence[str] = (),
    memo: bool = False,
) -> Prepared:
    """Load the model's header, find its weights (minus ``exclude``, by layer id) and, for
    GPTQ, collect the input Hessians."""
    t0 = time.perf_counter()
    source = ModelFile.load(Path(model_path))
    inventory = find_weights(source.header)
    unknown = [p for p in exclude if not any(matches(x, p) for x in inventory.layers)]
    if unknown:
        raise ConfigError(f"--exclude matches no weight-only layer: {unknown}")
    kept = [x for x in inventory.layers if not any(matches(x, p) for p in exclude)]
    excluded = {x.initializer: "excluded (--exclude)" for x in inventory.layers if x not in kept}
    inventory = WeightInventory(tuple(kept), {**inventory.skipped, **excluded})
    if not inventory.layers:
        raise ConfigError("the model has no MatMul / Gemm / Gather weight to quantize")
    sequential = settings.method is Method.GPTQ and settings.sequential
    calibration = [dict(b) for b in batches] if sequential else []
    hessians = (
        activation_hessians(source, inventory.layers, calibration or batches)
        if settings.method is Method.GPTQ or settings.awq
        else {}
    )
    quantizer = LayerQuantizer(settings, hessians)
    prepared = Prepared(
        source, inventory, quantizer, time.perf_counter() - t0, memo, calibration=calibration
    )
    return with_input_scaling(prepared, settings) if settings.awq else prepared


def with_input_scaling(prepared: Prepared, settings: WeightOnlySettings) -> Prepared:
    """``prepared`` (its float Hessians, no scaling yet) with AWQ's input scales searched
    at ``settings.awq_bits`` and applied: a new :class:`Prepared` quantizing W diag(s) on
    the scaled Hessians, into the graph with 1/s. The same float Hessians serve several
    search widths."""
    if prepared.scaling is not None:
        raise ConfigError("the prepared model already has AWQ input scales")
    t0 = time.perf_counter()
    float_h = prepared.quantizer.hessians
    layers = prepared.inventory.layers
    base = prepared.quantizer.settings
    scalings = search_input_scales(
        layers,
        float_h,
        prepared.weight,
        settings.format(settings.awq_bits),
        lambda x: base.tied_damp if x.tied else base.damp,
    )
    header, where = rescale_graph(prepared.source.header, layers, scalings, prepared.source.array)
    quantizer = LayerQuantizer(settings, scale_hessians(float_h, scalings), layer_scales(scalings))
    seconds = time.perf_counter() - t0
    for x in scalings:
        log.info("AWQ %s: alpha %.2f (%d weights)", x.activations[0], x.alpha, len(x.layers))
    return Prepared(
        prepared.source,
        prepared.inventory,
        quantizer,
        prepared.seconds + seconds,
        prepared.memo,
        calibration=prepared.calibration,
        scaling=InputScaling(tuple(scalings), header, where, seconds),
    )


def quantize_layers(
    prepared: Prepared,
    bits: Mapping[str, int],
    *,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, GroupwiseWeight], dict[str, dict[str, Any]]]:
    """Every layer of ``bits`` at its width; per layer, its report row."""
    by_id = prepared.inventory.by_id()
    quantized: dict[str, GroupwiseWeight] = {}
    rows: dict[str, dict[str, Any]] = {}
    settings = prepared.quantizer.settings
    in_sequence: dict[str, GroupwiseWeight] = {}
    if settings.method is Method.GPTQ and settings.sequential:
        # the plan's own prefix: no per-layer memo (the sensitivity analysis's float-H
        # results stay what it measured)
        in_sequence = sequential_quantize(
            prepared.source,
            prepared.inventory.layers,
            prepared.calibration,
            bits,
            prepared.quantizer.on_hessian,
            prepared.quantizer.hessians,
            stage_size=settings.stage_size,
        )
    alphas = {k: x for x in prepared.scaling.scalings for k in x.layers} if prepared.scaling else {}
    for layer_id, width in bits.items():
        layer = by_id[layer_id]
        w = prepared.weight(layer)
        if layer_id in in_sequence:
            q, seconds = in_sequence[layer_id], 0.0
        else:
            q, seconds = prepared.quantize_timed(layer, width, w)
        quantized[layer_id] = q
        h = layer_hessian(layer, prepared.quantizer.hessians)
        rows[layer_id] = {
            "initializer": layer.initializer,
            "readers": [r.node for r in layer.readers],
            "shape": [layer.rows, layer.columns],
            "format": q.format.label,
            "bits": width,
            "storage_bytes": q.storage_bits / 8,
            "relative_output_error": None if h is None else relative_output_error(w, q, h),
            "seconds": round(seconds, 3),
        }
        if layer_id in alphas:  # AWQ: its alpha and what it did to the search's error
            before, after = alphas[layer_id].errors[layer_id]
            rows[layer_id]["awq"] = {
                "alpha": alphas[layer_id].alpha,
                "rtn_relative_output_error": [before, after],
                "reduction": 1 - after / before if before else 0.0,
            }
        if progress is not None:
            progress(layer_id)
    return quantized, rows


def write_model(
    prepared: Prepared,
    quantized: Mapping[str, GroupwiseWeight],
    path: Path,
    form: WeightOnlyForm,
) -> tuple[list[Path], ExportReport]:
    """Export and save; the data file appears only when the model needs one (> 2 GB)."""
    header, report = export_weight_only(prepared.header, prepared.inventory.layers, quantized, form)
    model = prepared.source.materialised(header)
    return save_model_atomic(model, path), report


def plan_json(settings: WeightOnlySettings, bits: Mapping[str, int]) -> dict[str, Any]:
    return {
        "weight_only": True,
        "method": str(settings.method),
        "group_size": settings.group_size,
        "symmetric": settings.symmetric,
        "act_order": settings.act_order,
        "damp": settings.damp,
        "clip_search": settings.clip_search,
        "clip_objective": str(settings.clip_objective),
        "tied_damp": settings.tied_damp,
        "sequential": settings.sequential,
        "salient_fraction": settings.salient_fraction,
        "stage_size": settings.stage_size,
        "awq": settings.awq,
        "awq_bits": settings.awq_bits if settings.awq else None,
        "layers": dict(bits),
    }


def read_plan(path: Path) -> dict[str, int]:
    """A weight-only plan file's ``layers`` (layer id -> bits)."""
    try:
        data = json.loads(Path(path).read_text())
        return {str(k): int(v) for k, v in data["layers"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"cannot read weight-only plan {path}: {exc}") from exc


def run(
    model_path: Path,
    output_dir: Path,
    prepared: Prepared,
    bits: Mapping[str, int],
    form: WeightOnlyForm,
    *,
    extra_report: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize per ``bits``, write ``model.wo.onnx`` (+ ``.data`` if over 2 GB),
    ``plan.json`` and ``report.json`` into ``output_dir``; returns the report."""
    t0 = time.perf_counter()
    quantized, rows = quantize_layers(prepared, bits)
    params = sum(layer.params for layer in prepared.inventory.layers if layer.id in bits)
    code_bits = sum(
        layer.params * bits[layer.id] for layer in prepared.inventory.layers if layer.id in bits
    )
    with staged_output_dir(output_dir, Path(model_path), replaces=WEIGHT_ONLY_OUTPUTS) as out:
        files, export = write_model(prepared, quantized, out / MODEL_FILE, form)
        settings = prepared.quantizer.settings
        report: dict[str, Any] = {
            "model": str(model_path),
            "settings": plan_json(settings, {}) | {"layers": None},
            "export": export.to_json(),
            "files": {p.name: p.stat().st_size for p in files},
            "quantized_params": params,
            "average_code_bits": code_bits / params if params else None,
            "stored_weight_bytes": sum(r["storage_bytes"] for r in rows.values()),
            "float_layers": {name: why for name, why in prepared.inventory.skipped.items()},
            "layers": rows,
            "input_scaling": None if prepared.scaling is None else prepared.scaling.to_json(),
            "seconds": {"prepare": prepared.seconds, "quantize": time.perf_counter() - t0},
        }
        if extra_report:
            report.update(extra_report)
        write_text_atomic(out / PLAN_FILE, json.dumps(plan_json(settings, bits), indent=1))
        write_text_atomic(out / REPORT_FILE, json.dumps(report, indent=1, default=str))
    return report
