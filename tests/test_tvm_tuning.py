"""Schedules keep TVM integer kernels bit-exact; database records are found and applied."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from dyadiq.backends.tvm import tuning as tvm_tuning
from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
from dyadiq.backends.tvm.layer_latency import LatencyTable, measure_layer_latency
from dyadiq.backends.tvm.tuning import default_schedule, schedule_module_with_report
from dyadiq.errors import ConfigError
from dyadiq.plan import LayerFormat
from tests import tvm_helpers
from tests.builders import calibration, conv_relu_pool_fc, residual_concat
from tests.test_tvm_backend import SYNTHETIC, CompiledProgram, assert_bit_exact

X86 = target_for("x86")


def _conv_requant(
    rng: np.random.Generator,
    *,
    channels: int,
    size: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    act_dtype: str = "int8",
) -> tvm.IRModule:
    """conv2d (int32 accumulator) + bias + int64 dyadic requant + clip + cast, the pattern
    backends.tvm.lower emits, with sizes that exercise the tiles (divisible and not)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, channels, size, size), act_dtype))
    weight = rng.integers(-127, 128, (out_channels, channels // groups, kernel, kernel))
    bias = rng.integers(-5000, 5000, (1, out_channels, 1, 1))
    mult = rng.integers(1 << 20, 1 << 30, (1, out_channels, 1, 1))
    shift = rng.integers(30, 40, (1, out_channels, 1, 1))
    lo, hi = (0, 255) if act_dtype == "uint8" else (-128, 127)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(
                    x,
                    relax.const(weight.astype(np.int8), "int8"),
                    strides=stride,
                    padding=kernel // 2,
                    groups=groups,
                    out_dtype="int32",
                )
            )
            y = bb.emit(relax.op.astype(y, "int64"))
            y = bb.emit(relax.op.add(y, relax.const(bias, "int64")))
            y = bb.emit(relax.op.multiply(y, relax.const(mult, "int64")))
            y = bb.emit(relax.op.add(y, relax.const(np.left_shift(1, shift - 1), "int64")))
            y = bb.emit(relax.op.right_shift(y, relax.const(shift, "int64")))
            y = bb.emit(relax.op.clip(y, lo, hi))
            out = bb.emit_output(relax.op.astype(y, act_dtype))
        bb.emit_func_output(out)
    return bb.get()


def _dense_requant(rng: np.random.Generator, k: int, n: int) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, k), "uint8"))
    weight = rng.integers(-127, 128, (k, n)).astype(np.int8)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(weight, "int8"), "int32"))
            y = bb.emit(relax.op.astype(y, "int64"))
            y = bb.emit(relax.op.multiply(y, relax.const(np.int64(1 << 20), "int64")))
            y = bb.emit(relax.op.right_shift(y, relax.const(np.int64(28), "int64")))
            y = bb.emit(relax.op.clip(y, -128, 127))
            out = bb.emit_output(relax.op.astype(y, "int8"))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(compile_prepared(mod, X86), tvm.cpu())
    out: np.ndarray = vm["main"](tvm.runtime.tensor(x)).numpy()
    return out


KERNELS = {
    "conv3x3": dict(channels=16, size=20, out_channels=24, kernel=3),
    "conv3x3_stride2_uint8": dict(
        channels=8, size=15, out_channels=16, kernel=3, stride=2, act_dtype="uint8"
    ),
    "depthwise": dict(channels=32, size=17, out_channels=32, kernel=3, groups=32),
    "depthwise_stride2_uint8": dict(
        channels=24, size=16, out_channels=24, kernel=3, stride=2, groups=24, act_dtype="uint8"
    ),
    "pointwise": dict(channels=40, size=7, out_channels=48, kernel=1),
}


@pytest.mark.parametrize("case", sorted(KERNELS))
def test_default_schedule_is_bit_exact_on_conv_kernels(case):
    rng = np.random.default_rng(3)
    spec = KERNELS[case]
    prepared = prepare(_conv_requant(rng, **spec), X86)  # type: ignore[arg-type]
    scheduled, report = schedule_module_with_report(prepared, X86, progress=None)
    assert set(report.source.values()) == {"default"}, report.notes
    assert scheduled.script() != prepared.script()  # something was scheduled
    dtype = str(spec.get("act_dtype", "int8"))
    info = np.iinfo(np.dtype(dtype))
    shape = (1, spec["channels"], spec["size"], spec["size"])
    x = rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)
    assert np.array_equal(_run(scheduled, x), _run(prepared, x))


def test_default_schedule_is_bit_exact_on_dense():
    rng = np.random.default_rng(4)
    prepared = prepare(_dense_requant(rng, 200, 48), X86)
    scheduled, report = schedule_module_with_report(prepared, X86, progress=None)
    assert set(report.source.values()) == {"default"}
    x = rng.integers(0, 256, (1, 200)).astype(np.uint8)
    assert np.array_equal(_run(scheduled, x), _run(prepared, x))


def test_default_schedule_parallelizes_and_vectorizes_the_reduction():
    rng = np.random.default_rng(5)
    prepared = prepare(_conv_requant(rng, **KERNELS["conv3x3"]), X86)  # type: ignore[arg-type]
    (func,) = [f for f in prepared.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    text = default_schedule(func).script()
    assert "T.parallel" in text and "T.vectorized" in text
    # the requantization epilogue was inlined: one int32 accumulator tile, no int64 tensors
    allocations = [line for line in text.splitlines() if "alloc_buffer" in line]
    assert len(allocations) == 2  # the padded input and the accumulator
    assert not any(line.rstrip().endswith('"int64")') for line in allocations)


@pytest.mark.parametrize("case", sorted(SYNTHETIC))
def test_scheduled_programs_match_the_reference_interpreter(case, monkeypatch):
    """Every op kind the lowering emits, scheduled, against the numpy reference."""
    build_model, shape = SYNTHETIC[case]
    rng = np.random.default_rng(20)
    program = tvm_helpers.integer_program(build_model(rng), calibration(shape, rng, n=8))
    reports: list[tvm_tuning.ScheduleReport] = []

    def scheduled_compile(mod: tvm.IRModule, target: tvm.target.Target) -> object:
        mod, report = schedule_module_with_report(mod, target, progress=None)
        reports.append(report)
        return compile_prepared(mod, target)

    monkeypatch.setattr("tests.test_tvm_backend.compile_prepared", scheduled_compile)
    compiled = CompiledProgram(program)
    (report,) = reports
    assert report.count("default") >= 1
    # a PrimFunc that keeps its naive loops is named with the reason
    assert set(report.notes) == {n for n, s in report.source.items() if s == "unscheduled"}
    feeds = calibration(shape, rng, n=4)
    feeds += [{"x": np.full(shape, 1e6, np.float32)}, {"x": np.full(shape, -1e6, np.float32)}]
    assert_bit_exact(compiled, feeds, minimum=6)


def _commit_record(database_dir: Path, func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """A record whose trace splits the output-channel loop by 4 (not what the default does)."""
    workload = tvm_tuning._workload(func)
    sch = tvm.s_tir.Schedule(workload)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reduction = next(b for b in blocks if 2 in tvm_tuning._iter_kinds(sch, b))
    loops = sch.get_loops(reduction)
    sch.split(loops[1], [None, 4])
    database = ms.database.JSONDatabase(work_dir=str(database_dir))
    entry = database.commit_workload(workload)
    database.commit_tuning_record(
        ms.database.TuningRecord(sch.trace, entry, [tvm.runtime.convert(1e-4)], X86)
    )
    scheduled: tvm.tirx.PrimFunc = sch.mod["main"].without_attr("global_symbol")
    return scheduled


def test_database_record_is_applied_without_tuning(tmp_path):
    rng = np.random.default_rng(6)
    prepared = prepare(_conv_requant(rng, **KERNELS["conv3x3"]), X86)  # type: ignore[arg-type]
    ((gv, func),) = [
        (g, f) for g, f in prepared.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
    ]
    expected = _commit_record(tmp_path, func)
    assert (tmp_path / "database_tuning_record.json").stat().st_size > 0
    scheduled, report = schedule_module_with_report(
        prepared, X86, database_dir=tmp_path, progress=None
    )
    assert report.source == {gv.name_hint: "database"}
    tvm.ir.assert_structural_equal(scheduled[gv], expected)
    x = rng.integers(-128, 128, (1, 16, 20, 20)).astype(np.int8)
    assert np.array_equal(_run(scheduled, x), _run(prepared, x))


def test_an_empty_database_falls_back_to_the_default_schedule(tmp_path):
    rng = np.random.default_rng(7)
    prepared = prepare(_dense_requant(rng, 64, 32), X86)
    _, report = schedule_module_with_report(prepared, X86, database_dir=tmp_path, progress=None)
    assert set(report.source.values()) == {"default"}


@pytest.mark.skipif(
    os.environ.get("DYADIQ_TUNING_TESTS") != "1",
    reason="a real MetaSchedule run: 4 min on a loaded 2-core machine; DYADIQ_TUNING_TESTS=1",
)
def test_tuning_commits_records_that_the_next_build_reuses(tmp_path):
    rng = np.random.default_rng(8)
    prepared = prepare(_conv_requant(rng, channels=8, size=8, out_channels=16, kernel=3), X86)
    progress: list[str] = []
    tuned, first = schedule_module_with_report(
        prepared, X86, database_dir=tmp_path, trials=2, progress=lambda *a: progress.append(a[3])
    )
    assert set(first.source.values()) == {"tuned"}
    assert any(p.startswith("tuning") for p in progress)
    records = (tmp_path / "database_tuning_record.json").read_text().splitlines()
    assert records and all(json.loads(r) for r in records)
    reused, second = schedule_module_with_report(prepared, X86, database_dir=tmp_path)
    assert set(second.source.values()) == {"database"}
    tvm.ir.assert_structural_equal(reused, tuned)
    x = rng.integers(-128, 128, (1, 8, 8, 8)).astype(np.int8)
    assert np.array_equal(_run(reused, x), _run(prepared, x))


def test_bad_tuning_requests_are_config_errors(tmp_path):
    prepared = prepare(_dense_requant(np.random.default_rng(9), 16, 16), X86)
    with pytest.raises(ConfigError, match="trials"):
        schedule_module_with_report(prepared, X86, database_dir=tmp_path, trials=-1)
    with pytest.raises(ConfigError, match="database"):
        schedule_module_with_report(prepared, X86, trials=4)
    no_cores = tvm.target.Target({"kind": "llvm"})
    with pytest.raises(ConfigError, match="num-cores"):
        schedule_module_with_report(prepared, no_cores, database_dir=tmp_path, trials=4)


def test_layer_latency_table_covers_every_layer_and_format(tmp_path):
    rng = np.random.default_rng(10)
    program = tvm_helpers.integer_program(
        conv_relu_pool_fc(rng), calibration((1, 3, 8, 8), rng, n=4)
    )
    formats = [LayerFormat(8, 8), LayerFormat(4, 8)]
    table = measure_layer_latency(program, formats, X86, repeat=3)
    weighted = [op.output for op in program.ops if hasattr(op, "weight") and op.weight is not None]
    assert list(table.layers) == weighted and len(weighted) == 2
    for row in table.layers.values():
        assert set(row) == {"W8A8", "W4A8"} and all(ms_ > 0 for ms_ in row.values())
    table.save(tmp_path / "latency.json")
    loaded = LatencyTable.load(tmp_path / "latency.json")
    assert loaded.layers == table.layers
    from dyadiq.passes.allocation import load_latency_table

    assert set(load_latency_table(tmp_path / "latency.json")) == set(weighted)


def test_layer_ids_must_match_the_weighted_layers():
    rng = np.random.default_rng(11)
    program = tvm_helpers.integer_program(residual_concat(rng), calibration((1, 4, 6, 6), rng))
    with pytest.raises(ConfigError, match="layer ids"):
        measure_layer_latency(program, [LayerFormat(8, 8)], X86, layer_ids=["only_one"])


def test_default_schedule_is_committed_as_a_tuning_candidate(tmp_path):
    """After a search, the default schedule competes with the sampled ones in the database."""
    rng = np.random.default_rng(12)
    prepared = prepare(_dense_requant(rng, 96, 32), X86)
    ((gv, func),) = [
        (g, f) for g, f in prepared.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
    ]
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    tvm_tuning._commit_default_candidate(database, func, X86)
    (record,) = database.get_all_tuning_records()
    assert 0 < float(record.run_secs[0]) < 1
    scheduled, report = schedule_module_with_report(
        prepared, X86, database_dir=tmp_path, progress=None
    )
    assert report.source == {gv.name_hint: "database"}
    tvm.ir.assert_structural_equal(scheduled[gv], default_schedule(func))


def test_scheduling_leaves_the_input_module_unchanged():
    """TVM 0.27 schedules edit a PrimFunc in place unless it is copied first."""
    rng = np.random.default_rng(13)
    spec = KERNELS["depthwise_stride2_uint8"]
    prepared = prepare(_conv_requant(rng, **spec), X86)  # type: ignore[arg-type]
    before = prepared.script()
    scheduled, _ = schedule_module_with_report(prepared, X86, progress=None)
    assert prepared.script() == before
    assert scheduled.script() != before


def test_default_schedule_vectorizes_for_the_target_register_width():
    from dyadiq.backends.tvm.tuning import vector_bits

    assert vector_bits(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})) == 512
    assert vector_bits(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) == 256
    assert vector_bits(target_for("aarch64")) == 128
    rng = np.random.default_rng(13)
    prepared = prepare(_dense_requant(rng, 64, 48), X86)
    (func,) = [f for f in prepared.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    wide, narrow = (
        default_schedule(func, bits=512).script(),
        default_schedule(func, bits=128).script(),
    )
    # the int32 accumulator's vector loop: 16 lanes for AVX-512, 4 for NEON
    assert "T.vectorized(T.int64(16))" in wide and "T.vectorized(T.int64(4))" in narrow
