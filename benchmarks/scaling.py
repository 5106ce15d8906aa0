"""Sensitivity analysis scale-out: the same analysis serially, on a local Ray with 1 and 2
workers, and on a two-node Ray cluster started on this machine (``ray start --head`` plus a
second ``ray start --address`` on loopback, one CPU each); every report must equal the serial
one (all fields but the wall time), and each run's wall time is recorded. Also the analysis'
task count and its growth with layers and candidate widths (counted from the graph, nothing
run).

The analysis is the one the issue sizes: empirical damage at all five widths (2/3/4/6/8) plus
activation sites at 4 and 8 bits, no trace, no pairs, 8 samples (``--samples``), uncached.
The serial run uses onnxruntime with 2 threads (the default); each Ray worker 1 thread. Ray's
start-up (``ray.init`` or connecting to the cluster) is timed apart from the analysis.

Every Ray here runs with ``RAY_AUTH_MODE=disabled`` (token authentication is for clusters that
other machines reach; these listen on this machine; and a driver cannot mix the two modes).
The cluster has a temp dir of its own; its
processes are stopped by process id at the end, never by ``ray stop`` (which stops every Ray
on the machine).

    .venv/bin/python -m benchmarks.scaling                      # MobileNetV2, into results/
    .venv/bin/python -m benchmarks.scaling --model fashion_cnn --samples 64 \\
        --output-dir /tmp/scaling                                # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import common

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"
BITS = (2, 3, 4, 6, 8)
ACTIVATION_BITS = (4, 8)
OUTPUT_KIND = {
    "fashion_cnn": "LOGITS",
    "mobilenet_v2": "LOGITS",
    "ppocr_cls": "PROBABILITIES",
    "minilm": "EMBEDDING",
}
WIDTH_SETS = ((4, 8), (2, 4, 8), (2, 3, 4, 6, 8))
RAY = Path(sys.executable).with_name("ray")

log = logging.getLogger("benchmarks.scaling")


def analysis_config() -> Any:
    from dyadiq.passes.sensitivity.analysis import SensitivityConfig

    return SensitivityConfig(
        weight_bits=BITS,
        trace=False,
        pairs=False,
        entropy=False,
        activations=True,
        activation_bits=ACTIVATION_BITS,
    )


# --- task counts -------------------------------------------------------------------------------


def task_counts(graph: Any, layers: list[str], widths: tuple[int, ...]) -> dict[str, Any]:
    """Tasks of an analysis over ``layers`` at ``widths`` (SensitivityConfig's defaults for
    everything else): single layers, activation sites, Hutchinson probes (first round and the
    cap), pair terms (structural pairs + pairs among the top 8, an upper bound)."""
    from dyadiq.passes.activation_sites import find_activation_sites
    from dyadiq.passes.sensitivity.pairs import structural_pairs
    from dyadiq.passes.sensitivity.report import SensitivityConfig
    from dyadiq.plan import PrecisionPlan

    config = SensitivityConfig(weight_bits=widths)
    chosen = set(layers)
    outputs = {t.name for t in graph.graph.outputs}
    tensors = graph.tensors()
    sites = [
        t
        for t in find_activation_sites(graph, PrecisionPlan.uniform(graph)).tensors
        if t not in outputs and any(c.name in chosen for c in tensors[t].outputs)
    ]
    if len(layers) <= config.all_pairs_up_to:
        pairs = len(layers) * (len(layers) - 1) // 2
    else:
        top = min(config.top_k_pairs, len(layers))
        pairs = len(structural_pairs(graph, layers)) + top * (top - 1) // 2
    pair_widths = [b for b in config.pair_bits if b in widths] or [min(widths)]
    return {
        "layers": len(layers),
        "widths": list(widths),
        "single_layer": len(layers) * len(widths),
        "activation_sites": len(sites) * len(config.activation_bits),
        "trace_first_round": len(layers) * config.hutchinson_min_iters,
        "trace_at_most": len(layers) * config.hutchinson_max_iters,
        "pair_layer_pairs_at_most": pairs,
        "pair_tasks_at_most": pairs * len(pair_widths) ** 2,
    }


def growth(graph: Any) -> list[dict[str, Any]]:
    """Task counts for the first quarter, half and all of the weighted layers, at each width
    set of ``WIDTH_SETS``."""
    layers = [n.name for n in graph.weighted_layers()]
    sizes = sorted({max(2, len(layers) // 4), max(2, len(layers) // 2), len(layers)})
    return [task_counts(graph, layers[:k], w) for k, w in itertools.product(sizes, WIDTH_SETS)]


# --- runs --------------------------------------------------------------------------------------


def comparable(report: Any) -> dict[str, Any]:
    data: dict[str, Any] = report.to_json()
    data.pop("seconds")
    return data


def timed_analysis(graph: Any, batches: list[Any], kind: Any, make: Any) -> dict[str, Any]:
    """One uncached analysis on the executor ``make()`` returns: its start-up and analysis
    wall times and its report (comparable form)."""
    from dyadiq.passes.sensitivity.analysis import analyze

    t = time.perf_counter()
    executor = make()
    startup = time.perf_counter() - t
    try:
        t = time.perf_counter()
        report = analyze(graph, batches, kind, analysis_config(), executor=executor)
        seconds = time.perf_counter() - t
    finally:
        executor.close()
    return {
        "startup_s": startup,
        "analysis_s": seconds,
        "workers": executor.workers,
        "forward_passes": report.forward_passes,
        "report": comparable(report),
    }


def _ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _processes_under(temp_dir: str) -> list[int]:
    """Ids of this cluster's processes: those naming its temp dir, and their children."""
    import psutil

    found = [
        p
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(temp_dir in part for part in (p.info["cmdline"] or []))
    ]
    ids = {p.pid for p in found}
    for p in found:
        with contextlib.suppress(psutil.Error):
            ids |= {c.pid for c in p.children(recursive=True)}
    return sorted(ids)


def _stop(pids: list[int]) -> None:
    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        _, alive = psutil.wait_procs(
            [psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10
        )
        pids = [p.pid for p in alive]
        if not pids:
            return


@contextlib.contextmanager
def loopback_cluster(port: int, nodes: int = 2, cpus: int = 1) -> Iterator[str]:
    """A Ray cluster of ``nodes`` nodes of ``cpus`` CPUs on this machine; yields its address."""
    temp_dir = tempfile.mkdtemp(prefix="dq-scaling-ray-")
    address = f"127.0.0.1:{port}"
    common_flags = ["--num-cpus", str(cpus), "--disable-usage-stats"]
    try:
        head = ["--head", "--port", str(port), "--temp-dir", temp_dir, "--include-dashboard"]
        subprocess.run(
            [str(RAY), "start", *head, "false", *common_flags],
            check=True,
            env=_ray_env(),
            capture_output=True,
        )
        for _ in range(nodes - 1):
            subprocess.run(
                [str(RAY), "start", "--address", address, *common_flags],
                check=True,
                env=_ray_env(),
                capture_output=True,
            )
        yield address
    finally:
        _stop(_processes_under(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dyadiq import zoo
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.sensitivity.executor import RayExecutor, SerialExecutor
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind
    from dyadiq.pipeline import prepare_graph

    # one authentication mode for every Ray this process starts or joins: a driver that ran a
    # token-authenticated local Ray cannot run actors on the cluster afterwards
    os.environ["RAY_AUTH_MODE"] = "disabled"
    artifacts = zoo.get(args.model)
    graph = prepare_graph(load_onnx(artifacts.model_path))
    batches = list(artifacts.calibration_batches(args.samples))
    kind = OutputKind[OUTPUT_KIND[args.model]]
    layers = [n.name for n in graph.weighted_layers()]
    result: dict[str, Any] = {
        "model": args.model,
        "samples": args.samples,
        "config": analysis_config().to_json(),
        "tasks": task_counts(graph, layers, BITS),
        "growth": growth(graph),
        "runs": {},
    }
    runs = result["runs"]
    log.info("serial")
    runs["serial"] = timed_analysis(graph, batches, kind, SerialExecutor)
    for workers in args.workers:
        log.info("local Ray, %d worker(s)", workers)
        # Ray is started by the executor (and stopped by its close) for each run
        runs[f"ray_local_{workers}"] = timed_analysis(
            graph, batches, kind, lambda w=workers: RayExecutor(workers=w)
        )
    if not args.no_cluster:
        log.info("two-node cluster on loopback")
        with loopback_cluster(args.port) as address:
            try:
                runs["ray_cluster_2_nodes"] = timed_analysis(
                    graph, batches, kind, lambda: _cluster_executor(address)
                )
            finally:
                _shutdown_ray()
    reference = runs["serial"]["report"]
    for entry in runs.values():
        entry["same_as_serial"] = entry["report"] == reference
    for entry in runs.values():
        entry.pop("report")
    return result


def _cluster_executor(address: str) -> Any:
    from dyadiq.passes.sensitivity.executor import RayExecutor

    return RayExecutor(address=address)


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --- output ------------------------------------------------------------------------------------


def render_markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    res = data["result"]
    lines = [
        "# Sensitivity analysis: serial vs Ray",
        "",
        f"- command: `{data['command']}`; {data['date']}; {m['cpu_model']}, {m['nproc']} CPUs; "
        f"commit {str(m.get('git_commit'))[:7]}; load average at start "
        + ", ".join(f"{x:.2f}" for x in m["load_avg_start"])
        + ", at end "
        + ", ".join(f"{x:.2f}" for x in data["load_avg_end"]),
        f"- model {res['model']}, {res['samples']} samples: empirical damage at "
        f"{'/'.join(map(str, BITS))} bits, activation sites at "
        f"{'/'.join(map(str, ACTIVATION_BITS))} bits, no trace, no pairs, uncached",
        "- serial: this process, onnxruntime 2 threads; Ray: one actor (one onnxruntime "
        "session, 1 thread) per worker; the cluster: `ray start --head` + `ray start "
        "--address` on 127.0.0.1, one CPU each",
        "",
        "| run | workers | start-up s | analysis s | forward passes | same report as serial |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, r in res["runs"].items():
        lines.append(
            f"| {label} | {r['workers']} | {r['startup_s']:.1f} | {r['analysis_s']:.1f} | "
            f"{r['forward_passes']} | {'yes' if r['same_as_serial'] else 'NO'} |"
        )
    t = res["tasks"]
    lines += [
        "",
        f"## Tasks ({res['model']}, all layers, widths {'/'.join(map(str, BITS))})",
        "",
        f"- this analysis: {t['single_layer']} single-layer + {t['activation_sites']} "
        f"activation-site tasks",
        f"- with the trace: + {t['trace_first_round']} probes in the first round, at most "
        f"{t['trace_at_most']}; with pairs: at most {t['pair_layer_pairs_at_most']} layer "
        f"pairs, {t['pair_tasks_at_most']} pair tasks",
        "",
        "| layers | widths | single layer | activation sites | trace (first round / cap) | "
        "layer pairs (at most) | pair tasks (at most) |",
        "|---:|---|---:|---:|---|---:|---:|",
    ]
    for g in res["growth"]:
        lines.append(
            f"| {g['layers']} | {'/'.join(map(str, g['widths']))} | {g['single_layer']} | "
            f"{g['activation_sites']} | {g['trace_first_round']} / {g['trace_at_most']} | "
            f"{g['pair_layer_pairs_at_most']} | {g['pair_tasks_at_most']} |"
        )
    lines += [
        "",
        "Single-layer tasks grow as layers x widths, sites as sites x activation widths, the "
        "trace as layers x probes, pairs as (structural pairs + top-k pairs) x pair widths^2.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__)
    p.add_argument("--model", default="mobilenet_v2", choices=sorted(OUTPUT_KIND))
    p.add_argument("--samples", type=int, default=8, help="analysis samples (8)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="local Ray runs")
    p.add_argument("--no-cluster", action="store_true", help="skip the two-node cluster run")
    p.add_argument("--port", type=int, default=6390, help="the cluster head's port")
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    argv_used = sys.argv[1:] if argv is None else argv
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.scaling " + " ".join(argv_used),
        "machine": common.machine_info(),
    }
    start = time.perf_counter()
    data["result"] = run(args)
    data["total_wall_s"] = time.perf_counter() - start
    data["load_avg_end"] = list(os.getloadavg())
    common.write_results(data, args.output_dir, "scaling", render_markdown)
    return data


if __name__ == "__main__":
    main()
