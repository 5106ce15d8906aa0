"""``dyadiq`` command line: inspect, quantize, analyze, frontier, run, eval, zoo.

Every user-facing failure is a ``DyadiqError``; the CLI prints its message and exits 2, or 3
when a written model fails its bit-exactness check (``VerificationError``). Progress goes to
stderr (:mod:`dyadiq.progress`): live on a terminal, one line per stage when piped, none with
``--quiet`` or a command's ``--json``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import traceback
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from dyadiq.errors import DyadiqError, InternalError, VerificationError
from dyadiq.io import describe_os_error


def build_parser() -> argparse.ArgumentParser:
    """One subparser per subcommand, each declared next to its command (in help order)."""
    from dyadiq.cli.allocation import add_frontier
    from dyadiq.cli.analyze import add_analyze
    from dyadiq.cli.commands import add_eval, add_inspect, add_run, add_zoo
    from dyadiq.cli.quantize import add_quantize

    parser = argparse.ArgumentParser(prog="dyadiq", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step (INFO)")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress lines (results still print)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_inspect, add_quantize, add_run, add_analyze, add_frontier, add_eval, add_zoo):
        add(sub)
    return parser


DESCRIPTION = (
    "dyadiq: mixed-precision post-training quantization of ONNX models to QDQ and "
    "integer-only ONNX, TVM libraries and Cortex-M C."
)
EPILOG = (
    "Exit status: 0 done; 2 bad input or options (one error line); 3 a written model is not "
    "bit-exact against the reference (its folder is kept); 130 interrupted. Progress goes to "
    "stderr, one line per stage when piped; --quiet silences it."
)


def main(argv: Sequence[str] | None = None) -> int:
    from dyadiq import progress

    args = build_parser().parse_args(argv)
    # --json output is a document for another program: no progress around it either
    quiet = args.quiet or bool(getattr(args, "json", False))
    progress.configure(progress.Mode.QUIET if quiet else progress.Mode.AUTO)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except DyadiqError as exc:
        _print_error(f"{type(exc).__name__}: {exc}", exc)
        return 3 if isinstance(exc, VerificationError) else 2
    except InternalError as exc:
        # A bug, not a bad input: keep the traceback, which is what a bug report needs.
        traceback.print_exc()
        _print_error(f"internal error (a bug in dyadiq, please report it): {exc}", exc)
        return 70
    except KeyboardInterrupt as exc:
        _print_error("interrupted", exc)
        return 130
    except OSError as exc:
        if exc.errno not in FAULT_ERRNOS:
            raise
        _print_error(f"{type(exc).__name__}: {describe_os_error(exc)}", exc)
        return 2


# Faults of the machine, not of dyadiq: reported in one line like a bad input.
FAULT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG}
)


def _print_error(message: str, exc: BaseException) -> None:
    """One line (plus the message's own lines): what failed, and what became of the output."""
    notes = "; ".join(getattr(exc, "__notes__", []))
    text = f"{message}; {notes}" if notes else message
    # soft_wrap: no line breaks inserted at the terminal width, which would split the paths a
    # user copies out of the message (and at 80 columns when stderr is not a terminal)
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(text)}")
