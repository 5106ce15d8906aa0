"""Where one decode step of a TVM decode build spends its time (issue 17): each compiled
PrimFunc and VM builtin the Relax VM calls, timed with the VM's instrument hook, summed by
category, next to the step's own time.

    .venv/bin/python -m benchmarks.decode_profile BUILD [BUILD ...] --threads 1

``BUILD`` is a folder written by ``dyadiq generate`` / ``quantize --weight-only --target``
(``model.so`` + ``decode.json``). One step at position ``--position`` with a random cache
(the kernels' work does not depend on the values). The hook adds a Python call around every
VM call, so the per-call times are slightly high and their sum can exceed the uninstrumented
step; the shares between categories are what the profile is for. Results go to
``llm_decode_profile.{md,json}``; on a shared machine only the shares mean anything.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, machine_info, results_header, write_results

RESULTS = Path(__file__).resolve().parent / "results"
# (category, substrings of the PrimFunc name), first match wins; the names are those
# Relax's FuseOps gives (fused_<op>_<op>...) or the kernels' own.
CATEGORIES = (
    ("int4 GEMV", ("int4_matmul",)),
    ("attention", ("decode_attention", "softmax", "matmul")),
    ("KV-cache write / repeat copies", ("kv_cache_write", "where", "expand_dims", "broadcast_to")),
    ("RMSNorm", ("mean",)),
    ("GELU (tanh)", ("tanh",)),
    ("rotary", ("strided_slice", "cos", "sin")),
    ("VM builtins (alloc, reshape, ...)", ("vm.builtin",)),
)
OTHER = "other elementwise / glue"


def category(symbol: str) -> str:
    for name, keys in CATEGORIES:
        if any(k in symbol for k in keys):
            return name
    return OTHER


def _feeds(info: dict[str, Any], position: int) -> list[Any]:
    import tvm

    rng = np.random.default_rng(0)
    feeds = []
    for spec in info["inputs"]:
        if spec["name"] == "input_ids":
            value = np.array([[5]], np.int64)
        elif spec["name"] == "position":
            value = np.array([position], np.int64)
        else:
            value = 0.1 * rng.standard_normal(spec["shape"]).astype(np.float32)
        feeds.append(tvm.runtime.tensor(value))
    return feeds


def profile(folder: Path, position: int, repeats: int) -> dict[str, Any]:
    import tvm
    from tvm import relax

    info = json.loads((folder / "decode.json").read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / info["library"])), tvm.cpu())
    main = vm["main"]
    feeds = _feeds(info, position)
    for _ in range(3):
        main(*feeds)
    steps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        main(*feeds)
        steps.append(time.perf_counter() - t0)
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    started: dict[str, float] = {}

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if before:
            started[symbol] = time.perf_counter()
        else:
            seconds[symbol] += time.perf_counter() - started[symbol]
            calls[symbol] += 1
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    for _ in range(repeats):
        main(*feeds)
    per_call = {s: (calls[s] // repeats, 1e3 * t / repeats) for s, t in seconds.items()}
    by_category: dict[str, float] = collections.defaultdict(float)
    for symbol, (_, ms) in per_call.items():
        by_category[category(symbol)] += ms
    return {
        "build": str(folder),
        "fusion": info.get("fusion"),
        "step_ms_median": 1e3 * float(np.median(steps)),
        "calls_per_step": sum(c for c, _ in per_call.values()),
        "categories_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "functions": {s: {"calls": c, "ms": ms} for s, (c, ms) in per_call.items()},
    }


def render(data: dict[str, Any]) -> str:
    m, r = data["machine"], data["run"]
    lines = [
        "# One decode step of a TVM decode build, by category (issue 17)",
        "",
        *results_header(m, r),
        f"One step at position {r['position']}, {r['repeats']} repeats; per-call times from the "
        "Relax VM's instrument hook (a Python call around each VM call: times slightly high). "
        "Shares are of the instrumented sum.",
        "",
    ]
    for result in data["builds"]:
        total = sum(result["categories_ms"].values())
        lines += [
            f"## {result['build']}",
            "",
            f"Step {result['step_ms_median']:.1f} ms (median, uninstrumented); "
            f"{result['calls_per_step']} VM calls per step; fusion: {result['fusion']}.",
            "",
            "| category | ms | share |",
            "|---|---|---|",
        ]
        for name, ms in result["categories_ms"].items():
            lines.append(f"| {name} | {ms:.2f} | {100 * ms / total:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", help="decode build folders (model.so, decode.json)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--position", type=int, default=100, help="the step's cache position")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    data: dict[str, Any] = {
        "machine": machine_info(),
        "run": {
            "command": "python -m benchmarks.decode_profile "
            + shlex.join(sys.argv[1:] if argv is None else list(argv)),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "threads": args.threads,
            "position": args.position,
            "repeats": args.repeats,
        },
        "builds": [profile(Path(b), args.position, args.repeats) for b in args.builds],
    }
    data["run"]["load_avg_end"] = list(os.getloadavg())
    write_results(data, Path(args.out), "llm_decode_profile", render)
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
