"""Crash classes and faults found by the robustness audit (issue 14), each reproduced.

Every case must end the way the bad-input contract says: one typed error, exit status 2 (130
for an interrupt), no traceback, the input untouched, and the output folder as it was before
the run (absent if it did not exist).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys
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
from dyadiq.errors import (
    ConfigError,
    DyadiqError,
    ModelLoadError,
    OutputPathError,
    UnsupportedModelError,
)
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
def test_huge_weight_before_softmax_keeps_that_softmax_in_float(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logits too large for the integer softmax's int64 working scale (an OverflowError once,
    then a refusal of the whole model): that softmax runs as a float island instead."""
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
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert any(op.startswith("Softmax") for op in report["integer"]["float_ops"])
    assert report["verification"]["passed"] is True


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


# --- faults: all-or-nothing output folders ------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> digest of every file under ``folder`` (hidden ones included)."""
    return {
        str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _no_staging_left(parent: Path) -> None:
    hidden = [p.name for p in parent.iterdir() if p.name.startswith(".")]
    assert hidden == [], f"temporary folders left behind: {hidden}"


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_model(make_tiny_cnn(), tmp_path / "model" / "tiny.onnx")


def _quantize_argv(model: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "-o", str(out), "--calib", str(calib), *extra]


def _fail_nth_fsync(monkeypatch: pytest.MonkeyPatch, n: int, error: int) -> None:
    """Every write goes through dyadiq.io's fsync: fail the n-th like a full disk would."""
    real = os.fsync
    calls = {"count": 0}

    def fsync(fd: int) -> None:
        calls["count"] += 1
        if calls["count"] == n:
            raise OSError(error, os.strerror(error))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_write_fault_leaves_the_previous_folder_as_it_was(
    error: int,
    tmp_path: Path,
    model_path: Path,
    calib: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert main(_quantize_argv(model_path, out, calib, "--wbits", "4", "--integer")) == 0
    before = _snapshot(out)
    _fail_nth_fsync(monkeypatch, 2, error)  # plan.json written, the QDQ model fails
    status, text = run_cli(capsys, _quantize_argv(model_path, out, calib, "--wbits", "8"))
    assert status == 2, text
    assert os.strerror(error) in text and "left as it was" in text, text
    assert "Traceback" not in text
    assert _snapshot(out) == before  # no W8 plan next to the W4 integer model
    _no_staging_left(tmp_path)


def test_write_fault_in_a_new_folder_leaves_nothing(
    tmp_path: Path,
    model_path: Path,
    calib: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "new" / "deeper" / "out"
    _fail_nth_fsync(monkeypatch, 3, errno.ENOSPC)
    status, text = run_cli(capsys, _quantize_argv(model_path, out, calib))
    assert status == 2 and "not created" in text, text
    assert not (tmp_path / "new").exists()  # the parents it made are gone too


def test_failure_after_some_outputs_keeps_the_previous_run(
    tmp_path: Path, model_path: Path, calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refusal late in the run (the integer export refused, as an accumulator overflow is)
    used to leave model.qdq.onnx + plan.json without report.json."""
    out = tmp_path / "out"
    assert main(_quantize_argv(model_path, out, calib, "--wbits", "4")) == 0
    before = _snapshot(out)
    from dyadiq import pipeline

    def refuse(*_: object) -> None:
        raise UnsupportedModelError("accumulator of layer conv could overflow int32")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "build_integer", refuse)
        assert_typed(
            capsys,
            _quantize_argv(model_path, out, calib, "--integer"),
            UnsupportedModelError,
            "overflow",
            "left as it was",
        )
    assert _snapshot(out) == before
    _no_staging_left(tmp_path)


def test_a_reused_folder_holds_only_the_new_run(
    tmp_path: Path, model_path: Path, calib: Path
) -> None:
    out = tmp_path / "out"
    assert main(_quantize_argv(model_path, out, calib, "--wbits", "4", "--integer")) == 0
    (out / "notes.txt").write_text("mine")
    assert main(_quantize_argv(model_path, out, calib, "--wbits", "8")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["model.qdq.onnx", "notes.txt", "plan.json", "report.html", "report.json"], (
        names
    )
    assert (out / "notes.txt").read_text() == "mine"  # the user's own file is carried over
    _no_staging_left(tmp_path)


def test_files_follow_the_umask(tmp_path: Path, model_path: Path, calib: Path) -> None:
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main(_quantize_argv(model_path, out, calib)) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_interrupt_mid_run_exits_130_and_leaves_the_folder(
    tmp_path: Path, model_path: Path, calib: Path
) -> None:
    """A real SIGINT, delivered once the QDQ model is written (before report.json)."""
    out = tmp_path / "out"
    assert main(_quantize_argv(model_path, out, calib, "--wbits", "4")) == 0
    before = _snapshot(out)
    script = (
        "import os, signal, sys\n"
        # a user's Ctrl-C: a child inherits an ignored SIGINT, and some test before this one
        # may have left the pytest process ignoring it
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from dyadiq import pipeline\n"
        "from dyadiq.cli import main\n"
        "real = pipeline.write_qdq\n"
        "def write_then_interrupt(*args, **kwargs):\n"
        "    model = real(*args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return model\n"
        "pipeline.write_qdq = write_then_interrupt\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *_quantize_argv(model_path, out, calib, "--wbits", "8")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr and "left as it was" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert _snapshot(out) == before
    _no_staging_left(tmp_path)


def test_a_verification_failure_keeps_the_complete_folder(
    tmp_path: Path,
    model_path: Path,
    calib: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dyadiq import pipeline

    def broken(*_: object) -> dict[str, object]:
        return {"exact_tensors": 1, "tensors": 2, "mismatches": ["batch 0 tensor y: 1"]}

    monkeypatch.setattr(pipeline, "bit_exactness", broken)
    out = tmp_path / "out"
    status, text = run_cli(capsys, _quantize_argv(model_path, out, calib, "--integer"))
    assert status == 3, text
    assert {p.name for p in out.iterdir()} >= {"model.int.onnx", "report.json", "plan.json"}


# --- faults: outputs over inputs ----------------------------------------------------------------
def test_output_over_a_relax_input_is_refused(
    tmp_path: Path, calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dyadiq quantize DIR/plan.json -o DIR``: the guard checked the temporary ONNX
    translation, so dyadiq's plan.json replaced the user's Relax model."""
    tvm = pytest.importorskip("tvm")
    from test_relax_frontend import _every_supported_op

    folder = tmp_path / "DIR"
    folder.mkdir()
    relax_input = folder / "plan.json"
    relax_input.write_text(tvm.ir.save_json(_every_supported_op(np.random.default_rng(2))))
    digest = file_digest(relax_input)
    assert_typed(
        capsys,
        ["quantize", str(relax_input), "-o", str(folder), "--calib", str(calib)],
        OutputPathError,
        "input",
    )
    assert file_digest(relax_input) == digest


@pytest.mark.parametrize("which", ["calib folder", "plan", "symlinked model folder"])
def test_output_over_any_input_is_refused(
    which: str,
    tmp_path: Path,
    model_path: Path,
    calib: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = tmp_path / "plans" / "plan.json"
    plan.parent.mkdir()
    assert main(_quantize_argv(model_path, tmp_path / "first", calib)) == 0
    plan.write_bytes((tmp_path / "first" / "plan.json").read_bytes())
    link = tmp_path / "link"
    link.symlink_to(model_path.parent)
    out = {"calib folder": calib, "plan": plan.parent, "symlinked model folder": link}[which]
    before = _snapshot(out)
    argv = _quantize_argv(model_path, out, calib, "--plan", str(plan))
    assert_typed(capsys, argv, OutputPathError, "input")
    assert _snapshot(out) == before


# --- conflicting or meaningless options, and errors that blamed the wrong thing ----------------
OPTION_CASES: dict[str, tuple[list[str], str]] = {
    "--percentile 200": (["--percentile", "200"], "--percentile"),
    "--percentile nan": (["--percentile", "nan"], "--percentile"),
    "--percentile 0": (["--percentile", "0"], "--percentile"),
    "--calib-limit 0": (["--calib-limit", "0"], "--calib-limit"),
    "--pin pattern matching nothing": (
        ["--budget", "avg-wbits=6", "--compensate", "none", "--pin", "/nothing*=W8A8"],
        "matches no layer",
    ),
    "--pin without a budget": (["--pin", "conv=W8A8"], "--budget"),
    "--plan with --budget": (["--plan", "PLAN", "--budget", "avg-wbits=6"], "pick one"),
    "MODEL with --zoo": (["--zoo", "fashion_cnn"], "not both"),
    "--check-inputs 0": (["--integer", "--check-inputs", "0"], "--check-inputs"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_conflicting_or_meaningless_options_are_refused(
    case: str, tmp_path: Path, model_path: Path, calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra, fragment = OPTION_CASES[case]
    if "PLAN" in extra:
        assert main(_quantize_argv(model_path, tmp_path / "first", calib)) == 0
        extra = [str(tmp_path / "first" / "plan.json") if e == "PLAN" else e for e in extra]
    out = tmp_path / "out"
    argv = _quantize_argv(model_path, out, calib, *extra)
    assert_typed(capsys, argv, ConfigError, fragment)
    assert not out.exists()


def test_nan_weights_are_a_model_error_not_a_calibration_error(
    tmp_path: Path, calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_tiny_cnn()
    weights = numpy_helper.to_array(model.graph.initializer[0]).copy()
    weights[0, 0, 0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weights, "w_conv"))
    path = save_model(model, tmp_path / "model" / "nan.onnx")
    argv = _quantize_argv(path, tmp_path / "out", calib)
    assert_typed(capsys, argv, ModelLoadError, "NaN weights", "w_conv (1 of 108)")


def test_a_folder_given_as_the_model_says_so(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = assert_typed(capsys, ["inspect", str(model_path.parent)], ModelLoadError, "is a folder")
    assert "not found" not in text


# --- found by the fuzzer ----------------------------------------------------------------------
def test_a_float_island_reading_one_tensor_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Add(a, a) before a depthwise conv: the island's ONNX graph declared ``a`` twice and
    onnxruntime's "Duplicate definition-site" escaped as a raw traceback."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        twice (float[1,4,6,6] a) => (float[1,4,1,1] y) {
            s = Add(a, a)
            w = Constant<value = float[4,1,3,3] {
                1,0,0,0,1,0,0,0,1, 0,1,0,0,1,0,0,1,0, 1,1,1,0,0,0,0,0,0, 0,0,1,0,1,0,1,0,0}>()
            d = Conv<group = 4, pads = [1, 1, 1, 1]>(s, w)
            y = GlobalAveragePool(d)
        }
        """
    )
    path = save_model(model, tmp_path / "model" / "twice.onnx")
    calib = write_npz_folder(tmp_path / "calib", random_batches({"a": (1, 4, 6, 6)}, 2))
    argv = _quantize_argv(path, tmp_path / "out", calib, "--integer")
    status, text = run_cli(capsys, argv)
    assert status == 0, text
    assert "Traceback" not in text


def test_a_plan_whose_layers_are_a_list_is_a_config_error(
    tmp_path: Path, model_path: Path, calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text('{"layers": []}')
    argv = _quantize_argv(model_path, tmp_path / "out", calib, "--plan", str(plan))
    assert_typed(capsys, argv, ConfigError, "malformed plan")


def test_names_that_are_not_utf8_are_a_model_load_error(
    tmp_path: Path, calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flipped byte in an op type: protobuf hands it over as bytes, and onnx_op_kind
    (TypeError) or graph export (UnicodeDecodeError) crashed on it."""
    data = make_tiny_cnn().SerializeToString()
    assert data.count(b"Relu") == 1
    path = tmp_path / "model" / "flipped.onnx"
    path.parent.mkdir()
    path.write_bytes(data.replace(b"Relu", b"R\xf1lu"))
    assert_typed(capsys, ["inspect", str(path)], ModelLoadError, "not valid UTF-8")
    argv = _quantize_argv(path, tmp_path / "out", calib)
    assert_typed(capsys, argv, ModelLoadError, "node #1 op_type")


def test_declared_shapes_that_disagree_with_the_data_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fuzzer's case: a dynamic batch dim and an older opset; the integer program's
    reshape could not take the data (a numpy ValueError escaped)."""
    from dyadiq.fuzz import mutators, seeds

    seed = seeds.seed_model("attention_block")
    model = mutators.apply_model_mutations(seed, (("opset", 1333779611), ("dim", 1939842130)))
    path = save_model(model, tmp_path / "model" / "m.onnx")
    batches = seeds.calibration_batches(seed, 2, np.random.default_rng(626675869))
    calib = write_npz_folder(tmp_path / "calib", batches)
    argv = _quantize_argv(path, tmp_path / "out", calib, "--integer")
    assert_typed(capsys, argv, UnsupportedModelError, "declared shapes disagree")


@pytest.mark.parametrize(
    ("seed_model", "mutation", "data_seed"),
    [
        ("attention_block", ("weights", 1526889228), 1214546500),  # multiplier >= 2^31
        ("two_inputs", ("attribute", 1526244647), 1572597082),  # multiplier -inf
    ],
)
def test_rescales_without_a_dyadic_form_are_typed(
    seed_model: str,
    mutation: tuple[str, int],
    data_seed: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Fuzzer cases: ``dyadic`` raised a bare ValueError from integerize. Now the model is
    either refused with a typed error or, where the huge weight only feeds a softmax that
    then runs in float, quantized."""
    from dyadiq.fuzz import mutators, seeds

    seed = seeds.seed_model(seed_model)
    model = mutators.apply_model_mutations(seed, (mutation,))
    path = save_model(model, tmp_path / "model" / "m.onnx")
    batches = seeds.calibration_batches(seed, 2, np.random.default_rng(data_seed))
    calib = write_npz_folder(tmp_path / "calib", batches)
    argv = _quantize_argv(path, tmp_path / "out", calib, "--integer")
    status, text = run_cli(capsys, argv)
    assert status in (0, 2), text
    if status == 2:
        assert re.search(r"error: (RequantizationError|UnsupportedModelError):", text), text
    else:
        assert (tmp_path / "out" / "model.int.onnx").is_file()
    assert "Traceback" not in text
