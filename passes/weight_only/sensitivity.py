"""Per-layer damage of weight-only quantization: the next-token KL to the float model.

For layer i at width b, quantize that weight alone (with the same method the model will be
quantized with: GPTQ damage for a GPTQ model) and measure

    D_i(b) = mean over calibration positions t of KL(p_float(. | x_<t) || p_i,b(. | x_<t)),

the label-free loss of METHODS.md section 3 (:func:`dyadiq.passes.sensitivity
.perturbable_model.loss`, computed here in float32 over a 262,144-word vocabulary). As in
:class:`~dyadiq.passes.sensitivity.perturbable_model.PerturbableModel`, every weight is a
graph input of one onnxruntime session, so a layer's variant costs one forward pass per
batch and no session rebuild. The damages go to the same ILP as the CNNs' (:mod:`.allocation`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dyadiq.passes.weight_only.layers import WeightLayer
from dyadiq.passes.weight_only.model_file import ModelFile, with_fed_weights

log = logging.getLogger(__name__)

# layer, width -> the dequantised W [R, K] at that width
Quantized = Callable[[WeightLayer, int], np.ndarray]


def log_softmax32(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (the vocabulary is the last axis)."""
    z = np.asarray(logits, np.float32).reshape(-1, logits.shape[-1])
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def next_token_kl(reference_log_probs: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(p_ref || softmax(logits)); ``reference_log_probs`` from
    :func:`log_softmax32`."""
    log_q = log_softmax32(logits)
    p = np.exp(reference_log_probs)
    return float(np.mean(np.sum(p * (reference_log_probs - log_q), axis=1, dtype=np.float64)))


class WeightFedModel:
    """The float model with every weight-only layer's weight fed as an input."""

    def __init__(
        self,
        source: ModelFile,
        layers: Sequence[WeightLayer],
        batches: Sequence[Mapping[str, np.ndarray]],
    ) -> None:
        self.layers = list(layers)
        self.stored = {layer.initializer: source.array(layer.initializer) for layer in layers}
        shapes = {name: tuple(a.shape) for name, a in self.stored.items()}
        self.session = source.session(with_fed_weights(source.header, shapes))
        self.output = self.session.get_outputs()[0].name
        self.batches = [dict(b) for b in batches]
        self.reference = [log_softmax32(logits) for logits in self.logits({})]

    def logits(self, overrides: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Output logits per batch with the initializers ``overrides`` names replaced."""
        feeds = {**self.stored, **overrides}
        return [self.session.run([self.output], {**batch, **feeds})[0] for batch in self.batches]

    def kl(self, overrides: Mapping[str, np.ndarray]) -> float:
        pairs = zip(self.reference, self.logits(overrides), strict=True)
        return float(np.mean([next_token_kl(r, o) for r, o in pairs]))


def kl_damage(
    model: WeightFedModel,
    quantized: Quantized,
    widths: Sequence[int],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[int, float]]:
    """``layer id -> width -> KL`` with that layer alone quantized at that width."""
    out: dict[str, dict[int, float]] = {}
    total = len(model.layers) * len(widths)
    done = 0
    for layer in model.layers:
        out[layer.id] = {}
        for bits in widths:
            w = quantized(layer, bits)
            out[layer.id][bits] = model.kl({layer.initializer: layer.stored(w)})
            done += 1
            if progress is not None:
                progress(done, total)
        log.info("weight-only sensitivity %s: %s", layer.id, out[layer.id])
    return out
