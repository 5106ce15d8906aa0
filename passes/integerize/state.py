"""The integerizer's shared state: which tensors have integer codes, which a float value, and
the program being built; the helpers every op's rewrite uses (requantizers, code bounds,
static shapes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dyadiq import integer_program as ip
from dyadiq.dyadic import dyadic
from dyadiq.errors import InternalError, UnsupportedModelError
from dyadiq.graph import QGraph
from dyadiq.passes.activation_sites import ActivationSites
from dyadiq.passes.integer_layer_norm import IntegerLayerNorm
from dyadiq.passes.masked_softmax import MaskedSoftmaxMatch
from dyadiq.passes.shared_weights import SharedWeightQuants
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import ActQuant, WeightQuantizer


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


class IntegerizerState:
    """What the op rewrites (the mixins of :class:`dyadiq.passes.integerize._Integerizer`)
    share: the graph and plan, the program's ops, quantizers and shapes so far, and which
    tensors exist as codes (``int_name``, ``wide_of``) or as float values (``float_ready``)."""

    graph: QGraph
    weights: WeightQuantizer
    shared: SharedWeightQuants  # each layer's quantized weight, once per initializer
    shared_codes: dict[tuple[str, int, int, bool], np.ndarray]  # (weight key, transposed)
    single_rounding_add: bool
    plan: PrecisionPlan
    sites: ActivationSites
    params: dict[str, ActQuant]
    ops: list[ip.IntOp]
    quant: dict[str, ActQuant]
    shapes: dict[str, tuple[int, ...]]
    int_name: dict[str, str]
    float_ready: set[str]
    float_ops: list[str]
    absorbed: set[str]
    tabulated: set[str]
    notes: list[str]
    masked_softmax: dict[str, MaskedSoftmaxMatch]
    wide_of: dict[str, str]
    layer_norms: dict[str, IntegerLayerNorm]
    # Gather node -> the embedding sum it starts: op, wide quantizer, the sum's tensor name
    embeddings: dict[str, tuple[ip.Embedding, ActQuant, str]]
    # Div node -> the sentence-pooling op it ends: its input tensor, op, output quantizer
    pooling: dict[str, tuple[gs.Tensor, ip.MaskedMeanPool | ip.L2Normalize, ActQuant]]

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

    def _quantized(self, *tensors: gs.Tensor) -> bool:
        return all(t.name in self.params for t in tensors)

    def _same_scale(self, node: gs.Node, tensors: list[gs.Tensor]) -> bool:
        q = {self.q(t) for t in tensors}
        if len(q) != 1:
            raise InternalError(f"{node.name}: inputs and output differ in scale")
        return True
