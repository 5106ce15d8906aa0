"""A transpose at the lowest rank that moves the same elements, for the C kernel's four axes.

Axes of length 1 carry no data, and input axes that stay next to each other, in order, in the
output move as one block; dropping the first and merging the second leaves the element order of
both sides unchanged. ShuffleNet's channel shuffle, ``[1, g, c/g, h, w]`` by ``(0, 2, 1, 3, 4)``,
becomes ``[g, c/g, h*w]`` by ``(1, 0, 2)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def collapse_transpose(
    shape: Sequence[int], perm: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input shape, perm) of the smallest rank giving ``np.transpose(x, perm)``'s elements in
    the same order, ``x`` reshaped to that shape; rank 1 at least."""
    rank = len(shape)
    kept = [axis for axis in range(rank) if shape[axis] != 1]
    renumber = {axis: i for i, axis in enumerate(kept)}
    order = [renumber[p % rank] for p in perm if (p % rank) in renumber]  # output order
    runs: list[list[int]] = []  # input axes that stay adjacent and in order in the output
    for axis in order:
        if runs and runs[-1][-1] + 1 == axis:
            runs[-1].append(axis)
        else:
            runs.append([axis])
    if not runs:
        return (1,), (0,)
    by_input = sorted(range(len(runs)), key=lambda r: runs[r][0])  # runs in input order
    position = {run: i for i, run in enumerate(by_input)}
    lengths = [shape[a] for a in kept]
    new_shape = tuple(int(np.prod([lengths[a] for a in runs[r]])) for r in by_input)
    return new_shape, tuple(position[r] for r in range(len(runs)))
