"""Rewrite rule: an ONNX ``LayerNormalization`` -> :class:`ip.LayerNorm` (I-BERT integer LayerNorm).

The algebra is stated on :class:`dyadiq.integer_program.LayerNorm`; this module finds the
op's integer inputs and chooses its constants. The LayerNorm's input is either
- the residual ``Add`` that feeds only this LayerNorm (the QDQ simulator leaves that sum
  unquantized, ``OpFacts.wide_input``) of two tensors with codes: 8-bit ones, or the wide
  int32 output of the LayerNorm before. The op sums them at the fine scale s_c: the wide
  operand's scale, or min(s_a, s_b) / 2^P for two 8-bit ones (P = ``LAYER_NORM_INPUT_BITS``),
  with m_j = round(s_j / s_c), so every scale ratio is exact to 2^-(P+1) or better;
- or a tensor with codes (one input, m = 1, s_c = s_x).
Constants, with width N, gamma g and beta b:
- S = round(sqrt(N) 2^F): t = c S / r is the normalised value at scale 2^-F
  (F = ``LAYER_NORM_FRAC_BITS``; |t| <= 2 S since c_i^2 <= sum c^2 < (r + 1)^2);
- gamma_i = round(g_i 2^G), beta_i = round(b_i 2^(F+G)) with G the largest shift that keeps
  max |gamma_i| below 2^``LAYER_NORM_GAMMA_BITS`` and |acc| = |t gamma + beta| below 2^31:
  acc is the output at scale 2^-(F+G), the wide output as it is, and the 8-bit output is one
  dyadic requantization of it, requant(acc; 2^-(F+G) / s_y) + z_y;
- R, the smallest shift with N (max |c| >> R)^2 < 2^61, and eps_codes = round(N^3 eps /
  (s_c^2 4^R)).

Preconditions, checked (a rule that does not apply says why, and the node runs in float):
normalisation over the last axis only, constant gamma (and beta, if given), a static width
N <= ``LAYER_NORM_MAX_WIDTH``, operands of one shape, and |c| S and eps below 2^61.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq import integer_program as ip
from dyadiq.dyadic import dyadic
from dyadiq.graph import QGraph
from dyadiq.op_facts import OpKind
from dyadiq.quantizers import ActQuant

LAYER_NORM_INPUT_BITS = 12
LAYER_NORM_FRAC_BITS = 12
LAYER_NORM_GAMMA_BITS = 12
INT64_HEADROOM = 1 << 62


def _constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values, np.float64)
    return None


def layer_norm_blocker(node: gs.Node) -> str | None:
    """Why this LayerNormalization cannot be an integer op (whatever its quantizers), or None."""
    x = node.inputs[0]
    rank = len(x.shape or ())
    if rank == 0:
        return "integer LayerNorm needs the input's rank"
    if int(node.attrs.get("axis", -1)) % rank != rank - 1:
        return "integer LayerNorm normalises over the last axis only"
    width = (x.shape or [None])[-1]
    if not isinstance(width, int) or width <= 0:
        return "integer LayerNorm needs a static last dimension"
    if width > ip.LAYER_NORM_MAX_WIDTH:
        return f"integer LayerNorm takes widths up to {ip.LAYER_NORM_MAX_WIDTH}, not {width}"
    gamma = _constant(node.inputs[1] if len(node.inputs) > 1 else None)
    if gamma is None or gamma.size not in (1, width):
        return "integer LayerNorm needs a constant scale of one value per channel"
    if len(node.inputs) > 2 and node.inputs[2].name:
        beta = _constant(node.inputs[2])
        if beta is None or beta.size not in (1, width):
            return "integer LayerNorm needs a constant bias of one value per channel"
    if len(node.outputs) > 1 and any(t.name and t.outputs for t in node.outputs[1:]):
        return "integer LayerNorm does not produce the mean / inverse std outputs"
    return None


def layer_norm_operands(
    node: gs.Node, quantized: Collection[str], absorbed: Collection[str]
) -> tuple[list[gs.Tensor], gs.Node | None] | str:
    """The quantized tensors the integer LayerNorm reads, with the residual Add it absorbs
    (None when it reads its own quantized input), or why there are none."""
    reason = layer_norm_blocker(node)
    if reason is not None:
        return reason
    x = node.inputs[0]
    if x.name in quantized:
        return [x], None
    add = x.inputs[0] if len(x.inputs) == 1 else None
    if add is None or QGraph.kind(add) is not OpKind.ADD or len(x.outputs) != 1:
        return "its input is neither quantized nor a residual Add (it runs in float)"
    operands = [t for t in add.inputs if isinstance(t, gs.Variable)]
    if len(add.inputs) != 2 or len(operands) != 2 or add.name in absorbed:
        return "its input Add does not add two activations"
    missing = [t.name for t in operands if t.name not in quantized]
    if missing:
        return f"its input Add reads unquantized {', '.join(missing)} (it runs in float)"
    if list(operands[0].shape or []) != list(operands[1].shape or []):
        return "its input Add broadcasts"
    return operands, add


@dataclass(frozen=True)
class IntegerLayerNorm:
    op: ip.LayerNorm
    wide: ActQuant  # the quantizer of acc (the op's wide_output, when it has one)


def integer_layer_norm(
    node: gs.Node,
    inputs: list[tuple[str, ActQuant]],
    output: tuple[str, ActQuant] | None,
    wide_output: str | None,
) -> IntegerLayerNorm | str:
    """The integer op for ``node`` reading the codes ``inputs`` (8-bit, or wide int32 ones of
    an earlier LayerNorm) and writing ``output`` (8-bit codes and their quantizer) and / or
    ``wide_output`` (see the module docstring), or why there is none."""
    reason = layer_norm_blocker(node)
    if reason is not None:
        return reason
    width = int(node.inputs[0].shape[-1])
    gamma_constant = _constant(node.inputs[1])
    if gamma_constant is None:  # layer_norm_blocker has checked it
        return "integer LayerNorm needs a constant scale"
    gamma_real = np.broadcast_to(gamma_constant, (width,)).astype(np.float64)
    beta_node = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    beta_constant = _constant(beta_node)
    beta_real = np.zeros(width) if beta_constant is None else beta_constant
    beta_real = np.broadcast_to(beta_real, (width,)).astype(np.float64)
    eps = float(node.attrs.get("epsilon", 1e-5))

    # the common fine scale: a wide input is fine already; two 8-bit ones get P more bits
    scales = [q.scale for _, q in inputs]
    wide_input = any(q.bits > 8 for _, q in inputs)
    refine = 1 if wide_input or len(inputs) == 1 else 2**LAYER_NORM_INPUT_BITS
    fine = min(scales) / refine
    mults = [round(s / fine) for s in scales]
    largest_v = sum(
        m * max(q.qmax - q.zero_point, q.zero_point - q.qmin)
        for m, (_, q) in zip(mults, inputs, strict=True)
    )
    largest_c = 2 * width * largest_v
    var_shift = 0
    while width * (largest_c >> var_shift) ** 2 >= INT64_HEADROOM // 2:
        var_shift += 1
    eps_real = width**3 * eps / (fine**2 * 4.0**var_shift)

    frac = LAYER_NORM_FRAC_BITS
    norm_mult = round(math.sqrt(width) * 2**frac)
    largest_gamma = float(np.abs(gamma_real).max())
    gamma_shift = LAYER_NORM_GAMMA_BITS
    if largest_gamma > 0:
        gamma_shift = LAYER_NORM_GAMMA_BITS - 1 - math.floor(math.log2(largest_gamma))

    def acc_bound(shift: int) -> float:
        return 2 * norm_mult * largest_gamma * 2.0**shift + float(
            np.abs(beta_real).max() * 2.0 ** (frac + shift)
        )

    while acc_bound(gamma_shift) >= 2**31 - 2**20 and gamma_shift > -frac:
        gamma_shift -= 1  # acc (the wide output) stays an int32
    total_shift = frac + gamma_shift
    if acc_bound(gamma_shift) >= 2**31 - 2**20 or total_shift < 1:
        return "integer LayerNorm: gamma and beta are too large for an int32 output"
    gamma = np.round(gamma_real * 2.0**gamma_shift).astype(np.int64)
    beta = np.round(beta_real * 2.0**total_shift).astype(np.int64)
    wide = ActQuant(2.0**-total_shift, 0, ip.WIDE_BITS, True)
    bounds = {"eps": eps_real, "|c| S": largest_c * norm_mult}
    too_large = [name for name, bound in bounds.items() if bound >= INT64_HEADROOM // 2]
    if too_large:
        return f"integer LayerNorm: {', '.join(too_large)} could leave int64"
    requant = None
    if output is not None:
        qy = output[1]
        mult, shift = dyadic(wide.scale / qy.scale)
        requant = ip.Requant(mult, shift, qy.zero_point, qy.qmin, qy.qmax, axis=-1)
    if output is None and wide_output is None:
        return "integer LayerNorm: nothing reads its output"
    op = ip.LayerNorm(
        output[0] if output is not None else str(wide_output),
        tuple(name for name, _ in inputs),
        tuple(q.zero_point for _, q in inputs),
        tuple(mults),
        var_shift,
        round(eps_real),
        norm_mult,
        gamma,
        beta,
        requant,
        wide_output if output is not None else None,
    )
    return IntegerLayerNorm(op, wide)
