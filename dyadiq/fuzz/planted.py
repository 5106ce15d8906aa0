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
