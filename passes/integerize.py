"""Rewrite: a calibrated, planned graph -> an :class:`IntegerProgram` (HAWQ-V3 dyadic).

Preconditions: BatchNorm folded, hard-swish canonicalized, and the activation quantizers of the
QDQ simulator computed for the same plan (``insert_qdq``), so that the integer model quantizes
exactly the tensors the simulator quantizes, with the same scales and zero points.

Per op (v = q - z, the zero-point-free codes):
- weighted Conv / Gemm / MatMul: acc = sum(v_x * q_w) + q_b  (int32, q_b = round(b/(s_x s_w)));
  y = clip(requant(acc; s_x s_w[c] / s_y) + z_y, lo, hi), fused Relu/Clip bounds in lo/hi;
- Add: one rounding of v_a m_a + v_b m_b over a common shift, as the simulator rounds
  (``single_rounding_add=False``: requant(v_a; s_a/s_y) + requant(v_b; s_b/s_y) + z_y);
  Mul: requant(v_a v_b; s_a s_b/s_y);
- GlobalAveragePool: requant(sum_hw v; s_x / (H W s_y));  HardSigmoid, HardSwish in fixed point;
- MaxPool, Reshape-likes, Transpose, Concat, Max, Min: on codes (they share one scale);
- an elementwise float chain from one quantized tensor to another (SiLU, Sigmoid, Tanh, GELU):
  a 256-entry table of output codes (``elementwise_lookup``);
- ConvTranspose with stride = kernel (no overlap): a 1x1 Conv to C_out kh kw columns, then
  Reshape / Transpose on codes interleave them (``conv_transpose_blocker`` says when not);
- LayerNormalization: I-BERT's integer LayerNorm over its input's codes or over the residual
  Add before it, summed wide (``integer_layer_norm``); where the simulator keeps the output
  (the residual stream) in float, the op also writes it as int32 codes for the next one;
- Softmax(scores + attention mask): one masked softmax that reads the integer mask the float
  mask was made from (``masked_softmax``; declined candidates are listed in the notes).
Everything else runs in float between Dequantize and Quantize and is listed in ``float_ops``.
Every weighted layer's accumulator is bounded first; a possible int32 overflow is an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from dyadiq import integer_program as ip
from dyadiq.dyadic import dyadic
from dyadiq.errors import InternalError, UnsupportedModelError
from dyadiq.graph import QGraph, activation_bounds, weight_channel_axis
from dyadiq.op_facts import OpKind
from dyadiq.passes.activation_sites import ActivationSites
from dyadiq.passes.elementwise_lookup import lookup_chain, lookup_table
from dyadiq.passes.integer_layer_norm import (
    IntegerLayerNorm,
    integer_layer_norm,
    layer_norm_operands,
)
from dyadiq.passes.masked_softmax import MaskedSoftmaxMatch, find_masked_softmax
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import (
    ROUND_TO_NEAREST,
    ActQuant,
    WeightQuantizer,
    with_representable_bias,
)

HARD_SWISH_FRAC_BITS = 15
SOFTMAX_FRAC_BITS = 16
SOFTMAX_WORK_BITS = 10
INT32_LIMIT = 2**31 - 1


class AccumulatorOverflowError(UnsupportedModelError):
    """A layer's int32 accumulator could overflow for some input.

    ``layers`` maps each such layer to its worst-case |accumulator|, so that a caller can keep
    exactly those layers in float (:func:`dyadiq.pipeline.quantize` does, unless strict)."""

    def __init__(self, message: str, layers: dict[str, int] | None = None) -> None:
        super().__init__(message)  # args stay (message,), so the error still pickles
        self.layers = dict(layers or {})


def _requant(
    multiplier: float | np.ndarray,
    out: ActQuant,
    axis: int = 1,
    bounds: tuple[int, int] | None = None,
) -> ip.Requant:
    mult, shift = dyadic(multiplier)
    lo, hi = bounds if bounds is not None else (out.qmin, out.qmax)
    return ip.Requant(mult, shift, out.zero_point, lo, hi, axis)


def _code_bounds(out: ActQuant, real_lo: float, real_hi: float) -> tuple[int, int]:
    """Integer clip bounds for a real interval, as Q(clip(x)) = clip(Q(x), Q(lo), Q(hi))."""
    lo, hi = out.qmin, out.qmax
    if np.isfinite(real_lo):
        lo = max(lo, int(np.round(real_lo / out.scale)) + out.zero_point)
    if np.isfinite(real_hi):
        hi = min(hi, int(np.round(real_hi / out.scale)) + out.zero_point)
    return lo, hi


def _static_shape(tensor: gs.Tensor) -> tuple[int, ...]:
    """Static dims; a dynamic leading (batch) dim becomes 0, ONNX Reshape's "copy" marker."""
    dims = []
    for i, d in enumerate(tensor.shape or ()):
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        elif i == 0:
            dims.append(0)
        else:
            raise UnsupportedModelError(f"tensor {tensor.name} has a dynamic dim {d} at axis {i}")
    return tuple(dims)


def _known_dims(tensor: gs.Tensor) -> tuple[int, ...]:
    """:func:`_static_shape` with -1 for any dynamic dim after the first."""
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in tensor.shape or ()]
    if dims and dims[0] < 0:
        dims[0] = 0
    return tuple(dims)


def _onnx_type(tensor: gs.Tensor) -> int:
    dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
    return int(onnx.helper.np_dtype_to_tensor_dtype(dtype))


class _Integerizer:
    def __init__(
        self,
        graph: QGraph,
        plan: PrecisionPlan,
        sites: ActivationSites,
        params: Mapping[str, ActQuant],
        single_rounding_add: bool = True,
        weights: WeightQuantizer = ROUND_TO_NEAREST,
    ) -> None:
        self.graph = graph
        self.weights = weights
        self.single_rounding_add = single_rounding_add
        self.plan = plan
        self.sites = sites
        self.params = dict(params)  # LayerNorm outputs get their consumers' quantizers
        self.ops: list[ip.IntOp] = []
        self.quant: dict[str, ActQuant] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.int_name: dict[str, str] = {}
        self.float_ready: set[str] = set()
        self.float_ops: list[str] = []
        self.absorbed = set(sites.fused_activations.values()) | set(sites.fused_biases.values())
        self.tabulated: set[str] = set()  # nodes folded into an ip.Lookup
        self.notes: list[str] = []
        masked = find_masked_softmax(graph, params.keys(), self._softmax_blocker)
        self.masked_softmax = masked.matches
        self.tabulated.update(masked.absorbed)  # Softmax and mask ops a match replaces
        self.notes.extend(f"masked softmax declined: {reason}" for reason in masked.declined)
        self.wide_of: dict[str, str] = {}  # float tensor -> its wide int32 codes
        self.layer_norms = self._plan_layer_norms()

    # --- tensor availability -----------------------------------------------------------------
    def codes(self, tensor: gs.Tensor) -> str:
        """The integer codes of a quantized float tensor, quantizing a float value if needed."""
        name = tensor.name
        if name in self.int_name:
            return self.int_name[name]
        if name not in self.params or name not in self.float_ready:
            raise InternalError(f"{name} has no integer form")
        codes = f"{name}_q"
        self.quant[codes] = self.params[name]
        self.shapes[codes] = _static_shape(tensor)
        graph_inputs = {t.name for t in self.graph.graph.inputs}
        op_type = ip.QuantizeInput if name in graph_inputs else ip.Quantize
        self.ops.append(op_type(codes, name))
        self.int_name[name] = codes
        return codes

    def real(self, tensor: gs.Tensor) -> str:
        """The float value of a tensor, dequantizing integer codes if needed (the wide ones,
        unclipped, when it has them)."""
        name = tensor.name
        if name not in self.float_ready:
            self.ops.append(ip.Dequantize(name, self.wide_of.get(name) or self.int_name[name]))
            self.float_ready.add(name)
        return name

    def define(self, tensor: gs.Tensor) -> tuple[str, ActQuant]:
        """Declare the integer codes an op produces for the quantized tensor ``tensor``."""
        codes = f"{tensor.name}_q"
        self.int_name[tensor.name] = codes
        self.quant[codes] = self.params[tensor.name]
        self.shapes[codes] = _static_shape(tensor)
        return codes, self.params[tensor.name]

    def q(self, tensor: gs.Tensor) -> ActQuant:
        return self.params[tensor.name]

    # --- dispatch ----------------------------------------------------------------------------
    def run(self) -> ip.IntegerProgram:
        g = self.graph.graph
        g.toposort()
        for tensor in g.inputs:
            self.float_ready.add(tensor.name)
        self._check_overflow()
        layer_of = {act: layer for layer, act in self.sites.fused_activations.items()}
        layer_of.update({add: layer for layer, add in self.sites.fused_biases.items()})
        lowered: set[str] = set()
        for node in g.nodes:
            if node.name in self.absorbed and layer_of[node.name] in lowered:
                continue  # its bounds are the lowered layer's clip
            if node.name in self.tabulated:
                continue  # part of a lookup table (or masked softmax) an earlier node started
            if node.name in self.masked_softmax:
                self._masked_softmax(self.masked_softmax[node.name])
                lowered.add(node.name)
            elif node.name in self.layer_norms:
                self._layer_norm(node, self.layer_norms[node.name])
                lowered.add(node.name)
            elif self._lower(node):
                lowered.add(node.name)
            elif not self._lookup(node):
                self._float(node)
        outputs = [t.name for t in g.outputs]
        # a float output (an If's, say) may keep a dim only the data fixes: -1
        self.shapes.update(
            {
                t.name: _static_shape(t) if t.name in self.int_name else _known_dims(t)
                for t in g.outputs
            }
        )
        int_outputs = {}
        for name in outputs:
            codes = self.wide_of.get(name) or self.int_name.get(name)
            if codes is not None:
                int_outputs[name] = codes
                if name not in self.float_ready:
                    self.ops.append(ip.Dequantize(name, codes))
        inputs = {
            t.name: (np.dtype(t.dtype), _static_shape(t))
            for t in g.inputs
            if isinstance(t, gs.Variable)
        }
        return ip.IntegerProgram(
            self.ops,
            self.quant,
            self.shapes,
            inputs,
            outputs,
            int_outputs,
            self.float_ops,
            self.notes,
            opset=self.graph.opset,
        )

    def _quantized(self, *tensors: gs.Tensor) -> bool:
        return all(t.name in self.params for t in tensors)

    def _lower(self, node: gs.Node) -> bool:
        kind = self.graph.kind(node)
        weight = self.graph.weight(node)
        if weight is not None and kind in (OpKind.CONV, OpKind.GEMM, OpKind.MATMUL):
            if node.name not in self.plan.layers:
                return False
            return self._weighted(node, kind, weight)
        if weight is not None and kind is OpKind.CONV_TRANSPOSE:
            if node.name not in self.plan.layers or conv_transpose_blocker(node) is not None:
                return False  # a float island, as inspect says (conv_transpose_blocker)
            return self._weighted(node, kind, weight)
        data = [t for t in node.inputs if isinstance(t, gs.Variable)]
        out = node.outputs[0]
        if not data or not self._quantized(*data, out):
            return False
        if kind is OpKind.MATMUL and len(data) == 2:
            return self._act_matmul(node)
        lowering = {
            OpKind.ADD: self._add,
            OpKind.MUL: self._mul,
            OpKind.GLOBAL_AVGPOOL: self._gap,
            OpKind.HARD_SIGMOID: self._hard_sigmoid,
            OpKind.HARD_SWISH: self._hard_swish,
            OpKind.SOFTMAX: self._softmax,
            OpKind.LEAKY_RELU: self._leaky_relu,
            OpKind.PRELU: self._leaky_relu,
            OpKind.MAXPOOL: self._maxpool,
            OpKind.CONCAT: self._concat,
            OpKind.MAX: self._extremum,
            OpKind.MIN: self._extremum,
            OpKind.TRANSPOSE: self._transpose,
            OpKind.RESHAPE: self._reshape,
            OpKind.FLATTEN: self._reshape,
            OpKind.SQUEEZE: self._reshape,
            OpKind.UNSQUEEZE: self._reshape,
            OpKind.RELU: self._clip,
            OpKind.CLIP: self._clip,
        }.get(kind)
        return lowering(node) if lowering is not None else False

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

    def _float(self, node: gs.Node) -> None:
        proto = OnnxExporter.export_node(node)
        tensors = self.graph.tensors()
        # an If / Loop / Scan body may read tensors of this graph by name (outer scope): they
        # are inputs of the island too, or the island would run before they exist
        captured = [tensors[n] for n in outer_scope_names(proto) if n in tensors]
        read = [t for t in [*node.inputs, *captured] if t.name]
        inputs = [self.real(t) for t in read if isinstance(t, gs.Variable)]
        constants = {t.name: t for t in read if isinstance(t, gs.Constant)}
        initializers = tuple(OnnxExporter.export_tensor_proto(t) for t in constants.values())
        outputs = tuple(t.name for t in node.outputs)
        self.ops.append(
            ip.FloatIsland(
                (proto,),
                initializers,
                tuple(inputs),
                outputs,
                tuple(_onnx_type(tensors[n]) for n in inputs),
                tuple(_onnx_type(t) for t in node.outputs),
            )
        )
        self.float_ready.update(outputs)
        self.float_ops.append(f"{node.op} {node.name}")

    # --- weighted layers ---------------------------------------------------------------------
    def _layer_output(self, node: gs.Node) -> tuple[gs.Tensor, tuple[float, float]]:
        output = node.outputs[0]
        bias_id = self.sites.fused_biases.get(node.name)
        if bias_id is not None:
            output = self.graph.node(bias_id).outputs[0]
        act_id = self.sites.fused_activations.get(node.name)
        if act_id is None:
            return output, (-np.inf, np.inf)
        act = self.graph.node(act_id)
        return act.outputs[0], activation_bounds(act)

    def _bias_values(self, node: gs.Node) -> np.ndarray | None:
        """The float bias: the layer's own bias input, or a fused constant Add after it."""
        facts = self.graph.facts(node)
        if facts.bias_input is not None and facts.bias_input < len(node.inputs):
            b = node.inputs[facts.bias_input]
            if isinstance(b, gs.Constant):
                return np.asarray(b.values, np.float64).reshape(-1)
        bias_id = self.sites.fused_biases.get(node.name)
        if bias_id is not None:
            add = self.graph.node(bias_id)
            const = next(t for t in add.inputs if isinstance(t, gs.Constant))
            return np.asarray(const.values, np.float64).reshape(-1)
        return None

    def _quantized_weight(
        self, node: gs.Node, weight: gs.Constant, kind: OpKind
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        bits = self.plan.layers[node.name].weight_bits
        axis = weight_channel_axis(node) % weight.values.ndim
        float_weight = np.asarray(weight.values, np.float32)
        wq = self.weights.weight_quant(node.name, float_weight, bits, axis)
        bias = None
        values = self._bias_values(node)
        if values is not None:
            values = np.asarray(self.weights.bias(node.name, bits, values), np.float64)
            s_x = self.q(node.inputs[0]).scale
            if self._has_own_bias(node):  # as insert_qdq does: the QDQ model must agree
                wq = with_representable_bias(wq, float_weight, values, s_x)
            scales = wq.scales.astype(np.float32) * np.float32(s_x)
            bias = np.round(values / scales).astype(np.int64)
        codes = wq.values
        if kind is OpKind.GEMM and weight_channel_axis(node) == 0:
            codes = codes.T  # stored [N, K] (transB): the integer MatMul wants [K, N]
        return np.ascontiguousarray(codes), wq.scales, bias, bits

    def _has_own_bias(self, node: gs.Node) -> bool:
        facts = self.graph.facts(node)
        index = facts.bias_input
        return (
            index is not None
            and index < len(node.inputs)
            and isinstance(node.inputs[index], gs.Constant)
        )

    def _weighted(self, node: gs.Node, kind: OpKind, weight: gs.Constant) -> bool:
        x = node.inputs[0]
        out, (real_lo, real_hi) = self._layer_output(node)
        if not self._quantized(x, out):
            return False
        if kind is OpKind.GEMM and (
            int(node.attrs.get("transA", 0))
            or float(node.attrs.get("alpha", 1.0)) != 1.0
            or float(node.attrs.get("beta", 1.0)) != 1.0
        ):
            return False
        if kind is OpKind.CONV:
            if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                raise UnsupportedModelError(
                    f"{node.name}: auto_pad is not supported; simplify first"
                )
            if np.asarray(weight.values).ndim != 4:
                # a 1-D or 3-D convolution runs in float; decided before any codes are
                # declared, or consumers would read codes that nothing produces
                return False
        codes, w_scales, bias, bits = self._quantized_weight(node, weight, kind)
        if bias is not None:
            bias = bias.astype(np.int32)
        x_codes = self.codes(x)
        qx = self.q(x)
        out_codes, qy = self.define(out)
        bounds = _code_bounds(qy, real_lo, real_hi)
        multiplier = qx.scale * w_scales.astype(np.float64) / qy.scale
        if kind is OpKind.CONV_TRANSPOSE:
            operands = (x_codes, qx, out_codes, qy)
            self._conv_transpose(node, operands, codes, bias, multiplier, bounds, bits)
            return True
        if kind is OpKind.CONV:
            spatial = codes.ndim - 2
            self.ops.append(
                ip.Conv(
                    out_codes,
                    x_codes,
                    qx.zero_point,
                    codes,
                    bias,
                    tuple(node.attrs.get("strides", [1] * spatial)),
                    tuple(node.attrs.get("pads", [0] * 2 * spatial)),
                    tuple(node.attrs.get("dilations", [1] * spatial)),
                    int(node.attrs.get("group", 1)),
                    _requant(multiplier, qy, axis=1, bounds=bounds),
                    bits,
                )
            )
        else:
            self.ops.append(
                ip.MatMul(
                    out_codes,
                    x_codes,
                    qx.zero_point,
                    _requant(multiplier, qy, axis=-1, bounds=bounds),
                    weight=codes,
                    bias=bias,
                    weight_bits=bits,
                )
            )
        return True

    def _check_overflow(self) -> None:
        """Bound |acc| over all inputs: sum_k |q_w[c, k]| * max|v_x| + |q_b[c]| < 2^31."""
        risky: dict[str, int] = {}
        for layer_id in self.plan.layers:
            node = self.graph.node(layer_id)
            weight = self.graph.weight(node)
            x = node.inputs[0]
            if weight is None or x.name not in self.params:
                continue
            kind = self.graph.kind(node)
            codes, _, bias, _ = self._quantized_weight(node, weight, kind)
            qx = self.params[x.name]
            vmax = max(abs(qx.qmin - qx.zero_point), abs(qx.qmax - qx.zero_point))
            magnitudes = np.abs(codes.astype(np.int64))
            if kind is OpKind.CONV:
                per_channel = magnitudes.reshape(codes.shape[0], -1).sum(axis=1)
            elif kind is OpKind.CONV_TRANSPOSE:  # [C_in, C_out, kh, kw]: every tap may overlap
                per_channel = magnitudes.sum(axis=(0, 2, 3))
            else:
                per_channel = magnitudes.sum(axis=0)
            bound = per_channel * vmax + (np.abs(bias) if bias is not None else 0)
            if bound.max() > INT32_LIMIT:
                risky[layer_id] = int(bound.max())
        if risky:
            raise AccumulatorOverflowError(
                "int32 accumulators could overflow in: "
                + "; ".join(f"{layer} (worst-case |acc| {acc:,})" for layer, acc in risky.items())
                + ". Lower the weight or activation bits of these layers, or keep them in float.",
                risky,
            )

    def _conv_transpose(
        self,
        node: gs.Node,
        operands: tuple[str, ActQuant, str, ActQuant],
        codes: np.ndarray,
        bias: np.ndarray | None,
        multiplier: np.ndarray,
        bounds: tuple[int, int],
        bits: int,
    ) -> None:
        """A ConvTranspose whose stride equals its kernel (``conv_transpose_blocker`` is None)
        as existing integer ops: each input pixel writes its own kh x kw output block, so

            cols = Conv1x1(x; W[c_in, (c_out, i, j)])      (N, C_out kh kw, H, W), requantized
            y[n, o, h kh + i, w kw + j] = cols[n, (o, i, j), h, w]

        and the interleave is a chain of rank-4 Reshape / Transpose on codes (every consumer,
        the microcontroller one included, moves codes of rank <= 4). The requantization is per
        output channel, so it is the same before or after the interleave."""
        x_codes, qx, out_codes, qy = operands
        c_in, c_out, kh, kw = codes.shape
        taps = kh * kw
        n, _, h, w = _static_shape(node.inputs[0])
        weight = np.ascontiguousarray(codes.transpose(1, 2, 3, 0).reshape(c_out * taps, c_in, 1, 1))
        per_column = np.repeat(np.broadcast_to(np.atleast_1d(multiplier), (c_out,)), taps)

        def stage(index: int, shape: tuple[int, ...]) -> str:
            name = f"{out_codes}__convt{index}"
            self.quant[name] = qy
            self.shapes[name] = shape
            return name

        rows = n * c_out  # 0 when the batch is dynamic, as elsewhere in the program's shapes
        cols = stage(0, (n, c_out * taps, h, w))
        self.ops.append(
            ip.Conv(
                cols,
                x_codes,
                qx.zero_point,
                weight,
                np.repeat(bias, taps).astype(np.int32) if bias is not None else None,
                (1, 1),
                (0, 0, 0, 0),
                (1, 1),
                1,
                _requant(per_column, qy, axis=1, bounds=bounds),
                bits,
            )
        )
        # (N C_out kh, kw, H, W) -> (N C_out kh, H, W, kw): j moves next to w
        split = stage(1, (rows * kh, kw, h, w))
        self.ops.append(ip.Reshape(split, cols, (-1, kw, h, w)))
        moved = stage(2, (rows * kh, h, w, kw))
        self.ops.append(ip.Transpose(moved, split, (0, 2, 3, 1)))
        # (N C_out, kh, H, W kw) -> (N C_out, H, kh, W kw): i moves next to h
        grouped = stage(3, (rows, kh, h, w * kw))
        self.ops.append(ip.Reshape(grouped, moved, (-1, kh, h, w * kw)))
        interleaved = stage(4, (rows, h, kh, w * kw))
        self.ops.append(ip.Transpose(interleaved, grouped, (0, 2, 1, 3)))
        self.ops.append(ip.Reshape(out_codes, interleaved, (-1, c_out, h * kh, w * kw)))

    # --- activation ops ----------------------------------------------------------------------
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
        out_codes, qy = self.define(node.outputs[0])
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
                qy.qmin,
                qy.qmax,
                single_rounding=self.single_rounding_add,
            )
        )
        return True

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

    @staticmethod
    def _softmax_constants(qx: ActQuant) -> tuple[int, int, int, int] | str:
        """(upscale bits, q_ln2, q_b, q_c) of the I-BERT exp at input scale ``qx.scale``, or
        why this scale has none."""
        # Work at a scale of at most 2^-10 so that ln 2 and the fit's constants have ~10 bits.
        upscale = max(0, int(np.ceil(np.log2(qx.scale * 2**SOFTMAX_WORK_BITS))))
        if upscale > ip.SOFTMAX_MAX_UPSCALE_BITS:
            return "logits too large for the int64 working scale"
        work = qx.scale / 2**upscale
        if work < 2.0**-20:
            return "(p + q_b)^2 2^F could leave int64 at this fine an input scale"
        ln2_codes = int(np.floor(np.log(2.0) / work))
        # I-BERT's second-order fit exp(p) ~ 0.3585 (p + 1.353)^2 + 0.344 on (-ln 2, 0];
        # q_c folds c into the squared term's scale a S^2.
        b_codes = int(np.floor(1.353 / work))
        c_codes = int(np.floor(0.344 / (0.3585 * work**2)))
        return upscale, ln2_codes, b_codes, c_codes

    def _softmax_blocker(self, scores: gs.Tensor) -> str | None:
        found = self._softmax_constants(self.q(scores))
        return found if isinstance(found, str) else None

    def _softmax(self, node: gs.Node) -> bool:
        x, out = node.inputs[0], node.outputs[0]
        rank = len(x.shape or ())
        if int(node.attrs.get("axis", -1)) % max(rank, 1) != rank - 1:
            return False
        constants = self._softmax_constants(self.q(x))
        if isinstance(constants, str):
            return False  # keep this softmax in float
        x_codes = self.codes(x)
        out_codes, qy = self.define(out)
        frac = SOFTMAX_FRAC_BITS
        rq = _requant(1.0 / (2**frac * qy.scale), qy, axis=-1)
        self.ops.append(ip.Softmax(out_codes, x_codes, *constants, frac, rq))
        return True

    def _masked_softmax(self, match: MaskedSoftmaxMatch) -> None:
        constants = self._softmax_constants(self.q(match.scores))
        if isinstance(constants, str):
            raise InternalError(f"{match.add.name}: a matched masked softmax {constants}")
        x_codes = self.codes(match.scores)
        keep = match.keep.name
        if keep not in self.float_ready:
            raise InternalError(f"{match.add.name}: the mask {keep} is not computed before it")
        self.shapes.setdefault(keep, _known_dims(match.keep))
        out_codes, qy = self.define(match.softmax.outputs[0])
        frac = SOFTMAX_FRAC_BITS
        rq = _requant(1.0 / (2**frac * qy.scale), qy, axis=-1)
        self.ops.append(
            ip.MaskedSoftmax(out_codes, x_codes, keep, match.keep_nonzero, *constants, frac, rq)
        )

    def _plan_layer_norms(self) -> dict[str, IntegerLayerNorm]:
        """LayerNorm node -> its integer op, in graph order; a residual Add it absorbs is
        skipped (``tabulated``); a LayerNorm that stays float says why (notes).

        Its 8-bit output takes the quantizer the simulator gives the output, or else the one
        of a scale-sharing consumer (the Reshape before a MatMul); a wide int32 output carries
        the value the simulator keeps in float (the residual stream) to the next LayerNorm."""
        planned: dict[str, IntegerLayerNorm] = {}
        simulated = set(self.params)
        codes = {name: (f"{name}_q", q) for name, q in self.params.items()}
        graph_outputs = {t.name for t in self.graph.graph.outputs}
        self.graph.graph.toposort()
        for node in self.graph.nodes():
            if self.graph.kind(node) is not OpKind.LAYER_NORM:
                continue
            out = node.outputs[0]
            found = layer_norm_operands(node, codes.keys(), self.tabulated)
            if isinstance(found, str):
                self.notes.append(f"LayerNormalization {node.name} in float: {found}")
                self._float_output_codes(out, codes)
                continue
            operands, add = found
            out_q = self.params.get(out.name) or self._shared_quantizer(out)
            coded = [c for c in out.outputs if out_q is not None and self._keeps_codes(c)]
            wide = out.name not in simulated and (
                len(coded) < len(out.outputs) or out.name in graph_outputs
            )
            built = integer_layer_norm(
                node,
                [codes[t.name] for t in operands],
                (f"{out.name}_q", out_q) if out_q is not None else None,
                f"{out.name}_wide" if wide else None,
            )
            if isinstance(built, str):
                self.notes.append(f"LayerNormalization {node.name} in float: {built}")
                self._float_output_codes(out, codes)
                continue
            planned[node.name] = built
            if add is not None:
                self.tabulated.add(add.name)
            if out_q is not None:
                self.params[out.name] = out_q
                codes[out.name] = (f"{out.name}_q", out_q)
            if wide:  # the next LayerNorm reads the residual stream wide
                codes[out.name] = (f"{out.name}_wide", built.wide)
        return planned

    def _float_output_codes(self, out: gs.Tensor, codes: dict[str, tuple[str, ActQuant]]) -> None:
        """A float LayerNorm's output (the embeddings' in a BERT) gets 8-bit codes in its
        scale-sharing consumer's quantizer, so the next LayerNorm can read it: quantized where
        the simulator keeps it float (one 8-bit residual step), since only integer ops can
        write the wide int32 codes."""
        if out.name in self.params:
            return
        shared = self._shared_quantizer(out)
        if shared is not None:
            self.params[out.name] = shared
            codes[out.name] = (f"{out.name}_q", shared)
            self.notes.append(
                f"{out.name}: a float LayerNorm's output, quantized to 8 bits for the residual "
                "stream the simulator keeps in float"
            )

    def _shared_quantizer(self, tensor: gs.Tensor) -> ActQuant | None:
        """The quantizer of a scale-sharing consumer's quantized output (the Reshape of a
        LayerNorm's output before a MatMul), which the tensor's codes can share."""
        for consumer in tensor.outputs:
            if self._keeps_codes(consumer):
                return self.params[consumer.outputs[0].name]
        return None

    def _keeps_codes(self, node: gs.Node) -> bool:
        facts = self.graph.facts(node)
        return (
            facts.shares_input_scale
            and not facts.unifies_input_scales
            and len(node.outputs) == 1
            and node.outputs[0].name in self.params
        )

    def _layer_norm(self, node: gs.Node, built: IntegerLayerNorm) -> None:
        op = built.op
        names = []
        for tensor, name in zip(self._ln_operands(node), op.inputs, strict=True):
            names.append(name if name == self.wide_of.get(tensor.name) else self.codes(tensor))
        if tuple(names) != op.inputs:
            raise InternalError(f"{node.name}: integer LayerNorm reads {names}, not {op.inputs}")
        out = node.outputs[0]
        if op.requant is not None:
            out_codes, _ = self.define(out)
            if out_codes != op.output:
                raise InternalError(f"{node.name}: integer LayerNorm writes {out_codes}")
        wide = op.output if op.requant is None else op.wide_output
        if wide is not None:
            self.quant[wide] = built.wide
            self.shapes[wide] = _static_shape(out)
            self.wide_of[out.name] = wide
        self.ops.append(op)

    def _ln_operands(self, node: gs.Node) -> list[gs.Tensor]:
        x = node.inputs[0]
        if x.name in self.params or x.name in self.wide_of:
            return [x]
        return [t for t in x.inputs[0].inputs if isinstance(t, gs.Variable)]

    def _same_scale(self, node: gs.Node, tensors: list[gs.Tensor]) -> bool:
        q = {self.q(t) for t in tensors}
        if len(q) != 1:
            raise InternalError(f"{node.name}: inputs and output differ in scale")
        return True

    def _maxpool(self, node: gs.Node) -> bool:
        x, out = node.inputs[0], node.outputs[0]
        if int(node.attrs.get("ceil_mode", 0)) or any(
            d != 1 for d in node.attrs.get("dilations", [1])
        ):
            return False
        self._same_scale(node, [x, out])
        kernel = tuple(node.attrs["kernel_shape"])
        x_codes = self.codes(x)
        out_codes, _ = self.define(out)
        self.ops.append(
            ip.MaxPool(
                out_codes,
                x_codes,
                kernel,
                tuple(node.attrs.get("strides", [1] * len(kernel))),
                tuple(node.attrs.get("pads", [0] * 2 * len(kernel))),
            )
        )
        return True

    def _concat(self, node: gs.Node) -> bool:
        self._same_scale(node, [*node.inputs, node.outputs[0]])
        inputs = tuple(self.codes(t) for t in node.inputs)
        out_codes, _ = self.define(node.outputs[0])
        self.ops.append(ip.Concat(out_codes, inputs, int(node.attrs.get("axis", 0))))
        return True

    def _extremum(self, node: gs.Node) -> bool:
        """Max / Min of two activations in one scale group: compared as codes (:class:`ip.Max`)."""
        if len(node.inputs) != 2 or not all(isinstance(t, gs.Variable) for t in node.inputs):
            return False  # a constant operand or a variadic Max: runs in float
        out = node.outputs[0]
        self._same_scale(node, [*node.inputs, out])
        a_codes, b_codes = (self.codes(t) for t in node.inputs)
        out_codes, _ = self.define(out)
        op_type = ip.Max if self.graph.kind(node) is OpKind.MAX else ip.Min
        self.ops.append(op_type(out_codes, (a_codes, b_codes)))
        return True

    def _moved_codes(self, node: gs.Node) -> tuple[str, str]:
        """(input codes, output codes) of an op that only moves codes: one quantizer for both."""
        x, out = node.inputs[0], node.outputs[0]
        self._same_scale(node, [x, out])
        x_codes = self.codes(x)
        out_codes, _ = self.define(out)
        return x_codes, out_codes

    def _transpose(self, node: gs.Node) -> bool:
        x_codes, out_codes = self._moved_codes(node)
        rank = len(node.inputs[0].shape or ())
        perm = tuple(node.attrs.get("perm", range(rank)[::-1]))
        self.ops.append(ip.Transpose(out_codes, x_codes, perm))
        return True

    def _reshape(self, node: gs.Node) -> bool:
        x_codes, out_codes = self._moved_codes(node)
        self.ops.append(ip.Reshape(out_codes, x_codes, _static_shape(node.outputs[0])))
        return True

    def _clip(self, node: gs.Node) -> bool:
        x, out = node.inputs[0], node.outputs[0]
        if self.q(x) != self.q(out):
            return False  # a different output scale needs a requantization: run it in float
        lo, hi = _code_bounds(self.q(out), *activation_bounds(node))
        x_codes = self.codes(x)
        out_codes, _ = self.define(out)
        self.ops.append(ip.Clip(out_codes, x_codes, lo, hi))
        return True


def outer_scope_names(node: onnx.NodeProto) -> list[str]:
    """Tensors that ``node``'s subgraphs (If branches, Loop / Scan bodies, nested) read from
    the enclosing graph, in first-use order: names no subgraph defines before using them."""
    found: dict[str, None] = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            bodies = [attr.g]
        elif attr.type == onnx.AttributeProto.GRAPHS:
            bodies = list(attr.graphs)
        else:
            continue
        for body in bodies:
            local = {i.name for i in body.input} | {t.name for t in body.initializer}
            local |= {t.values.name for t in body.sparse_initializer}
            for inner in body.node:
                for name in [*inner.input, *outer_scope_names(inner)]:
                    if name and name not in local:
                        found[name] = None
                local.update(inner.output)
    return list(found)


def conv_transpose_blocker(node: gs.Node) -> str | None:
    """Why a ConvTranspose runs as a float island in integer models, or None when integerize
    lowers it (2-D, one group, stride equal to the kernel, no padding, dilation or output
    padding: the non-overlapping upsampling of FPN / DB-style detector heads)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(weight, gs.Constant) or np.asarray(weight.values).ndim != 4:
        return "integer ConvTranspose needs a constant 2-D kernel"
    kernel = list(np.asarray(weight.values).shape[2:])
    attrs = node.attrs
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return "integer ConvTranspose does not take auto_pad"
    if int(attrs.get("group", 1)) != 1:
        return "integer ConvTranspose needs group 1"
    if [int(s) for s in attrs.get("strides", [1, 1])] != kernel:
        return f"integer ConvTranspose needs strides equal to the kernel {kernel}"
    if any(int(p) for p in attrs.get("pads", [0] * 4)) or any(
        int(p) for p in attrs.get("output_padding", [0, 0])
    ):
        return "integer ConvTranspose takes no pads or output_padding"
    if any(int(d) != 1 for d in attrs.get("dilations", [1, 1])):
        return "integer ConvTranspose takes no dilation"
    if "output_shape" in attrs:
        return "integer ConvTranspose does not take output_shape"
    return None


def common_shift_dyadic(ratio_a: float, ratio_b: float) -> tuple[tuple[int, int], int]:
    """``((m_a, m_b), k)`` with ``m_x / 2^k ~ ratio_x`` and one k for both.

    k is the smaller of the two best shifts, so both m stay below 2^31 and the larger ratio
    keeps its full precision; the smaller one keeps at least 31 - log2(ratio_a / ratio_b)
    bits. With |v| < 2^8 each product is below 2^39, their sum far inside int64.
    """
    (_, ka), (_, kb) = dyadic(ratio_a), dyadic(ratio_b)
    k = int(min(ka[0], kb[0]))
    return (int(np.round(ratio_a * 2.0**k)), int(np.round(ratio_b * 2.0**k))), k


def integerize(
    graph: QGraph,
    plan: PrecisionPlan,
    sites: ActivationSites,
    params: Mapping[str, ActQuant],
    *,
    single_rounding_add: bool = True,
    weights: WeightQuantizer = ROUND_TO_NEAREST,
) -> ip.IntegerProgram:
    """Build the integer program for ``plan`` (see the module docstring).

    ``weights`` must be the quantizer the QDQ model was built with (``insert_qdq``): the
    integer codes, scales and corrected biases then match the simulator's.

    ``single_rounding_add`` (the default) emits residual Adds that round once, as the QDQ
    simulator does (:class:`ip.Add`); ``False`` gives the older two-rounding form, 1 LSB off
    the simulator on about a quarter of the elements (benchmarks/results/add_rounding.md).
    Every backend lowers both.
    """
    return _Integerizer(graph, plan, sites, params, single_rounding_add, weights).run()
