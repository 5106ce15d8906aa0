"""dyadiq against onnxruntime's ``quantize_static`` on the zoo models, in one run.

For each zoo model the calibration batches are materialised once (``.npz`` files) and every
method calibrates on exactly those. Each quantization runs in a fresh worker process (this
module with ``--worker``), so its wall time and peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``
at its end: interpreter, imports, model loading, calibration and export) are its own. The
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
import platform
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"
ALL_MODELS = ("fashion_cnn", "mobilenet_v2", "ppocr_cls", "minilm")
ORT_CALIBRATORS = ("MinMax", "Percentile", "Entropy")
DYADIQ_METHODS = ("minmax", "percentile", "mse", "entropy")
PERCENTILE = 99.99
# The metric that ranks methods for each model (higher is better).
PRIMARY_METRIC = {
    "fashion_cnn": "accuracy",
    "ppocr_cls": "accuracy",
    "mobilenet_v2": "top1_agreement",
    "minilm": "mean_cosine",
}
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
MINILM_SCALING_SAMPLES = (64, 512)
MINILM_PEAK_BOUND_MIB = 1500

log = logging.getLogger("benchmarks.baseline")


# --- worker (runs in a fresh process) ----------------------------------------------------------


def _peak_rss_mib() -> float:
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
    if spec["tool"] == "ort":
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
        quantize(
            Path(spec["model_path"]),
            out_dir,
            _npz_batches(Path(spec["calib_dir"]), spec["calib_limit"]),
            weight_bits=spec["weight_bits"],
            act_bits=spec["act_bits"],
            config=CalibrationConfig(method=RangeMethod(spec["method"]), percentile=PERCENTILE),
        )
        result["wall_s"] = time.perf_counter() - t0
        report = json.loads((out_dir / "report.json").read_text())
        result["dyadiq_timings"] = report.get("timings")
        result["calibration_batches"] = report.get("calibration_batches")
    result["peak_rss_mib"] = _peak_rss_mib()
    result["peak_above_imports_mib"] = result["peak_rss_mib"] - result["rss_after_imports_mib"]
    Path(spec["result"]).write_text(json.dumps(result))


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
        "  %-8s %-10s W%sA%s: %s (%.1fs, peak %.0f MiB)",
        record["tool"],
        record["method"],
        record["weight_bits"],
        record["act_bits"],
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


def _label(tool: str, method: str, weight_bits: int = 8, act_bits: int = 8) -> str:
    if tool == "ort":
        return f"ort_{method.lower()}"
    return f"dyadiq_w{weight_bits}a{act_bits}_{method}"


def _evaluate(
    artifacts: Any, candidates: dict[str, Path], limit: int | None
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Evaluate all candidates at once; if that fails, one by one to isolate the failure."""
    from dyadiq.evaluation import evaluate

    try:
        return evaluate(artifacts, candidates, limit=limit), {}
    except Exception as exc:
        log.warning("  joint evaluation failed (%s); evaluating one by one", exc)
    metrics: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for name, path in candidates.items():
        try:
            out = evaluate(artifacts, {name: path}, limit=limit)
        except Exception as exc:
            errors[name] = f"evaluation failed: {exc}"
            continue
        metrics.setdefault("float", out["float"])
        metrics[name] = out[name]
    if "float" not in metrics:
        metrics["float"] = evaluate(artifacts, {}, limit=limit)["float"]
    return metrics, errors


def _best(runs: dict[str, dict[str, Any]], prefix: str, metric: str) -> str | None:
    scored = [
        (r["metrics"][metric], name)
        for name, r in runs.items()
        if name.startswith(prefix) and r.get("metrics") and metric in r["metrics"]
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


def benchmark_model(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from dyadiq import zoo

    log.info("== %s", name)
    t_model = time.perf_counter()
    artifacts = zoo.get(name)
    model_path = Path(artifacts.model_path)
    calib_dir = work / name / "calibration"
    calibration = materialise_calibration(artifacts, calib_dir)
    log.info("  calibration: %s", calibration)
    metric = PRIMARY_METRIC[name]
    eval_limit = args.eval_limit
    watch = {"timeout_s": args.timeout, "mem_cap_mib": args.mem_cap_mib}

    def spec(tool: str, method: str, wb: int = 8, ab: int = 8, limit: int | None = None):
        label = _label(tool, method, wb, ab) + (f"_n{limit}" if limit is not None else "")
        out = work / name / label
        output = out / "model.qdq.onnx" if tool == "dyadiq" else out / "model.onnx"
        return label, {
            "tool": tool,
            "method": method,
            "weight_bits": wb,
            "act_bits": ab,
            "model_path": str(model_path),
            "calib_dir": str(calib_dir),
            "calib_limit": limit,
            "output": str(output),
        }

    runs: dict[str, dict[str, Any]] = {}
    for cal in ORT_CALIBRATORS:
        label, s = spec("ort", cal)
        if (name, cal) in ORT_SKIPS and not args.no_skips:
            runs[label] = {"tool": "ort", "method": cal, "status": ORT_SKIPS[(name, cal)]}
            log.info("  ort      %-10s %s", cal, runs[label]["status"])
            continue
        runs[label] = run_quantization(s, work / name / label / "_run", **watch)
    for method in DYADIQ_METHODS:
        label, s = spec("dyadiq", method)
        runs[label] = run_quantization(s, work / name / label / "_run", **watch)

    def ok(labels):
        return {lab: Path(runs[lab]["output"]) for lab in labels if runs[lab]["status"] == "ok"}

    t = time.perf_counter()
    metrics, errors = _evaluate(artifacts, ok(runs), eval_limit)
    eval_s = time.perf_counter() - t
    for lab, m in metrics.items():
        if lab != "float":
            runs[lab]["metrics"] = m
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
    for lab, m in m4.items():
        if lab != "float":
            runs[lab]["metrics"] = m
    for lab, e in errors4.items():
        runs[lab]["status"] = e

    best_ort = _best(runs, "ort_", metric)
    best_w4 = _best(runs, "dyadiq_w4a8_", metric)
    result: dict[str, Any] = {
        "model_path": str(model_path),
        "float_model_bytes": model_path.stat().st_size,
        "calibration": calibration,
        "primary_metric": metric,
        "reported_metrics": list(REPORTED_METRICS[name]),
        "evaluation_limit": eval_limit,
        "float": metrics["float"],
        "runs": runs,
        "best": {"ort": best_ort, "dyadiq_w8a8": best_w8, "dyadiq_w4a8": best_w4},
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


def machine_info() -> dict[str, Any]:
    import onnx
    import onnxruntime

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    git = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "mem_total_mib": mem_total,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "git_commit": git or None,
        "git_dirty": bool(dirty),
    }


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def render_markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        "# dyadiq vs onnxruntime quantize_static: baseline",
        "",
        f"- date: {data['date']}; command: `{data['command']}`; total wall time "
        f"{data['total_wall_s']:.0f} s",
        f"- machine: {m['cpu_model']}, {m['nproc']} CPUs, {_fmt(m['mem_total_mib'], '.0f')} MiB; "
        f"onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}",
        "- ORT: `quantize_static` QDQ, per-channel int8 weights, uint8 activations. dyadiq: "
        f"uniform per-channel weights, percentile = {PERCENTILE}. Same calibration batches for "
        "every method; every quantization in a fresh process (time = quantization call, peak "
        "RSS = whole process incl. imports and model load).",
        "",
        "## Headline",
        "",
        "| model | metric | float | best ORT | dyadiq W8A8 best | dyadiq W4A8 best | "
        "delta (W8A8-ORT) | time ORT / dyadiq (s) | peak ORT / dyadiq (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in data["models"].items():
        if "error" in res:
            lines.append(f"| {name} | error: {res['error']} |||||||| ")
            continue
        metric = res["primary_metric"]
        runs = res["runs"]
        best = res["best"]

        def cell(label, metric=metric, runs=runs):
            if label is None:
                return "-"
            return f"{runs[label]['metrics'][metric]:.4f} ({runs[label]['method']})"

        bo, bd = best["ort"], best["dyadiq_w8a8"]
        cmp_ = res["comparison"]["best_vs_best"] or {}
        times = (
            f"{_fmt(runs[bo].get('wall_s') if bo else None, '.1f')} / "
            f"{_fmt(runs[bd].get('wall_s') if bd else None, '.1f')}"
        )
        peaks = (
            f"{_fmt(runs[bo].get('peak_rss_mib') if bo else None, '.0f')} / "
            f"{_fmt(runs[bd].get('peak_rss_mib') if bd else None, '.0f')}"
        )
        lines.append(
            f"| {name} | {metric} | {res['float'][metric]:.4f} | {cell(bo)} | {cell(bd)} | "
            f"{cell(best['dyadiq_w4a8'])} | {_fmt(cmp_.get(f'{metric}_delta'), '+.4f')} | "
            f"{times} | {peaks} |"
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
            "| method | " + " | ".join(cols) + " | bytes | time (s) | peak RSS (MiB) | status |",
            "|---|" + "---|" * (len(cols) + 4),
            "| float | "
            + " | ".join(_fmt(res["float"].get(c)) for c in cols)
            + f" | {res['float_model_bytes']:,} | - | - | |",
        ]
        for label, r in res["runs"].items():
            met = r.get("metrics", {})
            status = r["status"] if len(r["status"]) < 160 else r["status"][:157] + "..."
            lines.append(
                f"| {label} | "
                + " | ".join(_fmt(met.get(c)) for c in cols)
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
    from dyadiq.io import write_text_atomic

    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / "baseline.json", json.dumps(data, indent=2, default=str) + "\n")
    write_text_atomic(output_dir / "baseline.md", render_markdown(data))


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
        "machine": machine_info(),
        "settings": {
            "models": args.models,
            "quick": args.quick,
            "evaluation_limit": args.eval_limit,
            "timeout_s": args.timeout,
            "mem_cap_mib": args.mem_cap_mib,
            "dyadiq_percentile": PERCENTILE,
            "ort": "quantize_static QDQ, per_channel=True, QUInt8 activations, QInt8 weights",
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
            data["total_wall_s"] = time.perf_counter() - start
            write_results(data, args.output_dir)  # after every model: partial results survive
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    data["total_wall_s"] = time.perf_counter() - start
    write_results(data, args.output_dir)
    log.info("wrote %s (%.0f s)", args.output_dir / "baseline.json", data["total_wall_s"])
    return data


if __name__ == "__main__":
    main()
