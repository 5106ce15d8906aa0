"""Compile a verified integer program for a deployment target and check it there.

One entry point for ``dyadiq quantize --target``: TVM binaries for x86 / aarch64 Linux / CUDA
(:mod:`dyadiq.backends.tvm.build`) and self-contained C for Cortex-M
(:mod:`dyadiq.backends.mcu.emit_c`). Whatever can run on this machine is run on the check inputs
and compared bit for bit with the reference interpreter: x86 natively, aarch64 under
qemu-user, Cortex-M under qemu-system-arm; CUDA is compiled and run only where a GPU exists.
The returned dict is the ``target`` section of report.json and says which of these happened.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.errors import ConfigError
from dyadiq.integer_program import IntegerProgram
from dyadiq.reference_interpreter import ReferenceInterpreter

# "x86" builds for the highest x86-64 ISA level this machine runs; the named levels build for
# a fleet (x86-64-v3: any AVX2 CPU; x86-64-v4-vnni: AVX-512 VNNI CPUs, the vpdpbusd kernels).
X86_TARGETS = ("x86", "x86-64-v3", "x86-64-v4-vnni")
TVM_TARGETS = (*X86_TARGETS, "aarch64", "cuda")
MCU_TARGETS = ("cortex-m3", "cortex-m4", "cortex-m7", "cortex-m55")
TARGETS = TVM_TARGETS + MCU_TARGETS

Feeds = Sequence[Mapping[str, np.ndarray]]


def single_inputs(batches: Feeds, limit: int) -> list[dict[str, np.ndarray]]:
    """Batches split into batch-1 feeds (the compiled targets take one input at a time)."""
    rows: list[dict[str, np.ndarray]] = []
    for batch in batches:
        n = len(next(iter(batch.values())))
        for i in range(n):
            if len(rows) == limit:
                return rows
            rows.append({name: np.asarray(v)[i : i + 1] for name, v in batch.items()})
    return rows


def _code_diff(expected: np.ndarray, got: np.ndarray) -> int:
    """Largest |difference| of two code vectors; -1 when their shapes differ."""
    if expected.shape != got.shape:
        return -1
    return int(np.abs(expected.astype(np.int64) - got.astype(np.int64)).max())


# Float islands run on TVM's float kernels here and on onnxruntime's in the reference, which
# may round the last bit differently; a Quantize after an island then moves by one code, and
# the integer layers after it can carry that on. Such builds pass when every output code is
# within this many codes of the reference's (exactness is still counted and reported).
ISLAND_CODE_TOLERANCE = 2


def _compare(
    expected: list[np.ndarray],
    got: list[np.ndarray],
    expected_floats: list[np.ndarray] | None = None,
    got_floats: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per check input: output codes compared exactly; outputs that have no codes (a float
    island's) compared relative to their range (``max_float_diff_of_range``)."""
    mismatched = [
        i for i, (e, g) in enumerate(zip(expected, got, strict=True)) if not np.array_equal(e, g)
    ]
    worst = max((_code_diff(expected[i], got[i]) for i in mismatched), default=0)
    result = {"inputs": len(expected), "exact": len(expected) - len(mismatched),
              "mismatched_inputs": mismatched[:10], "max_code_diff": worst}  # fmt: skip
    if expected_floats and got_floats and any(e.size for e in expected_floats):
        result["max_float_diff_of_range"] = max(
            _float_diff_of_range(e, g) for e, g in zip(expected_floats, got_floats, strict=True)
        )
    return result


def _float_diff_of_range(expected: np.ndarray, got: np.ndarray) -> float:
    if expected.shape != got.shape:
        return float("inf")
    if not expected.size:
        return 0.0
    span = float(expected.max() - expected.min()) or 1.0
    return float(np.abs(expected.astype(np.float64) - got).max()) / span


def _flat(arrays: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    if not arrays:
        return np.zeros(0, dtype)
    return np.concatenate([np.asarray(a).ravel() for a in arrays]).astype(dtype, copy=False)


def _reference_outputs(
    program: IntegerProgram, feeds: Feeds
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per input, from one reference run: the codes of all outputs that have them, flattened
    into one vector, and the outputs that have none (a float island's), flattened."""
    reference = ReferenceInterpreter(program)
    coded = [o for o in program.outputs if o in program.int_outputs]
    plain = [o for o in program.outputs if o not in program.int_outputs]
    codes, floats = [], []
    for feed in feeds:
        outputs = reference.outputs(feed)
        codes.append(_flat([outputs[o] for o in coded], np.int64))
        floats.append(_flat([outputs[o] for o in plain], np.float32))
    return codes, floats


def _tvm_codes(program: IntegerProgram, outputs: Sequence[np.ndarray]) -> np.ndarray:
    """The codes part of the lowered ``main``'s outputs (codes come first)."""
    n = sum(1 for o in program.outputs if o in program.int_outputs)
    return _flat(outputs[:n], np.int64)


def _tvm_floats(program: IntegerProgram, outputs: Sequence[np.ndarray]) -> np.ndarray:
    """The float outputs of ``main`` (after the codes) of outputs that have no codes."""
    n = sum(1 for o in program.outputs if o in program.int_outputs)
    floats = outputs[n:]
    plain = [
        v for o, v in zip(program.outputs, floats, strict=True) if o not in program.int_outputs
    ]
    return _flat(plain, np.float32)


def _compare_runs(
    program: IntegerProgram,
    expected: list[np.ndarray],
    expected_floats: list[np.ndarray],
    runs: Sequence[Sequence[np.ndarray]],
) -> dict[str, Any]:
    """:func:`_compare` of TVM ``main`` results (one list of outputs per check input)."""
    got = [_tvm_codes(program, outputs) for outputs in runs]
    got_floats = [_tvm_floats(program, outputs) for outputs in runs]
    return _compare(expected, got, expected_floats, got_floats)


def emit_for_target(
    program: IntegerProgram,
    target: str,
    out_dir: Path,
    feeds: Feeds,
    *,
    tune_trials: int = 0,
    tuning_db: Path | None = None,
    layer_latency_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write the target's artifacts into ``out_dir`` and check them on ``feeds`` (batch-1
    inputs; see :func:`single_inputs`). With ``layer_latency_ids`` (the plan's layer ids, in
    program order) an x86 build also writes ``layer_latency.json``: every layer's kernel timed
    here per candidate format (:data:`LATENCY_TABLE_FORMATS`), the allocation's latency table."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if layer_latency_ids is not None and target not in X86_TARGETS:
        raise ConfigError(
            f"per-layer latency is measured where the code runs: x86 here, not {target}"
        )
    batched = [f for f in feeds if len(next(iter(f.values()))) != 1]
    if batched:
        raise ConfigError("emit_for_target checks batch-1 inputs: split them with single_inputs")
    start = time.perf_counter()
    if target in MCU_TARGETS:
        info = _emit_mcu(program, target, out_dir, feeds)
    else:
        info = _emit_tvm(program, target, out_dir, feeds, tune_trials, tuning_db)
    if layer_latency_ids is not None:
        info["layer_latency_table"] = str(
            _layer_latency(program, target, out_dir, layer_latency_ids, tuning_db)
        )
    info["target"] = target
    info["seconds"] = round(time.perf_counter() - start, 2)
    return info


def _emit_tvm(
    program: IntegerProgram,
    target: str,
    out_dir: Path,
    feeds: Feeds,
    tune_trials: int,
    tuning_db: Path | None,
) -> dict[str, Any]:
    from dyadiq.backends.tvm import build as tvm_build
    from dyadiq.backends.tvm.lower import lower_program
    from dyadiq.backends.tvm.tuning import schedule_module_with_report

    # the target picks the lowering: channels-last kernels on x86 CPUs with AVX2 or VNNI
    mod = lower_program(program, target=tvm_build.target_for(target), float_islands=True)
    sources: dict[str, str] = {}

    def schedule(prepared: Any, tvm_target: Any) -> Any:
        scheduled, report = schedule_module_with_report(
            prepared, tvm_target, database_dir=tuning_db, trials=tune_trials
        )
        sources.update(report.source)
        return scheduled

    cpu = target != "cuda"
    library = tvm_build.build(
        mod, target, out_dir, program=program, schedule=schedule if cpu else None
    )
    info: dict[str, Any] = {"library": str(library), "weights_stored_as": "int8 containers"}
    if sources:
        counts: dict[str, int] = {}
        for source in sources.values():
            counts[source] = counts.get(source, 0) + 1
        info["kernels_by_schedule_source"] = counts
    expected, expected_floats = _reference_outputs(program, feeds)
    if program.float_ops:
        info["float_islands"] = list(program.float_ops)
        info["code_tolerance"] = ISLAND_CODE_TOLERANCE
    if target in X86_TARGETS:
        from dyadiq.backends.tvm.model_runner import missing_cpu_flags

        info["isa_level"] = tvm_build.isa_level(target)
        missing = missing_cpu_flags(tvm_build.required_cpu_flags(target))
        if missing:
            info["ran_on"] = f"not run: this CPU lacks {', '.join(missing)}"
        else:
            runs = [list(tvm_build.run_library(library, f).values()) for f in feeds]
            info["bit_exact_vs_reference"] = _compare_runs(program, expected, expected_floats, runs)
    elif target == "aarch64":
        from dyadiq.backends.tvm.aarch64 import aarch64_runtime_available, run_many_under_qemu

        if aarch64_runtime_available():
            runs = run_many_under_qemu(library, list(feeds))
            info["bit_exact_vs_reference"] = _compare_runs(program, expected, expected_floats, runs)
            info["ran_on"] = "qemu-aarch64 (emulated; timings meaningless)"
        else:
            info["ran_on"] = "not run: no aarch64 runtime here (bash scripts/setup_aarch64.sh)"
    else:
        import tvm

        if tvm.cuda().exist:
            runs = [list(tvm_build.run_library(library, f).values()) for f in feeds]
            info["bit_exact_vs_reference"] = _compare_runs(program, expected, expected_floats, runs)
        else:
            info["ran_on"] = "not run: compiled only, no CUDA device on this machine"
    return info


# weight widths x activation widths the allocation can choose from
LATENCY_TABLE_FORMATS = tuple((w, a) for a in (8, 4) for w in (8, 6, 4, 3, 2))


def _layer_latency(
    program: IntegerProgram,
    target: str,
    out_dir: Path,
    layer_ids: Sequence[str],
    tuning_db: Path | None,
) -> Path:
    from dyadiq.backends.tvm.build import target_for
    from dyadiq.backends.tvm.layer_latency import measure_layer_latency
    from dyadiq.plan import LayerFormat

    formats = [LayerFormat(w, a) for w, a in LATENCY_TABLE_FORMATS]
    table = measure_layer_latency(
        program, formats, target_for(target), layer_ids=layer_ids, database_dir=tuning_db, repeat=10
    )
    path = out_dir / "layer_latency.json"
    table.save(path)
    return path


def _emit_mcu(program: IntegerProgram, target: str, out_dir: Path, feeds: Feeds) -> dict[str, Any]:
    from dyadiq.backends.mcu import build as mcu_build
    from dyadiq.backends.mcu.emit_c import emit_c_project

    project = emit_c_project(program, out_dir, cpu=target)
    info: dict[str, Any] = {
        "sources": str(out_dir),
        "arena_bytes": project.arena.peak_bytes,
        "weights_stored_as": "int4 packed two per byte, wider codes one per byte",
    }
    built, why_not = mcu_build.build_if_toolchain(project)
    if built is None:
        info["built"] = f"not built: {why_not}"
        return info
    size = built.model_size
    info["elf"] = str(built.app_elf)
    info["flash_bytes"] = size.flash
    info["static_ram_bytes"] = size.static_ram
    info["stack_bytes_estimate"] = built.stack_bytes
    preset = mcu_build.cpu_preset(target)
    if preset.qemu_machine is None:
        info["ran_on"] = f"not run: QEMU has no board for {target}"
        return info
    (name,) = list(program.inputs)
    inputs = np.stack([np.asarray(f[name], np.float32)[0] for f in feeds])
    run = mcu_build.run_qemu(project, built.app_elf, inputs, count_instructions=True)
    expected, _ = _reference_outputs(program, feeds)
    decoded = project.decode_outputs(run.outputs)
    got = [
        np.concatenate([decoded[spec.name][i].ravel() for spec in project.outputs])
        for i in range(len(feeds))
    ]
    info["bit_exact_vs_reference"] = _compare(expected, got)
    info["ran_on"] = f"qemu-system-arm -M {preset.qemu_machine}"
    if run.instructions:
        info["instructions_per_inference"] = int(np.median(run.instructions))
    return info
