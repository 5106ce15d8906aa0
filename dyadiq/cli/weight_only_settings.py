"""The weight-only (GPTQ / round to nearest) settings flags, declared once.

Each flag maps to one field of
:class:`~dyadiq.passes.weight_only.quantize.WeightOnlySettings`. A caller names the fields it
exposes (``dyadiq quantize --weight-only`` and the language-model benchmarks expose different
subsets: a benchmark whose pipeline ignores a field must not offer its flag), adds their flags
with :func:`add_settings_arguments` and builds the settings with :func:`settings_from_args`
from the same names. A flag's default is the settings field's default unless the caller passes
its own, so the flags cannot drift from the dataclass.

The flag modules stay importable without the quantization passes (``dyadiq --help`` loads no
GPTQ code): the passes are imported when a parser is built or settings are made.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dyadiq.errors import ConfigError

if TYPE_CHECKING:
    from dyadiq.passes.weight_only.quantize import WeightOnlySettings

# --salient-fraction when left unset (None), for GPTQ (round to nearest has no input statistics
# to choose channels by). None: on Gemma 3 270M (GPTQ int4 g128, exported files) 0.5% / 1% / 2%
# scored within noise of no salient channels for 0.08-0.21 more bits per weight
# (benchmarks/results/llm_salient.md)
DEFAULT_SALIENT_FRACTION = 0.0


@dataclass(frozen=True)
class _Flag:
    """How one settings field appears on a command line."""

    name: str  # the flag, e.g. --group-size
    help: str  # ``%(default)s`` is argparse's
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # the field's value from the parsed one (an enum from its name; ``--no-...`` inverts)
    value: Callable[[Any], Any] = lambda parsed: parsed

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def switch(self) -> bool:
        """A store_true flag: off unless given, so a caller cannot move its default."""
        return self.options.get("action") == "store_true"


def _flags() -> dict[str, _Flag]:
    """Field name -> its flag, in the order ``dyadiq quantize --help`` lists them."""
    from dyadiq.passes.weight_only.groupwise import GROUP_SIZES, ClipObjective
    from dyadiq.passes.weight_only.quantize import Method

    return {
        "group_size": _Flag(
            "--group-size",
            "weights per scale along the input dimension (default %(default)s)",
            {"type": int, "choices": GROUP_SIZES},
        ),
        "method": _Flag(
            "--wo-method",
            "gptq (act order, on calibration Hessians) or rtn (default %(default)s)",
            {"choices": [str(m) for m in Method]},
            Method,
        ),
        "symmetric": _Flag(
            "--symmetric",
            "signed codes without zero points (default: asymmetric, with zero points)",
            {"action": "store_true"},
        ),
        "act_order": _Flag(
            "--no-act-order",
            "GPTQ in natural column order",
            {"action": "store_true"},
            lambda off: not off,
        ),
        "damp": _Flag(
            "--damp",
            "GPTQ dampening (x mean diag H) of every weight but a tied embedding / LM head "
            "(default %(default)s)",
            {"type": float},
        ),
        "tied_damp": _Flag(
            "--tied-damp",
            "GPTQ dampening (x mean diag H) of a tied embedding / LM head, whose rows are "
            "also looked up as embeddings (other weights: "
            f"{_field_defaults()['damp']}; default %(default)s)",
            {"type": float},
        ),
        "clip_search": _Flag(
            "--no-clip-search",
            "min-max group ranges, without the per-group range shrink",
            {"action": "store_true"},
            lambda off: not off,
        ),
        "clip_objective": _Flag(
            "--clip-objective",
            "what the per-group range search minimises: the weights' own squared error, or "
            "(GPTQ) the group's output error on the input Hessian (default %(default)s)",
            {"choices": [str(o) for o in ClipObjective]},
            ClipObjective,
        ),
        "sequential": _Flag(
            "--sequential",
            "GPTQ on the Hessians of the already-quantized prefix (one calibration pass per "
            "4 MatMul inputs, i.e. per transformer block) instead of the float model's",
            {"action": "store_true"},
        ),
        "salient_fraction": _Flag(
            "--salient-fraction",
            "GPTQ: this fraction of each weight's input channels (largest E[x^2] on the "
            "calibration text) swept last and stored at 8 bits beside the group-wise codes, "
            "exported as a small side MatMul (PB-LLM / PTQ1.61; default %(default)s, 0 = none)",
            {"type": float},
        ),
        # off by default: on Gemma 3 270M (g128, llm.md) AWQ before GPTQ scored 49.16 vs 48.44
        # at int4 (paired 1.015 [0.981, 1.051]) and 88.45 vs 83.89 at int3; before round to
        # nearest it helps (71.93 vs 84.98, paired 0.846 [0.793, 0.901])
        "awq": _Flag(
            "--awq",
            "activation-aware input scaling (AWQ): per input channel s = sqrt(E[x^2])^alpha, "
            "alpha searched per shared input, weights stored as Q(W diag(s)), inputs divided "
            "by s (folded into a norm's weight where possible); not with --target, "
            "--sequential or --salient-fraction",
            {"action": "store_true"},
        ),
    }


def _field_defaults() -> dict[str, Any]:
    from dyadiq.passes.weight_only.quantize import WeightOnlySettings

    return {f.name: f.default for f in dataclasses.fields(WeightOnlySettings)}


def add_settings_arguments(
    parser: argparse._ActionsContainer,
    fields: Sequence[str],
    *,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """The flags of the settings ``fields`` (in the order given), each defaulting to the
    field's default or to ``defaults[field]`` (the value as the flag parses it: a method or
    clip objective by its name). ``salient_fraction`` may default to None: the method's
    default (:data:`DEFAULT_SALIENT_FRACTION` for GPTQ, none for round to nearest)."""
    flags = _flags()
    unknown = sorted(set(fields) - set(flags))
    if unknown:
        raise ValueError(f"no weight-only settings flag for {unknown}")
    given = dict(defaults or {})
    for name in given:
        if name not in fields or flags[name].switch:
            raise ValueError(f"no default to set for the settings field {name!r}")
    field_defaults = _field_defaults()
    for name in fields:
        flag = flags[name]
        options = dict(flag.options)
        if not flag.switch:
            default = given.get(name, field_defaults[name])
            # enums as the names the command line takes, as argparse prints them
            options["default"] = str(default) if isinstance(default, str) else default
        text = flag.help
        if name == "salient_fraction" and options.get("default", 0.0) is None:
            text = text.replace("%(default)s", f"{DEFAULT_SALIENT_FRACTION} with gptq")
        parser.add_argument(flag.name, help=text, **options)


def settings_from_args(
    args: argparse.Namespace, fields: Sequence[str], **fixed: Any
) -> WeightOnlySettings:
    """The settings of ``fields``' flags as parsed into ``args`` (a flag ``args`` lacks keeps
    the field's default), with ``fixed`` fields set by the caller rather than a flag."""
    from dyadiq.passes.weight_only.quantize import Method, WeightOnlySettings

    flags = _flags()
    clash = sorted(set(fields) & set(fixed))
    if clash:
        raise ValueError(f"settings fields both from flags and fixed: {clash}")
    values: dict[str, Any] = {}
    for name in fields:
        flag = flags[name]
        if hasattr(args, flag.dest):
            values[name] = flag.value(getattr(args, flag.dest))
    values.update(fixed)
    if "salient_fraction" in values and values["salient_fraction"] is None:
        gptq = values.get("method", _field_defaults()["method"]) is Method.GPTQ
        values["salient_fraction"] = DEFAULT_SALIENT_FRACTION if gptq else 0.0
    return WeightOnlySettings(**values)


def parse_widths(text: str, flag: str = "--wbits-candidates") -> tuple[int, ...]:
    """Comma-separated widths, sorted and without repeats (a ConfigError names ``flag``)."""
    try:
        return tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError as exc:
        raise ConfigError(f"{flag} wants widths like 2,3,4,8, got {text!r}") from exc
