"""Rewrite: quantize weights and insert QuantizeLinear/DequantizeLinear pairs from a plan.

Given a plan, its :class:`ActivationSites` and a calibrated ``(lo, hi)`` per scale group:
- each planned layer's weight becomes an int8 (or int4, opset 21) initializer of per-channel
  symmetric codes followed by a per-axis DequantizeLinear; layers that read one initializer
  (tied weights, the steps of an unrolled LSTM) read one such pair (``shared_weights``);
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

from dyadiq.graph import QGraph, activation_bounds, make_constant
from dyadiq.passes.activation_sites import ActivationSites
from dyadiq.passes.shared_weights import SharedWeightQuants, WeightKey, shared_weight_quants
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import (
    ROUND_TO_NEAREST,
    ActQuant,
    WeightQuant,
    WeightQuantizer,
    activation_quant,
)
from dyadiq.rewrite_report import RewriteReport


@dataclass
class QDQResult:
    graph: QGraph
    act_params: dict[str, ActQuant]  # tensor -> its quantizer
    removed_activations: list[str] = field(default_factory=list)
    weight_bytes: int = 0  # packed size of the quantized weights (int4 packs two per byte)
    # the layers that read a weight another layer quantized (stored once; see shared_weights)
    shared_weights: RewriteReport = field(default_factory=lambda: RewriteReport("share_weights"))


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


def _dequantized_weight(
    graph: gs.Graph, weight: gs.Constant, wq: WeightQuant, name: str
) -> tuple[gs.Variable, int]:
    """One stored quantized weight: codes, scales and zero points and the DequantizeLinear
    every reader of it reads; returns the float tensor and its packed byte count."""
    code_dtype = _code_dtype(wq.bits, signed=True)
    codes = make_constant(f"{name}_quantized", wq.values.astype(code_dtype))
    scales = gs.Constant(f"{name}_scale", wq.scales)
    zeros = make_constant(f"{name}_zero_point", np.zeros(wq.scales.shape, code_dtype))
    restored = gs.Variable(f"{name}_dq", dtype=np.float32, shape=list(weight.shape))
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            f"{name}/weight_DQ",
            attrs={"axis": wq.axis},
            inputs=[codes, scales, zeros],
            outputs=[restored],
        )
    )
    bits = wq.bits
    packed_bytes = (wq.values.size * bits + 7) // 8 if bits <= 4 else wq.values.size
    return restored, packed_bytes


def _unique(name: str, tensor: gs.Tensor, layer_id: str) -> str:
    """``name``, made per layer when several layers read ``tensor`` (a bias shared by the
    steps of an unrolled cell is quantized at each step's own input scale)."""
    return name if len(tensor.outputs) <= 1 else f"{name}@{layer_id}"


def _quantize_bias(
    graph: gs.Graph,
    node: gs.Node,
    index: int,
    weight_scales: np.ndarray,
    input_scale: float,
    values: np.ndarray,
) -> None:
    bias = node.inputs[index]
    name = _unique(bias.name, bias, node.name)
    scales = (weight_scales * np.float32(input_scale)).astype(np.float32)
    codes = np.round(np.asarray(values, np.float64) / scales).astype(np.int64)
    codes = np.clip(codes, -(2**31), 2**31 - 1).astype(np.int32)
    restored = gs.Variable(f"{name}_dq", dtype=np.float32, shape=list(bias.shape))
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            f"{node.name}/bias_DQ",
            attrs={"axis": 0},
            inputs=[
                gs.Constant(f"{name}_quantized", codes),
                gs.Constant(f"{name}_scale", scales),
                gs.Constant(f"{name}_zero_point", np.zeros(scales.shape, np.int32)),
            ],
            outputs=[restored],
        )
    )
    node.inputs[index] = restored


def _correct_fused_bias(
    add: gs.Node, layer_id: str, bits: int, weights: SharedWeightQuants
) -> None:
    """A MatMul's bias lives in the constant of the Add after it (kept in float here; the
    integer model adds it to the accumulator): give that Add the corrected bias."""
    for i, tensor in enumerate(add.inputs):
        if isinstance(tensor, gs.Constant):
            values = np.asarray(tensor.values, np.float32)
            corrected = weights.bias(layer_id, bits, values)
            if corrected is not values:
                name = _unique(f"{tensor.name}_corrected", tensor, layer_id)
                add.inputs[i] = gs.Constant(name, corrected)


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
    to quantize (a compensated quantizer corrects it); round to nearest by default. Layers
    that read one weight initializer read one stored quantized copy of it
    (:mod:`dyadiq.passes.shared_weights`).
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
    shared = shared_weight_quants(out, plan, params, weights)
    stored: dict[WeightKey, gs.Variable] = {}  # one DequantizeLinear per stored weight
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
        key = shared.key(layer_id)
        wq = shared.weight_quant(layer_id)
        if key not in stored:
            weight = node.inputs[facts.weight_input]
            name = weight.name
            if key != _first_key(shared, weight.name):  # a second width of one initializer
                name = f"{weight.name}_{bits}b"  # (a hand-written plan): a second weight
            stored[key], nbytes = _dequantized_weight(g, weight, wq, name)
            weight_bytes += nbytes
        node.inputs[facts.weight_input] = stored[key]
        if own_bias:
            assert bias_at is not None
            values = shared.bias(layer_id, bits, np.asarray(node.inputs[bias_at].values))
            _quantize_bias(g, node, bias_at, wq.scales, params[data.name].scale, values)
        elif layer_id in sites.fused_biases:
            _correct_fused_bias(out.node(sites.fused_biases[layer_id]), layer_id, bits, shared)
    for name in sites.tensors:
        insert_activation_qdq(g, tensors[name], params[name])
    g.cleanup().toposort()
    return QDQResult(out, params, removed, weight_bytes, shared.report)


def _first_key(shared: SharedWeightQuants, weight_name: str) -> WeightKey:
    """The stored weight of ``weight_name`` that keeps the initializer's own name."""
    return next(key for key in shared.quants if key[0] == weight_name)
