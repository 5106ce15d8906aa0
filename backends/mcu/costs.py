"""What a Cortex-M build costs, as the allocator reads it: flash bytes per weighted layer and
format (:func:`flash_cost_table`), and the arena's live sets (:func:`allocator_memory_plan`, the
file ``--memory-plan`` reads and ``--target cortex-m*`` writes).

Sizes follow :func:`dyadiq.backends.mcu.emit_c.emit_c_project`'s storage: codes of
``PACKED_BITS`` bits or fewer two per byte, wider ones one per byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from dyadiq import integer_program as ip
from dyadiq.graph import QGraph, weight_channel_axis
from dyadiq.plan import LayerFormat

from .arena import plan_arena, static_shape
from .emit_c import PACKED_BITS
from .transformer_c import embedding_flash_bytes


def weight_storage_bytes(rows: int, length: int, bits: int) -> int:
    """Bytes of ``rows`` rows of ``length`` codes of ``bits`` bits as the emitter stores them."""
    return rows * ((length + 1) // 2 if bits <= PACKED_BITS else length)


def layer_flash_bytes(weight_count: int, out_channels: int, bits: int) -> int:
    """Packed weights + an int32 bias + an int32 multiplier and an int8 shift per channel."""
    storage = weight_storage_bytes(out_channels, weight_count // out_channels, bits)
    return storage + out_channels * (4 + 4 + 1)


def program_weight_flash_bytes(program: ip.IntegerProgram) -> int:
    """Flash the weighted layers' constants of ``program`` take as :func:`emit_c_project` stores
    them (its ``McuProject.weight_flash_bytes``): codes, an int32 bias per output channel, and
    an int32 multiplier and int8 shift per requantization channel; a token embedding's table,
    row scales and constant rows (:func:`embedding_flash_bytes`). Computed from the program
    alone, so a model whose weights cannot fit is refused before any C is written. Ops that
    multiply by the same codes read one stored array (``emit_c``): its bytes count once."""
    total = 0
    stored: set[tuple[str, tuple[int, ...], int, bytes]] = set()
    for op in program.ops:
        if isinstance(op, ip.Conv):
            rows = int(op.weight.shape[0])  # OIHW: one row of taps per output channel
            length = int(op.weight.size) // rows
        elif isinstance(op, ip.MatMul) and op.weight is not None:
            length, rows = (int(d) for d in op.weight.shape)  # [K, N]: a row per column
        elif isinstance(op, ip.Embedding):  # a token table: its rows, scales, constant rows
            total += embedding_flash_bytes(op, static_shape(program, op.output))
            continue
        else:
            continue
        assert op.weight is not None
        digest = hashlib.sha256(op.weight.tobytes()).digest()
        key = (type(op).__name__, op.weight.shape, op.weight_bits, digest)
        storage = 0 if key in stored else weight_storage_bytes(rows, length, op.weight_bits)
        stored.add(key)
        total += storage + 4 * rows + 5 * int(np.size(op.requant.mult))
    return total


def flash_cost_table(
    graph: QGraph, formats: Sequence[LayerFormat]
) -> dict[str, dict[LayerFormat, int]]:
    """Flash bytes of each weighted layer per format, as :func:`emit_c_project` stores them.

    Plain data in the shape of ``AllocationProblem.size_bytes``: an allocator can put a flash
    budget on the sum (the rest of the image, code and tables, does not depend on the plan).
    """
    table: dict[str, dict[LayerFormat, int]] = {}
    for node in graph.weighted_layers():
        weight = graph.weight(node)
        assert weight is not None  # weighted_layers() has a constant weight by definition
        values = np.asarray(weight.values)
        channels = int(values.shape[weight_channel_axis(node)])
        table[node.name] = {
            fmt: layer_flash_bytes(int(values.size), channels, fmt.weight_bits) for fmt in formats
        }
    return table


def allocator_memory_plan(
    program: ip.IntegerProgram,
    graph: QGraph | None = None,
    formats: Sequence[LayerFormat] = (),
) -> dict[str, Any]:
    """What ``--memory-plan`` reads (``passes.allocation.load_memory_plan``): the arena's
    live sets and buffer bytes under the graph's tensor names, and, given the float ``graph``
    whose layer ids the plans use, :func:`flash_cost_table` for ``formats``.

    A code occupies one byte at 4 and 8 activation bits alike, so RAM does not depend on the
    plan's widths here; flash does, through the weights."""
    plan = plan_arena(program)

    def graph_name(tensor: str) -> str:
        return tensor.removesuffix("_q")  # integerize names a tensor's codes NAME_q

    live_sets = [sorted(graph_name(b) for b in live) for live in plan.live_sets if live]
    tensor_bytes = {
        graph_name(b.name): {str(bits): b.size for bits in (4, 8)} for b in plan.buffers.values()
    }
    memory: dict[str, Any] = {"live_sets": live_sets, "tensor_bytes": tensor_bytes}
    if graph is not None:
        memory["flash"] = {
            layer: {fmt.label: cost for fmt, cost in row.items()}
            for layer, row in flash_cost_table(graph, formats).items()
        }
    return memory
