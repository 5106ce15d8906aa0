"""``dyadiq generate OUT/x86 --prompt TEXT``: greedy decoding on a TVM-compiled weight-only
language model, with the KV-cache decode step.

``OUT`` is a ``dyadiq quantize --weight-only`` output folder (``model.wo.onnx`` in the
blocked DequantizeLinear form, quantized from the fixed-length prefill graph). The first
``generate`` on ``OUT/x86`` (or ``OUT/x86-avx2``, ``OUT/aarch64``) builds that target
folder: the decode-step graph (``--decode-graph``; default the zoo's Gemma 3 270M decode
step) gets the prefill model's codes by initializer name, written as ``decode.wo.onnx``
(the onnxruntime reference of the same quantized decode graph) and compiled with TVM, every
4-bit-or-narrower product on the int4 kernels, into ``model.so`` + ``decode.json``. Later
runs reuse it. ``dyadiq quantize --weight-only --target x86 -o OUT`` builds the same folder
as part of the quantize run (:func:`build_quantize_target`), checked against onnxruntime.

``--check`` decodes the same prompt with onnxruntime on ``decode.wo.onnx`` and reports how
many generated tokens agree before the first difference and the largest logit difference
over the agreeing steps (the activations are float in both, so they agree up to float
rounding, not bit for bit).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from dyadiq.errors import ConfigError
from dyadiq.io import write_text_atomic

log = logging.getLogger(__name__)

QUANTIZED_MODEL = "model.wo.onnx"
REFERENCE_MODEL = "decode.wo.onnx"
TARGET_FOLDERS = {"x86": "x86-avx512", "x86-avx512": "x86-avx512", "x86-avx2": "x86-avx2"}
TARGET_FOLDERS["aarch64"] = "aarch64"
# `quantize --weight-only --target NAME` (quantize's target names) -> the OUT/ folder built
QUANTIZE_TARGET_FOLDERS = {
    "x86": "x86",
    "x86-64-v3": "x86-avx2",
    "x86-64-v4-vnni": "x86-avx512",
    "aarch64": "aarch64",
}
ZOO_DECODE_GRAPHS = ("gemma3_270m",)  # zoo models whose decode-step graph the zoo exports
# The build check's tolerance: the largest logit difference of a step relative to that
# step's largest |logit|. Both sides compute in float32 in different summation orders, so the
# absolute difference grows with the logits' scale (Gemma 3 270M: 9.5e-4 at a step whose
# logits reach 27, i.e. 3.5e-5 relative; 1.8e-4 on 191 steps of ordinary text).
CHECK_RELATIVE_TOL = 1e-4


def host_x86_kind() -> Any:
    from dyadiq.backends.tvm import model_runner
    from dyadiq.backends.tvm.weight_only_kernels import CpuTarget

    flags = model_runner.cpu_flags()
    return CpuTarget.X86_AVX512 if "avx512f" in flags else CpuTarget.X86_AVX2


def target_kind(folder: Path) -> Any:
    """The CPU target a folder's name asks for (``x86`` means this machine's x86 level)."""
    from dyadiq.backends.tvm.weight_only_kernels import CpuTarget

    if folder.name not in TARGET_FOLDERS:
        raise ConfigError(
            f"{folder} is not a built decode target and its name is not a target to build: "
            f"use OUT/{{{', '.join(TARGET_FOLDERS)}}}"
        )
    if folder.name == "x86":
        return host_x86_kind()
    return CpuTarget(TARGET_FOLDERS[folder.name])


def default_decode_graph() -> Path:
    from dyadiq.zoo._install import cache_dir
    from dyadiq.zoo.gemma3 import materialise_decode

    return materialise_decode(cache_dir())


def build_decode_target(
    quantized: Path, target: Path, decode_graph: Path, kind: Any, *, threads: int | None = None
) -> dict[str, Any]:
    """Write ``target`` (model.so, decode.json, decode.wo.onnx) from the weight-only model
    ``quantized`` and the float decode-step graph; returns decode.json's content."""
    from dyadiq.backends.tvm.weight_only_decode import (
        METADATA_NAME,
        build_decode_library,
        kernel_graph,
    )
    from dyadiq.passes.weight_only.layers import find_weights
    from dyadiq.passes.weight_only.model_file import ModelFile
    from dyadiq.passes.weight_only.transfer import (
        codes_for_layers,
        quantize_like,
        read_groupwise_codes,
    )

    t0 = time.perf_counter()
    codes = read_groupwise_codes(ModelFile.load(quantized))
    source = ModelFile.load(decode_graph)
    inventory = find_weights(source.header)
    transfer = codes_for_layers(codes, inventory.layers)
    graph, off_kernel = kernel_graph(
        source.header, inventory.layers, transfer.quantized, source.array
    )
    t1 = time.perf_counter()
    build_decode_library(
        graph,
        kind,
        target,
        threads=threads,
        extra={
            "quantized_model": str(quantized.resolve()),
            "decode_graph": str(decode_graph.resolve()),
            "float_layers": transfer.left_float,
            "not_on_kernels": off_kernel,
            "kernel_layers": len(transfer.quantized) - len(off_kernel),
        },
    )
    t2 = time.perf_counter()
    quantize_like(quantized, decode_graph, target / REFERENCE_MODEL)
    info: dict[str, Any] = json.loads((target / METADATA_NAME).read_text())
    log.info(
        "generate: built %s in %.0f s (graph %.0f s, compile %.0f s)",
        target,
        t2 - t0,
        t1 - t0,
        t2 - t1,
    )
    return info


def quantize_target_folder(out: Path, name: str) -> Path:
    """The folder ``quantize --weight-only --target NAME -o OUT`` builds (ConfigError for
    targets the weight-only mode has no decode build for)."""
    if name not in QUANTIZE_TARGET_FOLDERS:
        raise ConfigError(
            f"--weight-only --target builds a TVM decode step for "
            f"{', '.join(QUANTIZE_TARGET_FOLDERS)}, not {name}"
        )
    return out / QUANTIZE_TARGET_FOLDERS[name]


def decode_graph_for(decode_graph: str | None, zoo: str | None) -> Path:
    """The float decode-step graph a weight-only target build starts from: ``--decode-graph``,
    or the zoo's own for a zoo model that has one (checked before quantizing)."""
    if decode_graph:
        path = Path(decode_graph)
        if not path.is_file():
            raise ConfigError(f"--decode-graph {path} does not exist")
        return path
    if zoo in ZOO_DECODE_GRAPHS:
        return default_decode_graph()
    raise ConfigError(
        "--weight-only --target needs the model's KV-cache decode-step graph: --decode-graph "
        f"DECODE.onnx (the zoo exports it for {', '.join(ZOO_DECODE_GRAPHS)})"
    )


def check_decode_target(folder: Path, steps: int) -> dict[str, Any] | None:
    """Feed tokens 1..``steps`` through the built step and through onnxruntime on the same
    quantized decode graph (unoptimized); the logits' agreement, or None when the build
    cannot run on this machine (another ISA)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from dyadiq.backends.tvm.weight_only_decode import TvmDecodeStep
    from dyadiq.backends.tvm.weight_only_kernels import CpuTarget
    from dyadiq.zoo.gemma3_decode import CacheShape
    from dyadiq.zoo.kv_decode import OnnxruntimeStep, agreement, greedy_decode

    info = json.loads((folder / "decode.json").read_text())
    if info["target"] == str(CpuTarget.AARCH64) or (
        info["target"] == str(CpuTarget.X86_AVX512) and host_x86_kind() != CpuTarget.X86_AVX512
    ):
        return None
    reference = folder / REFERENCE_MODEL
    shape = CacheShape.of_graph(onnx.load(str(reference), load_external_data=False))
    prompt = list(range(1, min(steps, shape.max_positions - 1) + 1))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(reference), options, providers=["CPUExecutionProvider"])
    expected = greedy_decode(OnnxruntimeStep(session, shape.layers), shape, prompt, 1)
    got = greedy_decode(TvmDecodeStep(folder), shape, prompt, 1)
    compared = agreement(np.stack(expected.step_logits), got.step_logits)
    relative = max(
        float(np.max(np.abs(g - e)) / np.max(np.abs(e)))
        for e, g in zip(expected.step_logits, got.step_logits, strict=True)
    )
    return {
        "reference": REFERENCE_MODEL,
        "max_relative_logit_diff": relative,
        "relative_tolerance": CHECK_RELATIVE_TOL,
        **compared.to_json(),
    }


def build_quantize_target(out: Path, name: str, decode_graph: Path, check_steps: int) -> Path:
    """``quantize --weight-only --target NAME``: build ``OUT/<folder>`` from the model just
    written to ``OUT`` (what ``dyadiq generate OUT/<folder>`` would build on first use) and
    check it on ``check_steps`` decoding steps where it runs here. A check outside
    ``CHECK_RELATIVE_TOL`` is an error; it is recorded in decode.json either way."""
    from dyadiq.backends.tvm.weight_only_decode import METADATA_NAME
    from dyadiq.errors import VerificationError

    folder = quantize_target_folder(out, name)
    info = build_decode_target(out / QUANTIZED_MODEL, folder, decode_graph, target_kind(folder))
    check = check_decode_target(folder, check_steps) if check_steps > 0 else None
    info["check"] = check
    write_text_atomic(folder / METADATA_NAME, json.dumps(info, indent=1) + "\n")
    if check is None:
        print(f"decode target: {folder} ({info['target']}; not run here)")
        return folder
    print(
        f"decode target: {folder} ({info['target']}); {check['positions']} steps against "
        f"onnxruntime on {REFERENCE_MODEL}: max |logit diff| {check['max_abs_logit_diff']:.3g} "
        f"({check['max_relative_logit_diff']:.2g} of the step's largest |logit|), "
        f"{check['argmax_agree']}/{check['positions']} argmax equal"
    )
    if check["max_relative_logit_diff"] > CHECK_RELATIVE_TOL:
        raise VerificationError(
            f"{folder}: logits differ from onnxruntime's by "
            f"{check['max_relative_logit_diff']:.3g} of their scale (> {CHECK_RELATIVE_TOL})"
        )
    return folder


def _tokenizer(path: str | None) -> Any:
    if path is None:
        from dyadiq.zoo import gemma3

        return gemma3.tokenizer()
    from dyadiq.zoo._install import ensure_package

    tokenizers = ensure_package("tokenizers", "tokenizers>=0.19", no_deps=False)
    return tokenizers.Tokenizer.from_file(path)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """``<bos>`` (when the tokenizer has one) followed by the text's tokens."""
    ids = list(tokenizer.encode(text, add_special_tokens=False).ids)
    bos = tokenizer.token_to_id("<bos>")
    return ([int(bos)] if bos is not None else []) + ids


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first position where two token lists differ (their length if none)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import onnx

    from dyadiq.backends.tvm.weight_only_decode import TvmDecodeStep, is_current_build
    from dyadiq.cli import output
    from dyadiq.zoo.gemma3_decode import CacheShape
    from dyadiq.zoo.kv_decode import agreement, greedy_decode

    folder = Path(args.target)
    if not is_current_build(folder):  # none yet, or an older dyadiq's: built here
        quantized = folder.parent / QUANTIZED_MODEL
        if not quantized.is_file():
            raise ConfigError(
                f"{folder} holds no decode build and {quantized} does not exist: run "
                f"`dyadiq quantize --weight-only ... -o {folder.parent}` first"
            )
        kind = target_kind(folder)
        graph = Path(args.decode_graph) if args.decode_graph else default_decode_graph()
        message = f"building {folder} ({kind}) from {quantized} and {graph} ..."
        if args.json:  # stdout is the JSON document
            log.warning("generate: %s", message)
        else:
            output.console.print(message)
        build_decode_target(quantized, folder, graph, kind)
    step = TvmDecodeStep(folder)
    reference = folder / REFERENCE_MODEL
    shape = CacheShape.of_graph(onnx.load(str(reference), load_external_data=False))
    tokenizer = _tokenizer(args.tokenizer)
    prompt = prompt_ids(tokenizer, args.prompt)
    t0 = time.perf_counter()
    decoded = greedy_decode(step, shape, prompt, args.max_new_tokens)
    seconds = time.perf_counter() - t0
    text = tokenizer.decode(decoded.generated, skip_special_tokens=False)
    result: dict[str, Any] = {
        "prompt": args.prompt,
        "prompt_tokens": len(prompt),
        "generated_tokens": decoded.generated,
        "text": text,
        "seconds": seconds,
    }
    if args.check:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # unoptimized: onnxruntime would fuse DequantizeLinear + MatMul into its own int4
        # kernels (another summation order, and on some CPUs int8 activations); the check
        # wants the graph's plain semantics, dequantise then float MatMul
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(reference), options, providers=["CPUExecutionProvider"])
        from dyadiq.zoo.kv_decode import OnnxruntimeStep

        expected = greedy_decode(
            OnnxruntimeStep(session, shape.layers), shape, prompt, args.max_new_tokens
        )
        same = first_difference(decoded.tokens, expected.tokens)
        compared = agreement(np.stack(expected.step_logits[:same]), decoded.step_logits[:same])
        result["check"] = {
            "reference": str(reference),
            "tokens_agreeing": same - len(prompt),
            "of": args.max_new_tokens,
            **compared.to_json(),
        }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    from rich.markup import escape

    output.console.print(f"{escape(args.prompt)}[bold]{escape(text)}[/]", highlight=False)
    output.console.print(
        f"({len(prompt)} prompt tokens fed one at a time, {args.max_new_tokens} new: "
        f"{seconds:.2f} s in all; benchmarks/llm_decode.py times the phases apart)"
    )
    if "check" in result:
        c = result["check"]
        output.console.print(
            f"check against onnxruntime ({REFERENCE_MODEL}): {c['tokens_agreeing']}/{c['of']} "
            f"generated tokens agree; max |logit diff| {c['max_abs_logit_diff']:.3g} over "
            f"{c['positions']} steps"
        )
    return 0


def add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="greedy decoding on a TVM-compiled weight-only LM: OUT/x86 --prompt TEXT (built "
        "on first use from OUT/model.wo.onnx)",
    )
    p.add_argument("target", help="OUT/x86, OUT/x86-avx2 or OUT/aarch64 (OUT from quantize)")
    p.add_argument("--prompt", required=True, help="the text to continue (<bos> is added)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="tokens to generate; prompt + new must fit the cache (default %(default)s)",
    )
    p.add_argument(
        "--decode-graph",
        help="the float KV-cache decode-step ONNX graph (default: the zoo's Gemma 3 270M)",
    )
    p.add_argument("--tokenizer", help="a tokenizer.json (default: the zoo's Gemma tokenizer)")
    p.add_argument(
        "--check",
        action="store_true",
        help="also decode with onnxruntime on the same quantized decode graph and compare",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_generate)
