"""Self-contained C for microcontrollers from an :class:`IntegerProgram`.

The emitted project has no runtime and no malloc: ``model.c`` holds every weight as a ``const``
array (codes of 4 bits or fewer packed two per byte, low nibble first; wider codes as int8),
one ``const`` parameter struct per op, and ``dq_model_run`` calls the kernels of
``dq_kernels.c`` in program order on one static arena laid out by :mod:`arena`. The
kernels implement the reference interpreter's semantics exactly (int32 accumulation, int64
dyadic requantization with a floor shift), so the device's output codes equal the reference's.

API of the generated code (``model.h``)::

    void dq_model_quantize_input(const float *x, uint8_t *codes);   /* QuantizeInput */
    int dq_model_run(const uint8_t *codes, uint8_t *output_codes);  /* 0 on success */

Codes are bytes: a signed (int8) code is stored as its two's complement byte. The outputs are
the integer codes of the model outputs, concatenated in ``program.outputs`` order; the host
dequantizes them (``(code - z) * s``), as the program's final Dequantize ops do.

Elementwise ops whose output byte is a function of the input byte alone (HardSwish,
HardSigmoid, LeakyRelu with per-tensor constants, Clip) become a 256-byte lookup table computed
by the reference interpreter, when the tensor is large enough for the table to pay off.

Two folds keep the hot loops short and change no result: for 1x1 convolutions and constant
matrix products the input zero point is folded into the bias (``bias - z * sum(w)``, exact in
int32 because there is no padding), and signed inputs are read as ``(b ^ 0x80) - (z + 128)``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dyadiq import integer_program as ip
from dyadiq.errors import ConfigError, UnsupportedModelError
from dyadiq.int_op_visitor import IntOpVisitor
from dyadiq.io import write_text_atomic
from dyadiq.reference_interpreter import ReferenceInterpreter

from .arena import ArenaPlan, plan_arena, static_shape
from .float_c import (
    IslandEmitter,
    island_output_dtype,
    island_problems,
    model_input_problems,
    quantize_problems,
    raw_input_copy,
    with_float_shapes,
)
from .transformer_c import TransformerKernels, embedding_flash_bytes
from .transpose_rank import collapse_transpose

TEMPLATES = Path(__file__).resolve().parent / "templates"
KERNEL_SOURCES = ("dq_kernels.c", "dq_kernels.h", "startup.c", "harness.c", "size_probe.c")
PACKED_BITS = 4  # weights of at most this many bits are stored two per byte
INT32 = (-(2**31), 2**31 - 1)
IM2COL_MIN_CHANNELS = 4  # DQ_IM2COL_MIN_CHANNELS of dq_kernels.c
LOOKUP_MIN_ELEMENTS = 1024  # a 256-byte table in flash pays for itself from here on
PROFILE_HOOK = """#if defined(DQ_PROFILE) /* per-op cost: the harness reads the clock after ops */
void dq_profile_step(int32_t step, const char *op);
#define DQ_PROFILE_STEP(step, op) dq_profile_step(step, op)
#else
#define DQ_PROFILE_STEP(step, op) ((void)0)
#endif

"""


@dataclass(frozen=True)
class LayerFlash:
    """Constant bytes one weighted op puts in flash (what a flash budget constrains)."""

    op: str  # "op<i>": the op's index in program.ops, also its C names' prefix
    weight_bits: int
    weight_bytes: int
    bias_bytes: int
    requant_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.bias_bytes + self.requant_bytes


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    signed: bool
    scale: float
    zero_point: int
    values: str | None = None  # a numpy dtype name: raw values (a float island's), not codes
    bits: int = 8  # codes wider than 8 bits are int32 (a wide residual stream, an embedding)

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def dtype(self) -> np.dtype:
        if self.values is not None:
            return np.dtype(self.values)
        if self.bits > 8:
            return np.dtype(np.int32)
        return np.dtype(np.int8 if self.signed else np.uint8)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


@dataclass(frozen=True)
class McuProject:
    out_dir: Path
    cpu: str
    input: TensorSpec  # the codes dq_model_run reads (float input quantized by the device)
    outputs: list[TensorSpec]  # code tensors, in program.outputs order
    arena: ArenaPlan
    scratch_bytes: int
    layers: list[LayerFlash] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def weight_flash_bytes(self) -> int:
        return sum(layer.total for layer in self.layers)

    def decode_outputs(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        """Split ``[n, output_bytes]`` device output into code arrays ``[n, *shape]``."""
        raw = np.asarray(raw, dtype=np.uint8).reshape(-1, self.output_bytes)
        decoded, start = {}, 0
        for spec in self.outputs:
            chunk = raw[:, start : start + spec.nbytes].copy().view(spec.dtype)
            decoded[spec.name] = chunk.reshape((raw.shape[0], *spec.shape))
            start += spec.nbytes
        return decoded


def pack_weights(rows: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[out channels, length]`` as stored: int8, or, for 4 bits and fewer, two
    two's complement nibbles per byte (low nibble first), each row starting on a byte."""
    codes = np.asarray(rows, dtype=np.int64)
    if bits > PACKED_BITS:
        return codes.reshape(-1).astype(np.int8)
    limit = 2 ** (bits - 1)
    if codes.size and (codes.min() < -limit or codes.max() >= limit):
        raise UnsupportedModelError(f"weight codes exceed {bits} bits")
    nibbles = (codes & 0xF).astype(np.uint8)
    if nibbles.shape[1] % 2:
        nibbles = np.pad(nibbles, ((0, 0), (0, 1)))
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).reshape(-1).astype(np.uint8)


def _check_dyadic(tag: str, mult: np.ndarray | int, shift: np.ndarray | int) -> None:
    """The kernels store m as int32 and rely on 0 <= k <= 31 (as :func:`dyadic` makes them)."""
    m, k = np.atleast_1d(mult), np.atleast_1d(shift)
    if m.min() < 0 or m.max() > INT32[1] or k.min() < 0 or k.max() > 31:
        raise UnsupportedModelError(f"{tag}: dyadic multiplier outside int32 m, 0 <= k <= 31")


def _c_array(ctype: str, name: str, values: np.ndarray) -> str:
    items = [str(int(v)) for v in np.asarray(values).reshape(-1)] or ["0"]
    lines = [", ".join(items[i : i + 24]) for i in range(0, len(items), 24)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{len(items)}] = {{\n    {body}\n}};\n"


def _float_literal(value: float) -> str:
    return float(np.float32(value)).hex() + "f"  # exact float32 value


def _struct(fields: Mapping[str, object]) -> str:
    return "{" + ", ".join(f".{k} = {v}" for k, v in fields.items()) + "}"


def _prod(values: tuple[int, ...] | list[int]) -> int:
    return int(np.prod(values, dtype=np.int64))


class _Emitter(IntOpVisitor[None]):
    """Each ``visit_<Op>`` appends the op's constants to ``decls`` and its kernel call to
    ``calls``; the ops it has a method for are the ones the microcontroller backend runs."""

    def __init__(self, program: ip.IntegerProgram, arena: ArenaPlan, pack_int4: bool) -> None:
        self.program = program
        self.arena = arena
        self.pack_int4 = pack_int4
        self.decls: list[str] = []
        self.calls: list[str] = []
        self.layers: list[LayerFlash] = []
        # (C type, shape, digest of the stored bytes) -> the const array that holds them
        self.weight_arrays: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self.scratch = 1
        self.tag = ""
        self.input_offsets: dict[str, int] = {}  # several raw inputs: one after another
        offset = 0
        for name, (dtype, shape) in program.inputs.items() if len(program.inputs) > 1 else ():
            self.input_offsets[name] = offset
            offset += _prod([max(d, 1) for d in shape]) * np.dtype(dtype).itemsize
        self.islands = IslandEmitter(program, arena, self.decls, self.calls, self.ref)
        self.transformer = TransformerKernels(program, self.decls, self.calls, self.ref)

    # --- tensors -----------------------------------------------------------------------------
    def shape(self, tensor: str) -> tuple[int, ...]:
        return static_shape(self.program, tensor)

    def signed(self, tensor: str) -> bool:
        return self.program.quant[tensor].signed

    def decode(self, tensor: str, zero_point: int) -> tuple[int, int]:
        """(flip, zero) that turn a stored byte into ``code - zero_point``."""
        return (0x80, zero_point + 128) if self.signed(tensor) else (0, zero_point)

    def ref(self, tensor: str) -> str:
        if tensor in self.arena.external:
            offset = self.input_offsets.get(tensor, 0)  # several raw inputs: one buffer
            return f"(input + {offset})" if offset else "input"
        return f"(dq_arena + {self.arena.offset_of(tensor)})"

    # --- constants ---------------------------------------------------------------------------
    def requant(self, tag: str, rq: ip.Requant, channels: int) -> str:
        mult = np.atleast_1d(rq.mult).astype(np.int64)
        shift = np.atleast_1d(rq.shift).astype(np.int64)
        _check_dyadic(tag, mult, shift)
        if mult.size not in (1, channels) or shift.size != mult.size:
            raise UnsupportedModelError(
                f"{tag}: requant has {mult.size} multipliers for {channels} channels"
            )
        self.decls.append(_c_array("int32_t", f"{tag}_m", mult))
        self.decls.append(_c_array("int8_t", f"{tag}_k", shift))
        return _struct(
            {
                "mult": f"{tag}_m",
                "shift": f"{tag}_k",
                "per_channel": int(mult.size > 1),
                "zero_point": rq.zero_point,
                "lo": rq.lo,
                "hi": rq.hi,
            }
        )

    def weights(
        self, tag: str, rows: np.ndarray, bits: int, bias: np.ndarray, rq: ip.Requant
    ) -> str:
        """Weights [out, taps] (packed) and the int32 bias; records the layer's flash bytes."""
        if bias.min(initial=0) < INT32[0] or bias.max(initial=0) > INT32[1]:
            raise UnsupportedModelError(f"{tag}: folded bias overflows int32")
        packed_layout = bits <= PACKED_BITS and self.pack_int4
        packed = pack_weights(rows, bits if packed_layout else 8)
        ctype = "uint8_t" if packed_layout else "int8_t"
        # ops that multiply by the same codes (layers reading one weight initializer, the
        # steps of an unrolled LSTM) read one const array; its flash is counted once
        key = (ctype, packed.shape, hashlib.sha256(packed.tobytes()).digest())
        stored = self.weight_arrays.get(key)
        if stored is None:
            stored = self.weight_arrays[key] = f"{tag}_w"
            self.decls.append(_c_array(ctype, stored, packed))
        weight_bytes = packed.size if stored == f"{tag}_w" else 0
        self.decls.append(_c_array("int32_t", f"{tag}_b", bias))
        rq_bytes = 5 * int(np.size(rq.mult))  # int32 multiplier + int8 shift each
        self.layers.append(LayerFlash(tag, bits, weight_bytes, 4 * bias.size, rq_bytes))
        if packed_layout:
            self.scratch = max(self.scratch, rows.shape[1])  # an unpacked row
        return _struct({"data": stored, "bits": 4 if packed_layout else 8})

    def param(self, ctype: str, tag: str, fields: Mapping[str, object]) -> str:
        self.decls.append(f"static const {ctype} {tag} = {_struct(fields)};\n")
        return f"&{tag}"

    # --- ops ---------------------------------------------------------------------------------
    def emit(self, step: int, op: ip.IntOp) -> None:
        self.tag = f"op{step}"  # the prefix of the op's C names
        before = len(self.calls)
        self.visit(op)
        if len(self.calls) > before:
            self.calls.append(f'DQ_PROFILE_STEP({step}, "{type(op).__name__}");')

    def visit_QuantizeInput(self, op: ip.QuantizeInput) -> None:
        """The caller quantizes the input (``dq_model_quantize_input``): no kernel call."""

    def visit_Dequantize(self, op: ip.Dequantize) -> None:
        """The host dequantizes the output codes ``dq_model_run`` copies out; a Dequantize
        into a float island runs here (:mod:`.float_c`)."""
        if op.output not in self.program.outputs:
            self.islands.dequantize(op)

    def visit_FloatIsland(self, op: ip.FloatIsland) -> None:
        self.islands.island(op, self.tag)

    def visit_Quantize(self, op: ip.Quantize) -> None:
        self.islands.quantize(op)

    def visit_Reshape(self, op: ip.Reshape) -> None:
        """The output aliases the input's bytes (:mod:`arena`): no kernel call."""

    def visit_Conv(self, op: ip.Conv) -> None:
        tag = self.tag
        n, cin, h, w = self.shape(op.input)
        _, cout, oh, ow = self.shape(op.output)
        kh, kw = op.weight.shape[2:]
        flip, zero = self.decode(op.input, op.input_zero_point)
        rows = op.weight.reshape(cout, -1).astype(np.int64)
        bias = np.zeros(cout, np.int64) if op.bias is None else op.bias.astype(np.int64)
        pointwise = (
            (kh, kw) == (1, 1) and op.group == 1 and tuple(op.strides) == (1, 1)
        ) and not any(op.pads)
        if pointwise:
            bias = bias - zero * rows.sum(axis=1)
        rq = self.requant(tag, op.requant, cout)
        weights = self.weights(tag, rows, op.weight_bits, bias, op.requant)
        fields: dict[str, object] = {
            "n": n, "cin": cin, "h": h, "w": w, "cout": cout, "oh": oh, "ow": ow,
            "kh": kh, "kw": kw, "sh": op.strides[0], "sw": op.strides[1],
            "dh": op.dilations[0], "dw": op.dilations[1],
            "pad_top": op.pads[0], "pad_left": op.pads[1], "group": op.group,
            "flip": flip, "zero": zero, "weights": weights, "bias": f"{tag}_b", "rq": rq,
        }  # fmt: skip
        p = self.param("dq_conv", tag, fields)
        kernel = "dq_conv1x1" if pointwise else "dq_conv2d"
        if op.group == cin == cout:  # int32 accumulators of one output row + a weight row
            self.scratch = max(self.scratch, 4 * ow + rows.shape[1])
        elif not pointwise and cout // op.group >= IM2COL_MIN_CHANNELS:
            self.scratch = max(self.scratch, 2 * rows.shape[1])  # an int16 im2col column
            int4_sum_bound = rows.shape[1] * 255 * 8 * 16  # dq_dot_int4 sums 16 x the products
            if op.weight_bits <= PACKED_BITS and int4_sum_bound >= 2**31:
                raise UnsupportedModelError(f"{tag}: {rows.shape[1]} taps overflow int4 SMLAD")
        refs = f"{self.ref(op.input)}, {self.ref(op.output)}"
        self.calls.append(f"{kernel}({p}, {refs}, dq_scratch);")

    def visit_MatMul(self, op: ip.MatMul) -> None:
        tag = self.tag
        a_shape, out_shape = self.shape(op.input), self.shape(op.output)
        if op.weight is None:
            self.matmul_activations(tag, op, a_shape, out_shape)
            return
        k, cols = op.weight.shape
        flip, zero = self.decode(op.input, op.input_zero_point)
        rows = op.weight.T.astype(np.int64)  # [cols][k]: one contiguous row per output column
        bias = np.zeros(cols, np.int64) if op.bias is None else op.bias.astype(np.int64)
        bias = bias - zero * rows.sum(axis=1)
        rq = self.requant(tag, op.requant, cols)
        weights = self.weights(tag, rows, op.weight_bits, bias, op.requant)
        fields = {"rows": _prod(a_shape[:-1]), "k": k, "cols": cols, "flip": flip,
                  "weights": weights, "bias": f"{tag}_b", "rq": rq}  # fmt: skip
        p = self.param("dq_matmul", tag, fields)
        self.calls.append(
            f"dq_matmul_const({p}, {self.ref(op.input)}, {self.ref(op.output)}, dq_scratch);"
        )

    def matmul_activations(
        self, tag: str, op: ip.MatMul, a_shape: tuple[int, ...], out_shape: tuple[int, ...]
    ) -> None:
        assert op.weight_input is not None
        b_shape = self.shape(op.weight_input)
        m, k = a_shape[-2:]
        n = b_shape[-1]
        batch, b_batch = _prod(a_shape[:-2]), _prod(b_shape[:-2])
        if b_batch not in (1, batch) or len(a_shape) < 2 or len(b_shape) < 2:
            raise UnsupportedModelError(f"{op.output}: MatMul broadcast {a_shape} x {b_shape}")
        a_flip, a_zero = self.decode(op.input, op.input_zero_point)
        b_flip, b_zero = self.decode(op.weight_input, op.weight_zero_point)
        fields = {"batch": batch, "m": m, "k": k, "n": n, "a_flip": a_flip, "a_zero": a_zero,
                  "b_flip": b_flip, "b_zero": b_zero, "a_batch_stride": m * k,
                  "b_batch_stride": k * n if b_batch == batch and batch > 1 else 0,
                  "rq": self.requant(tag, op.requant, n)}  # fmt: skip
        p = self.param("dq_matmul_act", tag, fields)
        refs = f"{self.ref(op.input)}, {self.ref(op.weight_input)}, {self.ref(op.output)}"
        self.calls.append(f"dq_matmul_activations({p}, {refs});")

    def binary_layout(
        self, inputs: tuple[str, str], zero_points: tuple[int, int], output: str
    ) -> dict[str, object]:
        """The ``dq_binary`` fields every two-input kernel reads: the output shape padded to
        rank 4, each input's broadcast strides and byte decoding."""
        out = self.shape(output)
        if len(out) > 4:
            raise UnsupportedModelError(f"{output}: elementwise ops of rank > 4")
        pad = 4 - len(out)
        shape4 = (1,) * pad + out
        strides = [self.broadcast_strides(name, out, pad) for name in inputs]
        (a_flip, a_zero), (b_flip, b_zero) = (
            self.decode(name, z) for name, z in zip(inputs, zero_points, strict=True)
        )
        return {
            "shape": "{" + ", ".join(map(str, shape4)) + "}",
            "a_stride": "{" + ", ".join(map(str, strides[0])) + "}",
            "b_stride": "{" + ", ".join(map(str, strides[1])) + "}",
            "a_flip": a_flip, "a_zero": a_zero, "b_flip": b_flip, "b_zero": b_zero,
        }  # fmt: skip

    def binary(self, op: ip.Add | ip.Mul) -> None:
        tag = self.tag
        out = self.shape(op.output)
        pad = 4 - len(out)
        fields = self.binary_layout(op.inputs, op.zero_points, op.output)
        if isinstance(op, ip.Add):
            _check_dyadic(tag, np.array(op.mults), np.array(op.shifts))
            bounds = _struct({"zero_point": op.zero_point, "lo": op.lo, "hi": op.hi})
            fields.update(a_mult=op.mults[0], a_shift=op.shifts[0], b_mult=op.mults[1],
                          b_shift=op.shifts[1], single_rounding=int(op.single_rounding),
                          channel_dim=0, rq=bounds)  # fmt: skip
            kernel = "dq_add"
        else:
            axis = op.requant.axis % len(out)
            fields.update(channel_dim=axis + pad, rq=self.requant(tag, op.requant, out[axis]))
            kernel = "dq_mul"
        p = self.param("dq_binary", tag, fields)
        a, b = (self.ref(name) for name in op.inputs)
        self.calls.append(f"{kernel}({p}, {a}, {b}, {self.ref(op.output)});")

    visit_Add = visit_Mul = binary

    def extremum(self, op: ip.Max | ip.Min) -> None:
        # zero point 0 decodes a byte to its code (128 for signed tensors, as in Clip)
        fields = self.binary_layout(op.inputs, (0, 0), op.output)
        p = self.param("dq_binary", self.tag, fields)
        kernel = "dq_max" if isinstance(op, ip.Max) else "dq_min"
        a, b = (self.ref(name) for name in op.inputs)
        self.calls.append(f"{kernel}({p}, {a}, {b}, {self.ref(op.output)});")

    visit_Max = visit_Min = extremum

    def broadcast_strides(self, name: str, out: tuple[int, ...], pad: int) -> list[int]:
        shape = self.shape(name)
        if len(shape) > len(out):
            raise UnsupportedModelError(f"{name}: cannot broadcast {shape} to {out}")
        shape = (1,) * (len(out) - len(shape)) + shape
        contiguous = [_prod(shape[i + 1 :]) for i in range(len(shape))]
        strides = [
            0 if d == 1 and o != 1 else s for d, o, s in zip(shape, out, contiguous, strict=True)
        ]
        return [0] * pad + strides

    def visit_GlobalAvgPool(self, op: ip.GlobalAvgPool) -> None:
        tag = self.tag
        n, c, h, w = self.shape(op.input)
        flip, zero = self.decode(op.input, op.input_zero_point)
        fields = {"outer": n, "channels": c, "inner": h * w, "flip": flip, "zero": zero,
                  "rq": self.requant(tag, op.requant, c)}  # fmt: skip
        p = self.param("dq_unary", tag, fields)
        self.calls.append(f"dq_global_avg_pool({p}, {self.ref(op.input)}, {self.ref(op.output)});")

    def unary(self, op: ip.HardSigmoid | ip.HardSwish | ip.LeakyRelu | ip.Clip) -> None:
        tag = self.tag
        shape = self.shape(op.input)
        if _prod(shape) >= LOOKUP_MIN_ELEMENTS and _one_byte_function(op):
            self.decls.append(_c_array("uint8_t", f"{tag}_lut", lookup_table(self.program, op)))
            refs = f"{self.ref(op.input)}, {self.ref(op.output)}"
            self.calls.append(f"dq_lookup({tag}_lut, {_prod(shape)}, {refs});")
            return
        axis = 0 if isinstance(op, ip.Clip) else op.requant.axis % len(shape)
        channels = 1 if isinstance(op, ip.Clip) else shape[axis]
        fields: dict[str, object] = {
            "outer": _prod(shape[:axis]), "channels": channels, "inner": _prod(shape[axis + 1 :]),
        }  # fmt: skip
        if isinstance(op, ip.Clip):
            flip, _ = self.decode(op.input, 0)
            # zero 128 for signed tensors makes v the raw code, which Clip's bounds are in
            fields.update(flip=flip, zero=128 if flip else 0,
                          rq=_struct({"lo": op.lo, "hi": op.hi}))  # fmt: skip
            kernel = "dq_clip"
        else:
            flip, zero = self.decode(op.input, op.input_zero_point)
            if isinstance(op, ip.HardSigmoid | ip.LeakyRelu) and np.size(op.requant.mult) != 1:
                # the reference applies these multipliers without a channel axis
                raise UnsupportedModelError(f"{op.output}: per-channel {type(op).__name__}")
            fields.update(flip=flip, zero=zero, rq=self.requant(tag, op.requant, channels))
            if isinstance(op, ip.HardSigmoid):
                fields["offset"] = op.offset
                kernel = "dq_hard_sigmoid"
            elif isinstance(op, ip.HardSwish):
                _check_dyadic(tag, op.gate_mult, op.gate_shift)
                fields.update(gate_mult=int(op.gate_mult), gate_shift=int(op.gate_shift),
                              frac_bits=op.frac_bits)  # fmt: skip
                kernel = "dq_hard_swish"
            else:
                neg_m = np.atleast_1d(op.negative_mult).astype(np.int64)
                neg_k = np.atleast_1d(op.negative_shift).astype(np.int64)
                _check_dyadic(tag, neg_m, neg_k)
                if neg_m.size not in (1, channels):
                    raise UnsupportedModelError(f"{op.output}: {neg_m.size} negative slopes")
                self.decls.append(_c_array("int32_t", f"{tag}_nm", neg_m))
                self.decls.append(_c_array("int8_t", f"{tag}_nk", neg_k))
                fields.update(neg_mult=f"{tag}_nm", neg_shift=f"{tag}_nk",
                              neg_per_channel=int(neg_m.size > 1))  # fmt: skip
                kernel = "dq_leaky_relu"
        p = self.param("dq_unary", tag, fields)
        self.calls.append(f"{kernel}({p}, {self.ref(op.input)}, {self.ref(op.output)});")

    visit_HardSigmoid = visit_HardSwish = visit_LeakyRelu = visit_Clip = unary

    def visit_Lookup(self, op: ip.Lookup) -> None:
        """The program's table, reindexed by raw byte (what dq_lookup reads)."""
        tag = self.tag
        self.decls.append(_c_array("uint8_t", f"{tag}_lut", lookup_table(self.program, op)))
        refs = f"{self.ref(op.input)}, {self.ref(op.output)}"
        self.calls.append(f"dq_lookup({tag}_lut, {_prod(self.shape(op.input))}, {refs});")

    def visit_Softmax(self, op: ip.Softmax) -> None:
        tag = self.tag
        shape = self.shape(op.input)
        flip, _ = self.decode(op.input, 0)
        fields = {"rows": _prod(shape[:-1]), "len": shape[-1], "flip": flip,
                  "upscale_bits": op.upscale_bits, "ln2_codes": op.ln2_codes,
                  "b_codes": op.b_codes, "c_codes": op.c_codes, "frac_bits": op.frac_bits,
                  "rq": self.requant(tag, op.requant, shape[-1])}  # fmt: skip
        p = self.param("dq_softmax_params", tag, fields)
        self.calls.append(f"dq_softmax({p}, {self.ref(op.input)}, {self.ref(op.output)});")

    def visit_LayerNorm(self, op: ip.LayerNorm) -> None:
        self.transformer.layer_norm(op, self.tag)

    def visit_MaskedSoftmax(self, op: ip.MaskedSoftmax) -> None:
        self.transformer.masked_softmax(op, self.tag)

    def visit_Embedding(self, op: ip.Embedding) -> None:
        self.transformer.embedding(op, self.tag)
        table, total = int(op.table.size), embedding_flash_bytes(op, self.shape(op.output))
        self.layers.append(LayerFlash(self.tag, 8, table, 0, total - table))

    def visit_MaskedMeanPool(self, op: ip.MaskedMeanPool) -> None:
        self.transformer.mean_pool(op, self.tag)

    def visit_L2Normalize(self, op: ip.L2Normalize) -> None:
        self.transformer.l2_normalize(op, self.tag)

    def visit_MaxPool(self, op: ip.MaxPool) -> None:
        tag = self.tag
        n, c, h, w = self.shape(op.input)
        _, _, oh, ow = self.shape(op.output)
        if self.signed(op.input) != self.signed(op.output):
            raise UnsupportedModelError(f"{op.output}: MaxPool changes signedness")
        flip, _ = self.decode(op.input, 0)
        fill = self.program.quant[op.output].qmin + (128 if flip else 0)
        fields = {"n": n, "c": c, "h": h, "w": w, "oh": oh, "ow": ow, "kh": op.kernel[0],
                  "kw": op.kernel[1], "sh": op.strides[0], "sw": op.strides[1],
                  "pad_top": op.pads[0], "pad_left": op.pads[1], "flip": flip,
                  "fill": fill}  # fmt: skip
        p = self.param("dq_maxpool_params", tag, fields)
        self.calls.append(f"dq_maxpool({p}, {self.ref(op.input)}, {self.ref(op.output)});")

    def visit_Transpose(self, op: ip.Transpose) -> None:
        tag = self.tag
        # the same move at the lowest rank: a channel shuffle's 5-d transpose is a 3-d one
        shape, perm = collapse_transpose(self.shape(op.input), op.perm)
        if len(shape) > 4:
            raise UnsupportedModelError(f"{op.output}: Transpose of rank > 4")
        pad = 4 - len(shape)
        shape4 = (1,) * pad + shape
        perm4 = list(range(pad)) + [p + pad for p in perm]
        self.decls.append(_c_array("int32_t", f"{tag}_shape", np.array(shape4)))
        self.decls.append(_c_array("int32_t", f"{tag}_perm", np.array(perm4)))
        self.calls.append(
            f"dq_transpose4({tag}_shape, {tag}_perm, {self.ref(op.input)}, {self.ref(op.output)});"
        )

    def visit_Concat(self, op: ip.Concat) -> None:
        out = self.shape(op.output)
        axis = op.axis % len(out)
        outer, dst_stride = _prod(out[:axis]), _prod(out[axis:])
        offset = 0
        for name in op.inputs:
            block = _prod(self.shape(name)[axis:])
            dst = f"{self.ref(op.output)} + {offset}"
            self.calls.append(
                f"dq_copy_blocks({dst}, {dst_stride}, {self.ref(name)}, {block}, {outer}, {block});"
            )
            offset += block


def _one_byte_function(op: ip.HardSigmoid | ip.HardSwish | ip.LeakyRelu | ip.Clip) -> bool:
    """Whether the op's output byte depends on its input byte alone (no per-channel values)."""
    if isinstance(op, ip.Clip):
        return True
    if isinstance(op, ip.LeakyRelu) and np.size(op.negative_mult) != 1:
        return False
    return bool(np.size(op.requant.mult) == 1)


def lookup_table(program: ip.IntegerProgram, op: ip.IntOp) -> np.ndarray:
    """The output byte for each of the 256 input bytes, computed by the reference interpreter
    itself (exact by construction; the device run checks it again)."""
    source, target = op.input, op.output  # type: ignore[union-attr]
    codes = np.arange(256, dtype=np.uint8).view(program.code_dtype(source)).reshape(1, 256)
    single = ip.IntegerProgram(
        [op],
        {source: program.quant[source], target: program.quant[target]},
        {source: (1, 256), target: (1, 256)},
        {},
        [target],
    )
    out = ReferenceInterpreter(single).run({source: codes})[target]
    return np.asarray(out).reshape(256).view(np.uint8)


def unsupported_ops(program: ip.IntegerProgram) -> list[str]:
    """Every op the microcontroller backend cannot run, each with the reason."""
    problems = model_input_problems(program) + quantize_problems(program)
    outputs = {program.int_outputs.get(o, o) for o in program.outputs}
    kernels = _Emitter.supported_ops()
    for op in program.ops:
        if type(op) not in kernels:
            problems.append(f"{type(op).__name__} {getattr(op, 'output', '')}: no C kernel")
        elif isinstance(op, ip.FloatIsland):  # float C (:mod:`.float_c`)
            problems.extend(p for p in island_problems(op) if p not in problems)
        elif isinstance(op, ip.Conv) and (len(op.strides) != 2 or op.weight.ndim != 4):
            problems.append(f"Conv {op.output}: only 2-d convolutions")
    islands_write = {o for op in program.ops if isinstance(op, ip.FloatIsland) for o in op.outputs}
    for name in outputs:
        if name not in program.quant and name not in islands_write:
            problems.append(f"output {name} has no integer codes")
    return problems


def _render_header(
    project_input: TensorSpec, output_bytes: int, arena: int, input_bytes: int
) -> str:
    return f"""/* Generated by dyadiq: integer-only model for microcontrollers. */
#ifndef DQ_MODEL_H
#define DQ_MODEL_H

#include <stdint.h>

#define DQ_INPUT_COUNT {project_input.count}
#define DQ_INPUT_BYTES {input_bytes}
#define DQ_OUTPUT_BYTES {output_bytes}
#define DQ_ARENA_BYTES {arena}

/* float input -> codes, rounding exactly as the reference (float32 x / s, half to even) */
void dq_model_quantize_input(const float *x, uint8_t *codes);
/* codes in, output codes out (model outputs concatenated); 0 on success */
int dq_model_run(const uint8_t *codes, uint8_t *output_codes);

#endif
"""


def emit_c_project(
    program: ip.IntegerProgram, out_dir: Path, *, cpu: str = "cortex-m4", pack_int4: bool = True
) -> McuProject:
    """Write a buildable C project (sources, Makefile, linker script) for ``cpu`` to ``out_dir``.

    ``pack_int4=False`` stores codes of 4 bits and fewer in int8 too (to measure packing)."""
    from .build import cpu_preset, write_build_files

    preset = cpu_preset(cpu)
    program = with_float_shapes(program)  # float island tensors get arena buffers too
    problems = unsupported_ops(program)
    if problems:
        raise UnsupportedModelError(
            "the microcontroller backend cannot run: " + "; ".join(problems)
        )
    arena = plan_arena(program)
    emitter = _Emitter(program, arena, pack_int4)
    for step, op in enumerate(program.ops):
        emitter.emit(step, op)
    source = next((op for op in program.ops if isinstance(op, ip.QuantizeInput)), None)
    if source is None:  # inputs read as their values (by a float island, or token ids)
        name, *more = program.inputs
        count = sum(_prod(static_shape(program, n)) for n in program.inputs)
        shape = static_shape(program, name) if not more else (count,)
        project_input = TensorSpec(",".join(program.inputs), shape, False, 1.0, 0)
        input_bytes, quantize = raw_input_copy(program, name, *more)
    else:
        in_q = program.quant[source.output]
        project_input = TensorSpec(
            source.output, static_shape(program, source.output), in_q.signed, in_q.scale,
            in_q.zero_point,
        )  # fmt: skip
        input_bytes = project_input.count
        quantize = (
            f"    dq_quantize_input(x, codes, {project_input.count}, "
            f"{_float_literal(in_q.scale)}, {in_q.zero_point}, {in_q.qmin}, {in_q.qmax});\n"
        )
    if any(isinstance(op, ip.FloatIsland) for op in program.ops):
        emitter.decls.insert(0, emitter.islands.scratch_declaration())
    outputs = []
    copies, offset = [], 0
    for name in program.outputs:
        code = program.int_outputs.get(name, name)
        if code in program.quant:
            q = program.quant[code]
            shape = static_shape(program, code)
            spec = TensorSpec(code, shape, q.signed, q.scale, q.zero_point, bits=q.bits)
        else:  # a float island's output, copied out as its values
            values = island_output_dtype(program, code).name
            spec = TensorSpec(code, static_shape(program, code), False, 1.0, 0, values)
        outputs.append(spec)
        copies.append(f"memcpy(output_codes + {offset}, {emitter.ref(code)}, {spec.nbytes});")
        offset += spec.nbytes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = "\n    ".join(emitter.calls + copies)
    model_c = (
        "/* Generated by dyadiq from an integer program; see dq_kernels.h for conventions. */\n"
        '#include <math.h>\n#include <string.h>\n\n#include "dq_kernels.h"\n#include "model.h"\n\n'
        + PROFILE_HOOK
        + f"static uint8_t dq_arena[{max(arena.peak_bytes, 1)}] __attribute__((aligned(8)));\n"
        f"static int8_t dq_scratch[{emitter.scratch}] __attribute__((aligned(4)));\n\n"
        + "".join(emitter.decls)
        + "\nvoid dq_model_quantize_input(const float *x, uint8_t *codes)\n{\n"
        + quantize
        + "}\n\n"
        "int dq_model_run(const uint8_t *input, uint8_t *output_codes)\n{\n"
        f'    DQ_PROFILE_STEP(-1, "start");\n    {body}\n    return 0;\n}}\n'
    )
    write_text_atomic(out / "model.c", model_c)
    write_text_atomic(
        out / "model.h", _render_header(project_input, offset, arena.peak_bytes, input_bytes)
    )
    for name in KERNEL_SOURCES:
        shutil.copyfile(TEMPLATES / name, out / name)
    write_build_files(out, preset)
    project = McuProject(
        out, preset.name, project_input, outputs, arena, emitter.scratch, emitter.layers
    )
    summary = {
        "cpu": preset.name,
        "input": {"name": project_input.name, "shape": project_input.shape},
        "outputs": [
            {"name": o.name, "shape": o.shape, "signed": o.signed, "values": o.values}
            for o in outputs
        ],
        "arena_bytes": arena.peak_bytes,
        "arena_lower_bound_bytes": arena.lower_bound_bytes,
        "scratch_bytes": emitter.scratch,
        "weight_flash_bytes": project.weight_flash_bytes,
        "layers": [vars(layer) for layer in emitter.layers],
    }
    write_text_atomic(out / "model.json", json.dumps(summary, indent=2) + "\n")
    return project


def load_project(folder: Path) -> McuProject:
    """The project :func:`emit_c_project` wrote into ``folder``, from its ``model.json``: what
    running and decoding its ELF needs (CPU, input and output shapes, sizes). The quantizer and
    the memory plan are compiled into the image; the arena comes back as its size only."""
    info_path = Path(folder) / "model.json"
    try:
        info = json.loads(info_path.read_text())
        project_input = TensorSpec(
            info["input"]["name"], tuple(info["input"]["shape"]), False, 1.0, 0
        )
        outputs = [
            TensorSpec(o["name"], tuple(o["shape"]), bool(o["signed"]), 1.0, 0, o.get("values"))
            for o in info["outputs"]
        ]
        cpu, arena_bytes, scratch = (
            info["cpu"],
            int(info["arena_bytes"]),
            int(info["scratch_bytes"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{info_path} is not a Cortex-M project's model.json: {exc}") from exc
    arena = ArenaPlan({}, {}, {}, frozenset(), arena_bytes, [], 0)
    return McuProject(Path(folder), cpu, project_input, outputs, arena, scratch)
