"""Smoke test of ``benchmarks.proxy_quality`` in quick mode on fashion_cnn (about 20 s), with a
second run that reuses its measurements; the configuration sampler and KL metric alone."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``benchmarks`` lives at the repository root, not in the package
    sys.path.insert(0, str(REPO))


@pytest.mark.realmodel
def test_quick_proxy_quality_fashion_cnn(tmp_path: pathlib.Path) -> None:
    from benchmarks import proxy_quality
    from dyadiq.passes.sensitivity.analysis import PROXIES

    out = tmp_path / "results"
    proxy_quality.main(
        ["--quick", "--models", "fashion_cnn", "--configs", "8", "--output-dir", str(out)]
    )
    data = json.loads((out / "proxy_quality.json").read_text())
    assert (out / "proxy_quality.md").read_text().startswith("# Sensitivity proxies")
    for key in ("date", "command", "machine", "settings", "models", "total_wall_s", "runs"):
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
    assert res["verdict"]["pairs_vs_alone"]["trace"] in ("better", "worse", "equal")
    for column in ("empirical+pairs[raw]", "trace+pairs[floor]"):
        assert math.isfinite(res["correlations"][column]["kendall_tau"])
    stats = res["pair_terms"]
    assert (
        stats["terms"]
        == stats["within_noise"] + stats["significant_positive"] + stats["significant_negative"]
    )
    kl = res["extra_metrics"]["kl"]["measured"]
    assert len(kl) == 8 and all(v >= 0 for v in kl)
    assert res["float_metrics"]["kl"] == pytest.approx(0.0, abs=1e-9)

    # a second run reusing the measurements: same damage, predictions recomputed (from the
    # cached analyses: the same), the first run still named in the merged file
    proxy_quality.main(
        [
            "--quick",
            *("--models", "fashion_cnn", "--configs", "8", "--output-dir", str(out)),
            *("--reuse-measured", "fashion_cnn"),
        ]
    )
    merged = json.loads((out / "proxy_quality.json").read_text())
    again = merged["models"]["fashion_cnn"]
    assert "error" not in again, again.get("error")
    assert len(merged["runs"]) == 2
    assert again["run"] == 1 and again["measured_in_run"] == 0
    assert again["measured_damage"] == res["measured_damage"]
    assert again["predicted_damage"]["trace"] == res["predicted_damage"]["trace"]
    assert again["gradient_analysis"]["from_cache"]  # same settings: the cached report
    assert again["correlations"]["fisher"] == res["correlations"]["fisher"]


def test_config_spaces() -> None:
    from benchmarks.proxy_quality import CONFIG_SPACE, sample_configs

    ids = [f"layer{i}" for i in range(40)]
    default = sample_configs(ids, 30)
    assert len(default) == 30
    widths = {w for c in default for w in c["bits"].values()}
    assert widths == {2, 3, 4, 6, 8}
    mild = sample_configs(ids, 30, space=CONFIG_SPACE["mobilenet_v2"])
    assert all(c["p_low"] < 0.5 for c in mild)
    assert {w for c in mild for w in c["bits"].values()} == {3, 4, 6, 8}
    assert sample_configs(ids, 30) == default  # seeded: the same configurations every run


def test_mean_kl_matches_the_definition() -> None:
    from benchmarks.proxy_quality import mean_kl
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind

    rng = np.random.default_rng(0)
    z, w = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    q = np.exp(w) / np.exp(w).sum(-1, keepdims=True)
    expected = float(np.mean(np.sum(p * np.log(p / q), axis=-1)))
    assert mean_kl(z, w, OutputKind.LOGITS) == pytest.approx(expected, rel=1e-9)
    assert mean_kl(p, q, OutputKind.PROBABILITIES) == pytest.approx(expected, rel=1e-6)
    assert mean_kl(z, z + 3.0, OutputKind.LOGITS) == pytest.approx(0.0, abs=1e-12)
