"""Sequential GPTQ: each layer's Hessian from the inputs the already-quantized prefix makes.

Plain weight-only GPTQ (:mod:`.statistics`) takes every H = E[x x^T] from one pass of the
float model. Here the MatMul inputs are visited in graph order, ``stage_size`` at a time
(4 on a transformer block: attention input, attention output projection's input, MLP input,
MLP down projection's input), and a stage's H comes from a pass in which every weight
quantized in an earlier stage is fed dequantised, as the CNN compensator does with its
quantized prefix. A stage's own weights stay float for that pass (inside one stage the
inputs are the block's float ones, GPTQ's non-"true-sequential" mode); each stage's pass
runs only the nodes its inputs need (the graph is cut after them).

Weights with a Gather reader (an embedding, a tied embedding / LM head) are quantized first
with their float-model H: their rows are looked up at the start of the graph, so every later
stage should see them quantized. A weight read by several MatMuls is quantized in the stage
of its last input, with the sum of its inputs' Hessians as collected in their stages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from dyadiq.passes.weight_only.groupwise import GroupwiseWeight
from dyadiq.passes.weight_only.layers import Use, WeightLayer
from dyadiq.passes.weight_only.model_file import ModelFile, copy_header, with_fed_weights
from dyadiq.passes.weight_only.statistics import accumulate_hessians

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


def cut_after(header: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``header`` whose outputs are ``outputs`` (float tensors) and that keeps only
    the nodes, inputs and initializers they need."""
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(header.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_names(node))
    model = copy_header(header)
    graph = model.graph
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.output[:]
    graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs
    )
    return model


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
    prefix; ``float_hessians``: the float model's, for the weights quantized first."""
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
    collected: dict[str, np.ndarray] = {}
    pending = [x for x in chosen if not _first(x)]
    for k, stage in enumerate(input_stages(source.header, chosen, stage_size)):
        t0 = time.perf_counter()
        shapes = {name: tuple(a.shape) for name, a in fed.items()}
        header = cut_after(with_fed_weights(source.header, shapes), stage)
        session = source.session(header)
        wanted = {i.name for i in session.get_inputs()}
        weights = {name: a for name, a in fed.items() if name in wanted}
        collected.update(accumulate_hessians(session, stage, batch_list, weights))
        del session
        ready = [x for x in pending if all(a in collected for a in x.activations)]
        for layer in ready:
            done(layer, _sum(collected, layer.activations))
        pending = [x for x in pending if x not in ready]
        log.info(
            "sequential GPTQ stage %d (%s): %d weights, %.1f s",
            k,
            ", ".join(stage),
            len(ready),
            time.perf_counter() - t0,
        )
    return results


def _sum(hessians: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray | None:
    found = [hessians[a] for a in names if a in hessians]
    return sum(found[1:], found[0]) if found else None
