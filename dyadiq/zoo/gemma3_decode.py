"""One decoding step of a Gemma 3 causal LM as an ONNX graph with a fixed-size KV cache.

Inputs: ``input_ids`` int64 [1, 1] (the newest token), ``position`` int64 [1] (its index,
0-based) and, for every layer i, ``past_key_i`` / ``past_value_i`` float32 [1, kv_heads,
P, head_dim] with P = ``max_positions`` slots. Outputs: ``logits`` [1, 1, V] and
``present_key_i`` / ``present_value_i`` (the caches with slot ``position`` written).

Shapes are static, so a compiler sees one graph: the new key and value go into their slot
with ``Where(arange(P) == position, new, past)`` (no scatter), and attention runs over all P
slots with an additive mask of -inf-like values on the slots after ``position`` (and, on
sliding-window layers, on those ``sliding_window`` or more before it). Unwritten slots hold
zeros but are masked, so they never contribute.

The step reuses the Hugging Face model's own decoder layers (eager attention) through a
small cache object whose ``update`` does the slot write, so it computes what the prefill
export computes, position by position. :func:`share_external_data` then gives every weight
the two graphs share, byte for byte, the prefill's initializer name and points it at the
prefill's data file: the decode graph adds a few hundred KB (rotary tables and such), not a
second copy of the weights, and a weight-only quantization of the prefill graph applies to
it by initializer name. Greedy decoding over the step: :mod:`dyadiq.zoo.kv_decode`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper

from dyadiq.errors import ZooError

log = logging.getLogger("dyadiq.zoo")

DECODE_MAX_POSITIONS = 256
INPUT_IDS = "input_ids"
POSITION = "position"
LOGITS = "logits"
EXPORT_OPSET = 18


def past_names(layers: int) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class CacheShape:
    """The per-layer cache tensor shape [1, kv_heads, max_positions, head_dim]."""

    layers: int
    kv_heads: int
    max_positions: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, self.kv_heads, self.max_positions, self.head_dim)

    def empty(self) -> dict[str, np.ndarray]:
        return {n: np.zeros(self.shape, np.float32) for n in past_names(self.layers)}

    @classmethod
    def of_graph(cls, model: onnx.ModelProto) -> CacheShape:
        """Read off a decode graph's ``past_key_0`` input and its count of layers."""
        inputs = {i.name: i for i in model.graph.input}
        if "past_key_0" not in inputs or POSITION not in inputs:
            raise ZooError("not a decode graph: it has no past_key_0 / position input")
        dims = [d.dim_value for d in inputs["past_key_0"].type.tensor_type.shape.dim]
        layers = sum(1 for n in inputs if n.startswith("past_key_"))
        return cls(layers, dims[1], dims[2], dims[3])


def cache_shape(config: Any, max_positions: int) -> CacheShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return CacheShape(
        config.num_hidden_layers, config.num_key_value_heads, max_positions, int(head_dim)
    )


def decode_step_module(model: Any, max_positions: int) -> Any:
    """A torch module ``(input_ids, position, *pasts) -> (logits, *presents)`` around a
    ``Gemma3ForCausalLM`` loaded with eager attention."""
    import torch

    config = model.config
    if config.final_logit_softcapping is not None:
        raise ZooError("final logit softcapping is not handled by the decode step")
    module_base: Any = torch.nn.Module  # torch may be untyped for mypy
    layer_types = list(config.layer_types)
    window = int(config.sliding_window or max_positions)

    class SlotCache:
        """The cache object Gemma3Attention calls: writes slot ``position`` per layer."""

        def __init__(self, pasts: Sequence[Any], slot: Any) -> None:
            self.pasts = pasts
            self.slot = slot  # bool [1, 1, P, 1]
            self.presents: list[Any] = []

        def update(self, key: Any, value: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
            past_k, past_v = self.pasts[2 * layer_idx], self.pasts[2 * layer_idx + 1]
            new_k = torch.where(self.slot, key, past_k)
            new_v = torch.where(self.slot, value, past_v)
            self.presents += [new_k, new_v]
            return new_k, new_v

    class DecodeStep(module_base):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner  # same attribute as the prefill export: same weight names

        def forward(self, input_ids: Any, position: Any, *pasts: Any) -> Any:
            text = self.inner.model
            hidden = text.embed_tokens(input_ids)
            slots = torch.arange(max_positions, dtype=torch.int64)
            slot = (slots == position).reshape(1, 1, max_positions, 1)
            low = torch.finfo(torch.float32).min
            causal = slots <= position
            sliding = causal & (slots > position - window)
            masks = {
                "full_attention": torch.where(causal, 0.0, low).reshape(1, 1, 1, -1),
                "sliding_attention": torch.where(sliding, 0.0, low).reshape(1, 1, 1, -1),
            }
            position_ids = position.reshape(1, 1)
            rotary = {t: text.rotary_emb(hidden, position_ids, t) for t in set(layer_types)}
            cache = SlotCache(pasts, slot)
            for i, layer in enumerate(text.layers):
                hidden = layer(
                    hidden,
                    attention_mask=masks[layer_types[i]],
                    position_embeddings=rotary[layer_types[i]],
                    position_ids=position_ids,
                    cache=cache,
                )
            logits = self.inner.lm_head(text.norm(hidden))
            return (logits, *cache.presents)

    return DecodeStep(model).eval()


def export_decode(
    model: Any, dst: pathlib.Path, *, max_positions: int = DECODE_MAX_POSITIONS
) -> CacheShape:
    """Export the decode step of ``model`` (fp32, eager attention) to ``dst`` with its
    weights in ``dst.name + '.data'``; checked against torch on one step."""
    import torch

    shape = cache_shape(model.config, max_positions)
    step = decode_step_module(model, max_positions)
    rng = np.random.default_rng(0)
    pasts = [
        torch.from_numpy(rng.standard_normal(shape.shape).astype(np.float32))
        for _ in range(2 * shape.layers)
    ]
    args = (torch.tensor([[2]], dtype=torch.int64), torch.tensor([3], dtype=torch.int64), *pasts)
    outputs = [LOGITS, *present_names(shape.layers)]
    with torch.no_grad():
        program = torch.onnx.export(
            step,
            args,
            dynamo=True,
            opset_version=EXPORT_OPSET,
            input_names=[INPUT_IDS, POSITION, *past_names(shape.layers)],
            output_names=outputs,
        )
        expected = [t.numpy() for t in step(*args)]
    if program is None:  # the dynamo exporter always returns one; typed Optional
        raise ZooError("torch.onnx.export returned no program; report this bug")
    program.save(str(dst), external_data=True)
    import onnxruntime as ort

    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    feeds = {INPUT_IDS: args[0].numpy(), POSITION: args[1].numpy()}
    feeds |= {n: p.numpy() for n, p in zip(past_names(shape.layers), pasts, strict=True)}
    got = session.run(outputs, feeds)
    worst = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected, strict=True))
    if worst > 1e-2:
        raise ZooError(f"the exported decode step disagrees with torch by {worst:.3g}")
    log.info("zoo: decode step matches torch (max |diff| %.2g)", worst)
    return shape


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _read_external(tensor: onnx.TensorProto, base: pathlib.Path) -> bytes:
    info = _external(tensor)
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"]))


def _content_key(tensor: onnx.TensorProto, data: bytes) -> tuple[int, tuple[int, ...], str]:
    return (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest())


def _rename_values(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename initializers, node inputs and outputs and value infos of the main graph."""
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
    for info in graph.value_info:
        if info.name in renames:
            info.name = renames[info.name]


def share_external_data(decode: pathlib.Path, prefill: pathlib.Path) -> tuple[int, int]:
    """Point every external initializer of ``decode`` whose type, shape and bytes equal one
    of ``prefill``'s (same folder) at the prefill's data file, under the prefill's name;
    the rest move to ``decode.name + '.data'``, rewritten.

    Matching is by content, not name: the exporter folds each weight's transpose into a new
    constant with a generated name (``val_154``) that differs between the two exports. Taking
    the prefill's names makes the two graphs' weights the same initializers, so a weight-only
    quantization of one applies to the other by name. Returns (shared, kept) counts."""
    if decode.parent.resolve() != prefill.parent.resolve():
        raise ZooError("the decode and prefill graphs must share a folder to share data")
    base = decode.parent
    model = onnx.load(str(decode), load_external_data=False)
    theirs: dict[tuple[int, tuple[int, ...], str], onnx.TensorProto] = {}
    for tensor in onnx.load(str(prefill), load_external_data=False).graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            theirs.setdefault(_content_key(tensor, _read_external(tensor, base)), tensor)
    shared_names: dict[str, str] = {}  # decode initializer -> the prefill's name
    own: list[tuple[onnx.TensorProto, bytes]] = []
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        data = _read_external(tensor, base)
        other = theirs.get(_content_key(tensor, data))
        if other is not None and other.name not in shared_names.values():
            shared_names[tensor.name] = other.name
            del tensor.external_data[:]
            tensor.external_data.extend(other.external_data)
        else:
            own.append((tensor, data))
    # any other value of the decode graph that happens to carry a name now taken moves aside
    taken = set(shared_names.values())
    interface = {v.name for v in (*model.graph.input, *model.graph.output)}
    values = {t.name for t in model.graph.initializer}
    values |= {name for node in model.graph.node for name in node.output}
    renames = {v: f"decode/{v}" for v in values - set(shared_names) if v in taken}
    if set(renames) & interface:
        raise ZooError(f"graph inputs/outputs collide with weight names: {sorted(renames)}")
    renames |= {old: new for old, new in shared_names.items() if old != new}
    _rename_values(model.graph, renames)
    data_name = decode.name + ".data"
    staging = base / f".{data_name}.tmp"
    with open(staging, "wb") as f:
        for tensor, data in own:
            offset = f.tell()
            f.write(data)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", len(data))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
    os.replace(staging, base / data_name)
    onnx.save(model, str(decode))
    return len(shared_names), len(own)


def export_decode_sharing(
    model: Any,
    dst: pathlib.Path,
    prefill: pathlib.Path,
    *,
    max_positions: int = DECODE_MAX_POSITIONS,
) -> CacheShape:
    """Export into a staging folder beside ``dst``, then move the graph next to the prefill
    graph with its shared weights pointing at the prefill's data (the graph last: its
    presence means the export is complete)."""
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".decode-export-", dir=dst.parent))
    tmp = dst.parent / f".{dst.stem}.staged.onnx"
    try:
        shape = export_decode(model, staging / dst.name, max_positions=max_positions)
        # the shared-data rewrite needs both graphs in one folder: the staged graph is
        # moved beside the prefill one under a temporary name, then renamed
        os.replace(staging / dst.name, tmp)
        os.replace(staging / (dst.name + ".data"), dst.parent / (tmp.name + ".data"))
        onnx_model = onnx.load(str(tmp), load_external_data=False)
        for tensor in onnx_model.graph.initializer:
            if external_data_helper.uses_external_data(tensor):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = tmp.name + ".data"
        onnx.save(onnx_model, str(tmp))
        shared, kept = share_external_data(tmp, prefill)
        log.info(
            "zoo: decode graph shares %d weight tensors with %s (%d of its own)",
            shared,
            prefill.name,
            kept,
        )
        _rename_graph(tmp, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for leftover in (tmp, tmp.parent / (tmp.name + ".data")):
            leftover.unlink(missing_ok=True)
    return shape


def _rename_graph(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Move ``src`` and its own data file to ``dst`` (data file first)."""
    model = onnx.load(str(src), load_external_data=False)
    old, new = src.name + ".data", dst.name + ".data"
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    os.replace(src.parent / old, dst.parent / new)
    onnx.save(model, str(src))
    os.replace(src, dst)
