"""Attention over the KV cache of a decode step as one TVM kernel per layer, and the cache
write done in place.

A decode step exported from a Hugging Face model (:mod:`dyadiq.zoo.gemma3_decode`) computes
each layer's attention as a dozen ONNX ops: the new key and value go into their cache slot
with ``Where(slot, new, past)`` (a full copy of the cache), the cache is repeated for every
query head of its group (``Unsqueeze -> Expand -> Reshape``, another copy per head), the key
is transposed (a third), and two batched MatMuls, a scale, the additive mask and a Softmax
follow. Imported as they are, those become default-scheduled TIR that moves the whole cache
several times per layer and per token.

:func:`fuse_decode_attention` rewrites the ONNX graph (pattern, check, rewrite; a layer whose
ops do not match exactly keeps its ops) into two ops of the ``dyadiq.tvm`` domain:

- ``KvCacheWrite(past, new, slot)``: ``Where(slot, new, past)`` with ``past`` a graph input
  read by nothing else, ``new`` [B, KV, 1, D] and ``slot`` bool [1, 1, P, 1]. The kernel
  writes the new row into ``past``'s slot and returns ``past`` itself
  (``relax.call_tir_inplace``): the cache is never copied, and the graph's ``present_*``
  output is the caller's ``past_*`` tensor, updated.
- ``DecodeAttention(q, key, value, mask)`` (attribute ``scale``):
  ``softmax(scale * q K^T + mask) V`` for one query position, q [1, H, 1, D] against the
  cache [1, KV, P, D] (head h reads cache head ``h // (H / KV)``: the repeat the graph spelt
  out), mask [1, 1, 1, P]. One kernel reads each cache row once per head, straight from the
  cache, with no repeated or transposed copy.

The attention kernel skips the slots whose mask is below ``MASKED`` (the exporter's
``finfo(float32).min``): in the graph's own softmax such a slot's weight is
``exp(score + mask - max)``, which is exactly 0 in float32, so skipping it changes no bit of
the sum. A step always sees at least its own slot, so the sum is never empty. Otherwise the
kernel and the graph differ only in summation order (float rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import tvm
from onnx import helper
from tvm.script import tirx as T  # noqa: N812 (TVMScript convention)

from dyadiq.errors import UnsupportedModelError

DOMAIN = "dyadiq.tvm"
DECODE_ATTENTION = "DecodeAttention"
KV_CACHE_WRITE = "KvCacheWrite"
# Additive mask values at or below this mark slots the softmax gives weight 0: exp(-1e30)
# underflows to 0 in float32, as does anything below -104 relative to the maximum.
MASKED = -1e30
_OPAQUE = 8  # relax OpPatternKind kOpaque: FuseOps must not fuse into these kernels
# Scratch in "global" scope becomes a stack alloca (backends/tvm/x86_kernels.py says why).
_SCRATCH = "global"


@dataclass(frozen=True)
class AttentionShape:
    """One layer's decode attention: ``heads`` query heads over ``kv_heads`` cache heads of
    ``positions`` slots, ``head_dim`` values per head."""

    heads: int
    kv_heads: int
    positions: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse_decode_attention` rewrote, and why other candidates were left."""

    attention_layers: int
    cache_writes: int
    skipped: tuple[str, ...]


class _Graph:
    """Producers, consumers, shapes and constant values of an ONNX graph, for matching."""

    def __init__(self, model: onnx.ModelProto, constant: Callable[[str], np.ndarray | None]):
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.shapes: dict[str, list[int]] = {}
        for value in (*graph.input, *graph.output, *graph.value_info):
            dims = value.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                self.shapes[value.name] = [d.dim_value for d in dims]
        self.inputs = {v.name for v in graph.input}
        self.outputs = {v.name for v in graph.output}
        self.constant = constant

    def op(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def ints(self, name: str) -> list[int] | None:
        value = self.constant(name)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _attribute(node: onnx.NodeProto, name: str) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return None


def _repeat_source(g: _Graph, name: str, heads: int) -> str:
    """The cache tensor ``name`` repeats per query head: ``Reshape(Expand(Unsqueeze(c,
    axes=[2]), [B, KV, G, P, D]), [B, KV * G, P, D])`` with c [B, KV, P, D] and KV * G =
    ``heads``; raises ValueError with the reason when it is anything else."""
    reshape = g.op(name, "Reshape")
    expand = g.op(reshape.input[0], "Expand") if reshape else None
    unsqueeze = g.op(expand.input[0], "Unsqueeze") if expand else None
    if reshape is None or expand is None or unsqueeze is None:
        raise ValueError("the cache is not repeated per head by Unsqueeze/Expand/Reshape")
    source = unsqueeze.input[0]
    axes = g.ints(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else _attribute(unsqueeze, "axes")
    cache = g.shapes.get(source)
    expanded, target = g.ints(expand.input[1]), g.ints(reshape.input[1])
    if cache is None or len(cache) != 4 or list(axes or []) != [2]:
        raise ValueError(f"repeat of {source}: unsqueeze axes {axes}, cache shape {cache}")
    batch, kv_heads, positions, head_dim = cache
    group = heads // kv_heads
    if (
        heads % kv_heads
        or expanded != [batch, kv_heads, group, positions, head_dim]
        or target != [batch, heads, positions, head_dim]
    ):
        raise ValueError(f"repeat of {source} to {expanded} then {target}, not per-head")
    return source


def _match_attention(g: _Graph, softmax: onnx.NodeProto) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """``(old output MatMul, new DecodeAttention node)`` for the attention around
    ``softmax``; ValueError says why it does not match."""
    axis = _attribute(softmax, "axis")
    add = g.op(softmax.input[0], "Add")
    if axis not in (-1, 3) or add is None:
        raise ValueError("not Softmax(last axis) of an Add")
    scaled, mask = add.input
    if g.op(scaled, "Mul") is None:
        scaled, mask = mask, scaled
    mul = g.op(scaled, "Mul")
    if mul is None:
        raise ValueError("the scores are not scaled by a Mul before the mask")
    scores, scale_name = mul.input
    if g.constant(scale_name) is None:
        scores, scale_name = scale_name, scores
    scale = g.constant(scale_name)
    scores_mm = g.op(scores, "MatMul")
    if scale is None or np.asarray(scale).size != 1 or scores_mm is None:
        raise ValueError("the scores are not MatMul(q, K^T) times one constant")
    query, key_t = scores_mm.input
    transpose = g.op(key_t, "Transpose")
    if transpose is None or list(_attribute(transpose, "perm") or []) != [0, 1, 3, 2]:
        raise ValueError("the key is not transposed by perm [0, 1, 3, 2]")
    probs = softmax.output[0]
    readers = g.consumers.get(probs, [])
    if (
        len(readers) != 1
        or readers[0].op_type != "MatMul"
        or readers[0].input[0] != softmax.output[0]
    ):
        raise ValueError("the probabilities are not read by one MatMul(p, V)")
    out_mm = readers[0]
    q_shape, mask_shape = g.shapes.get(query), g.shapes.get(mask)
    if q_shape is None or len(q_shape) != 4 or q_shape[0] != 1 or q_shape[2] != 1:
        raise ValueError(f"the query is not [1, H, 1, D] (shape {q_shape})")
    heads = q_shape[1]
    key = _repeat_source(g, transpose.input[0], heads)
    value = _repeat_source(g, out_mm.input[1], heads)
    k_shape, v_shape = g.shapes[key], g.shapes[value]
    if k_shape != v_shape or k_shape[0] != 1 or k_shape[3] != q_shape[3]:
        raise ValueError(f"key {k_shape}, value {v_shape} and query {q_shape} do not fit")
    if mask_shape != [1, 1, 1, k_shape[2]]:
        raise ValueError(f"the mask is {mask_shape}, not [1, 1, 1, P]")
    node = helper.make_node(
        DECODE_ATTENTION,
        [query, key, value, mask],
        list(out_mm.output),
        name=out_mm.name,
        domain=DOMAIN,
        scale=float(np.asarray(scale).reshape(())),
    )
    return out_mm, node


def _match_cache_write(g: _Graph, where: onnx.NodeProto) -> onnx.NodeProto:
    """The KvCacheWrite replacing ``where``; ValueError says why it does not match."""
    slot, new, past = where.input
    if past not in g.inputs or len(g.consumers.get(past, [])) != 1 or past in g.outputs:
        raise ValueError(f"{past} is not a graph input read only by this Where")
    p_shape, n_shape, s_shape = g.shapes.get(past), g.shapes.get(new), g.shapes.get(slot)
    if p_shape is None or len(p_shape) != 4:
        raise ValueError(f"the cache {past} is not 4-d (shape {p_shape})")
    batch, kv_heads, positions, head_dim = p_shape
    if n_shape != [batch, kv_heads, 1, head_dim] or s_shape != [1, 1, positions, 1]:
        raise ValueError(f"new row {n_shape} / slot {s_shape} do not fit the cache {p_shape}")
    return helper.make_node(
        KV_CACHE_WRITE, [past, new, slot], list(where.output), name=where.name, domain=DOMAIN
    )


def fuse_decode_attention(
    model: onnx.ModelProto, constant: Callable[[str], np.ndarray | None]
) -> FusionReport:
    """Rewrite ``model`` in place (module docstring): every cache ``Where`` into
    ``KvCacheWrite``, every attention into ``DecodeAttention``, and the ops nothing reads
    any more removed. ``constant(name)`` is an initializer's value or None."""
    g = _Graph(model, constant)
    replaced: dict[str, onnx.NodeProto] = {}
    skipped: list[str] = []
    attention = writes = 0
    for node in list(model.graph.node):
        try:
            if node.op_type == "Softmax":
                old, new = _match_attention(g, node)
                replaced[old.name] = new
                attention += 1
            elif node.op_type == "Where" and node.input[2] in g.inputs:
                replaced[node.name] = _match_cache_write(g, node)
                writes += 1
        except ValueError as exc:
            skipped.append(f"{node.name}: {exc}")
    if replaced:
        nodes = [replaced.get(n.name, n) for n in model.graph.node]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        drop_dead_nodes(model.graph)
    return FusionReport(attention, writes, tuple(skipped))


def drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove the nodes none of whose outputs is read or a graph output, until none is."""
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        live = [n for n in graph.node if any(o in read for o in n.output)]
        if len(live) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(live)


def _lanes(width: int) -> int:
    """The widest float32 vector (16 = one zmm register) that divides ``width``."""
    return next(v for v in (16, 8, 4, 2, 1) if width % v == 0)


def decode_attention(shape: AttentionShape, scale: float) -> tvm.tirx.PrimFunc:
    """``out [1, H, 1, D] = softmax(scale q K^T + mask) V`` (module docstring), with
    ``(q, key, value, mask, out)`` arguments. Per head: the scores of the visible slots
    (a dot product of D, ``lanes`` partial sums in one vector, then their sum), their
    maximum, then ``exp(score - max)`` weights added into a D-wide vector accumulator as the
    value rows stream past; one division at the end."""
    heads, kv_heads, positions, dim = shape.heads, shape.kv_heads, shape.positions, shape.head_dim
    group, lanes = shape.group, _lanes(shape.head_dim)
    chunks = dim // lanes
    factor = T.float32(scale)
    lowest = T.float32(-3.4028234663852886e38)

    @T.prim_func(private=True)
    def kernel(
        q: T.Buffer((1, heads, 1, dim), "float32"),  # type: ignore[valid-type]
        key: T.Buffer((1, kv_heads, positions, dim), "float32"),  # type: ignore[valid-type]
        value: T.Buffer((1, kv_heads, positions, dim), "float32"),  # type: ignore[valid-type]
        mask: T.Buffer((1, 1, 1, positions), "float32"),  # type: ignore[valid-type]
        out: T.Buffer((1, heads, 1, dim), "float32"),  # type: ignore[valid-type]
    ) -> None:
        T.func_attr({"tir.noalias": True})
        for h in range(heads):
            score = T.alloc_buffer((positions,), "float32", scope=_SCRATCH)
            part = T.alloc_buffer((lanes,), "float32", scope=_SCRATCH)
            acc = T.alloc_buffer((dim,), "float32", scope=_SCRATCH)
            top = T.alloc_buffer((1,), "float32", scope=_SCRATCH)
            total = T.alloc_buffer((1,), "float32", scope=_SCRATCH)
            dot = T.alloc_buffer((1,), "float32", scope=_SCRATCH)
            top[0] = lowest
            for j in range(positions):
                if mask[0, 0, 0, j] > T.float32(MASKED):
                    for i in T.vectorized(lanes):
                        part[i] = T.float32(0)
                    for c in range(chunks):
                        for i in T.vectorized(lanes):
                            part[i] = (
                                part[i]
                                + q[0, h, 0, c * lanes + i] * key[0, h // group, j, c * lanes + i]
                            )
                    dot[0] = T.float32(0)
                    for i in range(lanes):
                        dot[0] = dot[0] + part[i]
                    score[j] = dot[0] * factor + mask[0, 0, 0, j]
                    top[0] = T.max(top[0], score[j])
            total[0] = T.float32(0)
            for d in T.vectorized(dim):
                acc[d] = T.float32(0)
            for j in range(positions):
                if mask[0, 0, 0, j] > T.float32(MASKED):
                    weight = T.exp(score[j] - top[0])
                    total[0] = total[0] + weight
                    for c in range(chunks):
                        for i in T.vectorized(lanes):
                            acc[c * lanes + i] = (
                                acc[c * lanes + i] + weight * value[0, h // group, j, c * lanes + i]
                            )
            for d in T.vectorized(dim):
                out[0, h, 0, d] = acc[d] / total[0]

    return kernel


def kv_cache_write(cache: tuple[int, ...]) -> tvm.tirx.PrimFunc:
    """``(past [B, KV, P, D], new [B, KV, 1, D], slot bool [1, 1, P, 1])``: every slot p
    with ``slot[p]`` becomes ``new`` in ``past`` itself (``Where(slot, new, past)`` in
    place; the caller declares ``past`` the output)."""
    batch, kv_heads, positions, dim = cache
    lanes = _lanes(dim)

    @T.prim_func(private=True)
    def kernel(
        past: T.Buffer((batch, kv_heads, positions, dim), "float32"),  # type: ignore[valid-type]
        new: T.Buffer((batch, kv_heads, 1, dim), "float32"),  # type: ignore[valid-type]
        slot: T.Buffer((1, 1, positions, 1), "bool"),  # type: ignore[valid-type]
    ) -> None:
        T.func_attr({"tir.noalias": True})
        for p in range(positions):
            if slot[0, 0, p, 0]:
                for b, h, c in T.grid(batch, kv_heads, dim // lanes):
                    for i in T.vectorized(lanes):
                        past[b, h, p, c * lanes + i] = new[b, h, 0, c * lanes + i]

    return kernel


def _static(ty: Any) -> list[int]:
    return [int(d) for d in ty.shape]


def converters() -> dict[str, Any]:
    """TVM ONNX-importer converters of the two ops (registered by
    :mod:`dyadiq.backends.tvm.weight_only_decode` for one import)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    attention: dict[tuple[AttentionShape, float], Any] = {}
    writes: dict[tuple[int, ...], Any] = {}

    class DecodeAttentionConverter(onnx_frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb: Any, inputs: list[Any], attr: dict[str, Any], params: Any) -> Any:
            q, key, value, mask = inputs
            q_shape, k_shape = _static(q.ty), _static(key.ty)
            shape = AttentionShape(q_shape[1], k_shape[1], k_shape[2], k_shape[3])
            if _static(value.ty) != k_shape or _static(mask.ty) != [1, 1, 1, shape.positions]:
                raise UnsupportedModelError(
                    f"DecodeAttention: value {_static(value.ty)} / mask {_static(mask.ty)} "
                    f"do not fit the key {k_shape}"
                )
            scale = float(attr["scale"])
            if (shape, scale) not in attention:
                func = decode_attention(shape, scale).with_attr("op_pattern", _OPAQUE)
                name = f"decode_attention_{shape.heads}x{shape.positions}x{shape.head_dim}"
                attention[(shape, scale)] = bb.add_func(func, name)
            return relax.call_tir(
                attention[(shape, scale)],
                [q, key, value, mask],
                relax.TensorType(q_shape, "float32"),
            )

    class KvCacheWriteConverter(onnx_frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb: Any, inputs: list[Any], attr: dict[str, Any], params: Any) -> Any:
            past, new, slot = inputs
            cache = tuple(_static(past.ty))
            if cache not in writes:
                func = kv_cache_write(cache).with_attr("op_pattern", _OPAQUE)
                writes[cache] = bb.add_func(func, "kv_cache_write")
            return relax.call_tir_inplace(writes[cache], [past, new, slot], [0], past.ty)

    return {DECODE_ATTENTION: DecodeAttentionConverter, KV_CACHE_WRITE: KvCacheWriteConverter}


def summarize(report: FusionReport) -> dict[str, Any]:
    """decode.json's entry for the fusion."""
    return {
        "attention_layers": report.attention_layers,
        "cache_writes_in_place": report.cache_writes,
        "not_fused": list(report.skipped),
    }
