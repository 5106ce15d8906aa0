"""A weight-only plan's widths (layer id -> code bits): one width for every layer, or the
per-layer damage the allocation ILP (:func:`.allocation.allocate_widths`) chooses from.

The damage of layer i at width b is :func:`.sensitivity.kl_damage`'s next-token KL with that
weight alone replaced by its dequantised codes, quantized by the prepared model's own
quantizer (GPTQ damage for a GPTQ model), so the ILP prices the codes the plan will get.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from dyadiq.passes.weight_only.layers import WeightLayer
from dyadiq.passes.weight_only.sensitivity import WeightFedModel, kl_damage

if TYPE_CHECKING:
    from dyadiq.passes.weight_only.pipeline import Prepared


def uniform_widths(layers: Sequence[WeightLayer], bits: int) -> dict[str, int]:
    """Every layer at ``bits``."""
    return {layer.id: bits for layer in layers}


def measured_damage(
    prepared: Prepared,
    batches: Sequence[Mapping[str, np.ndarray]],
    widths: Sequence[int],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[int, float]]:
    """``layer id -> width -> KL`` over ``batches`` for every layer of ``prepared`` at each of
    ``widths`` (a memoising ``prepared`` keeps the codes for the plan that follows)."""
    fed = WeightFedModel(prepared.source, prepared.inventory.layers, batches)
    return kl_damage(
        fed,
        lambda layer, b: prepared.quantize(layer, b).dequantize(),
        widths,
        progress=progress,
    )
