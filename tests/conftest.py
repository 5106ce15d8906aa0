"""Shared fixtures: tiny synthetic ONNX models and deterministic calibration data.

Everything here is built in-process with ``onnx.helper`` (no downloads), so tests are fast and
hermetic. Fixtures return *factories* where a test may want several variants.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from dyadiq.fuzz import seeds

TINY_INPUT_SHAPE = (1, 3, 8, 8)
SEED = 0


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (to prove an input was never modified)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_tiny_cnn(seed: int = SEED) -> onnx.ModelProto:
    """Conv(3->4, 3x3, bias, pad 1) -> Relu -> MaxPool(2) -> Flatten -> Gemm(transB=1, 64->5).

    Input ``x`` is float 1x3x8x8, output ``y`` is float 1x5; opset 17. Node names are set so
    the layer ids are stable ("conv", "relu", "pool", "flatten", "fc").
    """
    # the fuzz harness's cnn seed is this very model (same draws, same bytes): one builder
    model = seeds.cnn(np.random.default_rng(seed))
    model.graph.name = "tiny_cnn"
    return model


def make_two_input_model() -> onnx.ModelProto:
    """``z = Relu(a + b)`` with float inputs ``a`` and ``b`` of shape 1x4; opset 17."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        two_inputs (float[1,4] a, float[1,4] b) => (float[1,4] z) {
            s = Add(a, b)
            z = Relu(s)
        }
        """
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def random_batches(
    shapes: dict[str, tuple[int, ...]],
    count: int = 4,
    *,
    seed: int = SEED,
    dtype: type = np.float32,
) -> list[dict[str, np.ndarray]]:
    """``count`` feed dicts of standard-normal data, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [
        {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}
        for _ in range(count)
    ]


def write_npz_folder(folder: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    """One ``batch_NNN.npz`` per feed dict (arrays keyed by input name)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, feeds in enumerate(batches):
        np.savez(folder / f"batch_{i:03d}.npz", **feeds)
    return folder


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def tiny_cnn_model() -> onnx.ModelProto:
    return make_tiny_cnn()


@pytest.fixture
def tiny_cnn_path(tmp_path: Path) -> Path:
    """The tiny CNN saved alone in its own folder ``tmp_path/model/tiny.onnx``."""
    return save_model(make_tiny_cnn(), tmp_path / "model" / "tiny.onnx")


@pytest.fixture
def two_input_path(tmp_path: Path) -> Path:
    return save_model(make_two_input_model(), tmp_path / "model2" / "two_inputs.onnx")


@pytest.fixture
def calib_batches() -> Callable[..., list[dict[str, np.ndarray]]]:
    """Factory: ``calib_batches(count=4, shapes={"x": (1, 3, 8, 8)}, seed=0)``."""

    def make(
        count: int = 4,
        shapes: dict[str, tuple[int, ...]] | None = None,
        seed: int = SEED,
    ) -> list[dict[str, np.ndarray]]:
        return random_batches(shapes or {"x": TINY_INPUT_SHAPE}, count, seed=seed)

    return make


@pytest.fixture
def calib_npz_folder(tmp_path: Path) -> Path:
    """A folder of 8 ``.npz`` batches for the tiny CNN's input ``x``."""
    return write_npz_folder(tmp_path / "calib", random_batches({"x": TINY_INPUT_SHAPE}, 8))
