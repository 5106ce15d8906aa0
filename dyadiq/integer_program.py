"""The integer program: what an integer-only model computes, independent of any backend.

It is a topologically ordered list of integer ops over named integer tensors. Each integer
tensor carries the quantizer (:class:`ActQuant`) that maps its codes to reals, but no op ever
uses a scale at run time: every real factor has been turned into a dyadic ``Requant`` at
construction. The reference interpreter (:mod:`dyadiq.reference_interpreter`) defines the
semantics; backends (integer ONNX, TVM, microcontroller C) lower this same program and are
checked bit for bit against the reference.

Float islands are explicit: ``Dequantize`` -> a float ONNX subgraph -> ``Quantize``, and the
program lists them, so "fully integer" is a property one can check (``float_ops`` is empty).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import get_args

import numpy as np
import onnx

from dyadiq.errors import InternalError
from dyadiq.quantizers import ActQuant


@dataclass(frozen=True)
class Requant:
    """``clip(((acc * m + 2^(k-1)) >> k) + zero_point, lo, hi)``, m and k per channel."""

    mult: np.ndarray  # int64, shape (C,) or (1,)
    shift: np.ndarray  # int64, same shape
    zero_point: int
    lo: int
    hi: int
    axis: int = 1  # channel axis of the accumulator the per-channel values apply to


@dataclass(frozen=True)
class QuantizeInput:
    """Float input -> codes: round-half-even(x / s) + z, saturated (ONNX QuantizeLinear)."""

    output: str
    input: str  # float tensor name


@dataclass(frozen=True)
class Conv:
    output: str
    input: str
    input_zero_point: int
    weight: np.ndarray  # int8 codes (b-bit values in an int8 container), OIHW
    bias: np.ndarray | None  # int32 at scale s_x * s_w[c]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int
    requant: Requant
    weight_bits: int = 8


@dataclass(frozen=True)
class MatMul:
    """``(x - zx) @ (w - zw) + bias``; ``weight`` is a constant [K, N] or another tensor."""

    output: str
    input: str
    input_zero_point: int
    requant: Requant
    weight: np.ndarray | None = None  # int8 [K, N] for a weighted layer
    weight_input: str | None = None  # activation x activation (attention)
    weight_zero_point: int = 0
    bias: np.ndarray | None = None
    weight_bits: int = 8


@dataclass(frozen=True)
class Add:
    """Residual add of ``v_a = q_a - z_a`` and ``v_b = q_b - z_b`` at the output scale.

    ``single_rounding=False`` (what backends implement today) rounds each input, then sums:
        y = clip(requant(v_a; m_a, k_a) + requant(v_b; m_b, k_b) + z_y, lo, hi)
    Two roundings: about 1 element in 4 lands 1 LSB away from the simulator's
    ``round((s_a v_a + s_b v_b) / s_y)``, and on MobileNetV2 those LSBs grow to a 10 % larger
    logit error (benchmarks/results/add_rounding.md).
    ``single_rounding=True`` (k_a == k_b == k) rounds once, like the simulator:
        y = clip(((v_a m_a + v_b m_b + 2^(k-1)) >> k) + z_y, lo, hi)
    """

    output: str
    inputs: tuple[str, str]
    zero_points: tuple[int, int]
    mults: tuple[int, int]
    shifts: tuple[int, int]
    zero_point: int
    lo: int
    hi: int
    single_rounding: bool = False

    def __post_init__(self) -> None:
        if self.single_rounding and self.shifts[0] != self.shifts[1]:
            raise InternalError(
                f"{self.output}: a single-rounding Add needs one shift, {self.shifts}"
            )


@dataclass(frozen=True)
class Mul:
    """``requant((a - za) * (b - zb))`` with broadcasting (SE blocks, hard-swish gates)."""

    output: str
    inputs: tuple[str, str]
    zero_points: tuple[int, int]
    requant: Requant


@dataclass(frozen=True)
class GlobalAvgPool:
    """Sum over H, W of (x - z); 1/N is folded into the dyadic multiplier."""

    output: str
    input: str
    input_zero_point: int
    requant: Requant


@dataclass(frozen=True)
class HardSigmoid:
    """``clip(alpha * x + beta, 0, 1)``: an affine map (dyadic) plus a constant, clipped."""

    output: str
    input: str
    input_zero_point: int
    requant: Requant  # multiplier alpha * s_x / s_y; lo/hi encode the 0 and 1 bounds
    offset: int  # round(beta / s_y)


@dataclass(frozen=True)
class HardSwish:
    """``x * clip(x/6 + 1/2, 0, 1)`` in fixed point with ``frac_bits`` fractional bits.

    gate = clip(requant(v; s_x * 2^F / 6) + 2^(F-1), 0, 2^F),  v = q_x - z_x
    y = requant(v * gate; s_x / (2^F * s_y)) + z_y
    """

    output: str
    input: str
    input_zero_point: int
    gate_mult: int
    gate_shift: int
    frac_bits: int
    requant: Requant


@dataclass(frozen=True)
class LeakyRelu:
    """``requant(max(v, 0); s_x/s_y) + requant(min(v, 0); slope s_x/s_y) + z_y``, clipped;
    the negative slope may be per channel (PRelu)."""

    output: str
    input: str
    input_zero_point: int
    requant: Requant  # the positive part; carries z_y, lo, hi
    negative_mult: np.ndarray
    negative_shift: np.ndarray


# d = (q - max q) * 2^U must stay in int64 with |q - max q| < 2^9 (codes of up to 8 bits); a
# softmax whose input scale would need more (implausibly large logits) runs in float instead.
SOFTMAX_MAX_UPSCALE_BITS = 62 - 9


@dataclass(frozen=True)
class Softmax:
    """I-BERT integer softmax over the last axis (input scale S, d = (q - max(q)) 2^U <= 0,
    so that the working scale S / 2^U is fine enough for ln 2 and the polynomial):

    z = floor(-d / q_ln2),  p = d + z q_ln2          (q_ln2 = floor(ln 2 2^U / S))
    e = ((p + q_b)^2 + q_c) >> min(z, 30)            (exp(p) ~ a (p + b)^2 + c)
    P = floor(e 2^F / sum(e)),  y = requant(P; 1 / (2^F s_y)) + z_y
    The two floor divisions are integer divisions of non-negative values (as in I-BERT);
    everything else is multiply, add and shift.
    """

    output: str
    input: str
    upscale_bits: int
    ln2_codes: int
    b_codes: int
    c_codes: int
    frac_bits: int
    requant: Requant


# Newton steps of the integer square root from 2^ceil(bits(n)/2) >= sqrt(n): 6 reach
# floor(sqrt(n)) for every n < 2^62 (tests/test_integer_layer_norm.py sweeps every bit length);
# one more is margin, and a converged iterate stays put.
ISQRT_STEPS = 7
# the row sums of c and the scaled |c| S stay far inside int64 up to this width
LAYER_NORM_MAX_WIDTH = 1 << 14
# the bit width of a wide tensor's quantizer (a LayerNorm's wide_output: int32 codes)
WIDE_BITS = 32


@dataclass(frozen=True)
class LayerNorm:
    """I-BERT integer LayerNorm over the last axis (width N) of a wide integer sum, gamma and
    beta per channel.

    The input is one tensor or the residual Add of two (``inputs``), summed exactly at a
    common fine scale s_c with integer weights m_j = round(s_j / s_c) and v_j = q_j - z_j:
        v_i = sum_j m_j v_ji,      c_i = N v_i - sum_k v_k    (= N (v_i - mean), exact)
        r = isqrt(sum_i (|c_i| >> R)^2 + eps_codes)         (floor square root, Newton;
                                                             eps_codes = round(N^3 eps /
                                                             (s_c^2 4^R)))
        t_i = sign(c_i) floor(|c_i| S / (r 2^R))   (S = round(sqrt(N) 2^F): t ~ x_hat 2^F)
        acc_i = t_i gamma_i + beta_i               (gamma_i = round(g_i 2^G),
                                                    beta_i = round(b_i 2^(F+G)))
    since x_hat_i = (v_i - mean) / sqrt(var_v + eps / s_c^2) = c_i sqrt(N) / sqrt(sum c^2 +
    N^3 eps / s_c^2); the variance shift R keeps sum (|c| >> R)^2 inside int64 and costs only
    the low bits of a large r. acc is the LayerNorm's output at scale 2^-(F+G), |acc| < 2^31.
    With ``requant``, ``output`` holds 8-bit codes requant(acc; 2^-(F+G) / s_y) + z_y (for
    the quantized consumers) and ``wide_output``, if given, acc itself as int32 codes (scale
    2^-(F+G), zero point 0); without ``requant``, ``output`` holds those int32 codes. The
    int32 codes carry a residual stream that the QDQ simulator keeps in float: it has outlier
    channels that one 8-bit scale would crush.
    The one division is of non-negative integers (the same floor everywhere).
    Preconditions (integerize checks them): N <= LAYER_NORM_MAX_WIDTH and every
    intermediate below 2^62.
    """

    output: str  # 8-bit codes with ``requant``, else int32 codes of acc
    inputs: tuple[str, ...]  # one tensor, or the two operands of a residual Add
    zero_points: tuple[int, ...]
    input_mults: tuple[int, ...]  # m_j
    var_shift: int  # R
    eps_codes: int
    norm_mult: int  # S
    gamma: np.ndarray  # int64 [N]
    beta: np.ndarray  # int64 [N]
    requant: Requant | None  # acc -> 8-bit output codes; None: the output is acc (int32)
    wide_output: str | None = None  # acc as int32 codes beside 8-bit ``output``

    def __post_init__(self) -> None:
        if self.requant is None and self.wide_output is not None:
            raise InternalError(f"LayerNorm {self.output}: two int32 outputs")


@dataclass(frozen=True)
class Embedding:
    """A token embedding lookup and the constant rows added to it, as wide int32 codes:
        out[..., :] = table[i, :] * row_scales[i] + offset        (i = indices[...])
    ``table``: int8 codes of the embedding table, each row at its own scale s_i;
    ``row_scales``: the integers s_i / s_o (>= 2^10 for the finest row: the rounding of a
    row's scale costs at most 2^-11 of it), s_o the output's scale (``quant[output]``, zero
    point 0, ``WIDE_BITS``); ``offset``: int32 codes of the constants summed onto the
    looked-up rows (BERT's position and token-type embeddings), broadcast over the output's
    trailing dims. ``indices`` are the model's own integer ids (ONNX Gather: a negative index
    counts from the end). It feeds an integer LayerNorm as the residual stream does.
    Per-row scales: one scale for a whole token table puts the median row (max |t| 0.18 on
    MiniLM, against 1.05 for the table) on a quarter of the int8 grid."""

    output: str
    indices: str
    table: np.ndarray  # int8 [V, D]
    row_scales: np.ndarray  # int32 [V]
    offset: np.ndarray  # int32, broadcastable to the output


@dataclass(frozen=True)
class MaskedSoftmax:
    """:class:`Softmax` of ``scores + mask`` where the additive mask is 0 at kept positions
    and a large negative number elsewhere (a transformer's attention mask).

    ``mask`` is an integer or boolean tensor that broadcasts to the scores (numpy rules);
    a position is kept where ``(mask != 0) == keep_nonzero``. Masked positions take no part
    in the row's maximum or sum and get probability 0 (the output's zero point); the kept
    ones follow :class:`Softmax` exactly. A row with no kept position is a plain softmax over
    all positions (what a finite mask such as -1e4 gives).
    """

    output: str
    input: str
    mask: str
    keep_nonzero: bool
    upscale_bits: int
    ln2_codes: int
    b_codes: int
    c_codes: int
    frac_bits: int
    requant: Requant


# fractional bits a masked mean of 8-bit codes keeps below the input's scale (a wide input
# keeps its own scale: its codes are fine already)
MEAN_POOL_FRAC_BITS = 16
# the L2-normalised output's int32 codes are at scale 2^-L2_NORM_FRAC_BITS (|y| <= 1)
L2_NORM_FRAC_BITS = 24


@dataclass(frozen=True)
class MaskedMeanPool:
    """Mean over the tokens (axis 1) of ``input`` [B, T, D] at the positions ``mask`` [B, T]
    keeps, a sentence embedding's masked mean pooling:
        v = q - z,  k_bt = (mask_bt != 0),  n_b = max(sum_t k_bt, 1)
        s_bd = sum_t k_bt v_btd                                   (int64, exact)
        y_bd = sign(s_bd) floor((|s_bd| 2^(P+1) + n_b) / (2 n_b))  (P = ``frac_bits``)
    i.e. s 2^P / n rounded half away from zero; every division is of non-negative integers
    (the same floor in every backend). The output is int32 codes at scale s_x / 2^P, zero
    point 0 (``WIDE_BITS``). The float graph multiplies by the 0/1 mask cast to float and
    divides by max(sum mask, eps): the same for a 0/1 mask (the attention-mask convention the
    masked softmax relies on too), and a row with no kept token is 0 in both.
    Precondition (integerize checks it): max|v| T 2^(P+1) < 2^62."""

    output: str
    input: str
    input_zero_point: int
    mask: str  # integer or boolean, [B, T]
    frac_bits: int


@dataclass(frozen=True)
class L2Normalize:
    """``x / max(||x||_2, eps)`` over the last axis (width N), in integers:
        v = q - z,  R = max(bits(max_i |v_i|) - B, 0)         (per row; B = ``norm_bits``)
        r = isqrt(max(sum_i (|v_i| >> R)^2, 1)) 2^R
        d = max(r, eps_codes)                               (eps_codes = max(ceil(eps / s_x), 1))
        y_i = sign(v_i) floor((|v_i| 2^(F+1) + d) / (2 d))   (F = ``frac_bits``)
    y is the normalised value at scale 2^-F rounded half away from zero, int32 codes, zero
    point 0. The row's shift R keeps B significant bits of its largest |v| (a small row is
    summed exactly, a large one loses only low bits) and the sum of squares below
    N 4^B <= 2^61; isqrt is the integer LayerNorm's (:data:`ISQRT_STEPS` Newton steps), bits()
    the reference's ``bit_length``, and every division is of non-negative integers.
    Preconditions (integerize checks them): N 4^B <= 2^61, max|v| 2^(F+1) < 2^62."""

    output: str
    input: str
    input_zero_point: int
    norm_bits: int
    eps_codes: int
    frac_bits: int


@dataclass(frozen=True)
class MaxPool:
    output: str
    input: str
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]


@dataclass(frozen=True)
class Clip:
    output: str
    input: str
    lo: int
    hi: int


@dataclass(frozen=True)
class Reshape:
    output: str
    input: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Transpose:
    output: str
    input: str
    perm: tuple[int, ...]


@dataclass(frozen=True)
class Concat:
    output: str
    inputs: tuple[str, ...]
    axis: int


@dataclass(frozen=True)
class Max:
    """Elementwise ``max(a, b)`` on codes, broadcasting as numpy and ONNX ``Max`` do.

    Both inputs and the output share one quantizer (integerize puts them in one scale group).
    Quantization ``round(x / s) + z`` is monotone, so then ``max(Q(a), Q(b)) = Q(max(a, b))``
    exactly, which is also what the QDQ simulator computes: no rescale, no rounding.
    Requantizing inputs of different scales to the output's instead would go through a dyadic
    approximation of ``s_a / s_y`` and could not match the simulator bit for bit.
    """

    output: str
    inputs: tuple[str, str]


@dataclass(frozen=True)
class Min:
    """Elementwise ``min(a, b)`` on codes: :class:`Max` with the order reversed."""

    output: str
    inputs: tuple[str, str]


@dataclass(frozen=True)
class Lookup:
    """``y = table[q_x - c]``: an elementwise function of one tensor's codes, tabulated.

    ``c`` is the smallest code of the input's container (0 for uint8, -128 for int8), so the
    table has 256 entries, one per byte, each an output code. Any chain of elementwise float
    ops that reads one quantized tensor (and scalar constants) and ends in a quantized one
    (SiLU ``x * sigmoid(x)``, Sigmoid, Tanh, GELU, ...) is exactly such a function of the
    input code: integerize tabulates ``Q(f(DQ(q)))`` once, with the float island's own kernels
    (:mod:`dyadiq.passes.elementwise_lookup`), so no backend evaluates a float function.
    """

    output: str
    input: str
    table: np.ndarray  # output codes, 256 entries, indexed by input code - container minimum


@dataclass(frozen=True)
class Dequantize:
    """Codes -> float at a float island's entry or a model output."""

    output: str  # float tensor name
    input: str


@dataclass(frozen=True)
class Quantize:
    """Float island output -> codes (round half to even, as ONNX QuantizeLinear)."""

    output: str
    input: str  # float tensor name


@dataclass(frozen=True)
class FloatIsland:
    """Float ONNX nodes run as they are, between Dequantize and Quantize ops."""

    nodes: tuple[onnx.NodeProto, ...]
    initializers: tuple[onnx.TensorProto, ...]
    inputs: tuple[str, ...]  # tensor names it reads (float, or e.g. int64 token ids)
    outputs: tuple[str, ...]  # tensor names it produces
    input_types: tuple[int, ...] = ()  # onnx.TensorProto element types, default FLOAT
    output_types: tuple[int, ...] = ()


IntOp = (
    QuantizeInput
    | Conv
    | MatMul
    | Add
    | Mul
    | GlobalAvgPool
    | HardSigmoid
    | HardSwish
    | LeakyRelu
    | Softmax
    | MaskedSoftmax
    | LayerNorm
    | Embedding
    | MaskedMeanPool
    | L2Normalize
    | MaxPool
    | Clip
    | Reshape
    | Transpose
    | Concat
    | Max
    | Min
    | Lookup
    | Dequantize
    | Quantize
    | FloatIsland
)
INT_OP_CLASSES: tuple[type, ...] = get_args(IntOp)


@dataclass
class IntegerProgram:
    ops: list[IntOp]
    quant: dict[str, ActQuant]  # every integer tensor -> its quantizer
    shapes: dict[str, tuple[int, ...]]
    inputs: dict[str, tuple[np.dtype, tuple[int, ...]]]  # model (float or int) inputs
    outputs: list[str]  # model outputs (float, after Dequantize)
    int_outputs: dict[str, str] = field(default_factory=dict)  # output -> its integer codes
    float_ops: list[str] = field(default_factory=list)  # "op_type node_id" run in float
    notes: list[str] = field(default_factory=list)
    opset: int = 21  # of the float islands' nodes, copied from the source graph

    def code_dtype(self, tensor: str) -> np.dtype:
        q = self.quant[tensor]
        if q.bits > 8:  # a wide residual stream (LayerNorm's wide_output): int32 codes
            return np.dtype(np.int32)
        return np.dtype(np.int8 if q.signed else np.uint8)

    def code_offset(self, tensor: str) -> int:
        """The smallest code of the tensor's container: a :class:`Lookup` table's index 0."""
        return -128 if self.quant[tensor].signed else 0
