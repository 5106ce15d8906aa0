"""``--bind NAME=VALUE``: an input that selects behaviour (a sample rate choosing an ``If``
branch) becomes a constant, the branch folds, and the model quantizes and evaluates on data
for its other inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dyadiq.cli import main
from dyadiq.errors import ConfigError, listed
from dyadiq.run_inputs import bound_model, parse_bindings


def _rate_switched(path: Path) -> None:
    """y = MatMul(x * (2 if sr == 16000 else 3), w): an If on a scalar int64 input."""

    def branch(name: str, factor: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Mul", ["x", f"{name}_k"], [f"{name}_out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 8])],
            [numpy_helper.from_array(np.array(factor, np.float32), f"{name}_k")],
        )

    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [
            helper.make_node("Equal", ["sr", "rate"], ["is_16k"]),
            helper.make_node(
                "If",
                ["is_16k"],
                ["scaled"],
                then_branch=branch("then", 2.0),
                else_branch=branch("else", 3.0),
            ),
            helper.make_node("MatMul", ["scaled", "w"], ["y"]),
        ],
        "rate_switched",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [
            numpy_helper.from_array(np.array(16000, np.int64), "rate"),
            numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _batches(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.savez(folder / f"{i:03d}.npz", x=rng.normal(size=(1, 8)).astype(np.float32))
    return folder


def test_bound_model_is_the_original_at_that_value(tmp_path: Path) -> None:
    source = tmp_path / "rate.onnx"
    _rate_switched(source)
    (tmp_path / "bound").mkdir()
    bound = bound_model(source, {"sr": [16000]}, tmp_path / "bound")
    x = np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32)
    original = ort.InferenceSession(str(source)).run(None, {"x": x, "sr": np.array(16000)})
    session = ort.InferenceSession(str(bound))
    assert [i.name for i in session.get_inputs()] == ["x"]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], original[0], rtol=0, atol=0)
    assert source.read_bytes() != bound.read_bytes()  # the input file is left as it was


def test_quantize_and_eval_with_bind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "rate.onnx"
    _rate_switched(source)
    calib, val = _batches(tmp_path / "calib", 8, 2), _batches(tmp_path / "val", 8, 3)
    out = tmp_path / "out"
    argv = ["quantize", str(source), "--calib", str(calib), "-o", str(out), "--bind", "sr=16000"]
    assert main([*argv, "--integer", "--no-eval"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "inputs bound to constants (--bind)" in said and "sr=[16000" in said
    report = json.loads((out / "report.json").read_text())
    assert report["bound_inputs"] == {"sr": [16000.0]}
    quantized = onnx.load(str(out / "model.qdq.onnx"))
    assert [i.name for i in quantized.graph.input] == ["x"]
    assert not any(n.op_type == "If" for n in quantized.graph.node)  # folded away
    exact = report["integer"]["bit_exact_vs_reference"]
    assert exact["exact_tensors"] == exact["tensors"]
    qdq = str(out / "model.qdq.onnx")
    assert main(["eval", str(source), qdq, "--data", str(val), "--bind", "sr=16000", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics["kinds"]) == {"y"}
    scores = metrics["model.qdq.onnx"]  # against the bound float model: close at W8A8
    assert scores and all(np.isfinite(v) for v in scores.values()), scores


def test_bad_bindings_are_listed_together(tmp_path: Path) -> None:
    source = tmp_path / "rate.onnx"
    _rate_switched(source)
    with pytest.raises(ConfigError, match="expected NAME=VALUE") as caught:
        parse_bindings(["sr", "rate=abc"])
    assert "'sr'" in str(caught.value) and "'rate=abc'" in str(caught.value)
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError) as caught:
        bound_model(source, {"nope": [1], "sr": [1, 2]}, tmp_path / "b")
    text = str(caught.value)
    assert "nope: not an input" in text and "sr: 2 value(s)" in text


def test_one_problem_is_the_message_several_are_a_list() -> None:
    assert listed("bad options:", ["--budget is negative"]) == "--budget is negative"
    assert listed("bad options:", ["a", "b"]) == "bad options:\n  - a\n  - b"
