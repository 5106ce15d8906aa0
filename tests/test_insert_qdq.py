"""QDQ rewrite: structure, onnx.checker, and numerics against a numpy fake-quant reference."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from dyadiq.backends.onnx.qdq import export_qdq
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.activation_sites import find_activation_sites
from dyadiq.pipeline import quantize_graph
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import fake_quantize, quantize_weight_per_channel
from tests.builders import calibration, conv_relu_pool_fc


def _run(model: onnx.ModelProto, feeds, optimize=False):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, feeds)[0]


def _reference(float_model, x, params, wbits):
    """numpy: fake-quant input -> conv -> relu -> fake-quant -> pool -> flatten -> gemm -> fq."""
    w = {i.name: onnx.numpy_helper.to_array(i) for i in float_model.graph.initializer}
    w1 = quantize_weight_per_channel(w["w1"], wbits, 0).dequantize()
    w2 = quantize_weight_per_channel(w["w2"], wbits, 0).dequantize()
    s_x = params["x"].scale
    b1 = np.round(w["b1"] / (quantize_weight_per_channel(w["w1"], wbits, 0).scales * s_x))
    b1 = b1 * quantize_weight_per_channel(w["w1"], wbits, 0).scales * s_x
    xq = fake_quantize(x, params["x"])
    padded = np.pad(xq, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = sliding_window_view(padded, (3, 3), axis=(2, 3))  # 1,3,8,8,3,3
    conv = np.einsum("bchwij,ocij->bohw", windows, w1) + b1[None, :, None, None]
    r = fake_quantize(np.maximum(conv, 0).astype(np.float32), params["r"])
    p = r.reshape(1, 4, 4, 2, 4, 2).max(axis=(3, 5))
    f = p.reshape(1, -1)
    s_f = params["f"].scale
    s_w2 = quantize_weight_per_channel(w["w2"], wbits, 0).scales
    b2 = np.round(w["b2"] / (s_w2 * s_f)) * s_w2 * s_f
    return fake_quantize((f @ w2.T + b2).astype(np.float32), params["y"])


@pytest.mark.parametrize("wbits", [8, 4])
def test_qdq_model_matches_numpy_reference(wbits):
    rng = np.random.default_rng(0)
    float_model = conv_relu_pool_fc(rng)
    graph = load_onnx(float_model)
    plan = PrecisionPlan.uniform(graph, weight_bits=wbits)
    calib = calibration((1, 3, 8, 8), rng)
    result = quantize_graph(graph, plan, calib)
    model = export_qdq(result.qdq.graph)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == (21 if wbits == 4 else 17)
    x = calib[0]["x"]
    got = _run(model, {"x": x})
    want = _reference(float_model, x, result.qdq.act_params, wbits)
    lsb = result.qdq.act_params["y"].scale
    # Float summation order differs between numpy and onnxruntime: allow a one-LSB flip.
    assert np.abs(got - want).max() <= lsb * 1.001
    assert np.mean(got == want) > 0.5


def test_structure_weights_bias_and_removed_relu():
    rng = np.random.default_rng(0)
    graph = load_onnx(conv_relu_pool_fc(rng))
    plan = PrecisionPlan.uniform(graph, weight_bits=4)
    result = quantize_graph(graph, plan, calibration((1, 3, 8, 8), rng))
    model = export_qdq(result.qdq.graph)
    ops = [n.op_type for n in model.graph.node]
    assert "Relu" not in ops  # uint8 zero point 0 already clamps at 0: the ReLU was implied
    assert ops.count("QuantizeLinear") == 5  # x, r, p, f, y
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["w1_quantized"].data_type == onnx.TensorProto.INT4
    assert inits["b1_quantized"].data_type == onnx.TensorProto.INT32
    assert "w1" not in inits  # the float weight is gone
    assert result.qdq.weight_bytes == (4 * 27 + 5 * 64) // 2


def test_onnxruntime_fuses_the_qdq_model_into_integer_kernels(tmp_path):
    rng = np.random.default_rng(0)
    graph = load_onnx(conv_relu_pool_fc(rng))
    result = quantize_graph(graph, PrecisionPlan.uniform(graph), calibration((1, 3, 8, 8), rng))
    model = export_qdq(result.qdq.graph)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in fused


def test_input_graph_is_not_modified():
    rng = np.random.default_rng(0)
    graph = load_onnx(conv_relu_pool_fc(rng))
    before = graph.to_onnx().SerializeToString()
    plan = PrecisionPlan.uniform(graph)
    sites = find_activation_sites(graph, plan)
    quantize_graph(graph, plan, calibration((1, 3, 8, 8), rng))
    assert graph.to_onnx().SerializeToString() == before
    assert sites.tensors
