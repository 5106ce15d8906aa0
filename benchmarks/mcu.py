"""Microcontroller C backend: flash, RAM and instructions per inference under QEMU.

Per zoo model (fashion_cnn, ppocr_cls), three integer-only plans (activations 8 bits):
- ``W8A8``: every weighted layer at 8 bits;
- ``mixed W4/W8``: the first and last weighted layer at 8 bits, the others at 4;
- ``ILP, flash <= F``: HAWQ-V3's ILP (``passes.allocation.solve``) over {W4A8, W8A8} with the
  measured single-layer damage (``analyze_cached``, no trace, no pairs) and this backend's
  per-layer flash table (``flash_cost_table``) as the size, under a weight budget
  ``F - (image flash of W8A8 - its weights)``, where F, the budget for the whole model image,
  is the midpoint of the W8A8 and mixed images rounded down to 256 bytes. The built image is
  then checked against F.

Each plan is emitted as C (``emit_c_project``), built with arm-none-eabi-gcc -O2 and run under
QEMU: Cortex-M4 (mps2-an386) and Cortex-M3 (mps2-an385). Reported:
- flash: ``.text + .rodata + .data`` of ``size_probe.elf`` (the model with a bare start-up, no
  stdio): kernels, driver, weights, tables;
- RAM: the activation arena (liveness plan; its lower bound), the static RAM of that image
  (arena, scratch, input and output buffers) and the stack estimate from -fstack-usage;
- instructions per inference: ``qemu -icount shift=0`` and SysTick (40 instructions a tick),
  mean over the first inputs (the count barely varies with the input);
- accuracy on device: predictions of the QEMU runs on held-out real inputs against the labels,
  next to the reference interpreter's on the same inputs (outputs compared bit for bit);
- int4 packing: the mixed plan built again with 4-bit codes stored one per byte; the flash
  difference of the two images is the saving.

    .venv/bin/python -m benchmarks.mcu                 # writes results/mcu.{json,md}
    .venv/bin/python -m benchmarks.mcu --quick --output-dir /tmp/mcu   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

log = logging.getLogger("benchmarks.mcu")

MODELS = ("fashion_cnn", "ppocr_cls")
CPUS = ("cortex-m4", "cortex-m3")
ACCURACY_INPUTS = {"fashion_cnn": 500, "ppocr_cls": 100}
COUNT_INPUTS = 3
ANALYSIS_SAMPLES = {"fashion_cnn": 256, "ppocr_cls": 8}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--quick", action="store_true", help="few inputs: a smoke test")
    p.add_argument("--output-dir", type=Path, default=common.REPO / "benchmarks" / "results")
    return p.parse_args(argv)


def _inputs(artifacts: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for feeds, batch_labels in artifacts.evaluation_batches(count):
        x = next(iter(feeds.values()))
        images.extend(x[i : i + 1] for i in range(x.shape[0]))
        labels.extend(np.asarray(batch_labels).reshape(-1).tolist())
        if len(images) >= count:
            break
    return np.stack(images[:count]), np.array(labels[:count])


def _mixed_plan(layers: list[str]) -> Any:
    from dyadiq.plan import LayerFormat, PrecisionPlan

    last = len(layers) - 1
    return PrecisionPlan(
        {n: LayerFormat(8 if i in (0, last) else 4, 8) for i, n in enumerate(layers)}
    )


def _ilp_plan(graph: Any, calibration: list[Any], name: str, weight_budget: float) -> Any:
    from dataclasses import replace

    from dyadiq.backends.mcu.costs import flash_cost_table
    from dyadiq.passes.allocation import Budget, problem_from_report, solve
    from dyadiq.passes.calibration.data import validated_batches
    from dyadiq.passes.sensitivity.analysis import (
        SensitivityConfig,
        analyze_cached,
        output_kind_of,
    )
    from dyadiq.plan import LayerFormat, PrecisionPlan

    formats = [LayerFormat(4, 8), LayerFormat(8, 8)]
    batches = list(
        validated_batches(calibration, graph.input_specs(), limit=ANALYSIS_SAMPLES[name])
    )
    config = SensitivityConfig(weight_bits=(4, 8), trace=False, pairs=False)
    report, cached = analyze_cached(graph, batches, output_kind_of(graph, batches), config)
    problem = problem_from_report(graph, report, formats)
    flash = flash_cost_table(graph, formats)
    # the backend's flash table is the size the budget constrains
    problem = replace(problem, size_bytes={k: dict(v) for k, v in flash.items()})
    allocation = solve(problem, Budget(size_bytes=weight_budget))
    plan = PrecisionPlan(dict(allocation.formats), 8)
    return plan, {
        "analysis_cached": cached,
        "predicted_damage": allocation.predicted_damage,
        "weight_flash_predicted": allocation.size_bytes,
        "optimal": allocation.optimal,
    }


def _measure_plan(
    program: Any,
    work: Path,
    inputs: np.ndarray,
    labels: np.ndarray,
    count_inputs: int,
    *,
    pack_int4: bool = True,
    run_accuracy: bool = True,
) -> dict[str, Any]:
    from dyadiq import integer_program as ip
    from dyadiq.backends.mcu.build import build, run_qemu
    from dyadiq.backends.mcu.emit_c import emit_c_project
    from dyadiq.reference_interpreter import ReferenceInterpreter

    result: dict[str, Any] = {"cpus": {}}
    bits = [op.weight_bits for op in program.ops if isinstance(op, ip.Conv | ip.MatMul)]
    result["weight_bits"] = {str(b): bits.count(b) for b in sorted(set(bits))}
    out_code = program.int_outputs[program.outputs[0]]
    reference_pred = None
    if run_accuracy:
        interpreter = ReferenceInterpreter(program)
        input_name = next(iter(program.inputs))
        references = [interpreter.run({input_name: x})[out_code] for x in inputs]
        reference_pred = np.array([r.reshape(-1).argmax() for r in references])
        result["reference_accuracy"] = float((reference_pred == labels).mean())
    for cpu in CPUS if pack_int4 else CPUS[:1]:
        project = emit_c_project(program, work / cpu, cpu=cpu, pack_int4=pack_int4)
        built = build(project, jobs=2)
        size = built.model_size
        entry: dict[str, Any] = {
            "flash_bytes": size.flash,
            "text_bytes": size.text,
            "rodata_bytes": size.rodata,
            "data_bytes": size.data,
            "weight_flash_bytes": project.weight_flash_bytes,
            "arena_bytes": project.arena.peak_bytes,
            "arena_lower_bound_bytes": project.arena.lower_bound_bytes,
            "scratch_bytes": project.scratch_bytes,
            "static_ram_bytes": size.static_ram,
            "stack_estimate_bytes": built.stack_bytes,
        }
        t = time.perf_counter()
        counted = run_qemu(project, built.app_elf, inputs[:count_inputs], count_instructions=True)
        assert counted.instructions is not None
        entry["instructions_per_inference"] = float(np.mean(counted.instructions))
        entry["instructions_min_max"] = [min(counted.instructions), max(counted.instructions)]
        entry["count_wall_s"] = time.perf_counter() - t
        if run_accuracy and cpu == "cortex-m4":
            assert reference_pred is not None
            t = time.perf_counter()
            run = run_qemu(project, built.app_elf, inputs, timeout_s=1200)
            device = project.decode_outputs(run.outputs)[out_code].reshape(len(inputs), -1)
            exact = [
                np.array_equal(device[i], references[i].reshape(-1)) for i in range(len(inputs))
            ]
            device_pred = device.astype(np.int32).argmax(axis=1)
            entry.update(
                inputs=len(inputs),
                bit_exact_inputs=int(sum(exact)),
                device_accuracy=float((device_pred == labels).mean()),
                same_predictions=bool(np.array_equal(device_pred, reference_pred)),
                accuracy_wall_s=time.perf_counter() - t,
            )
        result["cpus"][cpu] = entry
    return result


def benchmark_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from dyadiq import zoo
    from dyadiq.backends.mcu.costs import allocator_memory_plan
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.pipeline import prepare_graph, quantize
    from dyadiq.plan import LayerFormat, PrecisionPlan

    artifacts = zoo.get(name)
    calibration = list(artifacts.calibration_batches())
    graph = prepare_graph(load_onnx(artifacts.model_path))
    layers = [n.name for n in graph.weighted_layers()]
    count = 20 if args.quick else ACCURACY_INPUTS[name]
    inputs, labels = _inputs(artifacts, count)
    count_inputs = 1 if args.quick else COUNT_INPUTS
    out: dict[str, Any] = {"layers": len(layers), "plans": {}}
    with tempfile.TemporaryDirectory(prefix=f"dq_mcu_{name}_") as tmp:
        work = Path(tmp)

        def integer_program(label: str, plan: Any) -> Any:
            result = quantize(artifacts.model_path, work / label / "q", calibration, plan=plan,
                              integer=True, check_batches=1)  # fmt: skip
            return result.program

        plans = {
            "W8A8": PrecisionPlan({n: LayerFormat(8, 8) for n in layers}),
            "mixed W4/W8": _mixed_plan(layers),
        }
        programs = {}
        for label, plan in plans.items():
            log.info("%s %s", name, label)
            programs[label] = integer_program(label.replace("/", "_"), plan)
            out["plans"][label] = _measure_plan(
                programs[label], work / label.replace("/", "_"), inputs, labels, count_inputs
            )
        m4 = {k: v["cpus"]["cortex-m4"] for k, v in out["plans"].items()}
        # int4 packing: the mixed plan with 4-bit codes one per byte
        unpacked = _measure_plan(programs["mixed W4/W8"], work / "unpacked", inputs, labels,
                                 count_inputs, pack_int4=False, run_accuracy=False)  # fmt: skip
        unpacked_m4 = unpacked["cpus"]["cortex-m4"]
        out["int4_packing"] = {
            "unpacked_flash_bytes": unpacked_m4["flash_bytes"],
            "packed_flash_bytes": m4["mixed W4/W8"]["flash_bytes"],
            "saving_bytes": unpacked_m4["flash_bytes"] - m4["mixed W4/W8"]["flash_bytes"],
            "unpacked_instructions_per_inference": unpacked_m4["instructions_per_inference"],
        }
        # a plan chosen under a flash budget, checked against the built image
        w8, mixed = m4["W8A8"], m4["mixed W4/W8"]
        budget = int((w8["flash_bytes"] + mixed["flash_bytes"]) / 2) // 256 * 256
        overhead = w8["flash_bytes"] - w8["weight_flash_bytes"]
        plan, solver = _ilp_plan(graph, calibration, name, budget - overhead)
        label = f"ILP, flash <= {budget}"
        program = integer_program("ilp", plan)
        out["plans"][label] = _measure_plan(program, work / "ilp", inputs, labels, count_inputs)
        built = out["plans"][label]["cpus"]["cortex-m4"]["flash_bytes"]
        out["flash_budget"] = {
            "budget_bytes": budget,
            "non_weight_flash_bytes": overhead,
            "weight_budget_bytes": budget - overhead,
            "built_flash_bytes": built,
            "met": built <= budget,
            **solver,
        }
        memory = allocator_memory_plan(program, graph, [LayerFormat(4, 8), LayerFormat(8, 8)])
        out["allocator_memory_plan"] = {
            "live_sets": len(memory["live_sets"]),
            "layers_in_flash_table": len(memory["flash"]),
        }
    return out


def render(data: dict[str, Any]) -> str:
    lines = [
        "# Microcontroller C backend: flash, RAM, instructions per inference (QEMU)",
        "",
        f"- command: `{data['command']}`",
        f"- date: {data['date']}; total wall time {data['total_wall_s']:.0f} s",
        f"- machine: {data['machine']['cpu_model']}, {data['machine']['nproc']} CPUs; load "
        f"average at start {', '.join(f'{v:.2f}' for v in data['machine']['load_avg_start'])}",
        f"- toolchain: {data['toolchain']}",
        "- flash = .text + .rodata + .data of the model image (bare start-up, no stdio); RAM: "
        "activation arena (its liveness lower bound), static RAM of the image (arena, scratch, "
        "input and output buffers), stack estimate (-fstack-usage: model_run + deepest kernel)",
        "- instructions: QEMU -icount shift=0, SysTick at 25 MHz = 40 instructions per tick; "
        "mean over the first inputs",
        "- accuracy: QEMU Cortex-M4 predictions on held-out real inputs vs labels, and the "
        "reference interpreter's on the same inputs; bit-exact = every output code equal",
        "",
        "| model | plan | W bits (layers) | flash B | weights B | arena B (bound) | static RAM B "
        "| stack B | M4 insns/inf | M3 insns/inf | bit-exact (M4) | device acc | reference acc |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, model in data["models"].items():
        if "error" in model:
            lines.append(f"| {name} | error: {model['error']} |")
            continue
        for label, plan in model["plans"].items():
            m4, m3 = plan["cpus"]["cortex-m4"], plan["cpus"]["cortex-m3"]
            bits = ", ".join(f"W{b}: {n}" for b, n in plan["weight_bits"].items())
            lines.append(
                f"| {name} | {label} | {bits} | {m4['flash_bytes']:,} | "
                f"{m4['weight_flash_bytes']:,} | {m4['arena_bytes']:,} "
                f"({m4['arena_lower_bound_bytes']:,}) | {m4['static_ram_bytes']:,} | "
                f"{m4['stack_estimate_bytes']} | {m4['instructions_per_inference']:,.0f} | "
                f"{m3['instructions_per_inference']:,.0f} | "
                f"{m4['bit_exact_inputs']}/{m4['inputs']} | {m4['device_accuracy']:.3f} | "
                f"{plan['reference_accuracy']:.3f} |"
            )
    lines += ["", "## int4 packing and the flash budget (Cortex-M4 image)", ""]
    lines += [
        "| model | mixed plan, 4-bit codes one per byte | packed two per byte | saving "
        "| budget F | ILP plan's image | met | ILP optimal |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, model in data["models"].items():
        if "error" in model:
            continue
        pack, fb = model["int4_packing"], model["flash_budget"]
        lines.append(
            f"| {name} | {pack['unpacked_flash_bytes']:,} | {pack['packed_flash_bytes']:,} | "
            f"{pack['saving_bytes']:,} | {fb['budget_bytes']:,} | {fb['built_flash_bytes']:,} | "
            f"{'yes' if fb['met'] else 'NO'} | {fb['optimal']} |"
        )
    lines += ["", *[f"- {note}" for note in data["notes"]], ""]
    return "\n".join(lines)


def _toolchain_versions() -> str:
    import subprocess

    def first_line(command: list[str]) -> str:
        out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
        return out.splitlines()[0] if out else "?"

    gcc = first_line(["arm-none-eabi-gcc", "--version"])
    return f"{gcc}; {first_line(['qemu-system-arm', '--version'])}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    start = time.perf_counter()
    argv_used = sys.argv[1:] if argv is None else argv
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.mcu " + " ".join(argv_used),
        "machine": common.machine_info(),
        "toolchain": _toolchain_versions(),
        "settings": {"cpus": list(CPUS), "quick": args.quick, "act_bits": 8},
        "notes": [],
        "models": {},
    }
    for name in args.models:
        try:
            data["models"][name] = benchmark_model(name, args)
        except Exception as exc:  # one model failing must not lose the other
            log.exception("%s failed", name)
            data["models"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        data["total_wall_s"] = time.perf_counter() - start
        common.write_results(data, args.output_dir, "mcu", render)
    return data


if __name__ == "__main__":
    main()
