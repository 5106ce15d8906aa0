"""The zoo's registry: which real models exist, and how to materialise them with their data."""

from __future__ import annotations

import contextlib
import enum
import fcntl
import importlib
import pathlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from dyadiq.errors import ZooError
from dyadiq.zoo._install import cache_dir, log


class Task(enum.Enum):
    CLASSIFICATION = "classification"  # logits output; labels may or may not exist
    EMBEDDING = "embedding"  # sentence embedding output
    LANGUAGE_MODEL = "language_model"  # next-token logits [1, seq, vocab]; no labels


@dataclass(frozen=True)
class ZooModel:
    """One entry of the registry (cheap to list: nothing is installed or loaded)."""

    name: str
    description: str
    task: Task
    has_labels: bool

    @property
    def primary_metric(self) -> str:
        """The metric that ranks quantized variants (higher is better)."""
        if self.task is Task.EMBEDDING:
            return "mean_cosine"
        return "accuracy" if self.has_labels else "top1_agreement"


_MODELS: tuple[tuple[ZooModel, str], ...] = (
    (
        ZooModel(
            name="mobilenet_v2",
            description=(
                "MobileNetV2 ImageNet-1k (torchvision V1 weights, 3.5 M params), 1x3x224x224; "
                "random crops of real photos, scored by agreement with float (no labels)"
            ),
            task=Task.CLASSIFICATION,
            has_labels=False,
        ),
        "dyadiq.zoo.mobilenet_v2",
    ),
    (
        ZooModel(
            name="minilm",
            description=(
                "all-MiniLM-L6-v2 sentence embeddings (22.7 M params), int64 input_ids / "
                "attention_mask 1x128; Python docstring sentences, scored against float"
            ),
            task=Task.EMBEDDING,
            has_labels=False,
        ),
        "dyadiq.zoo.minilm",
    ),
    (
        ZooModel(
            name="fashion_cnn",
            description=(
                "small CNN trained by dyadiq on Fashion-MNIST (23 K params), Nx1x28x28; "
                "10,000 labelled test images"
            ),
            task=Task.CLASSIFICATION,
            has_labels=True,
        ),
        "dyadiq.zoo.fashion_cnn",
    ),
    (
        ZooModel(
            name="ppocr_cls",
            description=(
                "PP-OCR v2.0 text-orientation classifier (134 K params), 1x3x48x192; rendered "
                "text lines, label 1 = rotated 180 degrees (output is softmax probabilities)"
            ),
            task=Task.CLASSIFICATION,
            has_labels=True,
        ),
        "dyadiq.zoo.ppocr_cls",
    ),
    (
        ZooModel(
            name="gemma3_270m",
            description=(
                "Gemma 3 270M base language model, int64 input_ids 1x64 -> logits 1x64x262144 "
                "(float = the Q4_K_M GGUF dequantised to fp32; 1.07 GB external data); "
                "Britannica 1911 prose to evaluate, Shakespeare's plays to calibrate"
            ),
            task=Task.LANGUAGE_MODEL,
            has_labels=False,
        ),
        "dyadiq.zoo.gemma3",
    ),
)


def list_models() -> list[ZooModel]:
    """Every model the zoo can materialise, in a fixed order."""
    return [m for m, _ in _MODELS]


def _lookup(name: str) -> tuple[ZooModel, str]:
    for model, module in _MODELS:
        if model.name == name:
            return model, module
    known = ", ".join(m.name for m, _ in _MODELS)
    raise ZooError(f"unknown zoo model {name!r}; choose one of: {known}")


def _module(name: str) -> ModuleType:
    return importlib.import_module(_lookup(name)[1])


@dataclass(frozen=True)
class ZooArtifacts:
    """A materialised model (float ONNX in the cache) and generators over its data."""

    model: ZooModel
    model_path: pathlib.Path

    def calibration_batches(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Deterministic calibration feeds; ``limit`` caps the number of samples."""
        return _module(self.model.name).calibration_batches(limit)

    def evaluation_batches(
        self, limit: int | None = None
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Held-out ``(feeds, labels or None)``, disjoint from calibration; ``limit`` = samples."""
        return _module(self.model.name).evaluation_batches(limit)


@contextlib.contextmanager
def _locked(cache: pathlib.Path, name: str) -> Iterator[None]:
    """Serialise materialisation of one model across processes sharing a cache."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def get(name: str, *, cache_dir: pathlib.Path | None = None) -> ZooArtifacts:
    """Materialise zoo model ``name`` (installing and exporting once) and return its artifacts.

    Idempotent: later calls find the ONNX in the cache and return at once.
    """
    model, _ = _lookup(name)
    cache = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache()
    try:
        with _locked(cache, name):
            t0 = time.perf_counter()
            path = pathlib.Path(_module(name).materialise(cache))
    except OSError as exc:
        raise ZooError(
            f"cannot write the zoo cache {cache} ({exc}); set DYADIQ_CACHE to a writable folder"
        ) from exc
    log.info("zoo: %s ready at %s (%.1fs)", name, path, time.perf_counter() - t0)
    return ZooArtifacts(model=model, model_path=path)


def _default_cache() -> pathlib.Path:
    return cache_dir()
