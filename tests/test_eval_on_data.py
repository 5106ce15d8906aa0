"""``dyadiq eval MODEL QUANTIZED --data DIR [--labels FILE]`` for any model: metrics chosen by
what each output holds (classes, embedding, map, other), printed as a table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TINY_INPUT_SHAPE, make_tiny_cnn, save_model
from onnx import numpy_helper
from rich.console import Console

from dyadiq.cli import main, output
from dyadiq.errors import ConfigError
from dyadiq.evaluation import OutputKind, output_kind, score_output


def _perturbed(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    """A stand-in for a quantized copy: every weight nudged by a relative ``scale``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rng = np.random.default_rng(1)
    for i, tensor in enumerate(copy.graph.initializer):
        values = numpy_helper.to_array(tensor).astype(np.float32)
        noisy = values * (1 + scale * rng.standard_normal(values.shape)).astype(np.float32)
        copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    return copy


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    model = make_tiny_cnn()
    save_model(model, tmp_path / "float.onnx")
    save_model(_perturbed(model, 0.05), tmp_path / "quant.onnx")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(2)
    for i in range(6):
        x = rng.normal(size=TINY_INPUT_SHAPE).astype(np.float32)
        np.savez(data / f"batch{i}.npz", x=x)
    (tmp_path / "labels.txt").write_text("\n".join(str(i % 5) for i in range(6)))
    return tmp_path


def test_eval_on_own_data_prints_a_table_of_class_metrics(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(output, "console", Console(width=240, color_system=None))
    argv = ["eval", str(folder / "float.onnx"), str(folder / "quant.onnx")]
    argv += ["--data", str(folder / "data"), "--labels", str(folder / "labels.txt")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "scored as classes" in out
    for metric in ("top1_agreement", "kl_divergence", "accuracy", "snr_db"):
        assert metric in out, metric
    assert "top5" not in out  # 5 classes: the top 5 hold every class, a figure of 1 says nothing
    assert "{" not in out  # a table, not raw JSON


def test_eval_json_and_an_explicit_kind(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", str(folder / "float.onnx"), str(folder / "quant.onnx")]
    argv += ["--data", str(folder / "data"), "--output-kind", "embedding", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kinds"] == {"y": "embedding"}
    metrics = result["quant.onnx"]
    assert metrics["samples"] == 6 and 0.9 < metrics["mean_cosine"] <= 1.0


def test_eval_without_data_or_zoo_is_a_config_error(folder: Path) -> None:
    assert main(["eval", str(folder / "float.onnx"), str(folder / "quant.onnx")]) == 2


def test_output_kind_follows_the_values() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(8, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    unit = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    assert output_kind(logits) is OutputKind.CLASSES
    assert output_kind(logits.reshape(8, 10, 1, 1)) is OutputKind.CLASSES  # a conv head's
    assert output_kind(probs) is OutputKind.CLASSES
    assert output_kind(unit) is OutputKind.EMBEDDING
    assert output_kind(rng.normal(size=(8, 1, 16, 16))) is OutputKind.MAP
    assert output_kind(np.stack([probs] * 3, axis=1)) is OutputKind.CLASSES  # per position
    assert output_kind(rng.normal(size=(8, 1))) is OutputKind.OTHER
    with pytest.raises(ConfigError, match="output kind"):
        OutputKind.parse("boxes")


def test_map_metrics_are_iou_and_relative_error() -> None:
    ref = np.zeros((2, 1, 4, 4))
    ref[:, :, :2, :2] = 1.0
    same = score_output(OutputKind.MAP, ref, ref.copy(), None)
    assert same["iou"] == 1.0 and same["mean_abs_error_rel"] == 0.0
    assert same["snr_db"] == float("inf")
    shifted = np.roll(ref, 1, axis=-1)
    worse = score_output(OutputKind.MAP, ref, shifted, None)
    assert worse["iou"] == pytest.approx(1 / 3)
