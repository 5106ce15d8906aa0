"""Lower an :class:`IntegerProgram` to a TVM Relax module, op by op with ``relax.BlockBuilder``.

The Relax ``main`` computes exactly what :mod:`dyadiq.reference_interpreter` computes:

* Signature: ``main`` takes the program's float inputs (batch dimension fixed, default 1) and
  quantizes them in the graph, ``clip(round(x / s), qmin - z, qmax - z) + z`` in float32.
  Relax ``round`` lowers to a round-half-to-even (LLVM ``nearbyint``), the rule numpy and ONNX
  QuantizeLinear use, and ``x / s`` is the same single IEEE division, so the codes are the
  reference's (checked on ties in the tests). Clipping before the cast keeps an out-of-range
  float from an undefined float->int conversion; both bounds are integers, so clipping
  before or after rounding gives the same code.
* It returns a tuple: first the integer codes of every program output that has them (in
  ``program.outputs`` order; names in :func:`main_output_names` end in ``_codes``), then every
  output dequantized to float32. Codes are what backends must reproduce bit for bit.
* Weighted layers take the raw uint8/int8 activation codes and int8 weights (b-bit values in
  int8 containers): the zero point is taken out algebraically,
  ``sum (x - z) w = sum x w - z sum w``, so the accumulator needs no widened copy of the
  activations and ``- z sum w`` folds into the bias. Padding must then pad with the code ``z``
  (the real value 0), done by an explicit ``pad``. The accumulator is int32 when
  ``max|code| * max_o sum|w_o|`` provably fits, int64 otherwise.
* Everything after the accumulator is int64, as in the reference: ``(acc * m + 2^(k-1)) >> k``
  with Relax's arithmetic right shift on signed integers (a floor), ``+ z``, clip, cast to the
  output's code type. Multipliers are int64 constants (a plain ``relax.const`` would be int32).

Float islands (ops without an integer kernel) are imported with TVM's own ONNX frontend and
called as one Relax function each, when ``lower_program(float_islands=True)`` asks for them
(the ``--target`` builds do). TVM's float kernels may round differently from onnxruntime's,
which the reference interpreter runs islands with, so codes downstream of an island can differ
by a few LSB: :mod:`dyadiq.targets` checks such programs with a stated tolerance. Without
``float_islands`` the whole program is scanned first and every island is named in one
:class:`UnsupportedModelError` (an integer-only module is what ``dyadiq.tvm_passes`` promises).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import IRModule, relax

from dyadiq import integer_program as ip
from dyadiq.errors import UnsupportedModelError
from dyadiq.int_op_visitor import IntOpVisitor
from dyadiq.reference_interpreter import SOFTMAX_MAX_SHIFT

INT32_LIMIT = 2**31 - 1
CODES_SUFFIX = "_codes"


def unsupported_ops(program: ip.IntegerProgram, *, float_islands: bool = False) -> list[str]:
    """Every op of ``program`` without a TVM lowering (a ``visit_`` method of the portable
    lowering, which the x86 one falls back to), described for an error message; float
    islands count as such unless ``float_islands``."""
    lowerable = _Lowering.supported_ops()
    found = []
    for op in program.ops:
        if isinstance(op, ip.FloatIsland):
            if float_islands:
                continue
            nodes = ", ".join(f"{n.op_type} {n.name}".strip() for n in op.nodes)
            found.append(f"FloatIsland [{nodes}]")
        elif type(op) not in lowerable:
            found.append(type(op).__name__)
    return found


def static_shape(shape: Sequence[int], batch: int) -> tuple[int, ...]:
    """The program marks a dynamic batch dimension with 0; TVM gets ``batch`` there."""
    return tuple(batch if (i == 0 and d == 0) else int(d) for i, d in enumerate(shape))


def main_output_names(program: ip.IntegerProgram) -> list[str]:
    """Names of ``main``'s tuple fields, in order: output codes, then float outputs."""
    codes = [f"{o}{CODES_SUFFIX}" for o in program.outputs if o in program.int_outputs]
    return codes + list(program.outputs)


def _int64(value: np.ndarray | int) -> relax.Constant:
    return relax.const(np.asarray(value, dtype=np.int64), "int64")


def _channel(values: np.ndarray | int, ndim: int, axis: int) -> np.ndarray:
    """Per-channel values shaped to broadcast along ``axis`` (as the reference does)."""
    flat = np.atleast_1d(np.asarray(values, dtype=np.int64))
    shape = [1] * ndim
    if flat.size > 1:
        shape[axis % ndim] = flat.size
    return flat.reshape(shape)


class _Lowering(IntOpVisitor[None]):
    """Emits one program op at a time (``visit_<Op>``); ``env`` maps program tensor names to
    Relax values. The ops it has a method for are the ones the TVM backend lowers."""

    def __init__(self, program: ip.IntegerProgram, bb: relax.BlockBuilder) -> None:
        self.program = program
        self.bb = bb
        self.env: dict[str, relax.Expr] = {}
        self.island_count = 0
        self.constants: dict[str, np.ndarray] = {}  # island outputs known at compile time
        # hand-written scalar TIR loops (integer square root) where the target is a CPU
        self.scalar_kernels = True
        self.sqrt_count = 0

    # --- helpers -----------------------------------------------------------------------------
    def value(self, name: str) -> relax.Expr:
        """The Relax value of program tensor ``name`` in the program's own layout."""
        return self.env[name]

    def emit(self, expr: relax.Expr) -> relax.Var:
        return self.bb.emit(expr)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.value(name).ty.shape)

    @staticmethod
    def ndim(expr: relax.Expr) -> int:
        return len(expr.ty.shape)

    def code_dtype(self, name: str) -> str:
        return str(self.program.code_dtype(name))

    def centered(self, name: str, zero_point: int) -> relax.Var:
        """``codes - z`` in int64."""
        return self.centered_value(self.value(name), zero_point)

    def centered_value(self, codes: relax.Expr, zero_point: int) -> relax.Var:
        wide = self.emit(relax.op.astype(codes, "int64"))
        if zero_point == 0:
            return wide
        return self.emit(relax.op.subtract(wide, _int64(zero_point)))

    def requantize(
        self,
        t: relax.Expr,
        mult: np.ndarray | int,
        shift: np.ndarray | int,
        ndim: int,
        axis: int,
    ) -> relax.Var:
        """``(t * m + 2^(k-1)) >> k`` on int64 ``t`` (the reference's ``requantize``)."""
        m = _channel(mult, ndim, axis)
        k = _channel(shift, ndim, axis)
        rounding = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(k - 1, 0)), 0)
        product = self.emit(relax.op.multiply(t, _int64(m)))
        biased = self.emit(relax.op.add(product, _int64(rounding)))
        return self.emit(relax.op.right_shift(biased, _int64(k)))

    def finish(self, t: relax.Expr, zero_point: int, lo: int, hi: int, output: str) -> None:
        """``clip(t + z, lo, hi)`` cast to the output's code type, bound to ``output``."""
        shifted = self.emit(relax.op.add(t, _int64(zero_point)))
        clipped = self.emit(relax.op.clip(shifted, lo, hi))
        self.env[output] = self.emit(relax.op.astype(clipped, self.code_dtype(output)))

    def requant(self, acc: relax.Expr, rq: ip.Requant, ndim: int, output: str) -> None:
        scaled = self.requantize(acc, rq.mult, rq.shift, ndim, rq.axis)
        self.finish(scaled, rq.zero_point, rq.lo, rq.hi, output)

    def accumulator_dtype(self, codes: str, weight_rows: np.ndarray) -> str:
        """int32 when ``max|code| * sum|w|`` of the worst output channel fits, else int64."""
        q = self.program.quant[codes]
        largest_code = max(abs(q.qmin), abs(q.qmax))
        bound = largest_code * int(np.abs(weight_rows.astype(np.int64)).sum(axis=1).max())
        return "int32" if bound <= INT32_LIMIT else "int64"

    # --- ops ---------------------------------------------------------------------------------
    def visit_QuantizeInput(self, op: ip.QuantizeInput | ip.Quantize) -> None:
        q = self.program.quant[op.output]
        x = self.value(op.input)
        scaled = self.emit(relax.op.divide(x, relax.const(np.float32(q.scale), "float32")))
        rounded = self.emit(relax.op.round(scaled))
        bounded = self.emit(
            relax.op.clip(rounded, float(q.qmin - q.zero_point), float(q.qmax - q.zero_point))
        )
        codes = self.emit(relax.op.astype(bounded, "int32"))
        codes = self.emit(relax.op.add(codes, relax.const(np.int32(q.zero_point), "int32")))
        self.env[op.output] = self.emit(relax.op.astype(codes, self.code_dtype(op.output)))

    visit_Quantize = visit_QuantizeInput  # a float island's output: the same rounding

    def visit_Dequantize(self, op: ip.Dequantize) -> None:
        q = self.program.quant[op.input]
        wide = self.emit(relax.op.astype(self.value(op.input), "int32"))
        centered = self.emit(relax.op.subtract(wide, relax.const(np.int32(q.zero_point), "int32")))
        real = self.emit(relax.op.astype(centered, "float32"))
        scale = relax.const(np.float32(q.scale), "float32")
        self.env[op.output] = self.emit(relax.op.multiply(real, scale))

    def visit_Conv(self, op: ip.Conv) -> None:
        if op.weight.ndim != 4:
            raise UnsupportedModelError(
                f"TVM lowering handles 2-D convolutions only; {op.output} has a "
                f"{op.weight.ndim - 2}-D kernel"
            )
        weight = op.weight.astype(np.int8)
        x = self.value(op.input)
        z = op.input_zero_point
        padding: tuple[int, ...] = tuple(op.pads)
        if z != 0 and any(op.pads):
            top, left, bottom, right = op.pads
            x = self.emit(
                relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(z))
            )
            padding = (0, 0, 0, 0)
        out_dtype = self.accumulator_dtype(op.input, weight.reshape(weight.shape[0], -1))
        acc = self.emit(
            relax.op.nn.conv2d(
                x,
                relax.const(weight, "int8"),
                strides=tuple(op.strides),
                padding=padding,
                dilation=tuple(op.dilations),
                groups=op.group,
                out_dtype=out_dtype,
            )
        )
        # sum (x - z) w = sum x w - z sum w: the zero-point term joins the bias.
        offset = -z * weight.astype(np.int64).reshape(weight.shape[0], -1).sum(axis=1)
        if op.bias is not None:
            offset = offset + op.bias.astype(np.int64)
        acc = self.emit(relax.op.astype(acc, "int64"))
        if op.bias is not None or z != 0:
            acc = self.emit(relax.op.add(acc, _int64(offset.reshape(1, -1, 1, 1))))
        self.requant(acc, op.requant, 4, op.output)

    def visit_MatMul(self, op: ip.MatMul) -> None:
        if op.weight is not None:
            weight = op.weight.astype(np.int8)
            out_dtype = self.accumulator_dtype(op.input, weight.T)
            acc = self.emit(
                relax.op.matmul(self.value(op.input), relax.const(weight, "int8"), out_dtype)
            )
            acc = self.emit(relax.op.astype(acc, "int64"))
            offset = -op.input_zero_point * weight.astype(np.int64).sum(axis=0)
        else:
            assert op.weight_input is not None  # the IR's invariant: one of the two is set
            # activation x activation: both operands centered, products and sums in int64
            a = self.centered(op.input, op.input_zero_point)
            b = self.centered(op.weight_input, op.weight_zero_point)
            acc = self.emit(relax.op.matmul(a, b, "int64"))
            offset = np.zeros(1, np.int64)
        if op.bias is not None:
            offset = offset + op.bias.astype(np.int64)
        if offset.any():
            acc = self.emit(relax.op.add(acc, _int64(offset)))
        self.requant(acc, op.requant, self.ndim(acc), op.output)

    def visit_Add(self, op: ip.Add) -> None:
        centered = [
            self.centered(name, zp) for name, zp in zip(op.inputs, op.zero_points, strict=True)
        ]
        total = self.residual_sum(op, centered, len(self.shape(op.inputs[0])), 1)
        self.finish(total, op.zero_point, op.lo, op.hi, op.output)

    def residual_sum(
        self, op: ip.Add, centered: list[relax.Expr], ndim: int, axis: int
    ) -> relax.Var:
        """The Add's rescaled sum before ``+ z`` and the clip: each input rounded separately,
        or (``single_rounding``) ``(v_a m_a + v_b m_b + 2^(k-1)) >> k``, rounded once."""
        if op.single_rounding:
            products = [
                self.emit(relax.op.multiply(v, _int64(m)))
                for v, m in zip(centered, op.mults, strict=True)
            ]
            summed = self.emit(relax.op.add(products[0], products[1]))
            return self.requantize(summed, 1, op.shifts[0], ndim, axis)
        terms = [
            self.requantize(v, m, k, ndim, axis)
            for v, m, k in zip(centered, op.mults, op.shifts, strict=True)
        ]
        return self.emit(relax.op.add(terms[0], terms[1]))

    def visit_Mul(self, op: ip.Mul) -> None:
        a = self.centered(op.inputs[0], op.zero_points[0])
        b = self.centered(op.inputs[1], op.zero_points[1])
        product = self.emit(relax.op.multiply(a, b))
        self.requant(product, op.requant, self.ndim(product), op.output)

    def visit_GlobalAvgPool(self, op: ip.GlobalAvgPool) -> None:
        v = self.centered(op.input, op.input_zero_point)
        total = self.emit(relax.op.sum(v, axis=[2, 3], keepdims=True))
        self.requant(total, op.requant, 4, op.output)

    def visit_HardSigmoid(self, op: ip.HardSigmoid) -> None:
        rq = op.requant
        v = self.centered(op.input, op.input_zero_point)
        # the reference applies the (scalar) multiplier without a channel axis
        affine = self.requantize(v, rq.mult, rq.shift, len(self.shape(op.input)), rq.axis)
        self.finish(affine, rq.zero_point + op.offset, rq.lo, rq.hi, op.output)

    def visit_HardSwish(self, op: ip.HardSwish) -> None:
        ndim = len(self.shape(op.input))
        v = self.centered(op.input, op.input_zero_point)
        one = 1 << op.frac_bits
        gate = self.requantize(v, op.gate_mult, op.gate_shift, ndim, 1)
        gate = self.emit(relax.op.add(gate, _int64(one >> 1)))
        gate = self.emit(relax.op.clip(gate, 0, one))
        self.requant(self.emit(relax.op.multiply(v, gate)), op.requant, ndim, op.output)

    def visit_LeakyRelu(self, op: ip.LeakyRelu) -> None:
        ndim = len(self.shape(op.input))
        rq = op.requant
        v = self.centered(op.input, op.input_zero_point)
        zero = _int64(0)
        positive = self.requantize(
            self.emit(relax.op.maximum(v, zero)), rq.mult, rq.shift, ndim, rq.axis
        )
        negative = self.requantize(
            self.emit(relax.op.minimum(v, zero)), op.negative_mult, op.negative_shift, ndim, rq.axis
        )
        total = self.emit(relax.op.add(positive, negative))
        self.finish(total, rq.zero_point, rq.lo, rq.hi, op.output)

    def ibert_exp(self, d: relax.Expr, op: ip.Softmax | ip.MaskedSoftmax) -> relax.Var:
        """I-BERT's integer exp of int64 ``d = q - max q <= 0`` (before the upscale)."""
        if op.upscale_bits:
            d = self.emit(relax.op.left_shift(d, _int64(op.upscale_bits)))
        ln2 = _int64(op.ln2_codes)
        z = self.emit(relax.op.floor_divide(self.emit(relax.op.negative(d)), ln2))
        p = self.emit(relax.op.add(d, self.emit(relax.op.multiply(z, ln2))))
        t = self.emit(relax.op.add(p, _int64(op.b_codes)))
        poly = self.emit(relax.op.add(self.emit(relax.op.multiply(t, t)), _int64(op.c_codes)))
        z_cap = self.emit(relax.op.minimum(z, _int64(SOFTMAX_MAX_SHIFT)))
        return self.emit(relax.op.right_shift(poly, z_cap))

    def normalize(self, e: relax.Expr, op: ip.Softmax | ip.MaskedSoftmax, ndim: int) -> None:
        """floor(e 2^F / sum e) over the last axis, requantized to ``op.output``."""
        total = self.emit(relax.op.sum(e, axis=[-1], keepdims=True))
        scaled = self.emit(relax.op.left_shift(e, _int64(op.frac_bits)))
        prob = self.emit(relax.op.floor_divide(scaled, total))
        self.requant(prob, op.requant, ndim, op.output)

    def visit_Softmax(self, op: ip.Softmax) -> None:
        """I-BERT softmax (:class:`ip.Softmax`); both divisions are floor divisions."""
        ndim = len(self.shape(op.input))
        q = self.emit(relax.op.astype(self.value(op.input), "int64"))
        top = self.emit(relax.op.max(q, axis=-1, keepdims=True))
        self.normalize(self.ibert_exp(self.emit(relax.op.subtract(q, top)), op), op, ndim)

    def visit_MaskedSoftmax(self, op: ip.MaskedSoftmax) -> None:
        """:class:`ip.MaskedSoftmax`: the I-BERT softmax over kept positions, 0 elsewhere."""
        shape = self.shape(op.input)
        q = self.emit(relax.op.astype(self.value(op.input), "int64"))
        mask = self.emit(relax.op.astype(self.value(op.mask), "int64"))
        compare = relax.op.not_equal if op.keep_nonzero else relax.op.equal
        keep = self.emit(relax.op.broadcast_to(self.emit(compare(mask, _int64(0))), shape))
        kept = self.emit(relax.op.astype(keep, "int64"))
        kept_any = self.emit(relax.op.max(kept, axis=-1, keepdims=True))
        none_kept = self.emit(relax.op.equal(kept_any, _int64(0)))
        keep = self.emit(relax.op.logical_or(keep, none_kept))  # a fully masked row: all
        lowest = _int64(np.iinfo(np.int64).min)
        top = self.emit(
            relax.op.max(self.emit(relax.op.where(keep, q, lowest)), axis=-1, keepdims=True)
        )
        zero = _int64(0)
        d = self.emit(relax.op.where(keep, self.emit(relax.op.subtract(q, top)), zero))
        e = self.emit(relax.op.where(keep, self.ibert_exp(d, op), zero))
        self.normalize(e, op, len(shape))

    def integer_sqrt(self, n: relax.Expr) -> relax.Var:
        """floor(sqrt(n)) of int64 1 <= n < 2^62: the reference's Newton iteration
        (:func:`dyadiq.reference_interpreter.integer_sqrt`). On CPUs one TIR loop
        (:mod:`~dyadiq.backends.tvm.integer_sqrt_kernel`: as Relax ops, fused and inlined, the
        steps' expression grows as 3^steps); on GPUs the same loop, one element per thread."""
        from dyadiq.backends.tvm.integer_sqrt_kernel import (
            integer_sqrt_gpu_kernel,
            integer_sqrt_kernel,
        )

        shape = tuple(int(d) for d in n.ty.shape)
        count = int(np.prod(shape))
        self.sqrt_count += 1
        kernel = integer_sqrt_kernel if self.scalar_kernels else integer_sqrt_gpu_kernel
        gv = self.bb.add_func(kernel(count), f"dq_integer_sqrt_{self.sqrt_count}")
        flat = self.emit(relax.op.reshape(n, (count,)))
        root = self.emit(relax.call_tir(gv, [flat], relax.TensorType((count,), "int64")))
        return self.emit(relax.op.reshape(root, shape))

    def visit_LayerNorm(self, op: ip.LayerNorm) -> None:
        """:class:`ip.LayerNorm`; its divisions are of non-negative int64 (floors)."""
        shape = self.shape(op.inputs[0])
        terms = [
            self.emit(relax.op.multiply(self.centered(name, zp), _int64(m)))
            for name, zp, m in zip(op.inputs, op.zero_points, op.input_mults, strict=True)
        ]
        v = terms[0]
        for term in terms[1:]:
            v = self.emit(relax.op.add(v, term))
        total = self.emit(relax.op.sum(v, axis=[-1], keepdims=True))
        nv = self.emit(relax.op.multiply(v, _int64(shape[-1])))
        c = self.emit(relax.op.subtract(nv, total))
        magnitude = self.emit(relax.op.abs(c))
        coarse = self.emit(relax.op.right_shift(magnitude, _int64(op.var_shift)))
        squares = self.emit(
            relax.op.sum(self.emit(relax.op.multiply(coarse, coarse)), axis=[-1], keepdims=True)
        )
        squares = self.emit(relax.op.add(squares, _int64(op.eps_codes)))
        root = self.integer_sqrt(self.emit(relax.op.maximum(squares, _int64(1))))
        r = self.emit(relax.op.left_shift(root, _int64(op.var_shift)))
        scaled = self.emit(relax.op.multiply(magnitude, _int64(op.norm_mult)))
        quotient = self.emit(relax.op.floor_divide(scaled, r))
        negative = self.emit(relax.op.less(c, _int64(0)))
        t = self.emit(relax.op.where(negative, self.emit(relax.op.negative(quotient)), quotient))
        product = self.emit(relax.op.multiply(t, _int64(op.gamma.astype(np.int64))))
        acc = self.emit(relax.op.add(product, _int64(op.beta.astype(np.int64))))
        if op.requant is not None:
            self.requant(acc, op.requant, len(shape), op.output)
        wide = op.output if op.requant is None else op.wide_output
        if wide is not None:  # |acc| < 2^31 (integerize checks it)
            self.env[wide] = self.emit(relax.op.astype(acc, "int32"))

    def visit_Embedding(self, op: ip.Embedding) -> None:
        """:class:`ip.Embedding`: ``take`` of the int8 table and the rows' scales (``wrap``: a
        negative id counts from the end, as ONNX Gather's), widened, scaled and offset in
        int32."""
        ids = self.emit(relax.op.astype(self.value(op.indices), "int64"))
        table = relax.const(op.table.astype(np.int8), "int8")
        rows = self.emit(relax.op.take(table, ids, axis=0, mode="wrap"))
        wide = self.emit(relax.op.astype(rows, "int32"))
        row_scales = relax.const(op.row_scales.astype(np.int32), "int32")
        scales = self.emit(relax.op.take(row_scales, ids, axis=0, mode="wrap"))
        scales = self.emit(relax.op.expand_dims(scales, axis=-1))
        shifted = self.emit(relax.op.multiply(wide, scales))
        offset = relax.const(op.offset.astype(np.int32), "int32")
        self.env[op.output] = self.emit(relax.op.add(shifted, offset))

    def rounded_quotient(
        self, magnitude: relax.Expr, frac_bits: int, divisor: relax.Expr, sign_of: relax.Expr
    ) -> relax.Var:
        """sign(x) floor((|x| 2^(F+1) + d) / (2 d)) of int64 ``magnitude`` = |x| and d > 0
        (a floor division of non-negative values), as int32 codes."""
        scaled = self.emit(relax.op.left_shift(magnitude, _int64(frac_bits + 1)))
        biased = self.emit(relax.op.add(scaled, divisor))
        twice = self.emit(relax.op.left_shift(divisor, _int64(1)))
        quotient = self.emit(relax.op.floor_divide(biased, twice))
        negative = self.emit(relax.op.less(sign_of, _int64(0)))
        signed = self.emit(
            relax.op.where(negative, self.emit(relax.op.negative(quotient)), quotient)
        )
        return self.emit(relax.op.astype(signed, "int32"))

    def visit_MaskedMeanPool(self, op: ip.MaskedMeanPool) -> None:
        """:class:`ip.MaskedMeanPool`: token sums of the kept positions, rounded division."""
        v = self.centered(op.input, op.input_zero_point)
        mask = self.emit(relax.op.astype(self.value(op.mask), "int64"))
        keep = self.emit(relax.op.astype(self.emit(relax.op.not_equal(mask, _int64(0))), "int64"))
        kept = self.emit(relax.op.expand_dims(keep, axis=-1))
        total = self.emit(relax.op.sum(self.emit(relax.op.multiply(v, kept)), axis=[1]))
        count = self.emit(relax.op.sum(keep, axis=[1], keepdims=True))
        count = self.emit(relax.op.maximum(count, _int64(1)))
        magnitude = self.emit(relax.op.abs(total))
        self.env[op.output] = self.rounded_quotient(magnitude, op.frac_bits, count, total)

    def visit_L2Normalize(self, op: ip.L2Normalize) -> None:
        """:class:`ip.L2Normalize`: the LayerNorm's integer square root, a rounded division."""
        v = self.centered(op.input, op.input_zero_point)
        magnitude = self.emit(relax.op.abs(v))
        largest = self.emit(relax.op.max(magnitude, axis=-1, keepdims=True))
        powers = np.left_shift(np.int64(1), np.arange(63, dtype=np.int64))
        above = self.emit(relax.op.greater_equal(largest, _int64(powers)))  # [..., 63]
        bits = self.emit(
            relax.op.sum(self.emit(relax.op.astype(above, "int64")), axis=[-1], keepdims=True)
        )
        shift = self.emit(
            relax.op.maximum(self.emit(relax.op.subtract(bits, _int64(op.norm_bits))), _int64(0))
        )
        coarse = self.emit(relax.op.right_shift(magnitude, shift))
        squares = self.emit(
            relax.op.sum(self.emit(relax.op.multiply(coarse, coarse)), axis=[-1], keepdims=True)
        )
        root = self.integer_sqrt(self.emit(relax.op.maximum(squares, _int64(1))))
        norm = self.emit(relax.op.left_shift(root, shift))
        divisor = self.emit(relax.op.maximum(norm, _int64(op.eps_codes)))
        self.env[op.output] = self.rounded_quotient(magnitude, op.frac_bits, divisor, v)

    def visit_MaxPool(self, op: ip.MaxPool) -> None:
        # TVM pads with the dtype's minimum, the reference with the output's qmin; every
        # window holds at least one real element (ONNX pads < kernel), whose code is >= qmin,
        # so the maxima agree.
        self.env[op.output] = self.emit(
            relax.op.nn.max_pool2d(
                self.value(op.input),
                pool_size=tuple(op.kernel),
                strides=tuple(op.strides),
                padding=tuple(op.pads),
            )
        )

    def visit_Clip(self, op: ip.Clip) -> None:
        self.env[op.output] = self.emit(relax.op.clip(self.value(op.input), op.lo, op.hi))

    def visit_Reshape(self, op: ip.Reshape) -> None:
        shape_in = self.shape(op.input)
        # ONNX Reshape: 0 copies the input's dimension, -1 is inferred
        target = [shape_in[i] if d == 0 else d for i, d in enumerate(op.shape)]
        resolved = np.empty(shape_in, dtype=np.int8).reshape(target).shape
        self.env[op.output] = self.emit(relax.op.reshape(self.value(op.input), resolved))

    def visit_Transpose(self, op: ip.Transpose) -> None:
        self.env[op.output] = self.emit(relax.op.permute_dims(self.value(op.input), list(op.perm)))

    def visit_Concat(self, op: ip.Concat) -> None:
        parts = relax.Tuple([self.value(name) for name in op.inputs])
        self.env[op.output] = self.emit(relax.op.concat(parts, axis=op.axis))

    def visit_Max(self, op: ip.Max) -> None:
        a, b = (self.value(name) for name in op.inputs)
        self.env[op.output] = self.emit(relax.op.maximum(a, b))

    def visit_Min(self, op: ip.Min) -> None:
        a, b = (self.value(name) for name in op.inputs)
        self.env[op.output] = self.emit(relax.op.minimum(a, b))

    def visit_Lookup(self, op: ip.Lookup) -> None:
        index = self.emit(relax.op.astype(self.value(op.input), "int32"))
        offset = self.program.code_offset(op.input)
        if offset:
            index = self.emit(relax.op.subtract(index, relax.const(np.int32(offset), "int32")))
        dtype = self.code_dtype(op.output)
        table = relax.const(np.asarray(op.table).astype(dtype), dtype)
        self.env[op.output] = self.emit(relax.op.take(table, index, axis=0))

    def fold_constant_island(self, op: ip.FloatIsland) -> None:
        """An island of constants only (a Constant node, or ops on other folded values) is
        computed here, once, with onnxruntime as the reference computes it: later islands
        then import its values as initializers (TVM's importer mishandles e.g. a Squeeze
        whose axes arrive as a tensor)."""
        from dyadiq.reference_interpreter import island_session

        feeds = {name: self.constants[name] for name in dict.fromkeys(op.inputs)}
        values = island_session(op, self.program.opset).run(list(op.outputs), feeds)
        for name, value in zip(op.outputs, values, strict=True):
            array = np.asarray(value)
            self.constants[name] = array
            self.env[name] = relax.const(array, str(array.dtype))

    def visit_FloatIsland(self, op: ip.FloatIsland) -> None:
        """The island's ONNX nodes through TVM's ONNX importer, called as one Relax function.

        Inputs known at compile time (a Shape of a static tensor, say) go into the imported
        model as initializers: TVM's importer needs e.g. a Reshape's target shape constant."""
        from tvm.relax.frontend.onnx import from_onnx

        from dyadiq.reference_interpreter import island_model

        if all(name in self.constants for name in op.inputs):
            self.fold_constant_island(op)
            return
        model = island_model(op, self.program.opset)
        # Mul(x, x) lists x twice; the imported function takes each input once
        names = [name for name in dict.fromkeys(op.inputs) if name not in self.constants]
        for name in op.inputs:
            if name in self.constants:
                model.graph.initializer.append(numpy_helper.from_array(self.constants[name], name))
        kept = [i for i in model.graph.input if i.name in names]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        args = [self.value(name) for name in names]
        shapes = {name: list(self.shape(name)) for name in names}
        dtypes = {name: str(arg.ty.dtype) for name, arg in zip(names, args, strict=True)}
        try:
            with warnings.catch_warnings():  # the island's outputs declare no shape: fine here
                warnings.simplefilter("ignore", UserWarning)
                imported = from_onnx(
                    model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False
                )
        except Exception as exc:  # TVM's importer raises whatever its op converters raise
            ops = ", ".join(n.op_type for n in op.nodes)
            raise UnsupportedModelError(
                f"TVM cannot import the float island [{ops}]: {exc}"
            ) from exc
        self.island_count += 1
        prefix = f"dq_float_island_{self.island_count}"
        # The importer may emit helpers beside main (a Pad becomes a TIR PrimFunc that main
        # calls with call_tir): each joins the module under a name unique to this island.
        renamed = {
            gv.name_hint: self.bb.add_func(helper, f"{prefix}_{gv.name_hint}")
            for gv, helper in imported.functions_items()
            if gv.name_hint != "main"
        }
        func = _RenameGlobals(renamed).visit_expr(imported["main"])
        func = func.without_attr("global_symbol").without_attr("num_input")
        gv = self.bb.add_func(func, prefix)
        result = self.emit(relax.Call(gv, args))
        values = (
            [result]
            if len(op.outputs) == 1
            else [self.emit(relax.TupleGetItem(result, i)) for i in range(len(op.outputs))]
        )
        measured: dict[str, tuple[int, ...]] | None = None
        for name, value in zip(op.outputs, values, strict=True):
            # the importer turns ONNX Shape into a Relax shape value; the program's tensors
            # (and the next island's inputs) are int64 tensors
            if isinstance(value.ty, relax.ShapeType):
                dims = value.ty.values
                if dims is not None and all(isinstance(d, tvm.tirx.IntImm) for d in dims):
                    self.constants[name] = np.array([int(d) for d in dims], np.int64)
                value = self.emit(relax.op.shape_to_tensor(value))
            elif isinstance(value.ty, relax.TensorType) and not _static(value.ty):
                # the importer could not infer it (a Squeeze whose axes are an input, say);
                # every input shape is static, so one run of the island gives it
                if measured is None:
                    measured = _island_output_shapes(model, shapes, dtypes)
                ty = relax.TensorType(measured[name], str(value.ty.dtype))
                value = self.bb.match_cast(value, ty)
            self.env[name] = value


def _static(ty: relax.TensorType) -> bool:
    return ty.shape is not None and all(
        isinstance(d, tvm.tirx.IntImm) for d in getattr(ty.shape, "values", None) or [None]
    )


def _island_output_shapes(
    model: onnx.ModelProto, shapes: dict[str, list[int]], dtypes: dict[str, str]
) -> dict[str, tuple[int, ...]]:
    """Each island output's shape, from one onnxruntime run on zeros of the inputs' static
    shapes (the island's ops have static output shapes for static inputs, or TVM could not
    lower them either)."""
    from dyadiq.ort_sessions import Kernels, open_session

    session = open_session(model, kernels=Kernels.EXACT, threads=1)
    feeds = {name: np.zeros(shapes[name], dtypes[name]) for name in shapes}
    names = [o.name for o in session.get_outputs()]
    return {n: tuple(v.shape) for n, v in zip(names, session.run(names, feeds), strict=True)}


@relax.expr_functor.mutator
class _RenameGlobals(relax.PyExprMutator):
    """Point references to an imported module's functions at their new global vars."""

    def __init__(self, renamed: dict[str, relax.GlobalVar]) -> None:
        super().__init__()
        self.renamed = renamed

    def visit_global_var_(self, op: relax.GlobalVar) -> relax.Expr:
        return self.renamed.get(op.name_hint, op)


def _lowering_for(
    program: ip.IntegerProgram, bb: relax.BlockBuilder, target: tvm.target.Target | None
) -> _Lowering:
    if target is not None:
        # imported here: the x86 lowering subclasses _Lowering
        from dyadiq.backends.tvm.lower_x86 import X86Lowering, has_avx2, has_vnni

        if has_vnni(target) or has_avx2(target):
            return X86Lowering(program, bb, vnni=has_vnni(target))
    lowering = _Lowering(program, bb)
    # a GPU PrimFunc needs thread bindings, which dlight adds to Relax-op kernels only
    lowering.scalar_kernels = target is None or target.kind.name == "llvm"
    return lowering


def lower_program(
    program: ip.IntegerProgram,
    *,
    batch: int = 1,
    target: tvm.target.Target | None = None,
    float_islands: bool = False,
) -> IRModule:
    """The Relax module whose ``main`` computes ``program`` (see the module docstring).

    ``batch`` replaces a dynamic batch dimension (0 in the program's shapes). Without a
    ``target`` the module is portable (NCHW Relax ops, scheduled later); for an x86 target
    with AVX2 or AVX-512 VNNI the heavy layers become hand-written channels-last kernels
    (:mod:`dyadiq.backends.tvm.lower_x86`), which compute the same codes.
    """
    missing = unsupported_ops(program, float_islands=float_islands)
    if missing:
        raise UnsupportedModelError(
            f"the TVM backend lowers integer ops only; {len(missing)} op(s) have no lowering: "
            + "; ".join(missing)
            + ". Quantize these layers (or exclude the model from the TVM backend)."
        )
    bb = relax.BlockBuilder()
    params = [
        relax.Var(name, relax.TensorType(static_shape(shape, batch), str(np.dtype(dtype))))
        for name, (dtype, shape) in program.inputs.items()
    ]
    lowering = _lowering_for(program, bb, target)
    lowering.env.update(zip(program.inputs, params, strict=True))
    with bb.function("main", params):
        with bb.dataflow():
            for op in program.ops:
                lowering.visit(op)
            codes = [
                lowering.value(program.int_outputs[o])
                for o in program.outputs
                if o in program.int_outputs
            ]
            floats = [lowering.value(o) for o in program.outputs]
            result = bb.emit_output(relax.Tuple(codes + floats))
        bb.emit_func_output(result)
    return bb.get()
