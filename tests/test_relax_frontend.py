"""The Relax frontend: a Relax function and its ONNX translation compute the same thing.

Relax semantics are taken from TVM itself (the module compiled for llvm and run on its VM);
ONNX semantics from onnxruntime. Real zoo models round-trip through TVM's own ONNX importer.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyadiq.errors import UnsupportedModelError
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.frontends.relax_frontend import load_relax_file, relax_to_onnx

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

RTOL, ATOL = 1e-5, 1e-5  # float32 re-association between TVM's kernels and onnxruntime's


def _run_tvm(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _const(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> relax.Expr:
    return relax.const(rng.normal(0, scale, shape).astype(np.float32))


def _every_supported_op(rng: np.random.Generator) -> tvm.IRModule:
    """One function touching every op family the translator handles."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, _const(rng, 8, 3, 3, 3), padding=(1, 1, 1, 1)))
            c = bb.emit(relax.op.add(c, relax.op.reshape(_const(rng, 8), (1, 8, 1, 1))))
            bn = bb.emit(
                relax.op.nn.batch_norm(
                    c,
                    relax.const(np.linspace(0.5, 1.5, 8, dtype=np.float32)),
                    _const(rng, 8),
                    _const(rng, 8),
                    relax.const(np.linspace(1.0, 2.0, 8, dtype=np.float32)),
                    axis=1,
                    training=False,
                )
            )
            c = bb.emit(relax.TupleGetItem(bn, 0))
            c = bb.emit(relax.op.clip(c, 0.0, 6.0))
            d = bb.emit(
                relax.op.nn.conv2d(
                    c, _const(rng, 8, 1, 3, 3), strides=(2, 2), padding=(1, 1, 1, 1), groups=8
                )
            )
            d = bb.emit(relax.op.nn.leakyrelu(d, 0.1))
            p = bb.emit(relax.op.nn.max_pool2d(c, pool_size=(2, 2), strides=(2, 2)))
            a = bb.emit(relax.op.nn.avg_pool2d(c, pool_size=(2, 2), strides=(2, 2)))
            s = bb.emit(relax.op.concat([d, relax.op.multiply(p, relax.op.sigmoid(a))], axis=1))
            g = bb.emit(relax.op.mean(s, axis=[2, 3], keepdims=True))
            f = bb.emit(relax.op.reshape(g, (2, 16)))
            f = bb.emit(relax.op.nn.layer_norm(f, _const(rng, 16), _const(rng, 16), axes=[-1]))
            f = bb.emit(relax.op.nn.gelu(f))
            h = bb.emit(relax.op.matmul(f, relax.op.permute_dims(_const(rng, 5, 16), axes=[1, 0])))
            h = bb.emit(relax.op.subtract(h, relax.op.nn.silu(h)))
            y = bb.emit_output(relax.op.nn.softmax(h, axis=-1))
        bb.emit_func_output(y)
    return bb.get()


def test_every_supported_op_matches_tvm():
    rng = np.random.default_rng(0)
    mod = _every_supported_op(rng)
    model = relax_to_onnx(mod)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run_ort(model, x), _run_tvm(mod, x), rtol=RTOL, atol=ATOL)
    ops = {n.op_type for n in model.graph.node}
    # the ReLU6 clip survives as the Clip the ONNX frontend expects; the inference batch norm
    # is folded into the conv by the simplifier
    assert {"Conv", "Clip", "LayerNormalization", "Concat"} <= ops
    assert "BatchNormalization" not in ops


def test_weights_as_parameters_need_values():
    rng = np.random.default_rng(1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    w = relax.Var("w", relax.TensorType((4, 3), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(y)
    mod = bb.get()
    with pytest.raises(Exception, match=r"without values.*'w'"):
        relax_to_onnx(mod)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    model = relax_to_onnx(mod, {"w": weight})
    xv = rng.normal(size=(1, 4)).astype(np.float32)
    np.testing.assert_allclose(_run_ort(model, xv), xv @ weight, rtol=RTOL, atol=ATOL)


def test_unsupported_ops_are_listed_together():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.cumsum(x, axis=1))
            b = bb.emit(relax.op.cumsum(a, axis=2))
            c = bb.emit(relax.op.flip(b, axis=1))
            y = bb.emit_output(relax.op.nn.relu(c))
        bb.emit_func_output(y)
    with pytest.raises(UnsupportedModelError) as err:
        relax_to_onnx(bb.get())
    assert "relax.cumsum x2" in str(err.value) and "relax.flip x1" in str(err.value)


def test_saved_irmodule_round_trips(tmp_path):
    mod = _every_supported_op(np.random.default_rng(2))
    path = tmp_path / "model.relax.json"
    path.write_text(tvm.ir.save_json(mod))
    again = relax_to_onnx(load_relax_file(path))
    x = np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run_ort(again, x), _run_tvm(mod, x), rtol=RTOL, atol=ATOL)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(Exception, match="not a saved TVM IRModule"):
        load_relax_file(tmp_path / "junk.json")


@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["fashion_cnn", "mobilenet_v2", "ppocr_cls"])
def test_zoo_models_round_trip_through_tvms_importer(name):
    from tvm.relax.frontend.onnx import from_onnx

    from dyadiq import zoo

    artifacts = zoo.get(name)
    original = onnx.load(str(artifacts.model_path))
    translated = relax_to_onnx(from_onnx(original, keep_params_in_input=False))
    feeds, _ = next(iter(artifacts.evaluation_batches(4)))
    x = next(iter(feeds.values()))
    expected = _run_ort(original, x)
    np.testing.assert_allclose(_run_ort(translated, x), expected, rtol=RTOL, atol=ATOL)

    # same quantizable layers as the ONNX original, nothing lost or split (TVM's importer
    # turns Gemm into MatMul + Add, which is the same layer to dyadiq)
    def kinds(model: onnx.ModelProto) -> list[str]:
        ops = [n.op for n in load_onnx(model).weighted_layers()]
        return ["MatMul" if op == "Gemm" else op for op in ops]

    assert kinds(translated) == kinds(original)
