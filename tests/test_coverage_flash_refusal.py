"""The support matrix's cortex-m4 stage for a model whose integer stage stored more quantized
weights than the board's flash: a refusal with both sizes, read back unchanged by --rescore."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import coverage


def _integer_report(out_root: Path, stored: int) -> None:
    (out_root / "integer").mkdir(parents=True)
    sizes = {"quantized_weight_bytes_packed": stored}
    (out_root / "integer" / "report.json").write_text(json.dumps({"sizes": sizes}))


def test_weights_over_flash_are_a_refusal_with_the_sizes(tmp_path: Path) -> None:
    out_root = tmp_path / "out" / "light_vgg19"
    _integer_report(out_root, 143_667_240)
    (out_root / "cortex-m4").mkdir()  # an earlier run's output: removed, not shown
    result = coverage._flash_refusal(out_root, "cortex-m4")
    assert result is not None and result["status"] == "refused"
    assert result["reason"].startswith("error: does not fit in flash (140300 KB > 4096 KB): ")
    assert "143667240 bytes of quantized weights > 4194304 bytes of flash" in result["reason"]
    assert not (out_root / "cortex-m4").exists() and result["written"] == []
    # --rescore reclassifies every stage from its log: the same verdict comes back
    log = Path(result["log"]).read_text()
    rc_text = log.splitlines()[1].split()[2]
    again = coverage.classify(int(rc_text), log.split("--- stderr\n", 1)[1])
    assert again == (result["status"], result["reason"])
    assert "does not fit in flash (140300 KB > 4096 KB)" in coverage._cell(result)


def test_weights_that_may_fit_or_no_integer_stage_run_the_cli(tmp_path: Path) -> None:
    assert coverage._flash_refusal(tmp_path / "none", "cortex-m4") is None
    out_root = tmp_path / "out" / "magika"
    _integer_report(out_root, 4 * 2**20)  # exactly the flash: the linker decides
    assert coverage._flash_refusal(out_root, "cortex-m4") is None
