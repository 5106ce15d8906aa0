"""``--budget`` with ``--input-shape``: the sensitivity analysis and the ILP see the graph the
output is built from. Static shapes fold more: a recurrent cell's first step multiplies a zero
initial state (``ConstantOfShape`` of the batch size) by its weight, and once the batch size is
known that product is a constant, not a layer. The analysis used to load the model without the
shapes, price that layer, and the plan naming it was refused after the whole analysis
(captcha_crnn, benchmarks/results/coverage.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from dyadiq.api import quantize
from dyadiq.frontends.onnx_frontend import load_onnx
from tests.builders import with_weights


def _zero_state_cell() -> onnx.ModelProto:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    cell (float[N, 16] x) => (float[N, 8] y) {
        batch = Shape <end = 1> (x)
        width = Constant <value_ints = [8]> ()
        state_shape = Concat <axis = 0> (batch, width)
        h0 = ConstantOfShape (state_shape)
        recurrent = Gemm (h0, w_h)
        projected = Gemm (x, w_x)
        s = Add (recurrent, projected)
        y = Relu (s)
    }
    """
    rng = np.random.default_rng(11)
    return with_weights(
        text,
        w_h=rng.normal(size=(8, 8)),
        w_x=rng.normal(size=(16, 8)) * 0.3,
    )


def test_budget_plans_the_layers_of_the_shape_bound_graph(tmp_path: Path) -> None:
    model = _zero_state_cell()
    path = tmp_path / "cell.onnx"
    onnx.save(model, path)
    dynamic = {n.name for n in load_onnx(path).weighted_layers()}
    bound = {n.name for n in load_onnx(path, input_shapes={"x": [4, 16]}).weighted_layers()}
    assert len(dynamic) == 2 and len(bound) == 1, (dynamic, bound)  # the premise
    rng = np.random.default_rng(12)
    batches = [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(8)]
    result = quantize(
        path,
        batches,
        out=tmp_path / "out",
        budget="avg-wbits=6",
        input_shapes={"x": [4, 16]},
        evaluate=False,
    )
    assert set(result.report["allocation"]["layers"]) == bound
