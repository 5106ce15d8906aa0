"""A model whose weights cannot fit in a Cortex-M board's flash is refused with the sizes before
any C is written (the coverage matrix's VGG19-class models: gcc on a 140 MB array literal would
run for hours to reach the linker's "region FLASH overflowed")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dyadiq import integer_program as ip
from dyadiq.backends.mcu.costs import program_weight_flash_bytes
from dyadiq.backends.mcu.emit_c import emit_c_project
from dyadiq.backends.mcu.target import mcu_target
from dyadiq.backends.target import EmitOptions
from dyadiq.dyadic import dyadic
from dyadiq.errors import UnsupportedModelError
from dyadiq.quantizers import ActQuant
from tests.test_mcu_backend import needs_toolchain, synthetic_program


def _one_matmul(k: int, n: int, bits: int = 8) -> ip.IntegerProgram:
    """x [1, k] -> MatMul with a constant [k, n] weight: flash is all in that weight."""
    quant = {"x_q": ActQuant(2.0**-4, 0, 8, True), "y_q": ActQuant(0.05, 0, 8, True)}
    mult, shift = dyadic(np.full(n, 1e-3))
    weight = np.ones((k, n), np.int8)
    matmul = ip.MatMul(
        "y_q", "x_q", 0, ip.Requant(mult, shift, 0, -128, 127, -1), weight=weight,
        bias=np.zeros(n, np.int32), weight_bits=bits,
    )  # fmt: skip
    return ip.IntegerProgram(
        [ip.QuantizeInput("x_q", "x"), matmul],
        quant,
        {"x": (1, k), "x_q": (1, k), "y_q": (1, n)},
        {"x": (np.dtype(np.float32), (1, k))},
        ["y_q"],
    )


def test_weight_flash_from_the_program_equals_what_the_emitter_stores(tmp_path):
    """Convs of 3, 4 and 8 bits (packed and not, odd rows), grouped, with and without bias,
    and an int4 MatMul: the count before emitting is the emitted project's, byte for byte."""
    program = synthetic_program()
    project = emit_c_project(program, tmp_path / "p")
    assert program_weight_flash_bytes(program) == project.weight_flash_bytes > 0
    single = _one_matmul(10, 3, bits=4)
    assert program_weight_flash_bytes(single) == 3 * 5 + 3 * 4 + 3 * 5


def test_weights_larger_than_flash_are_refused_before_writing_c(tmp_path):
    target = mcu_target("m55")  # 512 KiB of flash
    program = _one_matmul(1024, 600)  # 614400 weight bytes + 600 x 9 per channel
    need = 1024 * 600 + 600 * 9
    with pytest.raises(UnsupportedModelError) as refusal:
        target.emit(program, tmp_path / "m55", EmitOptions())
    assert str(refusal.value) == (
        f"does not fit: the weights alone take {need} bytes > {512 * 1024} bytes of flash on "
        f"cortex-m55 ({need / 1024:.0f} KB > 512 KB)"
    )
    assert not (tmp_path / "m55" / "model.c").exists()


def test_a_ram_overflow_is_refused_with_the_sizes_too():
    """A detector's 320x320 activations can overflow the arena's RAM while its weights fit:
    the linker's RAM overflow is a refusal with the sizes, like flash, not a failed build."""
    from dyadiq.backends.mcu.build import _does_not_fit, cpu_preset

    preset = cpu_preset("m4")
    ram = "ld: region `RAM' overflowed by 300 bytes\nld: region `RAM' overflowed by 500 bytes"
    assert str(_does_not_fit(ram, preset)) == (
        f"does not fit: {4 * 2**20 + 500} bytes > {4 * 2**20} bytes of RAM on cortex-m4"
    )
    both = "ld: region `FLASH' overflowed by 8 bytes\n" + ram
    assert str(_does_not_fit(both, preset)) == (
        f"does not fit: {4 * 2**20 + 8} bytes > {4 * 2**20} bytes of flash and "
        f"{4 * 2**20 + 500} bytes > {4 * 2**20} bytes of RAM on cortex-m4"
    )


@needs_toolchain
def test_zero_filled_sections_load_in_ram_not_after_the_flash_image(tmp_path: Path) -> None:
    """YOLOv8n at 320 (3.1 MB of weights, a 2 MB arena) locked up QEMU at reset: .bss and the
    stack were loaded after .data's copy in flash, and their zeros ran past its end. Every
    segment that the loader zero-fills must sit in RAM, and each segment in its region."""
    import subprocess

    from dyadiq.backends.mcu.build import build, cpu_preset

    project = emit_c_project(synthetic_program(), tmp_path / "m4")
    elf = build(project).app_elf
    headers = subprocess.run(
        ["arm-none-eabi-readelf", "-lW", str(elf)], capture_output=True, text=True, check=True
    ).stdout
    preset = cpu_preset("m4")
    loads = [line.split() for line in headers.splitlines() if line.strip().startswith("LOAD")]
    assert len(loads) >= 2
    for _, _, _, paddr, filesz, memsz, *_ in loads:
        start, size, stored = int(paddr, 16), int(memsz, 16), int(filesz, 16)
        flash_end = preset.flash[0] + preset.flash[1]
        if start < flash_end:  # in flash: only what the file holds, nothing zero-filled
            assert size == stored and start + size <= flash_end
        else:
            assert preset.ram[0] <= start and start + size <= preset.ram[0] + preset.ram[1]
