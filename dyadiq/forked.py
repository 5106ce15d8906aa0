"""Run a function in a forked child so that a native crash or a hang cannot kill the caller.

Some native libraries dyadiq calls (onnxsim's C++ simplifier, onnxruntime) can die on a
hostile model with a signal (SIGFPE for a zero stride) instead of raising. :func:`run_forked`
forks, runs the function in the child with its stdout/stderr (file descriptors included, so
C++ prints are caught too) sent to a file, and hands back what happened as data: the returned
value, the exception's text, the signal that killed the child, or a timeout. Forking (not
spawning) keeps the already-imported modules, so a call costs milliseconds, not the seconds a
fresh interpreter needs to import onnxsim.

Fork only from a process that has not started native thread pools (an onnxruntime
session, Ray): a lock held by one of those threads stays held forever in the child, which
then hangs at random (CI saw it). No test of a process's threads tells a safe one from an
unsafe one (OpenBLAS starts idle threads at import), so the rule is structural: a process
declares itself a fork parent (:func:`declare_fork_parent`) when it is started for that
purpose, and :func:`run_forked` refuses anywhere else. The fuzz campaign process
(:mod:`dyadiq.fuzz.campaign_process`) is one; dyadiq's own load path, which runs after
sessions may exist, goes through :mod:`dyadiq.isolation_server` instead.
"""

from __future__ import annotations

import enum
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Ending(enum.Enum):
    RETURNED = "returned"
    RAISED = "raised"  # a Python exception: ``error`` holds its type and message
    SIGNALLED = "signalled"  # killed by a signal (a native crash): ``signal_name``
    EXITED = "exited"  # left through os._exit / sys.exit without a result: ``exit_code``
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class ForkedOutcome:
    ending: Ending
    value: Any = None
    error: str = ""  # "TypeName: message" for RAISED
    error_type: str = ""
    signal_name: str = ""
    exit_code: int = 0
    output: str = ""  # what the child printed (stdout and stderr together)
    seconds: float = 0.0


FORK_AVAILABLE = hasattr(os, "fork")

_declared_fork_parent = False


class ForkUnsafeError(RuntimeError):
    """:func:`run_forked` called in a process that was not started to fork children."""


def declare_fork_parent() -> None:
    """Mark this process as one started to fork children: fresh, and never running
    onnxruntime or Ray itself (its children may)."""
    global _declared_fork_parent
    _declared_fork_parent = True


def _child(function: Callable[[], Any], result_path: Path, log_fd: int) -> None:
    """Runs in the child: never returns, never runs the parent's cleanup handlers."""
    status = 70
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = sys.stderr = os.fdopen(os.dup(log_fd), "w", buffering=1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent decides what Ctrl-C means
        try:
            payload: tuple[str, Any] = ("returned", function())
        except BaseException as exc:  # everything the function raises is data for the parent
            traceback.print_exc()
            payload = ("raised", (type(exc).__name__, str(exc)))
        with open(result_path, "wb") as handle:
            pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL)
        status = 0
    finally:
        os._exit(status)


def run_forked(function: Callable[[], Any], *, timeout_s: float) -> ForkedOutcome:
    """``function()`` in a forked child (its return value must pickle); see the module doc.

    Raises :class:`ForkUnsafeError` unless :func:`declare_fork_parent` was called."""
    if not _declared_fork_parent:
        raise ForkUnsafeError(
            "run_forked forks this process, which was not started for that: a process that has "
            "run onnxruntime or Ray can leave its children hanging on a lock. Run the work in "
            "a process that calls dyadiq.forked.declare_fork_parent() first (as "
            "dyadiq.fuzz.campaign_process does)."
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dyadiq_fork_") as folder:
        result_path = Path(folder) / "result.pickle"
        log_path = Path(folder) / "output.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            pid = os.fork()
            if pid == 0:
                _child(function, result_path, log_fd)
        finally:
            os.close(log_fd)
        status = _wait(pid, timeout_s)
        seconds = time.perf_counter() - start
        output = log_path.read_text(errors="replace")
        if status is None:
            return ForkedOutcome(Ending.TIMED_OUT, output=output, seconds=seconds)
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            return ForkedOutcome(Ending.SIGNALLED, signal_name=name, output=output, seconds=seconds)
        code = os.WEXITSTATUS(status)
        if code != 0 or not result_path.exists():
            return ForkedOutcome(Ending.EXITED, exit_code=code, output=output, seconds=seconds)
        with open(result_path, "rb") as handle:
            kind, value = pickle.load(handle)
    return finished_outcome(kind, value, output, seconds)


def finished_outcome(kind: str, value: Any, output: str, seconds: float) -> ForkedOutcome:
    """The outcome of a child that ended normally: ``("raised", (type, message))`` or
    ``("returned", value)``, as the child pickled it."""
    if kind == "raised":
        error_type, message = value
        return ForkedOutcome(
            Ending.RAISED,
            error=f"{error_type}: {message}",
            error_type=error_type,
            output=output,
            seconds=seconds,
        )
    return ForkedOutcome(Ending.RETURNED, value=value, output=output, seconds=seconds)


def _wait(pid: int, timeout_s: float) -> int | None:
    """The child's wait status, or None after killing it at the deadline.

    An interrupt (Ctrl-C) while waiting kills the child first, so no orphan outlives us."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
    except BaseException:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:  # already reaped
            pass
        raise
