"""Evaluate a model's tensors one after another, each from the ones computed before it.

Sequential compensation needs layer i's input with layers < i already changed; running the
whole prefix from the model input for every layer costs O(L^2) layer evaluations. Here each
target tensor gets its own small model: the nodes between it and the boundary of what is
already known (graph inputs, parameters fed by the caller, earlier targets kept in a cache).
Every node is then evaluated about once per pass over the targets. A cached target is dropped
after the last segment that reads it, so memory holds only the live frontier of activations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort


@dataclass
class _Segment:
    target: str
    boundary: tuple[str, ...]  # graph inputs, parameters and earlier targets it reads
    session: ort.InferenceSession | None  # None: the target is itself a graph input


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # exact float arithmetic, the same on every CPU (no fused kernels)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


class SegmentRunner:
    """``targets`` in evaluation order; inputs of the model are fed per batch, except the
    ``parameters`` (e.g. weights), which the caller feeds with their current values."""

    def __init__(self, model: onnx.ModelProto, targets: Sequence[str]) -> None:
        graph = model.graph
        inputs = {i.name: i for i in graph.input}
        initializers = {t.name: t for t in graph.initializer}
        producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
        available = set(inputs)
        self.segments: dict[str, _Segment] = {}
        self.targets = list(targets)
        last_use: dict[str, int] = {}
        for position, target in enumerate(targets):
            last_use[target] = position  # a target asked for again must stay cached
            if target in self.segments:
                continue
            if target in inputs:
                self.segments[target] = _Segment(target, (target,), None)
            else:
                nodes, boundary = self._closure(target, graph, producer, available, initializers)
                sub = onnx.helper.make_graph(
                    [graph.node[i] for i in sorted(nodes)],
                    f"segment_{position}",
                    [
                        inputs[b]
                        if b in inputs
                        else onnx.helper.make_tensor_value_info(b, onnx.TensorProto.FLOAT, None)
                        for b in sorted(boundary)
                    ],
                    [onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None)],
                    [initializers[n] for n in self._initializers_of(nodes, graph, initializers)],
                )
                segment_model = onnx.helper.make_model(sub, opset_imports=model.opset_import)
                segment_model.ir_version = model.ir_version
                self.segments[target] = _Segment(
                    target, tuple(sorted(boundary)), _session(segment_model)
                )
            for name in self.segments[target].boundary:
                last_use[name] = position
            available.add(target)
        self.last_use = last_use
        self.cache: dict[str, list[np.ndarray]] = {}

    @staticmethod
    def _closure(
        target: str,
        graph: onnx.GraphProto,
        producer: Mapping[str, int],
        available: set[str],
        initializers: Mapping[str, onnx.TensorProto],
    ) -> tuple[set[int], set[str]]:
        nodes: set[int] = set()
        boundary: set[str] = set()
        stack, seen = [target], set()
        while stack:
            name = stack.pop()
            if name in seen or not name or name in initializers:
                continue
            seen.add(name)
            if name in available and name != target:
                boundary.add(name)
                continue
            index = producer[name]
            if index not in nodes:
                nodes.add(index)
                stack.extend(graph.node[index].input)
        return nodes, boundary

    @staticmethod
    def _initializers_of(
        nodes: set[int], graph: onnx.GraphProto, initializers: Mapping[str, onnx.TensorProto]
    ) -> list[str]:
        used = {name for i in nodes for name in graph.node[i].input if name in initializers}
        return sorted(used)

    def reset(self) -> None:
        """Forget every cached target (the parameters are about to change)."""
        self.cache.clear()

    def values(
        self,
        position: int,
        batches: Sequence[Mapping[str, np.ndarray]],
        parameters: Mapping[str, np.ndarray],
    ) -> list[np.ndarray]:
        """Target ``position`` of the constructor's list on every batch (targets must be asked
        for in order); computed from its boundary unless cached."""
        target = self.targets[position]
        segment = self.segments[target]
        if target in self.cache:
            result = self.cache[target]
        elif segment.session is None:
            result = [np.asarray(feeds[target], np.float32) for feeds in batches]
        else:
            result = []
            for k, feeds in enumerate(batches):
                known = {**feeds, **parameters}
                run_feeds = {
                    b: (known[b] if b in known else self.cache[b][k]) for b in segment.boundary
                }
                result.append(np.asarray(segment.session.run([target], run_feeds)[0], np.float32))
        self.cache[target] = result
        for name in [n for n in self.cache if self.last_use.get(n, -1) <= position]:
            del self.cache[name]
        return result
