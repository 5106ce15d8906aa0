"""Compile a verified integer program for a deployment target and check it there.

One entry point for ``dyadiq quantize --target``: every target is a
:class:`~dyadiq.backends.target.Target` of the one registry :data:`TARGETS` (TVM binaries for
x86 / aarch64 Linux / CUDA, :mod:`dyadiq.backends.tvm.target`; self-contained C for Cortex-M,
:mod:`dyadiq.backends.mcu.target`). Whatever can run on this machine is run on the check inputs
and compared bit for bit with the reference interpreter: x86 natively, aarch64 under
qemu-user, Cortex-M under qemu-system-arm; CUDA is compiled and run only where a GPU exists.
The returned dict is the ``target`` section of report.json and says which of these happened.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from dyadiq.backends.mcu.target import MCU_TARGETS
from dyadiq.backends.target import CannotRun, EmitOptions, Target, flatten
from dyadiq.backends.tvm.target import TVM_TARGETS
from dyadiq.errors import ConfigError, UnsupportedModelError
from dyadiq.integer_program import IntegerProgram
from dyadiq.reference_interpreter import ReferenceInterpreter

# Every name --target takes, in the order the CLI lists them. "x86" builds for the highest
# x86-64 ISA level this machine runs; the named levels build for a fleet (x86-64-v3: any AVX2
# CPU; x86-64-v4-vnni: AVX-512 VNNI CPUs, the vpdpbusd kernels).
_ALL: tuple[Target[Any], ...] = (*TVM_TARGETS, *MCU_TARGETS)
TARGETS: Mapping[str, Target[Any]] = MappingProxyType({t.name: t for t in _ALL})

Feeds = Sequence[Mapping[str, np.ndarray]]


def single_inputs(batches: Feeds, limit: int) -> list[dict[str, np.ndarray]]:
    """Batches split into batch-1 feeds (the compiled targets take one input at a time)."""
    rows: list[dict[str, np.ndarray]] = []
    for batch in batches:
        arrays = {name: np.asarray(v) for name, v in batch.items()}
        # split along axis 0 only when every input with an axis has one length there;
        # otherwise (silero_vad: input 1x512, state 2x1x128) the leading dims are not a
        # batch and the feed is one sample. A 0-d input (a sample rate) goes whole to each row.
        leading = {len(v) for v in arrays.values() if v.ndim}
        count = leading.pop() if len(leading) == 1 else 0
        for i in range(max(count, 1)):
            if len(rows) == limit:
                return rows
            rows.append(
                {name: v[i : i + 1] if count and v.ndim else v for name, v in arrays.items()}
            )
    return rows


def _one_sample(feed: Mapping[str, np.ndarray]) -> bool:
    """Whether ``feed`` is one sample, as :func:`single_inputs` decides: not a common leading
    length above 1 over its inputs."""
    leading = {len(v) for v in map(np.asarray, feed.values()) if v.ndim}
    return len(leading) != 1 or leading == {1}


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
        codes.append(flatten([outputs[o] for o in coded], np.int64))
        floats.append(flatten([outputs[o] for o in plain], np.float32))
    return codes, floats


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
    here per candidate format, the allocation's latency table."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    chosen = TARGETS[target]
    if layer_latency_ids is not None and not chosen.measures_layer_latency:
        raise ConfigError(
            f"per-layer latency is measured where the code runs: x86 here, not {target}"
        )
    batched = [f for f in feeds if not _one_sample(f)]
    if batched:
        raise ConfigError("emit_for_target checks batch-1 inputs: split them with single_inputs")
    problems = chosen.unsupported(program)
    if problems:
        raise UnsupportedModelError(
            f"the {target} target cannot run this program ({len(problems)} problem(s)): "
            + "; ".join(problems)
        )
    start = time.perf_counter()
    ids = tuple(layer_latency_ids) if layer_latency_ids is not None else None
    options = EmitOptions(tune_trials=tune_trials, tuning_db=tuning_db, layer_latency_ids=ids)
    artifact = chosen.emit(program, out_dir, options)
    info: dict[str, Any] = dict(artifact.report)
    expected, expected_floats = _reference_outputs(program, feeds)
    if program.float_ops:
        info["float_islands"] = list(program.float_ops)
        info["code_tolerance"] = ISLAND_CODE_TOLERANCE
    run = chosen.run(artifact, feeds)
    if isinstance(run, CannotRun):
        info["ran_on"] = f"not run: {run.reason}"
    else:
        got = [o.codes for o in run.outputs]
        got_floats = [o.floats for o in run.outputs]
        info["bit_exact_vs_reference"] = _compare(expected, got, expected_floats, got_floats)
        if run.ran_on is not None:
            info["ran_on"] = run.ran_on
        info.update(run.measurements)
    info["target"] = target
    info["seconds"] = round(time.perf_counter() - start, 2)
    return info
