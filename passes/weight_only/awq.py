"""Activation-aware per-input-channel scaling (AWQ, Lin et al. 2023) before group-wise
weight quantization.

A weight W [R, K] reads inputs x [K]. For a per-channel scale s [K] > 0,
``x W^T = (x / s) (W diag(s))^T`` exactly, so the model may store ``Q(W diag(s))`` and divide
its input by s. Channels with large inputs get s_j > 1: their weights take a larger share of
each group's range and round relatively more finely, where their error costs most.

- **Which channels are scaled together**: every weight reading the same activation (q / k / v
  projections share their input) must use one s, and a weight read by several MatMuls ties
  their activations together; :func:`input_groups` forms those sets.
- **s**: ``s_j = m_j^alpha`` normalised to ``sqrt(max s min s) = 1`` as AWQ normalises it, with
  ``m_j = sqrt(E[x_j^2])``, the root of the input Hessian's diagonal. AWQ uses ``E|x_j|``; the
  Hessian (collected anyway for GPTQ) holds the second moment, and the search over alpha
  absorbs the difference in how the two grow with a channel's size.
- **alpha**: searched on :data:`ALPHAS` per set, minimising the set's summed output error
  ``tr(D H D^T)`` with ``D = W - Q(W diag(s)) diag(1/s)`` for group-wise round to nearest on
  the min-max grid (AWQ's search quantizer) at the settings' search width; H is the layer's
  input Hessian dampened as GPTQ dampens it (a tied embedding / LM head's larger dampening
  stands for its embedding rows, whose error counts unweighted). alpha = 0 (s = 1, no
  scaling) is a candidate and wins ties, so no set ends worse than unscaled on that
  objective. An LM head's rows are subsampled (:data:`SEARCH_ROWS`): s is shared by all rows,
  and each row's error is its own.
- **Where 1/s goes** (:func:`rescale_graph`): folded into the activation's producer when that
  is a ``Mul`` by a constant per-channel (or scalar) initializer whose output only the
  scaled weights read (an RMSNorm / LayerNorm weight); else an explicit ``Mul`` by 1/s
  before the scaled readers only. A weight also looked up by a ``Gather`` (a tied
  embedding) stores its rows scaled too, so each Gather's output is multiplied by 1/s.

GPTQ then runs on ``W diag(s)`` with ``H' = diag(1/s) H diag(1/s)`` (:func:`scale_hessians`),
which is the same objective in the scaled coordinates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dyadiq.passes.weight_only.groupwise import (
    GroupwiseFormat,
    dequantize,
    group_scales,
    quantize,
)
from dyadiq.passes.weight_only.layers import Use, WeightLayer
from dyadiq.passes.weight_only.model_file import copy_header

ALPHAS = tuple(float(a) for a in np.round(np.linspace(0.0, 1.0, 21), 2))
# rows of a weight the search quantizes (an LM head has 262,144; s is shared by every row)
SEARCH_ROWS = 16384
# a channel whose inputs are all zero gets this magnitude (any s is then exact for it)
_MAGNITUDE_FLOOR = 1e-6
# the model's metadata key saying its stored weights are W diag(s) (codes alone are not W)
INPUT_SCALES_KEY = "dyadiq.weight_only.input_scales"


@dataclass(frozen=True)
class ScaledInputs:
    """One set of input channels scaled together: the activations, the weights (layer ids)
    reading them, the chosen ``alpha`` and ``scales`` s [K] (float32; all 1 when alpha is
    0), and per weight the relative output error of the search quantizer without and with
    the scaling (``tr(D H D^T) / tr(W H W^T)``)."""

    activations: tuple[str, ...]
    layers: tuple[str, ...]
    alpha: float
    scales: np.ndarray
    errors: Mapping[str, tuple[float, float]]

    @property
    def scaled(self) -> bool:
        return self.alpha > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "activations": list(self.activations),
            "layers": list(self.layers),
            "alpha": self.alpha,
            "scale_range": [float(self.scales.min()), float(self.scales.max())],
            "relative_output_error": {k: list(v) for k, v in self.errors.items()},
        }


def input_groups(layers: Sequence[WeightLayer]) -> list[tuple[tuple[str, ...], list[WeightLayer]]]:
    """The sets of activations that must share one s (connected through weights read by
    several MatMuls), each with its weights, in first-layer order; weights without a MatMul
    reader (an untied embedding) take no part."""
    parent: dict[str, str] = {}

    def root(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    readers = [x for x in layers if x.activations]
    for layer in readers:
        for a in layer.activations:
            parent.setdefault(a, a)
        first = root(layer.activations[0])
        for a in layer.activations[1:]:
            parent[root(a)] = first
    groups: dict[str, tuple[list[str], list[WeightLayer]]] = {}
    for layer in readers:
        activations, members = groups.setdefault(root(layer.activations[0]), ([], []))
        members.append(layer)
        activations.extend(a for a in layer.activations if a not in activations)
    return [(tuple(a), m) for a, m in groups.values()]


def channel_magnitude(hessians: Mapping[str, np.ndarray], activations: Sequence[str]) -> np.ndarray:
    """m_j = sqrt(E[x_j^2]) over the activations' Hessian diagonals (their mean)."""
    diagonal = np.mean([np.diag(hessians[a]) for a in activations], axis=0)
    return np.sqrt(np.maximum(diagonal, 0.0))


def candidate_scales(magnitude: np.ndarray, alpha: float) -> np.ndarray:
    """``m^alpha`` normalised so that ``sqrt(max * min) = 1`` (float32)."""
    s = np.maximum(np.asarray(magnitude, np.float64), _MAGNITUDE_FLOOR) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def search_rows(w: np.ndarray, limit: int = SEARCH_ROWS) -> np.ndarray:
    """At most ``limit`` evenly spaced rows of ``w``."""
    step = max(1, -(-w.shape[0] // limit))
    return w[::step]


def dampened(h: np.ndarray, damp: float) -> np.ndarray:
    """H + damp mean(diag H) I, as GPTQ dampens it."""
    return h + damp * float(np.mean(np.diag(h))) * np.eye(len(h))


def scaled_rtn_error(w: np.ndarray, s: np.ndarray, h: np.ndarray, fmt: GroupwiseFormat) -> float:
    """``tr(D h D^T)``, D = W - Q(W diag(s)) diag(1/s), Q group-wise round to nearest on
    the min-max grid."""
    ws = (w * s[None, :]).astype(np.float32)
    scales, zeros = group_scales(ws, fmt)
    approx = dequantize(quantize(ws, scales, zeros, fmt), scales, zeros, fmt) / s[None, :]
    d = np.asarray(w, np.float64) - approx
    return float(np.sum((d @ h) * d))


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def search_alpha(
    activations: tuple[str, ...],
    weights: Mapping[str, np.ndarray],
    hessians: Mapping[str, np.ndarray],
    magnitude: np.ndarray,
    fmt: GroupwiseFormat,
    alphas: Sequence[float] = ALPHAS,
) -> ScaledInputs:
    """The alpha of least summed output error for weights ``weights`` (layer id -> W [R, K],
    rows possibly subsampled) with their dampened Hessians ``hessians`` (layer id -> [K, K])."""
    totals = {
        k: float(np.sum((w.astype(np.float64) @ hessians[k]) * w)) for k, w in weights.items()
    }
    best: tuple[float, float, dict[str, float]] | None = None
    unscaled: dict[str, float] = {}
    for alpha in (0.0, *(a for a in alphas if a != 0.0)):
        s = candidate_scales(magnitude, alpha)
        errors = {k: scaled_rtn_error(w, s, hessians[k], fmt) for k, w in weights.items()}
        if alpha == 0.0:
            unscaled = errors
        total = sum(errors.values())
        if best is None or total < best[1]:
            best = (alpha, total, errors)
    assert best is not None
    alpha, _, errors = best
    relative = {
        k: (
            unscaled[k] / totals[k] if totals[k] else 0.0,
            errors[k] / totals[k] if totals[k] else 0.0,
        )
        for k in weights
    }
    return ScaledInputs(
        activations, tuple(weights), alpha, candidate_scales(magnitude, alpha), relative
    )


def search_input_scales(
    layers: Sequence[WeightLayer],
    hessians: Mapping[str, np.ndarray],
    weight: Callable[[WeightLayer], np.ndarray],
    fmt: GroupwiseFormat,
    damp: Callable[[WeightLayer], float],
    alphas: Sequence[float] = ALPHAS,
) -> list[ScaledInputs]:
    """One :class:`ScaledInputs` per set of :func:`input_groups` (``weight(layer)``: W [R, K];
    ``damp(layer)``: its GPTQ dampening)."""
    out = []
    for activations, members in input_groups(layers):
        weights = {x.id: search_rows(weight(x)) for x in members}
        layer_h = {
            x.id: dampened(np.sum([hessians[a] for a in x.activations], axis=0), damp(x))
            for x in members
        }
        magnitude = channel_magnitude(hessians, activations)
        out.append(search_alpha(activations, weights, layer_h, magnitude, fmt, alphas))
    return out


def scale_hessians(
    hessians: Mapping[str, np.ndarray], scalings: Sequence[ScaledInputs]
) -> dict[str, np.ndarray]:
    """H' = diag(1/s) H diag(1/s) for every scaled activation (others unchanged)."""
    out = dict(hessians)
    for scaling in scalings:
        if not scaling.scaled:
            continue
        inv = 1.0 / scaling.scales.astype(np.float64)
        for a in scaling.activations:
            out[a] = hessians[a] * inv[:, None] * inv[None, :]
    return out


def layer_scales(scalings: Sequence[ScaledInputs]) -> dict[str, np.ndarray]:
    """Layer id -> s, for the scaled weights only."""
    return {k: x.scales for x in scalings if x.scaled for k in x.layers}


def _foldable_constant(
    node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto], channels: int
) -> int | None:
    """The input index of ``node`` (a Mul) that is a float32 scalar or per-last-axis constant
    of ``channels`` (all other dims 1), or None."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx"):
        return None
    for k, name in enumerate(node.input):
        tensor = initializers.get(name)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        dims = list(tensor.dims)
        if not dims or (all(d == 1 for d in dims[:-1]) and dims[-1] in (1, channels)):
            return k
    return None


def rescale_graph(
    header: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    scalings: Sequence[ScaledInputs],
    array: Callable[[str], np.ndarray],
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``header`` whose scaled weights' inputs are divided by s (module
    docstring); the weights themselves are not touched (the caller stores W diag(s)).
    ``array(name)`` reads an initializer. Returns the graph and, per activation or Gather
    node, where its 1/s went."""
    model = copy_header(header)
    graph = model.graph
    by_id = {x.id: x for x in layers}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in set(n.input):
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    initializers = {t.name: t for t in graph.initializer}
    before: dict[str, list[onnx.NodeProto]] = {}
    after: dict[str, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    where: dict[str, str] = {}
    replaced: set[str] = set()  # constants a fold replaced (dropped when nothing else reads them)
    for scaling in (x for x in scalings if x.scaled):
        inv = (1.0 / scaling.scales.astype(np.float64)).astype(np.float32)
        channels = inv.size
        members = [by_id[k] for k in scaling.layers]
        inv_name = f"{scaling.layers[0]}/awq_inv_scale"
        inv_used = False
        for a in scaling.activations:
            scaled = {r.node for x in members for r in x.readers if r.activation == a}
            p = producer.get(a)
            k = None if p is None else _foldable_constant(p, initializers, channels)
            only_scaled = {n.name for n in readers.get(a, [])} == scaled and a not in outputs
            if p is not None and k is not None and only_scaled:
                constant = array(p.input[k]).astype(np.float32)
                shape = (*constant.shape[:-1], channels) if constant.ndim else (channels,)
                folded = (constant * inv).reshape(shape).astype(np.float32)
                name = f"{a}/awq_folded"
                new_inits.append(numpy_helper.from_array(folded, name))
                replaced.add(p.input[k])
                p.input[k] = name
                where[a] = f"folded into {p.op_type} {p.name}"
                continue
            name = f"{a}/awq"
            nodes = [n for n in graph.node if n.name in scaled]
            for n in nodes:
                for j, i in enumerate(n.input):
                    if i == a and j == 0:
                        n.input[j] = name
            before.setdefault(nodes[0].name, []).append(
                helper.make_node("Mul", [a, inv_name], [name], name=f"{a}/awq_scale")
            )
            inv_used = True
            where[a] = f"Mul by 1/s before {len(nodes)} reader(s)"
        for x in members:
            for r in (r for r in x.readers if r.use is Use.GATHER):
                gather = next(n for n in graph.node if n.name == r.node)
                y = gather.output[0]
                gather.output[0] = f"{y}/awq_rows"
                after.setdefault(gather.name, []).append(
                    helper.make_node(
                        "Mul", [gather.output[0], inv_name], [y], name=f"{gather.name}/awq_scale"
                    )
                )
                inv_used = True
                where[gather.name] = "Mul by 1/s after the row lookup"
        if inv_used:
            new_inits.append(numpy_helper.from_array(inv, inv_name))
    nodes_out: list[onnx.NodeProto] = []
    for n in graph.node:
        nodes_out += [*before.get(n.name, []), n, *after.get(n.name, [])]
    del graph.node[:]
    graph.node.extend(nodes_out)
    read = {i for n in graph.node for i in n.input}
    subgraphs = any(a.type in (5, 10) for n in graph.node for a in n.attribute)
    dead = set() if subgraphs else replaced - read - outputs
    kept = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new_inits])
    if any(x.scaled for x in scalings):
        entry = model.metadata_props.add()
        entry.key = INPUT_SCALES_KEY
        entry.value = json.dumps({x.layers[0]: x.alpha for x in scalings if x.scaled})
    return model, where


def has_input_scales(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s weight-only codes are of W diag(s) (:func:`rescale_graph`)."""
    return any(p.key == INPUT_SCALES_KEY for p in model.metadata_props)
