"""Support matrix: real ONNX models from packages, through every CLI stage, as a user runs them.

For each model in ``benchmarks.coverage_models`` (fetched into the cache) and its real data
(``benchmarks.coverage_data``, written as ``.npz`` folders), this runs the installed CLI in a
subprocess with a timeout per stage:

    inspect    dyadiq inspect MODEL [--input-shape ...] --json
    qdq        dyadiq quantize MODEL -o OUT/qdq --calib CALIB [--input-shape ...]    (W8A8)
    integer    ... -o OUT/integer --integer
    x86        ... -o OUT/x86 --target x86
    cortex-m4  ... -o OUT/cortex-m4 --target cortex-m4
    eval       dyadiq eval MODEL QDQ [INT] --data HELD_OUT --json    (the models a stage wrote)

and classifies each stage: ``ok``, ``refused`` (the CLI's one-line error, exit 2), ``not
bit-exact`` (exit 3), ``crashed`` (a Python traceback or any other exit status) or ``timeout``.
Quality is measured here on the held-out split, float model vs the QDQ model (and vs the
integer model where one was written), both in onnxruntime, with a metric chosen by the
output's kind (``CoverageModel.metric``): ``classes`` top-1 agreement and KL of the softmax,
``sequence`` per-step argmax agreement (CTC recognisers), ``embedding`` cosine, ``map``
mean absolute error relative to the float output's range, and SNR (dB) for every output.
The ``eval`` stage runs ``dyadiq eval`` itself on the same held-out folder, with its own
choice of metrics per output (``--output-kind auto``), on the QDQ model of the ``qdq`` stage
and the integer model of the ``integer`` (else ``x86``) stage of this work folder.

Usage: python -m benchmarks.coverage [--models a,b] [--stages inspect,qdq] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, machine_info, write_results
from benchmarks.coverage_data import Feeds, write_split
from benchmarks.coverage_models import BY_NAME, MODELS, CoverageModel, model_path, sha256
from dyadiq.zoo._install import cache_dir

STAGES = ("inspect", "qdq", "integer", "x86", "cortex-m4", "eval")
STAGE_FLAGS = {
    "qdq": [],
    "integer": ["--integer"],
    "x86": ["--target", "x86"],
    "cortex-m4": ["--target", "cortex-m4"],
}
CLI = REPO / ".venv" / "bin" / "dyadiq"
MAP_THRESHOLD = 0.3
_ENV: dict[str, str] = dict(os.environ)
_CLI_COMMIT: list[str] = []  # the snapshot's commit, once use_snapshot chose one


def _cli() -> str:
    return str(CLI) if CLI.is_file() else "dyadiq"


def use_snapshot(rev: str, folder: Path) -> str:
    """Run the CLI from ``git archive REV`` instead of the working tree.

    Others edit the working tree while this runs; a snapshot of a commit is what a user installs.
    The snapshot is laid out as the installed package (``dyadiq.passes`` etc. inside ``dyadiq/``)
    and put first on ``PYTHONPATH``, ahead of the editable install's finder. Returns the commit.
    """
    import shutil

    commit = subprocess.run(
        ["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = folder / commit[:12]
    if not (tree / "dyadiq" / "passes").exists():
        if tree.exists():
            shutil.rmtree(tree)
        src = tree / "src"
        src.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", commit], cwd=REPO, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
        shutil.copytree(src / "dyadiq", tree / "dyadiq")
        for sub in ("passes", "frontends", "backends"):
            shutil.copytree(src / sub, tree / "dyadiq" / sub)
    _ENV["PYTHONPATH"] = str(tree)
    _CLI_COMMIT[:] = [commit]
    return commit


def _last_error_line(text: str) -> str:
    """The CLI's last error message, its wrapped continuation lines joined into one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.lower().startswith(("error", "dyadiq: error"))]
    message = " ".join(lines[starts[-1] :]) if starts else (lines[-1] if lines else "")
    return message[:600]


def _exception_line(stderr: str) -> str:
    """``SomeError: message`` of the last traceback: its first unindented line after the frames."""
    after = stderr.rsplit("Traceback (most recent call last)", 1)[1].splitlines()[1:]
    for line in after:
        if line.strip() and not line.startswith((" ", "\t")):
            return line.strip()[:400]
    return ""


def classify(rc: int | None, stderr: str) -> tuple[str, str]:
    """(status, short reason) of one CLI run."""
    if rc is None:
        return "timeout", ""
    if "Traceback (most recent call last)" in stderr:
        return "crashed", _exception_line(stderr)
    if rc == 0:
        return "ok", ""
    if rc == 2:
        return "refused", _last_error_line(stderr)
    if rc == 3:
        return "not bit-exact", _last_error_line(stderr)
    return "crashed", f"exit status {rc}: {_last_error_line(stderr)}"


def run_stage(cmd: list[str], timeout: float, log: Path) -> dict[str, Any]:
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=_ENV
        )
        rc: int | None = proc.returncode
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = None
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    seconds = time.monotonic() - start
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(
        f"$ {shlex.join(cmd)}\n# exit {rc} after {seconds:.1f} s\n"
        f"--- stdout\n{out}\n--- stderr\n{err}"
    )
    status, reason = classify(
        rc, err + ("\n" + out if rc not in (0, None) and not err.strip() else "")
    )
    return {
        "status": status,
        "reason": reason,
        "seconds": round(seconds, 1),
        "command": shlex.join(cmd),
        "cli_commit": _CLI_COMMIT[0] if _CLI_COMMIT else "working tree",
        "log": str(log),
        "stdout": out,
    }


def _report_facts(out_dir: Path) -> dict[str, Any]:
    """fully-integer / float ops / bit-exactness from the stage's report.json."""
    path = out_dir / "report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    facts: dict[str, Any] = {}
    integer = report.get("integer") or {}
    if integer:
        facts["fully_integer"] = bool(integer.get("fully_integer"))
        facts["float_ops"] = integer.get("float_ops", [])
        exact = integer.get("bit_exact_vs_reference") or {}
        if exact:
            facts["bit_exact"] = exact.get("exact_tensors") == exact.get("tensors")
            facts["bit_exact_detail"] = (
                f"{exact.get('exact_tensors')}/{exact.get('tensors')} tensors"
            )
    target = report.get("target") or {}
    if target:
        exact = target.get("bit_exact_vs_reference")
        if exact:
            facts["target_bit_exact"] = exact.get("exact") == exact.get("inputs")
            facts["target_bit_exact_detail"] = f"{exact.get('exact')}/{exact.get('inputs')} inputs"
        for key in ("float_islands", "flash_bytes", "ram_bytes", "fits", "ran_on", "built"):
            if key in target:
                facts[f"target_{key}"] = target[key]
    return facts


def _written(out_dir: Path) -> list[str]:
    """What the stage left in its output folder (a compiled target is a subfolder)."""
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []


def _inspect_facts(stdout: str) -> dict[str, Any]:
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("op_counts", "summary", "opaque", "refused") if k in data}


# --- quality ----------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def _as_probabilities(x: np.ndarray) -> np.ndarray:
    """Probabilities already (rows in [0, 1] summing to 1) stay; logits get a softmax."""
    sums = x.sum(axis=-1)
    if x.min() >= 0 and np.allclose(sums, 1.0, atol=1e-2):
        return np.clip(x, 1e-12, 1.0)
    return np.clip(_softmax(x), 1e-12, 1.0)


def output_metrics(kind: str, ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Quality of ``out`` against the float ``ref`` (a stack over evaluation inputs)."""
    ref = ref.astype(np.float64)
    out = out.astype(np.float64)
    noise = float(np.mean((ref - out) ** 2))
    power = float(np.mean(ref**2))
    metrics: dict[str, float] = {
        "snr_db": float(10 * np.log10(power / noise)) if noise > 0 else float("inf"),
    }
    flat_r, flat_o = ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1)
    norms = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_o, axis=1)
    metrics["cosine_mean"] = float(
        np.mean(np.sum(flat_r * flat_o, axis=1) / np.maximum(norms, 1e-30))
    )
    if kind in ("classes", "sequence"):
        r, o = ref, out  # classes (or per-step classes of a sequence) on the last axis
        metrics["top1_agreement"] = float(np.mean(r.argmax(-1) == o.argmax(-1)))
        if r.shape[-1] > 1:
            p, q = _as_probabilities(r), _as_probabilities(o)
            metrics["kl"] = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))
    elif kind == "embedding":
        metrics["cosine_min"] = float(
            np.min(np.sum(flat_r * flat_o, axis=1) / np.maximum(norms, 1e-30))
        )
    elif kind == "map":
        span = float(ref.max() - ref.min()) or 1.0
        metrics["mean_abs_error_of_range"] = float(np.mean(np.abs(ref - out)) / span)
        if ref.min() >= 0.0 and ref.max() <= 1.0:  # a probability map: IoU of its 0.3 mask
            # (DBNet's binarisation threshold; for detector score maps, "positive" cells)
            a, b = ref > MAP_THRESHOLD, out > MAP_THRESHOLD
            union = int(np.sum(a | b))
            metrics["mask_iou"] = float(np.sum(a & b) / union) if union else 1.0
    return metrics


def _run_all(path: Path, feeds: list[Feeds]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    outs = [sess.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]
    return [np.concatenate([np.asarray(o[i])[None] for o in outs]) for i in range(len(outs[0]))]


def quality(
    model: CoverageModel, float_path: Path, candidate: Path, feeds: list[Feeds]
) -> dict[str, Any]:
    """Per-output metrics of ``candidate`` against the float model on the held-out feeds."""
    try:
        ref = _run_all(float_path, feeds)
        out = _run_all(candidate, feeds)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    per_output = []
    for i, (r, o) in enumerate(zip(ref, out, strict=False)):
        kind = model.metric if i == 0 or model.metric in ("map", "snr") else "snr"
        if r.dtype.kind not in "fc":  # integer outputs (labels, indices): exact agreement
            per_output.append({"output": i, "exact_match": float(np.mean(r == o))})
            continue
        per_output.append({"output": i, **output_metrics(kind, r, o)})
    return {"inputs": len(feeds), "outputs": per_output}


# --- one model --------------------------------------------------------------------------------


def model_row(model: CoverageModel, work: Path) -> tuple[dict[str, Any], Path | None, list[Feeds]]:
    """The model's facts and its data written as ``.npz`` folders (calibration, held-out)."""
    path = model_path(model, work)
    row: dict[str, Any] = {
        "model": model.name,
        "package": model.requirement,
        "member": model.member,
        "kind": model.kind,
        "description": model.description,
        "real_weights": model.real_weights,
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
        "data": model.data,
        "input_shapes": {k: list(v) for k, v in model.input_shapes.items()},
        "bound_inputs": dict(model.bound_inputs),
        "stages": {},
    }
    try:
        folder = work / "data" / model.name
        calib, _, eval_feeds = write_split(model.data, folder, tuple(model.bound_inputs))
    except Exception as exc:  # a data maker failing is the harness bug, recorded
        row["data_error"] = f"{type(exc).__name__}: {exc}"
        return row, None, []
    return row, calib, eval_feeds


def run_model_stage(
    model: CoverageModel,
    stage: str,
    calib: Path,
    eval_feeds: list[Feeds],
    timeout: float,
    work: Path,
    extra: list[str],
    qdq_extra: list[str],
) -> dict[str, Any]:
    path = model_path(model, work)
    shapes = model.shape_flags()
    out_root = work / "out" / model.name
    if stage == "inspect":
        cmd = [_cli(), "inspect", str(path), *shapes, "--json"]
        result = run_stage(cmd, timeout, out_root / "inspect.log")
        result.update(_inspect_facts(result["stdout"]))
    elif stage == "eval":
        candidates = _eval_candidates(out_root)
        held_out = work / "data" / model.name / "eval"
        cmd = [_cli(), "eval", str(path), *map(str, candidates), "--data", str(held_out)]
        result = run_stage([*cmd, "--json"], timeout, out_root / "eval.log")
        result["evaluated"] = [str(c) for c in candidates]
        if not candidates:
            result.update(status="not run", reason="no quantized model from an earlier stage")
        elif result["status"] == "ok":
            result["eval"] = json.loads(result["stdout"])
    elif stage == "cortex-m4" and (too_large := _flash_refusal(out_root, stage)) is not None:
        result = too_large
    else:
        out_dir = out_root / stage
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)  # a stale output must not pass for this run's
        cmd = [_cli(), "quantize", str(path), "-o", str(out_dir), "--calib", str(calib)]
        cmd += [*shapes, *STAGE_FLAGS[stage], *(extra if stage != "qdq" else qdq_extra)]
        result = run_stage(cmd, timeout, out_root / f"{stage}.log")
        result.update(_report_facts(out_dir))
        result["written"] = _written(out_dir)
        if stage == "qdq" and (out_dir / "model.qdq.onnx").is_file():
            result["quality_qdq"] = quality(model, path, out_dir / "model.qdq.onnx", eval_feeds)
        if stage != "qdq" and (out_dir / "model.int.onnx").is_file():
            result["quality_integer"] = quality(model, path, out_dir / "model.int.onnx", eval_feeds)
    result.pop("stdout", None)
    print(
        f"  {model.name:22s} {stage:10s} {result['status']:14s} {result['seconds']:7.1f}s "
        f"{result['reason'][:120]}",
        flush=True,
    )
    return result


def _flash_refusal(out_root: Path, stage: str) -> dict[str, Any] | None:
    """The stage's refusal when the integer stage of this work folder stored more quantized
    weight bytes than the board has flash: the CLI would quantize the model again only to
    refuse it (``--target cortex-m*`` checks the weights before writing C), so it is not run.
    The verdict is written as a log the way ``run_stage`` writes one (exit 2, the error on
    stderr), so ``--rescore`` reads it back unchanged. None: run the CLI."""
    from dyadiq.backends.mcu.build import cpu_preset

    report = out_root / "integer" / "report.json"
    if not report.is_file():
        return None
    stored = json.loads(report.read_text()).get("sizes", {}).get("quantized_weight_bytes_packed")
    flash = cpu_preset(stage).flash[1]
    if stored is None or stored <= flash:
        return None
    reason = (
        f"error: does not fit in flash ({stored / 1024:.0f} KB > {flash / 1024:.0f} KB): "
        f"{stored} bytes of quantized weights > {flash} bytes of flash on {stage}, from the "
        f"integer stage's report.json (sizes.quantized_weight_bytes_packed); CLI not run"
    )
    command = f"(not run: {report} says {stored} weight bytes > {flash} bytes of flash)"
    if (out_root / stage).exists():  # an earlier run's output must not pass for this verdict
        import shutil

        shutil.rmtree(out_root / stage)
    log = out_root / f"{stage}.log"
    log.write_text(f"$ {command}\n# exit 2 after 0.0 s\n--- stdout\n\n--- stderr\n{reason}\n")
    status, why = classify(2, reason)
    return {
        "status": status,
        "reason": why,
        "seconds": 0.0,
        "command": command,
        "cli_commit": _CLI_COMMIT[0] if _CLI_COMMIT else "working tree",
        "log": str(log),
        "written": [],
        "sized_from": str(report),
        "quantized_weight_bytes": stored,
        "flash_bytes_available": flash,
    }


def _eval_candidates(out_root: Path) -> list[Path]:
    """The QDQ model of the qdq stage and the integer model of the integer or x86 stage."""
    found = []
    for stage, name in (("qdq", "model.qdq.onnx"), ("integer", "model.int.onnx")):
        for folder in (stage, "x86"):
            if (out_root / folder / name).is_file():
                found.append(out_root / folder / name)
                break
    return found


def _eval_headline(result: dict[str, Any]) -> str:
    """``dyadiq eval``'s kind and headline metric per evaluated model (first output)."""
    data = result.get("eval")
    if not data:
        return "-"
    kinds = data.get("kinds", {})
    first_output, first_kind = next(iter(kinds.items()), ("", "?"))
    parts = []
    for name, metrics in data.items():
        # one output: keyed by model; several: "model: output" (the first output's only)
        if name == "kinds" or (len(kinds) > 1 and not name.endswith(f": {first_output}")):
            continue
        short = "qdq" if ".qdq." in name else "int" if ".int." in name else name
        for key in ("top1_agreement", "mean_cosine", "iou", "mean_abs_error"):
            if key in metrics:
                parts.append(f"{short} {key} {metrics[key]:.3f}, SNR {metrics['snr_db']:.1f} dB")
                break
    return f"[{first_kind}] " + "; ".join(parts)


# --- rendering --------------------------------------------------------------------------------


def _headline_quality(q: dict[str, Any] | None) -> str:
    if not q:
        return "-"
    if "error" in q:
        return f"error: {q['error'][:60]}"
    first = q["outputs"][0]
    for key, label in (
        ("mask_iou", "mask IoU"),
        ("top1_agreement", "top-1 agr"),
        ("cosine_min", "cos min"),
        ("mean_abs_error_of_range", "MAE/range"),
    ):
        if key in first:
            extra = f", KL {first['kl']:.3g}" if "kl" in first else ""
            return f"{label} {first[key]:.3f}{extra}, SNR {first['snr_db']:.1f} dB"
    if "snr_db" in first:
        return f"SNR {first['snr_db']:.1f} dB, cos {first['cosine_mean']:.4f}"
    return json.dumps(first)


def _yes_no(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _cell(stage: dict[str, Any] | None) -> str:
    if not stage:
        return "not run"
    reason = f" ({stage['reason']})" if stage.get("reason") else ""
    if "--compensate none" in stage.get("command", ""):
        reason += " [--compensate none]"
    if stage["status"] != "ok" and stage.get("written"):
        reason += f" [written anyway: {', '.join(stage['written'])}]"
    return f"{stage['status']}{reason}".replace("|", "\\|").replace("\n", " ")


def _bound(row: dict[str, Any]) -> str:
    bound = row.get("bound_inputs") or {}
    return "".join(f"; input {k} bound to {v}" for k, v in bound.items())


def render(data: dict[str, Any]) -> str:
    rows = data["models"]
    lines = [
        "# Support matrix: real ONNX models from packages through every stage",
        "",
        "Commands (later ones rerun or add stages):",
        "",
        *(f"    {c}" for c in data.get("commands", [data["command"]])),
        "",
        f"Machine: {data['machine']['cpu_model']}, {data['machine']['nproc']} cores, load average "
        f"at start {', '.join(f'{v:.1f}' for v in data['machine']['load_avg_start'])} (shared with "
        f"other jobs), commit {data['machine']['git_commit']}"
        + (" (+ uncommitted changes)" if data["machine"]["git_dirty"] else "")
        + f"; {data['seconds']:.0f} s in all, timeout {data['timeout_s']:.0f} s per stage."
        + (
            f" CLI run from a snapshot of commit {data['cli_commit']}."
            if data.get("cli_commit")
            else ""
        ),
        "",
        "Each stage is the installed CLI in a subprocess: `ok`, `refused` (its one-line error), "
        "`not bit-exact` (exit 3), `crashed` (a traceback or any other exit status) or `timeout`. "
        "Quality is float vs quantized in onnxruntime on held-out real inputs, disjoint from "
        "calibration, computed by this script; the `eval` stage is `dyadiq eval MODEL QUANTIZED "
        "--data HELD_OUT` itself, [its metric choice] then the first output of each model. "
        "Models marked * have dummy "
        "weights (the onnx wheel's test architectures): op coverage only, not counted among the "
        "real models. A cortex-m4 `refused (does not fit in flash ...; CLI not run)` is the "
        "integer stage's stored weight bytes (its report.json) against the board's flash: "
        "`--target cortex-m4` refuses such a model itself before writing any C "
        "(backends/mcu/target.py), so the CLI is not run again only to say so.",
        "",
        "## Counts per stage",
        "",
        "| stage | ok | refused | not bit-exact | crashed | timeout | not run |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage in data["stages"]:
        counts = {s: 0 for s in ("ok", "refused", "not bit-exact", "crashed", "timeout", "not run")}
        for row in rows:
            st = row["stages"].get(stage)
            counts[st["status"] if st else "not run"] += 1
        lines.append(f"| {stage} | " + " | ".join(str(v) for v in counts.values()) + " |")
    lines += ["", "## Models", "", "| model | kind | package (file) | data |", "|---|---|---|---|"]
    for row in rows:
        star = "" if row["real_weights"] else " *"
        lines.append(
            f"| {row['model']}{star} | {row['kind']} | `{row['package']}` "
            f"(`{row['member']}`) | {row['data']}{_bound(row)} |"
        )
    lines += [
        "",
        "## Stages",
        "",
        "| model | stage | result | fully integer | bit-exact | quality vs float | s | CLI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "data_error" in row:
            lines.append(f"| {row['model']} | data | harness error: {row['data_error']} | | | | |")
            continue
        for stage in data["stages"]:
            st = row["stages"].get(stage)
            if not st:
                continue
            q = st.get("quality_qdq") or st.get("quality_integer")
            headline = _eval_headline(st) if stage == "eval" else _headline_quality(q)
            exact = st.get("target_bit_exact", st.get("bit_exact"))
            integer = st.get("fully_integer") if stage != "qdq" else None
            lines.append(
                f"| {row['model']} | {stage} | {_cell(st)} | {_yes_no(integer)} | "
                f"{_yes_no(exact)} | {headline} | {st['seconds']:.0f} | "
                f"{st.get('cli_commit', data.get('cli_commit', 'working tree'))[:12]} |"
            )
    superseded = [(row["model"], st) for row in rows for st in row.get("superseded", [])]
    if superseded:
        lines += [
            "",
            "## Earlier runs of a stage that a later run replaced above",
            "",
            "| model | stage | result | s | command |",
            "|---|---|---|---|---|",
        ]
        for model, st in superseded:
            lines.append(
                f"| {model} | {st['stage']} | {_cell(st)} | {st['seconds']:.0f} | "
                f"`{st['command'].split(' quantize ')[-1][:160]}` |"
            )
    for title, paragraphs in data.get("notes", {}).items():  # follow-ups, kept across merges
        lines += ["", f"## {title}", "", *(p for para in paragraphs for p in (para, ""))][:-1]
    lines += [
        "",
        "Per-stage logs (command, exit status, full output) are under the work folder "
        f"`{data['work']}`; the JSON beside this file holds every metric per output.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="support matrix over real packaged ONNX models")
    parser.add_argument("--models", default="", help=f"comma-separated subset of {list(BY_NAME)}")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per stage")
    parser.add_argument("--work", type=Path, default=cache_dir().parent / "coverage-runs")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--stem", default="coverage")
    parser.add_argument(
        "--stage-flags",
        default="",
        help="extra quantize flags for the integer / target stages (e.g. '--compensate none')",
    )
    parser.add_argument(
        "--qdq-flags", default="", help="extra quantize flags for the qdq stage only"
    )
    parser.add_argument(
        "--merge",
        nargs="*",
        default=[],
        metavar="JSON",
        help="earlier results whose stages this run keeps unless it reruns them",
    )
    parser.add_argument(
        "--snapshot",
        default="",
        metavar="REV",
        help="run the CLI of this commit (git archive), not the working tree",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="only recompute the quality of the outputs the --merge results point to",
    )
    parser.add_argument(
        "--merge-only",
        action="store_true",
        help="only merge the --merge results (figures as their runs computed them)",
    )
    args = parser.parse_args(argv)
    if args.rescore or args.merge_only:
        rescore(args.merge, args.work, args.output, args.stem, recompute=not args.merge_only)
        return
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {STAGES}")
    models = [BY_NAME[n] for n in args.models.split(",") if n] or list(MODELS)
    data: dict[str, Any] = {
        "command": "python -m benchmarks.coverage "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "stages": list(stages),
        "timeout_s": args.timeout,
        "work": str(args.work),
        "models": [],
        "seconds": 0.0,
    }
    if args.snapshot:
        data["cli_commit"] = use_snapshot(args.snapshot, args.work / "snapshots")
    previous = [json.loads(Path(f).read_text()) for f in args.merge]
    rows: dict[str, dict[str, Any]] = {}
    for old in previous:  # earlier runs fill in the stages this one does not rerun
        data["commands"] = [*data.get("commands", []), *old.get("commands", [old["command"]])]
        for row in old["models"]:
            rows.setdefault(row["model"], row)["stages"].update(row["stages"])
        data["stages"] = [s for s in STAGES if s in {*data["stages"], *old["stages"]}]
    data["commands"] = [*data.get("commands", []), data["command"]]
    start = time.monotonic()
    inputs: dict[str, tuple[Path | None, list[Feeds]]] = {}
    for model in models:
        row, calib, eval_feeds = model_row(model, args.work)
        row["stages"] = {**rows.get(model.name, {}).get("stages", {})}
        rows[model.name] = row
        inputs[model.name] = (calib, eval_feeds)
    data["models"] = list(rows.values())
    write_results(data, args.output, args.stem, render)
    for stage in stages:  # stage by stage: a run cut short still has whole columns
        for model in models:
            calib, eval_feeds = inputs[model.name]
            if calib is None:
                continue
            result = run_model_stage(
                model,
                stage,
                calib,
                eval_feeds,
                args.timeout,
                args.work,
                args.stage_flags.split(),
                args.qdq_flags.split(),
            )
            rows[model.name]["stages"][stage] = result
            data["seconds"] = previous_seconds(previous) + time.monotonic() - start
            data["machine"]["load_avg_end"] = list(os.getloadavg())
            write_results(data, args.output, args.stem, render)  # partial results survive


def rescore(
    files: list[str], work: Path, output: Path, stem: str, *, recompute: bool = True
) -> None:
    """Recompute every quality entry of earlier results from the models they wrote (the
    metrics changed, the quantized models did not); writes the merged results. Without
    ``recompute`` the files are only merged (later stages win, earlier ones are listed)."""
    data: dict[str, Any] = {}
    for f in files:
        old = json.loads(Path(f).read_text())
        if not data:
            data = old
            data["commands"] = old.get("commands", [old["command"]])
            continue
        data["commands"] += old.get("commands", [old["command"]])
        data["notes"] = {**data.get("notes", {}), **old.get("notes", {})}
        data["seconds"] += old.get("seconds", 0.0)
        by_name = {r["model"]: r for r in data["models"]}
        for row in old["models"]:
            kept = by_name.setdefault(row["model"], row)
            if kept is row:
                continue
            # the later run's facts about the model win (e.g. the inputs it binds)
            kept.update({k: v for k, v in row.items() if k not in ("stages", "superseded")})
            for name, result in row["stages"].items():  # the later run wins; the earlier is shown
                earlier = kept["stages"].get(name)
                same = earlier is not None and all(
                    earlier.get(k) == result.get(k) for k in ("log", "seconds")
                )  # the same run, merged twice (an interim merge and its source file)
                listed = kept.setdefault("superseded", [])
                if (
                    earlier is not None
                    and not same
                    and not any(e.get("log") == earlier.get("log") for e in listed)
                ):
                    listed.append({"stage": name, **earlier})
                kept["stages"][name] = result
        order = {m.name: i for i, m in enumerate(MODELS)}
        data["models"] = sorted(by_name.values(), key=lambda r: order[r["model"]])
        data["stages"] = [s for s in STAGES if s in {*data["stages"], *old["stages"]}]
    data["commands"] = list(dict.fromkeys(data["commands"]))  # a file merged twice: once
    for row in data["models"]:  # a run listed as replaced that is the current one after all
        current = {st.get("log") for st in row["stages"].values()}
        if row.get("superseded"):
            row["superseded"] = [e for e in row["superseded"] if e.get("log") not in current]
    if not recompute:
        data["commands"].append(
            "python -m benchmarks.coverage --merge-only --merge " + " ".join(files)
        )
        write_results(data, output, stem, render)
        return
    for row in data["models"]:
        for stage in row["stages"].values():  # verdicts again from the logs (the CLI's stderr)
            log = Path(stage["log"]).read_text()
            rc_text = log.splitlines()[1].split()[2]
            stage["status"], stage["reason"] = classify(
                None if rc_text == "None" else int(rc_text), log.split("--- stderr\n", 1)[1]
            )
            out_dir = Path(stage["log"]).parent / Path(stage["log"]).stem
            if Path(stage["log"]).stem != "inspect":
                stage.update(_report_facts(out_dir))
                stage["written"] = _written(out_dir)
        model = BY_NAME[row["model"]]
        rescore_dir = work / "rescore" / model.name
        _, _, eval_feeds = write_split(model.data, rescore_dir, tuple(model.bound_inputs))
        for stage in row["stages"].values():
            out_dir = Path(stage["log"]).parent / Path(stage["log"]).stem
            # the qdq stage's QDQ model; the integer model of any stage that wrote one
            key, name = (
                ("quality_qdq", "model.qdq.onnx")
                if out_dir.name == "qdq"
                else ("quality_integer", "model.int.onnx")
            )
            if (out_dir / name).is_file():
                stage[key] = quality(model, model_path(model, work), out_dir / name, eval_feeds)
    data["commands"].append("python -m benchmarks.coverage --rescore --merge " + " ".join(files))
    write_results(data, output, stem, render)


def previous_seconds(previous: list[dict[str, Any]]) -> float:
    return float(sum(old.get("seconds", 0.0) for old in previous))


if __name__ == "__main__":
    main()
