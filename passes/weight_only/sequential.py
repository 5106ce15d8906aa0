"""Sequential GPTQ: each layer's Hessian from the inputs the already-quantized prefix makes.

Plain weight-only GPTQ (:mod:`.statistics`) takes every H = E[x x^T] from one pass of the
float model. Here the MatMul inputs are visited in graph order, ``stage_size`` at a time
(4 on a transformer block: attention input, attention output projection's input, MLP input,
MLP down projection's input), and a stage's H comes from a pass in which every weight
quantized in an earlier stage is fed dequantised, as the CNN compensator does with its
quantized prefix. A stage's own weights stay float for that pass (inside one stage the
inputs are the block's float ones, GPTQ's non-"true-sequential" mode).

The prefix is not rerun per stage: the graph is split into one :class:`Segment` per stage
(the nodes its inputs need that no earlier stage ran), and each batch's tensors that cross
into later segments are kept. A stage's segment runs twice per batch, with its own weights
float (for its Hessians) and then quantized (for the tensors later segments read), so the
whole sequence costs about two passes of the model per calibration batch.

Weights with a Gather reader (an embedding, a tied embedding / LM head) are quantized first
with their float-model H: their rows are looked up at the start of the graph, so every later
stage should see them quantized. A weight read by several MatMuls is quantized in the stage
of its last input, with the sum of its inputs' Hessians as collected in their stages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from dyadiq.passes.weight_only.groupwise import GroupwiseWeight
from dyadiq.passes.weight_only.layers import Orientation, Use, WeightLayer
from dyadiq.passes.weight_only.model_file import ModelFile, copy_header, with_fed_weights

log = logging.getLogger(__name__)

# layer, its float W [R, K], width, its H (None: no MatMul reader) -> quantized
LayerQuantize = Callable[[WeightLayer, np.ndarray, int, "np.ndarray | None"], GroupwiseWeight]


def input_stages(
    header: onnx.ModelProto, layers: Sequence[WeightLayer], stage_size: int
) -> list[list[str]]:
    """The distinct MatMul inputs of ``layers`` in graph order, ``stage_size`` per stage;
    inputs read only by weights that are quantized first (Gather readers) are left out."""
    if stage_size < 1:
        raise ValueError(f"stage size must be positive, got {stage_size}")
    produced_at = {out: k for k, node in enumerate(header.graph.node) for out in node.output}
    late = [x for x in layers if not _first(x)]
    names = sorted({a for x in late for a in x.activations}, key=lambda a: produced_at.get(a, -1))
    return [names[k : k + stage_size] for k in range(0, len(names), stage_size)]


def _first(layer: WeightLayer) -> bool:
    """Quantized before every stage: looked up by a Gather, or read by no MatMul."""
    return not layer.activations or any(r.use is Use.GATHER for r in layer.readers)


@dataclass(frozen=True)
class Segment:
    """The nodes a stage adds to the graph (those its inputs need that no earlier stage
    ran), as a model of their own: ``inputs`` come from the calibration feeds, the fed
    weights or earlier segments; ``outputs`` are the stage's MatMul inputs and every tensor
    a later segment reads."""

    header: onnx.ModelProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def segments(header: onnx.ModelProto, stages: Sequence[Sequence[str]]) -> list[Segment]:
    """One :class:`Segment` per stage of ``header`` (whose fed weights are graph inputs):
    running them in order computes every stage's inputs once, each from the previous
    segments' outputs, instead of the whole prefix again per stage."""
    graph = header.graph
    producer = {out: k for k, node in enumerate(graph.node) for out in node.output}
    owner: dict[int, int] = {}  # node index -> stage that runs it
    for s, names in enumerate(stages):
        todo = [producer[n] for n in names if n in producer]
        while todo:
            k = todo.pop()
            if k in owner:
                continue
            owner[k] = s
            node = graph.node[k]
            todo.extend(producer[i] for i in _reads(node) if i in producer)
    types = _element_types(header)
    initializers = {t.name for t in graph.initializer}
    made_by = {out: owner[k] for out, k in producer.items() if k in owner}
    read_later: dict[int, set[str]] = {s: set() for s in range(len(stages))}
    for k, s in owner.items():
        for name in _reads(graph.node[k]):
            if name in made_by and made_by[name] < s:
                read_later[made_by[name]].add(name)
    out: list[Segment] = []
    for s, names in enumerate(stages):
        nodes = [n for k, n in enumerate(graph.node) if owner.get(k) == s]
        made = {o for n in nodes for o in n.output}
        reads = {i for n in nodes for i in _reads(n)}
        inputs = tuple(sorted(reads - made - initializers))
        outputs = tuple(dict.fromkeys([*names, *sorted(read_later[s])]))
        model = copy_header(header)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        kept = [t for t in model.graph.initializer if t.name in reads]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        del model.graph.input[:]
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None)
            for n in inputs
        )
        del model.graph.output[:]
        model.graph.output.extend(
            onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None)
            for n in outputs
        )
        out.append(Segment(model, inputs, outputs))
    return out


def _reads(node: onnx.NodeProto) -> set[str]:
    return {i for i in node.input if i} | _subgraph_names(node)


def _element_types(header: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor (value_info, completed by shape inference)."""
    model = header
    if len(header.graph.value_info) < len(header.graph.node):
        model = onnx.shape_inference.infer_shapes(header)
    infos = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in infos}
    types.update({t.name: t.data_type for t in header.graph.initializer})
    return {k: v for k, v in types.items() if v}


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read inside ``node``'s subgraphs (If / Loop bodies may read outer
    tensors without listing them as inputs)."""
    out: set[str] = set()
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs] if attribute.type in (5, 10) else []:
            for inner in graph.node:
                out.update(i for i in inner.input if i)
                out.update(_subgraph_names(inner))
    return out


def sequential_quantize(
    source: ModelFile,
    layers: Sequence[WeightLayer],
    batches: Iterable[Mapping[str, np.ndarray]],
    bits: Mapping[str, int],
    quantize: LayerQuantize,
    float_hessians: Mapping[str, np.ndarray],
    *,
    stage_size: int = 4,
    progress: Callable[[str], None] | None = None,
) -> dict[str, GroupwiseWeight]:
    """Every layer of ``bits`` quantized by ``quantize`` on the Hessians of the quantized
    prefix; ``float_hessians``: the float model's, for the weights quantized first.

    Each stage runs its segment twice per batch: with its own weights float (the Hessians),
    then with them quantized (the values later segments read)."""
    batch_list = [dict(b) for b in batches]
    chosen = [x for x in layers if x.id in bits]
    results: dict[str, GroupwiseWeight] = {}
    fed: dict[str, np.ndarray] = {}  # initializer -> dequantised stored layout

    def done(layer: WeightLayer, h: np.ndarray | None) -> None:
        w = np.asarray(layer.matrix(source.array(layer.initializer)), np.float32)
        q = quantize(layer, w, bits[layer.id], h)
        results[layer.id] = q
        fed[layer.initializer] = layer.stored(q.dequantize())
        if progress is not None:
            progress(layer.id)

    for layer in (x for x in chosen if _first(x)):
        done(layer, _sum(float_hessians, layer.activations))
    stages = input_stages(source.header, chosen, stage_size)
    shapes = {x.initializer: _stored_shape(x) for x in chosen}
    parts = segments(with_fed_weights(source.header, shapes), stages)
    values: list[dict[str, np.ndarray]] = [dict(b) for b in batch_list]  # crossing tensors
    collected: dict[str, np.ndarray] = {}
    pending = [x for x in chosen if not _first(x)]
    for k, (stage, part) in enumerate(zip(stages, parts, strict=True)):
        t0 = time.perf_counter()
        float_weights = {
            name: source.array(name) for name in part.inputs if name in shapes and name not in fed
        }
        session = source.session(part.header)
        outputs = _run_segment(session, part, values, {**float_weights, **fed})
        collected.update(_hessians(stage, part.outputs, outputs))
        ready = [x for x in pending if all(a in collected for a in x.activations)]
        for layer in ready:
            done(layer, _sum(collected, layer.activations))
        pending = [x for x in pending if x not in ready]
        if any(name in fed for name in float_weights):  # its own weights now quantized
            outputs = _run_segment(session, part, values, {**float_weights, **fed})
        for v, out in zip(values, outputs, strict=True):
            v.update(zip(part.outputs, out, strict=True))
        del session
        log.info(
            "sequential GPTQ stage %d (%s): %d weights, %.1f s",
            k,
            ", ".join(stage),
            len(ready),
            time.perf_counter() - t0,
        )
    return results


def _run_segment(
    session: Any,
    part: Segment,
    values: Sequence[Mapping[str, np.ndarray]],
    weights: Mapping[str, np.ndarray],
) -> list[list[np.ndarray]]:
    """``part``'s outputs for every batch (``values``: its feeds and earlier outputs)."""
    out = []
    for v in values:
        feeds = {n: weights[n] if n in weights else v[n] for n in part.inputs}
        out.append(session.run(list(part.outputs), feeds))
    return out


def _stored_shape(layer: WeightLayer) -> tuple[int, ...]:
    rows, columns = layer.rows, layer.columns
    return (rows, columns) if layer.orientation is Orientation.ROWS else (columns, rows)


def _hessians(
    names: Sequence[str], outputs: Sequence[str], values: Sequence[Sequence[np.ndarray]]
) -> dict[str, np.ndarray]:
    """H = mean x x^T of the tensors ``names`` over every batch's token rows."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        k = outputs.index(name)
        flats = [np.asarray(v[k], np.float64).reshape(-1, v[k].shape[-1]) for v in values]
        total = sum(f.T @ f for f in flats[1:])
        total = flats[0].T @ flats[0] + total
        out[name] = total / sum(f.shape[0] for f in flats)
    return out


def _sum(hessians: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray | None:
    found = [hessians[a] for a in names if a in hessians]
    return sum(found[1:], found[0]) if found else None
