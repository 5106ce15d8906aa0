"""Activation damage per quantization site, and feature-map entropy per weighted layer.

Activation damage: every activation site of an all-8-bit plan (``find_activation_sites``) gets
a switchable fake quantizer spliced in front of its consumers,

    t' = t + enable * (dequant(quant(t; scale, zero_point, bits)) - t),

with scale / zero point / code range / enable as extra graph inputs, so one onnxruntime
session evaluates "site s alone at b bits" for every s and b (asymmetric unsigned codes, the
pipeline's default; range = min/max of the site over the analysis batches). The damage is the
label-free loss against the float output, as for weights. Scale-sharing groups are ignored
here: each site is perturbed alone.

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
from dyadiq.passes.sensitivity.perturbable_model import OutputKind, _session, loss
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import activation_quant

_SWITCHES = ("scale", "zero_point", "qmin", "qmax", "enable")


@dataclass(frozen=True)
class ActivationSite:
    tensor: str
    consumers: tuple[str, ...]  # weighted layers that read this tensor
    damage: Mapping[int, float]

    def to_json(self) -> dict[str, object]:
        return {
            "consumers": list(self.consumers),
            "damage": {str(b): v for b, v in self.damage.items()},
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
        self, graph: QGraph, batches: Sequence[Mapping[str, np.ndarray]], kind: OutputKind
    ) -> None:
        self.kind = kind
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
        for i, tensor in enumerate(self.sites):
            nodes, out = _fake_quant_nodes(tensor, i)
            for node in model.graph.node:
                for j, name in enumerate(node.input):
                    if name == tensor:
                        node.input[j] = out
            added += nodes
            for s in _SWITCHES:
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
        self._disabled = self._switches_off(len(self.sites))
        first = [self._run(b, {}) for b in self.batches]
        self.reference = [f[self.output_name] for f in first]
        self.ranges = {
            t: (min(float(f[t].min()) for f in first), max(float(f[t].max()) for f in first))
            for t in self.sites
        }
        self._layer_values = {
            layer: [f[name] for f in first] for layer, name in self.layer_outputs.items()
        }

    @staticmethod
    def _switches_off(sites: int) -> dict[str, np.ndarray]:
        return {
            f"__aq{i}_{s}": np.array(1.0 if s in ("scale", "qmax") else 0.0, np.float32)
            for i in range(sites)
            for s in _SWITCHES
        }

    def spec(self) -> ProbeSpec:
        return ProbeSpec(
            self._model_bytes,
            self.kind,
            self.output_name,
            list(self.sites),
            self.batches,
            self.reference,
            dict(self.ranges),
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
        probe._disabled = cls._switches_off(len(probe.sites))
        probe.reference = spec.reference
        probe.ranges = dict(spec.ranges)
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
