"""The weight-only command line on a small tied model (external data, calibration .npz)."""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyadiq.cli.weight_only import main, run_weight_only
from dyadiq.errors import ConfigError
from dyadiq.io import save_model_atomic
from tests.test_weight_only import SEQ, VOCAB, tied_lm


@pytest.fixture()
def model_and_calib(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    rng = np.random.default_rng(2)
    model = tmp_path / "in" / "m.onnx"
    save_model_atomic(tied_lm(rng), model, external_data=True)
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(4):
        ids = rng.integers(0, VOCAB, size=(1, SEQ)).astype(np.int64)
        np.savez(calib / f"{k}.npz", ids=ids)
    return model, calib


def _logits(path: pathlib.Path) -> np.ndarray:
    ids = np.arange(SEQ, dtype=np.int64)[None] % VOCAB
    return ort.InferenceSession(str(path)).run(None, {"ids": ids})[0]


def test_uniform_gptq_matmul_nbits(
    model_and_calib: tuple[pathlib.Path, pathlib.Path],
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, calib = model_and_calib
    out = tmp_path / "out"
    argv = [str(model), "-o", str(out), "--calib", str(calib), "--wbits", "4"]
    assert main([*argv, "--group-size", "64", "--wo-format", "matmul-nbits"]) == 0
    assert "3 weights" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["export"]["matmul_nbits"]) == ["down", "head", "up"]
    assert report["average_code_bits"] == 4
    plan = json.loads((out / "plan.json").read_text())
    assert plan["layers"] == {"up": 4, "down": 4, "head": 4} and plan["group_size"] == 64
    got, want = _logits(out / "model.wo.onnx"), _logits(model)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9
    # the plan file reproduces the same model
    again = tmp_path / "again"
    assert (
        main(
            [
                str(model),
                "-o",
                str(again),
                "--calib",
                str(calib),
                "--plan",
                str(out / "plan.json"),
                "--group-size",
                "64",
                "--wo-format",
                "matmul-nbits",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(_logits(again / "model.wo.onnx"), got)


def test_budget_picks_widths_within_it(
    model_and_calib: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    model, calib = model_and_calib
    out = tmp_path / "out"
    argv = [str(model), "-o", str(out), "--calib", str(calib), "--group-size", "32"]
    argv += ["--budget", "avg-wbits=3", "--wbits-candidates", "2,3,4", "--analysis-samples", "2"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["average_code_bits"] <= 3 + 1e-9
    assert set(report["allocation"]["damage"]) == {"up", "down", "head"}
    dq = onnx.load(str(out / "model.wo.onnx"))
    assert {n.op_type for n in dq.graph.node} >= {"DequantizeLinear", "Gather", "MatMul"}


def test_conflicting_flags_are_config_errors(
    model_and_calib: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    model, calib = model_and_calib
    base = [str(model), "-o", str(tmp_path / "o"), "--calib", str(calib)]
    with pytest.raises(ConfigError, match="not both"):
        main([*base, "--plan", "p.json", "--budget", "avg-wbits=3"])
    with pytest.raises(ConfigError, match="weight-only bits"):
        main([*base, "--wbits", "9"])
    with pytest.raises(ConfigError, match="--exclude matches no"):
        main([*base, "--exclude", "nosuchlayer"])
    with pytest.raises(ConfigError, match="does not take --integer"):
        run_weight_only(argparse.Namespace(integer=True))
    with pytest.raises(ConfigError, match="needs --calib"):
        main([str(model), "-o", str(tmp_path / "o")])


def test_dyadiq_quantize_weight_only_reaches_the_weight_only_mode(
    model_and_calib: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    """`dyadiq quantize --weight-only` (the documented entry point), with quantize's default
    width left unset so the mode's own default (4 bits) applies."""
    from dyadiq.cli import main as dyadiq_main

    model, calib = model_and_calib
    out = tmp_path / "out"
    argv = ["quantize", str(model), "-o", str(out), "--calib", str(calib), "--weight-only"]
    assert dyadiq_main([*argv, "--wo-method", "rtn"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["average_code_bits"] == 4
    assert (out / "model.wo.onnx").exists() and not (out / "model.qdq.onnx").exists()


def test_budget_without_candidates_offers_three_to_six_bits(
    model_and_calib: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    # 2 bits broke the additive damage model on Gemma at 3.5 bits (WEIGHT_ONLY_WIDTHS)
    model, calib = model_and_calib
    out = tmp_path / "out"
    argv = [str(model), "-o", str(out), "--calib", str(calib), "--group-size", "32"]
    assert main([*argv, "--budget", "avg-wbits=3.5", "--analysis-samples", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    measured = {int(b) for widths in report["allocation"]["damage"].values() for b in widths}
    assert measured == {3, 4, 5, 6}
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["layers"].values()) <= {3, 4, 5, 6}
