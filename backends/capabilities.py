"""What each backend can run, declared once, so that plans are validated before rewriting
and the allocator never offers a format the target cannot execute.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph
from dyadiq.op_facts import OpKind
from dyadiq.plan import LayerFormat, PrecisionPlan


class Requantization(Enum):
    """How a backend rescales an accumulator to the next layer's codes."""

    FLOAT_SCALE = "float scale (DequantizeLinear / QuantizeLinear)"
    # clip(((acc * m + 2^(k-1)) >> k) + zero point): the reference interpreter's arithmetic
    DYADIC = "dyadic m / 2^k per channel, integer multiply and rounding shift"


@dataclass(frozen=True)
class Capabilities:
    name: str
    weight_bits: frozenset[int]
    act_bits: frozenset[int]
    weighted_kinds: frozenset[OpKind]
    per_channel_weights: bool
    requantization: Requantization

    def allows(self, kind: OpKind, fmt: LayerFormat) -> bool:
        return (
            kind in self.weighted_kinds
            and fmt.weight_bits in self.weight_bits
            and fmt.act_bits in self.act_bits
        )


_WEIGHTED = frozenset({OpKind.CONV, OpKind.GEMM, OpKind.MATMUL})

ONNX_QDQ = Capabilities(
    name="onnx-qdq",
    weight_bits=frozenset(range(2, 9)),  # <= 4 bits as ONNX int4 (opset 21)
    act_bits=frozenset({4, 8}),
    weighted_kinds=_WEIGHTED | {OpKind.CONV_TRANSPOSE},
    per_channel_weights=True,
    requantization=Requantization.FLOAT_SCALE,
)

INTEGER_ONNX = Capabilities(
    name="integer-onnx",
    weight_bits=frozenset(range(2, 9)),  # codes in int8 containers
    act_bits=frozenset({4, 8}),  # codes in uint8/int8 containers, clipped to the width
    # ConvTranspose: integerize lowers stride = kernel ones; others run as float islands
    weighted_kinds=_WEIGHTED | {OpKind.CONV_TRANSPOSE},
    per_channel_weights=True,
    requantization=Requantization.DYADIC,
)


MCU_C = Capabilities(
    name="mcu-c",
    weight_bits=frozenset(range(2, 9)),  # <= 4 bits packed two per byte, wider as int8
    act_bits=frozenset({4, 8}),  # one byte per code either way
    weighted_kinds=_WEIGHTED | {OpKind.CONV_TRANSPOSE},  # as integer-onnx
    per_channel_weights=True,
    requantization=Requantization.DYADIC,
)

TVM_INTEGER = Capabilities(
    name="tvm-integer",
    weight_bits=frozenset(range(2, 9)),  # codes in int8 containers; x86 kernels for every width
    act_bits=frozenset({4, 8}),  # codes in uint8/int8 containers
    weighted_kinds=_WEIGHTED | {OpKind.CONV_TRANSPOSE},  # as integer-onnx
    per_channel_weights=True,
    requantization=Requantization.DYADIC,
)


def allowed_formats(
    caps: Capabilities, kind: OpKind, formats: list[LayerFormat]
) -> list[LayerFormat]:
    return [f for f in formats if caps.allows(kind, f)]


def validate_plan(plan: PrecisionPlan, graph: QGraph, *targets: Capabilities) -> None:
    """Raise one error listing every layer whose format some target cannot run."""
    problems = []
    for layer_id, fmt in plan.layers.items():
        kind = graph.kind(graph.node(layer_id))
        for caps in targets:
            if not caps.allows(kind, fmt):
                problems.append(f"{layer_id} ({kind.value} {fmt.label}) on {caps.name}")
    if problems:
        raise ConfigError("the plan asks for formats a backend cannot run: " + "; ".join(problems))
