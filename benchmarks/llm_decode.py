"""Decode speed of Gemma 3 270M at batch 1 (issue 17): tokens per second of greedy decoding
with the KV-cache decode step, prompt fed one token at a time, then new tokens generated.

Variants, all in this process, the same prompt, the same threads:
- ``ort_float``: the zoo's float decode graph (weights = the Q4_K_M GGUF dequantised to fp32)
  in onnxruntime;
- ``ort_matmulnbits_int4``: the int4 model's codes on the decode graph as onnxruntime's
  ``MatMulNBits`` / ``GatherBlockQuantized`` (its own int4 kernels; graph optimizations on);
- ``tvm_int4``: the same codes compiled by ``dyadiq generate``'s builder for this machine's
  x86 level (int4 kernels of backends/tvm/weight_only_kernels.py);
- ``tvm_mixed`` / ``ort_mixed_dq``: a mixed-width plan (``--mixed``) compiled the same way,
  and the same model in onnxruntime as blocked DequantizeLinear (layers of 5-8 bits have no
  TVM kernel: they are dequantised to float there). onnxruntime's MatMulNBits form takes
  4-bit layers only, hence the DequantizeLinear form for a mixed plan; in that form the tied
  table's Gather dequantises all 262,144 rows (671 MB of float) every step, which makes
  ``ort_mixed_dq`` slow for a reason unrelated to its MatMuls.

The quantized models are ``dyadiq quantize --weight-only`` outputs (blocked
DequantizeLinear form), e.g.

    .venv/bin/dyadiq quantize --weight-only --zoo gemma3_270m --wo-method rtn \\
        --group-size 128 -o /tmp/gemma-int4
    .venv/bin/dyadiq quantize --weight-only --zoo gemma3_270m --wo-method rtn \\
        --group-size 128 --budget avg-wbits=3.5 --wbits-candidates 3,4 -o /tmp/gemma-mixed
    .venv/bin/python -m benchmarks.llm_decode --int4 /tmp/gemma-int4 --mixed /tmp/gemma-mixed \\
        --threads 2                                   # the committed results (idle machine)
    .venv/bin/python -m benchmarks.llm_decode --int4 /tmp/gemma-int4 --prompt-tokens 8 \\
        --new-tokens 4 --out /tmp/decode-smoke        # a smoke check

With candidates 3 and 4 every layer of the mixed plan runs on the nibble kernel (3-bit codes
are read as 4-bit ones: no faster than int4); an 8-bit candidate would put those layers in
float in the TVM build.

Every variant's generated tokens are compared with ``ort_float``'s (first difference) and,
for the TVM builds, with onnxruntime on the same quantized decode graph unoptimized (the
``dyadiq generate --check`` reference). Built TVM targets are kept under ``--work`` and
reused when their decode.json is of the current build format (an older build is rebuilt).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, machine_info, results_header, write_results

log = logging.getLogger("benchmarks.llm_decode")
RESULTS = Path(__file__).resolve().parent / "results"


def prompt_tokens(count: int) -> list[int]:
    """The first ``count`` tokens of the first Britannica evaluation window (``<bos>``
    first): the same prompt for every variant and every run."""
    from dyadiq.zoo import gemma3

    window = gemma3.evaluation_windows(1)[0]
    if count > len(window):
        raise SystemExit(f"--prompt-tokens must be <= {len(window)}")
    return [int(t) for t in window[:count]]


def ort_session(path: Path, threads: int, *, optimized: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed_decode(step: Any, shape: Any, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """Greedy decoding with the prompt phase and the generation phase timed apart."""
    from dyadiq.zoo.kv_decode import greedy_decode

    marks: list[float] = []

    def clocked(token: int, position: int, cache: dict[str, np.ndarray]) -> Any:
        out = step(token, position, cache)
        marks.append(time.perf_counter())
        return out

    t0 = time.perf_counter()
    decoded = greedy_decode(clocked, shape, prompt, new_tokens)
    prompt_end = marks[len(prompt) - 1]
    generated_steps = len(marks) - len(prompt)  # the last new token needs no further step
    gen_seconds = marks[-1] - prompt_end
    return {
        "tokens": decoded.generated,
        "prompt_seconds": prompt_end - t0,
        "generate_seconds": gen_seconds,
        "generate_steps": generated_steps,
        "tokens_per_s": generated_steps / gen_seconds if gen_seconds > 0 else None,
        "ms_per_token": 1e3 * gen_seconds / generated_steps if generated_steps else None,
        "step_logits": decoded.step_logits,
    }


def tvm_target(quantized: Path, work: Path, name: str, decode: Path, threads: int) -> Path:
    from dyadiq.backends.tvm.weight_only_decode import is_current_build
    from dyadiq.cli.generate import build_decode_target, host_x86_kind

    built = quantized / "x86"  # what `dyadiq generate OUT/x86` (or quantize --target) built
    if is_current_build(built):
        return built
    target = work / name / "x86"
    if not is_current_build(target):  # none yet, or one of an older format: (re)built
        log.info("building %s from %s", target, quantized)
        build_decode_target(
            quantized / "model.wo.onnx", target, decode, host_x86_kind(), threads=threads
        )
    return target


def _first_difference(a: list[int], b: list[int]) -> int:
    from dyadiq.cli.generate import first_difference

    return first_difference(a, b)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnx

    from dyadiq.backends.onnx.weight_only import WeightOnlyForm
    from dyadiq.backends.tvm.weight_only_decode import TvmDecodeStep
    from dyadiq.cli.generate import REFERENCE_MODEL
    from dyadiq.passes.weight_only.transfer import quantize_like
    from dyadiq.zoo._install import cache_dir
    from dyadiq.zoo.gemma3 import materialise_decode
    from dyadiq.zoo.gemma3_decode import CacheShape
    from dyadiq.zoo.kv_decode import OnnxruntimeStep, agreement

    data: dict[str, Any] = {
        "machine": machine_info(),
        "run": {
            "command": "python -m benchmarks.llm_decode "
            + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "tvm_thread_pool_spin_count": os.environ.get("TVM_THREAD_POOL_SPIN_COUNT"),
        },
        "variants": {},
    }
    decode = materialise_decode(cache_dir())
    shape = CacheShape.of_graph(onnx.load(str(decode), load_external_data=False))
    prompt = prompt_tokens(args.prompt_tokens)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    variants: list[tuple[str, Any, Path | None]] = [
        (
            "ort_float",
            lambda: OnnxruntimeStep(ort_session(decode, args.threads), shape.layers),
            None,
        )
    ]
    models = {"int4": Path(args.int4)} | ({"mixed": Path(args.mixed)} if args.mixed else {})
    for label, folder in models.items():
        quantized = folder / "model.wo.onnx"
        if label == "int4":
            nbits = work / "int4" / "decode.nbits.onnx"
            if not nbits.is_file():
                nbits.parent.mkdir(parents=True, exist_ok=True)
                quantize_like(quantized, decode, nbits, WeightOnlyForm.MATMUL_NBITS)
            variants.append(
                (
                    "ort_matmulnbits_int4",
                    lambda p=nbits: OnnxruntimeStep(ort_session(p, args.threads), shape.layers),
                    None,
                )
            )
        target = tvm_target(folder, work, label, decode, args.threads)
        if label == "mixed":
            variants.append(
                (
                    "ort_mixed_dq",
                    lambda p=target / REFERENCE_MODEL: OnnxruntimeStep(
                        ort_session(p, args.threads), shape.layers
                    ),
                    None,
                )
            )
        variants.append((f"tvm_{label}", lambda t=target: TvmDecodeStep(t), target))
    # the DequantizeLinear variant dequantises the whole tied table every step (671 MB of
    # float): run it last, so that its memory churn cannot evict the others' weights
    variants.sort(key=lambda v: v[0] == "ort_mixed_dq")
    baseline: list[int] | None = None
    for name, make, built in variants:
        log.info("variant %s", name)
        gc.collect()  # the previous variant's session and buffers go first
        step = make()
        timed_decode(step, shape, prompt[:2], 3)  # warm-up: allocations, pages, threads
        result = timed_decode(step, shape, prompt, args.new_tokens)
        logits = result.pop("step_logits")
        if baseline is None:
            baseline = result["tokens"]
        result["tokens_equal_to_ort_float"] = _first_difference(result["tokens"], baseline)
        if built is not None:  # the generate --check comparison, unoptimized onnxruntime
            reference = OnnxruntimeStep(
                ort_session(built / REFERENCE_MODEL, args.threads, optimized=False),
                shape.layers,
            )
            expected = timed_decode(reference, shape, prompt, args.new_tokens)
            same = _first_difference(result["tokens"], expected["tokens"])
            span = len(prompt) + same  # steps fed the same tokens in both runs
            compared = agreement(np.stack(expected["step_logits"][:span]), logits[:span])
            result["check_against_ort_same_graph"] = {
                "tokens_agreeing": same,
                **compared.to_json(),
            }
        if built is not None:
            result["fusion"] = step.info.get("fusion")
        data["variants"][name] = result
        log.info(
            "%s: %.2f tok/s (%.1f ms/token)", name, result["tokens_per_s"], result["ms_per_token"]
        )
        del step  # with gc.collect() above: one variant's model in memory at a time
    data["run"]["load_avg_end"] = list(os.getloadavg())
    return data


def render(data: dict[str, Any]) -> str:
    m, r = data["machine"], data["run"]
    lines = [
        "# Gemma 3 270M decode speed, batch 1 (issue 17)",
        "",
        *results_header(m, r),
        f"Prompt {r['prompt_tokens']} tokens (fed one at a time through the decode step), then "
        f"{r['new_tokens']} new tokens; float = the Q4_K_M GGUF dequantised to fp32.",
        "",
        "| variant | tok/s | ms/token | prompt s | tokens = ort_float | vs ORT, same graph |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in data["variants"].items():
        check = v.get("check_against_ort_same_graph")
        check_text = (
            f"{check['tokens_agreeing']}/{r['new_tokens']} tokens, max logit diff "
            f"{check['max_abs_logit_diff']:.3g}"
            if check
            else ""
        )
        if v["tokens_per_s"] is None:  # one new token: no generation step to time
            continue
        lines.append(
            f"| {name} | {v['tokens_per_s']:.2f} | {v['ms_per_token']:.1f} | "
            f"{v['prompt_seconds']:.2f} | {v['tokens_equal_to_ort_float']}/{r['new_tokens']} | "
            f"{check_text} |"
        )
    lines += [
        "",
        "tok/s counts generation steps only (the step for each new token after the first), "
        "timed after a short warm-up decode per variant (2 prompt tokens, 3 new). "
        "'tokens = ort_float': generated tokens "
        "equal to the float model's before the first difference.",
        "",
    ]
    fused = {n: v["fusion"] for n, v in data["variants"].items() if v.get("fusion")}
    for name, fusion in fused.items():
        lines.append(
            f"{name}: attention over the KV cache fused on {fusion['attention_layers']} layers, "
            f"{fusion['cache_writes_in_place']} cache writes in place "
            "(backends/tvm/decode_attention.py).  "
        )
    if fused:
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--int4", required=True, help="weight-only output folder (int4 plan)")
    parser.add_argument("--mixed", help="weight-only output folder of a mixed-width plan")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--work", default="/tmp/dyadiq-llm-decode", help="built targets")
    parser.add_argument("--out", default=str(RESULTS), help="folder for llm_decode.{md,json}")
    parser.add_argument("--spin", action="store_true", help="let idle TVM workers spin")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first new token needs no step)")
    args.argv = list(argv) if argv is not None else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # read by TVM's thread pool when it starts, i.e. at the first parallel kernel
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if not args.spin:
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
    data = run(args)
    write_results(data, Path(args.out), "llm_decode", render)
    log.info("wrote %s", Path(args.out) / "llm_decode.md")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
