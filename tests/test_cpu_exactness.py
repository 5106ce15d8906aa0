"""The same integers on every x86 CPU: dyadiq's integer ONNX forms on an emulated AVX2-only CPU.

``qemu-x86_64 -cpu Haswell`` (Debian's qemu-user, installed by ``scripts/setup.sh dev``) runs
this venv's Python on a CPU model with AVX2 and no AVX-512 or VNNI; onnxruntime picks its
kernels by CPUID, so it takes its AVX2 paths there even on a VNNI host. The first test shows
the emulation is real (the u8 x s8 form saturates under it); the others run dyadiq's own
integer pipeline tests on that CPU. QEMU's TCG cannot emulate AVX-512, so the reverse
(VNNI paths on an AVX2 host) is covered only when CI lands on a VNNI machine.

Only compensation-free quantization runs emulated: under Debian's QEMU 7.2 numpy's own AVX2
paths misbehave (``np.argsort`` segfaulted in GPTQ, and a compensated tiny CNN came out with
different weights than natively, while the uncompensated one matched to the last bit), which
says more about the emulator than about any CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-x86_64")
pytestmark = [
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 host only"),
]


def _on_haswell(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    assert QEMU, "qemu-x86_64 is missing: run scripts/setup.sh dev (Debian package qemu-user)"
    return subprocess.run(
        [QEMU, "-cpu", "Haswell", sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_integer_product_forms_on_emulated_avx2() -> None:
    proc = _on_haswell("tests/integer_kernel_probe.py", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    # The emulated CPU must really take onnxruntime's saturating AVX2 path, or this test
    # would prove nothing: 64 pairs of 255 x 127 summed in int16 pairs.
    saturated = results["u8 x s8 MatMulInteger exact"]
    assert not saturated["exact"] and saturated["got"] == 1_048_544, saturated
    for form, outcome in results.items():
        if not form.startswith("u8 x s8") and form != "QDQ MatMul runtime":
            assert outcome["exact"], (form, outcome)
    # a QDQ model scored as dyadiq scores it (exact simulation) is right on AVX2; with
    # onnxruntime's fused kernels the same file loses half its sum there
    assert not results["QDQ MatMul runtime"]["exact"], results["QDQ MatMul runtime"]


def test_integer_pipeline_bit_exact_on_emulated_avx2() -> None:
    """dyadiq's integer models (u8 and s8 activations, W2..W8, residuals, attention MatMuls)
    equal the reference interpreter bit for bit, and their QDQ simulations agree, on AVX2."""
    proc = _on_haswell(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_integerize.py", timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
