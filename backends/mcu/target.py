"""The Cortex-M targets: one per CPU, each with the compiler flags, memory map and QEMU board
of its preset (:class:`CpuPreset`).

``emit`` writes the C project (:func:`~dyadiq.backends.mcu.emit_c.emit_c_project`), the memory
plan the allocator's ``ram=`` budget reads back (``--memory-plan``), and builds the ELFs when the
Arm toolchain is installed; ``run`` runs ``app.elf`` on the CPU's QEMU board.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dyadiq import integer_program as ip
from dyadiq.backends import target as base
from dyadiq.backends.capabilities import MCU_C
from dyadiq.errors import ConfigError, UnsupportedModelError
from dyadiq.io import write_text_atomic

if TYPE_CHECKING:
    from .emit_c import McuProject

MEMORY_PLAN_NAME = "memory_plan.json"  # what --memory-plan reads


@dataclass(frozen=True)
class CpuPreset:
    name: str
    flags: tuple[str, ...]
    qemu_machine: str | None
    flash: tuple[int, int]  # origin, length of the code/rodata memory
    ram: tuple[int, int]


@dataclass(frozen=True)
class McuArtifact(base.Artifact):
    """The C project in ``path``; ``elf`` once built (else ``not_built`` says why).
    ``input_name``: the program's float input, which the device quantizes itself."""

    project: McuProject
    input_name: str
    elf: Path | None = None
    not_built: str | None = None


@dataclass(frozen=True)
class McuTarget(base.Target[McuArtifact]):
    board: CpuPreset

    def unsupported_ops(self, program: ip.IntegerProgram) -> list[str]:
        from .emit_c import unsupported_ops

        return unsupported_ops(program)

    def emit(
        self, program: ip.IntegerProgram, out_dir: Path, options: base.EmitOptions
    ) -> McuArtifact:
        from .build import build_if_toolchain
        from .costs import allocator_memory_plan, program_weight_flash_bytes
        from .emit_c import emit_c_project
        from .float_c import island_report, with_float_shapes

        program = with_float_shapes(program)  # the arena plans float island tensors too
        weights, flash = program_weight_flash_bytes(program), self.board.flash[1]
        if weights > flash:  # refused now, not after writing and compiling megabytes of C
            raise UnsupportedModelError(
                f"does not fit: the weights alone take {weights} bytes > {flash} bytes of "
                f"flash on {self.name} ({weights / 1024:.0f} KB > {flash / 1024:.0f} KB)"
            )
        project = emit_c_project(program, out_dir, cpu=self.name)
        memory_plan = out_dir / MEMORY_PLAN_NAME
        plan = allocator_memory_plan(program)
        write_text_atomic(memory_plan, json.dumps(plan, indent=2) + "\n")
        report: dict[str, Any] = {
            "sources": str(out_dir),
            "arena_bytes": project.arena.peak_bytes,
            "weights_stored_as": "int4 packed two per byte, wider codes one per byte",
            "memory_plan": str(memory_plan),  # feed back with --memory-plan (--budget ram=)
        }
        report.update(island_report(program, [o.name for o in project.outputs]))
        input_name = ",".join(program.inputs)  # several raw integer inputs: one buffer
        built, why_not = build_if_toolchain(project)
        if built is None:
            report["built"] = f"not built: {why_not}"
            return McuArtifact(self.name, out_dir, report, project, input_name, None, why_not)
        size = built.model_size
        report["elf"] = str(built.app_elf)
        report["flash_bytes"] = size.flash
        report["static_ram_bytes"] = size.static_ram
        report["stack_bytes_estimate"] = built.stack_bytes
        return McuArtifact(self.name, out_dir, report, project, input_name, built.app_elf)

    def run(self, artifact: McuArtifact, feeds: base.Feeds) -> base.TargetRun | base.CannotRun:
        from .build import ToolchainError, find_toolchain, run_qemu

        if artifact.elf is None:
            return base.CannotRun(f"not built: {artifact.not_built}")
        machine = self.board.qemu_machine
        if machine is None:
            return base.CannotRun(f"QEMU has no board for {self.name}")
        try:
            find_toolchain(need_qemu=True)
        except ToolchainError as exc:
            return base.CannotRun(str(exc))
        project = artifact.project
        names = artifact.input_name.split(",")
        inputs = np.stack(
            [
                np.concatenate([np.asarray(f[n], np.float32).reshape(-1) for n in names])
                for f in feeds
            ]
        )
        run = run_qemu(project, artifact.elf, inputs, count_instructions=True)
        decoded = project.decode_outputs(run.outputs)
        coded = [s.name for s in project.outputs if s.values is None]
        plain = [s.name for s in project.outputs if s.values is not None]  # a float island's
        outputs = [
            base.ProgramOutputs(
                base.flatten([decoded[name][i] for name in coded], np.int64),
                base.flatten([decoded[name][i] for name in plain], np.float32),
            )
            for i in range(len(feeds))
        ]
        measured = (
            {"instructions_per_inference": int(np.median(run.instructions))}
            if run.instructions
            else {}
        )
        return base.TargetRun(outputs, f"qemu-system-arm -M {machine}", measured)


_MPS2_FLASH = (0x00000000, 4 * 1024 * 1024)
_MPS2_RAM = (0x20000000, 4 * 1024 * 1024)
MCU_TARGETS: tuple[McuTarget, ...] = tuple(
    McuTarget(preset.name, MCU_C, preset)
    for preset in (
        CpuPreset(
            "cortex-m3", ("-mcpu=cortex-m3", "-mthumb", "-mfloat-abi=soft"), "mps2-an385",
            _MPS2_FLASH, _MPS2_RAM,
        ),
        CpuPreset(
            "cortex-m4",
            ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
            "mps2-an386", _MPS2_FLASH, _MPS2_RAM,
        ),
        CpuPreset(
            "cortex-m7",
            ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16"),
            "mps2-an500", _MPS2_FLASH, _MPS2_RAM,
        ),
        CpuPreset(
            "cortex-m55", ("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"), "mps3-an547",
            (0x00000000, 512 * 1024), (0x21000000, 2 * 1024 * 1024),
        ),
    )
)  # fmt: skip
_BY_NAME = {t.name: t for t in MCU_TARGETS}


def mcu_target(cpu: str) -> McuTarget:
    """``cortex-m4`` or ``m4`` (likewise m3, m7, m55)."""
    name = cpu.lower()
    name = name if name.startswith("cortex-") else f"cortex-{name}"
    if name not in _BY_NAME:
        raise ConfigError(f"unknown CPU {cpu!r}; choose one of {sorted(_BY_NAME)}")
    return _BY_NAME[name]
