"""The closing verdict of ``dyadiq quantize``, help texts, 80-column tables, ``dyadiq run``'s
output names."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from dyadiq.cli import build_parser, main, output
from dyadiq.cli.summary import print_summary

PLAN = {"layers": {"conv": {"format": "W8A8"}, "fc": {"format": "W4A8"}}}
PATHS = {
    "qdq": Path("OUT/model.qdq.onnx"),
    "plan": Path("OUT/plan.json"),
    "report": Path("OUT/report.json"),
    "report_html": Path("OUT/report.html"),
    "integer": Path("OUT/model.int.onnx"),
    "target": Path("OUT/cortex-m4"),
}
REPORT: dict[str, Any] = {
    "source": "model.onnx",
    "quantized_activation_tensors": 5,
    "scale_groups": 3,
    "calibration_batches": 8,
    "timings": {"total_s": 1.5},
    "sizes": {
        "float_model_bytes": 93_702,
        "qdq_model_bytes": 32_423,
        "quantized_weight_bytes_packed": 89_016,
    },
    "float_layers": [
        {"id": "head", "reason": "excluded by the plan"},
        {"id": "emb", "reason": "not in the plan"},
    ],
    "allocation": {
        "budget": "avg-wbits=5",
        "weight_bytes": 77_514.0,
        "latency": 1.177e7,
        "latency_source": "cost model",
        "flash_bytes": 105_800.0,
        "peak_ram_bytes": None,
        "predicted_damage": 0.0123,
    },
    "integer": {
        "float_ops": [],
        "fully_integer": True,
        "bit_exact_vs_reference": {"tensors": 44, "exact_tensors": 44},
        "qdq_vs_integer": {"max_output_diff_lsb": 1.0, "top1_agreement_qdq_vs_integer": 1.0},
    },
    "target": {
        "target": "cortex-m4",
        "bit_exact_vs_reference": {"exact": 8, "inputs": 8},
        "flash_bytes": 105_800,
        "arena_bytes": 9_216,
        "instructions_per_inference": 1_234_560,
    },
    "metrics": {
        "float": {"accuracy": 0.9082, "top1_agreement": 1.0, "samples": 10000.0},
        "dyadiq plan": {"accuracy": 0.8851, "top1_agreement": 0.95, "samples": 10000.0},
        "onnxruntime quantize_static W8A8": {"accuracy": 0.9, "samples": 10000.0},
    },
    "verification": {"passed": True, "problems": [], "mismatch_allowed": False},
}


def _summary(report: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    console = Console(width=80, record=True, color_system=None, file=io.StringIO())
    monkeypatch.setattr(output, "console", console)
    print_summary(report, PLAN, PATHS)
    return console.export_text()


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_verdict_has_units_judgements_and_files(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _summary(REPORT, monkeypatch)
    flat = _flat(text)
    assert "model file 93,702 B float -> 32,423 B QDQ (2.9x smaller)" in flat
    # the two weight figures are labelled as different things
    assert "89,016 B as stored" in flat
    assert "77,514 B of weights counted at their bit-widths" in flat
    assert "latency 1.177e+07 MAC x bit units (relative cost model)" in flat
    assert "flash 105,800 B" in flat
    # 5% of 10,000 answers differ: the drop's 95% interval is +-0.44 points, 2.31 is beyond
    assert "accuracy 0.8851 vs float 0.9082 (-2.31 points ± 0.44, 95%) on" in flat
    assert "drops" in flat
    assert "bit-exact vs the reference on all 44 tensors" in flat
    assert "target cortex-m4: bit-exact" in flat and "arena 9,216 B" in flat
    assert "1,234,560 instructions per inference" in flat
    assert "warning: layer emb kept in float (not in the plan)" in flat
    assert "note: kept in float as asked (--exclude / plan): head" in flat
    assert "warning: layer head" not in flat
    assert "warning: accuracy drops 2.31 points against float" in flat
    assert "OUT/model.qdq.onnx onnxruntime" in flat
    assert "OUT/cortex-m4 C sources" in flat
    assert "…" not in text  # 80 columns: nothing cut


def test_a_drop_within_sampling_noise_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    report = copy.deepcopy(REPORT)
    report["metrics"] = {
        "float": {"accuracy": 0.915, "top1_agreement": 1.0, "samples": 400.0},
        "dyadiq W8A8": {"accuracy": 0.895, "top1_agreement": 0.95, "samples": 400.0},
    }
    flat = _flat(_summary(report, monkeypatch))
    assert "(-2.00 points ± 2.19, 95%) on 400 held-out samples: within sampling noise" in flat
    assert "accuracy drops" not in flat


def test_max_drop_allocation_in_points(monkeypatch: pytest.MonkeyPatch) -> None:
    report = copy.deepcopy(REPORT)
    report["allocation"] = {"max_drop": 0.005, "metric": "accuracy", "weight_bytes": 8064}
    flat = _flat(_summary(report, monkeypatch))
    assert "allocation (--max-drop: within 0.5 points of float accuracy): 8,064 B" in flat


def test_without_labels_agreement_is_judged_beside_onnxruntime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    report = copy.deepcopy(REPORT)
    report["metrics"] = {
        "float": {"top1_agreement": 1.0, "samples": 248.0},
        "dyadiq W8A8": {"top1_agreement": 0.8347, "samples": 248.0},
        "onnxruntime quantize_static W8A8": {"top1_agreement": 0.75, "samples": 248.0},
    }
    flat = _flat(_summary(report, monkeypatch))
    assert (
        "quality (no labels): top-1 answers agree with float's on 83.47% of 248 held-out "
        "samples; onnxruntime quantize_static W8A8: 75.00%: differs from float (better than "
        "onnxruntime's quantizer)"
    ) in flat
    assert "warning: top-1 answers differ from float's on 16.53% of the samples" in flat
    assert "points" not in flat.split("quality")[1].split("warning")[0]  # not an accuracy


def test_partial_bit_exactness_is_a_failure_not_a_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    report = copy.deepcopy(REPORT)
    report["integer"]["bit_exact_vs_reference"] = {"tensors": 44, "exact_tensors": 41}
    report["integer"]["qdq_vs_integer"]["max_output_diff_lsb"] = 70.0
    report["target"]["bit_exact_vs_reference"] = {"exact": 7, "inputs": 8}
    report["verification"] = {"passed": False, "problems": ["3 tensors differ"]}
    flat = _flat(_summary(report, monkeypatch))
    assert "NOT bit-exact: 3 of 44 tensors differ" in flat
    assert "at most 70.0 LSB" in flat and "differ" in flat
    assert "target cortex-m4: NOT bit-exact" in flat
    assert "verification FAILED: 3 tensors differ" in flat
    assert "bit-exact vs the reference on all" not in flat


def test_quantize_help_explains_every_option() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    quantize = sub.choices["quantize"]  # type: ignore[attr-defined]
    missing = [a.option_strings for a in quantize._actions if a.option_strings and not a.help]
    assert missing == []
    text = parser.format_help() + quantize.format_help()
    assert ":class:" not in text and "uniform formats in this release" not in text
    assert "--qdq-style" in quantize.format_help()


def _fake_target(folder: Path, info: dict[str, Any]) -> Path:
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(info))
    return folder


@pytest.mark.parametrize(
    ("info", "returned", "expected"),
    [
        ({"cpu": "cortex-m4"}, {"y_q": np.zeros((1, 1, 5), np.uint8)}, ["y_codes"]),
        (
            {"target_name": "x86"},
            {"y_codes": np.zeros((1, 5), np.uint8), "y": np.zeros((1, 5), np.float32)},
            ["y", "y_codes"],
        ),
    ],
)
def test_run_names_outputs_alike_on_every_target(
    info: dict[str, Any],
    returned: dict[str, np.ndarray],
    expected: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = _fake_target(tmp_path / "target", info)
    monkeypatch.setattr("dyadiq.runner.run_artifact", lambda folder, inputs: dict(returned))
    np.save(tmp_path / "x.npy", np.zeros((1, 3), np.float32))
    out = tmp_path / "y.npz"
    assert main(["run", str(folder), "--input", str(tmp_path / "x.npy"), "-o", str(out)]) == 0
    with np.load(out) as saved:
        assert sorted(saved.files) == expected
        assert saved["y_codes"].shape == (1, 5)  # one row per input on every target
