"""Golden reference interpreter of an :class:`IntegerProgram`, in numpy int64.

This is the single source of truth for integer semantics: every backend is compared with it
bit for bit. Convolutions and matrix products accumulate in float64 BLAS only as an exact
integer accumulator: every product and every partial sum is an integer below 2^53 (the
integerize pass proves |acc| < 2^31), so the result is the exact integer sum, just fast.
Float islands run in onnxruntime, as they do in the integer ONNX model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view

from dyadiq import integer_program as ip
from dyadiq.dyadic import requantize
from dyadiq.errors import UnsupportedModelError
from dyadiq.ort_sessions import Kernels, open_session

SOFTMAX_MAX_SHIFT = 30  # exp(-30 ln 2) < 1e-9: anything smaller is zero


def _channel_shape(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    if values.size > 1:
        shape[axis % ndim] = values.size
    return values.reshape(shape)


def apply_requant(acc: np.ndarray, rq: ip.Requant) -> np.ndarray:
    mult = _channel_shape(rq.mult, acc.ndim, rq.axis)
    shift = _channel_shape(rq.shift, acc.ndim, rq.axis)
    return np.clip(requantize(acc, mult, shift) + rq.zero_point, rq.lo, rq.hi)


def _exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.rint(np.matmul(a.astype(np.float64), b.astype(np.float64))).astype(np.int64)


def conv_accumulate(v: np.ndarray, op: ip.Conv) -> np.ndarray:
    """Integer convolution of zero-point-free codes ``v`` (NCHW) with ``op.weight``."""
    n = v.shape[0]
    o, cg, kh, kw = op.weight.shape
    top, left, bottom, right = op.pads[0], op.pads[1], op.pads[2], op.pads[3]
    v = np.pad(v, ((0, 0), (0, 0), (top, bottom), (left, right)))
    dh, dw = op.dilations
    sh, sw = op.strides
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    windows = sliding_window_view(v, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # N, C, OH, OW, kh, kw
    oh, ow = windows.shape[2], windows.shape[3]
    g = op.group
    og = o // g
    # [G, N*OH*OW, Cg*kh*kw] x [G, Cg*kh*kw, Og] -> [G, N*OH*OW, Og]
    cols = windows.reshape(n, g, cg, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
    cols = cols.reshape(g, n * oh * ow, cg * kh * kw)
    kernels = op.weight.reshape(g, og, cg * kh * kw).transpose(0, 2, 1)
    acc = _exact_matmul(cols, kernels)  # G, N*OH*OW, Og
    acc = acc.reshape(g, n, oh, ow, og).transpose(1, 0, 4, 2, 3).reshape(n, o, oh, ow)
    if op.bias is not None:
        acc = acc + op.bias.astype(np.int64).reshape(1, -1, 1, 1)
    return acc


def maxpool(x: np.ndarray, op: ip.MaxPool, fill: int) -> np.ndarray:
    top, left, bottom, right = op.pads[0], op.pads[1], op.pads[2], op.pads[3]
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    windows = sliding_window_view(x, tuple(op.kernel), axis=(2, 3))
    return windows[:, :, :: op.strides[0], :: op.strides[1]].max(axis=(-2, -1))


class ReferenceInterpreter:
    """Run an integer program on float (or integer) inputs; returns every tensor by name."""

    def __init__(self, program: ip.IntegerProgram) -> None:
        self.program = program
        self._islands: dict[int, ort.InferenceSession] = {}
        self._handlers: dict[type, Callable[[Any, dict[str, np.ndarray]], None]] = {
            ip.QuantizeInput: self._quantize,
            ip.Quantize: self._quantize,
            ip.Dequantize: self._dequantize,
            ip.Conv: self._conv,
            ip.MatMul: self._matmul,
            ip.Add: self._add,
            ip.Mul: self._mul,
            ip.GlobalAvgPool: self._gap,
            ip.HardSigmoid: self._hard_sigmoid,
            ip.HardSwish: self._hard_swish,
            ip.Softmax: self._softmax,
            ip.LeakyRelu: self._leaky_relu,
            ip.MaxPool: self._maxpool,
            ip.Clip: self._clip,
            ip.Reshape: self._reshape,
            ip.Transpose: self._transpose,
            ip.Concat: self._concat,
            ip.FloatIsland: self._island,
        }

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in feeds.items()}
        for op in self.program.ops:
            self._handlers[type(op)](op, env)
        return env

    def outputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Integer codes of each model output (what backends must reproduce exactly)."""
        env = self.run(feeds)
        return {o: env[self.program.int_outputs.get(o, o)] for o in self.program.outputs}

    # --- helpers -----------------------------------------------------------------------------
    def _codes(self, env: dict[str, np.ndarray], name: str) -> np.ndarray:
        return env[name].astype(np.int64)

    def _centered(self, env: dict[str, np.ndarray], name: str, zero_point: int) -> np.ndarray:
        return env[name].astype(np.int64) - zero_point

    def _store(self, env: dict[str, np.ndarray], name: str, codes: np.ndarray) -> None:
        env[name] = codes.astype(self.program.code_dtype(name))

    # --- ops ---------------------------------------------------------------------------------
    def _quantize(self, op: ip.QuantizeInput | ip.Quantize, env: dict[str, np.ndarray]) -> None:
        q = self.program.quant[op.output]
        x = env[op.input].astype(np.float32)
        codes = np.round(x / np.float32(q.scale)).astype(np.int64) + q.zero_point
        self._store(env, op.output, np.clip(codes, q.qmin, q.qmax))

    def _dequantize(self, op: ip.Dequantize, env: dict[str, np.ndarray]) -> None:
        q = self.program.quant[op.input]
        v = (env[op.input].astype(np.int32) - q.zero_point).astype(np.float32)
        env[op.output] = v * np.float32(q.scale)

    def _conv(self, op: ip.Conv, env: dict[str, np.ndarray]) -> None:
        acc = conv_accumulate(self._centered(env, op.input, op.input_zero_point), op)
        self._store(env, op.output, apply_requant(acc, op.requant))

    def _matmul(self, op: ip.MatMul, env: dict[str, np.ndarray]) -> None:
        a = self._centered(env, op.input, op.input_zero_point)
        if op.weight is not None:
            b = op.weight.astype(np.int64)
        else:
            assert op.weight_input is not None
            b = self._centered(env, op.weight_input, op.weight_zero_point)
        acc = _exact_matmul(a, b)
        if op.bias is not None:
            acc = acc + op.bias.astype(np.int64)
        self._store(env, op.output, apply_requant(acc, op.requant))

    def _add(self, op: ip.Add, env: dict[str, np.ndarray]) -> None:
        a = self._centered(env, op.inputs[0], op.zero_points[0])
        b = self._centered(env, op.inputs[1], op.zero_points[1])
        if op.single_rounding:
            total = requantize(a * op.mults[0] + b * op.mults[1], 1, op.shifts[0])
        else:
            total = requantize(a, op.mults[0], op.shifts[0]) + requantize(
                b, op.mults[1], op.shifts[1]
            )
        self._store(env, op.output, np.clip(total + op.zero_point, op.lo, op.hi))

    def _mul(self, op: ip.Mul, env: dict[str, np.ndarray]) -> None:
        a = self._centered(env, op.inputs[0], op.zero_points[0])
        b = self._centered(env, op.inputs[1], op.zero_points[1])
        self._store(env, op.output, apply_requant(a * b, op.requant))

    def _gap(self, op: ip.GlobalAvgPool, env: dict[str, np.ndarray]) -> None:
        v = self._centered(env, op.input, op.input_zero_point)
        self._store(env, op.output, apply_requant(v.sum(axis=(2, 3), keepdims=True), op.requant))

    def _hard_sigmoid(self, op: ip.HardSigmoid, env: dict[str, np.ndarray]) -> None:
        v = self._centered(env, op.input, op.input_zero_point)
        rq = op.requant
        y = requantize(v, rq.mult, rq.shift) + op.offset + rq.zero_point
        self._store(env, op.output, np.clip(y, rq.lo, rq.hi))

    def _hard_swish(self, op: ip.HardSwish, env: dict[str, np.ndarray]) -> None:
        v = self._centered(env, op.input, op.input_zero_point)
        one = 1 << op.frac_bits
        gate = requantize(v, op.gate_mult, op.gate_shift) + (one >> 1)
        gate = np.clip(gate, 0, one)
        self._store(env, op.output, apply_requant(v * gate, op.requant))

    def _leaky_relu(self, op: ip.LeakyRelu, env: dict[str, np.ndarray]) -> None:
        v = self._centered(env, op.input, op.input_zero_point)
        rq = op.requant
        positive = requantize(np.maximum(v, 0), rq.mult, rq.shift)
        m = _channel_shape(op.negative_mult, v.ndim, rq.axis)
        k = _channel_shape(op.negative_shift, v.ndim, rq.axis)
        negative = requantize(np.minimum(v, 0), m, k)
        self._store(env, op.output, np.clip(positive + negative + rq.zero_point, rq.lo, rq.hi))

    def _softmax(self, op: ip.Softmax, env: dict[str, np.ndarray]) -> None:
        q = self._codes(env, op.input)
        d = (q - q.max(axis=-1, keepdims=True)) << op.upscale_bits
        z = (-d) // op.ln2_codes
        p = d + z * op.ln2_codes
        poly = (p + op.b_codes) ** 2 + op.c_codes
        e = np.right_shift(poly, np.minimum(z, SOFTMAX_MAX_SHIFT))
        prob = (e << op.frac_bits) // e.sum(axis=-1, keepdims=True)
        self._store(env, op.output, apply_requant(prob, op.requant))

    def _maxpool(self, op: ip.MaxPool, env: dict[str, np.ndarray]) -> None:
        fill = self.program.quant[op.output].qmin
        self._store(env, op.output, maxpool(self._codes(env, op.input), op, fill))

    def _clip(self, op: ip.Clip, env: dict[str, np.ndarray]) -> None:
        self._store(env, op.output, np.clip(self._codes(env, op.input), op.lo, op.hi))

    def _reshape(self, op: ip.Reshape, env: dict[str, np.ndarray]) -> None:
        x = env[op.input]
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(op.shape)]
        if int(np.prod(shape)) != x.size:  # shapes inferred for other dims than the data's
            raise UnsupportedModelError(
                f"reshape to {op.output}: {list(x.shape)} cannot become {shape}; the model's "
                "declared shapes disagree with the data (fix dynamic dims with --input-shape)"
            )
        env[op.output] = x.reshape(shape)

    def _transpose(self, op: ip.Transpose, env: dict[str, np.ndarray]) -> None:
        env[op.output] = env[op.input].transpose(op.perm)

    def _concat(self, op: ip.Concat, env: dict[str, np.ndarray]) -> None:
        env[op.output] = np.concatenate([env[i] for i in op.inputs], axis=op.axis)

    def _island(self, op: ip.FloatIsland, env: dict[str, np.ndarray]) -> None:
        key = id(op)
        if key not in self._islands:
            self._islands[key] = island_session(op, self.program.opset)
        values = self._islands[key].run(list(op.outputs), {i: env[i] for i in op.inputs})
        env.update(zip(op.outputs, values, strict=True))


def island_model(island: ip.FloatIsland, opset: int) -> onnx.ModelProto:
    def infos(names: tuple[str, ...], types: tuple[int, ...]) -> list[onnx.ValueInfoProto]:
        types = types or (onnx.TensorProto.FLOAT,) * len(names)
        # Add(a, a) lists ``a`` twice; a graph may declare each input once.
        unique = dict(zip(names, types, strict=True))
        return [onnx.helper.make_tensor_value_info(n, t, None) for n, t in unique.items()]

    float_info = infos(island.inputs, island.input_types)
    outputs = infos(island.outputs, island.output_types)
    graph = onnx.helper.make_graph(
        list(island.nodes), "float_island", float_info, outputs, list(island.initializers)
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


def island_session(island: ip.FloatIsland, opset: int) -> ort.InferenceSession:
    return open_session(island_model(island, opset), kernels=Kernels.EXACT, threads=1)
