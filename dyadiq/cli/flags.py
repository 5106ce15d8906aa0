"""Flags and flag readers that several subcommands share."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dyadiq.errors import ConfigError

CALIBRATORS = ["auto", "percentile", "minmax", "mse", "entropy"]


def parse_shapes(values: Sequence[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in values:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError as exc:
            raise ConfigError(f"--input-shape wants NAME=1x3x224x224, got {item!r}") from exc
    return shapes


def add_compensate(p: argparse.ArgumentParser) -> None:
    from dyadiq.passes.compensation.settings import DEFAULT_COMPENSATION

    p.add_argument(
        "--compensate",
        default=DEFAULT_COMPENSATION,
        metavar="none|all|range,gptq,bias,cle",
        help="weight-rounding compensation passes, per width (default: %(default)s, the best "
        "in benchmarks/results/compensation.md); the analysis prices the compensated weights",
    )


def add_runtime_kernels(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime-kernels",
        action="store_true",
        help="also score each model with onnxruntime's fused kernels on this CPU (scores are "
        "exact simulations otherwise, the same on every CPU)",
    )


def fill_missing_help(p: argparse.ArgumentParser, helps: dict[str, str]) -> None:
    """Give each option in ``helps`` its text where the code that declared it gave none."""
    for action in p._actions:
        for flag in action.option_strings:
            if flag in helps and not action.help:
                action.help = helps[flag]
