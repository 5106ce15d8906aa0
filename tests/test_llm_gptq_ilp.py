"""benchmarks/llm_gptq_ilp.py: its results merge into benchmarks.llm's main table, its damage
caches are named by what they measured, and its sensitivity windows are benchmarks.llm's
(no model)."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import llm, llm_gptq_ilp
from dyadiq.zoo import gemma3


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(
        work=tmp_path / "work",
        out=tmp_path / "out",
        eval_windows=32,
        calib_windows=64,
        calib_text=gemma3.BRITANNICA_SPREAD,
        clip_objective="hessian",
        sens_windows=2,
        widths="3,4,5,6",
        table_widths="3,4",
    )


def _row(perplexity: float) -> dict[str, object]:
    return {"perplexity": perplexity, "bits_per_byte": 1.3, "file_bytes": 147_506_448}


def test_results_merge_into_the_main_table(tmp_path: Path) -> None:
    main = {
        "command": "python -m benchmarks.llm --stages float,gptq,rtn,ort",
        "date": "2026-12-07T19:38:32+00:00",
        "partial": False,
        "eval_windows": 32,
        "calib_windows": 64,
        "calib_text": gemma3.BRITANNICA_SPREAD,
        "sens_windows": 2,
        "seconds": 2618.6,
        "rows": {
            "float": _row(43.37),
            "onnxruntime RTN int4 g128 (MatMulNBits)": _row(67.03),
            "dyadiq GPTQ int4 g128": _row(48.44),
        },
    }
    ilp_row = {
        **_row(47.0),
        "average_code_bits": 3.5,
        "stored_weight_bytes": 126.6e6,
        "layers_per_width": {"3": 20, "4": 50, "5": 40, "6": 17},
        "tied_embedding_bits": 3,
        "predicted_damage": 0.5,
        "sensitivity_seconds": 900.0,
        "sensitivity_windows": 2,
    }
    uniform_row = {**_row(48.44), "average_code_bits": 4.0, "stored_weight_bytes": 143.4e6}
    ours = llm_gptq_ilp.results(
        "python -m benchmarks.llm_gptq_ilp ...",
        _args(tmp_path),
        {
            "dyadiq ILP avg 3.5 bits (GPTQ g128)": ilp_row,
            "dyadiq GPTQ int4 g128 (cached codes)": uniform_row,
        },
        time.perf_counter(),
        partial=False,
    )
    parts = []
    for name, data in (("main", main), ("ilp", ours)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        parts.append(path)
    assert llm._merge(parts, tmp_path / "merged") == 0
    merged = json.loads((tmp_path / "merged" / "llm.json").read_text())
    # the ILP row sits with dyadiq's rows, before onnxruntime's
    assert list(merged["rows"]) == [
        "float",
        "dyadiq GPTQ int4 g128",
        "dyadiq GPTQ int4 g128 (cached codes)",
        "dyadiq ILP avg 3.5 bits (GPTQ g128)",
        "onnxruntime RTN int4 g128 (MatMulNBits)",
    ]
    table = (tmp_path / "merged" / "llm.md").read_text()
    assert "| dyadiq ILP avg 3.5 bits (GPTQ g128) | 47.00 |" in table
    assert "predicted damage (sum of KL) 0.5000, sensitivity 900 s on 2 window(s)" in table


def test_damage_caches_name_their_calibration_count(tmp_path: Path) -> None:
    # the plays' first windows are the same whatever the count: the earlier runs' names stay
    assert llm_gptq_ilp.damage_path(tmp_path, gemma3.PLAYS_TEXT, 64, 1, "").name == (
        "damage_1.json"
    )
    spread = llm_gptq_ilp.damage_path(tmp_path, gemma3.BRITANNICA_SPREAD, 64, 2, "_x")
    assert spread.name == "damage_2of64_x.json"
    assert spread != llm_gptq_ilp.damage_path(tmp_path, gemma3.BRITANNICA_SPREAD, 32, 2, "_x")


def test_sensitivity_seconds_count_the_measurements_the_ilp_read() -> None:
    used = ["node_linear@3", "node_linear@4", "node_linear_126#rtn@3"]
    assert llm_gptq_ilp._covers("node_linear@3,4,5,6", used)
    assert llm_gptq_ilp._covers("node_linear_126#rtn@3", used)
    assert not llm_gptq_ilp._covers("node_linear@2", used)
    assert not llm_gptq_ilp._covers("node_linear_1@3,4", used)  # a prefix is another layer
    assert not llm_gptq_ilp._covers("node_linear_126@3", used)  # gptq, not rtn


def test_sensitivity_windows_are_the_first_calibration_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[int | None, str]] = []

    def batches(
        limit: int | None = None, *, text: str = gemma3.PLAYS_TEXT, **_: object
    ) -> Iterator[dict[str, int]]:
        asked.append((limit, text))
        # spread windows depend on the count: window k of n is not window k of another n
        return iter({"ids": k * 1000 // (limit or 1)} for k in range(limit or 0))

    monkeypatch.setattr(gemma3, "calibration_batches", batches)
    chosen = llm_gptq_ilp.sensitivity_batches(gemma3.BRITANNICA_SPREAD, 64, 2)
    assert asked == [(64, gemma3.BRITANNICA_SPREAD)]
    assert chosen == [{"ids": 0}, {"ids": 15}]  # what benchmarks.llm's calib[:2] holds


def test_paired_ratio_and_interval() -> None:
    from benchmarks.llm_paired import compare, paired

    # B 63 nats worse on every window: A's perplexity is e^-1 of B's, on every resample
    same = paired([100.0, 200.0, 150.0], [163.0, 263.0, 213.0], 63)
    assert same["perplexity_ratio"] == round(math.exp(-1), 4)
    assert same["ci95"] == [round(math.exp(-1), 4)] * 2
    assert same["windows_better"] == 3
    # one window much worse for A: the ratio is above 1, the interval reaches below it
    mixed = paired([100.0, 100.0, 100.0, 400.0], [110.0, 110.0, 110.0, 110.0], 63)
    assert mixed["perplexity_ratio"] > 1
    assert mixed["ci95"][0] < 1 < mixed["ci95"][1]
    assert mixed["windows_better"] == 3
    rows = {
        "a": {"tokens": 126, "nll_per_window": [1.0, 2.0]},
        "b": {"tokens": 189, "nll_per_window": [1.0, 2.0, 3.0]},
    }
    with pytest.raises(SystemExit):
        compare(rows, "a", "b")  # other windows: not paired


def test_settings_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The GPTQ settings of ``benchmarks.llm_gptq_ilp ARGV`` (its cached codes'; no model)."""
    from types import SimpleNamespace

    from dyadiq.passes.weight_only.groupwise import ClipObjective
    from dyadiq.passes.weight_only.quantize import Method, WeightOnlySettings

    class SeenError(Exception):
        """Ends ``main()`` at its first quantizer."""

    def quantizer(settings: WeightOnlySettings, hessians: object) -> None:
        raise SeenError(settings)

    monkeypatch.setattr(llm_gptq_ilp.zoo, "get", lambda name: SimpleNamespace(model_path=None))
    monkeypatch.setattr(llm_gptq_ilp.ModelFile, "load", lambda path: SimpleNamespace(header=None))
    monkeypatch.setattr(llm_gptq_ilp, "find_weights", lambda h: SimpleNamespace(layers=[]))
    monkeypatch.setattr(llm_gptq_ilp, "hessians", lambda *a, **k: {})
    monkeypatch.setattr(llm_gptq_ilp, "LayerQuantizer", quantizer)

    def settings(*argv: str) -> WeightOnlySettings:
        with pytest.raises(SeenError) as seen:
            llm_gptq_ilp.main(["--work", str(tmp_path), *argv])
        return seen.value.args[0]

    assert settings() == WeightOnlySettings(method=Method.GPTQ)
    argv = ["--group-size", "64", "--damp", "0.05", "--tied-damp", "0.1", "--no-clip-search"]
    assert settings(*argv, "--clip-objective", "weight") == WeightOnlySettings(
        group_size=64,
        damp=0.05,
        tied_damp=0.1,
        clip_search=False,
        clip_objective=ClipObjective.WEIGHT,
    )
    with pytest.raises(SystemExit):  # its codes are never sequential: no such flag
        settings("--sequential")
