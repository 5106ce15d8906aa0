"""The integer square root of the integer LayerNorm as one hand-written TIR loop.

Written as Relax ops, Newton's iteration ``x <- min(x, (x + n // x) >> 1)`` reads ``x`` three
times per step; fusion puts the steps in one PrimFunc and the default schedule inlines each
step into the next, so the expression of the last step holds ``3^steps`` copies of the first
(and each floor division lowers to a select that copies its operands again). With MiniLM's
seven steps that tree kept ``tirx.build`` busy for over an hour. Here ``x`` is a variable
updated in place: the loop body is a few instructions per step, whatever the step count.

The kernel computes exactly :func:`dyadiq.reference_interpreter.integer_sqrt`: the start
``2^ceil(bits(n) / 2)``, then ``ISQRT_STEPS`` Newton steps with floor division.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T  # noqa: N812 (TVMScript convention)

from dyadiq import integer_program as ip
from dyadiq.backends.tvm.x86_kernels import _OPAQUE, _REGISTERS, HAND_SCHEDULED

_INT64_BITS = 63  # n < 2^62: bits(n) counts the powers 2^0 .. 2^62 that are <= n


@T.macro
def _root_of(n: T.handle, out: T.handle, x: T.handle, i: T.int64) -> None:
    """out[i] = floor(sqrt(n[i])), with ``x[0]`` as the running value: the bit count of n[i],
    then the start 2^ceil(bits / 2), then the Newton steps (one body for CPU and GPU)."""
    x[0] = T.int64(0)
    for b in range(_INT64_BITS):
        if n[i] >= T.shift_left(T.int64(1), T.Cast("int64", b)):
            x[0] = x[0] + T.int64(1)
    x[0] = T.shift_left(T.int64(1), T.shift_right(x[0] + T.int64(1), T.int64(1)))
    for _ in range(ip.ISQRT_STEPS):
        x[0] = T.min(x[0], T.shift_right(x[0] + T.floordiv(n[i], x[0]), T.int64(1)))
    out[i] = x[0]


def integer_sqrt_kernel(count: int) -> tvm.tirx.PrimFunc:
    """``floor(sqrt(n))`` of every element of a flat int64 tensor of ``count`` elements
    (1 <= n < 2^62). Arguments: n, output."""

    @T.prim_func(private=True, s_tir=True)
    def kernel(  # TVMScript buffer annotations are calls, which mypy cannot read
        n: T.Buffer((count,), "int64"),  # type: ignore[valid-type]
        out: T.Buffer((count,), "int64"),  # type: ignore[valid-type]
    ) -> None:
        T.func_attr({"tir.noalias": True, HAND_SCHEDULED: True, "op_pattern": _OPAQUE})
        # a root block: Relax's reshape detection inspects one-input kernels and wants one
        with T.sblock("root"):
            # x[0]: the bit count of n[i], then its root (a one-element stack buffer, as the
            # x86 kernels' scratch: LLVM keeps it in a register)
            x = T.alloc_buffer((1,), "int64", scope=_REGISTERS)
            for i in range(count):
                _root_of(n, out, x, i)

    return kernel


GPU_THREADS = 256  # threads per block: each thread takes one element's whole iteration


def integer_sqrt_gpu_kernel(count: int) -> tvm.tirx.PrimFunc:
    """:func:`integer_sqrt_kernel` for GPU targets: the same per-element loop, one element per
    thread (``blockIdx.x * GPU_THREADS + threadIdx.x``), the running root in a local
    register. The Relax-op form would hand the GPU build the same ``3^steps`` expression."""
    blocks = (count + GPU_THREADS - 1) // GPU_THREADS

    @T.prim_func(private=True, s_tir=True)
    def kernel(
        n: T.Buffer((count,), "int64"),  # type: ignore[valid-type]
        out: T.Buffer((count,), "int64"),  # type: ignore[valid-type]
    ) -> None:
        T.func_attr({"tir.noalias": True, HAND_SCHEDULED: True, "op_pattern": _OPAQUE})
        with T.sblock("root"):
            x = T.alloc_buffer((1,), "int64", scope="local")
            for block in T.thread_binding(blocks, thread="blockIdx.x"):
                for thread in T.thread_binding(GPU_THREADS, thread="threadIdx.x"):
                    if block * GPU_THREADS + thread < count:
                        _root_of(n, out, x, block * GPU_THREADS + thread)

    return kernel
