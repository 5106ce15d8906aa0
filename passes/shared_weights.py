"""One quantized weight per weight initializer, however many layers read it.

An unrolled recurrent cell (captcha_crnn's LSTMCell loop, ``decompose_lstm``'s steps) or a
model with tied weights has several planned layers reading one float initializer. Quantizing
per layer stored one copy of the codes per reader (captcha_crnn: 68.5 MB of int8 for 4.79 M
parameters) and, where the readers' results differed, gave the QDQ and integer models codes
that no single stored tensor holds. :class:`SharedWeightQuants` gives every reader the same
:class:`WeightQuant`, computed once, so that ``insert_qdq`` writes one initializer and one
DequantizeLinear for them and ``integerize`` gives their ops one array (the ONNX, TVM and C
backends then store it once).

The rule for a weight that several planned layers read at one width and channel axis:
- the codes and scales are the weight quantizer's for the first reader in the plan (a
  compensated quantizer computes them per layer, from that layer's inputs);
- a reader whose own bias code would not fit int32 raises the shared scale of that channel
  (:func:`with_representable_bias` over every reader in turn: it only ever raises scales, so
  every reader's bias then fits);
- a later reader whose compensated codes differ from the first reader's keeps no bias
  correction: its correction was computed for codes it no longer uses (listed in the report).
Readers at different widths (a hand-written plan may ask for that; allocation ties them,
``passes/allocation/ties.py``) get one stored weight per width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import ActQuant, WeightQuant, WeightQuantizer, with_representable_bias
from dyadiq.rewrite_report import RewriteReport

# (weight initializer name, bits, channel axis): what one stored quantized weight is
WeightKey = tuple[str, int, int]


@dataclass
class SharedWeightQuants:
    """Each planned layer's quantized weight and corrected float bias (module docstring).

    Build it with :func:`shared_weight_quants`; ``insert_qdq`` and ``integerize`` must use
    the same rule so that their codes agree (both call that function with the same inputs).
    """

    inner: WeightQuantizer
    key_of: dict[str, WeightKey]  # planned layer -> its stored weight
    quants: dict[WeightKey, WeightQuant]
    first_reader: dict[WeightKey, str]
    own_codes: set[str] = field(default_factory=set)  # later readers whose codes differ
    report: RewriteReport = field(default_factory=lambda: RewriteReport("share_weights"))

    def weight_quant(self, layer_id: str) -> WeightQuant:
        return self.quants[self.key_of[layer_id]]

    def key(self, layer_id: str) -> WeightKey:
        return self.key_of[layer_id]

    def readers(self, key: WeightKey) -> list[str]:
        return [layer for layer, k in self.key_of.items() if k == key]

    def bias(self, layer_id: str, bits: int, values: np.ndarray) -> np.ndarray:
        """The float bias to quantize: the inner quantizer's correction, except for a later
        reader whose codes are the first reader's instead of its own (module docstring)."""
        if layer_id in self.own_codes:
            return values
        return self.inner.bias(layer_id, bits, values)


def _own_bias(graph: QGraph, node: gs.Node) -> gs.Constant | None:
    index = graph.facts(node).bias_input
    if index is None or index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    return tensor if isinstance(tensor, gs.Constant) else None


def _same_quant(a: WeightQuant, b: WeightQuant) -> bool:
    return bool(np.array_equal(a.values, b.values) and np.array_equal(a.scales, b.scales))


def shared_weight_quants(
    graph: QGraph,
    plan: PrecisionPlan,
    params: Mapping[str, ActQuant],
    weights: WeightQuantizer,
) -> SharedWeightQuants:
    """Quantize each planned layer's weight once per (initializer, width, axis).

    ``params`` are the activation quantizers (a layer's input scale decides whether its
    bias code fits int32); ``weights`` quantizes a layer's weight and corrects its bias.
    """
    key_of: dict[str, WeightKey] = {}
    first_reader: dict[WeightKey, str] = {}
    quants: dict[WeightKey, WeightQuant] = {}
    floats: dict[WeightKey, np.ndarray] = {}
    readers: dict[WeightKey, list[gs.Node]] = {}
    by_id = {node.name: node for node in graph.graph.nodes}
    # the plan's order (graph order where it was built from the graph), not the graph's own:
    # integerize toposorts the graph it reads, and both rewrites must pick one first reader
    for layer_id, fmt in plan.layers.items():
        node = by_id[layer_id]
        weight = graph.weight(node)
        if weight is None:
            continue
        axis = weight_channel_axis(node) % np.asarray(weight.values).ndim
        key = (weight.name, fmt.weight_bits, axis)
        key_of[node.name] = key
        readers.setdefault(key, []).append(node)
        if key not in first_reader:
            first_reader[key] = node.name
            floats[key] = np.asarray(weight.values, np.float32)
            quants[key] = weights.weight_quant(node.name, floats[key], key[1], axis)
    shared = SharedWeightQuants(weights, key_of, quants, first_reader)
    for key, nodes in readers.items():
        if len(nodes) > 1:
            shared.report.changed.extend(n.name for n in nodes[1:])
            for node in nodes[1:]:
                own = weights.weight_quant(node.name, floats[key], key[1], key[2])
                if not _same_quant(own, quants[key]):
                    shared.own_codes.add(node.name)
                    shared.report.skip(
                        node.name,
                        f"reads {key[0]} at {key[1]} bits with {first_reader[key]}: takes its "
                        "compensated codes, and drops its own bias correction (computed for "
                        "codes it does not use)",
                    )
        wq = quants[key]
        for node in nodes:  # every reader's bias code must fit: raise the shared scales
            bias = _own_bias(graph, node)
            data = node.inputs[0]
            if bias is None or data.name not in params:
                continue
            values = shared.bias(node.name, key[1], np.asarray(bias.values))
            wq = with_representable_bias(wq, floats[key], values, params[data.name].scale)
        quants[key] = wq
    return shared
