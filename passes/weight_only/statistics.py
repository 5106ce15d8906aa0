"""Input statistics of every MatMul weight: H = E[x x^T] over the calibration tokens.

One streaming pass of the float model, with each distinct activation that a weight
multiplies added as an output (q / k / v projections share one input, so one H). Only the
K x K sums are kept. These are the float model's inputs to each layer (all layers at once),
not the already-quantized prefix's: one forward pass per batch instead of one per layer,
which is what makes GPTQ affordable on a 163-MatMul language model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dyadiq.errors import CalibrationDataError
from dyadiq.passes.weight_only.layers import WeightLayer
from dyadiq.passes.weight_only.model_file import ModelFile, with_outputs


def activation_hessians(
    model: ModelFile,
    layers: Sequence[WeightLayer],
    batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """``activation tensor -> H [K, K]`` (float64, mean of x x^T over every token row)."""
    names = sorted({a for layer in layers for a in layer.activations})
    if not names:
        return {}
    session = model.session(with_outputs(model.header, names))
    return accumulate_hessians(session, names, batches)


def accumulate_hessians(
    session: Any,
    names: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    extra_feeds: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """H of the outputs ``names`` of ``session`` over ``batches`` (each fed together with
    ``extra_feeds``, e.g. dequantised weights)."""
    sums: dict[str, np.ndarray] = {}
    rows = 0
    for feeds in batches:
        values = session.run(list(names), {**feeds, **(extra_feeds or {})})
        for name, x in zip(names, values, strict=True):
            flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            if name not in sums:
                sums[name] = np.zeros((flat.shape[1], flat.shape[1]))
            sums[name] += flat.T @ flat
        rows += int(np.prod(values[0].shape[:-1]))
    if rows == 0:
        raise CalibrationDataError("no calibration batches: GPTQ needs input statistics")
    return {name: total / rows for name, total in sums.items()}
