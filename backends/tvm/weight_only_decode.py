"""A weight-only language-model graph compiled with TVM, its products on the int4 kernels.

:func:`kernel_graph` rewrites a float ONNX graph and its group-wise codes (layer id ->
:class:`GroupwiseWeight`, e.g. :func:`dyadiq.passes.weight_only.transfer.codes_for_layers`)
into a graph TVM's ONNX importer takes with two extra ops of this module's domain:

- ``Int4MatMul(x, packed, scales, zeros)`` for every MatMul reader of a weight of 4 bits or
  fewer (2- and 3-bit codes fit a nibble): the kernel of
  :mod:`dyadiq.backends.tvm.weight_only_kernels`, weights in its tiled layout;
- ``Int4Gather(ids, packed, scales, zeros)`` for a Gather reader (the token embedding): the
  looked-up rows read out of the same tiled tensors (a tied embedding and LM head are
  stored once), unpacked and dequantised, ``s (q - z)``, with Relax ops.

A weight with salient input columns (:mod:`dyadiq.passes.weight_only.salient`) keeps them
as a small float side product added to each reader's output, in standard ops TVM's importer
takes: ``Gather(x, columns, axis=-1) @ S^T`` for a MatMul reader, ``S[ids] @ P`` (P the
one-hot placement of the columns) for a Gather reader; S is the 8-bit columns dequantised
at build time, as the exported model's DequantizeLinear computes them.

Weights wider than 4 bits (or of shapes the kernel refuses: N not a multiple of 8, K not
one of the group size) have no kernel here: they are dequantised at build time to float
initializers (``s (q - z)``, exactly what DequantizeLinear computes) and the report lists
them.

:func:`build_decode_library` first fuses each layer's attention over the KV cache into one
kernel and turns the cache update into an in-place write
(:mod:`dyadiq.backends.tvm.decode_attention`); everything else (norms, rotary embedding, the
MLP's activation, with ``Pow`` by 2 or 3 as products: :mod:`dyadiq.backends.tvm.small_powers`)
is imported by TVM's ONNX frontend, fused by Relax and compiled with the default CPU
pipeline. It writes ``model.so`` and ``decode.json`` (target, inputs and outputs)
into a folder; :class:`TvmDecodeStep` runs one decoding step of it, keeping the cache in TVM
tensors that each step updates in place.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from onnx import helper, numpy_helper
from tvm import relax

from dyadiq.backends.tvm import decode_attention
from dyadiq.backends.tvm.small_powers import powers_as_products
from dyadiq.backends.tvm.weight_only_kernels import (
    CpuTarget,
    Int4Shape,
    cpu_target,
    int4_matmul,
    kernel_weights,
)
from dyadiq.errors import ConfigError, UnsupportedModelError
from dyadiq.io import prepare_output_dir, write_text_atomic
from dyadiq.passes.weight_only.groupwise import GroupwiseWeight
from dyadiq.passes.weight_only.layers import Use, WeightLayer
from dyadiq.passes.weight_only.salient import SalientColumns

DOMAIN = "dyadiq.tvm"
INT4_MATMUL = "Int4MatMul"
INT4_GATHER = "Int4Gather"
LIBRARY_NAME = "model.so"
METADATA_NAME = "decode.json"
# /2: attention fused, cache written in place (a /1 build copied the cache every step)
FORMAT = "dyadiq-tvm-decode/2"
AARCH64_COMPILER = "aarch64-linux-gnu-gcc"
_OPAQUE = 8  # relax OpPatternKind kOpaque: FuseOps must not fuse into the kernel


def _unsigned(q: GroupwiseWeight) -> tuple[np.ndarray, np.ndarray]:
    """Codes and zero points moved to 0..15 (signed codes shift by 8 with their zero
    points, which leaves s (q - z) unchanged)."""
    lo, _ = q.format.code_range
    shift = 8 if lo < 0 else 0
    return q.codes.astype(np.int32) + shift, q.zero_points.astype(np.int32) + shift


def kernel_graph(
    header: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    quantized: Mapping[str, GroupwiseWeight],
    load: Any,
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The graph with each quantized layer's readers on the int4 ops (module docstring).

    ``load(initializer_name) -> np.ndarray`` reads a float initializer that stays (the
    caller's external-data access). Returns the model (every initializer loaded) and, per
    layer not on a kernel, why."""
    by_id = {layer.id: layer for layer in layers}
    model = onnx.ModelProto()
    model.CopyFrom(header)
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    replaced: dict[str, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    off_kernel: dict[str, str] = {}
    for layer_id, q in quantized.items():
        layer = by_id[layer_id]
        base = layer.initializer
        if q.format.bits > 4:
            off_kernel[layer_id] = f"{q.format.bits}-bit: dequantised to float (no kernel)"
            new_inits.append(numpy_helper.from_array(layer.stored(q.dequantize()), base))
            continue
        codes, zeros = _unsigned(q)
        group = q.format.group_size
        try:
            shape = Int4Shape.of(1, layer.columns, layer.rows, group)
        except ConfigError as exc:
            off_kernel[layer_id] = f"dequantised to float: {exc}"
            new_inits.append(numpy_helper.from_array(layer.stored(q.dequantize()), base))
            continue
        # one copy in the kernel's tiled layout, read by the MatMul readers and by the
        # Gather readers alike (a tied embedding and LM head stay one tensor)
        names = [f"{base}_t4_{part}" for part in ("packed", "scales", "zeros")]
        arrays = kernel_weights(codes, q.scales, zeros, shape)
        new_inits += [numpy_helper.from_array(a, n) for a, n in zip(arrays, names, strict=True)]
        for reader in layer.readers:
            old = nodes[reader.node]
            op, first = (
                (INT4_MATMUL, old.input[0])
                if reader.use is Use.MATMUL
                else (INT4_GATHER, old.input[1])
            )
            node = helper.make_node(
                op, [first, *names], list(old.output), name=old.name, domain=DOMAIN, group=group
            )
            replaced[old.name] = [node]
            if q.salient is not None:
                side_inits, side_nodes = _salient_side(layer, q.salient, reader.use, node)
                new_inits += [t for t in side_inits if t.name not in {i.name for i in new_inits}]
                replaced[old.name] += side_nodes
    dropped = {by_id[i].initializer for i in quantized}
    kept = []
    for tensor in graph.initializer:
        if tensor.name in dropped:
            continue
        array = load(tensor.name)
        kept.append(numpy_helper.from_array(array, tensor.name))
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new_inits])
    out_nodes = [m for n in graph.node for m in replaced.get(n.name, [n])]
    del graph.node[:]
    graph.node.extend(out_nodes)
    _drop_dead(graph)
    if replaced:
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model, off_kernel


def _salient_side(
    layer: WeightLayer, salient: SalientColumns, use: Use, node: onnx.NodeProto
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Initializers and nodes adding ``salient``'s columns to ``node``'s output, whose
    output is renamed (``node``: an Int4MatMul or Int4Gather reader of ``layer``)."""
    base = f"{layer.initializer}_salient"
    y = node.output[0]
    main, picked, side = f"{y}/main", f"{y}/salient_in", f"{y}/salient"
    node.output[0] = main
    values = salient.values()  # [R, k]
    tag = f"{node.name}/salient"
    if use is Use.MATMUL:
        inits = [
            numpy_helper.from_array(salient.columns, f"{base}_columns"),
            numpy_helper.from_array(np.ascontiguousarray(values.T), f"{base}_t"),
        ]
        nodes = [
            helper.make_node(
                "Gather", [node.input[0], inits[0].name], [picked], name=f"{tag}_gather", axis=-1
            ),
            helper.make_node("MatMul", [picked, inits[1].name], [side], name=f"{tag}_matmul"),
        ]
    else:
        placement = np.zeros((salient.columns.size, layer.columns), np.float32)
        placement[np.arange(salient.columns.size), salient.columns] = 1.0
        inits = [
            numpy_helper.from_array(values, f"{base}_rows"),
            numpy_helper.from_array(placement, f"{base}_placement"),
        ]
        nodes = [
            helper.make_node(
                "Gather", [inits[0].name, node.input[0]], [picked], name=f"{tag}_gather", axis=0
            ),
            helper.make_node("MatMul", [picked, inits[1].name], [side], name=f"{tag}_place"),
        ]
    return inits, [*nodes, helper.make_node("Add", [main, side], [y], name=f"{tag}_add")]


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Nodes (a tied LM head's Transpose) and initializers nothing reads any more."""
    decode_attention.drop_dead_nodes(graph)
    read = {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _constant(expr: Any) -> np.ndarray:
    if not isinstance(expr, relax.Constant):
        raise UnsupportedModelError("the int4 ops want their weights as initializers")
    return np.asarray(expr.data.numpy())


def _converters() -> dict[str, Any]:
    from tvm.relax.frontend.onnx import onnx_frontend

    kernels: dict[Int4Shape, Any] = {}

    class Int4MatMulConverter(onnx_frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb: Any, inputs: list[Any], attr: dict[str, Any], params: Any) -> Any:
            x, packed, scales, zeros = inputs
            x_shape = [int(d) for d in x.ty.shape]
            tiles, half, tile = (int(d) for d in packed.ty.shape)
            rows = int(np.prod(x_shape[:-1]))
            shape = Int4Shape.of(rows, 2 * half, tiles * tile, int(attr["group"]))
            if shape not in kernels:
                func = int4_matmul(shape).with_attr("op_pattern", _OPAQUE)
                kernels[shape] = bb.add_func(func, f"int4_matmul_{rows}x{shape.k}x{shape.n}")
            flat = bb.emit(relax.op.reshape(x, (rows, shape.k)))
            out = bb.emit(
                relax.call_tir(
                    kernels[shape],
                    [flat, packed, scales, zeros],
                    relax.TensorType((rows, shape.n), "float32"),
                )
            )
            return relax.op.reshape(out, (*x_shape[:-1], shape.n))

    class Int4GatherConverter(onnx_frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb: Any, inputs: list[Any], attr: dict[str, Any], params: Any) -> Any:
            ids, packed, scales, zeros = inputs
            group = int(attr["group"])
            id_shape = [int(d) for d in ids.ty.shape]
            count = int(np.prod(id_shape))
            _, half, tile = (int(d) for d in packed.ty.shape)
            flat = bb.emit(relax.op.reshape(ids, (count,)))
            tile_of = bb.emit(relax.op.floor_divide(flat, relax.const(tile, "int64")))
            lane = bb.emit(relax.op.floor_mod(flat, relax.const(tile, "int64")))

            def row(tiled: Any, width: int) -> Any:
                """Row ``id`` of a [tiles, width, tile] tensor: [count, width]."""
                slab = relax.op.take(tiled, tile_of, axis=0)  # [count, width, tile]
                index = relax.op.broadcast_to(
                    relax.op.reshape(lane, (count, 1, 1)), (count, width, 1)
                )
                picked = relax.op.gather_elements(slab, index, axis=2)
                return bb.emit(relax.op.reshape(picked, (count, width)))

            pairs = row(packed, half)  # [count, K/2] uint8
            low = relax.op.bitwise_and(pairs, relax.const(15, "uint8"))
            high = relax.op.right_shift(pairs, relax.const(4, "uint8"))
            codes = bb.emit(relax.op.stack([low, high], axis=2))  # [count, K/2, 2]
            q = relax.op.astype(relax.op.reshape(codes, (count, 2 * half)), "float32")
            groups = 2 * half // group
            s = relax.op.repeat(row(scales, groups), group, axis=1)
            z = relax.op.repeat(relax.op.astype(row(zeros, groups), "float32"), group, axis=1)
            w = bb.emit(relax.op.multiply(relax.op.subtract(q, z), s))
            return relax.op.reshape(w, (*id_shape, 2 * half))

    return {
        INT4_MATMUL: Int4MatMulConverter,
        INT4_GATHER: Int4GatherConverter,
        **decode_attention.converters(),
    }


@contextlib.contextmanager
def _with_int4_ops() -> Iterator[None]:
    """TVM's importer has no registration hook: its op table is a function, wrapped here
    for the duration of one import."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    extra = _converters()
    onnx_frontend._get_convert_map = lambda: {**original(), **extra}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def _input_specs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    specs = []
    for value in model.graph.input:
        tensor = value.type.tensor_type
        dims = [d.dim_value for d in tensor.shape.dim]
        if any(d <= 0 for d in dims):
            raise UnsupportedModelError(f"input {value.name} has no static shape: {dims}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        specs.append({"name": value.name, "shape": dims, "dtype": str(np.dtype(dtype))})
    return specs


def import_kernel_graph(model: onnx.ModelProto) -> tvm.IRModule:
    """The kernel graph as a Relax module (static input shapes from the graph)."""
    from tvm.relax.frontend.onnx import from_onnx

    specs = _input_specs(model)
    with _with_int4_ops():
        return from_onnx(
            model,
            shape_dict={s["name"]: s["shape"] for s in specs},
            dtype_dict={s["name"]: s["dtype"] for s in specs},
            keep_params_in_input=False,
        )


def is_current_build(folder: Path) -> bool:
    """Whether ``folder`` holds a build of this version (an older one is rebuilt, not run)."""
    metadata = Path(folder) / METADATA_NAME
    return metadata.is_file() and json.loads(metadata.read_text()).get("format") == FORMAT


def build_decode_library(
    model: onnx.ModelProto,
    kind: CpuTarget,
    out_dir: Path,
    *,
    threads: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Import, compile for ``kind`` and write ``model.so`` + ``decode.json`` (with
    ``extra`` added to it); returns the folder."""
    from dyadiq.backends.tvm.build import compile_prepared, prepare

    target = cpu_target(kind, threads=threads or os.cpu_count() or 1)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    constants = {t.name: t for t in fused.graph.initializer}

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(constants[name]) if name in constants else None

    fusion = decode_attention.fuse_decode_attention(fused, constant)
    products = powers_as_products(fused, constant)
    _drop_dead(fused.graph)  # the initializers only the replaced ops read
    mod = import_kernel_graph(fused)
    executable = compile_prepared(prepare(mod, target), target)
    out = prepare_output_dir(Path(out_dir))
    staging = out / f".{LIBRARY_NAME}.tmp"
    if kind is CpuTarget.AARCH64:
        executable.export_library(
            str(staging), fcompile=tvm.support.cc.cross_compiler(AARCH64_COMPILER)
        )
    else:
        executable.export_library(str(staging))
    os.replace(staging, out / LIBRARY_NAME)
    info = {
        "format": FORMAT,
        "library": LIBRARY_NAME,
        "target": str(kind),
        "inputs": _input_specs(model),
        "outputs": [o.name for o in model.graph.output],
        "fusion": decode_attention.summarize(fusion),
        "powers_as_products": products,
        **(extra or {}),
    }
    write_text_atomic(out / METADATA_NAME, json.dumps(info, indent=1) + "\n")
    return out


class TvmDecodeStep:
    """One decoding step of a built folder, run here (an x86 build on an x86 host): the
    ``(token, position, cache) -> (logits, cache)`` interface of
    :func:`dyadiq.zoo.kv_decode.greedy_decode`.

    The cache it returns holds TVM tensors (no copy back to numpy per token), which the next
    step takes as they are; numpy arrays (the first step's empty cache) are copied in. A
    build whose cache writes are in place (decode.json ``fusion``) updates those tensors
    themselves: the cache passed in is the cache returned, one slot further on."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        info = json.loads((folder / METADATA_NAME).read_text())
        if info.get("format") != FORMAT:
            raise ConfigError(
                f"{folder} is not a {FORMAT} build ({METADATA_NAME} says "
                f"{info.get('format')!r}): remove the folder and build it again"
            )
        if info["target"] == str(CpuTarget.AARCH64):
            raise ConfigError(f"{folder} is an aarch64 build: run it on an aarch64 machine")
        library = tvm.runtime.load_module(str(folder / LIBRARY_NAME))
        self.vm = relax.VirtualMachine(library, tvm.cpu())
        self.main = self.vm["main"]
        self.inputs = [spec["name"] for spec in info["inputs"]]
        self.outputs = list(info["outputs"])
        self.info = info

    def __call__(
        self, token: int, position: int, cache: Mapping[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        feeds = {
            "input_ids": np.array([[token]], np.int64),
            "position": np.array([position], np.int64),
            **cache,
        }
        args = [
            tvm.runtime.tensor(v) if isinstance(v, np.ndarray) else v
            for v in (feeds[name] for name in self.inputs)
        ]
        logits, *presents = self.main(*args)
        pasts = [n.replace("present_", "past_", 1) for n in self.outputs[1:]]
        return logits.numpy().reshape(-1), dict(zip(pasts, presents, strict=True))
