"""Pattern: ``Softmax(scores + mask)`` with an additive attention mask -> :class:`ip.MaskedSoftmax`.

A transformer adds to its quantized attention scores a float mask that is 0 where a token is
attended and a large negative number where it is not, then takes a softmax over the last axis.
The mask is a function of the integer ``attention_mask`` input only, so it carries one bit per
position: which positions are kept. The integer op reads that bit from the integer or boolean
tensor the float mask was made from, and the float mask itself is never computed.

Recognised structurally (op kinds and constant values, never node names); the mask tensor is
one of
- ``Where(cond, 0, m)``: kept where ``cond``;  ``Where(cond, m, 0)``: kept where ``not cond``;
- ``Mul(Sub(1, Cast(a)), m)`` (either operand order of the Mul): kept where ``a != 0``, for
  an integer / boolean ``a`` of zeros and ones (the attention-mask convention of BERT exports);
with m a scalar constant <= -``MASK_MIN_MAGNITUDE``: exp(m + score) is then 0 in float32, so
the float model excludes the masked positions exactly as the integer op does. From ``cond`` or
``a`` the match steps back over ops that change neither which positions are kept nor how the
mask broadcasts (integer Casts, an And with an all-True constant, order-keeping reshapes:
:func:`_peel`), so a mask made from the model's ``attention_mask`` input reads that input,
and its plumbing is no float island.

Preconditions: the Add's output feeds only that Softmax, over the last axis; the scores and the
Softmax output are quantized (the QDQ simulator's sites), the mask is not; the mask's shape
broadcasts to the scores'. A candidate (an Add that feeds a Softmax) that fails one of these is
declined with the reason, and its nodes run as they did (float islands).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph
from dyadiq.op_facts import OpKind

MASK_MIN_MAGNITUDE = 1e4


@dataclass(frozen=True)
class MaskedSoftmaxMatch:
    add: gs.Node
    softmax: gs.Node
    scores: gs.Tensor  # quantized
    keep: gs.Tensor  # integer / boolean tensor that says which positions are kept
    keep_nonzero: bool  # kept where (keep != 0) == keep_nonzero
    mask_nodes: tuple[gs.Node, ...]  # the ops from ``keep`` to the float mask


@dataclass(frozen=True)
class MaskedSoftmaxMatches:
    matches: dict[str, MaskedSoftmaxMatch]  # by the Add's node name
    absorbed: frozenset[str]  # Softmax nodes and mask ops that nothing else reads
    declined: tuple[str, ...]  # "Add <name>: reason"


def _scalar(tensor: gs.Tensor) -> float | None:
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        if values.size == 1 and np.issubdtype(values.dtype, np.floating):
            return float(values.reshape(()))
    return None


def _is_float(tensor: gs.Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)
    except TypeError:
        return False


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _where_mask(node: gs.Node) -> tuple[gs.Tensor, bool, tuple[gs.Node, ...]] | str:
    cond, a, b = node.inputs
    va, vb = _scalar(a), _scalar(b)
    if va is None or vb is None:
        return "the mask's Where does not choose between two scalar constants"
    if cond.dtype is None or np.dtype(cond.dtype) != np.bool_:
        return "the mask's Where condition is not boolean"
    if va == 0.0 and vb <= -MASK_MIN_MAGNITUDE:
        return cond, True, (node,)
    if vb == 0.0 and va <= -MASK_MIN_MAGNITUDE:
        return cond, False, (node,)
    return f"the mask's Where chooses {va:g} / {vb:g}, not 0 and <= -{MASK_MIN_MAGNITUDE:g}"


def _scaled_complement_mask(node: gs.Node) -> tuple[gs.Tensor, bool, tuple[gs.Node, ...]] | str:
    factors = [_scalar(t) for t in node.inputs]
    if sum(f is not None for f in factors) != 1:
        return "the mask's Mul is not by one scalar constant"
    scale = next(f for f in factors if f is not None)
    if scale > -MASK_MIN_MAGNITUDE:
        return f"the mask's Mul is by {scale:g}, not <= -{MASK_MIN_MAGNITUDE:g}"
    complement = next(t for t, f in zip(node.inputs, factors, strict=True) if f is None)
    sub = _producer(complement)
    if sub is None or QGraph.kind(sub) is not OpKind.SUB or _scalar(sub.inputs[0]) != 1.0:
        return "the mask's Mul does not scale 1 - mask"
    cast = _producer(sub.inputs[1])
    if cast is None or QGraph.kind(cast) is not OpKind.CAST or _is_float(cast.inputs[0]):
        return "the mask's 1 - mask is not of a Cast integer / boolean mask"
    return cast.inputs[0], True, (node, sub, cast)


def _mask_source(mask: gs.Tensor) -> tuple[gs.Tensor, bool, tuple[gs.Node, ...]] | str:
    node = _producer(mask)
    if node is None:
        return "the mask is not computed from an integer mask (no producing op)"
    kind = QGraph.kind(node)
    if kind is OpKind.WHERE:
        return _where_mask(node)
    if kind is OpKind.MUL:
        return _scaled_complement_mask(node)
    return f"the mask comes from a {node.op}, not a Where or a scaled 1 - mask"


def _same_broadcast(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Whether ``a`` and ``b`` broadcast alike: equal static shapes once the shorter is
    padded with leading 1s (an Unsqueeze / Reshape that only adds leading unit dims)."""
    sa, sb = list(a.shape or []), list(b.shape or [])
    if not all(isinstance(d, int) for d in [*sa, *sb]):
        return False
    width = max(len(sa), len(sb))
    return [1] * (width - len(sa)) + sa == [1] * (width - len(sb)) + sb


def _keeps_nonzero(cast: gs.Node) -> bool:
    """A Cast that maps zero to zero and non-zero to non-zero on a 0/1 mask: to bool, or
    from bool, or between integer types (a mask's 0 and 1 survive any of them)."""
    source = cast.inputs[0]
    if source.dtype is None or _is_float(source):
        return False
    return cast.outputs[0].dtype is not None and not _is_float(cast.outputs[0])


# reshapes that keep the row-major element order
_REORDER_FREE = (OpKind.UNSQUEEZE, OpKind.RESHAPE, OpKind.FLATTEN, OpKind.SQUEEZE)


def _identity_gather(node: gs.Node) -> bool:
    """A Gather of rows 0, 1, ..., n-1 of an n-row tensor, in order: a reshape of it."""
    data, indices = node.inputs[0], node.inputs[1]
    rows = (data.shape or [None])[0]
    if not isinstance(indices, gs.Constant) or not isinstance(rows, int):
        return False
    axis = int(node.attrs.get("axis", 0))
    values = np.asarray(indices.values).reshape(-1)
    return axis in (0, -len(data.shape)) and np.array_equal(values, np.arange(rows))


def _all_true_operand(node: gs.Node) -> gs.Tensor | None:
    """The other operand of ``And(x, all-True constant)`` (which only broadcasts x)."""
    if len(node.inputs) != 2:
        return None
    fixed = [t for t in node.inputs if isinstance(t, gs.Constant)]
    data = [t for t in node.inputs if isinstance(t, gs.Variable)]
    if len(fixed) != 1 or len(data) != 1 or not np.all(np.asarray(fixed[0].values)):
        return None
    return data[0]


def _peel(keep: gs.Tensor, nodes: tuple[gs.Node, ...]) -> tuple[gs.Tensor, tuple[gs.Node, ...]]:
    """Step back from ``keep`` over ops that change neither which positions are non-zero
    nor how the mask broadcasts, so that the integer op reads e.g. the ``attention_mask``
    input itself: integer Casts; an And with an all-True constant (it only broadcasts; the
    float mask broadcasts to the scores, so its operand does too); and chains of reshapes
    that keep the element order (Reshape, Flatten, Squeeze, Unsqueeze, a Gather of rows
    0..n-1 in order, as transformers export the mask's expansion), accepted where the
    tensor reached broadcasts as the one the chain started from."""
    anchor, current, passed = keep, keep, nodes
    while (node := _producer(current)) is not None:
        kind = QGraph.kind(node)
        source = node.inputs[0] if node.inputs else None
        if source is None or isinstance(source, gs.Constant):
            source = _all_true_operand(node) if kind is OpKind.AND else None
            if source is None:
                break
        if kind is OpKind.AND:
            step = _all_true_operand(node)
            if step is None:
                break
            anchor = step  # its own broadcast: the And only widened it
        elif kind is OpKind.CAST:
            if not _keeps_nonzero(node):
                break
            step = source
        elif kind in _REORDER_FREE or (kind is OpKind.GATHER and _identity_gather(node)):
            step = source
        else:
            break
        current, passed = step, (*passed, node)
        if current is anchor or _same_broadcast(current, anchor):
            keep, nodes = current, passed
    return keep, nodes


def _broadcasts(mask: gs.Tensor, scores: gs.Tensor) -> bool:
    m, s = list(mask.shape or []), list(scores.shape or [])
    if not s or len(m) > len(s):
        return False
    for dm, ds in zip(reversed(m), reversed(s), strict=False):
        if not isinstance(dm, int) or not isinstance(ds, int) or dm not in (1, ds):
            return False
    return True


def _match(
    graph: QGraph,
    add: gs.Node,
    quantized: Collection[str],
    scores_blocker: Callable[[gs.Tensor], str | None],
) -> MaskedSoftmaxMatch | str | None:
    out = add.outputs[0]
    if len(out.outputs) != 1 or graph.kind(out.outputs[0]) is not OpKind.SOFTMAX:
        return None  # not a candidate
    softmax = out.outputs[0]
    graph_outputs = {t.name for t in graph.graph.outputs}
    if out.name in graph_outputs:
        return "the masked scores are a model output"
    rank = len(out.shape or ())
    if rank == 0 or int(softmax.attrs.get("axis", -1)) % rank != rank - 1:
        return "the Softmax is not over the last axis"
    if softmax.outputs[0].name not in quantized:
        return "the Softmax output is not quantized"
    if out.name in quantized:
        return "the masked scores are quantized (an integer Add and Softmax instead)"
    operands = [t for t in add.inputs if isinstance(t, gs.Variable)]
    scores = [t for t in operands if t.name in quantized]
    masks = [t for t in operands if t.name not in quantized]
    if len(operands) != 2 or len(scores) != 1 or len(masks) != 1:
        return "the Add does not add one unquantized mask to quantized scores"
    blocker = scores_blocker(scores[0])
    if blocker is not None:
        return blocker
    if not _broadcasts(masks[0], scores[0]):
        return f"the mask's shape {masks[0].shape} does not broadcast to the scores'"
    source = _mask_source(masks[0])
    if isinstance(source, str):
        return source
    keep, keep_nonzero, nodes = source
    keep, nodes = _peel(keep, nodes)
    if isinstance(keep, gs.Constant):
        return "the mask is a constant"
    if not _broadcasts(keep, scores[0]):
        return f"the mask's shape {keep.shape} does not broadcast to the scores' {scores[0].shape}"
    return MaskedSoftmaxMatch(add, softmax, scores[0], keep, keep_nonzero, nodes)


def find_masked_softmax(
    graph: QGraph,
    quantized: Collection[str],
    scores_blocker: Callable[[gs.Tensor], str | None] = lambda _: None,
) -> MaskedSoftmaxMatches:
    """Every masked-softmax candidate of ``graph``: matched, or declined with the reason.

    ``quantized`` names the tensors the plan quantizes; ``scores_blocker`` says why the
    integer softmax cannot take these scores (their scale), or None."""
    matches: dict[str, MaskedSoftmaxMatch] = {}
    declined: list[str] = []
    for node in graph.nodes():
        if graph.kind(node) is not OpKind.ADD:
            continue
        found = _match(graph, node, quantized, scores_blocker)
        if isinstance(found, MaskedSoftmaxMatch):
            matches[node.name] = found
        elif found is not None:
            declined.append(f"Add {node.name}: {found}")
    absorbed = {m.softmax.name for m in matches.values()}
    readers_done = {m.add.name for m in matches.values()} | absorbed
    graph_outputs = {t.name for t in graph.graph.outputs}
    # a mask op is dropped when everything that reads it is dropped (walk from the mask back)
    changed = True
    candidates = [n for m in matches.values() for n in m.mask_nodes]
    while changed:
        changed = False
        for node in candidates:
            if node.name in readers_done:
                continue
            outputs = [t for t in node.outputs if t.name]
            if any(t.name in graph_outputs for t in outputs):
                continue
            if all(c.name in readers_done for t in outputs for c in t.outputs):
                readers_done.add(node.name)
                absorbed.add(node.name)
                changed = True
    return MaskedSoftmaxMatches(matches, frozenset(absorbed), tuple(declined))
