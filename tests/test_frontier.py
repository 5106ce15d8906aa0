import json

import pytest

from dyadiq.cli import main


@pytest.mark.realmodel
def test_frontier_of_the_fashion_cnn(tmp_path, monkeypatch):
    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "cache" / "zoo"))
    out = tmp_path / "frontier"
    args = ["frontier", "--zoo", "fashion_cnn", "--points", "3", "-o", str(out)]
    assert main([*args, "--analysis-samples", "128", "--eval-limit", "1000"]) == 0
    data = json.loads((out / "frontier.json").read_text())
    points = data["points"]
    assert len(points) == 3 and data["metric"] == "accuracy"  # labelled: accuracy
    sizes = [p["size_bytes"] for p in points]
    assert sizes == sorted(sizes) and all(
        p["size_bytes"] <= p["budget_bytes"] + 1e-6 for p in points
    )
    damages = [p["predicted_damage"] for p in points]
    assert damages == sorted(damages, reverse=True)  # more bytes, less predicted damage
    assert points[-1]["metric"] > points[0]["metric"]  # and more measured accuracy
    assert 0.85 < data["float_metric"] < 0.95  # the float CNN on the same 1,000 test images
    assert data["float_metric"] >= points[0]["metric"]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.realmodel
def test_max_drop_meets_the_tolerance_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "cache" / "zoo"))
    out = tmp_path / "q"
    args = ["quantize", "--zoo", "fashion_cnn", "--max-drop", "1%", "-o", str(out)]
    args += ["--analysis-samples", "128", "--eval-limit", "1000", "--bisect-steps", "3"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    info = report["allocation"]
    assert info["plan_metric"] >= info["float_metric"] - 0.01
    # chosen on the even-positioned held-out images, reported on the 500 odd ones
    assert "even positions" in report["held_out"]["search"]["source"]
    assert "odd positions" in report["held_out"]["report"]["source"]
    assert report["metrics"]["float"]["samples"] == report["metrics"]["dyadiq plan"]["samples"]
    assert report["metrics"]["float"]["samples"] == 500
    passing = [h for h in info["history"] if h["passed"]]
    assert info["weight_bytes"] == min(h["size"] for h in passing)
    assert info["weight_bytes"] < 22_896  # smaller than all-W8 (22,896 weights x 1 byte)
    state = json.loads((out / "bisection_state.json").read_text())
    assert len(state) >= 2
    # a rerun measures nothing new: every plan it visits is in the saved state
    (out / "bisection_state.json").write_text(json.dumps(state))
    assert main(args) == 0
    again = json.loads((out / "report.json").read_text())["allocation"]
    assert again["weight_bytes"] == info["weight_bytes"]
    assert json.loads((out / "bisection_state.json").read_text()) == state


def test_max_drop_needs_held_out_data(tmp_path, capsys):
    import numpy as np
    import onnx

    from tests.builders import conv_relu_pool_fc

    (tmp_path / "m").mkdir()
    onnx.save(conv_relu_pool_fc(np.random.default_rng(0)), str(tmp_path / "m" / "m.onnx"))
    calib = tmp_path / "c"
    calib.mkdir()
    np.savez(calib / "0.npz", x=np.zeros((1, 3, 8, 8), np.float32))
    args = ["quantize", str(tmp_path / "m" / "m.onnx"), "--calib", str(calib)]
    assert main([*args, "-o", str(tmp_path / "o"), "--max-drop", "1%"]) == 2
    assert "held-out" in capsys.readouterr().err
