"""Attention over the KV cache as one TVM kernel and the in-place cache write
(backends/tvm/decode_attention.py).

Checked: the kernels against numpy (attention within 1e-5 with grouped query heads, masked
and sliding-window slots; the cache write bit-exact); the ONNX rewrite on a small decode
attention block in the exporter's form (structure: every cache Where, repeat, transpose,
MatMul and Softmax gone; numbers: the built library against onnxruntime on the original
graph within 1e-5, and the cache tensors passed in are the ones updated); and the cases
where the rule must not fire (a cache read by another op, a per-head mask).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from dyadiq.backends.tvm.decode_attention import (
    DECODE_ATTENTION,
    KV_CACHE_WRITE,
    AttentionShape,
    decode_attention,
    fuse_decode_attention,
    kv_cache_write,
)
from dyadiq.backends.tvm.weight_only_decode import LIBRARY_NAME, build_decode_library
from dyadiq.backends.tvm.weight_only_kernels import CpuTarget, cpu_target

HEADS, KV_HEADS, POSITIONS, DIM = 4, 2, 16, 32
SCALE = DIM**-0.5
LOW = float(np.finfo(np.float32).min)  # the exporter's mask value
TOL = 1e-5


def _mask(position: int, window: int | None = None) -> np.ndarray:
    slots = np.arange(POSITIONS)
    visible = slots <= position
    if window is not None:
        visible &= slots > position - window
    return np.where(visible, 0.0, LOW).astype(np.float32).reshape(1, 1, 1, POSITIONS)


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float64 softmax(scale q K^T + mask) V with cache head h // group for query head h."""
    group = q.shape[1] // k.shape[1]
    k64 = np.repeat(k.astype(np.float64), group, axis=1)
    v64 = np.repeat(v.astype(np.float64), group, axis=1)
    scores = q.astype(np.float64) @ np.swapaxes(k64, 2, 3) * SCALE + mask
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.asarray((weights / weights.sum(-1, keepdims=True)) @ v64)


def _compile(func: tvm.tirx.PrimFunc) -> Any:
    target = cpu_target(CpuTarget.X86_AVX2, threads=1)
    return tvm.compile(tvm.IRModule({"f": func.with_attr("global_symbol", "f")}), target=target)[
        "f"
    ]


@pytest.mark.parametrize("window", [None, 5])
def test_attention_kernel_matches_numpy(window: int | None) -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, HEADS, 1, DIM)).astype(np.float32)
    k = rng.standard_normal((1, KV_HEADS, POSITIONS, DIM)).astype(np.float32)
    v = rng.standard_normal((1, KV_HEADS, POSITIONS, DIM)).astype(np.float32)
    kernel = _compile(decode_attention(AttentionShape(HEADS, KV_HEADS, POSITIONS, DIM), SCALE))
    for position in (0, 9, POSITIONS - 1):
        mask = _mask(position, window)
        out = tvm.runtime.tensor(np.zeros((1, HEADS, 1, DIM), np.float32))
        kernel(*[tvm.runtime.tensor(a) for a in (q, k, v, mask)], out)
        np.testing.assert_allclose(out.numpy(), _reference(q, k, v, mask), atol=TOL, rtol=0)
    # the masked slots are not read: garbage there changes nothing
    mask = _mask(6)
    k_dirty, v_dirty = k.copy(), v.copy()
    k_dirty[:, :, 7:], v_dirty[:, :, 7:] = np.nan, np.nan
    clean, dirty = (tvm.runtime.tensor(np.zeros((1, HEADS, 1, DIM), np.float32)) for _ in "ab")
    kernel(*[tvm.runtime.tensor(a) for a in (q, k, v, mask)], clean)
    kernel(*[tvm.runtime.tensor(a) for a in (q, k_dirty, v_dirty, mask)], dirty)
    assert np.array_equal(clean.numpy(), dirty.numpy())


def test_cache_write_kernel_is_where_in_place() -> None:
    rng = np.random.default_rng(1)
    past = rng.standard_normal((1, KV_HEADS, POSITIONS, DIM)).astype(np.float32)
    new = rng.standard_normal((1, KV_HEADS, 1, DIM)).astype(np.float32)
    slot = (np.arange(POSITIONS) == 11).reshape(1, 1, POSITIONS, 1)
    cache = tvm.runtime.tensor(past)
    _compile(kv_cache_write(past.shape))(cache, tvm.runtime.tensor(new), tvm.runtime.tensor(slot))
    assert np.array_equal(cache.numpy(), np.where(slot, new, past))


def _attention_block(*, per_head_mask: bool = False, cache_read_twice: bool = False) -> Any:
    """One layer's decode attention as the torch exporter writes it: the cache Where, the
    per-head repeat (Unsqueeze, Expand, Reshape), the transposed key, MatMul, Mul, Add,
    Softmax, MatMul."""
    group = HEADS // KV_HEADS
    f32 = TensorProto.FLOAT
    cache = [1, KV_HEADS, POSITIONS, DIM]
    mask_shape = [1, HEADS if per_head_mask else 1, 1, POSITIONS]
    inputs = [
        helper.make_tensor_value_info("q", f32, [1, HEADS, 1, DIM]),
        helper.make_tensor_value_info("new_key", f32, [1, KV_HEADS, 1, DIM]),
        helper.make_tensor_value_info("new_value", f32, [1, KV_HEADS, 1, DIM]),
        helper.make_tensor_value_info("slot", TensorProto.BOOL, [1, 1, POSITIONS, 1]),
        helper.make_tensor_value_info("mask", f32, mask_shape),
        helper.make_tensor_value_info("past_key", f32, cache),
        helper.make_tensor_value_info("past_value", f32, cache),
    ]
    outputs = [
        helper.make_tensor_value_info("out", f32, [1, HEADS, 1, DIM]),
        helper.make_tensor_value_info("present_key", f32, cache),
        helper.make_tensor_value_info("present_value", f32, cache),
    ]
    inits = [
        numpy_helper.from_array(np.array([2], np.int64), "axes"),
        numpy_helper.from_array(np.array([1, KV_HEADS, group, POSITIONS, DIM], np.int64), "wide"),
        numpy_helper.from_array(np.array([1, HEADS, POSITIONS, DIM], np.int64), "heads"),
        numpy_helper.from_array(np.array(SCALE, np.float32), "scale"),
    ]
    nodes = []
    for kind in ("key", "value"):
        nodes += [
            helper.make_node("Where", ["slot", f"new_{kind}", f"past_{kind}"], [f"present_{kind}"]),
            helper.make_node("Unsqueeze", [f"present_{kind}", "axes"], [f"{kind}_u"]),
            helper.make_node("Expand", [f"{kind}_u", "wide"], [f"{kind}_e"]),
            helper.make_node("Reshape", [f"{kind}_e", "heads"], [f"{kind}_r"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["key_r"], ["key_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "key_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "value_r"], ["out"]),
    ]
    if cache_read_twice:
        nodes.append(helper.make_node("ReduceMax", ["past_key"], ["old_max"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("old_max", f32, []))
    for i, node in enumerate(nodes):
        node.name = f"n{i}"
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def _constants(model: onnx.ModelProto) -> Any:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return values.get


def _feeds(position: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(position)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "q": normal(1, HEADS, 1, DIM),
        "new_key": normal(1, KV_HEADS, 1, DIM),
        "new_value": normal(1, KV_HEADS, 1, DIM),
        "slot": (np.arange(POSITIONS) == position).reshape(1, 1, POSITIONS, 1),
        "mask": _mask(position, 6),
        "past_key": normal(1, KV_HEADS, POSITIONS, DIM),
        "past_value": normal(1, KV_HEADS, POSITIONS, DIM),
    }


def test_rewrite_replaces_the_attention_ops() -> None:
    model = _attention_block()
    report = fuse_decode_attention(model, _constants(model))
    assert (report.attention_layers, report.cache_writes, report.skipped) == (1, 2, ())
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(DECODE_ATTENTION) == 1 and ops.count(KV_CACHE_WRITE) == 2
    assert "Where" not in ops and "Softmax" not in ops  # replaced, not left beside
    attention = next(n for n in model.graph.node if n.op_type == DECODE_ATTENTION)
    assert list(attention.input) == ["q", "present_key", "present_value", "mask"]


def test_built_block_matches_onnxruntime_and_updates_the_cache_in_place(tmp_path: Path) -> None:
    model = _attention_block()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    folder = build_decode_library(model, CpuTarget.X86_AVX2, tmp_path / "block", threads=1)
    info = json.loads((folder / "decode.json").read_text())
    assert info["fusion"]["attention_layers"] == 1 and info["fusion"]["cache_writes_in_place"] == 2
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / LIBRARY_NAME)), tvm.cpu())
    names = [spec["name"] for spec in info["inputs"]]
    for position in (0, 3, 10):
        feeds = _feeds(position)
        expected = session.run(["out", "present_key", "present_value"], feeds)
        args = {name: tvm.runtime.tensor(feeds[name]) for name in names}
        out, present_key, present_value = vm["main"](*[args[n] for n in names])
        np.testing.assert_allclose(out.numpy(), expected[0], atol=TOL, rtol=0)
        # the caches passed in are the caches returned, written in place, bit for bit
        for passed, returned, want in (
            (args["past_key"], present_key, expected[1]),
            (args["past_value"], present_value, expected[2]),
        ):
            assert np.array_equal(passed.numpy(), want)
            assert np.array_equal(returned.numpy(), want)


def test_rule_does_not_fire_where_it_would_be_wrong() -> None:
    # the old cache is read by another op: writing it in place would change that op's input
    model = _attention_block(cache_read_twice=True)
    report = fuse_decode_attention(model, _constants(model))
    assert report.cache_writes == 1 and report.attention_layers == 1
    assert any("past_key" in reason for reason in report.skipped)
    assert [n.input[2] for n in model.graph.node if n.op_type == "Where"] == ["past_key"]
    # a per-head mask is not the kernel's [1, 1, 1, P]: the ops stay
    model = _attention_block(per_head_mask=True)
    report = fuse_decode_attention(model, _constants(model))
    assert report.attention_layers == 0 and any("mask" in r for r in report.skipped)
    assert "Softmax" in [n.op_type for n in model.graph.node]
