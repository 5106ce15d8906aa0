"""Accuracy metrics of a (quantized) model against its float reference, and a zoo runner.

The metric functions are pure functions of arrays. :func:`evaluate` runs the float model and any
number of candidate models with onnxruntime over a zoo model's held-out evaluation set, once,
and reports per-model metrics (the float model under the key ``"float"``).
"""

from __future__ import annotations

import enum
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dyadiq.errors import ConfigError, ZooError
from dyadiq.held_out import Part, zoo_part
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
    part: Part = Part.ALL,
) -> dict[str, dict[str, float]]:
    """Run the float model (key ``"float"``) and each of ``models`` over the evaluation set once.

    ``limit`` caps the held-out samples read; ``part`` keeps only its split of them
    (:mod:`dyadiq.held_out`: ``SEARCH`` the even positions, ``REPORT`` the odd ones).

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
    batches = zoo_part(artifacts.evaluation_batches(limit), part)
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


# --- any model, the user's data ------------------------------------------------------------
class OutputKind(enum.Enum):
    """What a model output holds, which decides how a quantized copy is scored."""

    CLASSES = "classes"  # logits or probabilities over the last axis
    EMBEDDING = "embedding"  # one vector per sample
    MAP = "map"  # a spatial map (detection heads, segmentation, text-region masks)
    OTHER = "other"  # anything else: SNR and mean error only

    @classmethod
    def parse(cls, text: str) -> OutputKind | None:
        """``auto`` is None (:func:`output_kind` decides); anything else names a kind."""
        if text == "auto":
            return None
        try:
            return cls(text)
        except ValueError:
            choices = ["auto", *(k.value for k in cls)]
            raise ConfigError(f"output kind {text!r}: choose one of {choices}") from None


def _is_probability_rows(rows: np.ndarray) -> bool:
    return bool(
        rows.shape[1] >= 2
        and (rows >= -1e-6).all()
        and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3)
    )


def output_kind(reference: np.ndarray, *, has_labels: bool = False) -> OutputKind:
    """A float output's kind from its values (``--output-kind`` overrides it):

    - (N, C), C >= 2: probabilities, or with labels, are ``classes``; rows of unit length
      are an ``embedding``; other rows are logits (``classes``) when C <= 1000 and no row is
      flat, an ``embedding`` otherwise;
    - (N, ..., C) whose last axis holds probabilities (a CTC recogniser's softmax) is
      ``classes`` per position; any other output of rank >= 3 is a ``map``;
    - everything else (scores, one value per sample) is ``other``.
    """
    ref = _squeezed(np.asarray(reference, np.float64))
    if ref.ndim >= 3:
        rows = ref.reshape(-1, ref.shape[-1])
        return OutputKind.CLASSES if _is_probability_rows(rows) else OutputKind.MAP
    if ref.ndim != 2 or ref.shape[1] < 2:
        return OutputKind.OTHER
    if has_labels or _is_probability_rows(ref):
        return OutputKind.CLASSES
    norms = np.linalg.norm(ref, axis=1)
    if np.allclose(norms, 1.0, atol=1e-3):
        return OutputKind.EMBEDDING
    flat = np.ptp(ref, axis=1) < _EPS
    return OutputKind.CLASSES if ref.shape[1] <= 1000 and not flat.any() else OutputKind.EMBEDDING


def _squeezed(a: np.ndarray) -> np.ndarray:
    """Unit dims after the first dropped: (N, 1000, 1, 1) logits are (N, 1000)."""
    return a.reshape(a.shape[0], *(d for d in a.shape[1:] if d != 1)) if a.ndim > 1 else a


def _softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - other|^2); inf when they are equal."""
    ref, out = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(signal, _EPS) / noise))


def class_metrics(
    reference: np.ndarray, other: np.ndarray, labels: np.ndarray | None
) -> dict[str, float]:
    """:func:`classification_metrics` over the last axis (one row per sample or position)
    plus the mean KL divergence of the candidate's class distribution from the reference's
    (softmax of logits; probabilities as they are) and, with labels, top-5 accuracy. With 5
    classes or fewer the top 5 hold every class, so the top-5 figures (always 1) are left out:
    a 2-class model is judged by its top-1 answers and KL only."""
    c = reference.shape[-1]
    ref = np.asarray(reference, np.float64).reshape(-1, c)
    out = np.asarray(other, np.float64).reshape(-1, c)
    if labels is not None and labels.size != ref.shape[0]:
        raise ConfigError(f"{labels.size} labels for {ref.shape[0]} samples")
    metrics = classification_metrics(ref, out, labels)
    probabilities = _is_probability_rows(ref)
    p = np.clip(ref if probabilities else _softmax(ref), _EPS, None)
    q = np.clip(out if probabilities else _softmax(out), _EPS, None)
    metrics["kl_divergence"] = float(np.mean(np.sum(p * np.log(p / q), axis=1)))
    if c <= 5:
        del metrics["top5_contains_reference_top1"]
    elif labels is not None:
        top = np.argsort(-out, axis=1)[:, :5]
        metrics["top5_accuracy"] = float(np.mean((top == labels.reshape(-1, 1)).any(axis=1)))
    return metrics


def map_metrics(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Mean absolute error relative to the reference's range, and the IoU of the two maps
    thresholded at the middle of the reference's range (a mask or heat map's foreground)."""
    ref, out = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    span = float(np.ptp(ref)) or 1.0
    threshold = float(ref.min()) + span / 2
    a, b = ref > threshold, out > threshold
    union = int(np.sum(a | b))
    return {
        "mean_abs_error_rel": float(np.mean(np.abs(ref - out)) / span),
        "iou": float(np.sum(a & b) / union) if union else 1.0,
    }


def score_output(
    kind: OutputKind, reference: np.ndarray, other: np.ndarray, labels: np.ndarray | None
) -> dict[str, float]:
    """The metrics of ``kind`` for one output (stacked over samples), always with SNR."""
    if reference.shape != other.shape:
        raise ConfigError(f"output shape mismatch: {reference.shape} vs {other.shape}")
    reference, other = _squeezed(reference), _squeezed(other)
    if kind is OutputKind.CLASSES:
        metrics = class_metrics(reference, other, labels)
    elif kind is OutputKind.EMBEDDING:
        metrics = embedding_metrics(reference, other)
    elif kind is OutputKind.MAP:
        metrics = map_metrics(reference, other)
    else:
        ref, out = np.asarray(reference, np.float64), np.asarray(other, np.float64)
        span = float(np.ptp(ref)) or float(np.max(np.abs(ref), initial=0.0)) or 1.0
        metrics = {
            "mean_abs_error": float(np.mean(np.abs(ref - out))),
            "mean_abs_error_rel": float(np.mean(np.abs(ref - out)) / span),
        }
    metrics["snr_db"] = snr_db(reference, other)
    return metrics


def read_labels(path: pathlib.Path) -> np.ndarray:
    """Class indices, one per sample: a .npy array or a text file with one integer a line."""
    try:
        if path.suffix == ".npy":
            return np.asarray(np.load(path)).reshape(-1).astype(np.int64)
        return np.array([int(x) for x in path.read_text().split()], np.int64)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read labels from {path}: {exc}") from exc


def _input_specs(model_path: pathlib.Path) -> dict[str, tuple[np.dtype, tuple[Any, ...]]]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    constants = {t.name for t in model.graph.initializer}
    specs = {}
    for value in model.graph.input:
        if value.name in constants:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        specs[value.name] = (onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), dims)
    return specs


def run_outputs(
    model: pathlib.Path,
    batches: Iterable[Mapping[str, np.ndarray]],
    names: Sequence[str],
    kernels: Kernels = Kernels.EXACT,
) -> dict[str, np.ndarray]:
    """Outputs ``names`` of ``model`` (an exact simulation unless ``kernels`` says otherwise)
    over ``batches``, stacked over samples (a scalar output stacked over batches)."""
    session = _session(model, kernels)
    have = {o.name for o in session.get_outputs()}
    missing = [n for n in names if n not in have]
    if missing:
        raise ConfigError(f"{model.name} lacks the float model's outputs {missing}")
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in batches:
        for name, value in zip(names, session.run(list(names), dict(feeds)), strict=True):
            collected[name].append(np.asarray(value))
    return {
        n: np.concatenate(v, axis=0) if v[0].ndim else np.stack(v) for n, v in collected.items()
    }


def output_names(model: pathlib.Path) -> list[str]:
    """The model's output names, in order."""
    return [o.name for o in _session(model).get_outputs()]


def input_specs(model_path: pathlib.Path) -> dict[str, tuple[np.dtype, tuple[Any, ...]]]:
    """Each graph input's (dtype, dims; None for a symbolic dim), as calibration checks them."""
    return _input_specs(model_path)


def evaluate_on_data(
    float_model: pathlib.Path,
    models: dict[str, pathlib.Path],
    data: Any,
    *,
    labels: np.ndarray | None = None,
    kind: OutputKind | None = None,
    limit: int | None = None,
    runtime_kernels: bool = False,
) -> tuple[dict[str, OutputKind], dict[str, dict[str, float]]]:
    """Run ``float_model`` and each of ``models`` on the batches of ``data`` (a folder of
    .npz / .npy batches, as ``--calib`` reads, or a list of feed dicts), every output of every
    model, and score each candidate's outputs against the float model's with the metrics of
    the output's kind (:func:`output_kind`, or ``kind`` for all). Returns the kinds per output
    and the metrics per ``"MODEL"`` (one output) or ``"MODEL: OUTPUT"``."""
    from dyadiq.passes.calibration.data import validated_batches

    if "float" in models:
        raise ConfigError('the name "float" is reserved for the reference model')
    batches = list(validated_batches(data, _input_specs(float_model), limit=limit))
    names = output_names(float_model)
    reference = run_outputs(float_model, batches, names)
    candidates = {name: run_outputs(p, batches, names) for name, p in models.items()}
    if runtime_kernels:
        for name, path in models.items():
            candidates[name + RUNTIME_SUFFIX] = run_outputs(path, batches, names, Kernels.RUNTIME)
    kinds = {n: kind or output_kind(reference[n], has_labels=labels is not None) for n in names}
    results: dict[str, dict[str, float]] = {}
    for model, outs in candidates.items():
        for n in names:
            key = model if len(names) == 1 else f"{model}: {n}"
            use_labels = labels if kinds[n] is OutputKind.CLASSES else None
            metrics = score_output(kinds[n], reference[n], outs[n], use_labels)
            metrics["samples"] = float(outs[n].shape[0]) if outs[n].ndim else 1.0
            results[key] = metrics
    return kinds, results
