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
