"""Channels-last lowering with hand-written kernels for x86 CPUs with AVX2 or AVX-512 VNNI.

The portable lowering (:mod:`dyadiq.backends.tvm.lower`) emits NCHW Relax convolutions; on a
CPU their loop nests cannot use integer dot-product instructions and depthwise layers read
memory with a channel stride. This lowering keeps 4-D activations channels-last (NHWC) between
layers and emits:

* every group-1 convolution as one :func:`~dyadiq.backends.tvm.x86_kernels.packed_matmul`:
  directly on the ``[B*H*W, C]`` view for a 1x1 stride-1 convolution, after an
  :func:`~dyadiq.backends.tvm.x86_kernels.im2col_nhwc` otherwise;
* every depthwise convolution as :func:`~dyadiq.backends.tvm.x86_kernels.depthwise_nhwc`;
* every dense layer (MatMul with a constant weight) as a packed matmul;
* residual adds of same-shape tensors as :func:`~dyadiq.backends.tvm.x86_kernels.residual_add`;
* clips, max pools, global average pools and elementwise Max / Min in NHWC (portable Relax
  ops on the other axis order), so no transposes sit between those layers.

A tensor is converted between layouts only where an op needs the other one, once, and the
program's outputs are returned NCHW, so ``main`` has the portable lowering's signature and
results. Whatever a kernel cannot take (grouped convolutions, K not a multiple of 4 at a
dense layer, an accumulator that could overflow int32) falls back to the portable op.

The matmul's dot product follows the CPU (:class:`~dyadiq.backends.tvm.x86_kernels.DotProduct`):
``vpdpbusd`` with AVX-512 VNNI; on AVX2, ``vpmaddubsw`` where a layer's weights make its int16
pair sums provably exact (every weight of 7 bits or fewer), else ``vpmaddwd`` on codes widened
to int16. The AVX2 forms are what onnxruntime's u8 x s8 kernels lack: they never saturate.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from dyadiq import integer_program as ip
from dyadiq.backends.tvm import x86_kernels as kernels
from dyadiq.backends.tvm.lower import INT32_LIMIT, _Lowering

_TO_NHWC = [0, 2, 3, 1]
_TO_NCHW = [0, 3, 1, 2]
# the largest unsigned code VNNI multiplies by (int8 codes are flipped to code + 128)
_LARGEST_UNSIGNED_CODE = 255


def _has_feature(target: tvm.target.Target, feature: str) -> bool:
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686")):
        return False
    try:
        return bool(tvm.target.codegen.target_has_features(feature, target))
    except tvm.TVMError:  # not an x86 LLVM target
        return False


def has_vnni(target: tvm.target.Target) -> bool:
    """Whether ``target`` is an LLVM x86 target whose CPU has AVX-512 VNNI."""
    return _has_feature(target, "avx512vnni")


def has_avx2(target: tvm.target.Target) -> bool:
    """Whether ``target`` is an LLVM x86 target whose CPU has AVX2."""
    return _has_feature(target, "avx2")


def _pads(op: ip.Conv) -> tuple[int, int, int, int]:
    top, left, bottom, right = (int(p) for p in op.pads)
    return top, left, bottom, right


class X86Lowering(_Lowering):
    """:class:`_Lowering` with channels-last x86 kernels (see the module docstring)."""

    def __init__(self, program: ip.IntegerProgram, bb: relax.BlockBuilder, *, vnni: bool) -> None:
        super().__init__(program, bb)
        self.vnni = vnni
        self.dot_products: dict[str, int] = {}  # kernels per DotProduct name, for reports
        self.nhwc: dict[str, relax.Expr] = {}  # tensors held channels-last
        self.kernel_count = 0

    # --- layouts -----------------------------------------------------------------------------
    def value(self, name: str) -> relax.Expr:
        if name not in self.env and name in self.nhwc:
            self.env[name] = self.emit(relax.op.permute_dims(self.nhwc[name], _TO_NCHW))
        return self.env[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.nhwc and name not in self.env:
            b, h, w, c = (int(d) for d in self.nhwc[name].ty.shape)
            return (b, c, h, w)
        return super().shape(name)

    def channels_last(self, name: str) -> relax.Expr:
        if name not in self.nhwc:
            self.nhwc[name] = self.emit(relax.op.permute_dims(self.value(name), _TO_NHWC))
        return self.nhwc[name]

    def keep_channels_last(self, output: str) -> None:
        """Move the NHWC value a base-class helper bound to ``output`` into ``nhwc``."""
        self.nhwc[output] = self.env.pop(output)

    # --- kernels -----------------------------------------------------------------------------
    def call_kernel(
        self, func: tvm.tirx.PrimFunc, args: list[relax.Expr], shape: tuple[int, ...], dtype: str
    ) -> relax.Var:
        self.kernel_count += 1
        gv = self.bb.add_func(func, f"dq_x86_kernel_{self.kernel_count}")
        return self.emit(relax.call_tir(gv, args, relax.TensorType(shape, dtype)))

    def epilogue_args(self, epilogue: kernels.Epilogue, n: int) -> list[relax.Expr]:
        mult, bias, shift = epilogue.kernel_args(n)
        return [relax.const(mult, "int32"), relax.const(bias, "int64"), relax.const(shift, "int64")]

    def epilogue(
        self, rq: ip.Requant, channels: int, offset: np.ndarray, output: str
    ) -> kernels.Epilogue:
        return kernels.Epilogue.per_channel(
            channels,
            offset,
            rq.mult,
            rq.shift,
            zero_point=rq.zero_point,
            lo=rq.lo,
            hi=rq.hi,
            out_dtype=self.code_dtype(output),
        )

    def matmul_kernel(
        self,
        a: relax.Expr,
        weight: np.ndarray,
        bias: np.ndarray | None,
        zero_point: int,
        rq: ip.Requant,
        output: str,
        out_shape: tuple[int, ...] | None = None,
    ) -> relax.Var:
        """``requant((a - z) @ weight.T + bias)`` for codes ``a [..., K]`` read as ``[M, K]``,
        ``weight [N, K]``; the result has ``out_shape`` (default ``[M, N]``)."""
        in_shape = tuple(int(d) for d in a.ty.shape)
        n = weight.shape[0]
        in_dtype = str(a.ty.dtype)
        isa = self.dot_product(weight)
        self.dot_products[isa.name] = self.dot_products.get(isa.name, 0) + 1
        # an instruction that sees int8 codes as code + 128 moves the zero point with them
        effective_zero = zero_point + (128 if in_dtype == "int8" and isa.flips_int8 else 0)
        offset = -effective_zero * weight.astype(np.int64).sum(axis=1)
        if bias is not None:
            offset = offset + bias.astype(np.int64)
        epilogue = self.epilogue(rq, n, offset, output)
        out_shape = out_shape or (int(np.prod(in_shape[:-1])), n)
        func = kernels.packed_matmul(in_shape, n, in_dtype, epilogue, out_shape, isa)
        packed = relax.const(kernels.pack_weight(weight, isa), isa.weight_dtype)
        npad = -(-n // isa.lanes) * isa.lanes
        return self.call_kernel(
            func, [a, packed, *self.epilogue_args(epilogue, npad)], out_shape, epilogue.out_dtype
        )

    def dot_product(self, weight_rows: np.ndarray) -> kernels.DotProduct:
        """The fastest exact dot product for a layer's weights ``[N, K]`` on this CPU."""
        if self.vnni:
            return kernels.VNNI
        if kernels.AVX2_BYTES.exact_for(weight_rows):
            return kernels.AVX2_BYTES
        return kernels.AVX2_WIDE

    def fits_int32(self, weight_rows: np.ndarray) -> bool:
        """Whether the int32 accumulator holds ``sum code * w`` for any u8 codes (the widest
        view any dot product takes: VNNI's and vpmaddubsw's flipped codes)."""
        bound = _LARGEST_UNSIGNED_CODE * int(np.abs(weight_rows.astype(np.int64)).sum(axis=1).max())
        return bound <= INT32_LIMIT

    # --- ops ---------------------------------------------------------------------------------
    def visit_Conv(self, op: ip.Conv) -> None:
        weight = op.weight.astype(np.int8)
        if weight.ndim != 4 or len(self.shape(op.input)) != 4:
            return super().visit_Conv(op)
        out_channels, per_group, kh, kw = weight.shape
        in_channels = self.shape(op.input)[1]
        depthwise = op.group == in_channels == out_channels and per_group == 1
        if (op.group != 1 and not depthwise) or not self.fits_int32(
            weight.reshape(out_channels, -1)
        ):
            return super().visit_Conv(op)
        x = self.channels_last(op.input)
        b, h, w, _ = (int(d) for d in x.ty.shape)
        sh, sw = op.strides
        dh, dw = op.dilations
        if depthwise:
            self.depthwise(op, x, weight)
            return
        z = op.input_zero_point
        in_dtype = str(x.ty.dtype)
        if (
            kh == kw == 1
            and sh == sw == 1
            and not any(op.pads)
            and in_channels % kernels.GROUP == 0
        ):
            oh, ow = h, w
            a = x  # the matmul reads [B, H, W, C] as [B*H*W, C]
            rows = weight.reshape(out_channels, in_channels)
        else:
            func, c4, (oh, ow) = kernels.im2col_nhwc(
                (b, h, w, in_channels), in_dtype, (kh, kw), (sh, sw), (dh, dw), _pads(op), z
            )
            a = self.call_kernel(func, [x], (b * oh * ow, kh * kw * c4), in_dtype)
            # weight rows in (kh, kw, c) order, zero for the channels im2col pads to c4
            taps = np.zeros((out_channels, kh, kw, c4), np.int8)
            taps[..., :in_channels] = weight.transpose(0, 2, 3, 1)
            rows = taps.reshape(out_channels, -1)
        self.nhwc[op.output] = self.matmul_kernel(
            a, rows, op.bias, z, op.requant, op.output, (b, oh, ow, out_channels)
        )

    def depthwise(self, op: ip.Conv, x: relax.Expr, weight: np.ndarray) -> None:
        channels, _, kh, kw = weight.shape
        b, h, w, _ = (int(d) for d in x.ty.shape)
        taps = np.ascontiguousarray(weight[:, 0].transpose(1, 2, 0))  # [KH, KW, C]
        offset = -op.input_zero_point * taps.astype(np.int64).reshape(-1, channels).sum(0)
        if op.bias is not None:
            offset = offset + op.bias.astype(np.int64)
        epilogue = self.epilogue(op.requant, channels, offset, op.output)
        func, (oh, ow) = kernels.depthwise_nhwc(
            (b, h, w, channels),
            (kh, kw),
            (int(op.strides[0]), int(op.strides[1])),
            (int(op.dilations[0]), int(op.dilations[1])),
            _pads(op),
            str(x.ty.dtype),
            op.input_zero_point,
            epilogue,
        )
        args = [x, relax.const(taps, "int8"), *self.epilogue_args(epilogue, channels)]
        self.nhwc[op.output] = self.call_kernel(
            func, args, (b, oh, ow, channels), epilogue.out_dtype
        )

    def visit_MaxPool(self, op: ip.MaxPool) -> None:
        if op.input not in self.nhwc:
            return super().visit_MaxPool(op)
        # same argument as the portable lowering: every window holds a real element
        self.nhwc[op.output] = self.emit(
            relax.op.nn.max_pool2d(
                self.nhwc[op.input],
                pool_size=tuple(op.kernel),
                strides=tuple(op.strides),
                padding=tuple(op.pads),
                layout="NHWC",
            )
        )

    def visit_MatMul(self, op: ip.MatMul) -> None:
        if op.weight is None:
            return super().visit_MatMul(op)
        weight = op.weight.astype(np.int8)
        shape = self.shape(op.input)
        k, n = weight.shape
        if k % kernels.GROUP or not self.fits_int32(weight.T):
            return super().visit_MatMul(op)
        rows = np.ascontiguousarray(weight.T)
        self.env[op.output] = self.matmul_kernel(
            self.value(op.input),
            rows,
            op.bias,
            op.input_zero_point,
            op.requant,
            op.output,
            (*shape[:-1], n),
        )

    def visit_Add(self, op: ip.Add) -> None:
        if not all(name in self.nhwc for name in op.inputs):
            return super().visit_Add(op)
        a, b = (self.nhwc[name] for name in op.inputs)
        shape = tuple(int(d) for d in a.ty.shape)
        if tuple(int(d) for d in b.ty.shape) != shape:  # broadcasting: the portable ops
            centered = [
                self.centered_value(self.nhwc[name], zp)
                for name, zp in zip(op.inputs, op.zero_points, strict=True)
            ]
            total = self.residual_sum(op, centered, 4, 3)
            self.finish(total, op.zero_point, op.lo, op.hi, op.output)
            self.keep_channels_last(op.output)
            return
        constants = kernels.ResidualAdd(
            op.mults, op.shifts, op.zero_points, op.zero_point, op.lo, op.hi, op.single_rounding
        )
        out_dtype = self.code_dtype(op.output)
        func = kernels.residual_add(shape, (str(a.ty.dtype), str(b.ty.dtype)), out_dtype, constants)
        self.nhwc[op.output] = self.call_kernel(func, [a, b], shape, out_dtype)

    def visit_Clip(self, op: ip.Clip) -> None:
        if op.input not in self.nhwc:
            return super().visit_Clip(op)
        self.nhwc[op.output] = self.emit(relax.op.clip(self.nhwc[op.input], op.lo, op.hi))

    def visit_GlobalAvgPool(self, op: ip.GlobalAvgPool) -> None:
        if op.input not in self.nhwc:
            return super().visit_GlobalAvgPool(op)
        v = self.centered_value(self.nhwc[op.input], op.input_zero_point)
        total = self.emit(relax.op.sum(v, axis=[1, 2], keepdims=True))
        rq = op.requant
        scaled = self.requantize(total, rq.mult, rq.shift, 4, 3)
        self.finish(scaled, rq.zero_point, rq.lo, rq.hi, op.output)
        b, _, _, c = (int(d) for d in self.env[op.output].ty.shape)
        # [B, 1, 1, C] and [B, C, 1, 1] are the same bytes: a reshape, not a transpose
        self.env[op.output] = self.emit(relax.op.reshape(self.env[op.output], (b, c, 1, 1)))

    def visit_Max(self, op: ip.Max) -> None:
        if not all(name in self.nhwc for name in op.inputs):
            return super().visit_Max(op)
        # both 4-d and channels-last: NCHW broadcasting carries over axis for axis
        a, b = (self.nhwc[name] for name in op.inputs)
        self.nhwc[op.output] = self.emit(relax.op.maximum(a, b))

    def visit_Min(self, op: ip.Min) -> None:
        if not all(name in self.nhwc for name in op.inputs):
            return super().visit_Min(op)
        a, b = (self.nhwc[name] for name in op.inputs)
        self.nhwc[op.output] = self.emit(relax.op.minimum(a, b))
