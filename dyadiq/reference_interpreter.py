"""Golden reference interpreter of an :class:`IntegerProgram`, in numpy int64.

This is the single source of truth for integer semantics: every backend is compared with it
bit for bit. Convolutions and matrix products accumulate in float64 BLAS only as an exact
integer accumulator: every product and every partial sum is an integer below 2^53 (the
integerize pass proves |acc| < 2^31), so the result is the exact integer sum, just fast.
Float islands run in onnxruntime, as they do in the integer ONNX model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view

from dyadiq import integer_program as ip
from dyadiq.dyadic import requantize
from dyadiq.errors import UnsupportedModelError
from dyadiq.int_op_visitor import IntOpVisitor
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


def integer_exp(d: np.ndarray, op: ip.Softmax | ip.MaskedSoftmax) -> np.ndarray:
    """I-BERT's exp of ``d <= 0`` at the working scale, as integers (:class:`ip.Softmax`)."""
    z = (-d) // op.ln2_codes
    p = d + z * op.ln2_codes
    poly = (p + op.b_codes) ** 2 + op.c_codes
    result: np.ndarray = np.right_shift(poly, np.minimum(z, SOFTMAX_MAX_SHIFT))
    return result


def bit_length(n: np.ndarray) -> np.ndarray:
    """Bits of each ``0 <= n < 2^63``: the count of j in [0, 63) with n >= 2^j."""
    n = np.asarray(n, np.int64)
    powers = np.left_shift(np.int64(1), np.arange(63, dtype=np.int64))
    counts: np.ndarray = (n[..., None] >= powers).sum(axis=-1).astype(np.int64)
    return counts


def integer_sqrt(n: np.ndarray) -> np.ndarray:
    """``floor(sqrt(n))`` for int64 ``1 <= n < 2^62``: Newton's iteration
    x <- min(x, (x + n // x) >> 1) from x = 2^ceil(bits(n) / 2) >= sqrt(n), ISQRT_STEPS
    times (from above it decreases to the floor root and then stays there)."""
    n = np.asarray(n, np.int64)
    x = np.left_shift(np.int64(1), (bit_length(n) + 1) >> 1)
    for _ in range(ip.ISQRT_STEPS):
        x = np.minimum(x, (x + n // x) >> 1)
    return x


def maxpool(x: np.ndarray, op: ip.MaxPool, fill: int) -> np.ndarray:
    top, left, bottom, right = op.pads[0], op.pads[1], op.pads[2], op.pads[3]
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    windows = sliding_window_view(x, tuple(op.kernel), axis=(2, 3))
    return windows[:, :, :: op.strides[0], :: op.strides[1]].max(axis=(-2, -1))


class ReferenceInterpreter(IntOpVisitor[None]):
    """Run an integer program on float (or integer) inputs; returns every tensor by name.

    Each ``visit_<Op>`` reads its inputs from ``self.env`` (tensor name -> array) and writes
    its outputs there; :meth:`run` starts a fresh ``env`` from the feeds."""

    def __init__(self, program: ip.IntegerProgram) -> None:
        self.program = program
        self._islands: dict[int, ort.InferenceSession] = {}
        self.env: dict[str, np.ndarray] = {}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in feeds.items()}
        for op in self.program.ops:
            self.step(op, env)
        return env

    def step(self, op: ip.IntOp, env: dict[str, np.ndarray]) -> None:
        """Run one op on ``env`` (updated in place): e.g. on another model's tensors, to see
        the error one op adds by itself."""
        self.env = env
        self.visit(op)

    def outputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Integer codes of each model output (what backends must reproduce exactly)."""
        env = self.run(feeds)
        return {o: env[self.program.int_outputs.get(o, o)] for o in self.program.outputs}

    # --- helpers -----------------------------------------------------------------------------
    def _codes(self, name: str) -> np.ndarray:
        return self.env[name].astype(np.int64)

    def _centered(self, name: str, zero_point: int) -> np.ndarray:
        return self.env[name].astype(np.int64) - zero_point

    def _store(self, name: str, codes: np.ndarray) -> None:
        self.env[name] = codes.astype(self.program.code_dtype(name))

    # --- ops ---------------------------------------------------------------------------------
    def visit_QuantizeInput(self, op: ip.QuantizeInput | ip.Quantize) -> None:
        q = self.program.quant[op.output]
        x = self.env[op.input].astype(np.float32)
        codes = np.round(x / np.float32(q.scale)).astype(np.int64) + q.zero_point
        self._store(op.output, np.clip(codes, q.qmin, q.qmax))

    visit_Quantize = visit_QuantizeInput  # a float island's output: the same rounding

    def visit_Dequantize(self, op: ip.Dequantize) -> None:
        q = self.program.quant[op.input]
        v = (self.env[op.input].astype(np.int32) - q.zero_point).astype(np.float32)
        self.env[op.output] = v * np.float32(q.scale)

    def visit_Conv(self, op: ip.Conv) -> None:
        acc = conv_accumulate(self._centered(op.input, op.input_zero_point), op)
        self._store(op.output, apply_requant(acc, op.requant))

    def visit_MatMul(self, op: ip.MatMul) -> None:
        a = self._centered(op.input, op.input_zero_point)
        if op.weight is not None:
            b = op.weight.astype(np.int64)
        else:
            assert op.weight_input is not None
            b = self._centered(op.weight_input, op.weight_zero_point)
        acc = _exact_matmul(a, b)
        if op.bias is not None:
            acc = acc + op.bias.astype(np.int64)
        self._store(op.output, apply_requant(acc, op.requant))

    def visit_Add(self, op: ip.Add) -> None:
        a = self._centered(op.inputs[0], op.zero_points[0])
        b = self._centered(op.inputs[1], op.zero_points[1])
        if op.single_rounding:
            total = requantize(a * op.mults[0] + b * op.mults[1], 1, op.shifts[0])
        else:
            total = requantize(a, op.mults[0], op.shifts[0]) + requantize(
                b, op.mults[1], op.shifts[1]
            )
        self._store(op.output, np.clip(total + op.zero_point, op.lo, op.hi))

    def visit_Mul(self, op: ip.Mul) -> None:
        a = self._centered(op.inputs[0], op.zero_points[0])
        b = self._centered(op.inputs[1], op.zero_points[1])
        self._store(op.output, apply_requant(a * b, op.requant))

    def visit_GlobalAvgPool(self, op: ip.GlobalAvgPool) -> None:
        v = self._centered(op.input, op.input_zero_point)
        self._store(op.output, apply_requant(v.sum(axis=(2, 3), keepdims=True), op.requant))

    def visit_HardSigmoid(self, op: ip.HardSigmoid) -> None:
        v = self._centered(op.input, op.input_zero_point)
        rq = op.requant
        y = requantize(v, rq.mult, rq.shift) + op.offset + rq.zero_point
        self._store(op.output, np.clip(y, rq.lo, rq.hi))

    def visit_HardSwish(self, op: ip.HardSwish) -> None:
        v = self._centered(op.input, op.input_zero_point)
        one = 1 << op.frac_bits
        gate = requantize(v, op.gate_mult, op.gate_shift) + (one >> 1)
        gate = np.clip(gate, 0, one)
        self._store(op.output, apply_requant(v * gate, op.requant))

    def visit_LeakyRelu(self, op: ip.LeakyRelu) -> None:
        v = self._centered(op.input, op.input_zero_point)
        rq = op.requant
        positive = requantize(np.maximum(v, 0), rq.mult, rq.shift)
        m = _channel_shape(op.negative_mult, v.ndim, rq.axis)
        k = _channel_shape(op.negative_shift, v.ndim, rq.axis)
        negative = requantize(np.minimum(v, 0), m, k)
        self._store(op.output, np.clip(positive + negative + rq.zero_point, rq.lo, rq.hi))

    def visit_Softmax(self, op: ip.Softmax) -> None:
        q = self._codes(op.input)
        e = integer_exp((q - q.max(axis=-1, keepdims=True)) << op.upscale_bits, op)
        prob = (e << op.frac_bits) // e.sum(axis=-1, keepdims=True)
        self._store(op.output, apply_requant(prob, op.requant))

    def visit_MaskedSoftmax(self, op: ip.MaskedSoftmax) -> None:
        q = self._codes(op.input)
        keep = np.broadcast_to((np.asarray(self.env[op.mask]) != 0) == op.keep_nonzero, q.shape)
        keep = keep | ~keep.any(axis=-1, keepdims=True)  # a fully masked row: plain softmax
        top = np.where(keep, q, np.iinfo(np.int64).min).max(axis=-1, keepdims=True)
        d = np.where(keep, q - top, 0) << op.upscale_bits  # masked: any d <= 0, zeroed below
        e = np.where(keep, integer_exp(d, op), 0)
        prob = (e << op.frac_bits) // e.sum(axis=-1, keepdims=True)
        self._store(op.output, apply_requant(prob, op.requant))

    def visit_LayerNorm(self, op: ip.LayerNorm) -> None:
        v = sum(
            self._centered(name, zp) * m
            for name, zp, m in zip(op.inputs, op.zero_points, op.input_mults, strict=True)
        )
        assert isinstance(v, np.ndarray)
        c = v.shape[-1] * v - v.sum(axis=-1, keepdims=True)
        coarse = np.abs(c) >> op.var_shift
        variance = (coarse * coarse).sum(axis=-1, keepdims=True) + op.eps_codes
        r = integer_sqrt(np.maximum(variance, 1)) << op.var_shift
        t = np.sign(c) * ((np.abs(c) * op.norm_mult) // r)
        acc = t * op.gamma.astype(np.int64) + op.beta.astype(np.int64)
        if op.requant is None:
            self._store(op.output, acc)
            return
        self._store(op.output, apply_requant(acc, op.requant))
        if op.wide_output is not None:
            self._store(op.wide_output, acc)

    def visit_Embedding(self, op: ip.Embedding) -> None:
        ids = np.asarray(self.env[op.indices]).astype(np.int64)
        rows = op.table.shape[0]
        ids = np.where(ids < 0, ids + rows, ids)  # ONNX Gather's negative indices
        looked_up = op.table.astype(np.int64)[ids] * op.row_scales.astype(np.int64)[ids][..., None]
        self._store(op.output, looked_up + op.offset.astype(np.int64))

    def visit_MaskedMeanPool(self, op: ip.MaskedMeanPool) -> None:
        v = self._centered(op.input, op.input_zero_point)  # [B, T, D]
        keep = (np.asarray(self.env[op.mask]) != 0).astype(np.int64)  # [B, T]
        total = (v * keep[..., None]).sum(axis=1)
        count = np.maximum(keep.sum(axis=1), 1)[:, None]
        magnitude = ((np.abs(total) << (op.frac_bits + 1)) + count) // (2 * count)
        self._store(op.output, np.sign(total) * magnitude)

    def visit_L2Normalize(self, op: ip.L2Normalize) -> None:
        v = self._centered(op.input, op.input_zero_point)
        largest = np.abs(v).max(axis=-1, keepdims=True)
        shift = np.maximum(bit_length(largest) - op.norm_bits, 0)
        coarse = np.abs(v) >> shift
        squares = (coarse * coarse).sum(axis=-1, keepdims=True)
        norm = integer_sqrt(np.maximum(squares, 1)) << shift
        divisor = np.maximum(norm, op.eps_codes)
        magnitude = ((np.abs(v) << (op.frac_bits + 1)) + divisor) // (2 * divisor)
        self._store(op.output, np.sign(v) * magnitude)

    def visit_MaxPool(self, op: ip.MaxPool) -> None:
        fill = self.program.quant[op.output].qmin
        self._store(op.output, maxpool(self._codes(op.input), op, fill))

    def visit_Clip(self, op: ip.Clip) -> None:
        self._store(op.output, np.clip(self._codes(op.input), op.lo, op.hi))

    def visit_Reshape(self, op: ip.Reshape) -> None:
        x = self.env[op.input]
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(op.shape)]
        if shape.count(-1) == 1:  # ONNX Reshape's inferred dim, as numpy's
            known = int(np.prod([d for d in shape if d != -1]))
            shape[shape.index(-1)] = x.size // known if known and x.size % known == 0 else 0
        if int(np.prod(shape)) != x.size:  # shapes inferred for other dims than the data's
            raise UnsupportedModelError(
                f"reshape to {op.output}: {list(x.shape)} cannot become {shape}; the model's "
                "declared shapes disagree with the data (fix dynamic dims with --input-shape)"
            )
        self.env[op.output] = x.reshape(shape)

    def visit_Transpose(self, op: ip.Transpose) -> None:
        self.env[op.output] = self.env[op.input].transpose(op.perm)

    def visit_Concat(self, op: ip.Concat) -> None:
        self.env[op.output] = np.concatenate([self.env[i] for i in op.inputs], axis=op.axis)

    def visit_Max(self, op: ip.Max) -> None:
        self._store(op.output, np.maximum(self._codes(op.inputs[0]), self._codes(op.inputs[1])))

    def visit_Min(self, op: ip.Min) -> None:
        self._store(op.output, np.minimum(self._codes(op.inputs[0]), self._codes(op.inputs[1])))

    def visit_Lookup(self, op: ip.Lookup) -> None:
        index = self._codes(op.input) - self.program.code_offset(op.input)
        self._store(op.output, np.asarray(op.table, np.int64)[index])

    def visit_FloatIsland(self, op: ip.FloatIsland) -> None:
        key = id(op)
        if key not in self._islands:
            self._islands[key] = island_session(op, self.program.opset)
        values = self._islands[key].run(list(op.outputs), {i: self.env[i] for i in op.inputs})
        self.env.update(zip(op.outputs, values, strict=True))


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
