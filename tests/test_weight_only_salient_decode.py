"""Salient input columns through the decode path: the codes and the 8-bit columns move from
the quantized prefill graph to the KV-cache decode step, and the TVM int4 build adds the
side products as onnxruntime does (tiny Gemma 3 of tests/test_gemma_decode.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from dyadiq.backends.onnx.weight_only import WeightOnlyForm
from dyadiq.passes.weight_only.model_file import ModelFile
from dyadiq.passes.weight_only.pipeline import MODEL_FILE, prepare, run
from dyadiq.passes.weight_only.quantize import WeightOnlySettings
from dyadiq.passes.weight_only.transfer import read_groupwise_codes
from tests.test_gemma_decode import (
    LOGIT_TOL,
    NEW_TOKENS,
    PREFILL_LEN,
    PROMPT,
    _word_tokenizer,
    exported,
)

__all__ = ["exported"]  # the module-scoped fixture, shared


def test_generate_with_salient_columns_matches_onnxruntime(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dyadiq.cli import main

    prefill, decode = exported
    name = onnx.load(str(prefill), load_external_data=False).graph.input[0].name
    rng = np.random.default_rng(0)
    batches = [{name: rng.integers(0, 512, (1, PREFILL_LEN)).astype(np.int64)} for _ in range(4)]
    settings = WeightOnlySettings(group_size=32, salient_fraction=0.05)
    prepared = prepare(prefill, batches, settings)
    bits = {layer.id: 4 for layer in prepared.inventory.layers}
    report = run(prefill, tmp_path / "out", prepared, bits, WeightOnlyForm.DEQUANTIZE_LINEAR)
    assert len(report["export"]["salient_columns"]) == len(bits)
    codes = read_groupwise_codes(ModelFile.load(tmp_path / "out" / MODEL_FILE))
    assert codes and all(c.weight.salient is not None for c in codes.values())
    tokenizer = _word_tokenizer(tmp_path / "tokenizer.json")
    prompt = " ".join(f"t{t}" for t in PROMPT[1:])
    argv = ["generate", str(tmp_path / "out" / "x86-avx2"), "--prompt", prompt]
    argv += ["--decode-graph", str(decode), "--tokenizer", str(tokenizer)]
    argv += ["--max-new-tokens", str(NEW_TOKENS), "--check", "--json"]
    assert main(argv) == 0
    check = json.loads(capsys.readouterr().out)["check"]
    assert check["tokens_agreeing"] == NEW_TOKENS, check
    assert check["max_abs_logit_diff"] <= LOGIT_TOL, check
    info = json.loads((tmp_path / "out" / "x86-avx2" / "decode.json").read_text())
    assert info["kernel_layers"] == len(bits) and not info["not_on_kernels"]
    assert info["fusion"]["attention_layers"] == 2, info["fusion"]
    reference = onnx.load(str(tmp_path / "out" / "x86-avx2" / "decode.wo.onnx"))
    adds = [n for n in reference.graph.node if n.name.endswith("/salient_add")]
    assert len(adds) == len(bits) + 1  # every MatMul reader, and the tied table's Gather
