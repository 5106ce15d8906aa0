"""Every script in examples/ runs here (the training script in a one-epoch smoke mode)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from dyadiq.zoo._install import ensure_torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.realmodel
def test_python_api_example(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import quantize_with_python_api as example
    finally:
        sys.path.remove(str(EXAMPLES))
    metrics = example.main(tmp_path)
    assert metrics["W8A8"]["accuracy"] > 0.9
    assert metrics["W4A8"]["accuracy"] > 0.85


@pytest.mark.realmodel
def test_training_script_smoke(tmp_path):
    ensure_torch()  # installs the local CPU wheel when missing, as the zoo does
    subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "train_fashion_cnn.py"),
            "--epochs",
            "1",
            "--train-limit",
            "512",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    session = ort.InferenceSession(str(tmp_path / "fashion_cnn.onnx"))
    assert session.get_inputs()[0].shape[1:] == [1, 28, 28]


@pytest.mark.realmodel
def test_max_drop_with_callback_example(tmp_path):
    """Your own metric as the --max-drop search's score: the plan is within a point of float's
    accuracy (the callback's) and smaller than all-W8 (22,896 weights)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import max_drop_with_callback as example
    finally:
        sys.path.remove(str(EXAMPLES))
    made = example.main(tmp_path)
    info = made.allocation.info
    assert info["metric"] == "evaluate" and info["plan_metric"] >= info["float_metric"] - 0.01
    assert info["float_metric"] == example.accuracy(example.ARTIFACTS.model_path)
    assert info["weight_bytes"] < 22_896
    assert made.metrics["dyadiq plan"]["evaluate"] == example.accuracy(made.paths["qdq"])


def test_every_example_is_tested():
    tested = {"quantize_with_python_api.py", "train_fashion_cnn.py", "notebook_quantize.py"}
    tested.add("max_drop_with_callback.py")
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.realmodel
def test_notebook_example(tmp_path):
    """The notebook-style script runs top to bottom as a script, and writes what it says."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "notebook_quantize.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<QuantizedModel fashion_cnn-v1.onnx" in result.stdout
    for folder in ("w8a8", "w4a8", "tensorrt"):
        assert (tmp_path / folder / "model.qdq.onnx").is_file()
    assert "TensorRT W8A8" in result.stdout
