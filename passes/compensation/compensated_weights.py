"""The per-width compensated weight quantizer the whole tool uses (issue 12, item 5).

:class:`CompensatedWeights` maps (layer id, bits) to the layer's compensated
:class:`WeightQuant` (integer codes and per-channel scales) and the shift its float bias gets
from bias correction. ``insert_qdq``, ``integerize`` and the sensitivity analysis all ask it
(through :class:`dyadiq.quantizers.WeightQuantizer`) instead of rounding to nearest, so the
QDQ model, the integer model and the damage the ILP prices all use the same weights; the
integer codes still come from one WeightQuant, so the integer path stays bit-exact.

:func:`compensate_layer` is one layer at one width: max-abs round-to-nearest, then (as asked)
the clipping-scale search, GPTQ on those scales, rounding refinement and bias correction, each
stage's layer output error measured on the layer's calibration inputs and reported relative to
E||W x||^2.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dyadiq.passes.compensation.bias_correction import bias_correction
from dyadiq.passes.compensation.gptq import gptq_codes, gptq_factor
from dyadiq.passes.compensation.input_statistics import InputStatistics, output_error
from dyadiq.passes.compensation.layer_matrix import LayerGeometry
from dyadiq.passes.compensation.learned_rounding import learn_rounding
from dyadiq.passes.compensation.range_search import (
    max_abs_scales,
    round_to_grid,
    search_clipping_scales,
)
from dyadiq.passes.compensation.rounding_refinement import refine_rounding
from dyadiq.passes.compensation.settings import CompensationPass, CompensationSettings
from dyadiq.quantizers import WeightQuant, quantize_weight_per_channel

# At 8 bits max-abs rounding error is far below the activation quantizer's: keep the rule.
RANGE_SEARCH_BELOW_BITS = 8


@dataclass(frozen=True)
class LayerCompensation:
    quant: WeightQuant
    bias_shift: np.ndarray | None  # added to the float bias (bias correction), per channel
    report: Mapping[str, Any]


def _gptq_on_best_scales(
    w: np.ndarray,
    objective: np.ndarray,
    candidates: list[np.ndarray],
    bits: int,
    settings: CompensationSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ on each candidate scale vector; per row (rows are independent given H) keep the
    codes with the smallest objective error. Returns (codes [G, R, d], scales [G, R]).

    The candidates run as one GPTQ over the rows stacked k times (one column loop)."""
    k, rows = len(candidates), w.shape[1]
    factor = gptq_factor(objective, damp=settings.damp, act_order=settings.act_order)
    stacked_w = np.concatenate([w] * k, axis=1)  # [G, k R, d]
    stacked_scales = np.concatenate(candidates, axis=1)  # [G, k R]
    codes = gptq_codes(stacked_w, factor, stacked_scales, bits, block=settings.block)
    error = output_error(stacked_w - codes * stacked_scales[..., None], objective)
    best = np.argmin(error.reshape(w.shape[0], k, rows), axis=1)  # [G, R]
    pick = (best * rows + np.arange(rows))[..., None]  # row index into the stack
    best_codes = np.take_along_axis(codes, pick, axis=1)
    best_scales = np.take_along_axis(stacked_scales, pick[..., 0], axis=1)
    return best_codes, best_scales


def compensate_layer(
    weight: np.ndarray,
    geometry: LayerGeometry,
    axis: int,
    bits: int,
    statistics: InputStatistics | None,
    settings: CompensationSettings,
    *,
    has_bias: bool,
    without_statistics: str = "no calibration inputs reached this layer",
) -> LayerCompensation:
    """One layer at one width; ``statistics`` from the layer's (quantized-prefix) inputs
    (``without_statistics``: why there are none, for the report).

    When bias correction follows, the mean output error is removed anyway, so the range
    search and GPTQ minimise the centred error e^T (H - mu mu^T) e instead of e^T H e.
    """
    w = geometry.to_groups(np.asarray(weight, np.float32))
    hessian = statistics.hessian.astype(np.float32) if statistics is not None else None
    correct_bias = settings.uses(CompensationPass.BIAS) and has_bias and statistics is not None
    objective = hessian
    if correct_bias and statistics is not None:
        mean = statistics.mean
        centred = statistics.hessian - mean[:, :, None] * mean[:, None, :]
        objective = centred.astype(np.float32)
    signal = float(output_error(w.astype(np.float64), hessian).sum()) if hessian is not None else 0

    def relative_error(quantized: np.ndarray) -> float | None:
        if hessian is None or signal <= 0:
            return None
        return float(output_error(w - quantized, hessian).sum()) / signal

    base = max_abs_scales(w, bits)
    scales, codes = base, round_to_grid(w, base, bits)
    report: dict[str, Any] = {"bits": bits, "passes": []}
    report["error_round_to_nearest"] = relative_error(codes * scales[..., None])
    declined: dict[str, str] = {}
    search = settings.uses(CompensationPass.RANGE) and bits < RANGE_SEARCH_BELOW_BITS
    if settings.uses(CompensationPass.RANGE) and not search:
        declined["range"] = f"max-abs kept at {bits} bits"
    if search:
        scales = search_clipping_scales(
            w, bits, objective, grid=settings.range_grid, lowest=settings.range_lowest
        )
        codes = round_to_grid(w, scales, bits)
        report["passes"].append("range")
        report["error_after_range"] = relative_error(codes * scales[..., None])
    if settings.uses(CompensationPass.GPTQ):
        if objective is None:
            declined["gptq"] = without_statistics
        else:
            # clipping that is best for rounding to nearest is not best once GPTQ spreads the
            # error: try GPTQ on a few clip ratios too and keep the best per channel
            candidates = [scales]
            if search:
                candidates += [base * np.float32(a) for a in settings.gptq_clip_ratios]
            codes, scales = _gptq_on_best_scales(w, objective, candidates, bits, settings)
            report["passes"].append("gptq")
            report["error_after_gptq"] = relative_error(codes * scales[..., None])
    if settings.uses(CompensationPass.REFINE):
        if objective is None:
            declined["refine"] = without_statistics
        else:
            codes, sweeps = refine_rounding(
                w, codes, scales, objective, bits, max_sweeps=settings.refine_sweeps
            )
            report["passes"].append("refine")
            report["refine_sweeps"] = sweeps
            report["error_after_refine"] = relative_error(codes * scales[..., None])
    if settings.uses(CompensationPass.ADAROUND):
        if objective is None:
            declined["adaround"] = without_statistics
        else:
            codes, rows = learn_rounding(
                w, codes, scales, objective, bits, iterations=settings.adaround_iterations
            )
            report["passes"].append("adaround")
            report["adaround_rows"] = rows
            report["error_after_adaround"] = relative_error(codes * scales[..., None])
    shift = None
    if settings.uses(CompensationPass.BIAS):
        if statistics is None:
            declined["bias"] = without_statistics
        elif not has_bias:
            declined["bias"] = "the layer has no constant bias to fold the correction into"
        else:
            quantized = codes * scales[..., None]
            shift = bias_correction(w, quantized, statistics.mean).astype(np.float32)
            before = relative_error(quantized)
            report["passes"].append("bias")
            if before is not None:  # E||e x - c||^2 = E||e x||^2 - ||c||^2 for c = e mu
                removed = float(np.sum(shift.astype(np.float64) ** 2)) / signal
                report["error_after_bias"] = before - removed
    if declined:
        report["declined"] = declined
    values = geometry.from_groups(codes.astype(np.int8))
    quant = WeightQuant(values, scales.reshape(-1).astype(np.float32), axis % weight.ndim, bits)
    return LayerCompensation(quant, shift, report)


@dataclass
class CompensatedWeights:
    """(layer id, bits) -> compensated weights; round to nearest for anything not in it."""

    settings: CompensationSettings
    layers: dict[tuple[str, int], LayerCompensation] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)  # per width
    notes: list[str] = field(default_factory=list)

    # --- dyadiq.quantizers.WeightQuantizer -----------------------------------------------------
    def weight_quant(self, layer_id: str, weight: np.ndarray, bits: int, axis: int) -> WeightQuant:
        entry = self.layers.get((layer_id, bits))
        if entry is None:
            return quantize_weight_per_channel(weight, bits, axis)
        return entry.quant

    def bias(self, layer_id: str, bits: int, bias: np.ndarray) -> np.ndarray:
        entry = self.layers.get((layer_id, bits))
        if entry is None or entry.bias_shift is None:
            return bias
        shape = bias.shape
        corrected = bias.reshape(-1).astype(np.float32) + entry.bias_shift
        return corrected.reshape(shape).astype(np.float32)

    # --- identity and reporting -----------------------------------------------------------------
    def fingerprint(self) -> str:
        """A digest of the settings and every compensated array (keys analysis caches)."""
        digest = hashlib.sha256(json.dumps(self.settings.to_json(), sort_keys=True).encode())
        for (layer, bits), entry in sorted(self.layers.items()):
            digest.update(f"{layer}:{bits}".encode())
            digest.update(np.ascontiguousarray(entry.quant.values).tobytes())
            digest.update(np.ascontiguousarray(entry.quant.scales).tobytes())
            if entry.bias_shift is not None:
                digest.update(np.ascontiguousarray(entry.bias_shift).tobytes())
        return digest.hexdigest()[:32]

    def report(self, plan_bits: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Per layer what each pass did; only the plan's width per layer when given."""
        layers: dict[str, Any] = {}
        for (layer, bits), entry in self.layers.items():
            if plan_bits is not None and plan_bits.get(layer) != bits:
                continue
            layers.setdefault(layer, {})[str(bits)] = dict(entry.report)
        return {
            "settings": self.settings.to_json(),
            "seconds_per_width": {str(b): s for b, s in self.seconds.items()},
            "notes": list(self.notes),
            "layers": layers,
        }
