"""Accuracy metrics of a (quantized) model against its float reference, and a zoo runner.

The metric functions are pure functions of arrays. :func:`evaluate` runs the float model and any
number of candidate models with onnxruntime over a zoo model's held-out evaluation set, once,
and reports per-model metrics (the float model under the key ``"float"``).
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

import numpy as np

from dyadiq.errors import ConfigError, ZooError
from dyadiq.ort_sessions import Kernels, open_session

if TYPE_CHECKING:
    from dyadiq.zoo import ZooArtifacts

_EPS = 1e-12


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim != 2 else a


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows; two all-zero rows count as identical (1.0)."""
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    cos = dot / np.maximum(na * nb, _EPS)
    both_zero = (na < _EPS) & (nb < _EPS)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def _check_pair(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, out = _rows(reference), _rows(other)
    if ref.shape != out.shape:
        raise ConfigError(
            f"output shape mismatch: reference {ref.shape} vs candidate {out.shape}; "
            "is the candidate a quantized copy of the reference model?"
        )
    if ref.shape[0] == 0:
        raise ConfigError("no samples to compare: the evaluation data is empty")
    return ref, out


def classification_metrics(
    reference_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray | None
) -> dict[str, float]:
    """Agreement of ``logits`` (N x C) with the float ``reference_logits``, plus accuracy.

    - ``top1_agreement``: fraction of samples whose arg-max equals the reference arg-max;
    - ``top5_contains_reference_top1``: fraction whose top-5 (top-C if C < 5) holds the reference
      arg-max;
    - ``logit_cosine``: mean per-sample cosine similarity of the output vectors;
    - ``accuracy``: fraction whose arg-max equals ``labels`` (only when labels are given).
    """
    ref, out = _check_pair(reference_logits, logits)
    ref_top1 = ref.argmax(axis=1)
    top1 = out.argmax(axis=1)
    k = min(5, out.shape[1])
    # Top-k membership by rank: the reference class is in the top k when fewer than k classes
    # score strictly higher than it (ties resolved in the candidate's favour).
    ref_score = out[np.arange(out.shape[0]), ref_top1]
    higher = np.sum(out > ref_score[:, None], axis=1)
    metrics = {
        "top1_agreement": float(np.mean(top1 == ref_top1)),
        "top5_contains_reference_top1": float(np.mean(higher < k)),
        "logit_cosine": float(np.mean(_row_cosine(ref, out))),
    }
    if labels is not None:
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != out.shape[0]:
            raise ConfigError(f"{lab.shape[0]} labels for {out.shape[0]} samples")
        metrics["accuracy"] = float(np.mean(top1 == lab))
    return metrics


def _nearest_neighbours(x: np.ndarray) -> np.ndarray:
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.asarray(sim.argmax(axis=1))


def _pairwise_upper(x: np.ndarray) -> np.ndarray:
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
    sim = unit @ unit.T
    iu = np.triu_indices(x.shape[0], k=1)
    return np.asarray(sim[iu])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if a.size < 2:
        return float("nan")
    if np.all(a == a[0]) or np.all(b == b[0]):
        return 1.0 if np.array_equal(a, b) else float("nan")
    return float(spearmanr(a, b).statistic)


def embedding_metrics(reference: np.ndarray, emb: np.ndarray) -> dict[str, float]:
    """Agreement of embeddings ``emb`` (N x D) with the float ``reference`` embeddings.

    - ``mean_cosine`` / ``min_cosine``: per-sample cosine similarity to the reference;
    - ``nn_agreement``: fraction of samples whose nearest neighbour (cosine, excluding itself)
      within the set is the same as in the reference set (NaN for fewer than 2 samples);
    - ``similarity_spearman``: Spearman rank correlation between the two sets' pairwise cosine
      similarities (upper triangle; NaN for fewer than 3 samples).
    """
    ref, out = _check_pair(reference, emb)
    cos = _row_cosine(ref, out)
    n = ref.shape[0]
    nn = float(np.mean(_nearest_neighbours(ref) == _nearest_neighbours(out))) if n >= 2 else np.nan
    spearman = _spearman(_pairwise_upper(ref), _pairwise_upper(out)) if n >= 3 else float("nan")
    return {
        "mean_cosine": float(np.mean(cos)),
        "min_cosine": float(np.min(cos)),
        "nn_agreement": float(nn),
        "similarity_spearman": spearman,
    }


def _session(path: pathlib.Path, kernels: Kernels = Kernels.EXACT) -> Any:
    try:
        return open_session(path, kernels=kernels)
    except Exception as exc:
        raise ZooError(f"onnxruntime cannot load {path}: {exc}") from exc


RUNTIME_SUFFIX = " [onnxruntime kernels]"


def _run(sess: Any, feeds: dict[str, np.ndarray], name: str) -> np.ndarray:
    """First output of ``sess`` on ``feeds``; row by row when the model has a fixed batch of 1."""
    inputs = sess.get_inputs()
    missing = [i.name for i in inputs if i.name not in feeds]
    if missing:
        raise ZooError(
            f"model {name!r} expects inputs {missing} that the zoo data does not provide "
            f"(it provides {sorted(feeds)}); keep the float model's input names"
        )
    use = {i.name: feeds[i.name] for i in inputs}
    batch = next(iter(use.values())).shape[0]
    fixed = inputs[0].shape[0] if inputs[0].shape else None
    if isinstance(fixed, int) and fixed != batch and fixed == 1:
        rows = [sess.run(None, {k: v[r : r + 1] for k, v in use.items()})[0] for r in range(batch)]
        return np.concatenate(rows, axis=0)
    return np.asarray(sess.run(None, use)[0])


def evaluate(
    artifacts: ZooArtifacts,
    models: dict[str, pathlib.Path],
    *,
    limit: int | None = None,
    runtime_kernels: bool = False,
) -> dict[str, dict[str, float]]:
    """Run the float model (key ``"float"``) and each of ``models`` over the evaluation set once.

    Every model runs as an exact simulation (``dyadiq.ort_sessions``), so the figures are the
    same on every CPU. ``runtime_kernels`` also scores each of ``models`` with onnxruntime's
    fused kernels on this CPU, as ``NAME [onnxruntime kernels]``: what a user who deploys the
    QDQ file with onnxruntime here would see.

    Returns metrics per model name: :func:`classification_metrics` (with ``accuracy`` when the
    zoo model has labels) or :func:`embedding_metrics`, each plus ``samples``.
    """
    from dyadiq.progress import track
    from dyadiq.zoo import Task

    if "float" in models:
        raise ConfigError('the name "float" is reserved for the reference model')
    paths = {"float": pathlib.Path(artifacts.model_path), **models}
    sessions = {name: _session(pathlib.Path(p)) for name, p in paths.items()}
    if runtime_kernels:
        sessions.update(
            {name + RUNTIME_SUFFIX: _session(p, Kernels.RUNTIME) for name, p in models.items()}
        )
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    labels: list[np.ndarray] = []
    has_labels = True
    batches = artifacts.evaluation_batches(limit)
    for feeds, lab in track(batches, f"evaluating {len(sessions)} models", total=None):
        for name, sess in sessions.items():
            outputs[name].append(_run(sess, feeds, name))
        if lab is None:
            has_labels = False
        else:
            labels.append(np.asarray(lab).reshape(-1))
    if not outputs["float"]:
        raise ZooError(f"zoo model {artifacts.model.name!r} yielded no evaluation data")
    stacked = {name: np.concatenate(outs, axis=0) for name, outs in outputs.items()}
    reference = stacked["float"]
    all_labels = np.concatenate(labels) if has_labels and labels else None
    results: dict[str, dict[str, float]] = {}
    for name, out in stacked.items():
        if artifacts.model.task is Task.EMBEDDING:
            metrics = embedding_metrics(reference, out)
        else:
            metrics = classification_metrics(reference, out, all_labels)
        metrics["samples"] = float(out.shape[0])
        results[name] = metrics
    return results
