"""``dyadiq inspect`` and ``dyadiq quantize`` end to end on the tiny synthetic CNN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_INPUT_SHAPE, file_digest, random_batches
from onnx import TensorProto, numpy_helper
from rich.console import Console

from dyadiq.cli import main, output
from dyadiq.ort_sessions import open_session

WEIGHTED = {"conv": "Conv", "fc": "Gemm"}


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """A console wide enough that table cells never wrap (it still writes to sys.stdout)."""
    monkeypatch.setattr(output, "console", Console(width=240, color_system=None))


def _table_rows(text: str) -> dict[str, list[str]]:
    """``first cell -> cells`` for every body row of the rich tables in ``text``."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells
    return rows


def _session(path: Path) -> ort.InferenceSession:
    # an exact simulation, as dyadiq scores: onnxruntime's fused u8 x s8 kernels saturate on
    # CPUs without VNNI, which would fail the accuracy bounds below on such machines
    return open_session(path)


# --- inspect ----------------------------------------------------------------------------------
def test_inspect_table(
    tiny_cnn_path: Path, capsys: pytest.CaptureFixture[str], wide_console: None
) -> None:
    digest = file_digest(tiny_cnn_path)
    assert main(["inspect", str(tiny_cnn_path)]) == 0
    out = capsys.readouterr().out
    assert "opset 17" in out
    assert "437 parameters" in out  # 108 + 4 conv, 320 + 5 fc
    rows = _table_rows(out)
    # op counts table: op -> count
    for op in ("Conv", "Relu", "MaxPool", "Flatten", "Gemm"):
        assert rows[op] == [op, "1"]
    # layers table: id, op, params, quantizable, why
    assert rows["conv"][:4] == ["conv", "Conv", "108", "yes"]
    assert rows["fc"][:4] == ["fc", "Gemm", "320", "yes"]
    assert "weighted layer" in rows["conv"][4]
    assert rows["relu"][:4] == ["relu", "Relu", "0", "no"]
    assert "fused" in rows["relu"][4]
    for layer in ("pool", "flatten"):
        assert rows[layer][3] == "yes" and "shares its input's scale" in rows[layer][4]
    assert file_digest(tiny_cnn_path) == digest


def test_inspect_default_console(tiny_cnn_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Same command on the real (80-column, non-terminal) console: key facts are printed."""
    assert main(["inspect", str(tiny_cnn_path)]) == 0
    out = capsys.readouterr().out
    for token in ("conv", "fc", "relu", "Conv", "Gemm", "yes", "no", "quantizable"):
        assert token in out


def test_inspect_json(tiny_cnn_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_cnn_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["opset"] == 17
    assert summary["parameters"] == 437
    assert summary["weighted_layers"] == 2
    assert summary["op_counts"] == {"Conv": 1, "Relu": 1, "MaxPool": 1, "Flatten": 1, "Gemm": 1}
    layers = {row["id"]: row for row in summary["layers"]}
    assert set(layers) == {"conv", "relu", "pool", "flatten", "fc"}
    for layer_id, op in WEIGHTED.items():
        assert layers[layer_id]["op"] == op
        assert layers[layer_id]["quantizable"] is True
    assert layers["relu"]["quantizable"] is False
    assert all(isinstance(row["reason"], str) and row["reason"] for row in layers.values())


def test_inspect_input_shape_option(
    tiny_cnn_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tiny_cnn_path), "--json", "--input-shape", "x=1x3x8x8"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 437


# --- quantize W8A8 ----------------------------------------------------------------------------
def test_quantize_w8a8(
    tiny_cnn_path: Path,
    calib_npz_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    digest = file_digest(tiny_cnn_path)
    calib_digests = {p.name: file_digest(p) for p in calib_npz_folder.iterdir()}
    out = tmp_path / "OUT"
    argv = ["quantize", str(tiny_cnn_path), "-o", str(out), "--calib", str(calib_npz_folder)]
    assert main(argv) == 0
    assert "quantized" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "model.qdq.onnx",
        "plan.json",
        "report.html",
        "report.json",
    ]

    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["layers"]) == set(WEIGHTED)
    for layer in plan["layers"].values():
        assert layer["format"] == "W8A8"
        assert (layer["weight_bits"], layer["act_bits"]) == (8, 8)

    report = json.loads((out / "report.json").read_text())
    assert report["calibration_batches"] == 8
    assert {row["id"]: row["format"] for row in report["layers"]} == dict.fromkeys(WEIGHTED, "W8A8")

    qdq_path = out / "model.qdq.onnx"
    model = onnx.load(str(qdq_path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert {"Conv", "Gemm"} <= set(ops)
    inits = {t.name: t for t in model.graph.initializer}
    int8_weights = [t for t in inits.values() if t.data_type == TensorProto.INT8 and t.dims]
    assert len(int8_weights) >= 2  # per-channel Conv and Gemm weights

    # Accuracy. The graph's output y goes through its own uint8 QuantizeLinear whose scale
    # y_scale is (calibrated range)/255, so rounding y alone costs up to y_scale/2; rounding x,
    # the weights (per channel) and the Conv/Relu/MaxPool/Flatten activations adds about one
    # more output step. On the calibration batches (all inside the calibrated ranges, so no
    # clipping) 3 output steps (~1.2% of the output range) bounds the error with margin while
    # still failing for a wrong scale, zero point or axis (those cost tens of steps).
    y_scale = float(numpy_helper.to_array(inits["y_scale"]))
    float_sess, qdq_sess = _session(tiny_cnn_path), _session(qdq_path)
    for feeds in random_batches({"x": TINY_INPUT_SHAPE}, 8):  # the same data as calib_npz_folder
        expected = float_sess.run(None, feeds)[0]
        got = qdq_sess.run(None, feeds)[0]
        assert got.shape == expected.shape == (1, 5)
        np.testing.assert_allclose(got, expected, rtol=0, atol=3 * y_scale)

    assert file_digest(tiny_cnn_path) == digest
    assert {p.name: file_digest(p) for p in calib_npz_folder.iterdir()} == calib_digests


def test_quantize_twice_into_same_folder(
    tiny_cnn_path: Path, calib_npz_folder: Path, tmp_path: Path
) -> None:
    """Re-running overwrites the three artefacts atomically and leaves no temporary files."""
    out = tmp_path / "OUT"
    argv = ["quantize", str(tiny_cnn_path), "-o", str(out), "--calib", str(calib_npz_folder)]
    assert main(argv) == 0
    assert main([*argv, "--calib-limit", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "model.qdq.onnx",
        "plan.json",
        "report.html",
        "report.json",
    ]
    assert json.loads((out / "report.json").read_text())["calibration_batches"] == 2


# --- quantize W4 ------------------------------------------------------------------------------
def test_quantize_wbits4(
    tiny_cnn_path: Path,
    calib_npz_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "OUT4"
    argv = [
        *("quantize", str(tiny_cnn_path), "-o", str(out)),
        *("--calib", str(calib_npz_folder), "--wbits", "4"),
    ]
    assert main(argv) == 0
    capsys.readouterr()
    plan = json.loads((out / "plan.json").read_text())
    assert {k: v["format"] for k, v in plan["layers"].items()} == dict.fromkeys(WEIGHTED, "W4A8")

    qdq_path = out / "model.qdq.onnx"
    model = onnx.load(str(qdq_path))
    onnx.checker.check_model(model, full_check=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == 21
    int4 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.INT4}
    weights = {
        t.name for t in model.graph.initializer if t.data_type == TensorProto.INT4 and t.dims
    }
    assert len(weights) >= 2, f"int4 initializers: {sorted(int4)}"
    # Both weighted layers read their weight through a DequantizeLinear of an int4 tensor.
    dq_of_int4 = [
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
    ]
    assert len(dq_of_int4) >= 2

    # Runs in onnxruntime. With 4-bit weights (15 levels per output channel) the error is much
    # larger than at 8 bits, so this is a sanity bound, not an accuracy claim: outputs are finite,
    # within 25% of the float output range, and strongly correlated with the float outputs.
    float_sess, qdq_sess = _session(tiny_cnn_path), _session(qdq_path)
    expected, got = [], []
    for feeds in random_batches({"x": TINY_INPUT_SHAPE}, 8):
        expected.append(float_sess.run(None, feeds)[0])
        got.append(qdq_sess.run(None, feeds)[0])
    e, g = np.concatenate(expected).ravel(), np.concatenate(got).ravel()
    assert np.isfinite(g).all()
    assert np.abs(g - e).max() <= 0.25 * np.abs(e).max()
    assert np.corrcoef(e, g)[0, 1] > 0.95


def test_quantize_requires_calibration(
    tiny_cnn_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "OUT"
    assert main(["quantize", str(tiny_cnn_path), "-o", str(out)]) == 2
    assert "ConfigError" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--wbits", "9"], "weight bits must be 2..8"),
        (["--exclude", "no_such_layer"], "no_such_layer"),
        (["--input-shape", "x=axb"], "--input-shape wants NAME="),
    ],
)
def test_quantize_bad_options(
    extra: list[str],
    fragment: str,
    tiny_cnn_path: Path,
    calib_npz_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "OUT"
    argv = ["quantize", str(tiny_cnn_path), "-o", str(out), "--calib", str(calib_npz_folder)]
    assert main([*argv, *extra]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "ConfigError" in err and fragment in err
    assert not out.exists() or not any(out.iterdir())
