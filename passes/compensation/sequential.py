"""Compensate every weighted layer at every width, in order, on the quantized prefix.

For width b, layers are visited in topological order. Layer i's input rows come from the
network in which every earlier layer already carries its compensated b-bit weights (and
corrected bias) and every activation site its fake quantizer (``act_params``): the inputs the
layer will really see in a uniform b-bit model. Only the layer's H = E[x x^T] and E[x] are
kept (``InputStatistics``), never the activations themselves.

One onnxruntime session serves all widths: weights and biases are graph inputs (fed the float
values, then the compensated ones as layers are done), every layer input is a graph output,
and each run executes only the path to the tensor it fetches. A layer's table entry at width b
is therefore exact for uniform b-bit plans; a mixed plan uses, per layer, the entry of its own
width (its prefix then differs from the one compensation saw: the report says so).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.op_facts import OpKind
from dyadiq.passes.compensation.compensated_weights import CompensatedWeights, compensate_layer
from dyadiq.passes.compensation.input_statistics import InputStatistics
from dyadiq.passes.compensation.layer_matrix import LayerGeometry, layer_geometry
from dyadiq.passes.compensation.settings import CompensationSettings
from dyadiq.passes.insert_qdq import insert_activation_qdq
from dyadiq.quantizers import ActQuant

log = logging.getLogger(__name__)


def bias_constant(graph: QGraph, node: gs.Node) -> gs.Constant | None:
    """The constant a bias correction folds into: the layer's own bias input (Conv, Gemm with
    unit alpha and beta), or the per-channel constant of an Add right after a MatMul."""
    kind = graph.kind(node)
    facts = graph.facts(node)
    if kind is OpKind.GEMM and (
        float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0
    ):
        return None
    index = facts.bias_input
    if index is not None and index < len(node.inputs):
        bias = node.inputs[index]
        return bias if isinstance(bias, gs.Constant) else None
    weight = graph.weight(node)
    output = node.outputs[0]
    if kind is not OpKind.MATMUL or weight is None or len(output.outputs) != 1:
        return None
    add = output.outputs[0]
    constants = [t for t in add.inputs if isinstance(t, gs.Constant)]
    if graph.kind(add) is not OpKind.ADD or len(constants) != 1:
        return None
    channels = weight.values.shape[-1]
    values = np.asarray(constants[0].values)
    return constants[0] if values.size == channels and values.shape[-1] == channels else None


@dataclass(frozen=True)
class _Layer:
    node_id: str
    geometry: LayerGeometry
    axis: int
    input_name: str
    weight_name: str
    weight: np.ndarray
    bias_name: str | None
    bias: np.ndarray | None


class _PrefixRunner:
    """The float model with activation fake-quant, weights and biases as inputs."""

    def __init__(
        self, graph: QGraph, act_params: Mapping[str, ActQuant], layer_ids: Sequence[str] | None
    ) -> None:
        work = graph.copy()
        tensors = work.tensors()
        for name, quant in act_params.items():
            if name in tensors and isinstance(tensors[name], gs.Variable):
                insert_activation_qdq(work.graph, tensors[name], quant)
        work.graph.cleanup().toposort()
        wanted = set(layer_ids) if layer_ids is not None else None
        self.layers: list[_Layer] = []
        for node in work.weighted_layers():
            geometry = layer_geometry(work, node)
            weight = work.weight(node)
            if (
                geometry is None
                or weight is None
                or (wanted is not None and node.name not in wanted)
            ):
                continue
            bias = bias_constant(work, node)
            self.layers.append(
                _Layer(
                    node.name,
                    geometry,
                    weight_channel_axis(node),
                    node.inputs[0].name,
                    weight.name,
                    np.asarray(weight.values, np.float32),
                    bias.name if bias is not None else None,
                    np.asarray(bias.values, np.float32) if bias is not None else None,
                )
            )
        model = work.to_onnx()
        fed = {layer.weight_name for layer in self.layers}
        fed |= {layer.bias_name for layer in self.layers if layer.bias_name}
        initial = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        self.parameters = {name: initial[name].astype(np.float32) for name in fed}
        kept = [t for t in model.graph.initializer if t.name not in fed]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        for name, values in self.parameters.items():
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, values.shape)
            )
        self.graph_inputs = {i.name for i in model.graph.input}
        present = {o.name for o in model.graph.output}
        for layer in self.layers:
            if layer.input_name not in self.graph_inputs | present:
                model.graph.output.append(
                    onnx.helper.make_tensor_value_info(
                        layer.input_name, onnx.TensorProto.FLOAT, None
                    )
                )
                present.add(layer.input_name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 2
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.run_options = ort.RunOptions()
        self.run_options.only_execute_path_to_fetches = True

    def tensor(
        self, name: str, feeds: Mapping[str, np.ndarray], parameters: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        if name in feeds:
            return np.asarray(feeds[name], np.float32)
        inputs = {**feeds, **parameters}
        return np.asarray(self.session.run([name], inputs, self.run_options)[0], np.float32)


def _layer_statistics(
    runner: _PrefixRunner,
    layer: _Layer,
    batches: Sequence[Mapping[str, np.ndarray]],
    parameters: Mapping[str, np.ndarray],
) -> InputStatistics:
    geometry = layer.geometry
    stats = InputStatistics(geometry.groups, geometry.columns)
    for feeds in batches:
        x = runner.tensor(layer.input_name, feeds, parameters)
        if geometry.kind is OpKind.CONV:
            for sample in range(x.shape[0]):  # im2col one sample at a time: bounded memory
                stats.update(geometry.input_rows(x[sample : sample + 1]))
        else:
            stats.update(geometry.input_rows(x))
    return stats


def compensate(
    graph: QGraph,
    batches: Sequence[Mapping[str, np.ndarray]],
    widths: Sequence[int],
    settings: CompensationSettings,
    *,
    act_params: Mapping[str, ActQuant] | None = None,
    layer_ids: Sequence[str] | None = None,
) -> CompensatedWeights:
    """The compensated quantizer of ``graph`` (BatchNorm folded) for each of ``widths``."""
    result = CompensatedWeights(settings)
    if not settings.enabled:
        return result
    batches = list(batches)[: settings.samples]
    runner = _PrefixRunner(graph, act_params or {}, layer_ids)
    if not act_params:
        result.notes.append("prefix activations in float (no activation quantizers given)")
    result.notes.append(
        "each width's entries were computed on a uniformly quantized prefix at that width"
    )
    for bits in sorted(set(widths)):
        start = time.perf_counter()
        parameters = dict(runner.parameters)
        cache: dict[tuple[str, LayerGeometry], InputStatistics] = {}
        for layer in runner.layers:
            key = (layer.input_name, layer.geometry)
            if key not in cache:  # siblings reading one tensor share its statistics
                cache[key] = _layer_statistics(runner, layer, batches, parameters)
            entry = compensate_layer(
                layer.weight,
                layer.geometry,
                layer.axis,
                bits,
                cache[key],
                settings,
                has_bias=layer.bias is not None,
            )
            result.layers[(layer.node_id, bits)] = entry
            parameters[layer.weight_name] = entry.quant.dequantize()
            if layer.bias_name is not None and layer.bias is not None:
                parameters[layer.bias_name] = result.bias(layer.node_id, bits, layer.bias)
        result.seconds[bits] = time.perf_counter() - start
        log.info(
            "compensated %d layers at %d bits in %.1f s",
            len(runner.layers),
            bits,
            result.seconds[bits],
        )
    return result
