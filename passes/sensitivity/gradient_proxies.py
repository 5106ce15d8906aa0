"""Per-layer statistics that need exact vector-Jacobian products (reverse mode, ``vjp.py``).

With z the model output in logit space (log of probability outputs), J_l = dz/dW_l and H_out
the Hessian of the label-free loss at the float output (diag(p) - p p^T for classifiers, I for
embeddings):

- **top eigenvalue** of the Gauss-Newton block G_l = J_l^T H_out J_l (HAWQ) by power
  iteration: J_l v by a central finite difference of the output (forward passes), then
  J_l^T (H_out J_l v) by one reverse pass;
- **Fisher diagonal** diag(G_l) = E_u[(J_l^T u)^2] for u with E[u u^T] = H_out: u = e_y - p
  with y drawn from the float model's own prediction (the true Fisher, per sample), or a
  standard normal u for embeddings. One reverse pass gives u's gradient for every layer;
- **task-loss gradient** g_l = J_l^T (p - e_y) / rows of the cross-entropy against labels
  y (given, or the float model's argmax). The label-free KL has zero gradient at the float
  weights, so a first-order (Taylor) proxy needs this labelled loss; embedding outputs have
  no task loss here, and get none.

Reverse passes run on the perturbable model's batches; rows inside a stacked batch draw
independent u, so cross terms vanish in expectation.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from dyadiq.errors import ConfigError
from dyadiq.passes.sensitivity.estimators import Estimate, power_iteration
from dyadiq.passes.sensitivity.perturbable_model import (
    OutputKind,
    PerturbableModel,
    as_logits,
    logit_delta,
    softmax,
)
from dyadiq.passes.sensitivity.vjp import VectorJacobianProduct


def output_cotangent(
    reference: np.ndarray, logit_cotangent: np.ndarray, kind: OutputKind
) -> np.ndarray:
    """A cotangent on the logits z as one on the raw output o: J_o^T (u / o) = J_z^T u when
    z = log o; the identity otherwise."""
    u = logit_cotangent
    if kind is OutputKind.PROBABILITIES:
        u = u / np.clip(reference.reshape(u.shape).astype(np.float64), 1e-12, None)
    return u.reshape(reference.shape).astype(np.float32)


def apply_output_hessian(reference: np.ndarray, d: np.ndarray, kind: OutputKind) -> np.ndarray:
    """H_out d per row (d in logit space)."""
    if kind is OutputKind.EMBEDDING:
        return d
    p = softmax(as_logits(reference, kind))
    return p * d - p * np.sum(p * d, axis=-1, keepdims=True)


class GradientProbe:
    """Reverse-mode products on a :class:`PerturbableModel` (its batches and weights)."""

    def __init__(self, model: PerturbableModel, graph_model: onnx.ModelProto) -> None:
        """``graph_model``: the float ONNX model ``model`` was built from (its weights are
        differentiated by name)."""
        self.model = model
        self._onnx = graph_model
        self._vjps: dict[tuple[tuple[str, tuple[int, ...]], ...], VectorJacobianProduct] = {}
        self.reverse_passes = 0

    def _vjp(self, feeds: Mapping[str, np.ndarray]) -> VectorJacobianProduct:
        key = tuple(sorted((k, tuple(v.shape)) for k, v in feeds.items()))
        if key not in self._vjps:
            self._vjps[key] = VectorJacobianProduct(
                self._onnx,
                {k: v.shape for k, v in feeds.items()},
                list(self.model.weight_input.values()),
            )
        return self._vjps[key]

    def weight_vjp(self, batch: int, logit_cotangent: np.ndarray) -> dict[str, np.ndarray]:
        """J^T u for one batch, u given in logit space; layer id -> gradient."""
        feeds = self.model.batches[batch]
        reference = self.model.reference[batch]
        grads = self._vjp(feeds)(
            feeds, {}, output_cotangent(reference, logit_cotangent, self.model.kind)
        )
        self.reverse_passes += 1
        return {layer: grads[name] for layer, name in self.model.weight_input.items()}

    def gauss_newton_product(self, layer_id: str, v: np.ndarray, epsilon: float) -> np.ndarray:
        """G_l v = J_l^T H_out J_l v, averaged over rows like the loss."""
        w = self.model.weights[layer_id]
        plus = self.model.outputs({layer_id: w + epsilon * v})
        minus = self.model.outputs({layer_id: w - epsilon * v})
        rows = sum(r.reshape(-1, r.shape[-1]).shape[0] for r in self.model.reference)
        total = np.zeros(w.shape, np.float64)
        for i, (ref, p, m) in enumerate(zip(self.model.reference, plus, minus, strict=True)):
            jv = logit_delta(ref, (p.astype(np.float64) - m) / (2 * epsilon), self.model.kind)
            total += self.weight_vjp(i, apply_output_hessian(ref, jv, self.model.kind))[layer_id]
        return total / rows

    def top_eigenvalue(
        self,
        layer_id: str,
        epsilon: float,
        *,
        rng: np.random.Generator,
        max_iters: int,
        rtol: float,
    ) -> Estimate:
        def matvec(v: np.ndarray) -> np.ndarray:
            return self.gauss_newton_product(layer_id, v.reshape(w_shape), epsilon)

        w_shape = self.model.weights[layer_id].shape
        return power_iteration(matvec, w_shape, rng=rng, max_iters=max_iters, rtol=rtol)

    def fisher_diagonal(self, *, rng: np.random.Generator, draws: int) -> dict[str, np.ndarray]:
        """diag(G_l) for every layer, by ``draws`` sampled cotangents per batch."""
        total = {k: np.zeros(w.shape, np.float64) for k, w in self.model.weights.items()}
        rows = 0
        for i, ref in enumerate(self.model.reference):
            n, width = ref.reshape(-1, ref.shape[-1]).shape
            rows += n
            for _ in range(draws):
                u = self._fisher_cotangent(ref, n, width, rng)
                for layer, grad in self.weight_vjp(i, u).items():
                    total[layer] += np.asarray(grad, np.float64) ** 2 / draws
        return {k: v / rows for k, v in total.items()}

    def _fisher_cotangent(
        self, reference: np.ndarray, n: int, width: int, rng: np.random.Generator
    ) -> np.ndarray:
        if self.model.kind is OutputKind.EMBEDDING:
            return rng.standard_normal((n, width))
        p = softmax(as_logits(reference, self.model.kind))
        draws = (p.cumsum(axis=-1) > rng.uniform(size=(n, 1))).argmax(axis=-1)
        return np.eye(width)[draws] - p

    def task_gradient(self, labels: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
        """Gradient of the mean cross-entropy against ``labels`` (one class index per output
        row, in batch order) or the float model's argmax; None for embedding outputs."""
        if self.model.kind is OutputKind.EMBEDDING:
            return None
        total = {k: np.zeros(w.shape, np.float64) for k, w in self.model.weights.items()}
        rows = sum(r.reshape(-1, r.shape[-1]).shape[0] for r in self.model.reference)
        if labels is not None and np.asarray(labels).size != rows:
            raise ConfigError(f"{np.asarray(labels).size} labels for {rows} output rows")
        start = 0
        for i, ref in enumerate(self.model.reference):
            p = softmax(as_logits(ref, self.model.kind))
            n = p.shape[0]
            y = (
                p.argmax(axis=-1)
                if labels is None
                else np.asarray(labels).reshape(-1)[start : start + n]
            )
            start += n
            for layer, grad in self.weight_vjp(i, p - np.eye(p.shape[-1])[y]).items():
                total[layer] += grad
        return {k: v / rows for k, v in total.items()}
