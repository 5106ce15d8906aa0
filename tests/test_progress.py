"""Progress: one line per stage when piped, nothing when quiet, a live display on a terminal;
the quantize command's stages; the zoo's installs say what and why."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dyadiq import progress
from dyadiq.cli import main
from dyadiq.progress import Mode, configure, stage, track


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    configure(Mode.AUTO)


def test_lines_mode_prints_one_line_per_stage(capsys: pytest.CaptureFixture[str]) -> None:
    configure(Mode.LINES)
    with stage("compiling"):
        assert list(track(range(3), "calibrating", total=3)) == [0, 1, 2]
        assert list(track(iter("ab"), description="evaluating")) == ["a", "b"]
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout is for results
    assert captured.err.splitlines() == ["compiling ...", "calibrating (3)", "evaluating ..."]


def test_quiet_mode_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    configure(Mode.QUIET)
    with stage("compiling"):
        assert sum(track(range(4), "calibrating", 4)) == 6
    assert capsys.readouterr() == ("", "")


def test_rich_mode_nests_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    """A stage around a loop is one live display with two rows (rich allows one at a time)."""
    configure(Mode.RICH)
    with stage("outer"):
        assert list(track(range(3), "inner", 3)) == [0, 1, 2]
        with stage("second"):
            pass
    assert progress._live is None
    assert list(track(range(2), "again")) == [0, 1]  # a fresh display after the first
    assert capsys.readouterr().out == ""


def test_auto_mode_follows_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(Mode.AUTO)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert progress.current_mode() is Mode.LINES
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert progress.current_mode() is Mode.RICH


def test_quantize_stages_when_piped_and_quiet(
    tiny_cnn_path: Path,
    calib_npz_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["quantize", str(tiny_cnn_path), "-o", str(tmp_path / "OUT")]
    argv += ["--calib", str(calib_npz_folder), "--compensate", "none"]
    assert main(argv) == 0  # capsys: stderr is not a terminal
    err = capsys.readouterr().err.splitlines()
    assert err == ["quantizing tiny.onnx: calibration, QDQ rewrite, checks ...", "calibrating ..."]
    assert main(["--quiet", *argv]) == 0
    assert capsys.readouterr().err == ""


def test_zoo_install_says_what_and_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dyadiq.zoo import _install

    configure(Mode.LINES)
    monkeypatch.setattr(_install.importlib.util, "find_spec", lambda name: None)
    ran = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(_install.subprocess, "run", fake_run)
    _install._pip_install_if_missing("torchvision", "torchvision==0.1", True, "to export it")
    assert ran and ran[0][-1] == "torchvision==0.1"
    line = capsys.readouterr().err.strip()
    assert line.startswith("installing torchvision==0.1 with pip: to export it")
