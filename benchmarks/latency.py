"""End-to-end batch-1 latency on this CPU: onnxruntime float and int8 against TVM float and
dyadiq's integer program compiled by TVM, in one run, with the same number of threads:

    .venv/bin/python -m benchmarks.latency                          # fashion_cnn, mobilenet_v2
    .venv/bin/python -m benchmarks.latency --models fashion_cnn --repeat 20 --output-dir /tmp/l

Rows per model:
- ``ort_float``: the zoo's float ONNX model in an onnxruntime session.
- ``ort_int8_qdq``: onnxruntime ``quantize_static`` (QDQ, per-channel QInt8 weights, QUInt8
  activations, MinMax), the same calibration batches dyadiq uses.
- ``tvm_float``: the float model imported with ``from_onnx``, prepared (legalize + fuse) and
  scheduled by :func:`dyadiq.backends.tvm.tuning.schedule_module` like the integer one.
- ``dyadiq_int_tvm``: ``quantize(..., integer=True)`` (W8A8), ``lower_program``, ``prepare``,
  ``schedule_module`` with the committed database (``benchmarks/tuning_db``; PrimFuncs without a
  record get the default schedule), ``compile_prepared``. Its outputs on the timed input are
  checked bit-exact against the reference interpreter.
- ``dyadiq_int_tvm_unscheduled``: the same without scheduling (what TVM's default CPU
  pipeline gives), timed with fewer repeats.
- ``dyadiq_int_tvm_avx2`` / ``dyadiq_int_tvm_avx2_w4``: the same program (and a uniform W4A8
  one) built for x86-64-v3, as ``--target x86-64-v3`` and every AVX2-only CPU builds it: the
  AVX2 kernels (vpmaddwd on widened codes for W8 layers, vpmaddubsw for weights of 7 bits or
  fewer). Timed on this CPU, which runs AVX2 code too; on an AVX-512 machine that is a
  stand-in for an AVX2 one, not a measurement of one.
- ``dyadiq_int_tvm_avx2_default_schedules``: x86-64-v3 with the portable lowering and default
  schedules: what AVX2 machines got before the AVX2 kernels.
Timing: one fixed real input; ``warmup`` calls each, then ``repeat`` round-robin rounds (one
call per row per round, so background load hits all rows alike); the median per row.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks.common import REPO, machine_info, write_results

MODELS = ("fashion_cnn", "mobilenet_v2", "ppocr_cls")
DATABASE = REPO / "benchmarks" / "tuning_db"
UNSCHEDULED_REPEAT = 3
# the allocation's candidate weight widths at 8-bit activations
LAYER_TABLE_FORMATS = ((8, 8), (6, 8), (4, 8), (3, 8), (2, 8))
LAYER_TABLE_REPEAT = 10


def ort_session(path: Path, threads: int, *, spin: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session


def _tvm_runner(executable: Any, args: list[Any]) -> Callable[[], Any]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    main = vm["main"]
    return lambda: main(*args)


def _tvm_float(model_path: Path, feeds: dict[str, np.ndarray], target: Any, database: Path | None):
    import onnx
    import onnxsim
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from dyadiq.backends.tvm.build import compile_prepared, prepare
    from dyadiq.backends.tvm.tuning import schedule_module_with_report

    shapes = {name: list(value.shape) for name, value in feeds.items()}
    model, ok = onnxsim.simplify(onnx.load(str(model_path)), overwrite_input_shapes=shapes)
    if not ok:
        raise RuntimeError(f"onnxsim could not simplify {model_path}")
    mod = from_onnx(model, shapes, keep_params_in_input=False)
    prepared = prepare(mod, target)
    scheduled, report = schedule_module_with_report(
        prepared, target, database_dir=database, progress=None
    )
    args = [tvm.runtime.tensor(np.ascontiguousarray(v)) for v in feeds.values()]
    return _tvm_runner(compile_prepared(scheduled, target), args), report


class CompiledRow(NamedTuple):
    run: Callable[[], Any]
    bit_exact: bool  # output codes on the timed input equal the reference interpreter's
    report: Any  # backends.tvm.tuning's ScheduleReport: where each PrimFunc's schedule came from
    compile_s: float  # lowering, scheduling and compilation


def _schedule_counts(report: Any) -> dict[str, int]:
    """PrimFuncs by schedule source."""
    return {s: report.count(s) for s in sorted(set(report.source.values()))}


def _dyadiq_runner(
    program: Any, target: Any, feeds: dict[str, np.ndarray], database: Path | None, *, kernels: bool
) -> CompiledRow:
    """An integer program compiled for ``target`` (x86 kernels or the portable lowering),
    checked against the reference interpreter on ``feeds``."""
    import tvm

    from dyadiq.backends.tvm.build import compile_prepared, prepare
    from dyadiq.backends.tvm.lower import lower_program, main_output_names
    from dyadiq.backends.tvm.tuning import schedule_module_with_report
    from dyadiq.reference_interpreter import ReferenceInterpreter

    start = time.perf_counter()
    prepared = prepare(lower_program(program, target=target if kernels else None), target)
    scheduled, report = schedule_module_with_report(
        prepared, target, database_dir=database, progress=None
    )
    executable = compile_prepared(scheduled, target)
    compile_s = time.perf_counter() - start
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in program.inputs]
    run = _tvm_runner(executable, args)
    outputs = dict(zip(main_output_names(program), [o.numpy() for o in run()], strict=True))
    reference = ReferenceInterpreter(program).run(feeds)
    exact = all(
        np.array_equal(outputs[f"{o}_codes"], reference[program.int_outputs[o]])
        for o in program.outputs
    )
    return CompiledRow(run, exact, report, compile_s)


def median_ms(call: Callable[[], Any], *, warmup: int, repeat: int) -> float:
    """One call timed alone: ``warmup`` calls, then the median of ``repeat`` timed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _median_ms(rows: dict[str, Callable[[], Any]], *, warmup: int, repeat: int) -> dict[str, float]:
    for call in rows.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeat):
        for name, call in rows.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def write_layer_table(
    name: str,
    program: Any,
    layer_ids: list[str],
    target: Any,
    threads: int,
    database: Path | None,
    output_dir: Path,
) -> Path:
    """``layer_latency_<model>.json``: each weighted layer's kernel timed alone per format,
    keyed by the plan's layer ids (``dyadiq quantize --latency-table``)."""
    from dyadiq.backends.tvm.layer_latency import measure_layer_latency
    from dyadiq.plan import LayerFormat

    formats = [LayerFormat(w, a) for w, a in LAYER_TABLE_FORMATS]
    table = measure_layer_latency(
        program,
        formats,
        target,
        layer_ids=layer_ids,
        database_dir=database,
        repeat=LAYER_TABLE_REPEAT,
    )
    table.threads = threads
    path = output_dir / f"layer_latency_{name}.json"
    table.save(path)
    return path


def _macs(program: Any, layer: Any) -> int:
    out = program.shapes[layer.output]
    weight = layer.weight
    per_output = int(np.prod(weight.shape[1:])) if weight.ndim == 4 else int(weight.shape[0])
    return int(np.prod([d for d in out if d > 0])) * per_output


def tune_heaviest_layers(
    program: Any, prepared: Any, target: Any, database: Path, *, trials: int, layers: int
) -> list[str]:
    """MetaSchedule on the ``layers`` weighted layers with the most MACs, ``trials`` each;
    records go to ``database`` (committed, reused by every later run)."""
    import tvm

    from dyadiq.backends.tvm.layer_latency import find_layer_call, kernel_calls, weighted_layers
    from dyadiq.backends.tvm.tuning import schedule_module

    calls = kernel_calls(prepared)
    ranked = sorted(weighted_layers(program), key=lambda op: -_macs(program, op))[:layers]
    chosen = {}
    for layer in ranked:
        index, _ = find_layer_call(calls, 0, layer)
        chosen[calls[index].name] = calls[index].func
    subset = tvm.IRModule({name: func for name, func in chosen.items()})
    schedule_module(subset, target, database_dir=database, trials=trials * len(chosen))
    return sorted(chosen)


def measure_model(
    name: str,
    *,
    threads: int,
    warmup: int,
    repeat: int,
    database: Path | None,
    spin: bool,
    layer_tables: Path | None = None,
    tune: tuple[int, int] | None = None,
    isa: str | None = None,
) -> dict[str, Any]:
    import tvm

    from dyadiq import zoo
    from dyadiq.backends.tvm.build import (
        compile_prepared,
        host_x86_isa,
        prepare,
        x86_target,
    )
    from dyadiq.backends.tvm.lower import lower_program
    from dyadiq.ort_baseline import quantize_static_baseline
    from dyadiq.pipeline import quantize

    artifacts = zoo.get(name)
    calibration = list(artifacts.calibration_batches())
    feeds_batch, _ = next(iter(artifacts.evaluation_batches(1)))
    feeds = {k: np.ascontiguousarray(v[:1]) for k, v in feeds_batch.items()}
    target = tvm.target.Target({**x86_target(isa), "num-cores": threads})
    result: dict[str, Any] = {
        "model": name,
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "dyadiq_int_tvm_isa_level": isa or host_x86_isa(),
    }
    with tempfile.TemporaryDirectory(prefix="dyadiq-latency-") as tmp:
        qdq_path = Path(tmp) / "ort_qdq.onnx"
        quantize_static_baseline(artifacts.model_path, qdq_path, calibration)
        ort_float = ort_session(artifacts.model_path, threads, spin=spin)
        ort_int8 = ort_session(qdq_path, threads, spin=spin)
        quantized = quantize(
            artifacts.model_path, Path(tmp) / "dyadiq", calibration, integer=True, check_batches=1
        )
        program_w4 = quantize(
            artifacts.model_path,
            Path(tmp) / "dyadiq_w4",
            calibration,
            weight_bits=4,
            integer=True,
            check_batches=1,
        ).program
    program = quantized.program
    assert program is not None and program_w4 is not None  # integer=True builds the program
    if layer_tables is not None:
        path = write_layer_table(
            name + (f"_{isa}" if isa else ""),
            program,
            list(quantized.plan.layers),
            target,
            threads,
            database,
            layer_tables,
        )
        return {"model": name, "layer_table": str(path)}
    if tune is not None:
        # the lowering `dyadiq quantize --target x86` uses: x86 kernels where the CPU has them
        prepared = prepare(lower_program(program, target=target), target)
        if database is None:
            database = DATABASE
        trials, layers = tune
        tuned = tune_heaviest_layers(
            program, prepared, target, database, trials=trials, layers=layers
        )
        return {"model": name, "tuned_kernels": tuned}
    main_row = _dyadiq_runner(program, target, feeds, database, kernels=True)
    dyadiq_int = main_row.run
    result["dyadiq_compile_s"] = main_row.compile_s
    result["dyadiq_bit_exact_vs_reference"] = main_row.bit_exact
    result["dyadiq_schedules"] = _schedule_counts(main_row.report)
    result["dyadiq_unscheduled_kernels"] = main_row.report.notes
    tvm_float, float_report = _tvm_float(artifacts.model_path, feeds, target, database)
    result["tvm_float_schedules"] = _schedule_counts(float_report)
    v3 = tvm.target.Target({**x86_target("x86-64-v3"), "num-cores": threads})
    avx2_rows = {
        "dyadiq_int_tvm_avx2": (program, True),
        "dyadiq_int_tvm_avx2_w4": (program_w4, True),
        "dyadiq_int_tvm_avx2_default_schedules": (program, False),
    }
    avx2: dict[str, Callable[[], Any]] = {}
    for row, (row_program, with_kernels) in avx2_rows.items():
        compiled = _dyadiq_runner(row_program, v3, feeds, database, kernels=with_kernels)
        avx2[row] = compiled.run
        result[f"{row}_bit_exact_vs_reference"] = compiled.bit_exact
        result[f"{row}_schedules"] = _schedule_counts(compiled.report)
    ort_feeds = feeds
    rows = {
        "ort_float": lambda: ort_float.run(None, ort_feeds),
        "ort_int8_qdq": lambda: ort_int8.run(None, ort_feeds),
        "tvm_float": tvm_float,
        "dyadiq_int_tvm": dyadiq_int,
        **avx2,
    }
    result["median_ms"] = _median_ms(rows, warmup=warmup, repeat=repeat)
    # the portable lowering without schedules: what TVM's default CPU pipeline would give
    portable = prepare(lower_program(program), target)
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in program.inputs]
    unscheduled = _tvm_runner(compile_prepared(portable, target), args)
    result["median_ms"].update(
        _median_ms({"dyadiq_int_tvm_unscheduled": unscheduled}, warmup=1, repeat=UNSCHEDULED_REPEAT)
    )
    ms = result["median_ms"]
    result["ratios"] = {
        row: {
            "vs_ort_float": ms[row] / ms["ort_float"],
            "vs_ort_int8_qdq": ms[row] / ms["ort_int8_qdq"],
        }
        for row in ms
    }
    result["load_avg_after"] = list(os.getloadavg())
    return result


def render(data: dict[str, Any]) -> str:
    run = data["run"]
    lines = [
        "# End-to-end latency, batch 1: onnxruntime vs TVM vs dyadiq integer TVM",
        "",
        f"Command: `{run['command']}`  ",
        f"Threads: {run['threads']} (onnxruntime intra-op, TVM_NUM_THREADS); median of "
        f"{run['repeat']} round-robin rounds after {run['warmup']} warm-up calls "
        f"(unscheduled TVM: {UNSCHEDULED_REPEAT} calls); idle threads "
        f"{'spin' if run['spinning_threads'] else 'sleep (no spinning) in both runtimes'}.  ",
        f"CPU: {data['machine']['cpu_model']}, load average at start "
        f"{', '.join(f'{x:.1f}' for x in data['machine']['load_avg_start'])}; "
        f"CPU flags: {' '.join(data['machine'].get('cpu_flags', []))}.  ",
        "Rows of one model are interleaved round-robin, so background load hits all alike. "
        "`dyadiq_int_tvm` is built for this CPU's ISA level "
        f"({data['models'][0].get('dyadiq_int_tvm_isa_level', '?')}); the `_avx2` rows for "
        "x86-64-v3, run on this same CPU (see the module docstring). No AVX2-only machine was "
        "available for this run: an AVX2 CPU's onnxruntime rows would use its saturating u8 x s8 "
        "kernels instead of VNNI ones.",
        "",
        "| model | row | median ms | x ORT float | x ORT int8 |",
        "|---|---|---:|---:|---:|",
    ]
    for model in data["models"]:
        for row, value in model["median_ms"].items():
            ratio = model["ratios"][row]
            lines.append(
                f"| {model['model']} | {row} | {value:.3f} | {ratio['vs_ort_float']:.2f} | "
                f"{ratio['vs_ort_int8_qdq']:.2f} |"
            )
    lines += ["", "Schedules (PrimFuncs by source) and checks:", ""]
    for model in data["models"]:
        lines.append(
            f"- {model['model']}: dyadiq {model['dyadiq_schedules']}, TVM float "
            f"{model['tvm_float_schedules']}; dyadiq TVM output bit-exact vs the reference "
            f"interpreter: {model['dyadiq_bit_exact_vs_reference']}; AVX2 rows bit-exact: "
            + ", ".join(
                f"{k.removesuffix('_bit_exact_vs_reference')} {v}"
                for k, v in model.items()
                if k.startswith("dyadiq_int_tvm_avx2") and k.endswith("_bit_exact_vs_reference")
            )
            + f"; AVX2 W8 schedules {model.get('dyadiq_int_tvm_avx2_schedules')}; "
            f"load average after {', '.join(f'{x:.1f}' for x in model['load_avg_after'])}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--database", type=Path, default=DATABASE)
    parser.add_argument(
        "--spin", action="store_true", help="let idle worker threads spin (both runtimes)"
    )
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--tune",
        nargs=2,
        type=int,
        metavar=("TRIALS", "LAYERS"),
        help="instead: tune the LAYERS layers with the most MACs, TRIALS each, into --database",
    )
    parser.add_argument(
        "--x86-isa",
        choices=["x86-64-v3", "x86-64-v4-vnni"],
        help="build dyadiq_int_tvm (and the layer tables) for this ISA level, not this CPU's",
    )
    parser.add_argument(
        "--layer-tables",
        action="store_true",
        help="instead: write each model's per-layer latency table to the output folder",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # tuning progress
    # read by TVM's thread pool when it starts, i.e. at the first parallel kernel
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if not args.spin:
        # Idle workers sleep instead of spinning (onnxruntime: allow_spinning=0). On a machine
        # shared with other jobs, spinning workers wait for descheduled ones: measured 46 ms
        # instead of 0.33 ms for fashion_cnn at load average 11 on 2 cores.
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
    database = args.database if args.database.exists() or args.tune else None
    data: dict[str, Any] = {
        "machine": machine_info(),
        "run": {
            "command": "python -m benchmarks.latency "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "threads": args.threads,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "spinning_threads": args.spin,
            "database": str(database) if database else None,
        },
        "models": [],
    }
    for name in args.models:
        data["models"].append(
            measure_model(
                name,
                threads=args.threads,
                warmup=args.warmup,
                repeat=args.repeat,
                database=database,
                spin=args.spin,
                layer_tables=args.output_dir if args.layer_tables else None,
                isa=args.x86_isa,
                tune=(args.tune[0], args.tune[1]) if args.tune else None,
            )
        )
    if args.layer_tables or args.tune:
        return
    write_results(data, args.output_dir, "latency", render)


if __name__ == "__main__":
    main()
