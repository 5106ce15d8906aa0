"""Patterns: a sentence embedding's masked mean pooling and L2 normalisation -> integer ops.

sentence-transformers models end in (as ``torch.onnx`` exports them)
- masked mean pooling, :class:`ip.MaskedMeanPool`::

      M = Cast<float>(Unsqueeze(mask, -1))          mask: the integer [B, T] attention mask
      y = ReduceSum(x * M, axis 1) / Clip(ReduceSum(M, axis 1), min=eps)

- L2 normalisation (``torch.nn.functional.normalize``), :class:`ip.L2Normalize`::

      y = x / [Expand](Clip(ReduceL2(x, last axis, keepdims), min=eps))

Recognised structurally (op kinds, axes and constant values, never node names). The pooling
reads the integer mask the float one is made from (stepping back over integer Casts and the
trailing Unsqueeze), so the mask's Cast and Unsqueeze are not computed either when nothing
else reads them. Preconditions: ``x`` has integer codes (``has_codes``: the last LayerNorm's
wide residual stream, or an 8-bit site), static shapes, reductions over the token axis of a
rank-3 ``x`` (pooling) and the last axis (L2), keepdims as the patterns above, the Clips'
minimum in (0, 1] with no maximum, and every intermediate read only inside the pattern.
A Div that has the pattern's shape but fails one of these is declined with the reason (its
nodes run in float). The constants of the integer ops are chosen in :func:`mean_pool_op` and
:func:`l2_normalize_op`, once the input's quantizer is known.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq import integer_program as ip
from dyadiq.graph import QGraph
from dyadiq.op_facts import OpKind
from dyadiq.quantizers import ActQuant

INT64_HEADROOM = 1 << 62


@dataclass(frozen=True)
class MaskedMeanPoolMatch:
    div: gs.Node  # the op is emitted here: every input is computed by then
    x: gs.Tensor  # [B, T, D], with codes
    mask: gs.Tensor  # integer / boolean [B, T]
    nodes: tuple[gs.Node, ...]  # Mul, ReduceSum, ReduceSum, Clip (Div excluded)
    mask_nodes: tuple[gs.Node, ...]  # Cast / Unsqueeze from ``mask`` to the float mask


@dataclass(frozen=True)
class L2NormalizeMatch:
    div: gs.Node
    x: gs.Tensor
    eps: float
    nodes: tuple[gs.Node, ...]  # ReduceL2, Clip, [Expand] (Div excluded)


@dataclass(frozen=True)
class SentencePooling:
    pools: dict[str, MaskedMeanPoolMatch]  # by the Div's node name
    norms: dict[str, L2NormalizeMatch]
    absorbed: frozenset[str]  # nodes the integer ops replace (not the Divs)
    declined: tuple[str, ...]  # "Div <name>: reason"


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _is_float(tensor: gs.Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)
    except TypeError:
        return False


def _static(tensor: gs.Tensor) -> list[int] | None:
    dims = list(tensor.shape or [])
    return dims if dims and all(isinstance(d, int) and d > 0 for d in dims) else None


def _axes(node: gs.Node) -> list[int] | None:
    """A Reduce / Unsqueeze node's constant axes (attribute, or input 1 from opset 13/18)."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return [int(a) for a in np.asarray(node.inputs[1].values).reshape(-1)]
    return None


def _clip_min(node: gs.Node) -> float | None:
    """The constant minimum of a Clip with no maximum, else None."""
    lo: object = node.attrs.get("min")
    if len(node.inputs) > 1 and node.inputs[1].name:
        lo = node.inputs[1].values if isinstance(node.inputs[1], gs.Constant) else None
    has_max = "max" in node.attrs or (len(node.inputs) > 2 and bool(node.inputs[2].name))
    if lo is None or has_max:
        return None
    return float(np.asarray(lo).reshape(()))


def _read_only_by(tensor: gs.Tensor, readers: Collection[gs.Node]) -> bool:
    names = {n.name for n in readers}
    return all(c.name in names for c in tensor.outputs)


def _integer_mask(cast: gs.Tensor, rank: int) -> tuple[gs.Tensor, tuple[gs.Node, ...]] | str:
    """The integer [B, T] mask behind ``Cast<float>(Unsqueeze(mask, -1))``."""
    node = _producer(cast)
    if node is None or QGraph.kind(node) is not OpKind.CAST or _is_float(node.inputs[0]):
        return "the pooling mask is not a Cast of an integer mask"
    nodes = [node]
    tensor = node.inputs[0]
    unsqueeze = _producer(tensor)
    if unsqueeze is None or QGraph.kind(unsqueeze) is not OpKind.UNSQUEEZE:
        return "the pooling mask is not an Unsqueeze of the [B, T] mask"
    if _axes(unsqueeze) not in ([-1], [rank - 1]):
        return "the pooling mask's Unsqueeze does not add the trailing unit dim"
    nodes.append(unsqueeze)
    tensor = unsqueeze.inputs[0]
    while (cast_node := _producer(tensor)) is not None:  # integer Casts keep 0 and non-zero
        if QGraph.kind(cast_node) is not OpKind.CAST or _is_float(cast_node.inputs[0]):
            break
        if isinstance(cast_node.inputs[0], gs.Constant):
            break
        nodes.append(cast_node)
        tensor = cast_node.inputs[0]
    if isinstance(tensor, gs.Constant) or _is_float(tensor) or tensor.dtype is None:
        return "the pooling mask is not an integer tensor"
    return tensor, tuple(nodes)


def _match_pool(div: gs.Node, has_codes: Collection[str]) -> MaskedMeanPoolMatch | str | None:
    num, den = div.inputs
    total = _producer(num)
    clip = _producer(den)
    if total is None or QGraph.kind(total) is not OpKind.REDUCE_SUM:
        return None
    if clip is None or QGraph.kind(clip) is not OpKind.CLIP:
        return None
    count = _producer(clip.inputs[0])
    mul = _producer(total.inputs[0])
    if count is None or QGraph.kind(count) is not OpKind.REDUCE_SUM:
        return None
    if mul is None or QGraph.kind(mul) is not OpKind.MUL:
        return None
    mask_float = count.inputs[0]
    if mask_float.name not in [t.name for t in mul.inputs] or len(mul.inputs) != 2:
        return "the pooled product does not multiply by the counted mask"
    x = next(t for t in mul.inputs if t.name != mask_float.name)
    shape, mask_shape = _static(x), _static(mask_float)
    if shape is None or len(shape) != 3 or mask_shape != [shape[0], shape[1], 1]:
        return "masked mean pooling needs static [B, T, D] values and a [B, T, 1] mask"
    for reduce in (total, count):
        if _axes(reduce) not in ([1], [-2]) or int(reduce.attrs.get("keepdims", 1)) != 0:
            return "masked mean pooling sums over the token axis with keepdims=0 only"
    eps = _clip_min(clip)
    if eps is None or not 0.0 < eps <= 1.0:
        return "the token count's Clip is not a minimum in (0, 1] alone"
    inner = (mul, total, count, clip)
    for tensor, readers in (
        (mul.outputs[0], (total,)),
        (total.outputs[0], (div,)),
        (count.outputs[0], (clip,)),
        (clip.outputs[0], (div,)),
    ):
        if not _read_only_by(tensor, readers):
            return f"{tensor.name} is read outside the masked mean pooling"
    if x.name not in has_codes:
        return f"the pooled tensor {x.name} has no integer codes"
    found = _integer_mask(mask_float, 3)
    if isinstance(found, str):
        return found
    mask, mask_nodes = found
    if _static(mask) != shape[:2]:
        return f"the mask's shape {mask.shape} is not the values' [B, T] {shape[:2]}"
    return MaskedMeanPoolMatch(div, x, mask, inner, mask_nodes)


def _match_l2(div: gs.Node, has_codes: Collection[str]) -> L2NormalizeMatch | str | None:
    x, den = div.inputs
    nodes: list[gs.Node] = []
    node = _producer(den)
    if node is not None and QGraph.kind(node) is OpKind.EXPAND:
        nodes.append(node)
        node = _producer(node.inputs[0])
    if node is None or QGraph.kind(node) is not OpKind.CLIP:
        return None
    clip = node
    norm = _producer(clip.inputs[0])
    if norm is None or QGraph.kind(norm) is not OpKind.REDUCE_L2 or norm.inputs[0] is not x:
        return None
    shape = _static(x)
    if shape is None:
        return "L2 normalisation needs a static shape"
    if _axes(norm) not in ([-1], [len(shape) - 1]) or int(norm.attrs.get("keepdims", 1)) != 1:
        return "L2 normalisation over the last axis (keepdims) only"
    eps = _clip_min(clip)
    if eps is None or not 0.0 < eps <= 1.0:
        return "the norm's Clip is not a minimum in (0, 1] alone"
    chain = [norm, clip, *nodes]
    for inner, reader in zip(chain, [*chain[1:], div], strict=True):
        if not _read_only_by(inner.outputs[0], (reader,)):
            return f"{inner.outputs[0].name} is read outside the L2 normalisation"
    if x.name not in has_codes:
        return f"the normalised tensor {x.name} has no integer codes"
    return L2NormalizeMatch(div, x, eps, tuple(chain))


def find_sentence_pooling(graph: QGraph, has_codes: Collection[str]) -> SentencePooling:
    """Every masked mean pooling and L2 normalisation of ``graph`` whose input has integer
    codes (``has_codes``; a matched pooling's output then has codes too, in graph order)."""
    coded = set(has_codes)
    pools: dict[str, MaskedMeanPoolMatch] = {}
    norms: dict[str, L2NormalizeMatch] = {}
    declined: list[str] = []
    graph.graph.toposort()
    for node in graph.nodes():
        if graph.kind(node) is not OpKind.DIV or len(node.inputs) != 2:
            continue
        pool = _match_pool(node, coded)
        found: MaskedMeanPoolMatch | L2NormalizeMatch | str | None = pool
        if pool is None:
            found = _match_l2(node, coded)
        if isinstance(found, str):
            declined.append(f"Div {node.name}: {found}")
            continue
        if isinstance(found, MaskedMeanPoolMatch):
            pools[node.name] = found
        elif isinstance(found, L2NormalizeMatch):
            norms[node.name] = found
        else:
            continue
        coded.add(node.outputs[0].name)
    return SentencePooling(pools, norms, absorbed_nodes(pools, norms), tuple(declined))


def absorbed_nodes(
    pools: Mapping[str, MaskedMeanPoolMatch], norms: Mapping[str, L2NormalizeMatch]
) -> frozenset[str]:
    """The nodes the integer ops replace (their Divs excepted): each pattern's own, and the
    float mask's Cast / Unsqueeze when everything that reads them is replaced."""
    matches: list[MaskedMeanPoolMatch | L2NormalizeMatch] = [*pools.values(), *norms.values()]
    absorbed = {n.name for m in matches for n in m.nodes}
    changed = True
    while changed:
        changed = False
        for match in pools.values():
            for node in match.mask_nodes:
                if node.name in absorbed:
                    continue
                readers = [c for t in node.outputs for c in t.outputs]
                if readers and all(c.name in absorbed for c in readers):
                    absorbed.add(node.name)
                    changed = True
    return frozenset(absorbed)


def _largest(q: ActQuant) -> int:
    return max(q.qmax - q.zero_point, q.zero_point - q.qmin)


def mean_pool_op(
    match: MaskedMeanPoolMatch, x_codes: str, qx: ActQuant, output: str
) -> tuple[ip.MaskedMeanPool, ActQuant] | str:
    """The integer op and its output's (wide) quantizer, or why the sums could leave int64."""
    frac = 0 if qx.bits > 8 else ip.MEAN_POOL_FRAC_BITS  # wide codes are fine already
    tokens = int(match.x.shape[1])
    if _largest(qx) * tokens * 2 ** (frac + 1) >= INT64_HEADROOM:
        return "masked mean pooling: the token sum could leave int64"
    op = ip.MaskedMeanPool(output, x_codes, qx.zero_point, match.mask.name, frac)
    return op, ActQuant(qx.scale / 2**frac, 0, ip.WIDE_BITS, True)


def l2_normalize_op(
    match: L2NormalizeMatch, x_codes: str, qx: ActQuant, output: str
) -> tuple[ip.L2Normalize, ActQuant] | str:
    """The integer op and its output's quantizer (int32 codes at 2^-F): B, the significant
    bits each row keeps of its largest |v|, is the most with N 4^B <= 2^61."""
    width = int(match.x.shape[-1])
    frac = ip.L2_NORM_FRAC_BITS
    if _largest(qx) * 2 ** (frac + 1) >= INT64_HEADROOM:
        return "L2 normalisation: the scaled input could leave int64"
    norm_bits = (61 - width.bit_length()) // 2
    if norm_bits < 8:
        return f"L2 normalisation: {width} values leave too few bits for the sum of squares"
    eps_codes = max(int(np.ceil(match.eps / qx.scale)), 1)
    if eps_codes >= INT64_HEADROOM:
        return "L2 normalisation: eps is too large for the input's scale"
    op = ip.L2Normalize(output, x_codes, qx.zero_point, norm_bits, eps_codes, frac)
    return op, ActQuant(2.0**-frac, 0, ip.WIDE_BITS, True)
