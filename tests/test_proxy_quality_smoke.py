"""Smoke test of ``benchmarks.proxy_quality`` in quick mode on fashion_cnn (about 10 s)."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest

pytestmark = pytest.mark.realmodel

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``benchmarks`` lives at the repository root, not in the package
    sys.path.insert(0, str(REPO))


def test_quick_proxy_quality_fashion_cnn(tmp_path: pathlib.Path) -> None:
    from benchmarks import proxy_quality
    from dyadiq.passes.sensitivity.analysis import PROXIES

    out = tmp_path / "results"
    proxy_quality.main(
        ["--quick", "--models", "fashion_cnn", "--configs", "8", "--output-dir", str(out)]
    )
    data = json.loads((out / "proxy_quality.json").read_text())
    assert (out / "proxy_quality.md").read_text().startswith("# Sensitivity proxies")
    for key in ("date", "command", "machine", "settings", "models", "total_wall_s"):
        assert key in data
    res = data["models"]["fashion_cnn"]
    assert "error" not in res, res.get("error")
    assert res["configs"] == 8
    assert res["analysis"]["forward_passes"] > 0
    assert res["analysis"]["wall_s"] > 0
    assert set(res["caps"]) == {"analysis_samples", "calibration_samples", "evaluation_samples"}
    assert len(res["measured_damage"]) == 8
    assert res["build_fallbacks"] == 0
    for proxy in PROXIES:
        assert len(res["predicted_damage"][proxy]) == 8
        for stat in ("kendall_tau", "spearman_rho"):
            value = res["correlations"][proxy][stat]
            assert isinstance(value, float) and math.isfinite(value), (proxy, stat, value)
            assert -1.0 <= value <= 1.0
    assert res["verdict"]["hessian+pairs_vs_hessian"] in ("better", "worse", "equal")
