"""Crash classes and faults found by the robustness audit (issue 14), each reproduced.

Every case must end the way the bad-input contract says: one typed error, exit status 2 (130
for an interrupt), no traceback, the input untouched, and the output folder as it was before
the run (absent if it did not exist).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    TINY_INPUT_SHAPE,
    file_digest,
    make_tiny_cnn,
    random_batches,
    save_model,
    write_npz_folder,
)
from onnx import TensorProto, helper, numpy_helper

from dyadiq.cli import main
from dyadiq.errors import DyadiqError, ModelLoadError, UnsupportedModelError
from dyadiq.frontends import runtime_validation
from dyadiq.frontends.onnx_frontend import load_onnx


# --- helpers ----------------------------------------------------------------------------------
def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    status = main(argv)
    captured = capsys.readouterr()
    return status, re.sub(r"\s+", " ", captured.err + captured.out)


def assert_typed(
    capsys: pytest.CaptureFixture[str], argv: list[str], error: type[DyadiqError], *fragments: str
) -> str:
    status, text = run_cli(capsys, argv)
    assert status == 2, text
    assert f"error: {error.__name__}:" in text, text
    assert "Traceback" not in text
    squeezed = text.replace(" ", "")
    for fragment in fragments:
        assert fragment.replace(" ", "") in squeezed, f"{fragment!r} not in {text!r}"
    return text


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    return write_npz_folder(tmp_path / "calib", random_batches({"x": TINY_INPUT_SHAPE}, 2))


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_ints(model: onnx.ModelProto, node: str, attr: str, values: list[int]) -> None:
    for a in _node(model, node).attribute:
        if a.name == attr:
            del a.ints[:]
            a.ints.extend(values)


def _append_softmax(model: onnx.ModelProto, axis: int) -> None:
    model.graph.node.append(helper.make_node("Softmax", ["y"], ["prob"], name="sm", axis=axis))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 5]))


# --- 1. models that pass onnx.checker but that onnxruntime refuses -----------------------------
RUNTIME_REFUSED: dict[str, tuple[Callable[[onnx.ModelProto], None], str]] = {
    "opset 30": (lambda m: setattr(m.opset_import[0], "version", 30), "opset"),
    "softmax axis 7": (lambda m: _append_softmax(m, 7), "axis"),
    "kernel_shape 0": (lambda m: _set_ints(m, "pool", "kernel_shape", [0, 0]), "kernel_shape"),
    "maxpool stride 0 (SIGFPE in onnxsim)": (
        lambda m: _set_ints(m, "pool", "strides", [0, 0]),
        "strides",
    ),
    "gemm dims mismatch": (
        lambda m: setattr(_node(m, "flatten").attribute[0], "i", 2),
        "Gemm",
    ),
    "wrong declared output dtype": (
        lambda m: setattr(m.graph.output[0].type.tensor_type, "elem_type", TensorProto.INT64),
        "tensor(int64)",
    ),
}


@pytest.mark.parametrize("case", sorted(RUNTIME_REFUSED))
def test_model_onnxruntime_refuses_is_a_model_load_error(
    case: str, tmp_path: Path, calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mutate, fragment = RUNTIME_REFUSED[case]
    model = make_tiny_cnn()
    mutate(model)
    onnx.checker.check_model(model)  # the audit's point: the checker lets these through
    path = save_model(model, tmp_path / "model" / "m.onnx")
    digest = file_digest(path)
    with pytest.raises(ModelLoadError, match="onnxruntime") as info:
        load_onnx(path)
    assert fragment in str(info.value)
    assert_typed(capsys, ["inspect", str(path)], ModelLoadError, "onnxruntime", fragment)
    out = tmp_path / "out"
    assert_typed(
        capsys, ["quantize", str(path), "-o", str(out), "--calib", str(calib)], ModelLoadError
    )
    assert not out.exists()
    assert file_digest(path) == digest


# --- 2-4. element types and initializer data ---------------------------------------------------
def _input_type(elem_type: int) -> Callable[[onnx.ModelProto], None]:
    return lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", elem_type)


def _initializer_type(index: int, data_type: int) -> Callable[[onnx.ModelProto], None]:
    return lambda m: setattr(m.graph.initializer[index], "data_type", data_type)


TYPE_CASES: dict[str, tuple[Callable[[onnx.ModelProto], None], type[DyadiqError], str]] = {
    "input elem_type 99 (KeyError)": (_input_type(99), ModelLoadError, "input x (99)"),
    "bfloat16 input (TypeError)": (
        _input_type(TensorProto.BFLOAT16),
        UnsupportedModelError,
        "input x (BFLOAT16)",
    ),
    "int8 data_type over float raw_data (ValueError in describe)": (
        _initializer_type(0, TensorProto.INT8),
        ModelLoadError,
        "w_conv: 432 bytes of raw data",
    ),
    "float16 data_type over float raw_data": (
        _initializer_type(2, TensorProto.FLOAT16),
        ModelLoadError,
        "w_fc: 1280 bytes of raw data",
    ),
}


@pytest.mark.parametrize("case", sorted(TYPE_CASES))
def test_bad_element_types_and_data_are_typed_errors(
    case: str, tmp_path: Path, calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mutate, error, fragment = TYPE_CASES[case]
    model = make_tiny_cnn()
    mutate(model)
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    assert_typed(capsys, ["inspect", str(path)], error, fragment)
    out = tmp_path / "out"
    assert_typed(capsys, ["quantize", str(path), "-o", str(out), "--calib", str(calib)], error)
    assert not out.exists()


def test_scalar_with_mismatched_data_is_not_a_hard_swish_constant() -> None:
    import onnx_graphsurgeon as gs

    from dyadiq.passes.canonicalize_hard_swish import _scalar

    bad = numpy_helper.from_array(np.zeros(2, np.float32), "c")
    del bad.dims[:]  # declared a scalar, holds two floats
    constant = gs.Constant("c", gs.importers.onnx_importer.LazyValues(bad))
    assert _scalar(constant) is None


# --- 5. a huge weight: softmax upscale beyond int64 ---------------------------------------------
def test_huge_weight_before_softmax_is_refused_with_integer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weight = np.full((4, 8), 2.8e27, np.float32) * np.linspace(-1, 1, 8, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
            helper.make_node("Softmax", ["h"], ["y"], name="sm", axis=-1),
        ],
        "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = save_model(model, tmp_path / "model" / "huge.onnx")
    calib = write_npz_folder(tmp_path / "calib", random_batches({"x": (1, 4)}, 2))
    out = tmp_path / "out"
    argv = ["quantize", str(path), "-o", str(out), "--calib", str(calib), "--integer"]
    assert_typed(capsys, argv, UnsupportedModelError, "softmax", "int64")
    assert not out.exists()


# --- 6-7. onnxsim crashing or printing inside the isolated child -------------------------------
def test_simplifier_crash_is_a_skipped_simplification(
    tiny_cnn_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        runtime_validation, "SIMPLIFIER", "dyadiq.fuzz.planted:simplifier_dies_with_sigfpe"
    )
    graph = load_onnx(tiny_cnn_path)  # the caller survives the SIGFPE
    assert any("onnxsim crashed with SIGFPE" in note for note in graph.notes), graph.notes
    assert [n.op for n in graph.nodes()][:2] == ["Conv", "Relu"]
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err  # the planted print went to the log


def test_simplifier_hang_is_bounded_by_the_load_timeout(
    tiny_cnn_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_validation, "SIMPLIFIER", "dyadiq.fuzz.planted:simplifier_hangs")
    monkeypatch.setenv(runtime_validation.TIMEOUT_ENV, "3")
    start = time.monotonic()
    graph = load_onnx(tiny_cnn_path)
    assert time.monotonic() - start < 30
    assert any("did not finish" in note for note in graph.notes), graph.notes


def test_isolated_validation_survives_a_parent_with_onnxruntime_threads(
    tiny_cnn_path: Path,
) -> None:
    """Forking a process whose onnxruntime pools hold locks deadlocked onnxsim's child; the
    clean helper process forks instead, so loading after running sessions still finishes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        make_tiny_cnn().SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    session.run(None, {"x": np.zeros(TINY_INPUT_SHAPE, np.float32)})
    for _ in range(3):
        assert load_onnx(tiny_cnn_path).opset == 17
    del session


def test_report_json_stays_parseable(tmp_path: Path, calib: Path) -> None:
    model = save_model(make_tiny_cnn(), tmp_path / "model" / "tiny.onnx")
    out = tmp_path / "out"
    assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib)]) == 0
    json.loads((out / "report.json").read_text())
