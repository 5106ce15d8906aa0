"""Static activation memory for an :class:`IntegerProgram`: one arena, offsets from liveness.

A *buffer* is the storage one op writes (codes: one byte per element; the float tensors at a
float island's edges: their element size, :func:`element_bytes`). Reshape writes nothing: its
output aliases its input's bytes (same layout), so a buffer lives from the step that writes it
to the last step that reads it or any alias of it; model outputs live to the end (the driver
copies them out last).

Two buffers may share bytes only if their live intervals are disjoint. Offsets come from the
greedy-by-size heuristic (largest buffer first, placed at the lowest aligned offset that does
not overlap a placed buffer whose interval meets its own). The largest sum of sizes over the
steps' live sets is a lower bound on any arena; the plan reports both, so the gap is visible.
The live sets are plain data too: for each step the buffers that must coexist, which is what a
RAM budget needs as linear constraints (sum over a live set of activation bytes <= budget).

The model input is the caller's buffer (outside the arena); ops are numbered by their position
in ``program.ops``, and host-side ops (QuantizeInput, Dequantize of an output) own no buffer.
A float island's own intermediate tensors live in its scratch (:mod:`.float_c`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from dyadiq import integer_program as ip
from dyadiq.errors import UnsupportedModelError

ALIGNMENT = 4  # word-aligned buffers: kernels may read int8 activations as 32-bit words


@dataclass(frozen=True)
class Buffer:
    name: str  # the tensor whose producer writes it
    size: int  # bytes (one byte per code)
    first_step: int  # index into program.ops of the writer
    last_step: int  # last reader (or the end, for outputs)


@dataclass(frozen=True)
class ArenaPlan:
    buffers: dict[str, Buffer]
    offsets: dict[str, int]  # buffer -> byte offset in the arena
    aliases: dict[str, str]  # every arena tensor -> the buffer holding its bytes
    external: frozenset[str]  # tensors held outside the arena (the model input)
    peak_bytes: int  # arena size
    live_sets: list[frozenset[str]]  # per step, the buffers live at that step
    lower_bound_bytes: int  # max over steps of the live set's total size

    def offset_of(self, tensor: str) -> int:
        return self.offsets[self.aliases[tensor]]

    def overlapping_live_pairs(self) -> list[tuple[str, str]]:
        """Pairs of buffers that are live together and share bytes (must be empty)."""
        clashes = []
        for live in self.live_sets:
            ordered = sorted(live)
            for i, a in enumerate(ordered):
                for b in ordered[i + 1 :]:
                    a0, b0 = self.offsets[a], self.offsets[b]
                    if a0 < b0 + self.buffers[b].size and b0 < a0 + self.buffers[a].size:
                        clashes.append((a, b))
        return clashes


def static_shape(program: ip.IntegerProgram, tensor: str) -> tuple[int, ...]:
    """The tensor's shape with a dynamic batch dimension fixed to 1 (one inference)."""
    shape = list(program.shapes[tensor])
    if shape and shape[0] <= 0:
        shape[0] = 1
    if any(d <= 0 for d in shape):
        raise UnsupportedModelError(
            f"tensor {tensor} has a dynamic shape {program.shapes[tensor]}: the microcontroller "
            "backend needs static shapes (fix them with --input-shape)"
        )
    return tuple(shape)


def element_bytes(program: ip.IntegerProgram, tensor: str) -> int:
    """1 for 8-bit codes, 4 for wide (int32) ones; a float island's tensors and the model's
    inputs by their type."""
    if tensor in program.quant:
        return 4 if program.quant[tensor].bits > 8 else 1  # wide codes are int32
    if tensor in program.inputs:
        return int(np.dtype(program.inputs[tensor][0]).itemsize)
    for op in program.ops:
        if isinstance(op, ip.FloatIsland) and tensor in op.outputs:
            types = op.output_types or (onnx.TensorProto.FLOAT,) * len(op.outputs)
            kind = types[op.outputs.index(tensor)]
            return int(onnx.helper.tensor_dtype_to_np_dtype(kind).itemsize)
    return 4  # a Dequantize's float32 output


def tensor_bytes(program: ip.IntegerProgram, tensor: str) -> int:
    count = int(np.prod(static_shape(program, tensor), dtype=np.int64))
    return count * element_bytes(program, tensor)


def _host_side(program: ip.IntegerProgram, op: ip.IntOp) -> bool:
    """The caller quantizes the input and dequantizes the outputs; a Dequantize into a float
    island runs on the device."""
    if isinstance(op, ip.QuantizeInput):
        return True
    return isinstance(op, ip.Dequantize) and op.output in program.outputs


def _reads(op: ip.IntOp) -> tuple[str, ...]:
    if isinstance(op, ip.FloatIsland):
        return op.inputs
    names: list[str] = []
    if hasattr(op, "input"):
        names.append(op.input)
    names.extend(getattr(op, "inputs", ()))
    if isinstance(op, ip.MatMul) and op.weight_input is not None:
        names.append(op.weight_input)
    if isinstance(op, ip.MaskedSoftmax | ip.MaskedMeanPool):
        names.append(op.mask)
    if isinstance(op, ip.Embedding):
        names.append(op.indices)
    return tuple(names)


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def plan_arena(program: ip.IntegerProgram) -> ArenaPlan:
    """Liveness-based arena offsets for every activation the device computes."""
    external = frozenset(op.output for op in program.ops if isinstance(op, ip.QuantizeInput))
    external |= frozenset(program.inputs)  # a float input a float island reads directly
    aliases: dict[str, str] = {}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    end = len(program.ops)
    for step, op in enumerate(program.ops):
        if _host_side(program, op):
            continue
        for name in _reads(op):
            root = aliases.get(name)
            if root is not None:
                last[root] = max(last[root], step)
        if isinstance(op, ip.Reshape) and op.input in external:
            external = external | {op.output}
        elif isinstance(op, ip.Reshape):
            aliases[op.output] = aliases[op.input]
        else:
            written: tuple[str | None, ...] = (
                op.outputs if isinstance(op, ip.FloatIsland) else (op.output,)
            )
            if isinstance(op, ip.LayerNorm):  # its wide acc beside the 8-bit codes
                written = (op.output, op.wide_output)
            for name in (n for n in written if n is not None):
                aliases[name] = name
                first[name] = step
                last[name] = step
    for output in program.outputs:
        code = program.int_outputs.get(output, output)
        if code in aliases:
            last[aliases[code]] = end
    buffers = {
        name: Buffer(name, tensor_bytes(program, name), first[name], last[name]) for name in first
    }
    live_sets = [
        frozenset(b.name for b in buffers.values() if b.first_step <= step <= b.last_step)
        for step in range(end + 1)
    ]
    offsets = _greedy_by_size(buffers)
    peak = max((offsets[b] + _align(buffers[b].size) for b in buffers), default=0)
    lower = max((sum(buffers[b].size for b in live) for live in live_sets), default=0)
    return ArenaPlan(buffers, offsets, aliases, external, peak, live_sets, lower)


def _greedy_by_size(buffers: dict[str, Buffer]) -> dict[str, int]:
    offsets: dict[str, int] = {}
    order = sorted(buffers.values(), key=lambda b: (-b.size, b.first_step, b.name))
    for buf in order:
        busy = sorted(
            (offsets[o.name], offsets[o.name] + _align(o.size))
            for o in (buffers[n] for n in offsets)
            if o.first_step <= buf.last_step and buf.first_step <= o.last_step
        )
        candidate = 0
        for start, stop in busy:
            if candidate + buf.size <= start:
                break
            candidate = max(candidate, stop)
        offsets[buf.name] = candidate
    return offsets
