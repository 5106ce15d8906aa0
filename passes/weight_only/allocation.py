"""Per-layer widths for weight-only quantization from the existing allocation ILP.

The measured KL damages become an :class:`~dyadiq.passes.allocation.AllocationProblem`
(one variable per weight: a tied embedding / LM head is one layer), the user's budget is
read by :func:`~dyadiq.passes.allocation.parse_budget` and solved by
:func:`~dyadiq.passes.allocation.solve`: the machinery the CNN path uses, nothing copied.

Conventions of this problem:

- activations stay float, so each candidate is ``LayerFormat(bits, 8)`` and the activation
  width is inert (every layer has the same one; no activation budget applies);
- a layer's size is its code bits, params x bits / 8: ``avg-wbits=3.5`` means 3.5 code bits
  per weight on average, the usual way group-wise widths are quoted. The scales and zero
  points (float32 + code-width zero point per group: 0.28 bits per weight at g = 128,
  asymmetric) come on top and are reported separately by the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dyadiq.errors import ConfigError
from dyadiq.passes.allocation import (
    Allocation,
    AllocationProblem,
    parse_budget,
    solve,
)
from dyadiq.passes.weight_only.layers import WeightLayer
from dyadiq.plan import LayerFormat

# activations are float in weight-only mode; the allocator's formats carry a width anyway
INERT_ACT_BITS = 8


# candidate widths: the same for every layer, or per layer id (a tied embedding / LM head
# that alone would exceed the budget at wide widths need not be measured there)
Widths = Sequence[int] | Mapping[str, Sequence[int]]


def _layer_widths(widths: Widths, layer: WeightLayer) -> Sequence[int]:
    if isinstance(widths, Mapping):
        if layer.id not in widths:
            raise ConfigError(f"no candidate widths for {layer.id}")
        return widths[layer.id]
    return widths


def weight_only_problem(
    layers: Sequence[WeightLayer],
    damage: Mapping[str, Mapping[int, float]],
    widths: Widths,
) -> AllocationProblem:
    """The ILP's problem: candidates ``widths`` for every layer, its measured damage at each,
    and code-bit sizes."""
    per_layer = {layer.id: list(_layer_widths(widths, layer)) for layer in layers}
    missing = [
        f"{layer.id} at {b} bits"
        for layer in layers
        for b in per_layer[layer.id]
        if b not in damage.get(layer.id, {})
    ]
    if missing:
        raise ConfigError(f"no measured damage for: {', '.join(missing[:5])}")
    return AllocationProblem(
        candidates={
            layer.id: [LayerFormat(b, INERT_ACT_BITS) for b in per_layer[layer.id]]
            for layer in layers
        },
        damage={
            layer.id: {
                LayerFormat(b, INERT_ACT_BITS): float(damage[layer.id][b])
                for b in per_layer[layer.id]
            }
            for layer in layers
        },
        size_bytes={
            layer.id: {
                LayerFormat(b, INERT_ACT_BITS): layer.params * b / 8 for b in per_layer[layer.id]
            }
            for layer in layers
        },
    )


def allocate_widths(
    layers: Sequence[WeightLayer],
    damage: Mapping[str, Mapping[int, float]],
    widths: Widths,
    budget: str,
) -> tuple[dict[str, int], Allocation]:
    """Least total predicted damage within ``budget`` (``avg-wbits=3.5``, ``size=120MB``;
    other resources do not apply to weight-only models): ``layer id -> bits``."""
    problem = weight_only_problem(layers, damage, widths)
    parsed = parse_budget(budget, problem)
    if set(parsed.limits()) - {"size"}:
        raise ConfigError(f"weight-only budgets are sizes (avg-wbits=, size=), not {budget!r}")
    allocation = solve(problem, parsed)
    return {i: f.weight_bits for i, f in allocation.formats.items()}, allocation
