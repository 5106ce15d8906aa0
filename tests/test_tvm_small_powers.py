"""``Pow`` by 2 or 3 as products before a TVM decode build (backends/tvm/small_powers.py).

Checked: the rewrite's structure (constant exponents 2 and 3 become Muls; 2.5 and a
non-constant exponent stay Pow); onnxruntime gives the same bits before and after (its Pow
kernel computes these exponents as the same products); and the TVM build of the graph gives
onnxruntime's bits for the products, within 1e-6 relative for the Pow left alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from dyadiq.backends.tvm.small_powers import powers_as_products
from dyadiq.backends.tvm.weight_only_decode import LIBRARY_NAME, build_decode_library
from dyadiq.backends.tvm.weight_only_kernels import CpuTarget

N = 1000


def _powers() -> onnx.ModelProto:
    f32 = TensorProto.FLOAT
    exponents = {"two": 2.0, "three": 3.0, "two_and_a_half": 2.5}
    nodes = [helper.make_node("Pow", ["x", name], [f"x_{name}"]) for name in exponents]
    nodes.append(helper.make_node("Pow", ["x", "e"], ["x_e"]))  # exponent is an input
    for i, node in enumerate(nodes):
        node.name = f"pow{i}"
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in exponents.items()]
    outputs = [f"x_{name}" for name in [*exponents, "e"]]
    graph = helper.make_graph(
        nodes,
        "powers",
        [
            helper.make_tensor_value_info("x", f32, [N]),
            helper.make_tensor_value_info("e", f32, []),
        ],
        [helper.make_tensor_value_info(o, f32, [N]) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feeds)]


def _feeds() -> dict[str, np.ndarray]:
    x = 3 * np.random.default_rng(0).standard_normal(N).astype(np.float32)
    return {"x": x, "e": np.array(3.0, np.float32)}


def test_only_constant_squares_and_cubes_become_products() -> None:
    model = _powers()
    original = onnx.ModelProto()
    original.CopyFrom(model)
    assert powers_as_products(model, _constants(model).get) == 2
    pows = [n for n in model.graph.node if n.op_type == "Pow"]
    assert [list(n.input) for n in pows] == [["x", "two_and_a_half"], ["x", "e"]]
    assert [n.op_type for n in model.graph.node].count("Mul") == 3  # x*x, then x*x and *x
    onnx.checker.check_model(model, full_check=True)
    before, after = _run_ort(original, _feeds()), _run_ort(model, _feeds())
    for a, b in zip(before, after, strict=True):
        # onnxruntime's Pow already computes these exponents as the products (NaN: x^2.5, x < 0)
        assert np.array_equal(a, b, equal_nan=True)


def test_tvm_build_gives_onnxruntime_bits(tmp_path: Path) -> None:
    model = _powers()
    expected = _run_ort(model, _feeds())
    folder = build_decode_library(model, CpuTarget.X86_AVX2, tmp_path / "powers", threads=1)
    info = json.loads((folder / "decode.json").read_text())
    assert info["powers_as_products"] == 2
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / LIBRARY_NAME)), tvm.cpu())
    feeds = _feeds()
    got = [
        t.numpy()
        for t in vm["main"](*[tvm.runtime.tensor(feeds[s["name"]]) for s in info["inputs"]])
    ]
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    for have, want in zip(got[2:], expected[2:], strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-6, atol=0)  # NaN where x < 0: equal
