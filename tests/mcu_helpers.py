"""Shared check of the Cortex-M tests: a generated project, built and run on QEMU, gives the
reference interpreter's output codes for every calibration input, bit for bit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dyadiq.backends.mcu.build import build, run_qemu
from dyadiq.reference_interpreter import ReferenceInterpreter


def assert_bit_exact_on_qemu(
    project: Any,
    program: Any,
    calib: Sequence[Mapping[str, np.ndarray]],
    input_name: str = "x",
    device_inputs: np.ndarray | None = None,
) -> None:
    """``device_inputs``: what the device reads for each feed, when it is not ``input_name``'s
    values as they are (e.g. int64 token ids the harness passes as float32)."""
    inputs = (
        device_inputs if device_inputs is not None else np.stack([f[input_name] for f in calib])
    )
    run = run_qemu(project, build(project, jobs=2).app_elf, inputs, timeout_s=120)
    device = project.decode_outputs(run.outputs)
    reference = ReferenceInterpreter(program)
    for i, feeds in enumerate(calib):
        for spec in project.outputs:
            want = reference.run(feeds)[spec.name].reshape(spec.shape)
            assert np.array_equal(device[spec.name][i], want), (spec.name, i)
