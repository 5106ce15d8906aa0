"""Rewrite: quantize weights and insert QuantizeLinear/DequantizeLinear pairs from a plan.

Given a plan, its :class:`ActivationSites` and a calibrated ``(lo, hi)`` per scale group:
- each planned layer's weight becomes an int8 (or int4, opset 21) initializer of per-channel
  symmetric codes followed by a per-axis DequantizeLinear;
- its bias becomes int32 at scale ``s_x * s_w[c]`` (what the integer kernels accumulate in);
- each activation site gets ``Q -> DQ`` with its group's scale and zero point;
- a fused Relu/Clip whose effect the quantizer's saturation already reproduces exactly
  (representable range inside the clip bounds) is removed, so that onnxruntime can fuse
  ``DQ -> Conv -> Q`` into one integer kernel. Activations that are not implied stay.
The result is the fake-quant simulator that analysis uses and the QDQ model that ships.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph, activation_bounds, make_constant, weight_channel_axis
from dyadiq.passes.activation_sites import ActivationSites
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import (
    ROUND_TO_NEAREST,
    ActQuant,
    WeightQuantizer,
    activation_quant,
    with_representable_bias,
)


@dataclass
class QDQResult:
    graph: QGraph
    act_params: dict[str, ActQuant]  # tensor -> its quantizer
    removed_activations: list[str] = field(default_factory=list)
    weight_bytes: int = 0  # packed size of the quantized weights (int4 packs two per byte)


def _code_dtype(bits: int, signed: bool) -> np.dtype:
    if bits <= 4:
        return np.dtype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    return np.dtype(np.int8 if signed else np.uint8)


def group_quantizers(
    sites: ActivationSites, ranges: Mapping[str, tuple[float, float]], *, signed: bool
) -> dict[str, ActQuant]:
    """One quantizer per scale group (union of member ranges), given to every member."""
    params: dict[str, ActQuant] = {}
    for gid, members in sites.groups().items():
        lo = min(ranges[t][0] for t in members)
        hi = max(ranges[t][1] for t in members)
        quant = activation_quant(lo, hi, sites.group_bits[gid], signed=signed)
        params.update(dict.fromkeys(members, quant))
    return params


def insert_activation_qdq(graph: gs.Graph, tensor: gs.Variable, q: ActQuant) -> None:
    scale = gs.Constant(f"{tensor.name}_scale", np.array(q.scale, np.float32))
    zero = make_constant(
        f"{tensor.name}_zero_point", np.array(q.zero_point, _code_dtype(q.bits, q.signed))
    )
    codes = gs.Variable(f"{tensor.name}_q", dtype=_code_dtype(q.bits, q.signed), shape=tensor.shape)
    restored = gs.Variable(f"{tensor.name}_dq", dtype=np.float32, shape=tensor.shape)
    consumers = list(tensor.outputs)
    graph.nodes.append(
        gs.Node("QuantizeLinear", f"{tensor.name}/Q", inputs=[tensor, scale, zero], outputs=[codes])
    )
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear", f"{tensor.name}/DQ", inputs=[codes, scale, zero], outputs=[restored]
        )
    )
    for consumer in consumers:
        for i, inp in enumerate(consumer.inputs):
            if inp is tensor:
                consumer.inputs[i] = restored
    for i, out in enumerate(graph.outputs):
        if out is tensor:  # keep the model's output name on the quantized tensor
            name = tensor.name
            tensor.name, restored.name = f"{name}_float", name
            graph.outputs[i] = restored


def _quantize_weight(
    graph: gs.Graph,
    node: gs.Node,
    index: int,
    bits: int,
    weights: WeightQuantizer,
    bias: tuple[np.ndarray, float] | None = None,
) -> tuple[gs.Constant, int]:
    """The weight's DequantizeLinear; ``bias`` (float bias, input scale) raises the scale of
    channels whose bias code would not fit (:func:`with_representable_bias`)."""
    weight = node.inputs[index]
    axis = weight_channel_axis(node) % weight.values.ndim
    float_weight = np.asarray(weight.values, np.float32)
    wq = weights.weight_quant(node.name, float_weight, bits, axis)
    if bias is not None:
        wq = with_representable_bias(wq, float_weight, *bias)
    code_dtype = _code_dtype(bits, signed=True)
    codes = make_constant(f"{weight.name}_quantized", wq.values.astype(code_dtype))
    scales = gs.Constant(f"{weight.name}_scale", wq.scales)
    zeros = make_constant(f"{weight.name}_zero_point", np.zeros(wq.scales.shape, code_dtype))
    restored = gs.Variable(f"{weight.name}_dq", dtype=np.float32, shape=list(weight.shape))
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            f"{node.name}/weight_DQ",
            attrs={"axis": axis},
            inputs=[codes, scales, zeros],
            outputs=[restored],
        )
    )
    node.inputs[index] = restored
    packed_bytes = (wq.values.size * bits + 7) // 8 if bits <= 4 else wq.values.size
    return scales, packed_bytes


def _quantize_bias(
    graph: gs.Graph,
    node: gs.Node,
    index: int,
    weight_scales: np.ndarray,
    input_scale: float,
    values: np.ndarray,
) -> None:
    bias = node.inputs[index]
    scales = (weight_scales * np.float32(input_scale)).astype(np.float32)
    codes = np.round(np.asarray(values, np.float64) / scales).astype(np.int64)
    codes = np.clip(codes, -(2**31), 2**31 - 1).astype(np.int32)
    restored = gs.Variable(f"{bias.name}_dq", dtype=np.float32, shape=list(bias.shape))
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            f"{node.name}/bias_DQ",
            attrs={"axis": 0},
            inputs=[
                gs.Constant(f"{bias.name}_quantized", codes),
                gs.Constant(f"{bias.name}_scale", scales),
                gs.Constant(f"{bias.name}_zero_point", np.zeros(scales.shape, np.int32)),
            ],
            outputs=[restored],
        )
    )
    node.inputs[index] = restored


def _correct_fused_bias(add: gs.Node, layer_id: str, bits: int, weights: WeightQuantizer) -> None:
    """A MatMul's bias lives in the constant of the Add after it (kept in float here; the
    integer model adds it to the accumulator): give that Add the corrected bias."""
    for i, tensor in enumerate(add.inputs):
        if isinstance(tensor, gs.Constant):
            values = np.asarray(tensor.values, np.float32)
            corrected = weights.bias(layer_id, bits, values)
            if corrected is not values:
                add.inputs[i] = gs.Constant(f"{tensor.name}_corrected", corrected)


def _remove_implied_activation(layer: gs.Node, act: gs.Node, q: ActQuant) -> bool:
    lo, hi = activation_bounds(act)
    rep_lo, rep_hi = q.representable_range()
    if not (lo <= rep_lo and rep_hi <= hi):
        return False
    result = act.outputs[0]
    act.outputs.clear()
    act.inputs.clear()
    layer.outputs[0] = result
    return True


def insert_qdq(
    graph: QGraph,
    plan: PrecisionPlan,
    sites: ActivationSites,
    ranges: Mapping[str, tuple[float, float]],
    weights: WeightQuantizer = ROUND_TO_NEAREST,
) -> QDQResult:
    """Return a quantized copy of ``graph``; ``graph`` itself is left untouched.

    ``weights`` gives each planned layer's quantized weights at its width and the float bias
    to quantize (a compensated quantizer corrects it); round to nearest by default.
    """
    out = graph.copy()
    g = out.graph
    params = group_quantizers(sites, ranges, signed=plan.act_signed)
    removed = []
    for layer_id, act_id in sites.fused_activations.items():
        if layer_id in sites.fused_biases:
            continue  # a bias Add sits between: keep the activation as written
        layer, act = out.node(layer_id), out.node(act_id)
        if _remove_implied_activation(layer, act, params[act.outputs[0].name]):
            removed.append(act_id)
    g.cleanup()
    tensors = out.tensors()
    weight_bytes = 0
    for layer_id, fmt in plan.layers.items():
        node = out.node(layer_id)
        facts = out.facts(node)
        assert facts.weight_input is not None
        bits = fmt.weight_bits
        bias_at = facts.bias_input
        data = node.inputs[0]
        own_bias = (
            bias_at is not None
            and bias_at < len(node.inputs)
            and isinstance(node.inputs[bias_at], gs.Constant)
            and data.name in params
        )
        values = None
        if own_bias:
            assert bias_at is not None
            values = weights.bias(layer_id, bits, np.asarray(node.inputs[bias_at].values))
        weight_scales, nbytes = _quantize_weight(
            g,
            node,
            facts.weight_input,
            bits,
            weights,
            (values, params[data.name].scale) if values is not None else None,
        )
        weight_bytes += nbytes
        if own_bias and values is not None:
            assert bias_at is not None
            _quantize_bias(g, node, bias_at, weight_scales.values, params[data.name].scale, values)
        elif layer_id in sites.fused_biases:
            _correct_fused_bias(out.node(sites.fused_biases[layer_id]), layer_id, bits, weights)
    for name in sites.tensors:
        insert_activation_qdq(g, tensors[name], params[name])
    g.cleanup().toposort()
    return QDQResult(out, params, removed, weight_bytes)
