"""Smoke test of ``benchmarks.allocation`` in quick mode (solver + fashion_cnn, about 10 s)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

pytestmark = pytest.mark.realmodel

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``benchmarks`` lives at the repository root, not in the package
    sys.path.insert(0, str(REPO))


def test_quick_allocation_benchmark(tmp_path: pathlib.Path) -> None:
    from benchmarks import allocation

    out = tmp_path / "results"
    allocation.main(["--quick", "--output-dir", str(out)])
    data = json.loads((out / "allocation.json").read_text())
    assert (out / "allocation.md").read_text().startswith("# Bit allocation")
    for key in ("date", "command", "machine", "settings", "solver", "models", "total_wall_s"):
        assert key in data

    for instance in ("no_pairs", "pairs"):
        r = data["solver"][instance]
        assert r["layers"] == 40 and r["formats_per_layer"] == 10
        assert len(r["solve_s"]) >= 1 and 0 < r["median_s"] < 30
        assert r["within_budget"] and r["ties_honoured"]
        assert 2.0 <= r["avg_weight_bits"] <= 5.0 + 1e-6
    assert data["solver"]["pairs"]["pair_terms"] == 10
    everything = data["solver"]["all_budgets"]
    assert everything["act_tie_groups"] == 5 and everything["budget"].count(",") == 4
    assert everything["within_budget"] and everything["ties_honoured"]
    assert everything["proven_optimal"]

    res = data["models"]["fashion_cnn"]
    assert "error" not in res, res.get("error")
    s = res["summary"]
    assert s["metric"] == "accuracy" and s["random_n"] == 3
    for key in ("float", "heuristic", "random_median", "random_best"):
        assert 0.0 <= s[key] <= 1.0, (key, s[key])
    assert set(s["ilp"]) == set(data["settings"]["proxies"])
    for by_budget in s["ilp"].values():
        assert set(by_budget) == {"1", "0.9"} and all(0 <= v <= 1 for v in by_budget.values())
    assert s["random_best"] >= s["random_median"] >= s["random_worst"]
    assert s["heuristic"] > 0.5  # W4 with W8 ends barely hurts this model
    assert set(s["pairs_vs_alone"]) == {"empirical", "trace", "snr", "entropy"}
    budget = s["budget_bytes"]
    assert s["random_size_range"][0] >= 0.97 * budget - 1e-6
    assert s["random_size_range"][1] <= budget + 1e-6
    # each ILP plan is within its budget and minimises its own proxy's predicted damage
    plans = res["plans"]
    for key, row in plans.items():
        if not key.startswith("ilp:"):
            continue
        proxy, scale = key[4:].split("@")
        assert row["size_bytes"] <= float(scale) * budget * (1 + 1e-9)
        within = [
            v["predicted_damage"][proxy]
            for v in plans.values()
            if v["size_bytes"] <= float(scale) * budget * (1 + 1e-9)
        ]
        assert row["predicted_damage"][proxy] <= min(within) + 1e-9, key
    assert res["build_fallbacks"] == 0
    assert res["caps"]["evaluated_samples"] == 500
