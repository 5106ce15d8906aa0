"""The bad-input matrix: every user mistake ends in one typed error, never a traceback.

Each case checks, through the Python API and through the CLI (exit status 2, message on
stderr):
(a) the exact :class:`DyadiqError` subclass and a message fragment a user understands;
(b) the input model file is byte-for-byte unchanged;
(c) no partial output files are left in the output folder.
"""

from __future__ import annotations

import re
import shutil
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
from onnx import TensorProto, helper

from dyadiq.cli import main
from dyadiq.errors import (
    CalibrationDataError,
    DyadiqError,
    ModelLoadError,
    OutputPathError,
    UnsupportedModelError,
)
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.pipeline import CalibrationConfig, quantize


# --- helpers ----------------------------------------------------------------------------------
def _flat(text: str) -> str:
    """Undo the console's line wrapping so fragments can be matched in CLI output."""
    return re.sub(r"\s+", " ", text)


def assert_no_outputs(out: Path) -> None:
    """The output folder holds nothing (it may exist, empty, since it is checked up front)."""
    if out.exists():
        leftovers = sorted(p.name for p in out.rglob("*"))
        assert leftovers == [], f"partial outputs left in {out}: {leftovers}"


def assert_api_error(
    call: Callable[[], object], error: type[DyadiqError], *fragments: str
) -> DyadiqError:
    with pytest.raises(DyadiqError) as info:
        call()
    assert type(info.value) is error, f"expected {error.__name__}, got {info.type.__name__}"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


def assert_cli_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], error: type[DyadiqError], *fragments: str
) -> str:
    capsys.readouterr()  # drop anything earlier
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = _flat(captured.err)
    assert f"error: {error.__name__}:" in err, captured.err
    # Strip whitespace entirely for fragments: the console may wrap in the middle of a path.
    squeezed = re.sub(r"\s+", "", captured.err)
    for fragment in fragments:
        assert fragment in err or re.sub(r"\s+", "", fragment) in squeezed, (
            f"{fragment!r} not in {captured.err!r}"
        )
    assert "Traceback" not in captured.err + captured.out
    return err


@pytest.fixture
def calib_folder(tmp_path: Path) -> Path:
    return write_npz_folder(tmp_path / "calib_ok", random_batches({"x": TINY_INPUT_SHAPE}, 2))


# --- 1. unreadable model files ----------------------------------------------------------------
def _truncated(folder: Path) -> Path:
    data = make_tiny_cnn().SerializeToString()
    path = folder / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(folder: Path) -> Path:
    path = folder / "garbage.onnx"
    path.write_bytes(b"this is not an ONNX model\n" + bytes(range(256)))
    return path


def _empty(folder: Path) -> Path:
    path = folder / "empty.onnx"
    path.write_bytes(b"")
    return path


def _no_graph(folder: Path) -> Path:
    path = folder / "no_graph.onnx"
    path.write_bytes(b"\x08\x07")  # a valid ModelProto holding only ir_version = 7
    return path


def _missing(folder: Path) -> Path:
    return folder / "missing.onnx"


UNREADABLE = {
    "truncated": (_truncated, "is not a readable ONNX model"),
    "garbage": (_garbage, "is not a readable ONNX model"),
    "empty": (_empty, "model file is empty"),
    "no_graph": (_no_graph, "holds no graph"),
    "missing": (_missing, "model file not found"),
}


@pytest.fixture(params=sorted(UNREADABLE))
def unreadable(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str, str | None]:
    make, fragment = UNREADABLE[request.param]
    folder = tmp_path / "model"
    folder.mkdir()
    path = make(folder)
    return path, fragment, file_digest(path) if path.exists() else None


def _unchanged(path: Path, digest: str | None) -> None:
    if digest is None:
        assert not path.exists(), f"{path} was created"
    else:
        assert file_digest(path) == digest, f"{path} was modified"


def test_unreadable_model_load_onnx(unreadable: tuple[Path, str, str | None]) -> None:
    path, fragment, digest = unreadable
    assert_api_error(lambda: load_onnx(path), ModelLoadError, fragment)
    _unchanged(path, digest)


def test_unreadable_model_quantize_api(
    unreadable: tuple[Path, str, str | None], tmp_path: Path, calib_batches
) -> None:
    path, fragment, digest = unreadable
    out = tmp_path / "out"
    assert_api_error(lambda: quantize(path, out, calib_batches(2)), ModelLoadError, fragment)
    _unchanged(path, digest)
    assert_no_outputs(out)


def test_unreadable_model_cli(
    unreadable: tuple[Path, str, str | None],
    tmp_path: Path,
    calib_folder: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, fragment, digest = unreadable
    out = tmp_path / "out"
    assert_cli_error(capsys, ["inspect", str(path)], ModelLoadError, fragment)
    assert_cli_error(
        capsys,
        ["quantize", str(path), "-o", str(out), "--calib", str(calib_folder)],
        ModelLoadError,
        fragment,
    )
    _unchanged(path, digest)
    assert_no_outputs(out)


# --- 2. unsupported ops -----------------------------------------------------------------------
def _two_unsupported_ops() -> onnx.ModelProto:
    """Relu -> com.example::Foo -> com.example::Bar: two custom op types dyadiq lacks (a
    standard ONNX op without a rule, like NonMaxSuppression, runs in float instead)."""
    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 6, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 6])
    nodes = [
        helper.make_node("Relu", ["scores"], ["s"], name="relu"),
        helper.make_node("Foo", ["s"], ["s2"], name="custom_foo", domain="com.example"),
        helper.make_node("Bar", ["boxes", "s2"], ["selected"], name="nms", domain="com.example"),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [boxes, scores],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
    )


@pytest.fixture
def unsupported_path(tmp_path: Path) -> Path:
    return save_model(_two_unsupported_ops(), tmp_path / "model" / "unsupported.onnx")


UNSUPPORTED_FRAGMENTS = ("2 unsupported op type(s)", "com.example::Foo", "com.example::Bar")


def test_unsupported_ops_api(unsupported_path: Path, tmp_path: Path) -> None:
    digest = file_digest(unsupported_path)
    err = assert_api_error(
        lambda: load_onnx(unsupported_path), UnsupportedModelError, *UNSUPPORTED_FRAGMENTS
    )
    assert "custom_foo" in str(err) and "nms" in str(err)  # node names to look for
    # A ModelProto source is reported the same way and is not modified either.
    proto = _two_unsupported_ops()
    before = proto.SerializeToString()
    assert_api_error(lambda: load_onnx(proto), UnsupportedModelError, *UNSUPPORTED_FRAGMENTS)
    assert proto.SerializeToString() == before
    out = tmp_path / "out"
    batches = [{"boxes": np.zeros((1, 6, 4), np.float32), "scores": np.ones((1, 1, 6), np.float32)}]
    assert_api_error(
        lambda: quantize(unsupported_path, out, batches),
        UnsupportedModelError,
        *UNSUPPORTED_FRAGMENTS,
    )
    assert file_digest(unsupported_path) == digest
    assert_no_outputs(out)


def test_unsupported_ops_cli(
    unsupported_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = file_digest(unsupported_path)
    calib = write_npz_folder(
        tmp_path / "calib",
        [{"boxes": np.zeros((1, 6, 4), np.float32), "scores": np.ones((1, 1, 6), np.float32)}],
    )
    out = tmp_path / "out"
    for argv in (
        ["inspect", str(unsupported_path)],
        ["quantize", str(unsupported_path), "-o", str(out), "--calib", str(calib)],
    ):
        assert_cli_error(capsys, argv, UnsupportedModelError, *UNSUPPORTED_FRAGMENTS)
    assert file_digest(unsupported_path) == digest
    assert_no_outputs(out)


# --- 3. calibration data ----------------------------------------------------------------------
def _batches(**overrides: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Two good batches for the tiny CNN, with the second one's feeds replaced/extended."""
    good = random_batches({"x": TINY_INPUT_SHAPE}, 2)
    bad = dict(good[1])
    for name, value in overrides.items():
        if value is None:
            bad.pop(name)
        else:
            bad[name] = value
    return [good[0], bad]


def _nan() -> np.ndarray:
    x = np.zeros(TINY_INPUT_SHAPE, np.float32)
    x[0, 1, 2, 3] = np.nan
    return x


def _inf() -> np.ndarray:
    x = np.zeros(TINY_INPUT_SHAPE, np.float32)
    x[0, 0, 0, 0] = np.inf
    x[0, 2, 7, 7] = -np.inf
    return x


# name -> (batches, message fragments)
BAD_FEEDS: dict[str, tuple[Callable[[], list[dict[str, np.ndarray]]], tuple[str, ...]]] = {
    "missing_input": (
        lambda: _batches(x=None, image=np.zeros(TINY_INPUT_SHAPE, np.float32)),
        ("calibration batch 1", "missing ['x']", "unexpected ['image']"),
    ),
    "mis_shaped": (
        lambda: _batches(x=np.zeros((1, 3, 9, 9), np.float32)),
        ("calibration batch 1", "input x has shape [1, 3, 9, 9]", "wants [1, 3, 8, 8]"),
    ),
    "wrong_rank": (
        lambda: _batches(x=np.zeros((3, 8, 8), np.float32)),
        ("input x has shape [3, 8, 8]", "wants [1, 3, 8, 8]"),
    ),
    "int64_dtype": (
        lambda: _batches(x=np.ones(TINY_INPUT_SHAPE, np.int64)),
        ("calibration batch 1", "input x has dtype int64", "wants float32"),
    ),
    "nan": (lambda: _batches(x=_nan()), ("calibration batch 1", "input x", "1 NaN/Inf")),
    "inf": (lambda: _batches(x=_inf()), ("calibration batch 1", "input x", "2 NaN/Inf")),
}


@pytest.mark.parametrize("case", sorted(BAD_FEEDS))
def test_bad_calibration_feeds_api(case: str, tiny_cnn_path: Path, tmp_path: Path) -> None:
    make, fragments = BAD_FEEDS[case]
    digest = file_digest(tiny_cnn_path)
    out = tmp_path / "out"
    assert_api_error(lambda: quantize(tiny_cnn_path, out, make()), CalibrationDataError, *fragments)
    assert file_digest(tiny_cnn_path) == digest
    assert_no_outputs(out)


@pytest.mark.parametrize("case", sorted(BAD_FEEDS))
def test_bad_calibration_feeds_cli(
    case: str, tiny_cnn_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same batches saved as a folder of .npz files and given to ``--calib``."""
    make, fragments = BAD_FEEDS[case]
    calib = write_npz_folder(tmp_path / "calib", make())
    digest = file_digest(tiny_cnn_path)
    out = tmp_path / "out"
    argv = ["quantize", str(tiny_cnn_path), "-o", str(out), "--calib", str(calib)]
    assert_cli_error(capsys, argv, CalibrationDataError, *fragments)
    # The folder source reads the same batches, so the API gives the same error.
    assert_api_error(lambda: quantize(tiny_cnn_path, out, calib), CalibrationDataError, *fragments)
    assert file_digest(tiny_cnn_path) == digest
    assert_no_outputs(out)


def test_single_dict_instead_of_iterable(tiny_cnn_path: Path, tmp_path: Path) -> None:
    feeds = random_batches({"x": TINY_INPUT_SHAPE}, 1)[0]
    out = tmp_path / "out"
    assert_api_error(
        lambda: quantize(tiny_cnn_path, out, feeds), CalibrationDataError, "not a single dict"
    )
    assert_no_outputs(out)


@pytest.mark.parametrize("empty", [[], (), iter([])], ids=["list", "tuple", "iterator"])
def test_empty_calibration_iterable(empty: object, tiny_cnn_path: Path, tmp_path: Path) -> None:
    digest = file_digest(tiny_cnn_path)
    out = tmp_path / "out"
    assert_api_error(
        lambda: quantize(tiny_cnn_path, out, empty),  # type: ignore[arg-type]
        CalibrationDataError,
        "calibration data is empty",
    )
    assert file_digest(tiny_cnn_path) == digest
    assert_no_outputs(out)


def _image_folder(folder: Path, count: int = 2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i}.png")
    return folder


# name -> (model fixture, folder builder, preset, fragments)
BAD_FOLDERS: dict[str, tuple[str, Callable[[Path], Path], str | None, tuple[str, ...]]] = {
    "empty_folder": (
        "tiny_cnn_path",
        lambda p: (p.mkdir(parents=True), p)[1],
        None,
        ("calibration data is empty",),
    ),
    "folder_without_arrays": (
        "tiny_cnn_path",
        lambda p: (p.mkdir(parents=True), (p / "README.txt").write_text("hi"), p)[2],
        None,
        ("calibration data is empty",),
    ),
    "missing_folder": (
        "tiny_cnn_path",
        lambda p: p,
        None,
        ("calibration folder not found",),
    ),
    "npy_for_two_inputs": (
        "two_input_path",
        lambda p: _npy_folder(p, {"a": (1, 4)}),
        None,
        (".npy files but the model has 2 inputs", "['a', 'b']", ".npz"),
    ),
    "images_without_preset": (
        "tiny_cnn_path",
        _image_folder,
        None,
        ("holds images", "--calib-preset", "imagenet"),
    ),
    "unknown_preset": (
        "tiny_cnn_path",
        _image_folder,
        "no-such-preset",
        ("unknown image preset 'no-such-preset'", "imagenet"),
    ),
    "corrupt_npz": (
        "tiny_cnn_path",
        lambda p: _file_folder(p, "batch_000.npz", b"not a zip archive"),
        None,
        ("cannot read calibration file", "batch_000.npz"),
    ),
    "corrupt_npy": (
        "tiny_cnn_path",
        lambda p: _file_folder(p, "batch_000.npy", b"\x93NUMPY garbage"),
        None,
        ("cannot read calibration file", "batch_000.npy"),
    ),
    "pickled_npz": (
        "tiny_cnn_path",
        lambda p: _npz_folder(p, "b.npz", x=np.array([{"a": 1}], dtype=object)),
        None,
        ("cannot read calibration file", "b.npz", "without object arrays"),
    ),
    "npy_named_npz": (
        "tiny_cnn_path",
        lambda p: _npy_as_npz_folder(p, "b.npz", np.zeros(TINY_INPUT_SHAPE, np.float32)),
        None,
        ("cannot read calibration file", "not a .npz archive"),
    ),
}


def _file_folder(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / name).write_bytes(data)
    return folder


def _npz_folder(folder: Path, name: str, **arrays: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    np.savez(folder / name, **arrays)
    return folder


def _npy_as_npz_folder(folder: Path, name: str, array: np.ndarray) -> Path:
    """``.npy`` content under a ``.npz`` name."""
    folder.mkdir(parents=True)
    with open(folder / name, "wb") as handle:
        np.save(handle, array)
    return folder


def _npy_folder(folder: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    folder.mkdir(parents=True)
    for i, feeds in enumerate(random_batches(shapes, 2)):
        for array in feeds.values():
            np.save(folder / f"batch_{i}.npy", array)
    return folder


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_calibration_folder(
    case: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model_fixture, build, preset, fragments = BAD_FOLDERS[case]
    model_path: Path = request.getfixturevalue(model_fixture)
    calib = build(tmp_path / "calib")
    digest = file_digest(model_path)
    out = tmp_path / "out"
    assert_api_error(
        lambda: quantize(model_path, out, calib, config=CalibrationConfig(image_preset=preset)),
        CalibrationDataError,
        *fragments,
    )
    assert_no_outputs(out)
    argv = ["quantize", str(model_path), "-o", str(out), "--calib", str(calib)]
    if preset is not None:
        argv += ["--calib-preset", preset]
    assert_cli_error(capsys, argv, CalibrationDataError, *fragments)
    assert file_digest(model_path) == digest
    assert_no_outputs(out)


def test_npy_per_input_folder_is_accepted(two_input_path: Path, tmp_path: Path) -> None:
    """Counterpart of ``npy_for_two_inputs``: one NAME.npy per input is a valid batch."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for name, array in random_batches({"a": (1, 4), "b": (1, 4)}, 1)[0].items():
        np.save(calib / f"{name}.npy", array)
    result = quantize(two_input_path, tmp_path / "out", calib)
    assert result.statistics.batches == 1


# --- 4. external data -------------------------------------------------------------------------
def _external_data_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    path = folder / "ext.onnx"
    onnx.save_model(
        make_tiny_cnn(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (folder / "weights.bin").is_file()
    return path


def test_external_data_model_loads(tmp_path: Path) -> None:
    """Sanity check for the two cases below: the untouched model loads fine."""
    path = _external_data_model(tmp_path / "model")
    graph = load_onnx(path)
    assert {n.op for n in graph.nodes()} >= {"Conv", "Gemm"}


def _relocate_external_data(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    edited = 0
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
                edited += 1
    assert edited
    path.write_bytes(model.SerializeToString())


def test_external_data_outside_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], calib_folder: Path
) -> None:
    path = _external_data_model(tmp_path / "model")
    outside = tmp_path / "outside.bin"
    shutil.copy(tmp_path / "model" / "weights.bin", outside)  # a readable file: still refused
    _relocate_external_data(path, "../outside.bin")
    digests = {p: file_digest(p) for p in (path, outside, tmp_path / "model" / "weights.bin")}
    fragments = ("refusing external data outside the model's folder", "../outside.bin")
    out = tmp_path / "out"
    assert_api_error(lambda: load_onnx(path), ModelLoadError, *fragments)
    assert_api_error(lambda: quantize(path, out, calib_folder), ModelLoadError, *fragments)
    assert_no_outputs(out)
    assert_cli_error(capsys, ["inspect", str(path)], ModelLoadError, *fragments)
    assert_cli_error(
        capsys,
        ["quantize", str(path), "-o", str(out), "--calib", str(calib_folder)],
        ModelLoadError,
        *fragments,
    )
    assert_no_outputs(out)
    assert {p: file_digest(p) for p in digests} == digests


def test_external_data_absolute_path_outside(tmp_path: Path) -> None:
    path = _external_data_model(tmp_path / "model")
    outside = tmp_path / "abs_outside.bin"
    shutil.copy(tmp_path / "model" / "weights.bin", outside)
    _relocate_external_data(path, str(outside))
    assert_api_error(
        lambda: load_onnx(path), ModelLoadError, "refusing external data outside the model's"
    )


def test_external_data_file_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], calib_folder: Path
) -> None:
    path = _external_data_model(tmp_path / "model")
    (tmp_path / "model" / "weights.bin").unlink()
    digest = file_digest(path)
    fragments = ("external data files not found", "weights.bin")
    out = tmp_path / "out"
    assert_api_error(lambda: load_onnx(path), ModelLoadError, *fragments)
    assert_api_error(lambda: quantize(path, out, calib_folder), ModelLoadError, *fragments)
    assert_cli_error(capsys, ["inspect", str(path)], ModelLoadError, *fragments)
    assert_cli_error(
        capsys,
        ["quantize", str(path), "-o", str(out), "--calib", str(calib_folder)],
        ModelLoadError,
        *fragments,
    )
    assert file_digest(path) == digest
    assert not (tmp_path / "model" / "weights.bin").exists()
    assert_no_outputs(out)


# --- 5. output folder -------------------------------------------------------------------------
def test_output_folder_is_input_folder(
    tiny_cnn_path: Path, calib_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tiny_cnn_path.parent
    before = {p.name: file_digest(p) for p in folder.iterdir()}
    fragments = ("is the input model's folder", "choose a separate folder")
    assert_api_error(
        lambda: quantize(tiny_cnn_path, folder, calib_folder), OutputPathError, *fragments
    )
    # Spelled differently (relative-looking path with ".."), still the same folder.
    alias = folder / ".." / folder.name
    assert_api_error(
        lambda: quantize(tiny_cnn_path, alias, calib_folder), OutputPathError, *fragments
    )
    assert_cli_error(
        capsys,
        ["quantize", str(tiny_cnn_path), "-o", str(folder), "--calib", str(calib_folder)],
        OutputPathError,
        *fragments,
    )
    assert {p.name: file_digest(p) for p in folder.iterdir()} == before


def test_output_path_is_a_file(
    tiny_cnn_path: Path, calib_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "not_a_folder"
    target.write_text("keep me")
    assert_api_error(
        lambda: quantize(tiny_cnn_path, target, calib_folder), OutputPathError, "not a folder"
    )
    assert_cli_error(
        capsys,
        ["quantize", str(tiny_cnn_path), "-o", str(target), "--calib", str(calib_folder)],
        OutputPathError,
        "not a folder",
    )
    assert target.read_text() == "keep me"


# --- 6. onnx.checker --------------------------------------------------------------------------
def _undefined_input_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Add", ["r", "ghost"], ["y"], name="add"),  # "ghost" is undefined
        ],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_model_failing_checker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_model(_undefined_input_model(), tmp_path / "model" / "broken.onnx")
    digest = file_digest(path)
    fragments = ("fails onnx.checker", "ghost")
    out = tmp_path / "out"
    calib = write_npz_folder(tmp_path / "calib", random_batches({"x": (1, 4)}, 1))
    assert_api_error(lambda: load_onnx(path), ModelLoadError, *fragments)
    assert_api_error(lambda: quantize(path, out, calib), ModelLoadError, *fragments)
    assert_cli_error(capsys, ["inspect", str(path)], ModelLoadError, *fragments)
    assert_cli_error(
        capsys,
        ["quantize", str(path), "-o", str(out), "--calib", str(calib)],
        ModelLoadError,
        *fragments,
    )
    assert file_digest(path) == digest
    assert_no_outputs(out)


def test_bad_input_shape_option(tiny_cnn_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_cli_error(
        capsys,
        ["inspect", str(tiny_cnn_path), "--input-shape", "nope=1x3x8x8"],
        ModelLoadError,
        "are not model inputs",
    )


def test_cli_error_message_is_printed_verbatim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "models[v2]"
    folder.mkdir()
    path = folder / "missing.onnx"
    assert_cli_error(capsys, ["inspect", str(path)], ModelLoadError, "models[v2]")


def test_declared_shape_contradicting_the_ops_is_refused_at_load(tmp_path: Path) -> None:
    """A graph output declared [1, 17] where the Gemm computes [1, 4] runs in onnxruntime, but
    every model written from it would fail onnx.checker (a fuzz case that ended in an internal
    error): refused at load, naming the node."""
    model = make_tiny_cnn()
    output = model.graph.output[0]
    dims = output.type.tensor_type.shape.dim
    dims[len(dims) - 1].dim_value = 17
    path = save_model(model, tmp_path / "contradiction.onnx")
    with pytest.raises(ModelLoadError, match="declared tensor shapes contradict its ops"):
        load_onnx(path)
    assert main(["inspect", str(path)]) == 2
