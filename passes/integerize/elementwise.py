"""Ops on quantized activations: activation x activation MatMul, Add (one rounding), Mul,
GlobalAveragePool, HardSigmoid, HardSwish, LeakyRelu / PRelu, and elementwise float chains as
lookup tables."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq import integer_program as ip
from dyadiq.dyadic import dyadic
from dyadiq.graph import activation_bounds, is_whole_input_average_pool
from dyadiq.op_facts import OpKind
from dyadiq.passes.elementwise_lookup import lookup_chain, lookup_table
from dyadiq.passes.integerize.state import (
    IntegerizerState,
    _code_bounds,
    _requant,
    _static_shape,
)

HARD_SWISH_FRAC_BITS = 15


class ElementwiseOps(IntegerizerState):
    def _act_matmul(self, node: gs.Node) -> bool:
        a, b = node.inputs[0], node.inputs[1]
        qa, qb = self.q(a), self.q(b)
        a_codes, b_codes = self.codes(a), self.codes(b)
        out_codes, qy = self.define(node.outputs[0])
        self.ops.append(
            ip.MatMul(
                out_codes,
                a_codes,
                qa.zero_point,
                _requant(qa.scale * qb.scale / qy.scale, qy, axis=-1),
                weight_input=b_codes,
                weight_zero_point=qb.zero_point,
            )
        )
        return True

    def _add(self, node: gs.Node) -> bool:
        a, b = node.inputs[0], node.inputs[1]
        if not self._quantized(a, b):
            return False  # a constant operand: runs in float (bias adds fuse in a later pass)
        qa, qb = self.q(a), self.q(b)
        a_codes, b_codes = self.codes(a), self.codes(b)
        output, (real_lo, real_hi) = self._add_output(node)
        out_codes, qy = self.define(output)
        qmin, qmax = _code_bounds(qy, real_lo, real_hi)
        if self.single_rounding_add:
            (ma, mb), k = common_shift_dyadic(qa.scale / qy.scale, qb.scale / qy.scale)
            mults, shifts = (ma, mb), (k, k)
        else:
            (ma_, ka_), (mb_, kb_) = dyadic(qa.scale / qy.scale), dyadic(qb.scale / qy.scale)
            mults, shifts = (int(ma_[0]), int(mb_[0])), (int(ka_[0]), int(kb_[0]))
        self.ops.append(
            ip.Add(
                out_codes,
                (a_codes, b_codes),
                (qa.zero_point, qb.zero_point),
                mults,
                shifts,
                qy.zero_point,
                qmin,
                qmax,
                single_rounding=self.single_rounding_add,
            )
        )
        return True

    def _add_output(self, node: gs.Node) -> tuple[gs.Tensor, tuple[float, float]]:
        """The tensor an Add writes codes for, and the real interval they clamp to: a Relu or
        Clip after it (ResNet's residual Add -> Relu) is absorbed as clip bounds on the codes,
        as for a weighted layer, since Q(relu(x)) = clip(Q(x), Q(0), qmax)."""
        act_id = self.sites.fused_activations.get(node.name)
        if act_id is None:
            return node.outputs[0], (-np.inf, np.inf)
        act = self.graph.node(act_id)
        return act.outputs[0], activation_bounds(act)

    def _mul(self, node: gs.Node) -> bool:
        a, b = node.inputs[0], node.inputs[1]
        if not self._quantized(a, b):
            return False
        qa, qb = self.q(a), self.q(b)
        a_codes, b_codes = self.codes(a), self.codes(b)
        out_codes, qy = self.define(node.outputs[0])
        rq = _requant(qa.scale * qb.scale / qy.scale, qy)
        self.ops.append(ip.Mul(out_codes, (a_codes, b_codes), (qa.zero_point, qb.zero_point), rq))
        return True

    def _gap(self, node: gs.Node) -> bool:
        x = node.inputs[0]
        shape = _static_shape(x)
        count = int(np.prod(shape[2:]))
        qx = self.q(x)
        x_codes = self.codes(x)
        out_codes, qy = self.define(node.outputs[0])
        rq = _requant(qx.scale / (count * qy.scale), qy)
        self.ops.append(ip.GlobalAvgPool(out_codes, x_codes, qx.zero_point, rq))
        return True

    def _whole_input_average_pool(self, node: gs.Node) -> bool:
        """An AveragePool over its whole input is a GlobalAveragePool; smaller windows (with
        their border and padding rules) have no integer kernel and run in float."""
        return is_whole_input_average_pool(node) and self._gap(node)

    def _hard_sigmoid(self, node: gs.Node) -> bool:
        x = node.inputs[0]
        alpha = float(node.attrs.get("alpha", 0.2))
        beta = float(node.attrs.get("beta", 0.5))
        qx = self.q(x)
        x_codes = self.codes(x)
        out_codes, qy = self.define(node.outputs[0])
        bounds = _code_bounds(qy, 0.0, 1.0)
        rq = _requant(alpha * qx.scale / qy.scale, qy, bounds=bounds)
        offset = int(np.round(beta / qy.scale))
        self.ops.append(ip.HardSigmoid(out_codes, x_codes, qx.zero_point, rq, offset))
        return True

    def _hard_swish(self, node: gs.Node) -> bool:
        x = node.inputs[0]
        qx = self.q(x)
        x_codes = self.codes(x)
        out_codes, qy = self.define(node.outputs[0])
        frac = HARD_SWISH_FRAC_BITS
        gm, gk = dyadic(qx.scale * 2**frac / 6.0)
        rq = _requant(qx.scale / (2**frac * qy.scale), qy)
        self.ops.append(
            ip.HardSwish(out_codes, x_codes, qx.zero_point, int(gm[0]), int(gk[0]), frac, rq)
        )
        return True

    def _leaky_relu(self, node: gs.Node) -> bool:
        x, out = node.inputs[0], node.outputs[0]
        if self.graph.kind(node) is OpKind.LEAKY_RELU:
            slope = np.array([float(node.attrs.get("alpha", 0.01))])
        else:
            tensor = node.inputs[1]
            if not isinstance(tensor, gs.Constant):
                return False
            slope = np.asarray(tensor.values, np.float64)
            channels = (x.shape or [0, 0])[1] if len(x.shape or ()) > 1 else 0
            if slope.size not in (1, channels) or (slope.size > 1 and slope.shape[0] != channels):
                return False  # only scalar or per-channel (C, 1, ...) slopes are dyadic here
            slope = slope.reshape(-1)
        if (slope < 0).any():
            return False  # a negative slope flips signs: keep it in float
        qx = self.q(x)
        x_codes = self.codes(x)
        out_codes, qy = self.define(out)
        positive = _requant(qx.scale / qy.scale, qy)
        negative_mult, negative_shift = dyadic(slope * qx.scale / qy.scale)
        self.ops.append(
            ip.LeakyRelu(out_codes, x_codes, qx.zero_point, positive, negative_mult, negative_shift)
        )
        return True

    def _requantized_activation(self, node: gs.Node) -> bool:
        """A Relu / Clip that no layer absorbs and whose output has its own scale (a Relu
        after a Concat, whose scale group it would otherwise clip): requantize v = q - z_x and
        clip, as a LeakyRelu whose negative slope is 0 (a lower bound >= 0 clips the negative
        part away anyway) or 1 (a lower bound below 0 keeps part of it). One that shares its
        input's scale is a clip of the codes."""
        x, out = node.inputs[0], node.outputs[0]
        real_lo, real_hi = activation_bounds(node)
        qx = self.q(x)
        x_codes = self.codes(x)
        out_codes, qy = self.define(out)
        bounds = _code_bounds(qy, real_lo, real_hi)
        if qx == qy:  # one scale group: a clip of the codes
            self.ops.append(ip.Clip(out_codes, x_codes, *bounds))
            return True
        ratio = qx.scale / qy.scale
        negative_mult, negative_shift = dyadic(np.array([ratio if real_lo < 0 else 0.0]))
        positive = _requant(ratio, qy, bounds=bounds)
        self.ops.append(
            ip.LeakyRelu(out_codes, x_codes, qx.zero_point, positive, negative_mult, negative_shift)
        )
        return True

    def _lookup(self, node: gs.Node) -> bool:
        """An elementwise float chain from one quantized tensor to another, starting at
        ``node``, as one integer table (:mod:`dyadiq.passes.elementwise_lookup`)."""
        chain = lookup_chain(self.graph, node, self.params, self.absorbed)
        if chain is None:
            return False
        qx, qy = self.q(chain.source), self.q(chain.result)
        table = lookup_table(chain, qx, qy, qx.signed, self.graph.opset)
        if table is None:
            return False
        x_codes = self.codes(chain.source)
        out_codes, _ = self.define(chain.result)
        self.ops.append(ip.Lookup(out_codes, x_codes, table))
        self.tabulated.update(n.name for n in chain.nodes)
        return True


def common_shift_dyadic(ratio_a: float, ratio_b: float) -> tuple[tuple[int, int], int]:
    """``((m_a, m_b), k)`` with ``m_x / 2^k ~ ratio_x`` and one k for both.

    k is the smaller of the two best shifts, so both m stay below 2^31 and the larger ratio
    keeps its full precision; the smaller one keeps at least 31 - log2(ratio_a / ratio_b)
    bits. With |v| < 2^8 each product is below 2^39, their sum far inside int64.
    """
    (_, ka), (_, kb) = dyadic(ratio_a), dyadic(ratio_b)
    k = int(min(ka[0], kb[0]))
    return (int(np.round(ratio_a * 2.0**k)), int(np.round(ratio_b * 2.0**k))), k
