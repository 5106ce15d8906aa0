"""The KV-cache decode step of a Gemma 3 causal LM (dyadiq/zoo/gemma3_decode.py) and greedy
decoding over it (dyadiq/zoo/kv_decode.py), on a tiny
randomly initialised Gemma3ForCausalLM (2 layers, hidden 64, a sliding-window layer and a
global one) exported exactly as the zoo exports Gemma 3 270M: a fixed-length prefill graph
and the decode step beside it, sharing its weights.

Checked: greedy decoding over the decode graph in onnxruntime reproduces the prefill graph's
logits at every position (1e-4 abs; every argmax equal), past the sliding window; the decode
graph reads every weight from the prefill graph's data file under the prefill's names; the
prefill graph's weight-only codes move to the decode graph unchanged (both forms), and the
quantized decode loop reproduces the quantized prefill graph.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import external_data_helper

from dyadiq.backends.onnx.weight_only import WeightOnlyForm
from dyadiq.errors import ConfigError, ZooError
from dyadiq.passes.weight_only.layers import find_weights
from dyadiq.passes.weight_only.model_file import ModelFile
from dyadiq.passes.weight_only.pipeline import MODEL_FILE, prepare, run
from dyadiq.passes.weight_only.quantize import Method, WeightOnlySettings
from dyadiq.passes.weight_only.transfer import (
    codes_for_layers,
    quantize_like,
    read_groupwise_codes,
)
from dyadiq.zoo.gemma3_decode import CacheShape, export_decode_sharing
from dyadiq.zoo.kv_decode import OnnxruntimeStep, agreement, greedy_decode, prefill_logits

PREFILL_LEN = 16
MAX_POSITIONS = 32
SLIDING_WINDOW = 6  # shorter than the compared positions: the sliding mask is exercised
LOGIT_TOL = 1e-4
PROMPT = [2, 17, 300, 45, 9, 101]
NEW_TOKENS = PREFILL_LEN - len(PROMPT)


def _tiny_gemma() -> Any:
    from dyadiq.zoo._install import ensure_package, ensure_torch

    torch = ensure_torch()  # a fresh machine installs what the zoo's export needs on demand
    transformers = ensure_package("transformers", "transformers>=4.50", no_deps=False)
    Gemma3ForCausalLM, Gemma3TextConfig = (
        transformers.Gemma3ForCausalLM,
        transformers.Gemma3TextConfig,
    )

    torch.manual_seed(0)
    settings: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=MAX_POSITIONS,
        attn_implementation="eager",
    )
    model = Gemma3ForCausalLM(Gemma3TextConfig(**settings)).eval()
    with torch.no_grad():  # random init leaves the norms at 0 (scale 1): make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(-0.5, 0.5)
    return model


def export_tiny(folder: Path) -> None:
    """The tiny model's prefill graph and decode step into ``folder`` (run in a child
    interpreter by the fixture: torch's thread pools stay out of the pytest process)."""
    from dyadiq.zoo.gemma3 import export_prefill

    model = _tiny_gemma()
    prefill = folder / "prefill.onnx"
    ids = np.arange(PREFILL_LEN, dtype=np.int64)[None, :] * 7 % 512
    export_prefill(model, ids, prefill)
    export_decode_sharing(model, folder / "decode.onnx", prefill, max_positions=MAX_POSITIONS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny_gemma")
    code = (
        "import sys, pathlib; sys.path.insert(0, sys.argv[1]); import test_gemma_decode as t; "
        "t.export_tiny(pathlib.Path(sys.argv[2]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "prefill.onnx", folder / "decode.onnx"


@pytest.fixture(scope="module")
def int4_prefill(exported: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prefill graph quantized to RTN int4 g32 (every weight), DequantizeLinear form."""
    prefill, _ = exported
    out = tmp_path_factory.mktemp("int4_prefill")
    prepared = prepare(prefill, [], WeightOnlySettings(method=Method.RTN, group_size=32))
    bits = {layer.id: 4 for layer in prepared.inventory.layers}
    run(prefill, out, prepared, bits, WeightOnlyForm.DEQUANTIZE_LINEAR)
    return out / MODEL_FILE


def _session(path: Path, *, optimized: bool = True) -> Any:
    """A session; unoptimized, onnxruntime fuses nothing (a DequantizeLinear + MatMul would
    otherwise become its own int4 kernel in one graph and not in the other, with another
    summation order)."""
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _decode(path: Path, prompt: list[int], new_tokens: int, *, optimized: bool = True) -> Any:
    shape = CacheShape.of_graph(onnx.load(str(path), load_external_data=False))
    step = OnnxruntimeStep(_session(path, optimized=optimized), shape.layers)
    return greedy_decode(step, shape, prompt, new_tokens)


def test_decode_loop_reproduces_the_prefill_graph(exported: tuple[Path, Path]) -> None:
    prefill, decode = exported
    decoded = _decode(decode, PROMPT, NEW_TOKENS)
    assert len(decoded.tokens) == PREFILL_LEN and decoded.tokens[: len(PROMPT)] == PROMPT
    expected = prefill_logits(_session(prefill), decoded.tokens[:-1], PREFILL_LEN)
    found = agreement(expected, decoded.step_logits)
    assert found.positions == PREFILL_LEN - 1
    assert found.max_abs_logit_diff <= LOGIT_TOL, found
    assert found.argmax_agree == found.positions
    # the generated tokens are the prefill graph's argmax at each position
    assert decoded.generated == [int(t) for t in expected[len(PROMPT) - 1 :].argmax(-1)]


def test_decode_graph_reads_the_prefill_weights(exported: tuple[Path, Path]) -> None:
    prefill, decode = exported
    header = onnx.load(str(decode), load_external_data=False)
    prefill_names = {
        t.name for t in onnx.load(str(prefill), load_external_data=False).graph.initializer
    }
    inits = {t.name: t for t in header.graph.initializer}
    weights = find_weights(header).layers
    assert len(weights) == 1 + 2 * 7  # tied embedding + 7 projections per layer
    for layer in weights:
        tensor = inits[layer.initializer]
        assert layer.initializer in prefill_names
        assert external_data_helper.ExternalDataInfo(tensor).location == prefill.name + ".data"
    own = decode.parent / (decode.name + ".data")
    assert own.stat().st_size < 0.2 * (prefill.parent / (prefill.name + ".data")).stat().st_size


def test_prefill_codes_move_to_the_decode_graph(
    exported: tuple[Path, Path], int4_prefill: Path, tmp_path: Path
) -> None:
    _, decode = exported
    quantized_prefill = int4_prefill
    layer_count = len(find_weights(onnx.load(str(decode), load_external_data=False)).layers)
    outputs = {}
    for form in WeightOnlyForm:
        outputs[form] = tmp_path / f"decode.{form}.onnx"
        transfer, report = quantize_like(quantized_prefill, decode, outputs[form], form)
        assert not transfer.left_float and len(transfer.quantized) == layer_count
        if form is WeightOnlyForm.MATMUL_NBITS:
            assert len(report.as_matmul_nbits) == layer_count and not report.fallbacks
    theirs = read_groupwise_codes(ModelFile.load(quantized_prefill))
    ours = read_groupwise_codes(ModelFile.load(outputs[WeightOnlyForm.DEQUANTIZE_LINEAR]))
    assert sorted(theirs) == sorted(ours)
    for name, stored in theirs.items():
        mine = ours[name].weight
        assert np.array_equal(stored.weight.codes, mine.codes)
        assert np.array_equal(stored.weight.scales, mine.scales)
        assert np.array_equal(stored.weight.zero_points, mine.zero_points)
    decoded = _decode(
        outputs[WeightOnlyForm.DEQUANTIZE_LINEAR], PROMPT, NEW_TOKENS, optimized=False
    )
    reference = _session(quantized_prefill, optimized=False)
    expected = prefill_logits(reference, decoded.tokens[:-1], PREFILL_LEN)
    found = agreement(expected, decoded.step_logits)
    assert found.max_abs_logit_diff <= LOGIT_TOL and found.argmax_agree == found.positions
    # MatMulNBits computes the same weights with other kernels: same tokens, close logits
    nbits = _decode(outputs[WeightOnlyForm.MATMUL_NBITS], PROMPT, NEW_TOKENS)
    found = agreement(np.stack(decoded.step_logits), nbits.step_logits)
    assert found.max_abs_logit_diff <= 1e-3 and nbits.tokens == decoded.tokens


def test_codes_that_do_not_fit_are_refused(exported: tuple[Path, Path], int4_prefill: Path) -> None:
    _, decode = exported
    codes = read_groupwise_codes(ModelFile.load(int4_prefill))
    layers = find_weights(onnx.load(str(decode), load_external_data=False)).layers
    first, second = sorted(codes)[:2]
    swapped = {**codes, first: codes[second], second: codes[first], "no_such_weight": codes[first]}
    with pytest.raises(ConfigError) as err:
        codes_for_layers(swapped, layers)
    assert "no_such_weight" in str(err.value)


def test_greedy_decode_refuses_what_the_cache_cannot_hold(exported: tuple[Path, Path]) -> None:
    _, decode = exported
    with pytest.raises(ZooError, match="exceed"):
        _decode(decode, PROMPT, MAX_POSITIONS)
    with pytest.raises(ZooError, match="at least one new"):
        _decode(decode, PROMPT, 0)


def _word_tokenizer(path: Path) -> Path:
    """A whitespace word-level tokenizer over the tiny model's 512 ids (t0 ... t511, with
    id 2 as <bos>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(512)}
    vocab["<bos>"] = vocab.pop("t2")
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def test_generate_on_the_tvm_build_matches_onnxruntime(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dyadiq generate OUT/x86`` builds the target from a mixed plan (int4, one int3 layer
    on the same nibble kernel, one int8 layer dequantised to float) and decodes greedily;
    ``--check`` must find every generated token equal to onnxruntime's on the same quantized
    decode graph, logits within 1e-4."""
    import json

    from dyadiq.cli import main

    prefill, decode = exported
    prepared = prepare(prefill, [], WeightOnlySettings(method=Method.RTN, group_size=32))
    ids = [layer.id for layer in prepared.inventory.layers]
    bits = {layer_id: 4 for layer_id in ids} | {ids[1]: 3, ids[2]: 8}
    run(prefill, tmp_path / "out", prepared, bits, WeightOnlyForm.DEQUANTIZE_LINEAR)
    tokenizer = _word_tokenizer(tmp_path / "tokenizer.json")
    prompt = " ".join(f"t{t}" for t in PROMPT[1:])
    argv = ["generate", str(tmp_path / "out" / "x86-avx2"), "--prompt", prompt]
    argv += ["--decode-graph", str(decode), "--tokenizer", str(tokenizer)]
    argv += ["--max-new-tokens", str(NEW_TOKENS), "--check", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == len(PROMPT)
    check = result["check"]
    assert check["tokens_agreeing"] == NEW_TOKENS, check
    assert check["max_abs_logit_diff"] <= LOGIT_TOL, check
    info = json.loads((tmp_path / "out" / "x86-avx2" / "decode.json").read_text())
    assert info["kernel_layers"] == len(ids) - 1 and list(info["not_on_kernels"]) == [ids[2]]
    # both layers' attention on the fused kernel, all four cache writes in place
    assert info["fusion"]["attention_layers"] == 2, info["fusion"]
    assert info["fusion"]["cache_writes_in_place"] == 4, info["fusion"]


def test_aarch64_decode_build_under_qemu(
    exported: tuple[Path, Path], int4_prefill: Path, tmp_path: Path
) -> None:
    """The same kernel graph compiled for aarch64 (NEON) and run under qemu-user: each of
    four decoding steps, fed onnxruntime's caches of the step before, must give
    onnxruntime's logits and updated caches on the same quantized graph within 1e-4."""
    from dyadiq.backends.tvm.aarch64 import locate_aarch64_runtime, run_many_under_qemu
    from dyadiq.backends.tvm.weight_only_decode import (
        LIBRARY_NAME,
        build_decode_library,
        kernel_graph,
    )
    from dyadiq.backends.tvm.weight_only_kernels import CpuTarget

    locate_aarch64_runtime()  # fails with the setup command when missing
    _, decode = exported
    quantized = int4_prefill
    reference = tmp_path / "decode.wo.onnx"
    quantize_like(quantized, decode, reference)
    source = ModelFile.load(decode)
    layers = find_weights(source.header).layers
    transfer = codes_for_layers(read_groupwise_codes(ModelFile.load(quantized)), layers)
    graph, off_kernel = kernel_graph(source.header, layers, transfer.quantized, source.array)
    assert not off_kernel
    folder = build_decode_library(graph, CpuTarget.AARCH64, tmp_path / "aarch64")
    shape = CacheShape.of_graph(source.header)
    step = OnnxruntimeStep(_session(reference, optimized=False), shape.layers)
    cache, feeds, expected = shape.empty(), [], []
    for position, token in enumerate(PROMPT[:4]):
        feeds.append(
            {
                "input_ids": np.array([[token]], np.int64),
                "position": np.array([position], np.int64),
                **cache,
            }
        )
        logits, cache = step(token, position, cache)
        expected.append([logits, *cache.values()])
    got = run_many_under_qemu(folder / LIBRARY_NAME, feeds)
    for want, have in zip(expected, got, strict=True):
        assert len(want) == len(have)
        for a, b in zip(want, have, strict=True):
            assert np.max(np.abs(a.reshape(-1) - b.reshape(-1))) <= LOGIT_TOL


def test_generate_explains_what_it_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dyadiq.cli import main

    assert main(["generate", str(tmp_path / "x86"), "--prompt", "hi"]) == 2
    assert "dyadiq quantize --weight-only" in capsys.readouterr().err
    (tmp_path / MODEL_FILE).write_bytes(b"")
    assert main(["generate", str(tmp_path / "riscv"), "--prompt", "hi"]) == 2
    assert "OUT/{x86, x86-avx512, x86-avx2, aarch64}" in capsys.readouterr().err


def test_quantize_weight_only_target_builds_what_generate_runs(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dyadiq quantize --weight-only --target x86-64-v3 --decode-graph DECODE`` writes the
    compiled decode step to OUT/x86-avx2 and checks it against onnxruntime on the same
    quantized decode graph (logits within 1e-4 here, absolute and relative to their scale);
    ``dyadiq generate OUT/x86-avx2`` then runs that build as it is (no second build) and
    agrees with onnxruntime token for token."""
    import json

    from dyadiq.cli import main

    prefill, decode = exported
    calib = tmp_path / "calib"
    calib.mkdir()
    ids = (np.arange(PREFILL_LEN, dtype=np.int64)[None, :] * 13 + 5) % 512
    np.savez(calib / "b0.npz", input_ids=ids)
    out = tmp_path / "out"
    base = ["quantize", str(prefill), "-o", str(out), "--calib", str(calib), "--weight-only"]
    base += ["--wo-method", "rtn", "--group-size", "32"]
    # refused before any quantizing: a target with no decode build, a missing decode graph
    assert main([*base, "--target", "cortex-m4", "--decode-graph", str(decode)]) == 2
    assert "not cortex-m4" in capsys.readouterr().err
    assert main([*base, "--target", "x86"]) == 2
    assert "--decode-graph" in capsys.readouterr().err
    assert not (out / MODEL_FILE).exists()

    assert main([*base, "--target", "x86-64-v3", "--decode-graph", str(decode)]) == 0
    capsys.readouterr()
    info = json.loads((out / "x86-avx2" / "decode.json").read_text())
    assert info["target"] == "x86-avx2" and info["fusion"]["attention_layers"] == 2
    check = info["check"]
    assert check["positions"] == 8 and check["argmax_agree"] == 8, check
    assert check["max_abs_logit_diff"] <= LOGIT_TOL, check
    assert check["max_relative_logit_diff"] <= check["relative_tolerance"] == 1e-4, check
    built = (out / "x86-avx2" / "model.so").stat().st_mtime_ns

    tokenizer = _word_tokenizer(tmp_path / "tokenizer.json")
    prompt = " ".join(f"t{t}" for t in PROMPT[1:])
    argv = ["generate", str(out / "x86-avx2"), "--prompt", prompt, "--tokenizer", str(tokenizer)]
    argv += ["--max-new-tokens", str(NEW_TOKENS), "--check", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["check"]["tokens_agreeing"] == NEW_TOKENS, result["check"]
    assert result["check"]["max_abs_logit_diff"] <= LOGIT_TOL, result["check"]
    assert (out / "x86-avx2" / "model.so").stat().st_mtime_ns == built  # not rebuilt
