"""The float model with every weighted layer's weight as an input, plus its loss.

Analysis needs the network output for many weight settings (finite differences, one layer
quantized, pairs quantized). Exporting the weights as graph inputs lets one onnxruntime
session evaluate any of them without rebuilding a model. Outputs are compared with the float
model's in a label-free loss (METHODS.md section 3):

- classification: KL(p_float || p) on softmax of the logits (probability outputs are turned
  back into logits with a log). Its gradient at the float weights is zero and its Hessian
  in logit space is diag(p) - p p^T, so the weight Hessian is J^T (diag(p) - p p^T) J;
- embeddings: 1/2 ||e - e_float||^2 per row, with output Hessian I.

With ``activation_quant`` (site -> its quantizer, as the plan's QDQ model will hold it) every
activation site is fake-quantized by a QuantizeLinear/DequantizeLinear pair, and a loss is the
damage on top of that A8 model: loss(A8, weights replaced) - loss(A8, float weights), both
against the float model's output. That prices what the deployed model pays for a layer's
weights, including their interaction with the activation rounding, which a float-activation
loss does not see. The A8 model is run on exact kernels (no QDQ fusion), and is only used for
whole-loss evaluations: its rounding makes finite differences (the trace) meaningless.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from dyadiq.graph import QGraph
from dyadiq.ort_sessions import Kernels, open_session
from dyadiq.passes.compensation.layer_matrix import bias_constant
from dyadiq.passes.insert_qdq import insert_activation_qdq
from dyadiq.quantizers import ActQuant


class OutputKind(enum.Enum):
    LOGITS = "logits"
    PROBABILITIES = "probabilities"
    EMBEDDING = "embedding"


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).astype(np.float64)


def as_logits(output: np.ndarray, kind: OutputKind) -> np.ndarray:
    if kind is OutputKind.PROBABILITIES:
        return np.log(np.clip(_rows(output), 1e-12, None))
    return _rows(output)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def row_losses(reference: np.ndarray, output: np.ndarray, kind: OutputKind) -> np.ndarray:
    """The label-free loss of each output row against the float ``reference``'s row."""
    if kind is OutputKind.EMBEDDING:
        return 0.5 * np.sum((_rows(output) - _rows(reference)) ** 2, axis=-1)
    log_p = log_softmax(as_logits(reference, kind))
    log_q = log_softmax(as_logits(output, kind))
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def loss(reference: np.ndarray, output: np.ndarray, kind: OutputKind) -> float:
    """Mean per-row label-free loss of ``output`` against the float ``reference``."""
    return float(np.mean(row_losses(reference, output, kind)))


def logit_delta(reference: np.ndarray, delta: np.ndarray, kind: OutputKind) -> np.ndarray:
    """A change of the model output expressed in logit space (d log p = dp / p)."""
    rows = delta.reshape(-1, delta.shape[-1]).astype(np.float64)
    if kind is OutputKind.PROBABILITIES:
        return rows / np.clip(reference.reshape(rows.shape), 1e-12, None)
    return rows


def output_quadratic_form(reference: np.ndarray, delta: np.ndarray, kind: OutputKind) -> float:
    """Mean over rows of delta^T H_out delta, with H_out the loss Hessian at the reference."""
    d = _rows(delta)
    if kind is OutputKind.EMBEDDING:
        return float(np.mean(np.sum(d * d, axis=-1)))
    p = softmax(as_logits(reference, kind))
    return float(np.mean(np.sum(p * d * d, axis=-1) - np.sum(p * d, axis=-1) ** 2))


def _session(
    model: onnx.ModelProto | bytes, threads: int = 2, kernels: Kernels = Kernels.RUNTIME
) -> ort.InferenceSession:
    # a float model with weights swapped in: onnxruntime's optimised kernels are safe (and
    # fast) here, there is no QDQ pair for them to fuse; with activation QDQ pairs the caller
    # asks for exact kernels
    return open_session(model, kernels=kernels, threads=threads)


def with_activation_quantizers(graph: QGraph, activation_quant: Mapping[str, ActQuant]) -> QGraph:
    """A copy of ``graph`` with a QuantizeLinear/DequantizeLinear pair on every listed
    activation tensor (those it has), as the plan's QDQ model places them."""
    work = graph.copy()
    tensors = work.tensors()
    for name, quant in activation_quant.items():
        if name in tensors and isinstance(tensors[name], gs.Variable):
            insert_activation_qdq(work.graph, tensors[name], quant)
    work.graph.cleanup().toposort()
    return work


@dataclass(frozen=True)
class PerturbableSpec:
    """Everything a :class:`PerturbableModel` holds, as plain data: what an analysis worker
    (another process or machine) rebuilds its own session from. The float reference outputs
    travel with it, so every worker compares against the same arrays."""

    model: bytes  # serialized, weights and biases as graph inputs
    kind: OutputKind
    batches: list[dict[str, np.ndarray]]
    weights: dict[str, np.ndarray]
    weight_input: dict[str, str]
    biases: dict[str, np.ndarray]
    bias_input: dict[str, str]
    reference: list[np.ndarray]
    # with activation quantizers: each batch's per-row loss of the A8 model with float weights
    # (subtracted from every loss), and the kernels its QDQ pairs need
    baseline: list[np.ndarray] | None = None
    kernels: Kernels = Kernels.RUNTIME


class PerturbableModel:
    """Run the float model with any weighted layer's weights replaced."""

    def __init__(
        self,
        graph: QGraph,
        batches: Sequence[Mapping[str, np.ndarray]],
        kind: OutputKind,
        layer_ids: Sequence[str] | None = None,
        *,
        activation_quant: Mapping[str, ActQuant] | None = None,
    ) -> None:
        """``activation_quant``: losses on top of the model with these activation quantizers
        (module docstring); None: the float model."""
        self.kind = kind
        self.batches = [dict(b) for b in batches]
        self.kernels = Kernels.EXACT if activation_quant else Kernels.RUNTIME
        self.baseline: list[np.ndarray] | None = None
        float_reference: list[np.ndarray] | None = None
        if activation_quant:
            float_model = PerturbableModel(graph, batches, kind, layer_ids)
            float_reference = list(float_model.outputs({}))
            graph = with_activation_quantizers(graph, activation_quant)
        layers = [graph.node(i) for i in layer_ids] if layer_ids else graph.weighted_layers()
        model = graph.to_onnx()
        self.weights: dict[str, np.ndarray] = {}
        self.weight_input: dict[str, str] = {}
        self.biases: dict[str, np.ndarray] = {}  # biases a compensated quantizer may correct
        self.bias_input: dict[str, str] = {}
        by_name = {t.name: t for t in model.graph.initializer}
        for node in layers:
            weight = graph.weight(node)
            if weight is None or weight.name not in by_name:
                continue
            self.weights[node.name] = np.asarray(weight.values, np.float32)
            self.weight_input[node.name] = weight.name
            bias = bias_constant(graph, node)
            if bias is not None and bias.name in by_name:
                self.biases[node.name] = np.asarray(bias.values, np.float32)
                self.bias_input[node.name] = bias.name
        fed = set(self.weight_input.values()) | set(self.bias_input.values())
        kept = [t for t in model.graph.initializer if t.name not in fed]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        declared: set[str] = set()  # layers that read one weight (tied, unrolled LSTM) share it
        for arrays, names in ((self.weights, self.weight_input), (self.biases, self.bias_input)):
            for layer_id, name in names.items():
                if name in declared:
                    continue
                declared.add(name)
                shape = arrays[layer_id].shape
                model.graph.input.append(
                    onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
                )
        self.session = _session(model, kernels=self.kernels)
        self._model_bytes = model.SerializeToString()
        self.output_name = self.session.get_outputs()[0].name
        self.forward_passes = 0
        self._stack_batches(model)
        self.reference: list[np.ndarray] = self.outputs({})
        if float_reference is not None:
            # the float model stacks the same batches the same way (same check, same rows)
            shapes = [r.shape for r in float_reference], [r.shape for r in self.reference]
            assert shapes[0] == shapes[1], shapes
            quantized, self.reference = self.reference, float_reference
            self.baseline = [
                row_losses(r, q, kind) for r, q in zip(self.reference, quantized, strict=True)
            ]

    @property
    def baseline_loss(self) -> float:
        """The loss of the A8 model with float weights (0 for the float model)."""
        return float(np.mean([np.mean(b) for b in self.baseline])) if self.baseline else 0.0

    def spec(self) -> PerturbableSpec:
        return PerturbableSpec(
            self._model_bytes,
            self.kind,
            self.batches,
            self.weights,
            self.weight_input,
            self.biases,
            self.bias_input,
            self.reference,
            self.baseline,
            self.kernels,
        )

    @classmethod
    def from_spec(cls, spec: PerturbableSpec, threads: int = 2) -> PerturbableModel:
        """The model a :meth:`spec` describes, with its own onnxruntime session."""
        model = cls.__new__(cls)
        model.kind = spec.kind
        model.batches = spec.batches
        model.weights, model.weight_input = spec.weights, spec.weight_input
        model.biases, model.bias_input = spec.biases, spec.bias_input
        model.kernels = spec.kernels
        model.session = _session(spec.model, threads, spec.kernels)
        model._model_bytes = spec.model
        model.output_name = model.session.get_outputs()[0].name
        model.forward_passes = 0
        model.reference = spec.reference
        model.baseline = spec.baseline
        return model

    def _stack_batches(self, model: onnx.ModelProto, rows: int = 16) -> None:
        """Run many samples per call when the model tolerates a dynamic batch dimension.

        Exporters often fix batch 1; making dim 0 symbolic works unless a Reshape hard-codes
        it, which the check below (stacked == separate) detects.
        """
        if len(self.batches) < 2:
            return
        dynamic = onnx.ModelProto()
        dynamic.CopyFrom(model)
        fed_names = set(self.weight_input.values()) | set(self.bias_input.values())
        for value in [*dynamic.graph.input, *dynamic.graph.output]:
            dims = value.type.tensor_type.shape.dim
            if dims and value.name not in fed_names:
                dims[0].Clear()
                dims[0].dim_param = "batch"
        del dynamic.graph.value_info[:]
        weights = self._parameters({}, None)
        try:
            session = _session(dynamic, kernels=self.kernels)
            pair = {k: np.concatenate([b[k] for b in self.batches[:2]]) for k in self.batches[0]}
            quiet = ort.RunOptions()
            quiet.log_severity_level = 4  # a failing probe is expected; keep stderr clean
            stacked = session.run([self.output_name], {**pair, **weights}, quiet)[0]
            separate = np.concatenate(
                [
                    self.session.run([self.output_name], {**b, **weights})[0]
                    for b in self.batches[:2]
                ]
            )
        except Exception:  # onnxruntime's own errors: a hard-coded batch dim
            return
        if stacked.shape != separate.shape or not np.allclose(stacked, separate, atol=1e-4):
            return
        self._model_bytes = dynamic.SerializeToString()
        flat = {k: np.concatenate([b[k] for b in self.batches]) for k in self.batches[0]}
        total = next(iter(flat.values())).shape[0]
        self.batches = [
            {k: v[i : i + rows] for k, v in flat.items()} for i in range(0, total, rows)
        ]
        self.session = session

    def _parameters(
        self,
        overrides: Mapping[str, np.ndarray],
        bias_overrides: Mapping[str, np.ndarray] | None,
    ) -> dict[str, np.ndarray]:
        feeds = {self.weight_input[k]: v for k, v in self.weights.items()}
        feeds.update({self.bias_input[k]: v for k, v in self.biases.items()})
        feeds.update({self.weight_input[k]: v.astype(np.float32) for k, v in overrides.items()})
        for layer_id, bias in (bias_overrides or {}).items():
            if layer_id in self.bias_input:
                feeds[self.bias_input[layer_id]] = np.asarray(bias, np.float32)
        return feeds

    def outputs(
        self,
        overrides: Mapping[str, np.ndarray],
        bias_overrides: Mapping[str, np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """The model outputs with these layers' weights (and biases) replaced."""
        weights = self._parameters(overrides, bias_overrides)
        results = []
        for feeds in self.batches:
            results.append(self.session.run([self.output_name], {**feeds, **weights})[0])
            self.forward_passes += 1
        return results

    def loss(
        self,
        overrides: Mapping[str, np.ndarray],
        bias_overrides: Mapping[str, np.ndarray] | None = None,
    ) -> float:
        _, rows = self.losses(overrides, bias_overrides)
        return float(np.mean([np.mean(r) for r in rows]))

    def losses(
        self,
        overrides: Mapping[str, np.ndarray],
        bias_overrides: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(outputs, per-row losses per batch) with these layers replaced; on top of the A8
        model, each row's loss less its A8 baseline's."""
        outs = self.outputs(overrides, bias_overrides)
        rows = [row_losses(r, o, self.kind) for r, o in zip(self.reference, outs, strict=True)]
        if self.baseline is not None:
            rows = [r - b for r, b in zip(rows, self.baseline, strict=True)]
        return outs, rows

    def fisher_quadratic_form(self, layer_id: str, v: np.ndarray, epsilon: float) -> float:
        """v^T J^T H_out J v for one layer, J v by a central finite difference."""
        w = self.weights[layer_id]
        plus = self.outputs({layer_id: w + epsilon * v})
        minus = self.outputs({layer_id: w - epsilon * v})
        values = [
            output_quadratic_form(
                ref,
                logit_delta(ref, (p.astype(np.float64) - m) / (2 * epsilon), self.kind),
                self.kind,
            )
            for ref, p, m in zip(self.reference, plus, minus, strict=True)
        ]
        return float(np.mean(values))
