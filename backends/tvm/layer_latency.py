"""Per-layer latency measured through TVM on the target: the allocation's latency table.

Each weighted layer of an integer program (a ``Conv`` or a ``MatMul`` with a constant weight)
lowers to exactly one fused PrimFunc (conv/dense + bias + requantization + clip + cast), called
once from the Relax ``main``. :func:`measure_layer_latency` lowers the program, prepares and
schedules it (:mod:`dyadiq.backends.tvm.tuning`), finds each layer's call by its weight constant,
and times that kernel alone with ``time_evaluator``, fed with the layer's real constants
(multipliers, shifts, offsets) and random activation codes of the right type.

The program is lowered for ``target`` as a build for it would be (on x86 CPUs with AVX-512 VNNI,
hand-written kernels with pre-packed weights, found by their weight values).

Formats: every candidate format keeps its codes in int8 containers (there is no int4 dtype in
TVM), so a W4 kernel is the W8 kernel with smaller weight values and costs the same on a CPU.
Each (layer, format) is nevertheless timed with weight codes clipped to that format's range:
the table records what was measured, noise included, not an assumption.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from dyadiq import integer_program as ip
from dyadiq.errors import ConfigError
from dyadiq.passes.allocation.tables import LatencyTable
from dyadiq.plan import LayerFormat

Layer = ip.Conv | ip.MatMul


def weighted_layers(program: ip.IntegerProgram) -> list[Layer]:
    """The program's layers that have a constant weight, in program order."""
    return [
        op
        for op in program.ops
        if isinstance(op, ip.Conv) or (isinstance(op, ip.MatMul) and op.weight is not None)
    ]


@dataclass
class KernelCall:
    """One ``call_tir`` of the Relax main: the PrimFunc and its inputs (constants or shapes)."""

    name: str
    func: tvm.tirx.PrimFunc
    args: list[np.ndarray | tuple[tuple[int, ...], str]]


def kernel_calls(mod: tvm.IRModule) -> list[KernelCall]:
    """The ``call_tir`` calls of a prepared module's ``main``, in execution order."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    calls = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call) or not value.op.same_as(call_tir):
                continue
            gv, operands = value.args[0], value.args[1]
            args: list[np.ndarray | tuple[tuple[int, ...], str]] = []
            for operand in operands.fields:
                if isinstance(operand, tvm.ir.expr.Constant):
                    args.append(operand.value.numpy())
                else:
                    ty = operand.ty
                    args.append((tuple(int(d) for d in ty.shape), str(ty.dtype)))
            calls.append(KernelCall(gv.name_hint, mod[gv], args))
    return calls


def _random_codes(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(np.dtype(dtype))
    lo, hi = max(int(info.min), -128), min(int(info.max), 255)
    return rng.integers(lo, hi + 1, shape).astype(dtype)


def _clip_to_bits(weight: np.ndarray, bits: int) -> np.ndarray:
    bound = (1 << (bits - 1)) - 1
    return np.clip(weight, -bound, bound).astype(weight.dtype)


class KernelTimer:
    """One PrimFunc built alone for the target, timed on given inputs (outputs are zeros)."""

    def __init__(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> None:
        self.func = func
        module = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        self.library = tvm.tirx.build(module, target)

    def median_ms(self, inputs: Sequence[np.ndarray], *, repeat: int = 20) -> float:
        """Median milliseconds of one call; ``inputs`` are the non-output arguments."""
        outputs = [
            tvm.runtime.tensor(np.zeros([int(d) for d in p.shape], str(p.dtype)))
            for p in list(self.func.params)[len(inputs) :]
        ]
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs] + outputs
        # each repeat runs the kernel for at least 2 ms (TVM raises `number` until it does), so
        # a 20 us kernel is averaged over ~100 calls instead of timed once: single calls of
        # small kernels scattered by +-10% between runs on a shared machine
        timer = self.library.time_evaluator(
            "main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=2
        )
        return float(np.median(timer(*args).results)) * 1e3


def _holds_weight(arg: np.ndarray, weight: np.ndarray) -> bool:
    """Whether a kernel argument is this layer's weight: the same array, or (x86 kernels) the
    same values re-laid out, zero-padded, int8 or widened to int16 (``pack_weight``)."""
    if arg.shape == weight.shape:
        return np.array_equal(arg, weight.astype(arg.dtype))
    if arg.dtype not in (np.int8, np.int16) or arg.size < weight.size:
        return False
    packed, values = arg.ravel(), weight.ravel()
    return np.array_equal(np.sort(packed[packed != 0]), np.sort(values[values != 0]))


def find_layer_call(calls: list[KernelCall], start: int, layer: Layer) -> tuple[int, int]:
    """(call index, argument index) of the first call from ``start`` that takes this weight."""
    weight = layer.weight
    assert weight is not None  # weighted_layers() keeps only layers with a constant weight
    for i in range(start, len(calls)):
        for j, arg in enumerate(calls[i].args):
            if isinstance(arg, np.ndarray) and _holds_weight(arg, weight):
                return i, j
    raise ConfigError(f"no TVM kernel takes the weight of layer {layer.output}")


def measure_layer_latency(
    program: ip.IntegerProgram,
    formats: Iterable[LayerFormat],
    target: tvm.target.Target,
    *,
    layer_ids: Sequence[str] | None = None,
    database_dir: Path | None = None,
    repeat: int = 20,
    seed: int = 0,
) -> LatencyTable:
    """Time every weighted layer's fused kernel for every format (see the module docstring).

    ``layer_ids`` names the layers (the plan's node ids, in program order); by default a layer
    is named by its output tensor. Kernels are scheduled as :func:`schedule_module` would
    (database records from ``database_dir``, else the default schedule).
    """
    from dyadiq.backends.tvm.build import prepare
    from dyadiq.backends.tvm.lower import lower_program
    from dyadiq.backends.tvm.tuning import schedule_module

    layers = weighted_layers(program)
    names = list(layer_ids) if layer_ids is not None else [op.output for op in layers]
    if len(names) != len(layers):
        raise ConfigError(f"{len(names)} layer ids for {len(layers)} weighted layers")
    formats = list(formats)
    prepared = prepare(lower_program(program, target=target), target)
    scheduled = schedule_module(prepared, target, database_dir=database_dir, progress=None)
    calls = kernel_calls(scheduled)
    rng = np.random.default_rng(seed)
    table = LatencyTable(target=str(target), repeat=repeat)
    position = 0
    for name, layer in zip(names, layers, strict=True):
        index, weight_arg = find_layer_call(calls, position, layer)
        position = index + 1
        call = calls[index]
        inputs = [
            a if isinstance(a, np.ndarray) else _random_codes(a[0], a[1], rng) for a in call.args
        ]
        timer = KernelTimer(call.func, target)
        row = {}
        for fmt in formats:
            inputs[weight_arg] = _clip_to_bits(call.args[weight_arg], fmt.weight_bits)  # type: ignore[arg-type]
            row[fmt.label] = timer.median_ms(inputs, repeat=repeat)
        table.layers[name] = row
    return table
