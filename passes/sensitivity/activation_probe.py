"""Activation damage per quantization site, and feature-map entropy per weighted layer.

Activation damage: every activation site of an all-8-bit plan (``find_activation_sites``) gets
a switchable fake quantizer spliced in front of its consumers,

    t' = t + enable * (dequant(quant(t; scale, zero_point, bits)) - t),

with scale / zero point / code range / enable as extra graph inputs, so one onnxruntime
session evaluates "site s alone at b bits" for every s and b (asymmetric unsigned codes, the
pipeline's default; range = min/max of the site over the analysis batches). The damage is the
label-free loss against the float output, as for weights. Scale-sharing groups are ignored
here: each site is perturbed alone.

Activation Hessian trace (HAWQ-V2 for activations, ``trace=True``): each site's quantizer
output also gets ``+ eps * v(seed)``, v a +-1 vector the graph derives from a scalar seed with
a sine hash over the element index (in float64: ``sign(frac(sin(i * 12.9898 + seed * 78.233)
* 43758.5453) - 1/2)``), so one scalar input picks a Rademacher-like probe without feeding
activation-sized arrays. v^T H_a v comes from the central difference of the output as for
weights; per batch it is divided by the site's element count, giving the average trace
Tr(H_a)/n_a, and the damage of b-bit codes is 1/2 Tr(H_a)/n_a ||Q_b(a) - a||^2 with the
quantization error measured on the same batches.

Feature-map entropy: Shannon entropy (bits) of a 256-bin histogram of each weighted layer's
output over its own range, averaged over batches: a cheap data-only importance score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph
from dyadiq.passes.activation_sites import find_activation_sites
from dyadiq.passes.sensitivity.estimators import Estimate
from dyadiq.passes.sensitivity.perturbable_model import (
    OutputKind,
    _session,
    logit_delta,
    loss,
    output_quadratic_form,
)
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import activation_quant

_SWITCHES = ("scale", "zero_point", "qmin", "qmax", "enable")
_PERTURBATION = ("seed", "eps")  # the trace probe's switches (``trace=True``)


@dataclass(frozen=True)
class ActivationSite:
    tensor: str
    consumers: tuple[str, ...]  # weighted layers that read this tensor
    damage: Mapping[int, float]  # measured: the loss with this site alone quantized
    trace: Estimate | None = None  # average Hessian trace Tr(H_a)/n_a (HAWQ-V2)
    hessian_damage: Mapping[int, float] = field(default_factory=dict)  # 1/2 Tr/n ||Q(a)-a||^2

    def to_json(self) -> dict[str, object]:
        return {
            "consumers": list(self.consumers),
            "damage": {str(b): v for b, v in self.damage.items()},
            "trace": self.trace.to_json() if self.trace else None,
            "hessian_damage": {str(b): v for b, v in self.hessian_damage.items()},
        }


@dataclass(frozen=True)
class ProbeSpec:
    """What an analysis worker needs to price activation sites: the model with its switchable
    quantizers (serialized), the batches, the float reference and each site's range."""

    model: bytes
    kind: OutputKind
    output_name: str
    sites: list[str]
    batches: list[dict[str, np.ndarray]]
    reference: list[np.ndarray]
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    traced: bool = False  # the model has the trace probe's perturbation inputs
    elements: dict[str, list[int]] = field(default_factory=dict)  # per site: per row, batch


def _row_count(output: np.ndarray) -> int:
    return int(output.reshape(-1, output.shape[-1]).shape[0])


def _perturbation_nodes(
    tensor: str, index: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """``tensor + eps * v(seed)`` (module docstring): nodes, constants, output name."""
    make = onnx.helper.make_node
    p = f"__at{index}"
    seed, eps = f"__aq{index}_seed", f"__aq{index}_eps"
    constants = [
        onnx.helper.make_tensor(f"{p}_flat_shape", onnx.TensorProto.INT64, [1], [-1]),
        onnx.helper.make_tensor(f"{p}_zero", onnx.TensorProto.INT64, [], [0]),
        onnx.helper.make_tensor(f"{p}_one", onnx.TensorProto.INT64, [], [1]),
        onnx.helper.make_tensor(f"{p}_a", onnx.TensorProto.DOUBLE, [], [12.9898]),
        onnx.helper.make_tensor(f"{p}_b", onnx.TensorProto.DOUBLE, [], [78.233]),
        onnx.helper.make_tensor(f"{p}_c", onnx.TensorProto.DOUBLE, [], [43758.5453]),
        onnx.helper.make_tensor(f"{p}_half", onnx.TensorProto.DOUBLE, [], [0.5]),
    ]
    nodes = [
        make("Shape", [tensor], [f"{p}_shape"]),
        make("Reshape", [tensor, f"{p}_flat_shape"], [f"{p}_flat"]),
        make("Size", [f"{p}_flat"], [f"{p}_n"]),
        make("Range", [f"{p}_zero", f"{p}_n", f"{p}_one"], [f"{p}_idx"]),
        make("Cast", [f"{p}_idx"], [f"{p}_i"], to=onnx.TensorProto.DOUBLE),
        make("Cast", [seed], [f"{p}_s"], to=onnx.TensorProto.DOUBLE),
        make("Mul", [f"{p}_i", f"{p}_a"], [f"{p}_ia"]),
        make("Mul", [f"{p}_s", f"{p}_b"], [f"{p}_sb"]),
        make("Add", [f"{p}_ia", f"{p}_sb"], [f"{p}_arg"]),
        make("Sin", [f"{p}_arg"], [f"{p}_sin"]),
        make("Mul", [f"{p}_sin", f"{p}_c"], [f"{p}_h"]),
        make("Floor", [f"{p}_h"], [f"{p}_fl"]),
        make("Sub", [f"{p}_h", f"{p}_fl"], [f"{p}_fr"]),
        make("Sub", [f"{p}_fr", f"{p}_half"], [f"{p}_c0"]),
        make("Sign", [f"{p}_c0"], [f"{p}_sg"]),
        make("Cast", [f"{p}_sg"], [f"{p}_v32"], to=onnx.TensorProto.FLOAT),
        make("Reshape", [f"{p}_v32", f"{p}_shape"], [f"{p}_v"]),
        make("Mul", [f"{p}_v", eps], [f"{p}_dv"]),
        make("Add", [tensor, f"{p}_dv"], [f"{p}_out"]),
    ]
    return nodes, constants, f"{p}_out"


def _fake_quant_nodes(tensor: str, index: int) -> tuple[list[onnx.NodeProto], str]:
    make = onnx.helper.make_node
    p = f"__aq{index}"
    names = {s: f"{p}_{s}" for s in _SWITCHES}
    nodes = [
        make("Div", [tensor, names["scale"]], [f"{p}_x"]),
        make("Round", [f"{p}_x"], [f"{p}_r"]),
        make("Add", [f"{p}_r", names["zero_point"]], [f"{p}_z"]),
        make("Max", [f"{p}_z", names["qmin"]], [f"{p}_lo"]),
        make("Min", [f"{p}_lo", names["qmax"]], [f"{p}_c"]),
        make("Sub", [f"{p}_c", names["zero_point"]], [f"{p}_s"]),
        make("Mul", [f"{p}_s", names["scale"]], [f"{p}_dq"]),
        make("Sub", [f"{p}_dq", tensor], [f"{p}_err"]),
        make("Mul", [f"{p}_err", names["enable"]], [f"{p}_gated"]),
        make("Add", [tensor, f"{p}_gated"], [f"{p}_out"]),
    ]
    return nodes, f"{p}_out"


class ActivationProbe:
    """The float model with switchable fake quantizers on every activation site and every
    weighted layer's output exposed."""

    def __init__(
        self,
        graph: QGraph,
        batches: Sequence[Mapping[str, np.ndarray]],
        kind: OutputKind,
        *,
        trace: bool = False,
    ) -> None:
        """``trace``: also the perturbation inputs of the activation Hessian trace."""
        self.kind = kind
        self.traced = trace
        self.batches = [dict(b) for b in batches]
        sites = find_activation_sites(graph, PrecisionPlan.uniform(graph))
        weighted = {n.name for n in graph.weighted_layers()}
        tensors = graph.tensors()
        graph_outputs = {t.name for t in graph.graph.outputs}
        # a site that is a graph output stays float here (its consumers are outside)
        self.sites = [t for t in sites.tensors if t not in graph_outputs]
        self.consumers = {
            t: tuple(c.name for c in tensors[t].outputs if c.name in weighted) for t in self.sites
        }
        self.layer_outputs = {
            n.name: n.outputs[0].name for n in graph.weighted_layers() if n.outputs
        }
        model = graph.to_onnx()
        self.output_name = model.graph.output[0].name
        added: list[onnx.NodeProto] = []
        switches = _SWITCHES + (_PERTURBATION if trace else ())
        for i, tensor in enumerate(self.sites):
            nodes, out = _fake_quant_nodes(tensor, i)
            if trace:
                more, constants, out = _perturbation_nodes(out, i)
                nodes += more
                model.graph.initializer.extend(constants)
            for node in model.graph.node:
                for j, name in enumerate(node.input):
                    if name == tensor:
                        node.input[j] = out
            added += nodes
            for s in switches:
                model.graph.input.append(
                    onnx.helper.make_tensor_value_info(f"__aq{i}_{s}", onnx.TensorProto.FLOAT, [])
                )
        model.graph.node.extend(added)
        existing = {o.name for o in model.graph.output}
        watched = [*self.sites, *self.layer_outputs.values()]
        for name in dict.fromkeys(watched):
            if name not in existing:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        sorted_graph = gs.import_onnx(model)
        sorted_graph.toposort()
        model = gs.export_onnx(sorted_graph)
        self._model_bytes = model.SerializeToString()
        self.session = _session(model)
        self.forward_passes = 0
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._disabled = self._switches_off(len(self.sites), trace)
        first = [self._run(b, {}) for b in self.batches]
        self.reference = [f[self.output_name] for f in first]
        self.ranges = {
            t: (min(float(f[t].min()) for f in first), max(float(f[t].max()) for f in first))
            for t in self.sites
        }
        # what the trace needs from the float activations: their RMS (the finite-difference
        # step) and, per width, the mean squared quantization error (the damage's ||Q(a)-a||^2)
        self.rms = {
            t: float(np.sqrt(np.mean([np.mean(f[t].astype(np.float64) ** 2) for f in first])))
            for t in self.sites
        }
        self._site_values = {t: [f[t] for f in first] for t in self.sites} if trace else {}
        # elements of each site per output row, per batch (the per-row average trace's m)
        self.elements = {
            t: [max(1, f[t].size // _row_count(f[self.output_name])) for f in first]
            for t in self.sites
        }
        self._layer_values = {
            layer: [f[name] for f in first] for layer, name in self.layer_outputs.items()
        }

    @staticmethod
    def _switches_off(sites: int, traced: bool = False) -> dict[str, np.ndarray]:
        switches = _SWITCHES + (_PERTURBATION if traced else ())
        return {
            f"__aq{i}_{s}": np.array(1.0 if s in ("scale", "qmax") else 0.0, np.float32)
            for i in range(sites)
            for s in switches
        }

    def quantization_error(self, tensor: str, bits: int) -> float:
        """Mean over output rows of ||Q_b(a_r) - a_r||^2 for the site (``trace=True`` only)."""
        lo, hi = self.ranges[tensor]
        q = activation_quant(lo, hi, bits, signed=False)
        errors = []
        for a, ref in zip(self._site_values[tensor], self.reference, strict=True):
            x = a.astype(np.float64)
            codes = np.clip(np.round(x / q.scale) + q.zero_point, q.qmin, q.qmax)
            total = float(np.sum(((codes - q.zero_point) * q.scale - x) ** 2))
            errors.append(total / _row_count(ref))
        return float(np.mean(errors))

    def trace_sample(self, index: int, seed: float, epsilon: float) -> float:
        """One Hutchinson sample of the site's average trace per element of one output row,
        mean over batches of v^T H v / m: H the Hessian of the batch's mean loss over the
        site's values (block diagonal over rows, so E[v^T H v] is the mean per-row trace),
        m the site's elements per row; J v by a central difference of step ``epsilon``."""
        values = []
        for i, (ref, b) in enumerate(zip(self.reference, self.batches, strict=True)):
            outs = []
            for sign in (1.0, -1.0):
                switches = {
                    f"__aq{index}_seed": np.array(seed, np.float32),
                    f"__aq{index}_eps": np.array(sign * epsilon, np.float32),
                }
                outs.append(self._run(b, switches, [self.output_name])[self.output_name])
            delta = (outs[0].astype(np.float64) - outs[1]) / (2 * epsilon)
            form = output_quadratic_form(ref, logit_delta(ref, delta, self.kind), self.kind)
            values.append(form / self.elements[self.sites[index]][i])
        return float(np.mean(values))

    def spec(self) -> ProbeSpec:
        return ProbeSpec(
            self._model_bytes,
            self.kind,
            self.output_name,
            list(self.sites),
            self.batches,
            self.reference,
            dict(self.ranges),
            self.traced,
            dict(self.elements),
        )

    @classmethod
    def from_spec(cls, spec: ProbeSpec, threads: int = 2) -> ActivationProbe:
        """A probe that prices sites (:meth:`site_damage`) with its own session."""
        probe = cls.__new__(cls)
        probe.kind = spec.kind
        probe.batches = spec.batches
        probe.sites = list(spec.sites)
        probe.output_name = spec.output_name
        probe.session = _session(spec.model, threads)
        probe._model_bytes = spec.model
        probe.forward_passes = 0
        probe._outputs = [o.name for o in probe.session.get_outputs()]
        probe.traced = spec.traced
        probe._disabled = cls._switches_off(len(probe.sites), spec.traced)
        probe.reference = spec.reference
        probe.ranges = dict(spec.ranges)
        probe.elements = dict(spec.elements)
        return probe

    def _run(
        self,
        feeds: Mapping[str, np.ndarray],
        switches: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        self.forward_passes += 1
        names = list(outputs or self._outputs)
        values = self.session.run(names, {**feeds, **self._disabled, **switches})
        return dict(zip(names, values, strict=True))

    def site_damage(self, index: int, bits: int) -> float:
        lo, hi = self.ranges[self.sites[index]]
        q = activation_quant(lo, hi, bits, signed=False)
        switches = {
            f"__aq{index}_scale": np.array(q.scale, np.float32),
            f"__aq{index}_zero_point": np.array(q.zero_point, np.float32),
            f"__aq{index}_qmin": np.array(q.qmin, np.float32),
            f"__aq{index}_qmax": np.array(q.qmax, np.float32),
            f"__aq{index}_enable": np.array(1.0, np.float32),
        }
        values = [
            loss(ref, self._run(b, switches, [self.output_name])[self.output_name], self.kind)
            for ref, b in zip(self.reference, self.batches, strict=True)
        ]
        return float(np.mean(values))

    def activation_sites(self, bits: Sequence[int]) -> list[ActivationSite]:
        return [
            ActivationSite(t, self.consumers[t], {b: self.site_damage(i, b) for b in bits})
            for i, t in enumerate(self.sites)
        ]

    def feature_entropy(self, bins: int = 256) -> dict[str, float]:
        """Mean over batches of the histogram entropy (bits) of each layer's output."""
        out: dict[str, float] = {}
        for layer, values in self._layer_values.items():
            entropies = []
            for v in values:
                counts, _ = np.histogram(v.astype(np.float64), bins=bins)
                p = counts[counts > 0] / counts.sum()
                entropies.append(float(-np.sum(p * np.log2(p))))
            out[layer] = float(np.mean(entropies))
        return out
