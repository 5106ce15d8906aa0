"""The group-wise int4 weight-only TVM kernel (backends/tvm/weight_only_kernels.py) against
a float64 numpy reference (dequantise, then matmul), on x86 AVX-512, x86 AVX2 and aarch64
(under qemu-user), at Gemma 3 270M's layer shapes for one decoding row; the AVX2 build also
on an emulated Haswell (no AVX-512).

Tolerance: every output within 1e-5 of sum_k |x_k| |w_nk| (float32 summation error over K
terms is far below that; a swapped nibble, a wrong group or tile is O(1) of it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

from dyadiq.backends.tvm import model_runner
from dyadiq.backends.tvm.aarch64 import locate_aarch64_runtime, run_under_qemu
from dyadiq.backends.tvm.weight_only_kernels import (
    KERNEL_SYMBOL,
    CpuTarget,
    Int4Shape,
    build_int4_matmul,
    cpu_target,
    int4_linear_module,
    kernel_weights,
    reference_matmul,
)
from dyadiq.errors import ConfigError

RTOL = 1e-5
# (K, N): q/k/v/o projections, MLP up/gate/down of Gemma 3 270M (hidden 640, 4 heads of
# 256, one KV head, MLP 2048)
GEMMA_SHAPES = [(640, 2048), (2048, 640), (640, 1024), (1024, 640), (640, 256)]


def _problem(
    rows: int, k: int, n: int, group: int, *, signed: bool = False, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = rng.integers(lo, hi, (n, k))
    scales = rng.uniform(1e-3, 3e-2, (n, k // group)).astype(np.float32)
    zeros = rng.integers(lo, hi, (n, k // group)) if not signed else np.zeros((n, k // group))
    x = rng.standard_normal((rows, k)).astype(np.float32)
    return x, codes, scales, zeros.astype(np.int32)


def _bound(
    x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int
) -> np.ndarray:
    w = np.abs(reference_matmul(np.eye(codes.shape[1]), codes, scales, zeros, group)).T
    return RTOL * (np.abs(x.astype(np.float64)) @ w.T) + 1e-7


def _run_host(kind: CpuTarget, shape: Int4Shape, arrays: tuple[np.ndarray, ...]) -> np.ndarray:
    x, codes, scales, zeros = arrays
    packed, tiled_scales, tiled_zeros = kernel_weights(codes, scales, zeros, shape)
    kernel = build_int4_matmul(shape, cpu_target(kind))[KERNEL_SYMBOL]
    y = tvm.runtime.tensor(np.zeros((shape.rows, shape.n), np.float32))
    args = [tvm.runtime.tensor(a) for a in (x, packed, tiled_scales, tiled_zeros)]
    kernel(*args, y)
    return y.numpy()


def _host_kinds() -> list[CpuTarget]:
    kinds = [CpuTarget.X86_AVX2]
    if "avx512f" in model_runner.cpu_flags():
        kinds.append(CpuTarget.X86_AVX512)
    return kinds


@pytest.mark.parametrize(("k", "n"), GEMMA_SHAPES)
def test_gemv_matches_reference_at_gemma_shapes(k: int, n: int) -> None:
    shape = Int4Shape.of(1, k, n, 128)
    arrays = _problem(1, k, n, 128, seed=k + n)
    expected = reference_matmul(*arrays, group=128)
    bound = _bound(*arrays, group=128)
    for kind in _host_kinds():
        got = _run_host(kind, shape, arrays)
        assert np.all(np.abs(got - expected) <= bound), (kind, np.max(np.abs(got - expected)))


def test_gemm_rows_signed_codes_and_small_groups() -> None:
    shape = Int4Shape.of(3, 128, 48, 32)  # tile 16: 48 is no multiple of 32
    assert shape.tile == 16
    arrays = _problem(3, 128, 48, 32, signed=True, seed=1)
    expected = reference_matmul(*arrays, group=32)
    for kind in _host_kinds():
        got = _run_host(kind, shape, arrays)
        assert np.all(np.abs(got - expected) <= _bound(*arrays, group=32)), kind


def test_nibble_order_and_group_boundaries() -> None:
    """One input at a time: each output must be exactly s (q - z) of that input's weight,
    so a swapped nibble, a shifted group or a misplaced tile column shows."""
    k, n, group = 64, 32, 32
    shape = Int4Shape.of(k, k, n, group)
    _, codes, scales, zeros = _problem(1, k, n, group, seed=2)
    eye = np.eye(k, dtype=np.float32)
    expected = reference_matmul(eye, codes, scales, zeros, group)
    got = _run_host(CpuTarget.X86_AVX2, shape, (eye, codes, scales, zeros))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_vector_width_per_target() -> None:
    """AVX2 code uses no AVX-512 registers (it must run on a Haswell); AVX-512 code does."""
    shape = Int4Shape.of(1, 256, 256, 128)
    avx2 = build_int4_matmul(shape, cpu_target(CpuTarget.X86_AVX2)).mod.inspect_source("asm")
    avx512 = build_int4_matmul(shape, cpu_target(CpuTarget.X86_AVX512)).mod.inspect_source("asm")
    assert "zmm" not in avx2 and "vfmadd" in avx2 and "ymm" in avx2
    assert "zmm" in avx512 and "vfmadd" in avx512


def test_bad_shapes_list_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        Int4Shape.of(0, 100, 12, 64)
    message = str(err.value)
    assert "rows" in message and "multiple of the group" in message and "N (12)" in message
    shape = Int4Shape.of(1, 64, 16, 32)
    with pytest.raises(ConfigError, match=r"0\.\.15"):
        kernel_weights(np.full((16, 64), 16), np.ones((16, 2)), np.zeros((16, 2)), shape)


def test_aarch64_kernel_under_qemu(tmp_path: Path) -> None:
    locate_aarch64_runtime()  # fails with the setup command when missing
    k, n, group = 640, 256, 128
    shape = Int4Shape.of(1, k, n, group)
    arrays = _problem(1, k, n, group, seed=3)
    packed, scales, zeros = kernel_weights(*arrays[1:], shape)
    executable = tvm.compile(int4_linear_module(shape), target=cpu_target(CpuTarget.AARCH64))
    library = tmp_path / "int4.so"
    executable.export_library(
        str(library), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-gcc")
    )
    (got,) = run_under_qemu(
        library, {"x": arrays[0], "packed": packed, "scales": scales, "zeros": zeros}
    )
    expected = reference_matmul(*arrays, group=group)
    assert np.all(np.abs(got - expected) <= _bound(*arrays, group=group))


def test_avx2_kernel_on_an_emulated_haswell(tmp_path: Path) -> None:
    """The x86-64-v3 build runs on a CPU without AVX-512 (``qemu-x86_64 -cpu Haswell``)
    through the runner every x86 target folder ships, and matches the reference there."""
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing: run scripts/setup.sh dev (Debian package qemu-user)"
    k, n, group = 640, 256, 128
    shape = Int4Shape.of(1, k, n, group)
    arrays = _problem(1, k, n, group, seed=4)
    packed, scales, zeros = kernel_weights(*arrays[1:], shape)
    feeds = {"x": arrays[0], "packed": packed, "scales": scales, "zeros": zeros}
    executable = tvm.compile(int4_linear_module(shape), target=cpu_target(CpuTarget.X86_AVX2))
    executable.export_library(str(tmp_path / "model.so"))
    info = {
        "library": "model.so",
        "inputs": [
            {"name": name, "shape": list(a.shape), "dtype": str(a.dtype)}
            for name, a in feeds.items()
        ],
        "outputs": [{"name": "y"}],
    }
    (tmp_path / "model.json").write_text(json.dumps(info))
    shutil.copyfile(model_runner.__file__, tmp_path / "run_model.py")
    np.savez(tmp_path / "in.npz", **feeds)
    runner, inputs, outputs = (str(tmp_path / f) for f in ("run_model.py", "in.npz", "out.npz"))
    proc = subprocess.run(
        [qemu, "-cpu", "Haswell", sys.executable, runner, inputs, outputs],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as stored:
        got = stored["y"]
    expected = reference_matmul(*arrays, group=group)
    assert np.all(np.abs(got - expected) <= _bound(*arrays, group=group))
