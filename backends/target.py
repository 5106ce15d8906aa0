"""What every deployment target is: a frozen object that says what it can run, writes its
artifact and runs it here when this machine can.

A :class:`Target` has a ``name`` (what ``--target`` takes), its backend's
:class:`~dyadiq.backends.capabilities.Capabilities`, and three methods:

- ``unsupported(program)``: every reason the program cannot run on it, all at once (empty when
  it can);
- ``emit(program, out_dir, options)``: writes the artifact (a TVM library, a C project) and
  returns it as an :class:`Artifact`, with what report.json's ``target`` section records;
- ``run(artifact, feeds)``: the artifact's outputs on batch-1 feeds (:class:`TargetRun`), or
  :class:`CannotRun` with the reason when this machine cannot run it (a CUDA build without a
  GPU, an x86 level this CPU lacks, no emulator).

Each backend declares its targets next to its code (:mod:`dyadiq.backends.tvm.target`,
:mod:`dyadiq.backends.mcu.target`); :data:`dyadiq.targets.TARGETS` is the one registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from dyadiq import integer_program as ip
from dyadiq.backends.capabilities import Capabilities

Feeds = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class EmitOptions:
    """How to build: TVM's MetaSchedule trials and tuning database (the C backend has no
    knobs). ``layer_latency_ids`` (the plan's layer ids, in program order), for a target that
    :attr:`~Target.measures_layer_latency`: also time every layer's kernel here per candidate
    format and write the allocation's latency table beside the artifact."""

    tune_trials: int = 0
    tuning_db: Path | None = None
    layer_latency_ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Artifact:
    """What :meth:`Target.emit` wrote. ``report``: the entries of report.json's ``target``
    section that describe the build (paths, sizes)."""

    target: str
    path: Path
    report: Mapping[str, Any]


@dataclass(frozen=True)
class ProgramOutputs:
    """One input's outputs as a target computed them, in the program's output order: the
    integer codes of every output that has them, flattened, and the float outputs of those
    that have none (a float island's), flattened."""

    codes: np.ndarray  # int64
    floats: np.ndarray  # float32


@dataclass(frozen=True)
class TargetRun:
    """The outputs of every feed; ``ran_on`` says how (None: natively, in this process);
    ``measurements``: what the run measured besides the outputs (instruction counts)."""

    outputs: list[ProgramOutputs]
    ran_on: str | None = None
    measurements: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CannotRun:
    """Why this machine cannot run an artifact; it was written all the same."""

    reason: str


def flatten(arrays: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    """``arrays`` raveled and concatenated as ``dtype`` (an empty vector for none)."""
    if not arrays:
        return np.zeros(0, dtype)
    return np.concatenate([np.asarray(a).ravel() for a in arrays]).astype(dtype, copy=False)


A = TypeVar("A", bound=Artifact)


@dataclass(frozen=True)
class Target(ABC, Generic[A]):
    name: str
    capabilities: Capabilities

    def unsupported(self, program: ip.IntegerProgram) -> list[str]:
        """Every reason ``program`` cannot run on this target: the backend's own op checks and
        weights wider or narrower than its capabilities allow."""
        problems = self.unsupported_ops(program)
        allowed = self.capabilities.weight_bits
        for op in program.ops:
            if not isinstance(op, ip.Conv | ip.MatMul) or op.weight is None:
                continue  # weights that are codes of another tensor take its width
            if op.weight_bits not in allowed:
                problems.append(
                    f"{type(op).__name__} {op.output}: {op.weight_bits}-bit weights "
                    f"({self.capabilities.name} runs {sorted(allowed)})"
                )
        return problems

    @abstractmethod
    def unsupported_ops(self, program: ip.IntegerProgram) -> list[str]:
        """The ops of ``program`` the backend has no code for, each with the reason."""

    @abstractmethod
    def emit(self, program: ip.IntegerProgram, out_dir: Path, options: EmitOptions) -> A:
        """Write the artifact into ``out_dir``."""

    @abstractmethod
    def run(self, artifact: A, feeds: Feeds) -> TargetRun | CannotRun:
        """The artifact's outputs on each batch-1 feed, or why it cannot run here."""

    @property
    def measures_layer_latency(self) -> bool:
        """Whether ``emit`` can time this target's layers here (where the code runs)."""
        return False
