"""The TVM backend's deployment targets: x86-64 (this machine's ISA level, or a named level for
a fleet), aarch64 Linux and CUDA.

Each is a :class:`TvmTarget`. Declaring them imports no TVM: the registry is read when the
CLI parses its options, and TVM loads only when a target emits or runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq import integer_program as ip
from dyadiq.backends import target as base
from dyadiq.backends.capabilities import TVM_INTEGER
from dyadiq.errors import ConfigError


class Device(Enum):
    """Where a TVM library runs, which decides how it is built and run."""

    X86 = "x86"  # natively, in this process
    AARCH64 = "aarch64"  # cross-compiled; here only under qemu-aarch64
    CUDA = "cuda"  # where a GPU exists


# x86-64 builds target an ISA level, never the build machine's own -mcpu, so a library built
# here runs on every CPU of its level. Each level lists the /proc/cpuinfo flags it needs;
# run_model.py refuses, with a message, to load a library on a CPU that lacks one of them.
X86_V3_FLAGS = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe")
X86_ISA_LEVELS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    # AVX2 (Haswell, Zen 1 and later): default schedules, 256-bit vectors
    "x86-64-v3": ({"kind": "llvm", "mcpu": "x86-64-v3"}, X86_V3_FLAGS),
    # AVX-512 with VNNI (Cascade Lake, Ice Lake, Zen 4 and later): the vpdpbusd kernels
    "x86-64-v4-vnni": (
        {"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]},
        (*X86_V3_FLAGS, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"),
    ),
}


@dataclass(frozen=True)
class TvmArtifact(base.Artifact):
    """A built ``model.so`` (``path``; model.json and run_model.py beside it). ``coded``: per
    program output, whether ``main`` returns its codes (they come first, floats after)."""

    coded: tuple[bool, ...] = ()


@dataclass(frozen=True)
class TvmTarget(base.Target[TvmArtifact]):
    device: Device
    # x86: the ISA level built for (None: this machine's highest); others: the TVM target dict
    isa: str | None = None
    spec: Mapping[str, Any] = field(default_factory=dict)

    def isa_level(self) -> str | None:
        """The x86-64 ISA level a build for this target needs (None for non-x86 targets)."""
        if self.device is not Device.X86:
            return None
        if self.isa is not None:
            return self.isa
        from dyadiq.backends.tvm.build import host_x86_isa

        return host_x86_isa()

    def required_cpu_flags(self) -> list[str]:
        """The /proc/cpuinfo flags a CPU needs to run what this target builds."""
        level = self.isa_level()
        return list(X86_ISA_LEVELS[level][1]) if level else []

    def tvm_spec(self) -> dict[str, Any]:
        """The TVM target dict to build for (x86: its ISA level's, with this machine's cores)."""
        if self.device is Device.X86:
            from dyadiq.backends.tvm.build import x86_target

            return x86_target(self.isa)
        return dict(self.spec)

    def unsupported_ops(self, program: ip.IntegerProgram) -> list[str]:
        from dyadiq.backends.tvm.lower import unsupported_ops

        # float islands run on TVM's float kernels (lowered from their ONNX nodes)
        return unsupported_ops(program, float_islands=True)

    def emit(
        self, program: ip.IntegerProgram, out_dir: Path, options: base.EmitOptions
    ) -> TvmArtifact:
        from dyadiq.backends.tvm.build import build, target_for
        from dyadiq.backends.tvm.lower import lower_program
        from dyadiq.backends.tvm.tuning import schedule_module_with_report

        # the target picks the lowering: channels-last kernels on x86 CPUs with AVX2 or VNNI
        mod = lower_program(program, target=target_for(self.name), float_islands=True)
        sources: dict[str, str] = {}

        def schedule(prepared: Any, tvm_target: Any) -> Any:
            scheduled, report = schedule_module_with_report(
                prepared, tvm_target, database_dir=options.tuning_db, trials=options.tune_trials
            )
            sources.update(report.source)
            return scheduled

        on_cpu = self.device is not Device.CUDA
        library = build(
            mod, self.name, out_dir, program=program, schedule=schedule if on_cpu else None
        )
        report: dict[str, Any] = {
            "library": str(library),
            "weights_stored_as": "int8 containers",
        }
        if sources:
            counts: dict[str, int] = {}
            for source in sources.values():
                counts[source] = counts.get(source, 0) + 1
            report["kernels_by_schedule_source"] = counts
        if self.device is Device.X86:
            report["isa_level"] = self.isa_level()
        if options.layer_latency_ids is not None:
            if not self.measures_layer_latency:
                raise ConfigError(
                    f"per-layer latency is measured where the code runs: not {self.name}"
                )
            ids, db = options.layer_latency_ids, options.tuning_db
            report["layer_latency_table"] = str(
                self._write_layer_latency(program, out_dir, ids, db)
            )
        coded = tuple(o in program.int_outputs for o in program.outputs)
        return TvmArtifact(self.name, library, report, coded=coded)

    def cannot_run_here(self) -> str | None:
        """Why this machine cannot run this target's libraries (None: it can)."""
        if self.device is Device.X86:
            from dyadiq.backends.tvm.model_runner import missing_cpu_flags

            missing = missing_cpu_flags(self.required_cpu_flags())
            return f"this CPU lacks {', '.join(missing)}" if missing else None
        if self.device is Device.AARCH64:
            from dyadiq.backends.tvm.aarch64 import aarch64_runtime_available

            if aarch64_runtime_available():
                return None
            return "no aarch64 runtime here (bash scripts/setup_aarch64.sh)"
        import tvm

        return None if tvm.cuda().exist else "compiled only, no CUDA device on this machine"

    def run(self, artifact: TvmArtifact, feeds: base.Feeds) -> base.TargetRun | base.CannotRun:
        why_not = self.cannot_run_here()
        if why_not is not None:
            return base.CannotRun(why_not)
        if self.device is Device.AARCH64:
            from dyadiq.backends.tvm.aarch64 import run_many_under_qemu

            runs = run_many_under_qemu(artifact.path, list(feeds))
            outputs = [_program_outputs(artifact.coded, values) for values in runs]
            return base.TargetRun(outputs, ran_on="qemu-aarch64 (emulated; timings meaningless)")
        from dyadiq.backends.tvm.build import run_library

        outputs = [
            _program_outputs(artifact.coded, list(run_library(artifact.path, f).values()))
            for f in feeds
        ]
        return base.TargetRun(outputs)

    @property
    def measures_layer_latency(self) -> bool:
        return self.device is Device.X86

    def _write_layer_latency(
        self, program: ip.IntegerProgram, out_dir: Path, layer_ids: Sequence[str], db: Path | None
    ) -> Path:
        """Every layer's kernel timed here per candidate format: ``layer_latency.json``, the
        table ``--latency-table`` reads."""
        from dyadiq.backends.tvm.build import target_for
        from dyadiq.backends.tvm.layer_latency import measure_layer_latency
        from dyadiq.plan import LayerFormat

        formats = [LayerFormat(w, a) for w, a in LATENCY_TABLE_FORMATS]
        target = target_for(self.name)
        table = measure_layer_latency(
            program, formats, target, layer_ids=layer_ids, database_dir=db, repeat=10
        )
        path = out_dir / "layer_latency.json"
        table.save(path)
        return path


# weight widths x activation widths the allocation can choose from
LATENCY_TABLE_FORMATS = tuple((w, a) for a in (8, 4) for w in (8, 7, 6, 5, 4, 3, 2))


def _program_outputs(coded: Sequence[bool], values: Sequence[np.ndarray]) -> base.ProgramOutputs:
    """``main``'s results (the codes of coded outputs first, then every output as float) as
    the codes of coded outputs and the floats of those without codes."""
    n = sum(coded)
    floats = [v for is_coded, v in zip(coded, values[n:], strict=True) if not is_coded]
    return base.ProgramOutputs(base.flatten(values[:n], np.int64), base.flatten(floats, np.float32))


TVM_TARGETS: tuple[TvmTarget, ...] = (
    TvmTarget("x86", TVM_INTEGER, Device.X86),  # the highest level this machine runs
    *(TvmTarget(level, TVM_INTEGER, Device.X86, isa=level) for level in X86_ISA_LEVELS),
    TvmTarget(
        "aarch64",
        TVM_INTEGER,
        Device.AARCH64,
        spec={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
    ),
    TvmTarget("cuda", TVM_INTEGER, Device.CUDA, spec={"kind": "cuda", "arch": "sm_80"}),
)
_BY_NAME = {t.name: t for t in TVM_TARGETS}


def tvm_target(name: str) -> TvmTarget:
    """The TVM target called ``name``."""
    if name not in _BY_NAME:
        raise ConfigError(f"unknown TVM target {name!r}; choose one of {sorted(_BY_NAME)}")
    return _BY_NAME[name]
