"""dyadiq against onnxruntime's ``quantize_static`` on the zoo models, in one run.

For each zoo model the calibration batches are materialised once (``.npz`` files) and every
method calibrates on exactly those. Each quantization runs in a fresh worker process (this
module with ``--worker``), so its wall time and peak RSS (``VmHWM`` at its end: interpreter,
imports, model loading, calibration and export) are its own. The
parent enforces a timeout and a memory cap per run by watching the worker's ``VmHWM``; a run
that fails, times out or exceeds the cap is recorded with the reason, never fatal.

Then all quantized models are evaluated on the zoo's held-out split against the float model
(:func:`dyadiq.evaluation.evaluate`), and the comparisons (metric deltas, time and peak-memory
ratios) are computed in the same run. Results: ``results/baseline.json`` and ``baseline.md``.

    .venv/bin/python -m benchmarks.baseline                 # all four models
    .venv/bin/python -m benchmarks.baseline --models fashion_cnn --quick   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"
ALL_MODELS = ("fashion_cnn", "mobilenet_v2", "ppocr_cls", "minilm")
ORT_CALIBRATORS = ("MinMax", "Percentile", "Entropy")
DYADIQ_METHODS = ("minmax", "percentile", "mse", "entropy")
PERCENTILE = 99.99
REPORTED_METRICS = {
    "fashion_cnn": ("accuracy", "top1_agreement"),
    "ppocr_cls": ("accuracy", "top1_agreement"),
    "mobilenet_v2": ("top1_agreement", "top5_contains_reference_top1", "logit_cosine"),
    "minilm": ("mean_cosine", "min_cosine", "nn_agreement"),
}
# ORT's histogram calibrators keep every intermediate output of every batch and then search
# thresholds in Python; on MiniLM (512 sentences, ~200 tensors of up to 12x128x128) Entropy
# needs tens of GB and hours on a small machine, so it is skipped there (reason recorded).
ORT_SKIPS = {
    ("minilm", "Entropy"): (
        "skipped: onnxruntime's Entropy calibrator stores every intermediate output of all 512 "
        "sentences before its per-tensor threshold search (tens of GB, very slow on this machine)"
    ),
}
# The integer-only (dyadic) run: W8A8 with dyadiq's default calibrator (percentile), minmax on
# MiniLM; its model.int.onnx is evaluated like every other model.
INTEGER_METHOD = {"minilm": "minmax"}
INTEGER_DEFAULT_METHOD = "percentile"
# onnxruntime's quantize_dynamic (int8 weights, activations quantized at run time): the ORT
# baseline a user would pick for a transformer.
ORT_DYNAMIC_MODELS = ("minilm",)
LATENCY_WARMUP = 3
LATENCY_RUNS = 20
MINILM_SCALING_SAMPLES = (64, 512)
MINILM_PEAK_BOUND_MIB = 1500

log = logging.getLogger("benchmarks.baseline")


# --- worker (runs in a fresh process) ----------------------------------------------------------


def _peak_rss_mib() -> float:
    """This process's peak RSS: ``VmHWM`` of /proc/self/status.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the pre-exec RSS high-water mark of
    the forked parent copy across ``execve`` into ``ru_maxrss``, so a worker started by a big
    parent would report at least the parent's RSS. ``VmHWM`` belongs to the new address space.
    """
    hwm = _vm_hwm_mib(os.getpid())
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _npz_batches(calib_dir: Path, limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    for k, path in enumerate(sorted(calib_dir.glob("batch_*.npz"))):
        if limit is not None and k >= limit:
            return
        with np.load(path, allow_pickle=False) as data:
            yield {key: data[key] for key in data.files}


def _worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    result: dict[str, Any] = {}
    if spec["tool"] == "ort" and spec["method"] == "Dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        result["rss_after_imports_mib"] = _peak_rss_mib()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(spec["model_path"], str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(str(prepared), spec["output"], weight_type=QuantType.QInt8)
        result["wall_s"] = time.perf_counter() - t0
    elif spec["tool"] == "ort":
        from dyadiq.ort_baseline import OrtCalibrator, quantize_static_baseline

        result["rss_after_imports_mib"] = _peak_rss_mib()
        t0 = time.perf_counter()
        quantize_static_baseline(
            Path(spec["model_path"]),
            Path(spec["output"]),
            _npz_batches(Path(spec["calib_dir"]), spec["calib_limit"]),
            calibrator=OrtCalibrator(spec["method"]),
        )
        result["wall_s"] = time.perf_counter() - t0
    else:
        from dyadiq.passes.calibration.observers import RangeMethod
        from dyadiq.pipeline import CalibrationConfig, quantize

        result["rss_after_imports_mib"] = _peak_rss_mib()
        t0 = time.perf_counter()
        out_dir = Path(spec["output"]).parent
        batches: Any = _npz_batches(Path(spec["calib_dir"]), spec["calib_limit"])
        if spec.get("integer"):
            # a list, so quantize() can re-read its first batches to check the integer model
            batches = list(batches)
        quantize(
            Path(spec["model_path"]),
            out_dir,
            batches,
            weight_bits=spec["weight_bits"],
            act_bits=spec["act_bits"],
            config=CalibrationConfig(method=RangeMethod(spec["method"]), percentile=PERCENTILE),
            integer=spec.get("integer", False),
        )
        result["wall_s"] = time.perf_counter() - t0
        report = json.loads((out_dir / "report.json").read_text())
        result["dyadiq_timings"] = report.get("timings")
        result["calibration_batches"] = report.get("calibration_batches")
        if spec.get("integer"):
            result["integer"] = _integer_summary(report.get("integer", {}))
    result["peak_rss_mib"] = _peak_rss_mib()
    result["peak_above_imports_mib"] = result["peak_rss_mib"] - result["rss_after_imports_mib"]
    Path(spec["result"]).write_text(json.dumps(result))


def _integer_summary(section: dict[str, Any]) -> dict[str, Any]:
    """The part of report.json's "integer" section the benchmark records."""
    exact = section.get("bit_exact_vs_reference") or {}
    agree = section.get("qdq_vs_integer") or {}
    float_ops = section.get("float_ops")
    return {
        "fully_integer": section.get("fully_integer"),
        "float_ops": len(float_ops) if isinstance(float_ops, list | dict) else float_ops,
        "float_op_list": float_ops,
        "check_batches": section.get("check_batches"),
        "exact_tensors": exact.get("exact_tensors"),
        "tensors": exact.get("tensors"),
        "mismatches": exact.get("mismatches"),
        "max_output_diff_lsb": agree.get("max_output_diff_lsb"),
        "top1_agreement_qdq_vs_integer": agree.get("top1_agreement_qdq_vs_integer"),
    }


# --- parent: one quantization run in a watched subprocess --------------------------------------


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


def run_quantization(
    spec: dict[str, Any], work: Path, *, timeout_s: float, mem_cap_mib: float
) -> dict[str, Any]:
    """Run one quantization in a fresh worker; returns its record (status ok/failed/...)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(work / "result.json")}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "benchmarks.baseline", "--worker", str(spec_path)]
    stderr_path = work / "stderr.txt"
    record: dict[str, Any] = {
        "tool": spec["tool"],
        "method": spec["method"],
        "weight_bits": spec.get("weight_bits", 8),
        "act_bits": spec.get("act_bits", 8),
        "calibration_limit": spec["calib_limit"],
        "integer_only": bool(spec.get("integer", False)),
    }
    start = time.perf_counter()
    peak_seen = 0.0
    status = "ok"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=err, stderr=err)
        while proc.poll() is None:
            hwm = _vm_hwm_mib(proc.pid)
            if hwm is not None:
                peak_seen = max(peak_seen, hwm)
            elapsed = time.perf_counter() - start
            if peak_seen > mem_cap_mib:
                status = f"killed: peak RSS exceeded the {mem_cap_mib:.0f} MiB cap"
            elif elapsed > timeout_s:
                status = f"killed: exceeded the {timeout_s:.0f} s timeout"
            if status != "ok":
                proc.kill()
                proc.wait()
                break
            time.sleep(0.05)
    record["process_wall_s"] = time.perf_counter() - start
    result_path = Path(spec["result"])
    if status == "ok" and (proc.returncode != 0 or not result_path.is_file()):
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-6:]
        status = f"failed (exit {proc.returncode}): " + " | ".join(tail)
    record["status"] = status
    if status == "ok":
        record.update(json.loads(result_path.read_text()))
        record["model_bytes"] = Path(spec["output"]).stat().st_size
        record["output"] = spec["output"]
    else:
        record["peak_rss_mib_observed"] = peak_seen
        Path(spec["output"]).unlink(missing_ok=True)
    log.info(
        "  %-8s %-10s W%sA%s%s: %s (%.1fs, peak %.0f MiB)",
        record["tool"],
        record["method"],
        record["weight_bits"],
        record["act_bits"],
        " integer" if record["integer_only"] else "",
        status,
        record.get("wall_s", record["process_wall_s"]),
        record.get("peak_rss_mib", peak_seen),
    )
    return record


# --- one model ---------------------------------------------------------------------------------


def materialise_calibration(artifacts: Any, folder: Path) -> dict[str, Any]:
    """Write the zoo's calibration batches once, as batch_NNNNN.npz (what every method reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = samples = 0
    nbytes = 0
    for feeds in artifacts.calibration_batches():
        arrays = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        np.savez(folder / f"batch_{batches:05d}.npz", **arrays)
        samples += int(next(iter(arrays.values())).shape[0])
        nbytes += sum(a.nbytes for a in arrays.values())
        batches += 1
    return {"batches": batches, "samples": samples, "bytes": nbytes}


def _label(
    tool: str, method: str, weight_bits: int = 8, act_bits: int = 8, integer: bool = False
) -> str:
    if tool == "ort":
        return f"ort_{method.lower()}"
    return f"dyadiq_w{weight_bits}a{act_bits}_{method}" + ("_integer" if integer else "")


def _evaluate(
    artifacts: Any, candidates: dict[str, Path], limit: int | None
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Evaluate all candidates at once; if that fails, one by one to isolate the failure.

    Each candidate is scored twice: as an exact simulation (the figures every table shows, the
    same on any CPU) and, as ``NAME [onnxruntime kernels]``, with onnxruntime's fused kernels
    on this CPU (what deploying the QDQ file with onnxruntime here gives)."""
    from dyadiq.evaluation import evaluate

    try:
        return evaluate(artifacts, candidates, limit=limit, runtime_kernels=True), {}
    except Exception as exc:
        log.warning("  joint evaluation failed (%s); evaluating one by one", exc)
    metrics: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for name, path in candidates.items():
        try:
            out = evaluate(artifacts, {name: path}, limit=limit, runtime_kernels=True)
        except Exception as exc:
            errors[name] = f"evaluation failed: {exc}"
            continue
        metrics.setdefault("float", out["float"])
        metrics.update({key: value for key, value in out.items() if key != "float"})
    if "float" not in metrics:
        metrics["float"] = evaluate(artifacts, {}, limit=limit)["float"]
    return metrics, errors


def _attach_metrics(runs: dict[str, dict[str, Any]], metrics: dict[str, dict[str, float]]) -> None:
    from dyadiq.evaluation import RUNTIME_SUFFIX

    for label, values in metrics.items():
        if label == "float":
            continue
        if label.endswith(RUNTIME_SUFFIX):
            runs[label.removesuffix(RUNTIME_SUFFIX)]["metrics_runtime_kernels"] = values
        else:
            runs[label]["metrics"] = values


def _best(runs: dict[str, dict[str, Any]], prefix: str, metric: str) -> str | None:
    """Best QDQ run whose label starts with ``prefix`` (integer-only runs are not candidates)."""
    scored = [
        (r["metrics"][metric], name)
        for name, r in runs.items()
        if name.startswith(prefix)
        and not name.endswith("_integer")
        and r.get("metrics")
        and metric in r["metrics"]
    ]
    if not scored:
        return None
    top = max(s for s, _ in scored)
    return next(name for s, name in scored if s == top)  # first in run order on ties


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _compare(runs: dict[str, dict[str, Any]], ours: str | None, theirs: str | None, metric: str):
    if ours is None or theirs is None:
        return None
    a, b = runs[ours], runs[theirs]
    return {
        "dyadiq": ours,
        "ort": theirs,
        f"{metric}_delta": a["metrics"][metric] - b["metrics"][metric],
        "time_ratio": _ratio(a.get("wall_s"), b.get("wall_s")),
        "peak_rss_ratio": _ratio(a.get("peak_rss_mib"), b.get("peak_rss_mib")),
        "size_ratio": _ratio(a.get("model_bytes"), b.get("model_bytes")),
    }


def measure_latency(
    artifacts: Any, models: dict[str, Path], *, runs: int, warmup: int
) -> dict[str, Any]:
    """Inference latency of each model on the first evaluation batch of the zoo feeds.

    onnxruntime CPU sessions with 2 intra-op threads (as in the evaluation); ``warmup`` calls
    each, then ``runs`` rounds in which every model runs once (round-robin, so load from other
    jobs on the machine hits all models alike). Reports the median and ratios to float.
    """
    from dyadiq.evaluation import _run, _session
    from dyadiq.ort_sessions import Kernels

    feeds, _ = next(iter(artifacts.evaluation_batches(None)))
    # timed as a user deploys them: onnxruntime's optimised graph and fused kernels
    sessions = {label: _session(path, Kernels.RUNTIME) for label, path in models.items()}
    for label, sess in sessions.items():
        for _ in range(warmup):
            _run(sess, feeds, label)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(runs):
        for label, sess in sessions.items():
            t = time.perf_counter()
            _run(sess, feeds, label)
            times[label].append(time.perf_counter() - t)
    median = {label: float(np.median(ts)) * 1e3 for label, ts in times.items()}
    base = median.get("float")
    return {
        "batch": int(next(iter(feeds.values())).shape[0]),
        "threads": 2,
        "warmup": warmup,
        "runs": runs,
        "median_ms": median,
        "min_ms": {label: float(np.min(ts)) * 1e3 for label, ts in times.items()},
        "ratio_to_float": {label: _ratio(m, base) for label, m in median.items()},
    }


def benchmark_model(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from dyadiq import zoo

    log.info("== %s", name)
    t_model = time.perf_counter()
    artifacts = zoo.get(name)
    model_path = Path(artifacts.model_path)
    calib_dir = work / name / "calibration"
    calibration = materialise_calibration(artifacts, calib_dir)
    log.info("  calibration: %s", calibration)
    metric = artifacts.model.primary_metric
    eval_limit = args.eval_limit
    watch = {"timeout_s": args.timeout, "mem_cap_mib": args.mem_cap_mib}

    def spec(
        tool: str,
        method: str,
        wb: int = 8,
        ab: int = 8,
        limit: int | None = None,
        integer: bool = False,
    ):
        label = _label(tool, method, wb, ab, integer) + (f"_n{limit}" if limit is not None else "")
        out = work / name / label
        if tool == "dyadiq":
            output = out / ("model.int.onnx" if integer else "model.qdq.onnx")
        else:
            output = out / "model.onnx"
        return label, {
            "tool": tool,
            "method": method,
            "weight_bits": wb,
            "act_bits": ab,
            "model_path": str(model_path),
            "calib_dir": str(calib_dir),
            "calib_limit": limit,
            "output": str(output),
            "integer": integer,
        }

    runs: dict[str, dict[str, Any]] = {}
    for cal in ORT_CALIBRATORS:
        label, s = spec("ort", cal)
        if (name, cal) in ORT_SKIPS and not args.no_skips:
            runs[label] = {"tool": "ort", "method": cal, "status": ORT_SKIPS[(name, cal)]}
            log.info("  ort      %-10s %s", cal, runs[label]["status"])
            continue
        runs[label] = run_quantization(s, work / name / label / "_run", **watch)
    if name in ORT_DYNAMIC_MODELS:
        label, s = spec("ort", "Dynamic")
        runs[label] = run_quantization(s, work / name / label / "_run", **watch)
    for method in DYADIQ_METHODS:
        label, s = spec("dyadiq", method)
        runs[label] = run_quantization(s, work / name / label / "_run", **watch)
    int_method = INTEGER_METHOD.get(name, INTEGER_DEFAULT_METHOD)
    int_label, s = spec("dyadiq", int_method, integer=True)
    runs[int_label] = run_quantization(s, work / name / int_label / "_run", **watch)

    def ok(labels):
        return {lab: Path(runs[lab]["output"]) for lab in labels if runs[lab]["status"] == "ok"}

    t = time.perf_counter()
    metrics, errors = _evaluate(artifacts, ok(runs), eval_limit)
    eval_s = time.perf_counter() - t
    _attach_metrics(runs, metrics)
    for lab, e in errors.items():
        runs[lab]["status"] = e
    best_w8 = _best(runs, "dyadiq_w8a8_", metric)

    # W4A8 with minmax and with dyadiq's best W8A8 calibrator.
    w4_methods = ["minmax"]
    if best_w8 is not None and runs[best_w8]["method"] != "minmax":
        w4_methods.append(runs[best_w8]["method"])
    w4_labels = []
    for method in w4_methods:
        label, s = spec("dyadiq", method, 4, 8)
        runs[label] = run_quantization(s, work / name / label / "_run", **watch)
        w4_labels.append(label)
    t = time.perf_counter()
    m4, errors4 = _evaluate(artifacts, ok(w4_labels), eval_limit)
    eval_s += time.perf_counter() - t
    _attach_metrics(runs, m4)
    for lab, e in errors4.items():
        runs[lab]["status"] = e

    best_ort = _best(runs, "ort_", metric)
    best_w4 = _best(runs, "dyadiq_w4a8_", metric)

    # Inference latency: float, best ORT, dyadiq QDQ and integer (same calibration), one run.
    latency_models: dict[str, Path] = {"float": model_path}
    roles = {"float": "float"}
    int_run = runs[int_label]
    if best_ort is not None:
        latency_models[best_ort] = Path(runs[best_ort]["output"])
        roles["ort_best"] = best_ort
    if int_run["status"] == "ok":
        qdq_label = int_label.removesuffix("_integer") + "_qdq"
        latency_models[qdq_label] = Path(int_run["output"]).parent / "model.qdq.onnx"
        latency_models[int_label] = Path(int_run["output"])
        roles["dyadiq_qdq"] = qdq_label
        roles["dyadiq_integer"] = int_label
    try:
        latency: dict[str, Any] = measure_latency(
            artifacts, latency_models, runs=LATENCY_RUNS, warmup=LATENCY_WARMUP
        )
    except Exception as exc:
        log.exception("  latency measurement failed")
        latency = {"error": f"{type(exc).__name__}: {exc}"}
    latency["roles"] = roles
    if "median_ms" in latency:
        log.info(
            "  latency (median ms): %s",
            ", ".join(f"{k} {v:.2f}" for k, v in latency["median_ms"].items()),
        )
    int_qdq = runs.get(int_label.removesuffix("_integer"), {})
    integer_cmp = None
    if int_run.get("metrics") and int_qdq.get("metrics"):
        integer_cmp = {
            "integer": int_label,
            "qdq": int_label.removesuffix("_integer"),
            f"{metric}_delta": int_run["metrics"][metric] - int_qdq["metrics"][metric],
        }
    result: dict[str, Any] = {
        "model_path": str(model_path),
        "float_model_bytes": model_path.stat().st_size,
        "calibration": calibration,
        "primary_metric": metric,
        "reported_metrics": list(REPORTED_METRICS[name]),
        "evaluation_limit": eval_limit,
        "float": metrics["float"],
        "runs": runs,
        "best": {
            "ort": best_ort,
            "dyadiq_w8a8": best_w8,
            "dyadiq_w4a8": best_w4,
            "dyadiq_integer_w8a8": int_label,
        },
        "integer_vs_its_qdq": integer_cmp,
        "latency": latency,
        "comparison": {
            "best_vs_best": _compare(runs, best_w8, best_ort, metric),
            "minmax_vs_minmax": _compare(
                runs,
                "dyadiq_w8a8_minmax" if runs["dyadiq_w8a8_minmax"].get("metrics") else None,
                "ort_minmax" if runs["ort_minmax"].get("metrics") else None,
                metric,
            ),
            "w4a8_best_vs_ort_best": _compare(runs, best_w4, best_ort, metric),
        },
        "evaluation_s": eval_s,
    }
    if name == "minilm" and not args.quick:
        result["memory_scaling"] = minilm_scaling(runs, spec, work, watch)
    result["model_wall_s"] = time.perf_counter() - t_model
    for r in runs.values():
        r.pop("output", None)
    return result


def minilm_scaling(runs, spec, work: Path, watch) -> dict[str, Any]:
    """Peak RSS of the same calibration on 64 vs 512 sentences (dyadiq minmax vs ORT MinMax)."""
    small, full = MINILM_SCALING_SAMPLES
    out: dict[str, Any] = {"samples": [small, full], "bound_mib": MINILM_PEAK_BOUND_MIB}
    for tool, method, full_label in (
        ("dyadiq", "minmax", "dyadiq_w8a8_minmax"),
        ("ort", "MinMax", "ort_minmax"),
    ):
        label, s = spec(tool, method, 8, 8, small)
        rec = run_quantization(s, work / "minilm" / label / "_run", **watch)
        rec.pop("output", None)
        big = runs[full_label]
        peaks = {
            str(small): rec.get("peak_rss_mib"),
            str(full): big.get("peak_rss_mib"),
        }
        growth = (
            peaks[str(full)] - peaks[str(small)]
            if None not in (peaks[str(full)], peaks[str(small)])
            else None
        )
        out[tool] = {
            "method": method,
            f"run_{small}": rec,
            "peak_rss_mib": peaks,
            "growth_mib": growth,
            "status": {str(small): rec["status"], str(full): big["status"]},
        }
    dy = out["dyadiq"]["peak_rss_mib"][str(full)]
    out["dyadiq_peak_512_mib"] = dy
    out["bound_holds"] = dy is not None and dy < MINILM_PEAK_BOUND_MIB
    out["claim"] = (
        f"dyadiq calibration of MiniLM over {full} sentences peaks at "
        f"{'?' if dy is None else f'{dy:.0f}'} MiB RSS (bound: < {MINILM_PEAK_BOUND_MIB} MiB, "
        "whole process incl. model load and export); streaming histograms, no stored activations"
    )
    return out


# --- machine info, output ----------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        text = format(x, spec)
        # a negative value that rounds to zero prints as "-0" / "-0.00": drop the sign
        if text.startswith("-") and float(text.replace(",", "")) == 0:
            text = text[1:]
        return text
    return str(x)


def _load_note(data: dict[str, Any]) -> str:
    load = data.get("load_average") or {}
    start = load.get("start")
    if not start:
        return ""
    cpus = data["machine"].get("affinity_cpus") or data["machine"].get("nproc") or 1
    text = "- load average (1 min) before the run " + f"{start[0]:.2f}"
    if load.get("end"):
        text += f", at its end {load['end'][0]:.2f}"
    text += f", on {cpus} CPUs: "
    if start[0] >= 0.5:
        text += (
            "**other jobs were running on the machine during this run**, so absolute times "
            "and latencies are inflated and noisier than on an idle machine (ratios measured "
            "side by side are less affected)."
        )
    else:
        text += "the machine was otherwise idle at the start."
    return text


def render_markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        "# dyadiq vs onnxruntime quantize_static: baseline",
        "",
        f"- date: {data['date']}; command: `{data['command']}`; total wall time "
        f"{data['total_wall_s']:.0f} s",
        f"- machine: {m['cpu_model']}, {m['nproc']} CPUs, {_fmt(m['mem_total_mib'], '.0f')} MiB; "
        f"onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}; git "
        f"{_fmt(m.get('git_commit'))}{' (dirty tree)' if m.get('git_dirty') else ''}",
        *([note] if (note := _load_note(data)) else []),
        "- ORT: `quantize_static` QDQ, per-channel int8 weights, uint8 activations (MinMax, "
        "Percentile, Entropy); on MiniLM also `quantize_dynamic` (int8 weights, activations "
        'quantized at run time) as `ort_dynamic`. "best ORT" is the best of all ORT rows. '
        f"dyadiq: uniform per-channel weights, percentile = {PERCENTILE}. Same calibration "
        "batches for every method; every quantization in a fresh process (time = quantization "
        "call, peak RSS = whole process incl. imports and model load).",
        "- Scoring: every quality figure is an exact simulation (onnxruntime with graph "
        "optimisation off: DequantizeLinear -> float op -> QuantizeLinear as written), the same "
        "on every CPU. The `ORT kernels` column scores the same file with onnxruntime's fused "
        "u8 x s8 kernels on this CPU (CPU flags: "
        f"{' '.join(m.get('cpu_flags', [])) or 'not recorded'}); on AVX2 CPUs without VNNI "
        "those saturate int16 pair sums and score lower.",
        "- dyadiq integer: W8A8 with `integer=True` (percentile; minmax on MiniLM); "
        "`model.int.onnx` (integer-only, dyadic requantization) is evaluated like every other "
        "model. Bit-exact = integer tensors equal to dyadiq's reference interpreter on the "
        "check batches (from report.json).",
        "",
        "## Headline",
        "",
        "| model | metric | float | best ORT | best ORT, ORT kernels | dyadiq W8A8 best | "
        "dyadiq W4A8 best | dyadiq integer W8A8 | bit-exact | delta W8A8 best - ORT best | "
        "quant. time dyadiq / ORT | peak RSS dyadiq / ORT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in data["models"].items():
        if "error" in res:
            lines.append(f"| {name} | error: {res['error']} |||||||||| ")
            continue
        metric = res["primary_metric"]
        runs = res["runs"]
        best = res["best"]

        def cell(label, metric=metric, runs=runs):
            if label is None or not runs.get(label, {}).get("metrics"):
                status = runs.get(label, {}).get("status") if label else None
                return "-" if not status else f"- ({status[:40]})"
            return f"{runs[label]['metrics'][metric]:.4f} ({runs[label]['method']})"

        bo, bd = best["ort"], best["dyadiq_w8a8"]
        bi = best.get("dyadiq_integer_w8a8")
        cmp_ = res["comparison"]["best_vs_best"] or {}
        integer = runs.get(bi, {}).get("integer") or {}
        exact = (
            f"{integer['exact_tensors']}/{integer['tensors']}"
            if integer.get("tensors") is not None
            else "-"
        )
        if integer:
            exact += (
                " (fully integer)"
                if integer.get("fully_integer")
                else (f" ({_fmt(integer.get('float_ops'))} float ops)")
            )
        lines.append(
            f"| {name} | {metric} | {res['float'][metric]:.4f} | {cell(bo)} | "
            f"{_fmt(runs.get(bo, {}).get('metrics_runtime_kernels', {}).get(metric))} | "
            f"{cell(bd)} | "
            f"{cell(best['dyadiq_w4a8'])} | {cell(bi)} | {exact} | "
            f"{_fmt(cmp_.get(f'{metric}_delta'), '+.4f')} | "
            f"{_fmt(cmp_.get('time_ratio'), '.2f')} | {_fmt(cmp_.get('peak_rss_ratio'), '.2f')} |"
        )
    lines += [
        "",
        "Ratios compare dyadiq's best W8A8 run with the best ORT run (quantization wall time "
        "and peak RSS of the quantizing process).",
        "",
        "### Inference latency",
        "",
        f"{data['settings'].get('latency', '')}; ratios to the float model (lower is faster). "
        "The dyadiq QDQ model is the one written next to the integer model (same calibration). "
        "The integer-only model spells its requantization in int64 elementwise ops that "
        "onnxruntime does not fuse, so it is expected to be slower than the QDQ model.",
        "",
        "| model | batch | float (ms) | best ORT / float | dyadiq QDQ / float | "
        "dyadiq integer / float |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in data["models"].items():
        lat = res.get("latency") if "error" not in res else None
        if not lat or "median_ms" not in lat:
            lines.append(f"| {name} | {_fmt((lat or {}).get('error', 'n/a'))} ||||| ")
            continue
        roles, ratio, med = lat["roles"], lat["ratio_to_float"], lat["median_ms"]

        def lcell(role, roles=roles, ratio=ratio, med=med):
            label = roles.get(role)
            if label is None or label not in ratio:
                return "-"
            return f"{_fmt(ratio[label], '.2f')}x ({med[label]:.2f} ms)"

        lines.append(
            f"| {name} | {lat['batch']} | {med['float']:.2f} | {lcell('ort_best')} "
            f"({roles.get('ort_best', '-')}) | {lcell('dyadiq_qdq')} | "
            f"{lcell('dyadiq_integer')} |"
        )
    for name, res in data["models"].items():
        if "error" in res:
            continue
        cols = res["reported_metrics"]
        lines += [
            "",
            f"## {name}",
            "",
            f"float model {res['float_model_bytes']:,} bytes; calibration "
            f"{res['calibration']['samples']} samples in {res['calibration']['batches']} "
            f"batches; evaluation {int(res['float']['samples'])} samples; primary metric "
            f"`{res['primary_metric']}`.",
            "",
            "| method | "
            + " | ".join(cols)
            + f" | {res['primary_metric']} (ORT kernels) | bytes | time (s) | peak RSS (MiB) | "
            "status |",
            "|---|" + "---|" * (len(cols) + 5),
            "| float | "
            + " | ".join(_fmt(res["float"].get(c)) for c in cols)
            + f" | - | {res['float_model_bytes']:,} | - | - | |",
        ]
        for label, r in res["runs"].items():
            met = r.get("metrics", {})
            runtime = r.get("metrics_runtime_kernels", {})
            status = r["status"] if len(r["status"]) < 160 else r["status"][:157] + "..."
            lines.append(
                f"| {label} | "
                + " | ".join(_fmt(met.get(c)) for c in cols)
                + f" | {_fmt(runtime.get(res['primary_metric']))}"
                + f" | {_fmt(r.get('model_bytes'), ',')} | {_fmt(r.get('wall_s'), '.1f')} | "
                f"{_fmt(r.get('peak_rss_mib', r.get('peak_rss_mib_observed')), '.0f')} | "
                f"{status} |"
            )
        comp = res["comparison"]
        lines.append("")
        for key, c in comp.items():
            if c is None:
                lines.append(f"- {key}: n/a")
                continue
            delta = c[f"{res['primary_metric']}_delta"]
            lines.append(
                f"- {key} ({c['dyadiq']} vs {c['ort']}): {res['primary_metric']} delta "
                f"{delta:+.4f}, time ratio {_fmt(c['time_ratio'], '.2f')}, peak RSS ratio "
                f"{_fmt(c['peak_rss_ratio'], '.2f')}, size ratio {_fmt(c['size_ratio'], '.2f')}"
            )
        int_label = res["best"].get("dyadiq_integer_w8a8")
        integer = res["runs"].get(int_label, {}).get("integer")
        if integer:
            ic = res.get("integer_vs_its_qdq") or {}
            lines.append(
                f"- integer ({int_label}): fully integer {integer['fully_integer']}, float ops "
                f"{_fmt(integer['float_ops'])}, bit-exact vs reference "
                f"{_fmt(integer['exact_tensors'])}/{_fmt(integer['tensors'])} tensors over "
                f"{_fmt(integer['check_batches'])} batches; QDQ vs integer: max output diff "
                f"{_fmt(integer['max_output_diff_lsb'], '.2f')} LSB, top-1 agreement "
                f"{_fmt(integer['top1_agreement_qdq_vs_integer'])}; {res['primary_metric']} "
                f"integer - QDQ {_fmt(ic.get(res['primary_metric'] + '_delta'), '+.4f')}"
            )
        lat = res.get("latency") or {}
        if "median_ms" in lat:
            lines.append(
                f"- latency (batch {lat['batch']}, median ms; ratio to float): "
                + ", ".join(
                    f"{k} {v:.2f} ({_fmt(lat['ratio_to_float'][k], '.2f')}x)"
                    for k, v in lat["median_ms"].items()
                )
            )
        scaling = res.get("memory_scaling")
        if scaling:
            small, full = (str(s) for s in scaling["samples"])
            lines += [
                "",
                "### MiniLM calibration peak RSS vs number of sentences",
                "",
                f"| tool | {small} sentences (MiB) | {full} sentences (MiB) | growth (MiB) |",
                "|---|---|---|---|",
            ]
            for tool in ("dyadiq", "ort"):
                s = scaling[tool]
                lines.append(
                    f"| {tool} {s['method']} | {_fmt(s['peak_rss_mib'][small], '.0f')} | "
                    f"{_fmt(s['peak_rss_mib'][full], '.0f')} | {_fmt(s['growth_mib'], '.0f')} |"
                )
            lines += [
                "",
                f"Bound: < {scaling['bound_mib']} MiB; holds: {scaling['bound_holds']}. "
                + scaling["claim"],
            ]
    return "\n".join(lines) + "\n"


def write_results(data: dict[str, Any], output_dir: Path) -> None:
    common.write_results(data, output_dir, "baseline", render_markdown)


# --- entry point -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__)
    p.add_argument("--models", nargs="+", choices=ALL_MODELS, default=None)
    p.add_argument(
        "--quick", action="store_true", help="smoke test: fashion_cnn, 2000 eval samples"
    )
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--work-dir", type=Path, default=None, help="keep quantized models here")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluation samples per model")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per quantization run")
    p.add_argument("--mem-cap-mib", type=float, default=None, help="peak RSS cap per run")
    p.add_argument("--no-skips", action="store_true", help="also run ORT Entropy on MiniLM")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.models is None:
        args.models = ["fashion_cnn"] if args.quick else list(ALL_MODELS)
    if args.quick and args.eval_limit is None:
        args.eval_limit = 2000
    if args.mem_cap_mib is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        args.mem_cap_mib = 0.6 * total
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker is not None:
        _worker(args.worker)
        return None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    command = ".venv/bin/python -m benchmarks.baseline " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command.strip(),
        "machine": common.machine_info(),
        "load_average": {"start": list(os.getloadavg())},
        "settings": {
            "models": args.models,
            "quick": args.quick,
            "evaluation_limit": args.eval_limit,
            "timeout_s": args.timeout,
            "mem_cap_mib": args.mem_cap_mib,
            "dyadiq_percentile": PERCENTILE,
            "dyadiq_integer_method": {
                n: INTEGER_METHOD.get(n, INTEGER_DEFAULT_METHOD) for n in args.models
            },
            "ort": "quantize_static QDQ, per_channel=True, QUInt8 activations, QInt8 weights",
            "ort_dynamic": "quantize_dynamic, QInt8 weights (per tensor), on "
            + ", ".join(ORT_DYNAMIC_MODELS),
            "latency": f"onnxruntime CPU, 2 threads, first evaluation batch, median of "
            f"{LATENCY_RUNS} round-robin runs after {LATENCY_WARMUP} warm-ups",
        },
        "models": {},
    }
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.mkdtemp(prefix="dyadiq-bench-")
        work = Path(tmp)
    else:
        work = args.work_dir
    try:
        for name in args.models:
            try:
                data["models"][name] = benchmark_model(name, work, args)
            except Exception as exc:
                log.exception("model %s failed", name)
                data["models"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            data["load_average"][f"after_{name}"] = list(os.getloadavg())
            data["total_wall_s"] = time.perf_counter() - start
            write_results(data, args.output_dir)  # after every model: partial results survive
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    data["total_wall_s"] = time.perf_counter() - start
    data["load_average"]["end"] = list(os.getloadavg())
    write_results(data, args.output_dir)
    log.info("wrote %s (%.0f s)", args.output_dir / "baseline.json", data["total_wall_s"])
    return data


if __name__ == "__main__":
    main()
