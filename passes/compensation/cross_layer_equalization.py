"""Rewrite: cross-layer equalisation (Nagel et al. 2019, data-free quantization), exactly
float-equivalent.

For a pair  y = W2 f(W1 x + b1) + b2  with f positively homogeneous per channel
(f(x / s) = f(x) / s for s > 0: identity, ReLU, a Clip whose bounds are 0 and +inf, MaxPool,
or a chain of them),
scaling output channel c of layer 1 by 1/s_c and input channel c of layer 2 by s_c leaves y
unchanged. DFQ's choice s_c = sqrt(r1_c / r2_c), with r1_c = max|W1[c]| and r2_c = max|W2[:, c]|,
gives both channels the range sqrt(r1_c r2_c), so per-channel weight quantizers of both layers
lose less to a few wide channels. Sweeps repeat until the scales settle (chains A -> B -> C).

A pair is declined, with the reason reported, when f is not positively homogeneous (ReLU6 and
other finite Clip bounds: a per-channel scale would need per-channel bounds, which Clip does
not have; HardSwish, sigmoid...), when layer 1's output (or f's) has another consumer or is a
graph output, when something other than f sits between the layers (Add, Reshape...), or when
the weights are not constants of the expected layout. High-bias absorption is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph, activation_bounds
from dyadiq.op_facts import OpKind

_SCALE_LIMITS = (1e-4, 1e4)  # never rescale a channel by more than this (dead channels)
# per-channel ops with f(x / s) = f(x) / s for s > 0 (Clip only with bounds 0 and +inf)
_HOMOGENEOUS = (OpKind.RELU, OpKind.CLIP, OpKind.MAXPOOL)


@dataclass
class EqualizationReport:
    equalized: list[tuple[str, str]] = field(default_factory=list)  # (layer 1, layer 2)
    declined: list[tuple[str, str]] = field(default_factory=list)  # (layer id, why)
    sweeps: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "equalized_pairs": [list(p) for p in self.equalized],
            "declined": [{"layer": i, "reason": r} for i, r in self.declined],
            "sweeps": self.sweeps,
        }


def _single_consumer(tensor: gs.Tensor, outputs: set[str]) -> gs.Node | None:
    if tensor.name in outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def _is_layer(graph: QGraph, node: gs.Node) -> bool:
    if graph.kind(node) is not OpKind.CONV or graph.weight(node) is None:
        return False
    weight = graph.weight(node)
    return weight is not None and weight.values.ndim == 4


def _pair(graph: QGraph, first: gs.Node, outputs: set[str]) -> tuple[gs.Node | None, str]:
    """The layer that consumes ``first`` through a positively homogeneous f, or why not."""
    consumer = _single_consumer(first.outputs[0], outputs)
    if consumer is None:
        return None, "its output has several consumers or is a graph output"
    while graph.kind(consumer) in _HOMOGENEOUS:  # f may be a chain, e.g. Relu -> MaxPool
        kind = graph.kind(consumer)
        lo, hi = activation_bounds(consumer) if kind is OpKind.CLIP else (0.0, np.inf)
        if lo != 0.0 or np.isfinite(hi):
            return None, (
                f"Clip({lo:g}, {hi:g}) after it: its bounds would have to scale per channel"
            )
        consumer = _single_consumer(consumer.outputs[0], outputs)
        if consumer is None:
            return None, f"the {kind.value} after it has several consumers or is an output"
    if not _is_layer(graph, consumer):
        return None, f"followed by {consumer.op}, not a Conv it can rescale into"
    return consumer, ""


def _input_channel_ranges(weight: np.ndarray, groups: int) -> np.ndarray:
    """max |W2[:, c]| per input channel c of a (grouped) Conv weight [Cout, Cin/G, kh, kw]."""
    cout, cin_g = weight.shape[:2]
    per_group = np.abs(weight).reshape(groups, cout // groups, cin_g, -1).max(axis=(1, 3))
    return per_group.reshape(-1)  # [G * Cin/G]


def _scale_input_channels(weight: np.ndarray, groups: int, scales: np.ndarray) -> np.ndarray:
    cout, cin_g = weight.shape[:2]
    grouped = weight.reshape(groups, cout // groups, cin_g, *weight.shape[2:])
    factor = scales.reshape(groups, 1, cin_g, *([1] * (weight.ndim - 2)))
    return (grouped * factor).reshape(weight.shape)


def _equalize_pair(first: gs.Node, second: gs.Node) -> bool:
    w1 = np.asarray(first.inputs[1].values, np.float64)
    w2 = np.asarray(second.inputs[1].values, np.float64)
    groups = int(second.attrs.get("group", 1))
    if w2.shape[1] * groups != w1.shape[0]:
        return False
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    r2 = _input_channel_ranges(w2, groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.sqrt(r1 / r2)
    scales = np.where(np.isfinite(scales) & (scales > 0), scales, 1.0)
    scales = np.clip(scales, *_SCALE_LIMITS)
    first.inputs[1] = gs.Constant(
        f"{first.name}_weight_cle", (w1 / scales.reshape(-1, 1, 1, 1)).astype(np.float32)
    )
    if len(first.inputs) > 2 and isinstance(first.inputs[2], gs.Constant):
        b1 = np.asarray(first.inputs[2].values, np.float64) / scales
        first.inputs[2] = gs.Constant(f"{first.name}_bias_cle", b1.astype(np.float32))
    second.inputs[1] = gs.Constant(
        f"{second.name}_weight_cle", _scale_input_channels(w2, groups, scales).astype(np.float32)
    )
    return bool(np.any(np.abs(np.log(scales)) > 1e-3))


def equalize_cross_layer(graph: QGraph, *, max_sweeps: int = 8) -> EqualizationReport:
    """Equalise every eligible Conv -> [ReLU] -> Conv pair of ``graph`` in place."""
    report = EqualizationReport()
    outputs = {t.name for t in graph.graph.outputs}
    pairs: list[tuple[gs.Node, gs.Node]] = []
    for node in graph.graph.nodes:
        if not _is_layer(graph, node):
            continue
        if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
            report.declined.append((node.name, "its bias is not a constant"))
            continue
        second, why = _pair(graph, node, outputs)
        if second is None:
            report.declined.append((node.name, why))
        else:
            pairs.append((node, second))
    for sweep in range(max_sweeps):
        report.sweeps = sweep + 1
        changed = [_equalize_pair(first, second) for first, second in pairs]
        if not any(changed):
            break
    report.equalized = [(a.name, b.name) for a, b in pairs]
    graph.graph.cleanup()
    return report
