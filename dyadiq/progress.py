"""Progress for long steps (zoo installs, calibration, compensation, evaluation, allocation,
compilation, target checks), in one of three modes chosen once per process:

- ``RICH``: a live bar or spinner on an interactive stderr, erased when the step ends;
- ``LINES``: one plain line per stage on stderr (piped output, CI logs): what started and,
  for a loop, how many items it has when that is known; nothing per item, so logs stay short;
- ``QUIET``: nothing (``--quiet``, ``--json``, and library use until a caller asks).

The mode is ``AUTO`` until :func:`configure` is called: ``RICH`` on a terminal, else
``LINES``. Library callers (the Python API) see the same lines; a notebook user who wants none
calls ``dyadiq.progress.configure(Mode.QUIET)``. Progress goes to stderr so that stdout holds
only results (the summary, ``--json`` documents).
"""

from __future__ import annotations

import contextlib
import enum
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Mode(enum.Enum):
    """How progress is shown (see the module docstring)."""

    AUTO = "auto"  # RICH on a terminal, LINES otherwise
    RICH = "rich"
    LINES = "lines"
    QUIET = "quiet"


_mode = Mode.AUTO


def configure(mode: Mode) -> None:
    """Set how progress is shown for the rest of the process (the CLI calls it once)."""
    global _mode
    _mode = mode


def current_mode() -> Mode:
    """The effective mode: ``AUTO`` resolved against whether stderr is a terminal now."""
    if _mode is not Mode.AUTO:
        return _mode
    return Mode.RICH if sys.stderr.isatty() else Mode.LINES


def _line(text: str) -> None:
    # flush: a piped stderr is block-buffered, and a progress line that appears only when the
    # step is over says nothing
    print(text, file=sys.stderr, flush=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while showing progress: a bar with count, elapsed and remaining time
    (``total`` known) or a counting spinner on a terminal, one line ``description (N)`` when
    piped, nothing when quiet."""
    mode = current_mode()
    if mode is Mode.QUIET:
        yield from items
        return
    if mode is Mode.LINES:
        _line(f"{description} ({total})" if total is not None else f"{description} ...")
        yield from items
        return
    with _rich_task(description, total) as advance:
        for item in items:
            yield item
            advance()


@contextlib.contextmanager
def stage(description: str) -> Iterator[None]:
    """A step with no natural item count (an install, a compile, a solve): a spinner with the
    elapsed time on a terminal, one line ``description ...`` when piped, nothing when quiet.
    Stages and loops nest: an inner one is a second row under the outer one."""
    mode = current_mode()
    if mode is Mode.QUIET:
        yield
        return
    if mode is Mode.LINES:
        _line(f"{description} ...")
        yield
        return
    with _rich_task(description, None):
        yield


_live: Any = None  # the rich Progress on screen: rich allows one live display at a time


@contextlib.contextmanager
def _rich_task(description: str, total: int | None) -> Iterator[Callable[[], None]]:
    """A row on the live display (opened here when none is), removed when the step ends."""
    global _live
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column

    owner = _live is None
    if owner:
        # the description takes three quarters of the line and folds rather than being cut
        # ("quantizing model.onnx: calibration, weight compensation (range,gptq,b…")
        _live = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", table_column=Column(ratio=3, overflow="fold")),
            BarColumn(bar_width=None, table_column=Column(ratio=1)),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
            expand=True,
        )
        _live.start()
    progress = _live
    task = progress.add_task(description, total=total)
    try:
        yield lambda: progress.advance(task)
    finally:
        progress.remove_task(task)
        if owner:
            progress.stop()
            _live = None
