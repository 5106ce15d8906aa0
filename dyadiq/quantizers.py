"""Uniform quantizers (METHODS.md section 1), as small functions named after the maths.

Weights: symmetric, narrow range, per output channel:
    s_c = max|W_c| / (2^(b-1) - 1),  q = clip(round(W / s_c), -(2^(b-1) - 1), 2^(b-1) - 1).
Activations: asymmetric over a calibrated range [lo, hi] that always contains 0:
    s = (hi - lo) / (2^b - 1),  z = round(qmin - lo / s)  (z = 0 for unsigned, lo = 0).
Rounding is numpy's round-half-to-even, the rule ONNX QuantizeLinear uses, so these functions
reproduce what onnxruntime computes for the same scale and zero point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

_TINY = np.float32(1e-12)


@dataclass(frozen=True)
class WeightQuant:
    values: np.ndarray  # int8 container holding b-bit codes
    scales: np.ndarray  # float32, one per output channel
    axis: int
    bits: int

    def dequantize(self) -> np.ndarray:
        shape = [1] * self.values.ndim
        shape[self.axis] = -1
        return self.values.astype(np.float32) * self.scales.reshape(shape)


@dataclass(frozen=True)
class ActQuant:
    scale: float
    zero_point: int
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def representable_range(self) -> tuple[float, float]:
        return (
            (self.qmin - self.zero_point) * self.scale,
            (self.qmax - self.zero_point) * self.scale,
        )


def quantize_weight_per_channel(weight: np.ndarray, bits: int, axis: int) -> WeightQuant:
    axis = axis % weight.ndim
    qmax = 2 ** (bits - 1) - 1
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    max_abs = np.max(np.abs(weight), axis=reduce_axes).astype(np.float32)
    scales = np.maximum(max_abs / np.float32(qmax), _TINY).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scales.reshape(shape)), -qmax, qmax).astype(np.int8)
    return WeightQuant(q, scales, axis, bits)


# A bias code stays within half the int32 range; the other half is left to sum(x * w).
BIAS_CODE_LIMIT = 2**30


def with_representable_bias(
    wq: WeightQuant, weight: np.ndarray, bias: np.ndarray, input_scale: float
) -> WeightQuant:
    """``wq`` with each channel's scale raised, where needed, until its bias code
    ``b / (s_w * s_x)`` fits :data:`BIAS_CODE_LIMIT`.

    After BatchNorm folding some channels have max|w| of 0 or 1e-8 and a bias near 1 (seen in
    EfficientNet-class models): max-abs gives them a tiny s_w and a bias code far beyond int32,
    which used to refuse the model for accumulator overflow. Such a channel's output is its
    bias, so a coarser grid costs nothing; its weights are re-rounded on it (mostly to 0)."""
    need = np.abs(np.asarray(bias, np.float64).reshape(-1)) / (float(input_scale) * BIAS_CODE_LIMIT)
    raise_scale = need > wq.scales.astype(np.float64)
    if not raise_scale.any():
        return wq
    scales = np.where(raise_scale, np.float32(need * (1 + 1e-6)), wq.scales).astype(np.float32)
    shape = [1] * weight.ndim
    shape[wq.axis] = -1
    qmax = 2 ** (wq.bits - 1) - 1
    fresh = np.clip(np.round(weight / scales.reshape(shape)), -qmax, qmax).astype(np.int8)
    values = np.where(raise_scale.reshape(shape), fresh, wq.values).astype(np.int8)
    return WeightQuant(values, scales, wq.axis, wq.bits)


class WeightQuantizer(Protocol):
    """Where a rewrite gets a layer's quantized weights (and the float bias to quantize).

    Round to nearest on the max-abs scale (:data:`ROUND_TO_NEAREST`) is the plain rule; a
    compensated quantizer (``dyadiq.passes.compensation``) returns per layer and width the
    codes and scales it computed, and a corrected bias.
    """

    def weight_quant(
        self, layer_id: str, weight: np.ndarray, bits: int, axis: int
    ) -> WeightQuant: ...

    def bias(self, layer_id: str, bits: int, bias: np.ndarray) -> np.ndarray: ...


class RoundToNearest:
    """The uncompensated rule: :func:`quantize_weight_per_channel`, the bias unchanged."""

    def weight_quant(self, layer_id: str, weight: np.ndarray, bits: int, axis: int) -> WeightQuant:
        return quantize_weight_per_channel(weight, bits, axis)

    def bias(self, layer_id: str, bits: int, bias: np.ndarray) -> np.ndarray:
        return bias


ROUND_TO_NEAREST = RoundToNearest()


def activation_quant(lo: float, hi: float, bits: int, *, signed: bool) -> ActQuant:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    if scale <= float(_TINY):
        scale = 1.0  # an all-zero tensor: any scale represents it exactly
    qmin = -(2 ** (bits - 1)) if signed else 0
    zero_point = int(np.clip(np.round(qmin - lo / scale), qmin, qmin + levels))
    return ActQuant(float(np.float32(scale)), zero_point, bits, signed)


def fake_quantize(x: np.ndarray, q: ActQuant) -> np.ndarray:
    codes = np.clip(np.round(x / np.float32(q.scale)) + q.zero_point, q.qmin, q.qmax)
    return ((codes - q.zero_point) * np.float32(q.scale)).astype(np.float32)
