"""The TVM backend's one service to passes that differentiate a float model: compile a Relax
function (a reverse-mode gradient module, built by the caller) for this CPU and return it as a
callable, so that passes never reach into the build and scheduling modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def compile_for_this_cpu(
    module: Any, function: str, *, scheduled: bool = True
) -> Callable[..., Any]:
    """``module[function]`` compiled for this machine's CPU, callable on ``tvm.runtime`` tensors.

    ``scheduled``: legalize and fuse, then give every fused PrimFunc the backend's hand-written
    default schedule (tiled, parallel, vectorized; :func:`dyadiq.backends.tvm.tuning.
    default_schedule`). TVM's default CPU pipeline runs the naive loop nests legalization wrote,
    which made one MiniLM reverse pass take seconds. Schedules only reorder loops (float sums
    may round differently)."""
    import tvm
    from tvm import relax

    if scheduled:
        from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
        from dyadiq.backends.tvm.tuning import schedule_module

        target = target_for("x86")
        prepared = schedule_module(prepare(module, target), target, progress=None)
        executable = compile_prepared(prepared, target)
    else:
        executable = tvm.compile(module, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(executable, tvm.cpu())[function]
