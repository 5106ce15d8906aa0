"""``dyadiq quantize --target`` and ``dyadiq run``: compiled artifacts checked bit for bit.

The reference interpreter's output codes are the ground truth for every target; the CLI's own
report and an independent ``dyadiq run`` of the written folder must both agree with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from dyadiq.cli import main
from dyadiq.errors import ConfigError
from dyadiq.reference_interpreter import ReferenceInterpreter
from dyadiq.targets import emit_for_target, single_inputs


def _reference_codes(out: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Codes of the program the CLI built, recomputed from its written integer model's plan."""
    from dyadiq import zoo
    from dyadiq.passes.compensation.settings import DEFAULT_COMPENSATION, CompensationSettings
    from dyadiq.pipeline import quantize
    from dyadiq.plan import PrecisionPlan

    artifacts = zoo.get("fashion_cnn")
    plan = PrecisionPlan.load(out / "plan.json")
    calibration = list(artifacts.calibration_batches())
    # the CLI's default compensation, which the folder under test was made with
    compensation = CompensationSettings.parse(DEFAULT_COMPENSATION)
    result = quantize(
        artifacts.model_path,
        out / "again",
        calibration,
        plan=plan,
        integer=True,
        compensation=compensation,
    )
    assert result.program is not None
    codes = ReferenceInterpreter(result.program).outputs(feeds)
    return np.concatenate([np.asarray(v).ravel() for v in codes.values()])


@pytest.mark.realmodel
@pytest.mark.parametrize("target", ["x86", "cortex-m4"])
def test_quantize_target_then_run(target: str, tmp_path: Path) -> None:
    from dyadiq import zoo

    out = tmp_path / "OUT"
    argv = ["quantize", "--zoo", "fashion_cnn", "-o", str(out), "--no-eval"]
    assert main([*argv, "--target", target, "--check-inputs", "20"]) == 0
    report = json.loads((out / "report.json").read_text())["target"]
    assert report["bit_exact_vs_reference"] == {
        "inputs": 20, "exact": 20, "mismatched_inputs": [], "max_code_diff": 0
    }  # fmt: skip
    if target == "cortex-m4":
        assert 0 < report["flash_bytes"] < 64 * 1024 and report["instructions_per_inference"] > 0

    feeds, _ = next(iter(zoo.get("fashion_cnn").evaluation_batches(1)))
    x = feeds["input"][:1]
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(out / target), "--input", str(tmp_path / "x.npy"),
                 "-o", str(tmp_path / "y.npz")]) == 0  # fmt: skip
    with np.load(tmp_path / "y.npz") as stored:
        codes = stored[stored.files[0]]
    assert np.array_equal(codes.ravel(), _reference_codes(out, {"input": x}))


def test_relax_module_file_quantizes_from_the_cli(
    tmp_path: Path, calib_npz_folder: Path, tiny_cnn_model: onnx.ModelProto
) -> None:
    tvm = pytest.importorskip("tvm")
    from tvm.relax.frontend.onnx import from_onnx

    saved = tmp_path / "tiny.relax.json"
    saved.write_text(tvm.ir.save_json(from_onnx(tiny_cnn_model, keep_params_in_input=False)))
    out = tmp_path / "OUT"
    argv = ["quantize", str(saved), "-o", str(out), "--calib", str(calib_npz_folder)]
    assert main([*argv, "--target", "x86", "--check-inputs", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["integer"]["fully_integer"]
    assert report["target"]["bit_exact_vs_reference"]["exact"] == 4


def test_targets_refuse_batched_inputs_and_unknown_names(tmp_path: Path) -> None:
    rows = single_inputs([{"x": np.zeros((3, 2))}, {"x": np.ones((2, 2))}], limit=4)
    assert [r["x"].shape for r in rows] == [(1, 2)] * 4 and rows[3]["x"][0, 0] == 1
    with pytest.raises(ConfigError, match="unknown target"):
        emit_for_target(None, "riscv", tmp_path, [])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch-1"):
        emit_for_target(None, "x86", tmp_path, [{"x": np.zeros((3, 2))}])  # type: ignore[arg-type]


def test_run_rejects_folders_it_did_not_write(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 3)))
    assert main(["run", str(tmp_path), "--input", str(tmp_path / "x.npy")]) == 2


def test_layer_latency_table_is_written_and_feeds_a_latency_budget(
    tmp_path: Path, calib_npz_folder: Path, tiny_cnn_model: onnx.ModelProto
) -> None:
    pytest.importorskip("tvm")
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn_model, model)
    out = tmp_path / "OUT"
    argv = ["quantize", str(model), "--calib", str(calib_npz_folder), "--check-inputs", "2"]
    assert main([*argv, "-o", str(out), "--target", "x86", "--layer-latency"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    table = json.loads((out / "x86" / "layer_latency.json").read_text())["layers"]
    assert set(table) == set(plan["layers"])
    assert all(len(row) == 10 and min(row.values()) > 0 for row in table.values())
    # the table is what --latency-table reads: a budget above the all-W8A8 time is met
    w8_sum = sum(row["W8A8"] for row in table.values())
    budget = f"latency={1.5 * w8_sum:.6f}ms"
    table_path = out / "x86" / "layer_latency.json"
    out2 = tmp_path / "OUT2"
    assert (
        main([*argv, "-o", str(out2), "--budget", budget, "--latency-table", str(table_path)]) == 0
    )
    allocation = json.loads((out2 / "report.json").read_text())["allocation"]
    assert allocation["latency"] <= 1.5 * w8_sum
    # measured here only: a cross-compiled target cannot be timed on this machine
    assert (
        main([*argv, "-o", str(tmp_path / "OUT3"), "--target", "cortex-m4", "--layer-latency"]) == 2
    )


@pytest.mark.parametrize("allow", [False, True])
def test_a_mismatch_fails_quantize_unless_allowed(
    allow: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A written model that disagrees with the reference exits 3, names the tensors and the
    likely cause, and leaves the folder for inspection; --allow-mismatch makes it a warning."""
    from dyadiq import pipeline

    def broken(program, model, batches):  # what an inexact integer kernel would report
        return {"exact_tensors": 41, "tensors": 44, "mismatches": ["batch 0 tensor logits: 2"]}

    monkeypatch.setattr(pipeline, "bit_exactness", broken)
    out = tmp_path / "OUT"
    argv = ["quantize", "--zoo", "fashion_cnn", "-o", str(out), "--no-eval", "--integer"]
    status = main([*argv, "--allow-mismatch"] if allow else argv)
    report = json.loads((out / "report.json").read_text())
    assert (out / "model.int.onnx").is_file()
    assert report["verification"]["passed"] is False
    assert report["verification"]["mismatch_allowed"] is allow
    (problem,) = report["verification"]["problems"]
    assert "3/44 tensors" in problem and "tensor logits" in problem and "Likely cause" in problem
    captured = capsys.readouterr()
    assert "NOT bit-exact" in captured.out
    if allow:
        assert status == 0 and "warning (--allow-mismatch)" in captured.out
    else:
        assert status == 3 and "VerificationError" in captured.err


def test_target_with_float_islands_builds_and_checks_with_a_stated_tolerance(
    tmp_path: Path,
) -> None:
    """A model with ops that have no integer kernel (Sigmoid, Tanh) reaches a compiled x86
    target: the islands run as float Relax functions, and report.json says the check allowed
    dyadiq.targets.ISLAND_CODE_TOLERANCE codes for them."""
    from dyadiq.targets import ISLAND_CODE_TOLERANCE
    from tests import tvm_helpers
    from tests.builders import calibration
    from tests.conftest import save_model, write_npz_folder

    rng = np.random.default_rng(31)
    model = save_model(tvm_helpers.float_islands(rng), tmp_path / "islands.onnx")
    calib = write_npz_folder(tmp_path / "calib", calibration((1, 3, 6, 6), rng, n=6))
    out = tmp_path / "OUT"
    argv = ["quantize", str(model), "--calib", str(calib), "-o", str(out), "--target", "x86"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    target = report["target"]
    assert len(target["float_islands"]) == 2 and target["code_tolerance"] == ISLAND_CODE_TOLERANCE
    checked = target["bit_exact_vs_reference"]
    assert checked["inputs"] == 6 and 0 <= checked["max_code_diff"] <= ISLAND_CODE_TOLERANCE
    assert report["verification"]["passed"] is True


@pytest.mark.realmodel
def test_eval_scores_exactly_and_with_runtime_kernels_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "OUT"
    assert main(["quantize", "--zoo", "fashion_cnn", "-o", str(out), "--no-eval"]) == 0
    capsys.readouterr()
    model = str(out / "model.qdq.onnx")
    argv = ["eval", "--zoo", "fashion_cnn", model, "--limit", "300", "--runtime-kernels"]
    assert main([*argv, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"float", "model.qdq.onnx", "model.qdq.onnx [onnxruntime kernels]"}
    assert metrics["model.qdq.onnx"]["samples"] == 300
    assert 0.9 < metrics["model.qdq.onnx"]["top1_agreement"] <= 1.0
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "exact simulation" in table and "top1_agreement" in table and "{" not in table
