"""Weighted layers (Conv, Gemm, MatMul with a constant weight, non-overlapping ConvTranspose):
int32 accumulators bounded first, then one requantization per output channel."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq import integer_program as ip
from dyadiq.errors import UnsupportedModelError
from dyadiq.graph import activation_bounds, weight_channel_axis
from dyadiq.op_facts import OpKind
from dyadiq.passes.integerize.state import (
    IntegerizerState,
    _code_bounds,
    _requant,
    _static_shape,
)
from dyadiq.quantizers import ActQuant

INT32_LIMIT = 2**31 - 1


class AccumulatorOverflowError(UnsupportedModelError):
    """A layer's int32 accumulator could overflow for some input.

    ``layers`` maps each such layer to its worst-case |accumulator|, so that a caller can keep
    exactly those layers in float (:func:`dyadiq.pipeline.quantize` does, unless strict)."""

    def __init__(self, message: str, layers: dict[str, int] | None = None) -> None:
        super().__init__(message)  # args stay (message,), so the error still pickles
        self.layers = dict(layers or {})


class WeightedLayers(IntegerizerState):
    def _layer_output(self, node: gs.Node) -> tuple[gs.Tensor, tuple[float, float]]:
        output = node.outputs[0]
        bias_id = self.sites.fused_biases.get(node.name)
        if bias_id is not None:
            output = self.graph.node(bias_id).outputs[0]
        act_id = self.sites.fused_activations.get(node.name)
        if act_id is None:
            return output, (-np.inf, np.inf)
        act = self.graph.node(act_id)
        return act.outputs[0], activation_bounds(act)

    def _bias_values(self, node: gs.Node) -> np.ndarray | None:
        """The float bias: the layer's own bias input, or a fused constant Add after it."""
        facts = self.graph.facts(node)
        if facts.bias_input is not None and facts.bias_input < len(node.inputs):
            b = node.inputs[facts.bias_input]
            if isinstance(b, gs.Constant):
                return np.asarray(b.values, np.float64).reshape(-1)
        bias_id = self.sites.fused_biases.get(node.name)
        if bias_id is not None:
            add = self.graph.node(bias_id)
            const = next(t for t in add.inputs if isinstance(t, gs.Constant))
            return np.asarray(const.values, np.float64).reshape(-1)
        return None

    def _quantized_weight(
        self, node: gs.Node, weight: gs.Constant, kind: OpKind
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        """Codes (one array for every layer that reads the same weight initializer, so that
        backends store it once), per-channel scales, int32 bias codes and the width; the
        codes and scales are ``insert_qdq``'s (:mod:`dyadiq.passes.shared_weights`)."""
        bits = self.plan.layers[node.name].weight_bits
        wq = self.shared.weight_quant(node.name)
        bias = None
        values = self._bias_values(node)
        if values is not None:
            values = np.asarray(self.shared.bias(node.name, bits, values), np.float64)
            s_x = self.q(node.inputs[0]).scale
            scales = wq.scales.astype(np.float32) * np.float32(s_x)
            bias = np.round(values / scales).astype(np.int64)
        transposed = kind is OpKind.GEMM and weight_channel_axis(node) == 0
        key = (*self.shared.key(node.name), transposed)
        codes = self.shared_codes.get(key)
        if codes is None:
            # stored [N, K] (transB): the integer MatMul wants [K, N]
            codes = np.ascontiguousarray(wq.values.T if transposed else wq.values)
            self.shared_codes[key] = codes
        return codes, wq.scales, bias, bits

    def _has_own_bias(self, node: gs.Node) -> bool:
        facts = self.graph.facts(node)
        index = facts.bias_input
        return (
            index is not None
            and index < len(node.inputs)
            and isinstance(node.inputs[index], gs.Constant)
        )

    def _weighted(self, node: gs.Node, kind: OpKind, weight: gs.Constant) -> bool:
        x = node.inputs[0]
        out, (real_lo, real_hi) = self._layer_output(node)
        if not self._quantized(x, out):
            return False
        if kind is OpKind.GEMM and (
            int(node.attrs.get("transA", 0))
            or float(node.attrs.get("alpha", 1.0)) != 1.0
            or float(node.attrs.get("beta", 1.0)) != 1.0
        ):
            return False
        if kind is OpKind.CONV:
            if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                raise UnsupportedModelError(
                    f"{node.name}: auto_pad is not supported; simplify first"
                )
            if np.asarray(weight.values).ndim != 4:
                # a 1-D or 3-D convolution runs in float; decided before any codes are
                # declared, or consumers would read codes that nothing produces
                return False
        codes, w_scales, bias, bits = self._quantized_weight(node, weight, kind)
        if bias is not None:
            bias = bias.astype(np.int32)
        x_codes = self.codes(x)
        qx = self.q(x)
        out_codes, qy = self.define(out)
        bounds = _code_bounds(qy, real_lo, real_hi)
        multiplier = qx.scale * w_scales.astype(np.float64) / qy.scale
        if kind is OpKind.CONV_TRANSPOSE:
            operands = (x_codes, qx, out_codes, qy)
            self._conv_transpose(node, operands, codes, bias, multiplier, bounds, bits)
            return True
        if kind is OpKind.CONV:
            spatial = codes.ndim - 2
            self.ops.append(
                ip.Conv(
                    out_codes,
                    x_codes,
                    qx.zero_point,
                    codes,
                    bias,
                    tuple(node.attrs.get("strides", [1] * spatial)),
                    tuple(node.attrs.get("pads", [0] * 2 * spatial)),
                    tuple(node.attrs.get("dilations", [1] * spatial)),
                    int(node.attrs.get("group", 1)),
                    _requant(multiplier, qy, axis=1, bounds=bounds),
                    bits,
                )
            )
        else:
            self.ops.append(
                ip.MatMul(
                    out_codes,
                    x_codes,
                    qx.zero_point,
                    _requant(multiplier, qy, axis=-1, bounds=bounds),
                    weight=codes,
                    bias=bias,
                    weight_bits=bits,
                )
            )
        return True

    def _check_overflow(self) -> None:
        """Bound |acc| over all inputs: sum_k |q_w[c, k]| * max|v_x| + |q_b[c]| < 2^31."""
        risky: dict[str, int] = {}
        for layer_id in self.plan.layers:
            node = self.graph.node(layer_id)
            weight = self.graph.weight(node)
            x = node.inputs[0]
            if weight is None or x.name not in self.params:
                continue
            kind = self.graph.kind(node)
            codes, _, bias, _ = self._quantized_weight(node, weight, kind)
            qx = self.params[x.name]
            vmax = max(abs(qx.qmin - qx.zero_point), abs(qx.qmax - qx.zero_point))
            magnitudes = np.abs(codes.astype(np.int64))
            if kind is OpKind.CONV:
                per_channel = magnitudes.reshape(codes.shape[0], -1).sum(axis=1)
            elif kind is OpKind.CONV_TRANSPOSE:  # [C_in, C_out, kh, kw]: every tap may overlap
                per_channel = magnitudes.sum(axis=(0, 2, 3))
            else:
                per_channel = magnitudes.sum(axis=0)
            bound = per_channel * vmax + (np.abs(bias) if bias is not None else 0)
            if bound.max() > INT32_LIMIT:
                risky[layer_id] = int(bound.max())
        if risky:
            raise AccumulatorOverflowError(
                "int32 accumulators could overflow in: "
                + "; ".join(f"{layer} (worst-case |acc| {acc:,})" for layer, acc in risky.items())
                + ". Lower the weight or activation bits of these layers, or keep them in float.",
                risky,
            )

    def _conv_transpose(
        self,
        node: gs.Node,
        operands: tuple[str, ActQuant, str, ActQuant],
        codes: np.ndarray,
        bias: np.ndarray | None,
        multiplier: np.ndarray,
        bounds: tuple[int, int],
        bits: int,
    ) -> None:
        """A ConvTranspose whose stride equals its kernel (``conv_transpose_blocker`` is None)
        as existing integer ops: each input pixel writes its own kh x kw output block, so

            cols = Conv1x1(x; W[c_in, (c_out, i, j)])      (N, C_out kh kw, H, W), requantized
            y[n, o, h kh + i, w kw + j] = cols[n, (o, i, j), h, w]

        and the interleave is a chain of rank-4 Reshape / Transpose on codes (every consumer,
        the microcontroller one included, moves codes of rank <= 4). The requantization is per
        output channel, so it is the same before or after the interleave."""
        x_codes, qx, out_codes, qy = operands
        c_in, c_out, kh, kw = codes.shape
        taps = kh * kw
        n, _, h, w = _static_shape(node.inputs[0])
        weight = np.ascontiguousarray(codes.transpose(1, 2, 3, 0).reshape(c_out * taps, c_in, 1, 1))
        per_column = np.repeat(np.broadcast_to(np.atleast_1d(multiplier), (c_out,)), taps)

        def stage(index: int, shape: tuple[int, ...]) -> str:
            name = f"{out_codes}__convt{index}"
            self.quant[name] = qy
            self.shapes[name] = shape
            return name

        rows = n * c_out  # 0 when the batch is dynamic, as elsewhere in the program's shapes
        cols = stage(0, (n, c_out * taps, h, w))
        self.ops.append(
            ip.Conv(
                cols,
                x_codes,
                qx.zero_point,
                weight,
                np.repeat(bias, taps).astype(np.int32) if bias is not None else None,
                (1, 1),
                (0, 0, 0, 0),
                (1, 1),
                1,
                _requant(per_column, qy, axis=1, bounds=bounds),
                bits,
            )
        )
        # (N C_out kh, kw, H, W) -> (N C_out kh, H, W, kw): j moves next to w
        split = stage(1, (rows * kh, kw, h, w))
        self.ops.append(ip.Reshape(split, cols, (-1, kw, h, w)))
        moved = stage(2, (rows * kh, h, w, kw))
        self.ops.append(ip.Transpose(moved, split, (0, 2, 3, 1)))
        # (N C_out, kh, H, W kw) -> (N C_out, H, kh, W kw): i moves next to h
        grouped = stage(3, (rows, kh, h, w * kw))
        self.ops.append(ip.Reshape(grouped, moved, (-1, kh, h, w * kw)))
        interleaved = stage(4, (rows, h, kh, w * kw))
        self.ops.append(ip.Transpose(interleaved, grouped, (0, 2, 1, 3)))
        self.ops.append(ip.Reshape(out_codes, interleaved, (-1, c_out, h * kh, w * kw)))


def conv_transpose_blocker(node: gs.Node) -> str | None:
    """Why a ConvTranspose runs as a float island in integer models, or None when integerize
    lowers it (2-D, one group, stride equal to the kernel, no padding, dilation or output
    padding: the non-overlapping upsampling of FPN / DB-style detector heads)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(weight, gs.Constant) or np.asarray(weight.values).ndim != 4:
        return "integer ConvTranspose needs a constant 2-D kernel"
    kernel = list(np.asarray(weight.values).shape[2:])
    attrs = node.attrs
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return "integer ConvTranspose does not take auto_pad"
    if int(attrs.get("group", 1)) != 1:
        return "integer ConvTranspose needs group 1"
    if [int(s) for s in attrs.get("strides", [1, 1])] != kernel:
        return f"integer ConvTranspose needs strides equal to the kernel {kernel}"
    if any(int(p) for p in attrs.get("pads", [0] * 4)) or any(
        int(p) for p in attrs.get("output_padding", [0, 0])
    ):
        return "integer ConvTranspose takes no pads or output_padding"
    if any(int(d) != 1 for d in attrs.get("dilations", [1, 1])):
        return "integer ConvTranspose takes no dilation"
    if "output_shape" in attrs:
        return "integer ConvTranspose does not take output_shape"
    return None
