"""TVM kernels for group-wise 4-bit weight-only matrix products with float activations.

``y[m, n] = sum_k x[m, k] * s[n, g(k)] * (q[n, k] - z[n, g(k)])`` with codes q in 0..15
(any unsigned code of 4 bits or fewer: 2- and 3-bit codes fit a nibble unchanged; signed
codes shift by 8 with their zero point, :func:`kernel_weights`), g(k) = k // group, one float
scale and zero point per group of ``group`` inputs.

The weights stay packed in memory, two codes a byte, and are widened in registers inside the
reduction loop. For one group of one output row the kernel computes

    y += s * (sum_k x[k] q[k] - z * sum_k x[k])

the same algebra as dequantising each weight to ``s (q - z)`` first (the zero point and
scale are constant over a group, so they leave the group's sum), with one multiply-add per
weight instead of three operations. Float rounding differs from "dequantise, then matmul"
only in summation order.

Layout (:func:`pack_columns`): the N outputs are cut into tiles of ``tile`` columns
(``tile`` divides N); tile b stores ``packed[b, k2, i]`` = q[b*tile + i, 2 k2] | q[...,
2 k2 + 1] << 4, so for each pair of inputs the ``tile`` codes of a tile are one contiguous
load. The innermost loop is vectorized over the tile's columns (no horizontal sums), the
outer loop over tiles runs in parallel. Scales (float32) and zero points (uint8, widened in
the register) are [N / tile, G, tile], the same tile order.

Targets (:func:`cpu_target`): x86 with AVX-512 (``x86-64-v4``: 512-bit FMAs on zmm
registers), x86 AVX2 (``x86-64-v3``: ymm) and aarch64 (NEON); the same TIR, LLVM picks the
vector width.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import tvm
from tvm.script import tirx as T  # noqa: N812 (TVMScript convention)

from dyadiq.backends.tvm.target import X86_ISA_LEVELS
from dyadiq.errors import ConfigError

# Scratch buffers in "global" scope become stack allocas LLVM promotes to registers (a
# "local" one becomes a heap workspace per iteration; see backends/tvm/x86_kernels.py).
_REGISTERS = "global"
TILES = (64, 32, 16, 8)  # output columns per tile, widest that divides N first
# Below this many weights a kernel runs on one thread: waking the pool costs more.
PARALLEL_MIN_WEIGHTS = 1 << 16


class CpuTarget(StrEnum):
    X86_AVX512 = "x86-avx512"
    X86_AVX2 = "x86-avx2"
    AARCH64 = "aarch64"


def cpu_target(kind: CpuTarget, *, threads: int = 1) -> tvm.target.Target:
    """The LLVM target of ``kind``: the x86 ISA levels the integer backend builds for
    (``x86-64-v4`` + VNNI, ``x86-64-v3``), or aarch64 with NEON."""
    spec: dict[str, Any]
    if kind is CpuTarget.X86_AVX512:
        spec = dict(X86_ISA_LEVELS["x86-64-v4-vnni"][0])
    elif kind is CpuTarget.X86_AVX2:
        spec = dict(X86_ISA_LEVELS["x86-64-v3"][0])
    else:
        spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    spec["num-cores"] = threads
    return tvm.target.Target(spec)


@dataclass(frozen=True)
class Int4Shape:
    """A product's sizes: ``rows`` activation rows (1 for decoding), ``k`` inputs, ``n``
    outputs, ``group`` inputs per scale, ``tile`` outputs per vector tile."""

    rows: int
    k: int
    n: int
    group: int
    tile: int

    @classmethod
    def of(cls, rows: int, k: int, n: int, group: int) -> Int4Shape:
        problems = []
        if rows < 1:
            problems.append(f"rows must be >= 1, got {rows}")
        if group % 2 or group < 2:
            problems.append(f"group must be even, got {group}")
        elif k % group:
            problems.append(f"K ({k}) must be a multiple of the group size ({group})")
        tiles = [t for t in TILES if n % t == 0]
        if not tiles:
            problems.append(f"N ({n}) must be a multiple of {TILES[-1]}")
        if problems:
            raise ConfigError("int4 weight-only kernel: " + "; ".join(problems))
        return cls(rows, k, n, group, tiles[0])

    @property
    def groups(self) -> int:
        return self.k // self.group

    @property
    def tiles(self) -> int:
        return self.n // self.tile


def pack_columns(codes: np.ndarray, shape: Int4Shape) -> np.ndarray:
    """Codes q [N, K] (0..15) as ``packed [N / tile, K / 2, tile]`` uint8, input 2 k2 in the
    low nibble and 2 k2 + 1 in the high one."""
    q = np.asarray(codes)
    if q.shape != (shape.n, shape.k):
        raise ConfigError(f"codes of shape {q.shape}, expected {(shape.n, shape.k)}")
    if q.min() < 0 or q.max() > 15:
        raise ConfigError(f"codes must lie in 0..15, got {q.min()}..{q.max()}")
    q = q.astype(np.uint8)
    pairs = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K/2]
    return np.ascontiguousarray(pairs.reshape(shape.tiles, shape.tile, shape.k // 2).swapaxes(1, 2))


def tile_groups(values: np.ndarray, shape: Int4Shape, dtype: type = np.float32) -> np.ndarray:
    """Per-group values [N, G] as [N / tile, G, tile] of ``dtype``."""
    v: np.ndarray = np.asarray(values).astype(dtype)
    if v.shape != (shape.n, shape.groups):
        raise ConfigError(f"group values of shape {v.shape}, expected {(shape.n, shape.groups)}")
    return np.ascontiguousarray(v.reshape(shape.tiles, shape.tile, shape.groups).swapaxes(1, 2))


def kernel_weights(
    codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, shape: Int4Shape
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed codes, tiled scales, tiled zero points) of W [N, K] = s (q - z) per group;
    signed codes (min < 0) move to 0..15 with their zero points, which leaves s (q - z) as
    it was."""
    q = np.asarray(codes, np.int32)
    z = np.asarray(zero_points, np.int32)
    if q.min() < 0:
        q, z = q + 8, z + 8
    if z.min() < 0 or z.max() > 15:
        raise ConfigError(f"zero points must lie in 0..15, got {z.min()}..{z.max()}")
    return pack_columns(q, shape), tile_groups(scales, shape), tile_groups(z, shape, np.uint8)


def int4_matmul(shape: Int4Shape) -> tvm.tirx.PrimFunc:
    """The kernel ``(x [rows, K], packed, scales, zeros, y [rows, N])``, module docstring."""
    rows, k, n, group, tile = shape.rows, shape.k, shape.n, shape.group, shape.tile
    groups, tiles, half = shape.groups, shape.tiles, group // 2
    outer = T.parallel if k * n >= PARALLEL_MIN_WEIGHTS and tiles > 1 else T.serial

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((rows, k), "float32"),  # type: ignore[valid-type]
        packed: T.Buffer((tiles, k // 2, tile), "uint8"),  # type: ignore[valid-type]
        scales: T.Buffer((tiles, groups, tile), "float32"),  # type: ignore[valid-type]
        zeros: T.Buffer((tiles, groups, tile), "uint8"),  # type: ignore[valid-type]
        y: T.Buffer((rows, n), "float32"),  # type: ignore[valid-type]
    ) -> None:
        T.func_attr({"tir.noalias": True})
        for b in outer(tiles):
            for r in range(rows):
                acc = T.alloc_buffer((tile,), "float32", scope=_REGISTERS)
                part = T.alloc_buffer((tile,), "float32", scope=_REGISTERS)
                xsum = T.alloc_buffer((1,), "float32", scope=_REGISTERS)
                for i in T.vectorized(tile):
                    acc[i] = T.float32(0)
                for g in range(groups):
                    xsum[0] = T.float32(0)
                    for i in T.vectorized(tile):
                        part[i] = T.float32(0)
                    for k2 in range(half):
                        lo = x[r, g * group + 2 * k2]
                        hi = x[r, g * group + 2 * k2 + 1]
                        xsum[0] = xsum[0] + lo + hi
                        for i in T.vectorized(tile):
                            part[i] = (
                                part[i]
                                + lo * T.Cast("float32", packed[b, g * half + k2, i] & T.uint8(15))
                                + hi * T.Cast("float32", packed[b, g * half + k2, i] >> T.uint8(4))
                            )
                    for i in T.vectorized(tile):
                        acc[i] = acc[i] + scales[b, g, i] * (
                            part[i] - T.Cast("float32", zeros[b, g, i]) * xsum[0]
                        )
                for i in T.vectorized(tile):
                    y[r, b * tile + i] = acc[i]

    return kernel


KERNEL_SYMBOL = "int4_matmul"


def build_int4_matmul(shape: Int4Shape, target: tvm.target.Target) -> Any:
    """The compiled kernel (a runtime module whose ``KERNEL_SYMBOL`` function takes the five
    tensors of :func:`int4_matmul`)."""
    func = int4_matmul(shape).with_attr("global_symbol", KERNEL_SYMBOL)
    return tvm.compile(tvm.IRModule({KERNEL_SYMBOL: func}), target=target)


def reference_matmul(
    x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, group: int
) -> np.ndarray:
    """``x @ W^T`` in float64 with W [N, K] = s (q - z) dequantised first (the check)."""
    s = np.repeat(np.asarray(scales, np.float64), group, axis=1)
    z = np.repeat(np.asarray(zero_points, np.float64), group, axis=1)
    w = s * (np.asarray(codes, np.float64) - z)
    return np.asarray(x, np.float64) @ w.T


def int4_linear_module(shape: Int4Shape) -> tvm.IRModule:
    """A Relax module ``main(x, packed, scales, zeros) -> y`` calling the kernel once: what
    the Relax VM (and the aarch64 runner under qemu) loads."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((shape.rows, shape.k), "float32"))
    packed = relax.Var("packed", relax.TensorType((shape.tiles, shape.k // 2, shape.tile), "uint8"))
    group_shape = (shape.tiles, shape.groups, shape.tile)
    scales = relax.Var("scales", relax.TensorType(group_shape, "float32"))
    zeros = relax.Var("zeros", relax.TensorType(group_shape, "uint8"))
    with bb.function("main", [x, packed, scales, zeros]):
        gv = bb.add_func(int4_matmul(shape), KERNEL_SYMBOL)
        out = bb.emit(
            relax.call_tir(
                gv,
                [x, packed, scales, zeros],
                relax.TensorType((shape.rows, shape.n), "float32"),
            )
        )
        bb.emit_func_output(out)
    return bb.get()
