"""Gemma 3 270M weight-only GPTQ int4 at each group size, with the tied embedding / LM head at 4
or at 8 bits: perplexity on the same Britannica windows as ``benchmarks/llm.py``.

    python -m benchmarks.llm_group_sizes --groups 128,64,32

The float reference is the Q4_K_M GGUF weights dequantised (see dyadiq/zoo/gemma3.py): most of
its weights already lie on a 4-bit grid of 32-weight sub-blocks, which a 128-weight group
cannot hold; this measures how much of GPTQ's loss that accounts for, and what the tied table
(62% of the weights, the largest single damage) costs at 4 bits. Scored with onnxruntime on the
blocked DequantizeLinear model (``WeightOnlyForm.DEQUANTIZE_LINEAR``), as llm.md's rows.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_results
from benchmarks.llm import file_bytes, score
from dyadiq import zoo
from dyadiq.backends.onnx.weight_only import WeightOnlyForm
from dyadiq.passes.weight_only.pipeline import prepare, run
from dyadiq.passes.weight_only.quantize import Method, WeightOnlySettings
from dyadiq.zoo import gemma3

FLOAT_PERPLEXITY = 43.37  # llm.md's float row, the same 32 windows


def measure(
    groups: list[int],
    work: Path,
    eval_windows: int,
    calib_windows: int,
    done: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The rows, handed to ``done`` after each group (a long run keeps what it measured)."""
    artifacts = zoo.get("gemma3_270m")
    windows = gemma3.evaluation_windows(eval_windows)
    window_bytes = [gemma3.window_bytes(w) for w in windows]
    calibration = list(gemma3.calibration_batches(calib_windows))
    rows: dict[str, Any] = {}
    for group in groups:
        start = time.perf_counter()
        settings = WeightOnlySettings(method=Method.GPTQ, group_size=group)
        prepared = prepare(artifacts.model_path, calibration, settings, memo=True)
        layers = prepared.inventory.layers
        for table_bits in (4, 8):
            label = f"GPTQ int4 g{group}" + (", tied table int8" if table_bits == 8 else "")
            bits = {layer.id: (table_bits if layer.tied else 4) for layer in layers}
            folder = work / f"g{group}_table{table_bits}"
            report = run(
                artifacts.model_path, folder, prepared, bits, WeightOnlyForm.DEQUANTIZE_LINEAR
            )
            rows[label] = {
                **score(folder, windows, window_bytes),
                "file_bytes": file_bytes(folder),
                "average_code_bits": report["average_code_bits"],
            }
            logging.info("%s: %s", label, rows[label])
        rows[f"g{group} seconds"] = time.perf_counter() - start
        done(rows)
    return rows


def render(data: dict[str, Any]) -> str:
    lines = [
        "# Gemma 3 270M: GPTQ int4 by group size, tied table at 4 or 8 bits",
        "",
        f"Command: `{data['command']}` ({data['date']}, git {data['machine']['git_commit']}); "
        "load average at start "
        f"{data['machine']['load_avg_start']}. Float reference: the Q4_K_M GGUF weights "
        f"dequantised; float perplexity {FLOAT_PERPLEXITY} on the same windows (llm.md).",
        "",
        "| model | perplexity | vs float | bits / byte | file MB | avg code bits |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in data["rows"].items():
        if not isinstance(row, dict):
            continue
        ppl = row["perplexity"]
        lines.append(
            f"| {label} | {ppl:.2f} | {100 * (ppl / FLOAT_PERPLEXITY - 1):+.1f}% | "
            f"{row['bits_per_byte']:.4f} | {row['file_bytes'] / 1e6:.1f} | "
            f"{row['average_code_bits']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="128,64,32")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dyadiq_llm_groups"))
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    machine = machine_info()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    def save(rows: dict[str, Any]) -> None:
        data = {
            "date": started,
            "command": "python -m benchmarks.llm_group_sizes " + " ".join(sys.argv[1:]),
            "machine": machine,
            "rows": rows,
        }
        write_results(data, args.output_dir, "llm_group_sizes", render)

    groups = [int(g) for g in args.groups.split(",")]
    measure(groups, args.work, args.eval_windows, args.calib_windows, save)


if __name__ == "__main__":
    main()
