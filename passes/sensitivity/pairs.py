"""Inter-layer pair terms ("Augmenting Hessians", METHODS.md section 3): which pairs to measure,
and the safe quadratic model the ILP is given.

Measured term, per width pair (b_i, b_j) the ILP chooses between (never extrapolated from
another width):

    Delta_ij(b_i, b_j) = L(Q_i, Q_j) - L(Q_i) - L(Q_j)          (L(none) = 0: float reference)

with its standard error from the per-row differences over the calibration samples.

The model the allocator prices, :func:`safe_cross_term`:

1. noise: a term within ``z`` standard errors of 0 is 0 (noise the ILP would otherwise chase);
2. floor: never predict less than the larger single-layer damage of the pair,
   D_i + D_j + c >= max(D_i, D_j), i.e. c >= -min(D_i, D_j);
3. sign (``PairModel.NONNEGATIVE``, the default): c >= 0. A sum of non-negative cross terms
   can never make a plan look better than its layers alone, so the ILP cannot buy "error
   cancellation" from many small negative terms (which alone sent the predicted damage of
   ppocr_cls to -21.7). ``PairModel.FLOOR`` keeps negative terms down to the floor;
   ``PairModel.RAW`` is the unfiltered measurement (for the benchmark only).

Pair selection (:func:`pairs_to_measure`): every pair of a small model; on a larger one, pairs
by structure - a layer and the weighted layers its output reaches through non-weighted ops
(producer / consumer), and layers whose outputs reach the same layer (the two branches of a
residual add, the inputs of a concat) - plus every pair among the ``top_k`` most sensitive.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence

from dyadiq.graph import QGraph


class PairModel(enum.StrEnum):
    NONNEGATIVE = "nonnegative"
    FLOOR = "floor"
    RAW = "raw"


def safe_cross_term(
    delta: float,
    stderr: float,
    single_a: float,
    single_b: float,
    *,
    z: float = 2.0,
    model: PairModel = PairModel.NONNEGATIVE,
) -> float:
    """The cross term the allocator is given for one measured term (module docstring)."""
    if model is PairModel.RAW:
        return delta
    if abs(delta) <= z * stderr:
        return 0.0
    value = max(delta, -min(single_a, single_b))
    return max(value, 0.0) if model is PairModel.NONNEGATIVE else value


def weighted_successors(graph: QGraph, layer_ids: Sequence[str]) -> dict[str, set[str]]:
    """For each layer, the layers of ``layer_ids`` its output reaches through other ops."""
    wanted = set(layer_ids)
    out: dict[str, set[str]] = {}
    for layer in layer_ids:
        seen: set[str] = set()
        reached: set[str] = set()
        frontier = list(graph.node(layer).outputs)
        while frontier:
            tensor = frontier.pop()
            for consumer in graph.consumers(tensor):
                if consumer.name in seen:
                    continue
                seen.add(consumer.name)
                if consumer.name in wanted:
                    reached.add(consumer.name)
                else:
                    frontier.extend(consumer.outputs)
        out[layer] = reached
    return out


def structural_pairs(graph: QGraph, layer_ids: Sequence[str]) -> set[tuple[str, str]]:
    """Producer / consumer pairs, and pairs of layers that feed the same layer."""
    order = {k: i for i, k in enumerate(layer_ids)}

    def ordered(a: str, b: str) -> tuple[str, str]:
        return (a, b) if order[a] < order[b] else (b, a)

    successors = weighted_successors(graph, layer_ids)
    chosen = {ordered(a, b) for a, succ in successors.items() for b in succ if a != b}
    feeders: dict[str, list[str]] = {}
    for a, succ in successors.items():
        for b in succ:
            feeders.setdefault(b, []).append(a)
    for group in feeders.values():
        chosen |= {ordered(a, b) for a, b in itertools.combinations(sorted(set(group)), 2)}
    return chosen


def pairs_to_measure(
    graph: QGraph,
    layer_ids: Sequence[str],
    damage: Mapping[str, float],
    *,
    all_pairs_up_to: int,
    top_k: int,
) -> list[tuple[str, str]]:
    """The pairs to measure, in layer order (module docstring)."""
    layer_ids = list(layer_ids)
    if len(layer_ids) <= all_pairs_up_to:
        return list(itertools.combinations(layer_ids, 2))
    order = {k: i for i, k in enumerate(layer_ids)}
    chosen = structural_pairs(graph, layer_ids)
    top = sorted(layer_ids, key=lambda i: (-damage.get(i, 0.0), order[i]))[:top_k]
    for a, b in itertools.combinations(top, 2):
        chosen.add((a, b) if order[a] < order[b] else (b, a))
    return sorted(chosen, key=lambda p: (order[p[0]], order[p[1]]))
