"""A layer whose int32 accumulator could overflow is kept in float under ``--integer``, named
in report.json with the reason, instead of refusing the whole model; strict mode refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dyadiq import integer_program as ip
from dyadiq.passes.integerize import AccumulatorOverflowError
from dyadiq.pipeline import quantize
from tests.builders import with_weights

WIDE = 70_000  # 70000 * 127 * 255 > 2^31: this layer at 8 bits could overflow int32


def _wide_then_narrow() -> tuple[object, list[dict[str, np.ndarray]]]:
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, {WIDE}] x) => (float[1, 3] y) {{
        h = Gemm <transB = 1> (x, w_wide)
        r = Relu (h)
        y = Gemm <transB = 1> (r, w_narrow, b_narrow)
    }}
    """
    rng = np.random.default_rng(11)
    # all weights of one magnitude: every code is +-127, the worst case of the bound
    model = with_weights(
        text,
        w_wide=np.where(rng.random((2, WIDE)) < 0.5, -1.0, 1.0) * 1e-3,
        w_narrow=rng.normal(size=(3, 2)),
        b_narrow=rng.normal(size=3),
    )
    calib = [{"x": rng.random((1, WIDE)).astype(np.float32)} for _ in range(4)]
    return model, calib


def test_the_overflowing_layer_becomes_float_and_the_rest_stays_integer(tmp_path: Path) -> None:
    model, calib = _wide_then_narrow()
    out = tmp_path / "out"
    result = quantize(model, out, calib, integer=True, check_batches=4)

    report = json.loads((out / "report.json").read_text())
    reasons = {f["id"]: f["reason"] for f in report["float_layers"]}
    wide = next(n.name for n in result.graph.weighted_layers() if "w_wide" in str(n.inputs))
    assert "could overflow" in reasons[wide] and "--strict-integer" in reasons[wide]
    assert report["integer"]["overflow_float_layers"] == [wide]
    assert len(result.plan.layers) == 1 and wide in result.plan.excluded
    plan = json.loads((out / "plan.json").read_text())
    assert wide in plan["excluded"]  # --plan plan.json rebuilds the same model
    # the wide Gemm runs in a float island; the narrow one is an integer MatMul
    assert result.program is not None
    islands = [op for op in result.program.ops if isinstance(op, ip.FloatIsland)]
    assert any(node.op_type == "Gemm" for island in islands for node in island.nodes)
    assert any(isinstance(op, ip.MatMul | ip.Conv) for op in result.program.ops)
    exact = report["integer"]["bit_exact_vs_reference"]
    assert exact["exact_tensors"] == exact["tensors"] > 0


def test_strict_integer_refuses_as_before(tmp_path: Path) -> None:
    model, calib = _wide_then_narrow()
    out = tmp_path / "out"
    with pytest.raises(AccumulatorOverflowError, match="could overflow") as caught:
        quantize(model, out, calib, integer=True, strict_integer=True)
    assert list(caught.value.layers) and not out.exists()


def test_the_cli_warns_by_default_and_refuses_with_strict_integer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    from dyadiq.cli import main

    model, calib = _wide_then_narrow()
    model_path, calib_path = tmp_path / "wide.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(model_path))  # type: ignore[arg-type]
    np.savez(calib_path, **calib[0])
    argv = ["quantize", str(model_path), "--calib", str(calib_path), "--integer", "--no-eval"]
    assert main([*argv, "-o", str(tmp_path / "out")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "kept in float (its int32 accumulator could overflow" in said
    assert main([*argv, "--strict-integer", "-o", str(tmp_path / "strict")]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "AccumulatorOverflowError" in said and "could overflow" in said
    assert not (tmp_path / "strict").exists()
