"""``dyadiq quantize --target`` and ``dyadiq run``: compiled artifacts checked bit for bit.

The reference interpreter's output codes are the ground truth for every target; the CLI's own
report and an independent ``dyadiq run`` of the written folder must both agree with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    from dyadiq.passes.calibration.range_search import DEFAULT_EVALUATIONS, RangeSearchOptions
    from dyadiq.passes.compensation.settings import DEFAULT_COMPENSATION, CompensationSettings
    from dyadiq.pipeline import CalibrationConfig, quantize
    from dyadiq.plan import PrecisionPlan

    artifacts = zoo.get("fashion_cnn")
    plan = PrecisionPlan.load(out / "plan.json")
    calibration = list(artifacts.calibration_batches())
    # the CLI's default compensation and range search, which the folder under test was made with
    compensation = CompensationSettings.parse(DEFAULT_COMPENSATION)
    config = CalibrationConfig(range_search=RangeSearchOptions(evaluations=DEFAULT_EVALUATIONS))
    result = quantize(
        artifacts.model_path,
        out / "again",
        calibration,
        plan=plan,
        integer=True,
        compensation=compensation,
        config=config,
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
    assert all(len(row) == 14 and min(row.values()) > 0 for row in table.values())
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
    """A model with ops that have no integer kernel (Softmax, LRN) reaches a compiled x86
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


# --- the registry and what each Target says about itself ----------------------------------------
def _cli_target_choices() -> list[str]:
    import argparse

    from dyadiq.cli import build_parser

    def choices(parser: argparse.ArgumentParser) -> list[str] | None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found = choices(sub)
                    if found is not None:
                        return found
            elif "--target" in action.option_strings:
                return list(action.choices or [])
        return None

    found = choices(build_parser())
    assert found is not None, "no --target option"
    return found


def test_the_registry_is_the_only_list_of_targets() -> None:
    from dyadiq.backends.capabilities import Requantization
    from dyadiq.backends.mcu.build import cpu_preset
    from dyadiq.backends.mcu.target import MCU_TARGETS, McuTarget
    from dyadiq.backends.tvm.build import isa_level, target_for
    from dyadiq.backends.tvm.target import TVM_TARGETS, TvmTarget
    from dyadiq.targets import TARGETS

    assert _cli_target_choices() == list(TARGETS)
    assert list(TARGETS) == [t.name for t in (*TVM_TARGETS, *MCU_TARGETS)]
    for name, target in TARGETS.items():
        assert target.name == name
        assert target.capabilities.requantization is Requantization.DYADIC
        assert {4, 8} <= target.capabilities.act_bits and 2 in target.capabilities.weight_bits
    # every backend looks its targets up in the same registry, by the same names
    for tvm_target in TVM_TARGETS:
        assert isinstance(tvm_target, TvmTarget)
        assert target_for(tvm_target.name).kind.name in ("llvm", "cuda")
        assert isa_level(tvm_target.name) == tvm_target.isa_level()
    assert isa_level("x86-64-v3") == "x86-64-v3" and isa_level("aarch64") is None
    for mcu in MCU_TARGETS:
        assert isinstance(mcu, McuTarget) and cpu_preset(mcu.name) is mcu.board
    with pytest.raises(ConfigError, match="unknown TVM target"):
        target_for("cortex-m4")


def test_tvm_targets_say_why_they_cannot_run_here(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import tvm

    from dyadiq.backends.target import CannotRun
    from dyadiq.backends.tvm import aarch64, model_runner
    from dyadiq.backends.tvm.target import TvmArtifact
    from dyadiq.targets import TARGETS

    artifact = TvmArtifact("x", Path("nowhere") / "model.so", {}, coded=(True,))
    haswell = "avx avx2 bmi1 bmi2 f16c fma movbe sse4_2"
    monkeypatch.setattr(model_runner, "cpu_flags", lambda cpuinfo=None: frozenset(haswell.split()))
    refused = TARGETS["x86-64-v4-vnni"].run(artifact, [])
    assert isinstance(refused, CannotRun)
    assert refused.reason.startswith("this CPU lacks avx512f") and "avx512_vnni" in refused.reason
    assert TARGETS["x86-64-v3"].run(artifact, []).outputs == []  # type: ignore[union-attr]
    monkeypatch.setattr(aarch64, "aarch64_runtime_available", lambda: False)
    refused = TARGETS["aarch64"].run(artifact, [])
    assert isinstance(refused, CannotRun) and "setup_aarch64.sh" in refused.reason
    monkeypatch.setattr(tvm, "cuda", lambda *_: types.SimpleNamespace(exist=False))
    refused = TARGETS["cuda"].run(artifact, [])
    assert isinstance(refused, CannotRun) and "no CUDA device" in refused.reason


def test_cortex_m_targets_say_why_they_cannot_run_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typing import cast

    from dyadiq.backends.mcu.target import McuArtifact
    from dyadiq.backends.target import CannotRun
    from dyadiq.targets import TARGETS

    project = cast(Any, None)  # never reached: both refusals come first
    not_built = McuArtifact("cortex-m4", tmp_path, {}, project, "x", None, "no arm-none-eabi-gcc")
    refused = TARGETS["cortex-m4"].run(not_built, [])
    assert refused == CannotRun("not built: no arm-none-eabi-gcc")
    monkeypatch.setenv("PATH", str(tmp_path))  # no toolchain, no emulator
    built = McuArtifact("cortex-m4", tmp_path, {}, project, "x", tmp_path / "app.elf")
    refused = TARGETS["cortex-m4"].run(built, [])
    assert isinstance(refused, CannotRun) and "qemu-system-arm" in refused.reason


def test_unsupported_lists_every_reason_at_once_and_nothing_is_written(tmp_path: Path) -> None:
    import dataclasses

    from dyadiq import integer_program as ip
    from dyadiq.errors import UnsupportedModelError
    from dyadiq.targets import TARGETS
    from tests.test_mcu_backend import synthetic_program

    program = synthetic_program()
    conv = next(i for i, op in enumerate(program.ops) if isinstance(op, ip.Conv))
    program.ops[conv] = dataclasses.replace(program.ops[conv], weight_bits=1)  # type: ignore[type-var]
    program.ops.insert(1, ip.Quantize("x_q2", "x"))  # no C kernel for a float -> code op
    mcu = TARGETS["cortex-m4"].unsupported(program)
    assert any(p.startswith("Quantize") for p in mcu) and any("1-bit weights" in p for p in mcu)
    assert [p for p in TARGETS["x86"].unsupported(program) if "1-bit weights" in p] != []
    assert not any(p.startswith("Quantize") for p in TARGETS["x86"].unsupported(program))
    with pytest.raises(
        UnsupportedModelError, match=r"cortex-m4 target cannot run.*Quantize.*1-bit"
    ):
        emit_for_target(program, "cortex-m4", tmp_path / "m4", [])
    assert not (tmp_path / "m4").exists()


def test_cortex_m_target_writes_the_memory_plan_a_ram_budget_reads(
    tmp_path: Path, calib_npz_folder: Path, tiny_cnn_model: onnx.ModelProto
) -> None:
    from dyadiq.passes.allocation import load_memory_plan

    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn_model, model)
    argv = ["quantize", str(model), "--calib", str(calib_npz_folder), "--check-inputs", "2"]
    out = tmp_path / "OUT"
    assert main([*argv, "-o", str(out), "--target", "cortex-m4"]) == 0
    path = out / "cortex-m4" / "memory_plan.json"
    assert json.loads((out / "report.json").read_text())["target"]["memory_plan"] == str(path)
    memory = load_memory_plan(path)
    assert memory.tensor_bytes is not None
    peak = max(sum(memory.tensor_bytes[t][8] for t in live) for live in memory.live_sets)
    # fed back: the allocator prices RAM with these live sets (one byte less is infeasible)
    budget = ["--memory-plan", str(path), "--budget"]
    assert main([*argv, "-o", str(tmp_path / "ok"), *budget, f"ram={peak:.0f}B"]) == 0
    allocation = json.loads((tmp_path / "ok" / "report.json").read_text())["allocation"]
    assert allocation["peak_ram_bytes"] == peak
    assert main([*argv, "-o", str(tmp_path / "no"), *budget, f"ram={peak - 1:.0f}B"]) == 2


@pytest.fixture(scope="module")
def tiny_program(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny CNN's integer program, as ``quantize --integer`` builds it."""
    from dyadiq.pipeline import quantize
    from tests.conftest import TINY_INPUT_SHAPE, make_tiny_cnn, random_batches, save_model

    folder = tmp_path_factory.mktemp("tiny")
    model = save_model(make_tiny_cnn(), folder / "model" / "tiny.onnx")
    batches = random_batches({"x": TINY_INPUT_SHAPE}, 4)
    result = quantize(model, folder / "q", batches, integer=True)
    assert result.program is not None
    return result.program


@pytest.mark.parametrize("name", _cli_target_choices())
def test_every_registered_target_emits_and_runs_or_says_why(
    name: str, tiny_program: Any, tmp_path: Path
) -> None:
    """Each name the CLI offers reaches its Target's emit and run through emit_for_target: the
    artifact is written, and the build either matches the reference bit for bit or the report
    says why it did not run here (a CUDA build without a GPU, a CPU without the level)."""
    pytest.importorskip("tvm")
    from tests.conftest import TINY_INPUT_SHAPE, random_batches

    feeds = single_inputs(random_batches({"x": TINY_INPUT_SHAPE}, 3, seed=7), limit=3)
    info = emit_for_target(tiny_program, name, tmp_path / name, feeds)
    assert info["target"] == name and (tmp_path / name).is_dir()
    if "bit_exact_vs_reference" in info:
        checked = info["bit_exact_vs_reference"]
        assert checked["exact"] == checked["inputs"] == 3, checked
    else:
        assert info["ran_on"].startswith("not run: "), info
