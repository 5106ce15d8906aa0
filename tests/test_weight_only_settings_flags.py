"""dyadiq/cli/weight_only_settings.py: one declaration of the weight-only settings flags, read
back into WeightOnlySettings by the CLI and the language-model benchmarks (no model)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from dyadiq.cli import weight_only
from dyadiq.cli.weight_only_settings import (
    DEFAULT_SALIENT_FRACTION,
    add_settings_arguments,
    parse_widths,
    settings_from_args,
)
from dyadiq.errors import ConfigError
from dyadiq.passes.weight_only.groupwise import ClipObjective
from dyadiq.passes.weight_only.quantize import Method, WeightOnlySettings

ALL = (
    "group_size",
    "method",
    "symmetric",
    "act_order",
    "damp",
    "tied_damp",
    "clip_search",
    "clip_objective",
    "sequential",
    "salient_fraction",
    "awq",
)
# per field: the flags that move it off its default, and the value they give
OFF_DEFAULT: dict[str, tuple[list[str], Any]] = {
    "group_size": (["--group-size", "64"], 64),
    "method": (["--wo-method", "rtn"], Method.RTN),
    "symmetric": (["--symmetric"], True),
    "act_order": (["--no-act-order"], False),
    "damp": (["--damp", "0.05"], 0.05),
    "tied_damp": (["--tied-damp", "0.1"], 0.1),
    "clip_search": (["--no-clip-search"], False),
    "clip_objective": (["--clip-objective", "weight"], ClipObjective.WEIGHT),
    "sequential": (["--sequential"], True),
    "salient_fraction": (["--salient-fraction", "0.01"], 0.01),
    "awq": (["--awq"], True),
}


def _parse(fields: Sequence[str], argv: list[str], **defaults: Any) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_settings_arguments(p, fields, defaults=defaults)
    return p.parse_args(argv)


def test_no_flags_give_the_settings_defaults() -> None:
    assert settings_from_args(_parse(ALL, []), ALL) == WeightOnlySettings()


@pytest.mark.parametrize("field", ALL)
def test_each_flag_sets_its_own_field_alone(field: str) -> None:
    argv, value = OFF_DEFAULT[field]
    got = settings_from_args(_parse(ALL, argv), ALL)
    assert getattr(got, field) == value != getattr(WeightOnlySettings(), field)
    assert dataclasses.replace(got, **{field: getattr(WeightOnlySettings(), field)}) == (
        WeightOnlySettings()
    )


def test_only_the_named_flags_are_declared_and_read() -> None:
    fields = ("group_size", "damp")
    with pytest.raises(SystemExit):
        _parse(fields, ["--sequential"])
    # a flag of a field not named is not read, even when the namespace holds its dest
    args = _parse(fields, ["--damp", "0.2"])
    args.sequential = True  # e.g. a benchmark's own switch of the same name
    assert settings_from_args(args, fields) == WeightOnlySettings(damp=0.2)


def test_fixed_fields_and_caller_defaults() -> None:
    args = _parse(("tied_damp", "clip_objective"), [], tied_damp=0.2, clip_objective="weight")
    assert args.clip_objective == "weight"  # as the command line spells it
    got = settings_from_args(args, ("tied_damp", "clip_objective"), method=Method.RTN)
    assert got == WeightOnlySettings(
        method=Method.RTN, tied_damp=0.2, clip_objective=ClipObjective.WEIGHT
    )
    with pytest.raises(ValueError, match="both from flags and fixed"):
        settings_from_args(args, ("tied_damp",), tied_damp=0.1)


def test_declaration_mistakes_are_caught() -> None:
    with pytest.raises(ValueError, match="no weight-only settings flag"):
        _parse(("block",), [])
    with pytest.raises(ValueError, match="no default to set"):
        _parse(("sequential",), [], sequential=True)  # a switch is off unless given
    with pytest.raises(ValueError, match="no default to set"):
        _parse(("damp",), [], tied_damp=0.1)  # a field whose flag is not added


def test_unset_salient_fraction_is_the_methods_default() -> None:
    fields = ("method", "salient_fraction")
    gptq = settings_from_args(_parse(fields, [], salient_fraction=None), fields)
    assert gptq.salient_fraction == DEFAULT_SALIENT_FRACTION
    # round to nearest has no statistics to choose channels by: none, whatever the default
    rtn = settings_from_args(_parse(fields, ["--wo-method", "rtn"], salient_fraction=None), fields)
    assert rtn.salient_fraction == 0.0
    with pytest.raises(ConfigError, match="use gptq"):
        settings_from_args(
            _parse(fields, ["--wo-method", "rtn", "--salient-fraction", "0.1"]), fields
        )


def test_settings_validation_still_applies() -> None:
    with pytest.raises(ConfigError, match="dampening"):
        settings_from_args(_parse(ALL, ["--damp", "2"]), ALL)
    with pytest.raises(SystemExit):  # the grid's group sizes are the flag's choices
        _parse(ALL, ["--group-size", "48"])


def test_the_cli_offers_its_flags_with_its_defaults() -> None:
    p = argparse.ArgumentParser()
    weight_only.add_shared_arguments(p)
    weight_only.add_weight_only_arguments(p)
    args = p.parse_args(["-o", "out", "--awq", "--wbits", "3", "--tied-damp", "0.2"])
    assert args.salient_fraction is None and args.wo_method == "gptq"
    got = settings_from_args(args, weight_only.SETTINGS_FLAGS, awq_bits=args.wbits)
    assert got == WeightOnlySettings(awq=True, awq_bits=3, tied_damp=0.2)
    for absent in ("--damp", "--no-clip-search", "--clip-objective"):
        with pytest.raises(SystemExit):
            p.parse_args(["-o", "out", absent])


def test_parse_widths() -> None:
    assert parse_widths("6,3,4,3") == (3, 4, 6)
    with pytest.raises(ConfigError, match="--widths wants widths"):
        parse_widths("3,x", "--widths")
