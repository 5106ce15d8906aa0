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
    assert len(points) == 3 and data["metric"] == "top1_agreement"
    sizes = [p["size_bytes"] for p in points]
    assert sizes == sorted(sizes) and all(
        p["size_bytes"] <= p["budget_bytes"] + 1e-6 for p in points
    )
    damages = [p["predicted_damage"] for p in points]
    assert damages == sorted(damages, reverse=True)  # more bytes, less predicted damage
    assert points[-1]["metric"] > points[0]["metric"]  # and more measured agreement
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
