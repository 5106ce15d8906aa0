"""Faults planted on purpose, to prove that the isolation and the fuzz harness catch them.

Each stands in for a real failure seen in the wild: onnxsim's C++ code dying with SIGFPE on
a zero stride, a native hang, a raw exception escaping a library.
"""

from __future__ import annotations

import os
import signal
import time

import onnx


def simplifier_dies_with_sigfpe(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """What onnxsim did on a MaxPool with stride 0: the process is killed by SIGFPE."""
    print("Traceback (most recent call last): planted noise a simplifier printed", flush=True)
    os.kill(os.getpid(), signal.SIGFPE)
    return model, False  # not reached


def simplifier_hangs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    time.sleep(3600)
    return model, False  # not reached


# Stand-ins for the CLI in a fuzz campaign (``run_campaign(runner="dyadiq.fuzz.planted:...")``),
# one per failure class the harness must catch.
def cli_dies_with_sigfpe(argv: list[str]) -> int:
    os.kill(os.getpid(), signal.SIGFPE)
    return 0  # not reached


def cli_hangs(argv: list[str]) -> int:
    time.sleep(3600)
    return 0  # not reached


def cli_raises(argv: list[str]) -> int:
    raise KeyError(99)  # what load_onnx raised for elem_type 99


def cli_prints_a_traceback(argv: list[str]) -> int:
    print('Traceback (most recent call last):\n  File "onnxsim.py", line 1, in simplify')
    return 2
