"""Typed errors that dyadiq raises for problems a user can fix.

Every user-facing failure is one of these subclasses, with a message that says what is wrong and
what to do. The CLI prints the message and exits with a non-zero status instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


def listed(heading: str, problems: Sequence[str]) -> str:
    """One message for every problem found: the problem itself when there is one, else
    ``heading`` and a bulleted list, so a user fixes them all in one go instead of one per run."""
    if len(problems) == 1:
        return problems[0]
    return "\n  - ".join([heading, *problems])


class DyadiqError(Exception):
    """Base class of every error dyadiq raises on bad input."""


class ModelLoadError(DyadiqError):
    """The model file cannot be read, parsed or validated."""


class UnsupportedModelError(DyadiqError):
    """The model parses but uses ops or features dyadiq does not handle (all listed at once)."""


class CalibrationDataError(DyadiqError):
    """Calibration data is missing, empty, mismatched with the model inputs, or not finite."""


class OutputPathError(DyadiqError):
    """The output location would overwrite the input or cannot be written."""


class ZooError(DyadiqError):
    """A zoo model or its data cannot be materialised on this machine."""


class ConfigError(DyadiqError):
    """An option or plan is invalid."""


class VerificationError(DyadiqError):
    """What was written does not compute what the reference interpreter computes (bit for bit).

    The output folder is complete, for inspection; the CLI exits 3 unless --allow-mismatch."""


class RequantizationError(UnsupportedModelError, ValueError):
    """A rescale has no dyadic (int32 m / 2^k) form: a scale ratio that is not finite, is
    negative, or exceeds 2^31 - weights or activations of wildly different magnitudes.

    Also a ValueError, which callers of :func:`dyadiq.dyadic.dyadic` have always caught."""


class InternalError(Exception):
    """A bug in dyadiq, not a problem with the user's input: an invariant dyadiq itself should
    have kept is broken (a model it wrote fails onnx.checker, an op no consumer knows).

    Deliberately outside the :class:`DyadiqError` hierarchy, so that nothing that catches user
    errors swallows it; the CLI reports it as a bug with the traceback's last frame."""
