"""Compensate every weighted layer at every width, in order, on the quantized prefix.

For width b, layers are visited in topological order. Layer i's input rows come from the
network in which every earlier layer already carries its compensated b-bit weights (and
corrected bias) and every activation site its fake quantizer (``act_params``): the inputs the
layer will really see in a uniform b-bit model. Only the layer's H = E[x x^T] and E[x] are
kept (``InputStatistics``), never the activations themselves.

Weights and biases are graph inputs (fed the float values, then the compensated ones as
layers are done), and each layer input is computed from the ones before it
(:class:`SegmentRunner`), so one width costs about one pass of the network per batch.

A layer's table entry at width b is therefore exact for uniform b-bit plans; a mixed plan
uses, per layer, the entry of its own width (its prefix then differs from the one
compensation saw: the report's notes say so). :meth:`SequentialCompensator.for_plan` removes
that difference for one chosen plan: one more pass in which every layer gets its own width and
sees the plan's own quantized prefix (about the cost of one width).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.op_facts import OpKind
from dyadiq.passes.compensation.compensated_weights import (
    CompensatedWeights,
    LayerCompensation,
    compensate_layer,
)
from dyadiq.passes.compensation.input_statistics import InputStatistics
from dyadiq.passes.compensation.layer_matrix import LayerGeometry, bias_constant, layer_geometry
from dyadiq.passes.compensation.segment_runner import SegmentRunner
from dyadiq.passes.compensation.settings import CompensationSettings
from dyadiq.passes.insert_qdq import insert_activation_qdq
from dyadiq.quantizers import ActQuant, quantize_weight_per_channel

log = logging.getLogger(__name__)

_PATCH_BUDGET = 1 << 23  # im2col elements per step (32 MiB of float32)


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
        self.segments = SegmentRunner(model, [layer.input_name for layer in self.layers])


# Input statistics hold H [d, d] in float64 per layer; GPTQ and the range search make a few
# float32 copies. Above this many inputs per channel (VGG19's 25088-input classifier: a 4.7 GiB
# H, killed for memory on a 24 GiB machine) the layer is compensated without them: the range
# search falls back to weight MSE, GPTQ and bias correction are declined with the reason.
MAX_HESSIAN_COLUMNS = 8192


def _layer_statistics(inputs: Sequence[np.ndarray], geometry: LayerGeometry) -> InputStatistics:
    stats = InputStatistics(geometry.groups, geometry.columns)
    for x in inputs:
        if geometry.kind is OpKind.CONV:
            # im2col a few samples at a time: patches stay under _PATCH_BUDGET elements
            per_sample = geometry.columns * geometry.groups * int(np.prod(x.shape[2:]))
            step = max(1, _PATCH_BUDGET // max(per_sample, 1))
            for first in range(0, x.shape[0], step):
                stats.update(geometry.input_rows(x[first : first + step]))
        else:
            stats.update(geometry.input_rows(x))
    return stats


class SequentialCompensator:
    """Computes widths on demand into one :class:`CompensatedWeights` (plans of one model
    share it: a width is compensated the first time a plan asks for it)."""

    def __init__(
        self,
        graph: QGraph,
        batches: Sequence[Mapping[str, np.ndarray]],
        settings: CompensationSettings,
        *,
        act_params: Mapping[str, ActQuant] | None = None,
        layer_ids: Sequence[str] | None = None,
    ) -> None:
        self.result = CompensatedWeights(settings)
        self.settings = settings
        self.batches = [dict(b) for b in list(batches)[: settings.samples]]
        self.graph = graph
        self.act_params = dict(act_params or {})
        self.layer_ids = layer_ids
        self._runner: _PrefixRunner | None = None
        if not settings.enabled:
            return
        if not self.act_params:
            self.result.notes.append("prefix activations in float (no activation quantizers)")
        self.result.notes.append(
            "each width's entries were computed on a uniformly quantized prefix at that width"
        )

    def ensure(self, widths: Iterable[int]) -> CompensatedWeights:
        if not self.settings.enabled:
            return self.result
        for bits in sorted(set(widths) - set(self.result.seconds)):
            if self._runner is None:
                self._runner = _PrefixRunner(self.graph, self.act_params, self.layer_ids)
            self._compensate_width(self._runner, bits)
        return self.result

    def for_plan(self, plan_bits: Mapping[str, int]) -> CompensatedWeights:
        """Weights compensated for one mixed plan (layer id -> weight bits): each layer at its
        plan width, on the inputs the plan's own quantized prefix gives it. Layers outside
        ``plan_bits`` stay float in the prefix and get no entry (round to nearest)."""
        result = CompensatedWeights(self.settings)
        if not self.settings.enabled:
            return result
        if self._runner is None:
            self._runner = _PrefixRunner(self.graph, self.act_params, self.layer_ids)
        start = time.perf_counter()
        self._compensate_pass(self._runner, dict(plan_bits), result)
        seconds = time.perf_counter() - start
        result.notes.append(
            f"compensated for one mixed plan in {seconds:.1f} s: every layer on its own plan "
            "width and the plan's own quantized prefix"
        )
        log.info("compensated %d layers for a mixed plan in %.1f s", len(plan_bits), seconds)
        return result

    def _compensate_width(self, runner: _PrefixRunner, bits: int) -> None:
        start = time.perf_counter()
        self._compensate_pass(runner, {layer.node_id: bits for layer in runner.layers}, self.result)
        self.result.seconds[bits] = time.perf_counter() - start
        log.info(
            "compensated %d layers at %d bits in %.1f s",
            len(runner.layers),
            bits,
            self.result.seconds[bits],
        )

    def _compensate_pass(
        self, runner: _PrefixRunner, plan_bits: Mapping[str, int], result: CompensatedWeights
    ) -> None:
        """Layers in order, each at ``plan_bits[layer]`` on the prefix compensated so far
        (a layer without a width keeps its float weights in the prefix)."""
        parameters = dict(runner.parameters)
        cache: dict[tuple[str, LayerGeometry], InputStatistics] = {}
        readers = Counter(
            (layer.weight_name, plan_bits[layer.node_id])
            for layer in runner.layers
            if layer.node_id in plan_bits
        )
        runner.segments.reset()
        for position, layer in enumerate(runner.layers):
            key = (layer.input_name, layer.geometry)
            columns = layer.geometry.columns
            too_wide = columns > MAX_HESSIAN_COLUMNS
            # the runner must be asked for every input in order, even one left unused
            inputs = runner.segments.values(position, self.batches, parameters)
            bits = plan_bits.get(layer.node_id)
            if bits is None:
                continue
            if readers[(layer.weight_name, bits)] > 1:
                # a weight several layers read (an unrolled LSTM's steps): the models store one
                # copy (passes/shared_weights.py), and codes fitted to one reader's inputs need
                # not suit the others' (benchmarks/results/coverage.md, captcha_crnn), so it is
                # rounded to nearest for all of them, with no bias shift
                quant = quantize_weight_per_channel(layer.weight, bits, layer.axis)
                declined = "the weight is shared by several layers: rounded to nearest"
                report = {"bits": bits, "passes": [], "declined": {"all": declined}}
                result.layers[(layer.node_id, bits)] = LayerCompensation(quant, None, report)
                parameters[layer.weight_name] = quant.dequantize()
                continue
            if key not in cache and not too_wide:  # siblings reading one tensor share them
                cache[key] = _layer_statistics(inputs, layer.geometry)
            entry = compensate_layer(
                layer.weight,
                layer.geometry,
                layer.axis,
                bits,
                None if too_wide else cache[key],
                self.settings,
                has_bias=layer.bias is not None,
                without_statistics=(
                    f"{columns} inputs per channel: a {columns}x{columns} Hessian "
                    f"({columns * columns * 8 / 2**20:,.0f} MiB) is over the "
                    f"{MAX_HESSIAN_COLUMNS}-input bound that keeps compensation memory-bounded"
                ),
            )
            result.layers[(layer.node_id, bits)] = entry
            parameters[layer.weight_name] = entry.quant.dequantize()
            if layer.bias_name is not None and layer.bias is not None:
                parameters[layer.bias_name] = result.bias(layer.node_id, bits, layer.bias)


def compensate(
    graph: QGraph,
    batches: Sequence[Mapping[str, np.ndarray]],
    widths: Iterable[int],
    settings: CompensationSettings,
    *,
    act_params: Mapping[str, ActQuant] | None = None,
    layer_ids: Sequence[str] | None = None,
) -> CompensatedWeights:
    """The compensated quantizer of ``graph`` (BatchNorm folded) for each of ``widths``."""
    compensator = SequentialCompensator(
        graph, batches, settings, act_params=act_params, layer_ids=layer_ids
    )
    return compensator.ensure(widths)
