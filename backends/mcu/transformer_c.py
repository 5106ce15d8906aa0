"""Cortex-M C for the transformer integer ops: :class:`ip.LayerNorm`, :class:`ip.MaskedSoftmax`,
:class:`ip.Embedding`, :class:`ip.MaskedMeanPool` and :class:`ip.L2Normalize`.

The kernels are static C functions written into ``model.c`` the first time a program uses
them (the shared ``dq_kernels.c`` stays as it is). They compute the reference interpreter's
integers exactly, in int64: the LayerNorm's integer square root is the reference's Newton
iteration from 2^ceil(bits / 2) (:func:`dyadiq.reference_interpreter.integer_sqrt`), every
division is of non-negative values (C's truncation is then the reference's floor), and shifts
of negative values are arithmetic (a floor, as arm-none-eabi-gcc compiles ``>>``, which the
other kernels rely on too). No row buffer: values are recomputed from the input bytes.

Wide codes (the int32 residual stream between LayerNorms, the embedding sum, the pooled and
normalised sentence embedding) are int32 arena buffers (:func:`.arena.element_bytes`); the
LayerNorm reads 8-bit or wide inputs and writes 8-bit codes and / or its wide acc. Token ids
and masks are model inputs (several integer inputs share one raw input buffer), or a mask is
computed by a float island; a mask element of any integer or boolean type is "non-zero" when
any of its bytes is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from dyadiq import integer_program as ip
from dyadiq.errors import UnsupportedModelError
from dyadiq.reference_interpreter import SOFTMAX_MAX_SHIFT

from .arena import static_shape

INT32_MAX = 2**31 - 1

KERNELS_C = f"""
/* --- transformer kernels (backends/mcu/transformer_c.py) --- */
typedef struct {{
    int32_t rows, len, inputs;
    int32_t flip[2], zero[2], wide[2]; /* wide: int32 codes, else bytes */
    int64_t mult[2];
    int32_t var_shift, out_mult, shift, zero_point, lo, hi;
    int64_t eps_codes, norm_mult;
    const int32_t *gamma;
    const int64_t *beta;
}} dq_layer_norm_params;

typedef struct {{
    int32_t count, width, rows;
    const int8_t *table;
    const int32_t *row_scale;
    const int32_t *offset; /* broadcast to the output: count * width values */
}} dq_embedding_params;

typedef struct {{
    int32_t batch, tokens, width, wide, flip, zero, frac_bits, mask_size;
}} dq_mean_pool_params;

typedef struct {{
    int32_t rows, len, wide, flip, zero, norm_bits, frac_bits;
    int64_t eps_codes;
}} dq_l2_norm_params;

typedef struct {{
    int32_t shape[4], mask_stride[4];
    int32_t flip, mask_size, keep_nonzero;
    int32_t upscale_bits, ln2_codes, b_codes, c_codes, frac_bits;
    int32_t mult, shift, zero_point, lo, hi;
}} dq_masked_softmax_params;

static int64_t dq_isqrt(int64_t n) /* floor(sqrt(n)), 1 <= n < 2^62 */
{{
    int32_t bits = 0;
    while (bits < 63 && (n >> bits) != 0) {{
        ++bits;
    }}
    int64_t x = (int64_t)1 << ((bits + 1) >> 1);
    for (int32_t k = 0; k < {ip.ISQRT_STEPS}; ++k) {{
        int64_t step = (x + n / x) >> 1;
        x = step < x ? step : x;
    }}
    return x;
}}

static inline uint8_t dq_tf_output(int64_t acc, int64_t mult, int32_t shift, int32_t zero_point,
                                   int32_t lo, int32_t hi)
{{
    int64_t v = acc * mult + (shift > 0 ? ((int64_t)1 << (shift - 1)) : 0);
    v = (v >> shift) + zero_point;
    v = v < lo ? lo : (v > hi ? hi : v);
    return (uint8_t)(int8_t)v; /* a signed code's two's complement byte */
}}

static inline int64_t dq_code(const uint8_t *x, int32_t wide, int32_t flip, int32_t zero,
                              int32_t at) /* code - zero point of a byte or an int32 code */
{{
    if (wide) {{
        return (int64_t)((const int32_t *)(const void *)x)[at] - zero;
    }}
    return (int64_t)((int32_t)(x[at] ^ flip) - zero);
}}

static inline int64_t dq_layer_norm_value(const dq_layer_norm_params *p, const uint8_t *const *x,
                                          int32_t at)
{{
    int64_t v = 0;
    for (int32_t j = 0; j < p->inputs; ++j) {{
        v += p->mult[j] * dq_code(x[j], p->wide[j], p->flip[j], p->zero[j], at);
    }}
    return v;
}}

/* y: 8-bit output codes (NULL: none); wide: acc as int32 codes (NULL: none) */
static void dq_layer_norm(const dq_layer_norm_params *p, const uint8_t *const *x, uint8_t *y,
                          int32_t *wide)
{{
    for (int32_t r = 0; r < p->rows; ++r) {{
        int32_t base = r * p->len;
        int64_t total = 0;
        for (int32_t i = 0; i < p->len; ++i) {{
            total += dq_layer_norm_value(p, x, base + i);
        }}
        int64_t squares = 0;
        for (int32_t i = 0; i < p->len; ++i) {{
            int64_t c = p->len * dq_layer_norm_value(p, x, base + i) - total;
            int64_t coarse = (c < 0 ? -c : c) >> p->var_shift;
            squares += coarse * coarse;
        }}
        squares += p->eps_codes;
        int64_t root = dq_isqrt(squares < 1 ? 1 : squares) << p->var_shift;
        for (int32_t i = 0; i < p->len; ++i) {{
            int64_t c = p->len * dq_layer_norm_value(p, x, base + i) - total;
            int64_t t = ((c < 0 ? -c : c) * p->norm_mult) / root;
            t = c < 0 ? -t : t;
            int64_t acc = t * p->gamma[i] + p->beta[i];
            if (y) {{
                y[base + i] = dq_tf_output(acc, p->out_mult, p->shift, p->zero_point, p->lo,
                                           p->hi);
            }}
            if (wide) {{
                wide[base + i] = (int32_t)acc; /* |acc| < 2^31 (integerize checks it) */
            }}
        }}
    }}
}}

static int64_t dq_masked_exp(const dq_masked_softmax_params *p, int32_t q, int32_t top)
{{
    int64_t d = (int64_t)(q - top) * ((int64_t)1 << p->upscale_bits);
    int64_t z = (-d) / p->ln2_codes; /* -d >= 0: a floor */
    int64_t t = d + z * p->ln2_codes + p->b_codes;
    return (t * t + p->c_codes) >> (z < {SOFTMAX_MAX_SHIFT} ? z : {SOFTMAX_MAX_SHIFT});
}}

static inline int32_t dq_nonzero(const uint8_t *element, int32_t size) /* any byte set */
{{
    int32_t any = 0;
    for (int32_t b = 0; b < size; ++b) {{
        any |= element[b];
    }}
    return any != 0;
}}

static inline int32_t dq_mask_kept(const dq_masked_softmax_params *p, const uint8_t *mask,
                                   int32_t offset)
{{
    const uint8_t *m = mask + offset * p->mask_size;
    int32_t any = 0;
    for (int32_t b = 0; b < p->mask_size; ++b) {{
        any |= m[b];
    }}
    return (any != 0) == p->keep_nonzero;
}}

static void dq_masked_softmax(const dq_masked_softmax_params *p, const uint8_t *x,
                              const uint8_t *mask, uint8_t *y)
{{
    const int32_t len = p->shape[3];
    const int32_t rows = p->shape[0] * p->shape[1] * p->shape[2];
    for (int32_t r = 0; r < rows; ++r) {{
        int32_t a = r / (p->shape[1] * p->shape[2]), b = (r / p->shape[2]) % p->shape[1];
        int32_t c = r % p->shape[2];
        int32_t m0 = a * p->mask_stride[0] + b * p->mask_stride[1] + c * p->mask_stride[2];
        const uint8_t *xr = x + r * len;
        int32_t top = 0, kept = 0;
        for (int32_t i = 0; i < len; ++i) {{
            if (dq_mask_kept(p, mask, m0 + i * p->mask_stride[3])) {{
                int32_t q = xr[i] ^ p->flip; /* code + 128 for signed: differences unchanged */
                top = (kept == 0 || q > top) ? q : top;
                kept = 1;
            }}
        }}
        int32_t all = !kept; /* a row with no kept position: a plain softmax */
        if (all) {{
            for (int32_t i = 0; i < len; ++i) {{
                int32_t q = xr[i] ^ p->flip;
                top = (i == 0 || q > top) ? q : top;
            }}
        }}
        int64_t sum = 0;
        for (int32_t i = 0; i < len; ++i) {{
            if (all || dq_mask_kept(p, mask, m0 + i * p->mask_stride[3])) {{
                sum += dq_masked_exp(p, xr[i] ^ p->flip, top);
            }}
        }}
        for (int32_t i = 0; i < len; ++i) {{
            int64_t e = 0;
            if (all || dq_mask_kept(p, mask, m0 + i * p->mask_stride[3])) {{
                e = dq_masked_exp(p, xr[i] ^ p->flip, top);
            }}
            int64_t prob = (e * ((int64_t)1 << p->frac_bits)) / sum;
            y[r * len + i] = dq_tf_output(prob, p->mult, p->shift, p->zero_point, p->lo, p->hi);
        }}
    }}
}}

static void dq_embedding(const dq_embedding_params *p, const int64_t *ids, int32_t *y)
{{
    for (int32_t i = 0; i < p->count; ++i) {{
        int64_t id = ids[i] < 0 ? ids[i] + p->rows : ids[i]; /* ONNX Gather's negative ids */
        const int8_t *row = p->table + id * p->width;
        for (int32_t d = 0; d < p->width; ++d) {{
            int32_t at = i * p->width + d;
            y[at] = (int32_t)row[d] * p->row_scale[id] + p->offset[at];
        }}
    }}
}}

/* sign(s) floor((|s| 2^(F+1) + d) / (2 d)), d > 0: a division of non-negative values */
static inline int32_t dq_rounded_quotient(int64_t s, int32_t frac_bits, int64_t d)
{{
    int64_t magnitude = s < 0 ? -s : s;
    int64_t q = (magnitude * ((int64_t)1 << (frac_bits + 1)) + d) / (2 * d);
    return (int32_t)(s < 0 ? -q : q);
}}

static void dq_mean_pool(const dq_mean_pool_params *p, const uint8_t *x, const uint8_t *mask,
                         int32_t *y)
{{
    for (int32_t b = 0; b < p->batch; ++b) {{
        int64_t count = 0;
        for (int32_t t = 0; t < p->tokens; ++t) {{
            count += dq_nonzero(mask + (b * p->tokens + t) * p->mask_size, p->mask_size);
        }}
        count = count < 1 ? 1 : count;
        for (int32_t d = 0; d < p->width; ++d) {{
            int64_t total = 0;
            for (int32_t t = 0; t < p->tokens; ++t) {{
                int32_t token = b * p->tokens + t;
                if (dq_nonzero(mask + token * p->mask_size, p->mask_size)) {{
                    total += dq_code(x, p->wide, p->flip, p->zero, token * p->width + d);
                }}
            }}
            y[b * p->width + d] = dq_rounded_quotient(total, p->frac_bits, count);
        }}
    }}
}}

static void dq_l2_norm(const dq_l2_norm_params *p, const uint8_t *x, int32_t *y)
{{
    for (int32_t r = 0; r < p->rows; ++r) {{
        int32_t base = r * p->len;
        int64_t largest = 0;
        for (int32_t i = 0; i < p->len; ++i) {{
            int64_t v = dq_code(x, p->wide, p->flip, p->zero, base + i);
            v = v < 0 ? -v : v;
            largest = v > largest ? v : largest;
        }}
        int32_t bits = 0;
        while (bits < 63 && (largest >> bits) != 0) {{
            ++bits;
        }}
        int32_t shift = bits > p->norm_bits ? bits - p->norm_bits : 0;
        int64_t squares = 0;
        for (int32_t i = 0; i < p->len; ++i) {{
            int64_t v = dq_code(x, p->wide, p->flip, p->zero, base + i);
            int64_t coarse = (v < 0 ? -v : v) >> shift;
            squares += coarse * coarse;
        }}
        int64_t norm = dq_isqrt(squares < 1 ? 1 : squares) << shift;
        int64_t divisor = norm > p->eps_codes ? norm : p->eps_codes;
        for (int32_t i = 0; i < p->len; ++i) {{
            int64_t v = dq_code(x, p->wide, p->flip, p->zero, base + i);
            y[base + i] = dq_rounded_quotient(v, p->frac_bits, divisor);
        }}
    }}
}}
"""


def embedding_flash_bytes(op: ip.Embedding, output_shape: tuple[int, ...]) -> int:
    """Flash the C embedding keeps: the int8 table, an int32 scale per row, and the int32
    constant rows broadcast to one inference's output."""
    offsets = int(np.prod(output_shape, dtype=np.int64))
    return int(op.table.size) + 4 * int(op.row_scales.size) + 4 * offsets


def _struct(fields: dict[str, object]) -> str:
    return "{" + ", ".join(f".{k} = {v}" for k, v in fields.items()) + "}"


def _array(ctype: str, name: str, values: np.ndarray) -> str:
    items = ", ".join(str(int(v)) for v in np.asarray(values).reshape(-1))
    return f"static const {ctype} {name}[{np.asarray(values).size}] = {{{items}}};\n"


def _braces(values: list[int]) -> str:
    return "{" + ", ".join(str(v) for v in values) + "}"


class TransformerKernels:
    """Appends the C of LayerNorm / MaskedSoftmax ops to the emitter's ``decls`` and
    ``calls``; ``ref`` gives a tensor's address expression."""

    def __init__(
        self,
        program: ip.IntegerProgram,
        decls: list[str],
        calls: list[str],
        ref: Callable[[str], str],
    ) -> None:
        self.program = program
        self.decls = decls
        self.calls = calls
        self.ref = ref
        self.emitted = False

    def _kernels(self) -> None:
        if not self.emitted:
            self.decls.append(KERNELS_C)
            self.emitted = True

    def _decode(self, tensor: str, zero_point: int) -> tuple[int, int]:
        """(flip, zero) that turn a stored byte into ``code - zero_point``."""
        return (0x80, zero_point + 128) if self.program.quant[tensor].signed else (0, zero_point)

    def _wide(self, tensor: str) -> int:
        return int(self.program.quant[tensor].bits > 8)

    def layer_norm(self, op: ip.LayerNorm, tag: str) -> None:
        """8-bit or wide (int32) inputs; 8-bit output codes and / or the wide acc."""
        self._kernels()
        if np.abs(op.gamma).max(initial=0) > INT32_MAX:
            raise UnsupportedModelError(f"{op.output}: LayerNorm gamma beyond int32")
        wide_inputs = [self._wide(n) for n in op.inputs]
        # (flip, zero) that turn a stored code into code - zero point (int32 codes: as they are)
        decoded = [
            (0, z) if w else self._decode(n, z)
            for n, z, w in zip(op.inputs, op.zero_points, wide_inputs, strict=True)
        ]
        shape = static_shape(self.program, op.output)
        rq = op.requant
        if rq is not None and np.size(rq.mult) != 1:
            raise UnsupportedModelError(f"{op.output}: a per-channel LayerNorm requant")
        pad = 2 - len(op.inputs)
        self.decls.append(_array("int32_t", f"{tag}_gamma", op.gamma))
        self.decls.append(_array("int64_t", f"{tag}_beta", op.beta))
        fields: dict[str, object] = {
            "rows": int(np.prod(shape[:-1], dtype=np.int64)),
            "len": shape[-1],
            "inputs": len(op.inputs),
            "flip": _braces([f for f, _ in decoded] + [0] * pad),
            "zero": _braces([z for _, z in decoded] + [0] * pad),
            "wide": _braces(wide_inputs + [0] * pad),
            "mult": _braces([int(m) for m in op.input_mults] + [0] * pad),
            "var_shift": op.var_shift,
            "out_mult": int(np.asarray(rq.mult).reshape(-1)[0]) if rq is not None else 0,
            "shift": int(np.asarray(rq.shift).reshape(-1)[0]) if rq is not None else 0,
            "zero_point": rq.zero_point if rq is not None else 0,
            "lo": rq.lo if rq is not None else 0,
            "hi": rq.hi if rq is not None else 0,
            "eps_codes": op.eps_codes,
            "norm_mult": op.norm_mult,
            "gamma": f"{tag}_gamma",
            "beta": f"{tag}_beta",
        }
        self.decls.append(f"static const dq_layer_norm_params {tag} = {_struct(fields)};\n")
        sources = ", ".join(self.ref(name) for name in op.inputs)
        codes = self.ref(op.output) if rq is not None else "0"
        wide_name = op.output if rq is None else op.wide_output
        wide = f"(int32_t *)(void *){self.ref(wide_name)}" if wide_name is not None else "0"
        self.calls.append(
            f"{{ const uint8_t *{tag}_x[{len(op.inputs)}] = {{{sources}}}; "
            f"dq_layer_norm(&{tag}, {tag}_x, {codes}, {wide}); }}"
        )

    def embedding(self, op: ip.Embedding, tag: str) -> None:
        """int64 token ids (a model input) -> int32 codes of the embedding sum."""
        self._kernels()
        if self.element_size(op.indices) != 8:
            raise UnsupportedModelError(f"Embedding {op.output}: int64 token ids only")
        shape = static_shape(self.program, op.output)
        width = shape[-1]
        offset = np.broadcast_to(op.offset.astype(np.int64), shape).reshape(-1)
        self.decls.append(_array("int8_t", f"{tag}_table", op.table))
        self.decls.append(_array("int32_t", f"{tag}_row_scale", op.row_scales))
        self.decls.append(_array("int32_t", f"{tag}_offset", offset))
        fields: dict[str, object] = {
            "count": int(np.prod(shape[:-1], dtype=np.int64)),
            "width": width,
            "rows": int(op.table.shape[0]),
            "table": f"{tag}_table",
            "row_scale": f"{tag}_row_scale",
            "offset": f"{tag}_offset",
        }
        self.decls.append(f"static const dq_embedding_params {tag} = {_struct(fields)};\n")
        ids = f"(const int64_t *)(const void *){self.ref(op.indices)}"
        self.calls.append(f"dq_embedding(&{tag}, {ids}, (int32_t *)(void *){self.ref(op.output)});")

    def mean_pool(self, op: ip.MaskedMeanPool, tag: str) -> None:
        self._kernels()
        batch, tokens, width = static_shape(self.program, op.input)
        if list(static_shape(self.program, op.mask)) != [batch, tokens]:
            raise UnsupportedModelError(f"{op.output}: the pooling mask is not [B, T]")
        wide = self._wide(op.input)
        flip, zero = self._decode(op.input, op.input_zero_point) if not wide else (0, 0)
        fields: dict[str, object] = {
            "batch": batch,
            "tokens": tokens,
            "width": width,
            "wide": wide,
            "flip": flip,
            "zero": op.input_zero_point if wide else zero,
            "frac_bits": op.frac_bits,
            "mask_size": self.mask_size(op.mask),
        }
        self.decls.append(f"static const dq_mean_pool_params {tag} = {_struct(fields)};\n")
        mask = f"(const uint8_t *){self.ref(op.mask)}"
        out = f"(int32_t *)(void *){self.ref(op.output)}"
        self.calls.append(f"dq_mean_pool(&{tag}, {self.ref(op.input)}, {mask}, {out});")

    def l2_normalize(self, op: ip.L2Normalize, tag: str) -> None:
        self._kernels()
        shape = static_shape(self.program, op.input)
        wide = self._wide(op.input)
        flip, zero = self._decode(op.input, op.input_zero_point) if not wide else (0, 0)
        fields: dict[str, object] = {
            "rows": int(np.prod(shape[:-1], dtype=np.int64)),
            "len": shape[-1],
            "wide": wide,
            "flip": flip,
            "zero": op.input_zero_point if wide else zero,
            "norm_bits": op.norm_bits,
            "frac_bits": op.frac_bits,
            "eps_codes": op.eps_codes,
        }
        self.decls.append(f"static const dq_l2_norm_params {tag} = {_struct(fields)};\n")
        out = f"(int32_t *)(void *){self.ref(op.output)}"
        self.calls.append(f"dq_l2_norm(&{tag}, {self.ref(op.input)}, {out});")

    def element_size(self, tensor: str) -> int:
        """Bytes per element of a model input."""
        if tensor in self.program.inputs:
            return int(np.dtype(self.program.inputs[tensor][0]).itemsize)
        return 0

    def mask_size(self, mask: str) -> int:
        """Bytes per element of ``mask``: an integer model input, or a tensor a float island
        computes on the device."""
        if self.element_size(mask) and mask not in self.program.quant:
            dtype = np.dtype(self.program.inputs[mask][0])
            if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
                return int(dtype.itemsize)
        for op in self.program.ops:
            if isinstance(op, ip.FloatIsland) and mask in op.outputs:
                types = op.output_types or (onnx.TensorProto.FLOAT,) * len(op.outputs)
                kind = types[op.outputs.index(mask)]
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(kind))
                if np.issubdtype(dtype, np.floating):
                    break
                return int(dtype.itemsize)
        raise UnsupportedModelError(
            f"mask {mask}: neither an integer model input nor an integer tensor that a float "
            "island computes on the device"
        )

    def masked_softmax(self, op: ip.MaskedSoftmax, tag: str) -> None:
        self._kernels()
        shape = list(static_shape(self.program, op.input))
        if len(shape) > 4:
            raise UnsupportedModelError(f"{op.output}: a masked softmax of rank above 4")
        rq = op.requant
        if np.size(rq.mult) != 1:
            raise UnsupportedModelError(f"{op.output}: a per-channel softmax requant")
        mask_shape = list(self.program.shapes[op.mask])
        shape = [1] * (4 - len(shape)) + shape
        mask_shape = [1] * (4 - len(mask_shape)) + mask_shape
        strides, step = [0, 0, 0, 0], 1
        for d in range(3, -1, -1):  # broadcast dims (size 1 against more) read one element
            strides[d] = step if mask_shape[d] == shape[d] else 0
            step *= mask_shape[d]
        flip, _ = self._decode(op.input, 0)
        fields: dict[str, object] = {
            "shape": _braces(shape),
            "mask_stride": _braces(strides),
            "flip": flip,
            "mask_size": self.mask_size(op.mask),
            "keep_nonzero": int(op.keep_nonzero),
            "upscale_bits": op.upscale_bits,
            "ln2_codes": op.ln2_codes,
            "b_codes": op.b_codes,
            "c_codes": op.c_codes,
            "frac_bits": op.frac_bits,
            "mult": int(np.asarray(rq.mult).reshape(-1)[0]),
            "shift": int(np.asarray(rq.shift).reshape(-1)[0]),
            "zero_point": rq.zero_point,
            "lo": rq.lo,
            "hi": rq.hi,
        }
        self.decls.append(f"static const dq_masked_softmax_params {tag} = {_struct(fields)};\n")
        mask = f"(const uint8_t *){self.ref(op.mask)}"
        self.calls.append(
            f"dq_masked_softmax(&{tag}, {self.ref(op.input)}, {mask}, {self.ref(op.output)});"
        )
