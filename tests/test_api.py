"""``dyadiq.quantize``: what it returns, that its defaults are the command line's, and the
small things it decides for both (layer names, a single .npz, file modes)."""

from __future__ import annotations

import inspect
import json
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_INPUT_SHAPE, random_batches

import dyadiq
from dyadiq.api import SearchOptions, TargetOptions
from dyadiq.cli import build_parser, main
from dyadiq.cli.allocation import search_options
from dyadiq.cli.quantize import DEFAULT_WBITS
from dyadiq.errors import ConfigError
from dyadiq.progress import Mode, configure

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    configure(Mode.QUIET)
    yield
    configure(Mode.AUTO)


def test_result_paths_report_and_short_repr(tiny_cnn_path: Path, tmp_path: Path) -> None:
    batches = random_batches({"x": TINY_INPUT_SHAPE}, 4)
    made = dyadiq.quantize(tiny_cnn_path, batches, out=tmp_path / "OUT", integer=True)
    assert set(made.paths) == {"qdq", "plan", "report", "report_html", "integer"}
    assert all(p.is_file() and p.parent == tmp_path / "OUT" for p in made.paths.values())
    assert made.report == json.loads(made.paths["report"].read_text())
    assert made.metrics is None  # held-out data exists for zoo models only
    assert made.verified
    assert len(repr(made)) < 200 and "\n" not in repr(made)
    assert len(repr(made.pipeline)) < 200  # the dataclass repr printed the whole graph
    assert set(made.plan.layers) == {"conv", "fc"}


def test_out_none_writes_a_temporary_folder(tiny_cnn_path: Path) -> None:
    made = dyadiq.quantize(tiny_cnn_path, random_batches({"x": TINY_INPUT_SHAPE}, 2))
    folder = made.paths["qdq"].parent
    assert made.paths["qdq"].is_file()
    del made  # the folder lives as long as the result
    import gc

    gc.collect()
    assert not folder.exists()


def test_defaults_equal_the_command_line() -> None:
    """Every API default is the CLI's (compensation included): one run, two spellings."""
    args = build_parser().parse_args(["quantize", "m.onnx", "-o", "OUT"])
    params = inspect.signature(dyadiq.quantize).parameters
    # --wbits has no parser default (--weight-only has its own): unset means DEFAULT_WBITS
    assert args.wbits is None and params["wbits"].default == DEFAULT_WBITS
    flag_of = {
        "abits": "abits",
        "act_dtype": "act_dtype",
        "qdq_style": "qdq_style",
        "calibrator": "calibrator",
        "percentile": "percentile",
        "range_search": "range_search",
        "calib_preset": "calib_preset",
        "calib_limit": "calib_limit",
        "compensate": "compensate",
        "budget": "budget",
        "max_drop": "max_drop",
        "target": "target",
        "integer": "integer",
        "eval_limit": "eval_limit",
        "compare_ort": "compare_ort",
        "runtime_kernels": "runtime_kernels",
        "allow_mismatch": "allow_mismatch",
        "calibration": "calib",
        "validation": "val",
        "test": "test",
        "labels": "labels",
        "test_labels": "test_labels",
    }
    for param, flag in flag_of.items():
        assert params[param].default == getattr(args, flag), param
    assert tuple(args.exclude) == params["exclude"].default == ()
    assert tuple(args.pin) == params["pin"].default == ()
    assert params["evaluate"].default is (not args.no_eval)  # True: no callback, do evaluate
    search, build = SearchOptions(), TargetOptions()
    # --wbits-candidates has no parser default either (--weight-only has its own widths)
    assert args.wbits_candidates is None
    assert search_options(args).wbits_candidates == search.wbits_candidates == (2, 3, 4, 5, 6, 7, 8)
    assert (search.abits_candidates, search.proxy) == (args.abits_candidates, args.proxy)
    assert (search.analysis_samples, search.bisect_steps) == (
        args.analysis_samples,
        args.bisect_steps,
    )
    assert (build.check_inputs, build.tune_trials, build.layer_latency) == (
        args.check_inputs,
        args.tune_trials,
        args.layer_latency,
    )


def test_single_npz_file_as_calibration(
    tiny_cnn_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = random_batches({"x": TINY_INPUT_SHAPE}, 1)[0]
    np.savez(tmp_path / "one.npz", **batch)
    out = tmp_path / "OUT"
    argv = ["quantize", str(tiny_cnn_path), "-o", str(out), "--calib", str(tmp_path / "one.npz")]
    assert main(argv) == 0
    assert json.loads((out / "report.json").read_text())["calibration_batches"] == 1
    np.save(tmp_path / "one.npy", batch["x"])
    argv[-1] = str(tmp_path / "one.npy")
    assert main(argv) == 2
    assert "one .npz file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("entry", "float_layers"),
    [("fc", {"fc"}), ("Gemm", {"fc"}), ("c*", {"conv"}), ("Conv", {"conv"})],
)
def test_exclude_by_name_pattern_or_op_type(
    entry: str, float_layers: set[str], tiny_cnn_path: Path, tmp_path: Path
) -> None:
    batches = random_batches({"x": TINY_INPUT_SHAPE}, 2)
    made = dyadiq.quantize(tiny_cnn_path, batches, out=tmp_path / "OUT", exclude=[entry])
    assert {f["id"] for f in made.report["float_layers"]} == float_layers


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"exclude": ["fcc"]}, "--exclude 'fcc' matches no layer (closest layer ids: fc"),
        (
            {"budget": "avg-wbits=6", "pin": ["/classifier*=W8A8"]},
            "--pin '/classifier*' matches no layer",
        ),
        ({"budget": "avg-wbits=6", "pin": ["con*=W8A8"], "plan": "p.json"}, "pick one"),
    ],
)
def test_names_that_match_nothing_are_errors(
    kwargs: dict, fragment: str, tiny_cnn_path: Path, tmp_path: Path
) -> None:
    batches = random_batches({"x": TINY_INPUT_SHAPE}, 2)
    with pytest.raises(ConfigError) as caught:
        dyadiq.quantize(tiny_cnn_path, batches, out=tmp_path / "OUT", **kwargs)
    assert fragment in str(caught.value)
    assert "Conv, Gemm" in str(caught.value) or "pick one" in fragment
    assert not (tmp_path / "OUT").exists()


def test_output_files_follow_the_umask(tiny_cnn_path: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        made = dyadiq.quantize(
            tiny_cnn_path, random_batches({"x": TINY_INPUT_SHAPE}, 2), out=tmp_path / "OUT"
        )
    finally:
        os.umask(old)
    folder = made.paths["qdq"].parent
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert modes == dict.fromkeys(modes, "0o644") and len(modes) == 4
    assert oct(folder.stat().st_mode & 0o777) == "0o755"


def test_package_is_typed_and_documented() -> None:
    assert (ROOT / "dyadiq" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["dyadiq"]
    assert dyadiq.__doc__ and "dyadiq.quantize" in dyadiq.__doc__
    for name in dyadiq.__all__:
        assert inspect.getdoc(getattr(dyadiq, name)), name


def test_public_functions_have_docstrings() -> None:
    import dyadiq.api
    import dyadiq.backends.onnx.qdq
    import dyadiq.cli.summary
    import dyadiq.pipeline
    import dyadiq.progress

    modules = [dyadiq.api, dyadiq.pipeline, dyadiq.progress, dyadiq.backends.onnx.qdq]
    modules.append(dyadiq.cli.summary)
    undocumented = [
        f"{module.__name__}.{name}"
        for module in modules
        for name, item in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(item) or inspect.isclass(item))
        and item.__module__ == module.__name__
        and not (item.__doc__ or "").strip()
    ]
    assert undocumented == []
