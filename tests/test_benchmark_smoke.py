"""Smoke test of ``benchmarks.baseline`` in quick mode on fashion_cnn (about 40 s)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

pytestmark = pytest.mark.realmodel

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``benchmarks`` lives at the repository root, not in the package
    sys.path.insert(0, str(REPO))


def test_quick_benchmark_fashion_cnn(tmp_path: pathlib.Path) -> None:
    from benchmarks import baseline

    out = tmp_path / "results"
    baseline.main(
        ["--quick", "--models", "fashion_cnn", "--output-dir", str(out), "--eval-limit", "2000"]
    )
    data = json.loads((out / "baseline.json").read_text())
    assert (out / "baseline.md").read_text().startswith("# dyadiq vs onnxruntime")
    for key in ("date", "command", "machine", "settings", "models", "total_wall_s"):
        assert key in data
    for key in ("cpu_model", "nproc", "onnxruntime", "onnx", "numpy"):
        assert data["machine"][key]
    res = data["models"]["fashion_cnn"]
    assert "error" not in res, res.get("error")
    float_acc = res["float"]["accuracy"]
    assert float_acc > 0.85
    assert res["float"]["samples"] == 2000
    runs = res["runs"]
    expected = {
        "ort_minmax",
        "ort_percentile",
        "ort_entropy",
        "dyadiq_w8a8_minmax",
        "dyadiq_w8a8_percentile",
        "dyadiq_w8a8_mse",
        "dyadiq_w8a8_entropy",
        "dyadiq_w4a8_minmax",
        "dyadiq_w8a8_percentile_integer",
    }
    assert expected <= set(runs)
    for label in ("ort_minmax", "dyadiq_w8a8_minmax"):
        run = runs[label]
        assert run["status"] == "ok"
        assert abs(run["metrics"]["accuracy"] - float_acc) <= 0.02
        assert 0 < run["wall_s"] < 60
        assert 50 < run["peak_rss_mib"] < 4096
        assert run["peak_rss_mib"] >= run["rss_after_imports_mib"]
        assert 0 < run["model_bytes"] < res["float_model_bytes"]
    best = res["best"]
    assert best["ort"] in runs and best["dyadiq_w8a8"] in runs
    assert abs(runs[best["dyadiq_w8a8"]]["metrics"]["accuracy"] - float_acc) <= 0.02
    assert abs(runs[best["ort"]]["metrics"]["accuracy"] - float_acc) <= 0.02
    cmp_ = res["comparison"]["best_vs_best"]
    assert cmp_["time_ratio"] > 0 and cmp_["peak_rss_ratio"] > 0
    assert "accuracy_delta" in cmp_

    # integer-only run: evaluated like the others, bit-exact vs the reference interpreter
    label = "dyadiq_w8a8_percentile_integer"
    assert res["best"]["dyadiq_integer_w8a8"] == label
    run = runs[label]
    assert run["status"] == "ok"
    assert abs(run["metrics"]["accuracy"] - float_acc) <= 0.02
    integer = run["integer"]
    assert integer["fully_integer"] is True
    assert integer["float_ops"] == 0
    assert integer["tensors"] > 0
    assert integer["exact_tensors"] == integer["tensors"]
    assert integer["top1_agreement_qdq_vs_integer"] >= 0.99
    assert best["dyadiq_w8a8"] != label  # integer runs are not QDQ candidates
    latency = res["latency"]
    assert latency["runs"] >= 20 and latency["warmup"] >= 3
    assert set(latency["roles"]) == {"float", "ort_best", "dyadiq_qdq", "dyadiq_integer"}
    for role in latency["roles"].values():
        assert latency["median_ms"][role] > 0 and latency["ratio_to_float"][role] > 0
