"""Batch-1 latency of a zoo model's integer program compiled by TVM (x86, untuned unless a
scheduler ran between ``prepare`` and ``compile_prepared``) next to onnxruntime's float model
with the same number of threads:

    python -m dyadiq.backends.tvm_latency fashion_cnn mobilenet_v2 --threads 2

Both are timed the same way: wall-clock median of ``repeat`` calls after ``warmup`` calls, one
fixed real input, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import tvm
from tvm import relax

from dyadiq import zoo
from dyadiq.backends.tvm_build import compile_prepared, prepare, target_for
from dyadiq.backends.tvm_lowering import lower_program
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.integerize import integerize
from dyadiq.pipeline import quantize_graph
from dyadiq.plan import PrecisionPlan


def median_ms(call: Callable[[], Any], *, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(name: str, threads: int, *, warmup: int, repeat: int) -> dict[str, Any]:
    artifacts = zoo.get(name)
    graph = load_onnx(artifacts.model_path)
    plan = PrecisionPlan.uniform(graph)
    result = quantize_graph(graph, plan, list(artifacts.calibration_batches()))
    program = integerize(result.graph, plan, result.sites, result.qdq.act_params)
    feeds, _ = next(iter(artifacts.evaluation_batches(1)))
    feeds = {k: v[:1] for k, v in feeds.items()}
    target = target_for("x86")
    start = time.perf_counter()
    executable = compile_prepared(prepare(lower_program(program, target=target), target), target)
    compile_s = time.perf_counter() - start
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in program.inputs]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(artifacts.model_path), options, providers=["CPUExecutionProvider"]
    )
    ort_ms = median_ms(lambda: session.run(None, feeds), warmup=warmup, repeat=repeat)
    tvm_ms = median_ms(lambda: vm["main"](*args), warmup=warmup, repeat=repeat)
    return {
        "model": name,
        "threads": threads,
        "tvm_compile_s": round(compile_s, 1),
        "ort_fp32_ms": round(ort_ms, 3),
        "tvm_int8_ms": round(tvm_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    # TVM's thread pool reads this when it first starts; untuned kernels have no parallel
    # loops, but scheduled ones do.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    for name in args.models:
        row = measure(name, args.threads, warmup=args.warmup, repeat=args.repeat)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
