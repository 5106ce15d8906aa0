"""What ``--compensate`` asks for: which passes, and the few knobs they have."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from dyadiq.errors import ConfigError


class CompensationPass(enum.Enum):
    RANGE = "range"  # per-channel clipping-scale search on the layer output error
    GPTQ = "gptq"  # OBQ column by column on the layer Hessian
    REFINE = "refine"  # coordinate descent on the codes, same objective (after GPTQ)
    # learned rounding (AdaRound) on the same objective, after GPTQ/refine; not in ``all``
    ADAROUND = "adaround"
    BIAS = "bias"  # empirical bias correction
    CLE = "cle"  # cross-layer equalisation (a float rewrite before everything else)


@dataclass(frozen=True)
class CompensationSettings:
    passes: frozenset[CompensationPass] = frozenset()
    samples: int = 32  # calibration batches whose layer inputs feed H and E[x]
    damp: float = 0.01  # GPTQ dampening, relative to mean(diag H)
    act_order: bool = True
    block: int = 128  # GPTQ lazy-update block (columns)
    range_grid: int = 16  # clipping candidates alpha in [range_lowest, 1]
    range_lowest: float = 0.35
    gptq_clip_ratios: tuple[float, ...] = (1.0, 0.9, 0.8)  # with range: GPTQ also tries these
    refine_sweeps: int = 8  # rounding refinement: at most this many passes over the columns
    adaround_iterations: int = 300  # learned rounding: Adam steps per layer

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError("compensation needs at least one calibration batch")
        if (
            not 0 <= self.damp < 1
            or self.block < 1
            or self.range_grid < 1
            or self.refine_sweeps < 1
            or self.adaround_iterations < 1
        ):
            raise ConfigError(f"invalid compensation settings {self}")
        if not 0 < self.range_lowest <= 1:
            raise ConfigError("range_lowest must lie in (0, 1]")

    @property
    def enabled(self) -> bool:
        return bool(self.passes)

    def uses(self, which: CompensationPass) -> bool:
        return which in self.passes

    @property
    def label(self) -> str:
        if not self.passes:
            return "none"
        order = [p.value for p in CompensationPass if p in self.passes]
        return ",".join(order)

    def to_json(self) -> dict[str, Any]:
        return {
            "passes": self.label,
            "samples": self.samples,
            "damp": self.damp,
            "act_order": self.act_order,
            "block": self.block,
            "range_grid": self.range_grid,
            "range_lowest": self.range_lowest,
            "gptq_clip_ratios": list(self.gptq_clip_ratios),
            "refine_sweeps": self.refine_sweeps,
            # only with the pass: the settings of every other run keep their cache keys
            **(
                {"adaround_iterations": self.adaround_iterations}
                if self.uses(CompensationPass.ADAROUND)
                else {}
            ),
        }

    @classmethod
    def parse(cls, text: str, **knobs: Any) -> CompensationSettings:
        """``none``, ``all`` or a comma list of range, gptq, refine, bias, cle."""
        words = [w.strip().lower() for w in text.split(",") if w.strip()]
        if words == ["none"]:
            return cls(frozenset(), **knobs)
        if words == ["all"]:  # every pass but learned rounding (opt-in, slow, unmeasured)
            return cls(frozenset(CompensationPass) - {CompensationPass.ADAROUND}, **knobs)
        try:
            chosen = frozenset(CompensationPass(w) for w in words)
        except ValueError as exc:
            names = ", ".join(p.value for p in CompensationPass)
            raise ConfigError(
                f"--compensate wants none, all or a comma list of {names}; got {text!r}"
            ) from exc
        if not chosen:
            raise ConfigError("--compensate is empty")
        return cls(chosen, **knobs)


# What the benchmark (benchmarks/results/compensation.md) measured best; see that file.
DEFAULT_COMPENSATION = "range,gptq,bias"
