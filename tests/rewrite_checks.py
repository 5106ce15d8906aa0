"""Shared checks for float rewrite passes: apply, validate, compare with onnxruntime."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.graph import QGraph


def run_unoptimized(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime with its own graph rewrites off, so it cannot fold or fuse anything."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, feeds)


def apply_float_pass(
    model: onnx.ModelProto, rewrite: Callable[[QGraph], Any]
) -> tuple[QGraph, Any, onnx.ModelProto]:
    """Load, rewrite, export; checks the output model and that the input proto is untouched."""
    before = model.SerializeToString()
    graph = load_onnx(model, simplify=False)
    report = rewrite(graph)
    out = graph.to_onnx()
    onnx.checker.check_model(out, full_check=True)
    assert model.SerializeToString() == before, "the pass modified the caller's model proto"
    return graph, report, out


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_same_outputs(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    rtol: float,
    atol: float,
) -> None:
    expected = run_unoptimized(original, feeds)
    actual = run_unoptimized(rewritten, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert e.shape == a.shape
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def assert_integer_end_to_end(graph: QGraph, feeds: list[dict[str, np.ndarray]]) -> Any:
    """Quantize ``graph`` W8A8 on ``feeds``: the integer program has no float op and every
    tensor is bit-exact against the reference interpreter. Returns the quantize result."""
    from dyadiq.pipeline import build_integer, quantize_graph
    from dyadiq.plan import PrecisionPlan

    result = quantize_graph(graph, PrecisionPlan.uniform(graph), feeds)
    _, _, report = build_integer(result, feeds)
    assert report["fully_integer"], report
    exact = report["bit_exact_vs_reference"]
    assert exact["exact_tensors"] == exact["tensors"] > 0, exact
    return result
