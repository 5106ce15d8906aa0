import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dyadiq.quantizers import activation_quant, fake_quantize, quantize_weight_per_channel


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_weights_are_symmetric_narrow_range(bits):
    w = np.random.default_rng(0).normal(size=(6, 3, 3, 3)).astype(np.float32)
    q = quantize_weight_per_channel(w, bits, axis=0)
    qmax = 2 ** (bits - 1) - 1
    assert q.values.dtype == np.int8 and q.scales.shape == (6,)
    assert np.abs(q.values).max() == qmax
    assert (np.abs(q.values).reshape(6, -1).max(axis=1) == qmax).all()  # every channel full
    err = np.abs(q.dequantize() - w)
    assert (err <= q.scales[:, None, None, None] / 2 + 1e-7).all()


def test_weight_axis_other_than_zero():
    w = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)
    q = quantize_weight_per_channel(w, 8, axis=-1)
    np.testing.assert_allclose(q.scales, np.abs(w).max(axis=0) / 127, rtol=1e-6)


def test_activation_params_contain_zero():
    q = activation_quant(0.5, 2.0, 8, signed=False)
    assert q.zero_point == 0 and q.representable_range()[0] == 0
    q = activation_quant(-1.0, 3.0, 8, signed=True)
    lo, hi = q.representable_range()
    assert lo <= -1.0 + q.scale and hi >= 3.0 - q.scale and -128 <= q.zero_point <= 127


@pytest.mark.parametrize("signed", [False, True])
def test_fake_quantize_matches_onnxruntime_bit_exactly(signed):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=4096) * 3).astype(np.float32)
    q = activation_quant(-2.0, 5.0, 8, signed=signed)
    dtype = TensorProto.INT8 if signed else TensorProto.UINT8
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])],
        [
            helper.make_tensor("s", TensorProto.FLOAT, [], [q.scale]),
            helper.make_tensor("z", dtype, [], [q.zero_point]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], fake_quantize(x, q))
