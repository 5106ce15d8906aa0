"""``--qdq-style tensorrt``: the structure TensorRT's explicit quantization prescribes, and the
numbers onnxruntime computes from it (graph optimisation off) against the simulation.

TensorRT's rules (developer guide, "Explicit Quantization" and "Q/DQ Layer-Placement
Recommendations"): symmetric quantization only (zero point 0), int8 activations per tensor,
int8 weights per output channel in [-127, 127], Q/DQ on the inputs of weighted ops (the
residual input of an Add too), no quantized bias, and the outputs of weighted ops that nothing
quantized reads left in float."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import calibration, conv_relu_pool_fc, residual_concat, with_weights
from conftest import save_model
from onnx import numpy_helper

import dyadiq
from dyadiq.backends.onnx.qdq import QDQStyle, export_qdq, tensorrt_violations
from dyadiq.cli import main
from dyadiq.ort_sessions import open_session
from dyadiq.progress import Mode, configure


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    configure(Mode.QUIET)
    yield
    configure(Mode.AUTO)


def _mlp(rng: np.random.Generator) -> onnx.ModelProto:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    mlp (float[4, 16] x) => (float[4, 5] y) {
        h = Gemm <transB = 1> (x, w1, b1)
        r = Relu (h)
        y = Gemm <transB = 1> (r, w2, b2)
    }
    """
    return with_weights(
        text,
        w1=rng.normal(size=(8, 16)) * 0.3,
        b1=rng.normal(size=8),
        w2=rng.normal(size=(5, 8)) * 0.3,
        b2=rng.normal(size=5),
    )


def _quantize(model: onnx.ModelProto, batches: list, tmp_path: Path, style: str) -> Path:
    path = save_model(model, tmp_path / "in" / "model.onnx")
    made = dyadiq.quantize(
        path,
        batches,
        out=tmp_path / style,
        qdq_style=style,
        calibrator="minmax",
        compensate="none",
    )
    return made.paths["qdq"]


@pytest.mark.parametrize("builder", [conv_relu_pool_fc, residual_concat, _mlp])
def test_tensorrt_structure(builder, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = builder(rng)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    qdq = onnx.load(str(_quantize(model, calibration(tuple(shape), rng), tmp_path, "tensorrt")))
    onnx.checker.check_model(qdq, full_check=True)
    assert tensorrt_violations(qdq) == []
    ops = [n.op_type for n in qdq.graph.node]
    assert "Relu" in ops or "Clip" in ops  # kept as written: TensorRT fuses it itself
    producer = {o: n for n in qdq.graph.node for o in n.output}
    for node in qdq.graph.node:
        if node.op_type == "Add":  # the residual: both inputs quantized
            assert all(producer[i].op_type == "DequantizeLinear" for i in node.input)
        if node.op_type in ("Conv", "Gemm"):
            assert len(node.input) < 3 or node.input[2] in {
                t.name for t in qdq.graph.initializer
            }, "bias must be a float initializer"


def test_ort_style_breaks_the_rules(tmp_path: Path) -> None:
    """The negative case: the default layout (asymmetric uint8, int32 bias) is not TensorRT's,
    and the checker says so."""
    rng = np.random.default_rng(0)
    qdq = onnx.load(str(_quantize(_mlp(rng), calibration((4, 16), rng), tmp_path, "ort")))
    problems = " ".join(tensorrt_violations(qdq))
    assert "zero point must be int8 0" in problems
    assert "DequantizeLinear of int32" in problems
    assert "model output y comes out of a DequantizeLinear" in problems


def test_tensorrt_numerics(tmp_path: Path) -> None:
    """onnxruntime on the written model equals the symmetric int8 arithmetic done in numpy,
    with scales amax / 127 from the calibration data (minmax), and equals the pipeline's
    simulator (int32 bias DequantizeLinear) exactly."""
    rng = np.random.default_rng(1)
    batches = calibration((4, 16), rng)
    path = save_model(_mlp(rng), tmp_path / "in" / "model.onnx")
    made = dyadiq.quantize(
        path, batches, out=tmp_path / "trt", qdq_style="tensorrt", calibrator="minmax",
        compensate="none",
    )  # fmt: skip
    qdq = onnx.load(str(made.paths["qdq"]))
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    amax = max(float(np.abs(b["x"]).max()) for b in batches)
    s_x = float(inits["x_scale"])
    assert s_x == pytest.approx(amax / 127, rel=1e-6)

    def fake_quant(v: np.ndarray, scale: float) -> np.ndarray:
        return np.clip(np.round(v / np.float32(scale)), -128, 127) * np.float32(scale)

    def dequantized_weight(name: str) -> np.ndarray:
        codes = inits[f"{name}_quantized"].astype(np.float32)
        assert codes.min() >= -127 and codes.max() <= 127
        return codes * inits[f"{name}_scale"][:, None]

    bias = {n.input[0]: n.input[2] for n in qdq.graph.node if n.op_type == "Gemm"}
    session = open_session(qdq)  # graph optimisation off: the exact simulation
    simulator = open_session(export_qdq(made.pipeline.qdq.graph, QDQStyle.ORT))
    for batch in batches:
        x = batch["x"]
        h = fake_quant(x, s_x) @ dequantized_weight("w1").T + inits[bias["x_dq"]]
        r_name = next(n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"
                      and n.input[0] != "x")  # fmt: skip
        r = fake_quant(np.maximum(h, 0), float(inits[f"{r_name}_scale"]))
        expected = r @ dequantized_weight("w2").T + inits[bias[f"{r_name}_dq"]]
        got = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got, simulator.run(None, {"x": x})[0])


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--integer"], "drop --integer / --target"),
        (["--wbits", "4"], "needs W8A8 layers"),
    ],
)
def test_tensorrt_refuses_what_it_cannot_run(
    extra: list[str],
    fragment: str,
    tiny_cnn_path: Path,
    calib_npz_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["quantize", str(tiny_cnn_path), "-o", str(tmp_path / "OUT")]
    argv += ["--calib", str(calib_npz_folder), "--qdq-style", "tensorrt", *extra]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "ConfigError" in err and fragment in err
