"""benchmarks/compensation.py's ILP table: the 2-8 candidate rows and the older 2/3/4/6/8 ones."""

from __future__ import annotations

from benchmarks import compensation


def _run(histogram: dict[str, int], **extra: object) -> dict[str, object]:
    return {
        "kind": "ilp",
        "budget": "avg-wbits=4.5",
        "compensation": "range,gptq,bias",
        "avg_weight_bits": 4.5,
        "bits_histogram": histogram,
        "metrics": {"top1_agreement": 0.75},
        **extra,
    }


def test_ilp_table_marks_the_fine_candidate_rows_and_reads_older_results() -> None:
    older = _run({"2": 0, "3": 1, "4": 3, "6": 19, "8": 30})  # a result file from before 5/7
    fine = _run(
        {"2": 0, "3": 1, "4": 1, "5": 6, "6": 12, "7": 18, "8": 15},
        candidates=list(compensation.FINE_WIDTHS),
    )
    model = {"primary_metric": "top1_agreement", "runs": {"a": older, "b": fine}}
    lines = compensation._ilp_table(model)
    assert "2/3/4/5/6/7/8" in lines[0]
    assert lines[2] == "| avg-wbits=4.5 | range,gptq,bias | 4.500 | 0/1/3/0/19/0/30 | 0.7500 |"
    assert lines[3] == (
        "| avg-wbits=4.5 | range,gptq,bias (widths 2-8) | 4.500 | 0/1/1/6/12/18/15 | 0.7500 |"
    )


def test_ilp_table_marks_the_a8_damage_rows() -> None:
    a8 = _run(
        {"2": 0, "3": 2, "4": 10, "5": 10, "6": 11, "7": 13, "8": 7},
        candidates=list(compensation.FINE_WIDTHS),
        a8_damage=True,
    )
    lines = compensation._ilp_table({"primary_metric": "top1_agreement", "runs": {"a": a8}})
    assert lines[2] == (
        "| avg-wbits=4.5 | range,gptq,bias (widths 2-8, A8 damage) | 4.500 | 0/2/10/10/11/13/7 "
        "| 0.7500 |"
    )


def test_merge_of_a_merged_file_keeps_each_runs_header_and_the_newest_models(
    tmp_path, monkeypatch
) -> None:
    import json

    def run(command: str) -> dict[str, object]:
        return {"command": command, "date": command, "compensation_samples": 32}

    older = {
        "parts": [
            {**run("first"), "model_names": ["fashion_cnn", "mobilenet_v2"]},
            {**run("second"), "model_names": ["ppocr_cls"]},
        ],
        "compensation_samples": 32,
        "models": {"fashion_cnn": {"v": 1}, "mobilenet_v2": {"v": 1}, "ppocr_cls": {"v": 1}},
    }
    newer = {**run("third"), "models": {"mobilenet_v2": {"v": 2}, "ppocr_cls": {"v": 2}}}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(paths, (older, newer), strict=True):
        path.write_text(json.dumps(data))
    written: dict[str, object] = {}
    monkeypatch.setattr(compensation.common, "write_results", lambda data, *_: written.update(data))
    compensation.merge(paths, tmp_path, "out", [])
    assert [p["command"] for p in written["parts"]] == ["first", "third"]  # type: ignore[index]
    assert [p["model_names"] for p in written["parts"]] == [  # type: ignore[index]
        ["fashion_cnn"],
        ["mobilenet_v2", "ppocr_cls"],
    ]
    assert written["models"] == {
        "fashion_cnn": {"v": 1},
        "mobilenet_v2": {"v": 2},
        "ppocr_cls": {"v": 2},
    }
