"""Integer-only ONNX backend: an :class:`IntegerProgram` as standard ONNX ops.

Only default-domain ops: ConvInteger / MatMulInteger (int32 accumulation), integer Add / Sub /
Mul, Max / Min, Cast, Clip, ReduceSum, MaxPool, Gather (lookup tables) and an exact floor shift.

Both operands of every ConvInteger / MatMulInteger have the same signedness (u8 x u8 or
s8 x s8): onnxruntime's u8 x s8 kernels on AVX2 without VNNI use ``vpmaddubsw``, which saturates
pairwise sums at int16 (255*127*2 > 32767), so a u8 x s8 product is exact only on some CPUs.
Same-sign operands take kernels that widen to int16 before multiplying (``vpmaddwd``) or use
dot-product instructions; they are checked on an emulated AVX2-only CPU by the test suite
(``tests/test_cpu_exactness.py``). Signed weights beside unsigned activations are stored as
``w + 128`` with weight zero point 128, which represents the same integers.

ONNX's BitShift is unsigned only, so the arithmetic shift of a signed int64 ``t``
(|t| < 2^62) is written as

    (t + 2^62) as uint64 >> k, back to int64, minus 2^62 >> k

which equals floor(t / 2^k) exactly because 2^62 is a multiple of 2^k. No float op runs
between the input's QuantizeLinear and the outputs' DequantizeLinear except listed float
islands. Stock onnxruntime runs the result; it must equal the reference interpreter bit for bit.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dyadiq import integer_program as ip
from dyadiq.backends.onnx.checked import checked
from dyadiq.errors import DyadiqError, UnsupportedModelError
from dyadiq.int_op_visitor import IntOpVisitor

OFFSET = 1 << 62
UNSIGNED_SHIFT = 128  # s8 code c is u8 code c + 128 with the zero point moved by 128
OPSET = 21


def model_opset(program: ip.IntegerProgram) -> int:
    """Float islands keep the source graph's op versions; integer ops need opset >= 16
    (BitShift on uint64, Clip on int64), all stable from there to 21."""
    return max(program.opset, 16)


class _Builder:
    def __init__(self, program: ip.IntegerProgram) -> None:
        self.program = program
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        # (signed, shape, digest of the codes) -> stored weight and zero point initializers
        self.weights: dict[tuple[bool, tuple[int, ...], bytes], tuple[str, str]] = {}
        self.counter = 0
        self.opset = model_opset(program)

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}__{self.counter}"

    def const(self, hint: str, value: np.ndarray | np.generic) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def cast(self, x: str, to: int) -> str:
        return self.node("Cast", [x], "cast", to=to)

    def centered(self, codes: str, zero_point: int) -> str:
        wide = self.cast(codes, TensorProto.INT64)
        if zero_point == 0:
            return wide
        return self.node("Sub", [wide, self.const("zp", np.int64(zero_point))], "centered")

    def channel(self, values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
        shape = [1] * ndim
        if values.size > 1:
            shape[axis % ndim] = values.size
        return values.astype(np.int64).reshape(shape)

    def shift(self, t: str, mult: np.ndarray, shift: np.ndarray, ndim: int, axis: int) -> str:
        """(t * m + 2^(k-1)) >> k for int64 t, as an exact floor shift (module docstring)."""
        m = self.channel(np.atleast_1d(mult), ndim, axis)
        k = self.channel(np.atleast_1d(shift), ndim, axis)
        rounding = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(k - 1, 0)), 0)
        product = self.node("Mul", [t, self.const("m", m)], "scaled")
        biased = self.node("Add", [product, self.const("round", rounding + OFFSET)], "biased")
        unsigned = self.cast(biased, TensorProto.UINT64)
        shifted = self.node(
            "BitShift",
            [unsigned, self.const("k", k.astype(np.uint64))],
            "shifted",
            direction="RIGHT",
        )
        signed = self.cast(shifted, TensorProto.INT64)
        return self.node("Sub", [signed, self.const("unbias", OFFSET >> k)], "floor")

    def finish(self, t: str, zero_point: int, lo: int, hi: int, output: str) -> None:
        """Add the zero point, clip to [lo, hi] and cast to the output's code type."""
        shifted = self.node("Add", [t, self.const("zp", np.int64(zero_point))], "zp")
        clipped = self.node(
            "Clip",
            [shifted, self.const("lo", np.int64(lo)), self.const("hi", np.int64(hi))],
            "clip",
        )
        to = TensorProto.INT8 if self.program.quant[output].signed else TensorProto.UINT8
        self.nodes.append(helper.make_node("Cast", [clipped], [output], name=output, to=to))

    def requant(self, acc: str, rq: ip.Requant, ndim: int, output: str) -> None:
        self.finish(
            self.shift(acc, rq.mult, rq.shift, ndim, rq.axis), rq.zero_point, rq.lo, rq.hi, output
        )

    def zero_point_const(self, codes: str) -> str:
        q = self.program.quant[codes]
        return self.const("xzp", np.array(q.zero_point, self.program.code_dtype(codes)))

    def ndim(self, codes: str) -> int:
        return len(self.program.shapes[codes])

    def weight_operand(self, weight: np.ndarray, activation: str) -> tuple[str, str]:
        """Constant int8 weight codes in the activation's signedness (module docstring),
        stored once for every op that multiplies by the same codes (layers that read one
        weight initializer, the steps of an unrolled LSTM)."""
        signed = self.program.quant[activation].signed
        key = (signed, weight.shape, hashlib.sha256(weight.tobytes()).digest())
        if key not in self.weights:
            if signed:
                self.weights[key] = (
                    self.const("weight", weight.astype(np.int8)),
                    self.const("wzp", np.int8(0)),
                )
            else:
                shifted = (weight.astype(np.int16) + UNSIGNED_SHIFT).astype(np.uint8)
                self.weights[key] = (
                    self.const("weight", shifted),
                    self.const("wzp", np.uint8(UNSIGNED_SHIFT)),
                )
        return self.weights[key]

    def same_sign_operand(self, codes: str, like: str) -> tuple[str, str]:
        """Activation ``codes`` (and its zero point) in the signedness of ``like``."""
        q, target = self.program.quant[codes], self.program.quant[like]
        if q.signed == target.signed:
            return codes, self.zero_point_const(codes)
        delta = UNSIGNED_SHIFT if q.signed else -UNSIGNED_SHIFT
        wide = self.node(
            "Add",
            [self.cast(codes, TensorProto.INT16), self.const("shift", np.int16(delta))],
            "resigned",
        )
        to, dtype = (TensorProto.INT8, np.int8) if target.signed else (TensorProto.UINT8, np.uint8)
        return self.cast(wide, to), self.const("xzp", np.array(q.zero_point + delta, dtype))


class _Lowering(_Builder, IntOpVisitor[None]):
    """Each ``visit_<Op>`` appends the ONNX nodes that compute the op's output codes."""

    def visit_QuantizeInput(self, op: ip.QuantizeInput | ip.Quantize) -> None:
        qo = self.program.quant[op.output]
        scale = self.const("scale", np.float32(qo.scale))
        zp = self.zero_point_const(op.output)
        self.nodes.append(
            helper.make_node("QuantizeLinear", [op.input, scale, zp], [op.output], name=op.output)
        )

    visit_Quantize = visit_QuantizeInput  # a float island's output: QuantizeLinear too

    def visit_Dequantize(self, op: ip.Dequantize) -> None:
        qi = self.program.quant[op.input]
        scale = self.const("scale", np.float32(qi.scale))
        zp = self.zero_point_const(op.input)
        self.nodes.append(
            helper.make_node("DequantizeLinear", [op.input, scale, zp], [op.output], name=op.output)
        )

    def visit_Conv(self, op: ip.Conv) -> None:
        weight, weight_zp = self.weight_operand(op.weight, op.input)
        acc = self.node(
            "ConvInteger",
            [op.input, weight, self.zero_point_const(op.input), weight_zp],
            "conv",
            strides=list(op.strides),
            pads=list(op.pads),
            dilations=list(op.dilations),
            group=op.group,
        )
        acc = self.cast(acc, TensorProto.INT64)
        if op.bias is not None:
            acc = self.node(
                "Add",
                [acc, self.const("bias", op.bias.astype(np.int64).reshape(1, -1, 1, 1))],
                "biased_acc",
            )
        self.requant(acc, op.requant, 4, op.output)

    def visit_MatMul(self, op: ip.MatMul) -> None:
        if op.weight is not None:
            rhs, rhs_zp = self.weight_operand(op.weight, op.input)
        else:
            assert op.weight_input is not None
            rhs, rhs_zp = self.same_sign_operand(op.weight_input, op.input)
        acc = self.node(
            "MatMulInteger", [op.input, rhs, self.zero_point_const(op.input), rhs_zp], "matmul"
        )
        acc = self.cast(acc, TensorProto.INT64)
        if op.bias is not None:
            acc = self.node(
                "Add", [acc, self.const("bias", op.bias.astype(np.int64))], "biased_acc"
            )
        self.requant(acc, op.requant, self.ndim(op.output), op.output)

    def visit_Add(self, op: ip.Add) -> None:
        ndim = self.ndim(op.output)
        centered = [
            self.centered(name, zp) for name, zp in zip(op.inputs, op.zero_points, strict=True)
        ]
        if op.single_rounding:  # (v_a m_a + v_b m_b + 2^(k-1)) >> k: one rounding
            products = [
                self.node("Mul", [v, self.const("add_mult", np.int64(m))], "scaled_input")
                for v, m in zip(centered, op.mults, strict=True)
            ]
            summed = self.node("Add", products, "scaled_sum")
            total = self.shift(summed, np.array(1), np.array(op.shifts[0]), ndim, 1)
        else:
            terms = [
                self.shift(v, np.array(m), np.array(k), ndim, 1)
                for v, m, k in zip(centered, op.mults, op.shifts, strict=True)
            ]
            total = self.node("Add", terms, "sum")
        self.finish(total, op.zero_point, op.lo, op.hi, op.output)

    def visit_Mul(self, op: ip.Mul) -> None:
        a = self.centered(op.inputs[0], op.zero_points[0])
        c = self.centered(op.inputs[1], op.zero_points[1])
        self.requant(
            self.node("Mul", [a, c], "product"), op.requant, self.ndim(op.output), op.output
        )

    def visit_GlobalAvgPool(self, op: ip.GlobalAvgPool) -> None:
        v = self.centered(op.input, op.input_zero_point)
        total = self.node(
            "ReduceSum", [v, self.const("axes", np.array([2, 3], np.int64))], "sum", keepdims=1
        )
        self.requant(total, op.requant, 4, op.output)

    def visit_HardSigmoid(self, op: ip.HardSigmoid) -> None:
        rq = op.requant
        v = self.centered(op.input, op.input_zero_point)
        affine = self.shift(v, rq.mult, rq.shift, self.ndim(op.output), rq.axis)
        self.finish(affine, rq.zero_point + op.offset, rq.lo, rq.hi, op.output)

    def visit_HardSwish(self, op: ip.HardSwish) -> None:
        ndim = self.ndim(op.output)
        v = self.centered(op.input, op.input_zero_point)
        one = 1 << op.frac_bits
        gate = self.shift(v, np.array(op.gate_mult), np.array(op.gate_shift), ndim, 1)
        gate = self.node("Add", [gate, self.const("half", np.int64(one >> 1))], "gate")
        gate = self.node(
            "Clip",
            [gate, self.const("zero", np.int64(0)), self.const("one", np.int64(one))],
            "gate_clip",
        )
        self.requant(self.node("Mul", [v, gate], "hswish"), op.requant, ndim, op.output)

    def row_reduce(self, op_type: str, x: str, hint: str) -> str:
        """``op_type`` (ReduceMax, ReduceSum) over the last axis, kept as a unit dim."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.node(
                op_type, [x, self.const("axes", np.array([-1], np.int64))], hint, keepdims=1
            )
        # before opset 18 ReduceMax takes its axes as an attribute
        return self.node(op_type, [x], hint, keepdims=1, axes=[-1])

    def ibert_exp(self, d: str, op: ip.Softmax | ip.MaskedSoftmax) -> str:
        """I-BERT's integer exp of int64 ``d = q - max q <= 0`` (before the upscale)."""
        if op.upscale_bits > ip.SOFTMAX_MAX_UPSCALE_BITS:
            # A huge input scale (weights near 1e27): d * 2^upscale would leave int64.
            raise UnsupportedModelError(
                f"softmax {op.output}: its input range needs a 2^{op.upscale_bits} upscale, which "
                "overflows int64; the model's weights or activations are implausibly large"
            )
        if op.upscale_bits:
            d = self.node(
                "Mul", [d, self.const("upscale", np.int64(1 << op.upscale_bits))], "d_fine"
            )
        neg = self.node("Neg", [d], "neg_d")
        ln2 = self.const("ln2", np.int64(op.ln2_codes))
        z = self.node("Div", [neg, ln2], "z")
        p = self.node("Add", [d, self.node("Mul", [z, ln2], "z_ln2")], "p")
        t = self.node("Add", [p, self.const("b", np.int64(op.b_codes))], "p_b")
        poly = self.node(
            "Add", [self.node("Mul", [t, t], "sq"), self.const("c", np.int64(op.c_codes))], "poly"
        )
        z_cap = self.node(
            "Clip", [z, self.const("zero", np.int64(0)), self.const("cap", np.int64(30))], "z_cap"
        )
        e = self.node(
            "BitShift",
            [self.cast(poly, TensorProto.UINT64), self.cast(z_cap, TensorProto.UINT64)],
            "exp",
            direction="RIGHT",
        )
        return self.cast(e, TensorProto.INT64)

    def normalize(self, e: str, op: ip.Softmax | ip.MaskedSoftmax) -> None:
        """floor(e 2^F / sum e) (a Div of non-negative int64: a floor), requantized."""
        total = self.row_reduce("ReduceSum", e, "row_sum")
        scaled = self.node("Mul", [e, self.const("one", np.int64(1 << op.frac_bits))], "scaled")
        prob = self.node("Div", [scaled, total], "prob")
        self.requant(prob, op.requant, self.ndim(op.output), op.output)

    def visit_Softmax(self, op: ip.Softmax) -> None:
        """I-BERT softmax (see :class:`ip.Softmax`); Div is on non-negative int64: a floor."""
        v = self.cast(op.input, TensorProto.INT64)
        d = self.node("Sub", [v, self.row_reduce("ReduceMax", v, "row_max")], "d")
        self.normalize(self.ibert_exp(d, op), op)

    def visit_MaskedSoftmax(self, op: ip.MaskedSoftmax) -> None:
        """:class:`ip.MaskedSoftmax`: the softmax over kept positions, 0 elsewhere."""
        v = self.cast(op.input, TensorProto.INT64)
        keep = self.cast(op.mask, TensorProto.BOOL)
        if not op.keep_nonzero:
            keep = self.node("Not", [keep], "keep")
        keep = self.node("Expand", [keep, self.node("Shape", [v], "scores_shape")], "keep_full")
        kept_any = self.row_reduce("ReduceMax", self.cast(keep, TensorProto.INT64), "kept_any")
        none_kept = self.node("Not", [self.cast(kept_any, TensorProto.BOOL)], "none_kept")
        keep = self.node("Or", [keep, none_kept], "keep_rows")
        floor = self.const("int64_min", np.int64(np.iinfo(np.int64).min))
        top = self.row_reduce("ReduceMax", self.node("Where", [keep, v, floor], "kept"), "row_max")
        zero = self.const("zero", np.int64(0))
        d = self.node("Where", [keep, self.node("Sub", [v, top], "d_all"), zero], "d")
        e = self.node("Where", [keep, self.ibert_exp(d, op), zero], "e_kept")
        self.normalize(e, op)

    def integer_sqrt(self, n: str) -> str:
        """floor(sqrt(n)) of int64 1 <= n < 2^62 by the reference's Newton iteration
        (:func:`dyadiq.reference_interpreter.integer_sqrt`); Divs of positive int64 floor."""
        powers = np.left_shift(np.int64(1), np.arange(63, dtype=np.int64))
        wide = self.node("Unsqueeze", [n, self.const("axes", np.array([-1], np.int64))], "n_wide")
        above = self.node("GreaterOrEqual", [wide, self.const("powers", powers)], "n_above")
        bits = self.node(
            "ReduceSum",
            [self.cast(above, TensorProto.INT64), self.const("axes", np.array([-1], np.int64))],
            "bits",
            keepdims=0,
        )
        two = self.const("two", np.int64(2))
        half = self.node(
            "Div",
            [self.node("Add", [bits, self.const("one", np.int64(1))], "b1"), two],
            "half_bits",
        )
        x = self.node("Gather", [self.const("pow2", powers[:33]), half], "isqrt_start", axis=0)
        for _ in range(ip.ISQRT_STEPS):
            step = self.node(
                "Div",
                [self.node("Add", [x, self.node("Div", [n, x], "n_x")], "x_n_x"), two],
                "newton",
            )
            x = self.node("Min", [x, step], "isqrt")
        return x

    def visit_LayerNorm(self, op: ip.LayerNorm) -> None:
        """:class:`ip.LayerNorm`; its one division is of non-negative int64 (a floor)."""
        terms = [
            self.node("Mul", [self.centered(name, zp), self.const("m", np.int64(m))], "wide")
            for name, zp, m in zip(op.inputs, op.zero_points, op.input_mults, strict=True)
        ]
        v = terms[0]
        for term in terms[1:]:
            v = self.node("Add", [v, term], "wide_sum")
        width = self.program.shapes[op.inputs[0]][-1]
        total = self.row_reduce("ReduceSum", v, "row_sum")
        nv = self.node("Mul", [v, self.const("n", np.int64(width))], "nv")
        c = self.node("Sub", [nv, total], "c")
        magnitude = self.node("Abs", [c], "abs_c")
        coarse = self.node(
            "Div", [magnitude, self.const("var_div", np.int64(1 << op.var_shift))], "coarse_c"
        )
        squares = self.row_reduce("ReduceSum", self.node("Mul", [coarse, coarse], "sq"), "sum_sq")
        squares = self.node("Add", [squares, self.const("eps", np.int64(op.eps_codes))], "var")
        squares = self.node("Max", [squares, self.const("one", np.int64(1))], "var_pos")
        r = self.node(
            "Mul",
            [self.integer_sqrt(squares), self.const("r_up", np.int64(1 << op.var_shift))],
            "r",
        )
        scaled = self.node("Mul", [magnitude, self.const("s", np.int64(op.norm_mult))], "c_s")
        quotient = self.node("Div", [scaled, r], "abs_t")
        t = self.node("Mul", [quotient, self.node("Sign", [c], "sign_c")], "t")
        gamma = self.const("gamma", op.gamma.astype(np.int64))
        beta = self.const("beta", op.beta.astype(np.int64))
        acc = self.node("Add", [self.node("Mul", [t, gamma], "t_gamma"), beta], "ln_acc")
        if op.requant is not None:
            self.requant(acc, op.requant, self.ndim(op.inputs[0]), op.output)
        wide = op.output if op.requant is None else op.wide_output
        if wide is not None:  # |acc| < 2^31 (integerize checks it)
            self.nodes.append(
                helper.make_node("Cast", [acc], [wide], name=wide, to=TensorProto.INT32)
            )

    def visit_LeakyRelu(self, op: ip.LeakyRelu) -> None:
        ndim = self.ndim(op.output)
        rq = op.requant
        v = self.centered(op.input, op.input_zero_point)
        zero = self.const("zero", np.int64(0))
        positive = self.shift(self.node("Max", [v, zero], "pos"), rq.mult, rq.shift, ndim, rq.axis)
        negative = self.shift(
            self.node("Min", [v, zero], "neg"), op.negative_mult, op.negative_shift, ndim, rq.axis
        )
        self.finish(
            self.node("Add", [positive, negative], "leaky"), rq.zero_point, rq.lo, rq.hi, op.output
        )

    def visit_MaxPool(self, op: ip.MaxPool) -> None:
        self.nodes.append(
            helper.make_node(
                "MaxPool",
                [op.input],
                [op.output],
                name=op.output,
                kernel_shape=list(op.kernel),
                strides=list(op.strides),
                pads=list(op.pads),
            )
        )

    def visit_Clip(self, op: ip.Clip) -> None:
        dtype = np.int8 if self.program.quant[op.output].signed else np.uint8
        self.nodes.append(
            helper.make_node(
                "Clip",
                [
                    op.input,
                    self.const("lo", np.array(op.lo, dtype)),
                    self.const("hi", np.array(op.hi, dtype)),
                ],
                [op.output],
                name=op.output,
            )
        )

    def visit_Reshape(self, op: ip.Reshape) -> None:
        shape = self.const("shape", np.array(op.shape, np.int64))
        self.nodes.append(
            helper.make_node("Reshape", [op.input, shape], [op.output], name=op.output)
        )

    def visit_Transpose(self, op: ip.Transpose) -> None:
        self.nodes.append(
            helper.make_node(
                "Transpose", [op.input], [op.output], name=op.output, perm=list(op.perm)
            )
        )

    def visit_Concat(self, op: ip.Concat) -> None:
        self.nodes.append(
            helper.make_node("Concat", list(op.inputs), [op.output], name=op.output, axis=op.axis)
        )

    def visit_Max(self, op: ip.Max) -> None:
        # the inputs' code type is the output's (one quantizer): no cast
        self.nodes.append(helper.make_node("Max", list(op.inputs), [op.output], name=op.output))

    def visit_Min(self, op: ip.Min) -> None:
        self.nodes.append(helper.make_node("Min", list(op.inputs), [op.output], name=op.output))

    def visit_Embedding(self, op: ip.Embedding) -> None:
        """:class:`ip.Embedding`: Gather of the int8 table and the rows' scales (negative ids
        as ONNX's), widened, scaled and offset in int32 (|codes| < 2^31, integerize checks it)."""
        rows = self.node(
            "Gather", [self.const("table", op.table.astype(np.int8)), op.indices], "rows", axis=0
        )
        wide = self.cast(rows, TensorProto.INT32)
        scales = self.node(
            "Gather",
            [self.const("row_scales", op.row_scales.astype(np.int32)), op.indices],
            "row_scale",
            axis=0,
        )
        scales = self.node(
            "Unsqueeze", [scales, self.const("axes", np.array([-1], np.int64))], "row_scale_d"
        )
        shifted = self.node("Mul", [wide, scales], "scaled_rows")
        offset = self.const("offset", op.offset.astype(np.int32))
        self.nodes.append(helper.make_node("Add", [shifted, offset], [op.output], name=op.output))

    def rounded_quotient(self, magnitude: str, frac_bits: int, divisor: str) -> str:
        """floor((|x| 2^(F+1) + d) / (2 d)) of |x| (``magnitude``) and d > 0: a Div of
        non-negative int64 (a floor)."""
        scaled = self.node(
            "Mul", [magnitude, self.const("up", np.int64(1 << (frac_bits + 1)))], "scaled"
        )
        twice = self.node("Mul", [divisor, self.const("two", np.int64(2))], "twice_d")
        biased = self.node("Add", [scaled, divisor], "biased")
        return self.node("Div", [biased, twice], "quotient")

    def visit_MaskedMeanPool(self, op: ip.MaskedMeanPool) -> None:
        """:class:`ip.MaskedMeanPool`: a 0/1 int64 mask, token sums, rounded division."""
        v = self.centered(op.input, op.input_zero_point)
        keep = self.cast(self.cast(op.mask, TensorProto.BOOL), TensorProto.INT64)
        axis = self.const("axis", np.array([1], np.int64))
        keep3 = self.node("Unsqueeze", [keep, self.const("axes", np.array([-1], np.int64))], "k3")
        masked = self.node("Mul", [v, keep3], "masked")
        total = self.node("ReduceSum", [masked, axis], "token_sum", keepdims=0)
        count = self.node("ReduceSum", [keep, axis], "count", keepdims=1)
        count = self.node("Max", [count, self.const("one", np.int64(1))], "count_pos")
        magnitude = self.node("Abs", [total], "abs_sum")
        quotient = self.rounded_quotient(magnitude, op.frac_bits, count)
        signed = self.node("Mul", [quotient, self.node("Sign", [total], "sign")], "mean")
        self.nodes.append(
            helper.make_node("Cast", [signed], [op.output], name=op.output, to=TensorProto.INT32)
        )

    def visit_L2Normalize(self, op: ip.L2Normalize) -> None:
        """:class:`ip.L2Normalize`: the LayerNorm's integer square root, a rounded division."""
        v = self.centered(op.input, op.input_zero_point)
        magnitude = self.node("Abs", [v], "abs_v")
        powers = np.left_shift(np.int64(1), np.arange(63, dtype=np.int64))
        largest = self.row_reduce("ReduceMax", magnitude, "row_max")
        wide = self.node(
            "Unsqueeze", [largest, self.const("axes", np.array([-1], np.int64))], "max_wide"
        )
        above = self.node("GreaterOrEqual", [wide, self.const("powers", powers)], "max_above")
        bits = self.node(
            "ReduceSum",
            [self.cast(above, TensorProto.INT64), self.const("axes", np.array([-1], np.int64))],
            "max_bits",
            keepdims=0,
        )
        shift = self.node(
            "Max",
            [
                self.node("Sub", [bits, self.const("b", np.int64(op.norm_bits))], "extra"),
                self.const("zero", np.int64(0)),
            ],
            "shift",
        )
        unit = self.node("Gather", [self.const("pow2", powers), shift], "unit", axis=0)
        coarse = self.node("Div", [magnitude, unit], "coarse")
        squares = self.row_reduce("ReduceSum", self.node("Mul", [coarse, coarse], "sq"), "sum_sq")
        squares = self.node("Max", [squares, self.const("one", np.int64(1))], "sum_sq_pos")
        norm = self.node("Mul", [self.integer_sqrt(squares), unit], "norm")
        divisor = self.node("Max", [norm, self.const("eps", np.int64(op.eps_codes))], "divisor")
        quotient = self.rounded_quotient(magnitude, op.frac_bits, divisor)
        signed = self.node("Mul", [quotient, self.node("Sign", [v], "sign")], "normalised")
        self.nodes.append(
            helper.make_node("Cast", [signed], [op.output], name=op.output, to=TensorProto.INT32)
        )

    def visit_Lookup(self, op: ip.Lookup) -> None:
        index = self.cast(op.input, TensorProto.INT32)
        offset = self.program.code_offset(op.input)
        if offset:
            index = self.node("Sub", [index, self.const("offset", np.int32(offset))], "index")
        table = self.const("table", np.asarray(op.table).astype(self.program.code_dtype(op.output)))
        self.nodes.append(
            helper.make_node("Gather", [table, index], [op.output], name=op.output, axis=0)
        )

    def visit_FloatIsland(self, op: ip.FloatIsland) -> None:
        self.nodes.extend(op.nodes)
        # islands share constants (and one island may list a constant once per use, as a
        # BatchNormalization reading one tensor as scale, bias, mean and var does)
        known = {t.name for t in self.initializers}
        for tensor in op.initializers:
            if tensor.name not in known:
                known.add(tensor.name)
                self.initializers.append(tensor)


_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
}


def _dims(shape: tuple[int, ...]) -> list[int | str]:
    """A dynamic batch (0) is ``N``; another unknown dim (-1, a float output's) is named."""
    return [
        "N" if (i == 0 and d == 0) else (f"dim{i}" if d < 0 else d) for i, d in enumerate(shape)
    ]


def export_integer_onnx(
    program: ip.IntegerProgram, *, integer_outputs: bool = True
) -> onnx.ModelProto:
    """The ONNX model; ``integer_outputs`` also exposes each output's codes as ``NAME_codes``."""
    if program.opset > OPSET:
        raise DyadiqError(f"float islands need opset {program.opset} > {OPSET}")
    b = _Lowering(program)
    for op in program.ops:
        b.visit(op)  # every op class has a method (tests/test_int_op_visitor.py)
    inputs = [
        helper.make_tensor_value_info(name, _ONNX_TYPES[dtype], _dims(shape))
        for name, (dtype, shape) in program.inputs.items()
    ]

    def output_dims(name: str) -> list[int | str]:
        return _dims(program.shapes[name])

    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, output_dims(name))
        for name in program.outputs
    ]
    if integer_outputs:
        for name, codes in program.int_outputs.items():
            alias = f"{name}_codes"
            b.nodes.append(helper.make_node("Identity", [codes], [alias], name=alias))
            dtype = _ONNX_TYPES[program.code_dtype(codes)]  # int32 for a wide output
            outputs.append(helper.make_tensor_value_info(alias, dtype, output_dims(name)))
    graph = helper.make_graph(b.nodes, "dyadiq_integer", inputs, outputs, b.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", max(program.opset, 16))]
    )
    return checked(model, "integer")
