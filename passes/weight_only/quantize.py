"""Weight-only quantization of each layer: round to nearest, or GPTQ on the layer's input
Hessian, on a group-wise grid (:mod:`.groupwise`).

GPTQ (:func:`dyadiq.passes.compensation.gptq.gptq_group_codes`) minimises
tr((W - Q) H (W - Q)^T) with H = E[x x^T] of the layer's inputs; the grid (per group, the
min-max range or, by default, the shrunk range of least output error d H_gg d^T of its
rounding error; round to nearest: of least squared rounding error) is fixed first, act
order visits the columns by decreasing H_jj. A weight read by no
MatMul (an untied embedding) has no H and is rounded to nearest. The inverse-Hessian factor
depends only on H, so it is computed once per activation and reused for every width and
for every weight that reads that activation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from dyadiq.errors import ConfigError
from dyadiq.passes.compensation.gptq import GptqFactor, gptq_factor, gptq_group_codes
from dyadiq.passes.weight_only.groupwise import (
    ClipObjective,
    GroupwiseFormat,
    GroupwiseWeight,
    clipped_group_scales,
    dequantize,
    group_scales,
    hessian_clipped_group_scales,
    quantize,
)
from dyadiq.passes.weight_only.layers import WeightLayer
from dyadiq.passes.weight_only.salient import check_fraction, salient_gptq_codes, salient_mask

# the dampening GPTQ adds to a Hessian already dampened (:meth:`LayerQuantizer.dampened`)
_PRE_DAMPENED = 1e-9


class Method(StrEnum):
    RTN = "rtn"  # round to nearest on the min-max grid
    GPTQ = "gptq"  # GPTQ with act order on the same grid


@dataclass(frozen=True)
class WeightOnlySettings:
    method: Method = Method.GPTQ
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = True
    damp: float = 0.01
    block: int = 128
    clip_search: bool = True  # per-group range shrink of least rounding error, else min-max
    # what that shrink minimises: the weights' own squared error, or (GPTQ, which has H) the
    # group's output error on the layer's (dampened) input Hessian; Gemma 3 270M int4 g128:
    # 48.44 vs 50.15 perplexity, paired ratio 0.966 [0.934, 1.000] (llm.md)
    clip_objective: ClipObjective = ClipObjective.HESSIAN
    # dampening of a tied embedding / LM head: its H is the LM head's inputs only, while
    # the same rows are also looked up as embeddings, where every row's own error counts;
    # H + a I weighs both (Gemma 3 270M, llm.md: 0.3 beats 0.01 at 3 and 4 bits)
    tied_damp: float = 0.3
    # GPTQ on the quantized prefix's Hessians (:mod:`.sequential`), ``stage_size`` MatMul
    # inputs per pass; else every H from one pass of the float model
    sequential: bool = False
    stage_size: int = 4
    # GPTQ only: this fraction of each weight's input channels (largest E[x^2]) swept last
    # and stored at 8 bits beside the group-wise codes (:mod:`.salient`); 0 = none
    salient_fraction: float = 0.0
    # AWQ (:mod:`.awq`): per input channel a scale s_j = sqrt(E[x_j^2])^alpha, alpha searched
    # per set of weights sharing an input for round-to-nearest at ``awq_bits``; the weight is
    # stored as Q(W diag(s)) and its input divided by s. Off: Gemma 3 270M g128 (llm.md) GPTQ
    # int4 49.16 with it vs 48.44 without (paired 1.015 [0.981, 1.051]); RTN 71.93 vs 84.98
    awq: bool = False
    awq_bits: int = 4

    def __post_init__(self) -> None:
        if self.stage_size < 1:
            raise ConfigError(f"sequential GPTQ stage size must be positive, got {self.stage_size}")
        for name, value in (("dampening", self.damp), ("tied-table dampening", self.tied_damp)):
            if not 0 < value < 1:
                raise ConfigError(f"GPTQ {name} must be in (0, 1), got {value}")
        if self.block < 1:
            raise ConfigError(f"GPTQ block must be positive, got {self.block}")
        GroupwiseFormat(4, self.group_size, self.symmetric)  # validates the group size
        check_fraction(self.salient_fraction)
        if self.salient_fraction and self.method is not Method.GPTQ:
            raise ConfigError("salient channels are chosen and compensated by GPTQ: use gptq")
        if self.awq:
            self.format(self.awq_bits)  # validates the search width
            # sequential GPTQ reruns the float graph on the float weights; salient columns
            # with scaled inputs were never measured: refused rather than silently combined
            if self.sequential:
                raise ConfigError("AWQ input scaling does not combine with sequential GPTQ")
            if self.salient_fraction:
                raise ConfigError("AWQ input scaling does not combine with salient channels")

    def format(self, bits: int) -> GroupwiseFormat:
        return GroupwiseFormat(bits, self.group_size, self.symmetric)


def layer_hessian(layer: WeightLayer, hessians: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """H of a weight: the sum over its MatMul readers (a shared weight's output errors add)."""
    found = [hessians[a] for a in layer.activations if a in hessians]
    return sum(found[1:], found[0]) if found else None


def quantize_weight(
    w: np.ndarray,
    fmt: GroupwiseFormat,
    *,
    method: Method,
    factor: GptqFactor | None = None,
    block: int = 128,
    clip_search: bool = False,
    salient_fraction: float = 0.0,
    clip_hessian: np.ndarray | None = None,
) -> GroupwiseWeight:
    """One weight W [R, K] on ``fmt``'s grid (min-max, or with ``clip_search`` each group's
    best shrunk range: of least output error on ``clip_hessian`` when given, else of least
    squared rounding error), by ``method`` (GPTQ needs ``factor``)."""
    if not clip_search:
        scales, zeros = group_scales(w, fmt)
    elif clip_hessian is not None:
        scales, zeros = hessian_clipped_group_scales(w, fmt, clip_hessian)
    else:
        scales, zeros = clipped_group_scales(w, fmt)
    if method is Method.GPTQ and factor is not None and salient_fraction:
        # ``factor`` swept the salient columns last (LayerQuantizer._factor_of)
        codes, salient = salient_gptq_codes(
            w, factor, scales, zeros, fmt.group_size, fmt.code_range, salient_fraction, block=block
        )
        return GroupwiseWeight(codes, scales, zeros, fmt, salient)
    if method is Method.GPTQ and factor is not None:
        codes = gptq_group_codes(
            w, factor, scales, zeros, fmt.group_size, fmt.code_range, block=block
        )
    else:
        codes = quantize(w, scales, zeros, fmt)
    return GroupwiseWeight(codes, scales, zeros, fmt)


@dataclass
class LayerQuantizer:
    """Quantizes any layer at any width with one settings object; factors cached."""

    settings: WeightOnlySettings
    hessians: Mapping[str, np.ndarray]
    # layer id -> s of weights stored as W diag(s) (:mod:`.awq`): ``hessians`` are then the
    # scaled H' = diag(1/s) H diag(1/s) of their inputs
    input_scales: Mapping[str, np.ndarray] = field(default_factory=dict)
    _factors: dict[tuple[str, ...], GptqFactor | None] = field(default_factory=dict)

    def factor(self, layer: WeightLayer) -> GptqFactor | None:
        key = (*layer.activations, "tied") if layer.tied else layer.activations
        if key not in self._factors:
            self._factors[key] = self._factor_of(layer, layer_hessian(layer, self.hessians))
        return self._factors[key]

    def _factor_of(self, layer: WeightLayer, h: np.ndarray | None) -> GptqFactor | None:
        if self.settings.method is not Method.GPTQ or h is None:
            return None
        damp = self.settings.tied_damp if layer.tied else self.settings.damp
        fraction = self.settings.salient_fraction
        last = salient_mask(h, fraction)[None] if fraction else None
        if layer.id in self.input_scales:  # dampened in the model's own units, then scaled
            h, damp = self.dampened(layer, h), _PRE_DAMPENED
        return gptq_factor(h[None], damp=damp, act_order=self.settings.act_order, last=last)

    def dampened(self, layer: WeightLayer, h: np.ndarray) -> np.ndarray:
        """``h`` + GPTQ's dampening (the tied table's for a tied weight). For a weight
        stored as W diag(s) the dampening d mean(diag H) I is added in the model's units
        and then scaled, diag(1/s) (H + d I) diag(1/s): a tied table's dampening stands for
        its embedding rows, whose error counts unweighted by the input scale."""
        s = self.settings
        damp = s.tied_damp if layer.tied else s.damp
        scale = self.input_scales.get(layer.id)
        if scale is None:
            return h + damp * float(np.mean(np.diag(h))) * np.eye(len(h))
        squared = scale.astype(np.float64) ** 2
        return h + damp * float(np.mean(np.diag(h) * squared)) * np.diag(1.0 / squared)

    def __call__(self, layer: WeightLayer, w: np.ndarray, bits: int) -> GroupwiseWeight:
        h = layer_hessian(layer, self.hessians)
        return self._quantize(w, bits, self.factor(layer), self._clip_hessian(layer, h))

    def on_hessian(
        self, layer: WeightLayer, w: np.ndarray, bits: int, hessian: np.ndarray | None
    ) -> GroupwiseWeight:
        """``layer`` at ``bits`` on the given H (sequential GPTQ's, from the quantized
        prefix) instead of the float model's; nothing cached."""
        return self._quantize(
            w, bits, self._factor_of(layer, hessian), self._clip_hessian(layer, hessian)
        )

    def _clip_hessian(self, layer: WeightLayer, h: np.ndarray | None) -> np.ndarray | None:
        """The H the range search weighs errors with: GPTQ's own, dampened as GPTQ
        dampens it (a tied table's larger dampening stands for its embedding rows)."""
        s = self.settings
        if h is None or s.method is not Method.GPTQ or s.clip_objective is ClipObjective.WEIGHT:
            return None
        damped = self.dampened(layer, h)
        if s.salient_fraction:  # salient columns are stored apart: their grid error is moot
            kept = salient_mask(h, s.salient_fraction)
            damped[kept, :] = 0.0
            damped[:, kept] = 0.0
        return damped

    def _quantize(
        self,
        w: np.ndarray,
        bits: int,
        factor: GptqFactor | None,
        clip_hessian: np.ndarray | None = None,
    ) -> GroupwiseWeight:
        return quantize_weight(
            w,
            self.settings.format(bits),
            method=self.settings.method,
            factor=factor,
            block=self.settings.block,
            clip_search=self.settings.clip_search,
            salient_fraction=self.settings.salient_fraction,
            clip_hessian=clip_hessian,
        )


def relative_output_error(
    w: np.ndarray, quantized: GroupwiseWeight, hessian: np.ndarray, max_rows: int = 4096
) -> float:
    """tr(D H D^T) / tr(W H W^T) with D = W - Q(W), on at most ``max_rows`` evenly spaced
    rows (an LM head has 262,144): the layer's relative output error on calibration inputs."""
    step = max(1, w.shape[0] // max_rows)
    rows = slice(None, None, step)
    ref = np.asarray(w[rows], np.float64)
    q = quantized
    approx = dequantize(q.codes[rows], q.scales[rows], q.zero_points[rows], q.format)
    if q.salient is not None:
        approx[:, q.salient.columns] += q.salient.values()[rows]
    delta = ref - approx
    num = float(np.sum((delta @ hessian) * delta))  # BLAS; a 3-operand einsum is not
    den = float(np.sum((ref @ hessian) * ref))
    return float(num / den) if den > 0 else 0.0
