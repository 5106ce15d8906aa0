"""x86 libraries are built for an x86-64 ISA level, record it, and refuse CPUs without it.

A library built for ``x86-64-v3`` (what every AVX2 machine gets: the AVX2 kernels) is run on
an emulated Haswell (``qemu-x86_64 -cpu Haswell``: AVX2, no AVX-512) and must give the
reference interpreter's codes there too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dyadiq.backends.tvm import model_runner as tvm_model_runner
from dyadiq.backends.tvm.build import (
    RUNNER_NAME,
    X86_ISA_LEVELS,
    build,
    host_x86_isa,
    required_cpu_flags,
    run_library,
    target_for,
)
from dyadiq.backends.tvm.lower import lower_program, main_output_names
from dyadiq.errors import ConfigError
from dyadiq.reference_interpreter import ReferenceInterpreter
from tests import tvm_helpers
from tests.builders import calibration, conv_relu_pool_fc

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 host only")

HASWELL = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx avx2 bmi1 bmi2 f16c fma movbe abm xsave"
ICELAKE = HASWELL + " avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni"


def test_isa_level_follows_the_cpu_flags():
    assert host_x86_isa(frozenset(HASWELL.split())) == "x86-64-v3"
    assert host_x86_isa(frozenset(ICELAKE.split())) == "x86-64-v4-vnni"
    assert host_x86_isa(frozenset()) == "x86-64-v3"  # unreadable flags: the portable level
    assert required_cpu_flags("aarch64") == []
    assert "avx512_vnni" in required_cpu_flags("x86-64-v4-vnni")
    for _, (spec, _) in X86_ISA_LEVELS.items():
        assert spec["mcpu"].startswith("x86-64-v")  # never the build machine's own -mcpu


def test_runner_names_the_missing_flags():
    needs = required_cpu_flags("x86-64-v4-vnni")
    cpuinfo = f"processor : 0\nflags : {HASWELL}\n"
    assert tvm_model_runner.missing_cpu_flags(needs, cpuinfo) == [
        "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni",
    ]  # fmt: skip
    assert tvm_model_runner.missing_cpu_flags(needs, f"flags : {ICELAKE}\n") == []
    assert tvm_model_runner.missing_cpu_flags(needs, "no flags here") == []


@pytest.fixture(scope="module")
def program():
    rng = np.random.default_rng(5)
    calib = calibration((1, 3, 8, 8), rng, n=8)
    return tvm_helpers.integer_program(conv_relu_pool_fc(rng), calib), calib


def test_v3_library_is_bit_exact_here_and_on_an_emulated_haswell(program, tmp_path):
    program, calib = program
    # lowered for the level: the AVX2 dot-product kernels, as `--target x86-64-v3` builds it
    lowered = lower_program(program, target=target_for("x86-64-v3"))
    library = build(lowered, "x86-64-v3", tmp_path / "v3", program=program)
    info = json.loads((library.parent / "model.json").read_text())
    assert info["isa_level"] == "x86-64-v3" and "avx2" in info["required_cpu_flags"]
    feeds = list(tvm_helpers.samples(calib, 4))
    reference = ReferenceInterpreter(program)
    (name,) = [n for n in main_output_names(program) if n.endswith("_codes")]
    for one in feeds:
        assert np.array_equal(run_library(library, one)[name], reference.outputs(one)["y"])
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing: run scripts/setup.sh dev (Debian package qemu-user)"
    np.savez(tmp_path / "in.npz", **feeds[0])
    runner = str(library.parent / RUNNER_NAME)
    proc = subprocess.run(
        [qemu, "-cpu", "Haswell", sys.executable, runner, tmp_path / "in.npz", tmp_path / "o.npz"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "o.npz") as stored:
        assert np.array_equal(stored[name], reference.outputs(feeds[0])["y"])


def test_library_for_a_missing_isa_is_refused_with_a_message(program, tmp_path):
    program, calib = program
    library = build(lower_program(program), "x86-64-v3", tmp_path / "lib", program=program)
    info_path = library.parent / "model.json"
    info = json.loads(info_path.read_text())
    info["required_cpu_flags"] = [*info["required_cpu_flags"], "not_a_real_flag"]
    info_path.write_text(json.dumps(info))
    feeds = next(iter(tvm_helpers.samples(calib, 1)))
    with pytest.raises(ConfigError, match="lacks not_a_real_flag"):
        run_library(library, feeds)
    np.savez(tmp_path / "in.npz", **feeds)
    proc = subprocess.run(
        [
            sys.executable,
            str(library.parent / RUNNER_NAME),
            tmp_path / "in.npz",
            tmp_path / "o.npz",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and "lacks not_a_real_flag" in proc.stderr
    assert not Path(tmp_path / "o.npz").exists()
