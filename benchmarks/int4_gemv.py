"""One layer's decoding product, x [1, K] times a group-wise int4 weight [K, N], timed three
ways on the same codes: dyadiq's TVM int4 kernel (backends/tvm/weight_only_kernels.py),
onnxruntime's ``MatMulNBits`` and onnxruntime's float ``MatMul`` of the dequantised weight.

Each result is checked against a float64 numpy reference (dequantise, then matmul) before it
is timed. Default shapes are Gemma 3 270M's (K x N): 640x1024 (q), 640x256 (k, v),
1024x640 (o), 640x2048 (gate, up), 2048x640 (down) and the tied LM head 640x262144.

    .venv/bin/python -m benchmarks.int4_gemv --threads 2            # on an idle machine
    .venv/bin/python -m benchmarks.int4_gemv --shapes 640x256 --repeat 5 --out /tmp/gemv
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, machine_info, results_header, write_results

log = logging.getLogger("benchmarks.int4_gemv")
RESULTS = Path(__file__).resolve().parent / "results"
GEMMA_SHAPES = "640x1024,640x256,1024x640,640x2048,2048x640,640x262144"
RTOL = 1e-5  # of sum_k |x_k| |w_kn|, as tests/test_tvm_int4_kernels.py


def _median_ms(call: Callable[[], Any], repeat: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _ort_session(model: Any, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])


def _single_node(node: Any, inits: list[Any], k: int, n: int, opsets: list[Any]) -> Any:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node],
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def one_shape(k: int, n: int, group: int, threads: int, repeat: int) -> dict[str, Any]:
    import tvm
    from onnx import helper, numpy_helper

    from dyadiq.backends.onnx.weight_only import pack_uint4, pack_zero_points
    from dyadiq.backends.tvm.weight_only_kernels import (
        KERNEL_SYMBOL,
        Int4Shape,
        build_int4_matmul,
        cpu_target,
        kernel_weights,
        reference_matmul,
    )
    from dyadiq.cli.generate import host_x86_kind

    rng = np.random.default_rng(k * 7 + n)
    codes = rng.integers(0, 16, (n, k))
    scales = rng.uniform(1e-3, 3e-2, (n, k // group)).astype(np.float32)
    zeros = rng.integers(0, 16, (n, k // group))
    x = rng.standard_normal((1, k)).astype(np.float32)
    expected = reference_matmul(x, codes, scales, zeros, group)
    w = np.abs(reference_matmul(np.eye(k), codes, scales, zeros, group))
    bound = RTOL * (np.abs(x.astype(np.float64)) @ w) + 1e-7
    row: dict[str, Any] = {"k": k, "n": n, "group": group}

    shape = Int4Shape.of(1, k, n, group)
    kind = host_x86_kind()
    kernel = build_int4_matmul(shape, cpu_target(kind, threads=threads))[KERNEL_SYMBOL]
    args = [tvm.runtime.tensor(a) for a in (x, *kernel_weights(codes, scales, zeros, shape))]
    y = tvm.runtime.tensor(np.zeros((1, n), np.float32))
    kernel(*args, y)
    row["tvm_int4_ok"] = bool(np.all(np.abs(y.numpy() - expected) <= bound))
    row["tvm_int4_ms"] = _median_ms(lambda: kernel(*args, y), repeat)
    row["tvm_target"] = str(kind)

    nbits_inits = [
        numpy_helper.from_array(pack_uint4(codes, group), "b"),
        numpy_helper.from_array(scales, "s"),
        numpy_helper.from_array(pack_zero_points(zeros), "z"),
    ]
    node = helper.make_node(
        "MatMulNBits",
        ["x", "b", "s", "z"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=group,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    session = _ort_session(_single_node(node, nbits_inits, k, n, opsets), threads)
    got = session.run(["y"], {"x": x})[0]
    row["ort_matmulnbits_max_err"] = float(np.max(np.abs(got - expected)))
    row["ort_matmulnbits_ms"] = _median_ms(lambda: session.run(["y"], {"x": x}), repeat)

    dense = reference_matmul(np.eye(k), codes, scales, zeros, group).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    float_model = _single_node(
        node, [numpy_helper.from_array(dense, "w")], k, n, [helper.make_opsetid("", 21)]
    )
    session_f = _ort_session(float_model, threads)
    got = session_f.run(["y"], {"x": x})[0]
    row["ort_float_ok"] = bool(np.all(np.abs(got - expected) <= bound))
    row["ort_float_ms"] = _median_ms(lambda: session_f.run(["y"], {"x": x}), repeat)
    return row


def render(data: dict[str, Any]) -> str:
    m, r = data["machine"], data["run"]
    lines = [
        "# One layer's int4 GEMV: TVM kernel vs onnxruntime (issue 17)",
        "",
        *results_header(m, r),
        f"Median of {r['repeat']} calls.",
        "",
        "| K x N | group | TVM int4 ms | ORT MatMulNBits ms | ORT float ms | TVM checked |",
        "|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['k']}x{row['n']} | {row['group']} | {row['tvm_int4_ms']:.3f} | "
            f"{row['ort_matmulnbits_ms']:.3f} | {row['ort_float_ms']:.3f} | "
            f"{row['tvm_int4_ok']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=GEMMA_SHAPES, help="KxN,KxN,...")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--out", default=str(RESULTS), help="folder for int4_gemv.{md,json}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
    data: dict[str, Any] = {
        "machine": machine_info(),
        "run": {
            "command": "python -m benchmarks.int4_gemv "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "threads": args.threads,
            "repeat": args.repeat,
        },
        "rows": [],
    }
    for text in args.shapes.split(","):
        k, n = (int(v) for v in text.lower().split("x"))
        row = one_shape(k, n, args.group, args.threads, args.repeat)
        log.info("%s", row)
        data["rows"].append(row)
    data["run"]["load_avg_end"] = list(os.getloadavg())
    write_results(data, Path(args.out), "int4_gemv", render)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
