"""benchmarks/llm.py's calibration text: in-domain by default, named in the results file,
and kept disjoint from the evaluated windows (no model)."""

from __future__ import annotations

import pytest

from benchmarks import llm
from dyadiq.zoo import gemma3


def _data(**extra: object) -> dict[str, object]:
    return {
        "command": "python -m benchmarks.llm",
        "date": "2026-12-07T19:00:00+00:00",
        "partial": False,
        "eval_windows": 32,
        "calib_windows": 64,
        "sens_windows": 1,
        "seconds": 1.0,
        "rows": {"float": {"perplexity": 40.0, "bits_per_byte": 1.2, "file_bytes": 1e9}},
        **extra,
    }


def test_results_name_the_calibration_text() -> None:
    spread = llm._markdown(_data(calib_text=gemma3.BRITANNICA_SPREAD))
    assert "64 windows of the same article evenly spaced" in spread
    assert "plays" not in spread
    # files written before the text was recorded calibrated on the plays
    assert "the first 64 windows of the plays" in llm._markdown(_data())


def test_in_domain_calibration_refuses_evaluation_overlap() -> None:
    with pytest.raises(SystemExit):
        llm.main(["--eval-windows", str(gemma3.EVALUATION_RESERVED + 1), "--stages", "float"])


def test_default_calibration_is_in_domain() -> None:
    import argparse

    seen: dict[str, argparse.Namespace] = {}
    original = argparse.ArgumentParser.parse_args

    def spy(self: argparse.ArgumentParser, *a: object, **k: object) -> argparse.Namespace:
        seen["args"] = original(self, *a, **k)  # type: ignore[arg-type]
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", spy)
        with pytest.raises(SystemExit):
            llm.main([])
    assert seen["args"].calib_text == gemma3.BRITANNICA_SPREAD


def test_gptq_cache_stamps_match_older_settings_only_at_defaults() -> None:
    from benchmarks.llm_gptq_ilp import _stamps
    from dyadiq.passes.weight_only.groupwise import ClipObjective
    from dyadiq.passes.weight_only.quantize import Method, WeightOnlySettings

    # the stamp of the first caches (before sequential GPTQ and the clip objective existed)
    first = (
        "\"WeightOnlySettings(method=<Method.GPTQ: 'gptq'>, group_size=128, symmetric=False, "
        'act_order=True, damp=0.01, block=128, clip_search=True, tied_damp=0.01)"'
    )
    weight = WeightOnlySettings(
        method=Method.GPTQ, tied_damp=0.01, clip_objective=ClipObjective.WEIGHT
    )
    assert first in _stamps(weight)
    # today's default objective is not the one those codes were made with
    assert first not in _stamps(WeightOnlySettings(method=Method.GPTQ, tied_damp=0.01))
    hessian = WeightOnlySettings(
        method=Method.GPTQ, tied_damp=0.01, clip_objective=ClipObjective.HESSIAN
    )
    assert first not in _stamps(hessian)  # other codes: never mixed in
