"""``dyadiq quantize --compensate`` end to end on the tiny synthetic CNN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dyadiq.cli import main


def _quantize(model: Path, calib: Path, out: Path, *extra: str) -> int:
    return main(["quantize", str(model), "-o", str(out), "--calib", str(calib), *extra])


def test_compensated_integer_model_reports_each_pass_and_stays_bit_exact(
    tiny_cnn_path: Path, calib_npz_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "OUT"
    argv = ("--wbits", "3", "--compensate", "range,gptq,bias", "--integer")
    assert _quantize(tiny_cnn_path, calib_npz_folder, out, *argv) == 0
    report = json.loads((out / "report.json").read_text())
    compensation = report["compensation"]
    assert compensation["settings"]["passes"] == "range,gptq,bias"
    assert set(compensation["layers"]) == {"conv", "fc"}
    for layer in compensation["layers"].values():
        entry = layer["3"]
        assert entry["passes"] == ["range", "gptq", "bias"]
        assert entry["error_after_bias"] < entry["error_round_to_nearest"]
    exact = report["integer"]["bit_exact_vs_reference"]
    assert exact["exact_tensors"] == exact["tensors"] > 0


def test_compensate_none_is_round_to_nearest(
    tiny_cnn_path: Path, calib_npz_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "OUT"
    assert _quantize(tiny_cnn_path, calib_npz_folder, out, "--compensate", "none") == 0
    assert json.loads((out / "report.json").read_text())["compensation"] is None


def test_bad_compensate_value_is_a_config_error(
    tiny_cnn_path: Path,
    calib_npz_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "OUT"
    assert _quantize(tiny_cnn_path, calib_npz_folder, out, "--compensate", "brecq") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "ConfigError" in err and "--compensate" in err
