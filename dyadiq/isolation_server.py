"""A clean helper process that runs risky native work (onnxsim, onnxruntime) in forked children.

Forking the dyadiq process itself is not safe: once onnxruntime has run a session, its thread
pools hold locks, and a forked child can wait on them forever (seen with onnxsim). So each
dyadiq process starts one helper with ``python -m dyadiq.isolation_server`` (it imports the
heavy libraries once and never runs them itself, so it stays single-threaded), and the helper
forks a fresh child per request. A child that dies by a signal (onnxsim's SIGFPE on a zero
stride) or hangs costs the request, never the caller.

Protocol: the caller makes a folder holding ``request.pickle`` = ``(module, function, kwargs)``
and writes the folder's path as one line to the helper's stdin. The helper forks; the child
sends its stdout/stderr (file descriptors included) to ``output.log``, calls
``module.function(folder, **kwargs)`` and pickles what it returns, or the exception's
``(type, message)``, to ``result.pickle``. The helper writes the child's pid to ``pid`` and
its wait status to ``status.json``. The helper exits when its stdin closes (the caller, and
any process forked from it, has exited).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from dyadiq.forked import Ending, ForkedOutcome, finished_outcome

PRELOAD = ("numpy", "onnx", "onnxruntime", "onnxsim", "dyadiq.frontends.runtime_validation")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _child(folder: Path) -> None:
    """Runs in the forked child; never returns."""
    status = 70
    try:
        log_fd = os.open(folder / "output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = sys.stderr = os.fdopen(os.dup(log_fd), "w", buffering=1)
        module, function, kwargs = pickle.loads((folder / "request.pickle").read_bytes())
        try:
            value = getattr(importlib.import_module(module), function)(folder, **kwargs)
            payload: tuple[str, Any] = ("returned", value)
        except BaseException as exc:  # the caller gets it as data
            traceback.print_exc()
            payload = ("raised", (type(exc).__name__, str(exc)))
        _write_atomic(folder / "result.pickle", pickle.dumps(payload))
        status = 0
    finally:
        os._exit(status)


def serve() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # the request that needs it reports it
            importlib.import_module(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    for line in sys.stdin:
        folder = Path(line.strip())
        if not (folder / "request.pickle").is_file():
            continue
        pid = os.fork()
        if pid == 0:
            _child(folder)
        _write_atomic(folder / "pid", str(pid).encode())
        _, status = os.waitpid(pid, 0)
        report: dict[str, Any]
        if os.WIFSIGNALED(status):
            report = {"signal": signal.Signals(os.WTERMSIG(status)).name}
        else:
            report = {"exit_code": os.WEXITSTATUS(status)}
        with contextlib.suppress(OSError):  # the caller gave up and removed the folder
            _write_atomic(folder / "status.json", json.dumps(report).encode())


# --- the caller's side ---------------------------------------------------------------------
class _Helper:
    process: subprocess.Popen[bytes] | None = None
    owner_pid = 0  # the process that started it (forked children share it)


def _alive(process: subprocess.Popen[bytes]) -> bool:
    if _Helper.owner_pid == os.getpid():
        return process.poll() is None
    try:  # in a forked child the helper is not our child: poll() cannot see it
        os.kill(process.pid, 0)
        return True
    except OSError:
        return False


def _helper() -> subprocess.Popen[bytes]:
    process = _Helper.process
    if process is None or not _alive(process):
        process = subprocess.Popen(
            [sys.executable, "-m", "dyadiq.isolation_server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        _Helper.process, _Helper.owner_pid = process, os.getpid()
    return process


def start_helper() -> None:
    """Start the helper now (before forking workers that should share it)."""
    _helper()


def run_isolated(
    module: str,
    function: str,
    *,
    timeout_s: float,
    files: dict[str, bytes] | None = None,
    **kwargs: Any,
) -> ForkedOutcome:
    """``module.function(folder, **kwargs)`` in a fresh child of the helper; see the module doc.

    ``folder`` is a temporary folder (removed after) that holds ``files`` (name -> bytes)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dyadiq_isolated_") as name:
        folder = Path(name)
        for file_name, data in (files or {}).items():
            (folder / file_name).write_bytes(data)
        _write_atomic(folder / "request.pickle", pickle.dumps((module, function, kwargs)))
        helper = _helper()
        assert helper.stdin is not None
        helper.stdin.write(f"{folder}\n".encode())
        helper.stdin.flush()
        try:
            status = _await(folder, helper, start + timeout_s)
        except BaseException:
            _kill_child(folder)
            raise
        seconds = time.monotonic() - start
        log_path = folder / "output.log"
        output = log_path.read_text(errors="replace") if log_path.exists() else ""
        if status is None:
            _kill_child(folder)
            return ForkedOutcome(Ending.TIMED_OUT, output=output, seconds=seconds)
        if "signal" in status:
            return ForkedOutcome(
                Ending.SIGNALLED, signal_name=status["signal"], output=output, seconds=seconds
            )
        result = folder / "result.pickle"
        if status.get("exit_code") != 0 or not result.exists():
            code = int(status.get("exit_code", -1))
            return ForkedOutcome(Ending.EXITED, exit_code=code, output=output, seconds=seconds)
        kind, value = pickle.loads(result.read_bytes())
    return finished_outcome(kind, value, output, seconds)


def _await(folder: Path, helper: subprocess.Popen[bytes], deadline: float) -> dict[str, Any] | None:
    delay = 0.002
    while True:
        status = folder / "status.json"
        if status.exists():
            loaded: dict[str, Any] = json.loads(status.read_text())
            return loaded
        if not _alive(helper):
            return {"exit_code": -1}
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _kill_child(folder: Path) -> None:
    pid_file = folder / "pid"
    for _ in range(100):  # the helper may be about to fork it: wait up to a second
        if pid_file.exists():
            break
        time.sleep(0.01)
    with contextlib.suppress(OSError, ValueError):  # never started, or already gone
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


if __name__ == "__main__":
    serve()
