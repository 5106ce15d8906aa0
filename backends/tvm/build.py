"""Compile a lowered integer program (:mod:`dyadiq.backends.tvm.lower`) with TVM and export it.

Two steps, so that a scheduler (MetaSchedule, hand-written VNNI schedules) can work on the
fused PrimFuncs in between:

    prepared = prepare(mod, target)   # legalize, fold constants, fuse: one PrimFunc per
                                      # layer (conv + bias + requant + clip + cast)
    executable = compile_prepared(prepared, target)  # (GPU: dlight schedules), VM lowering

``build`` does both for a named target preset and writes ``OUT/model.so`` (aarch64 through the
cross compiler), ``OUT/model.json`` (inputs, outputs, quantizers, target, versions) and
``OUT/run_model.py`` (a runner that needs only the TVM runtime and numpy). ``run_library``
runs such a folder in this process (x86, or CUDA where a GPU exists).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.support import cc

from dyadiq import integer_program as ip
from dyadiq.backends.tvm import model_runner as tvm_model_runner
from dyadiq.backends.tvm.lower import CODES_SUFFIX, main_output_names
from dyadiq.backends.tvm.target import X86_ISA_LEVELS, Device, tvm_target
from dyadiq.errors import ConfigError, DyadiqError
from dyadiq.io import prepare_output_dir, write_text_atomic

LIBRARY_NAME = "model.so"
METADATA_NAME = "model.json"
RUNNER_NAME = "run_model.py"
FORMAT = "dyadiq-tvm/1"
AARCH64_COMPILER = "aarch64-linux-gnu-gcc"


def host_x86_isa(flags: frozenset[str] | None = None) -> str:
    """The highest ISA level in :data:`X86_ISA_LEVELS` that this CPU (or ``flags``) runs."""
    have = tvm_model_runner.cpu_flags() if flags is None else flags
    best = "x86-64-v3"  # also the portable choice when the flags cannot be read
    for level, (_, needs) in X86_ISA_LEVELS.items():
        if have and set(needs) <= have:
            best = level
    return best


def x86_target(level: str | None = None) -> dict[str, Any]:
    """The TVM target dict of an ISA level (default: the host's, :func:`host_x86_isa`)."""
    spec, _ = X86_ISA_LEVELS[level or host_x86_isa()]
    return {**spec, "num-cores": os.cpu_count() or 1}


def host_x86_target() -> dict[str, Any]:
    """The build target for this machine's own runs and benchmarks: its ISA level."""
    return x86_target()


def target_spec(target_name: str) -> dict[str, Any]:
    """The TVM target dict a target of :mod:`~dyadiq.backends.tvm.target` builds for."""
    return tvm_target(target_name).tvm_spec()


def isa_level(target_name: str) -> str | None:
    """The x86-64 ISA level a target builds for (None for non-x86 targets)."""
    return tvm_target(target_name).isa_level()


def required_cpu_flags(target_name: str) -> list[str]:
    """The /proc/cpuinfo flags a CPU needs to run a library built for ``target_name``."""
    return tvm_target(target_name).required_cpu_flags()


def target_for(name: str) -> tvm.target.Target:
    return tvm.target.Target(target_spec(name))


def _is_gpu(target: tvm.target.Target) -> bool:
    return target.kind.name in ("cuda", "rocm", "metal", "vulkan", "opencl")


def prepare(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize to TIR and fuse: each layer becomes one PrimFunc, not yet scheduled."""
    passes = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def _default_gpu_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """dlight's rules; the int8 ``gpu.Matmul`` tensor-core rule does not apply to our kernels,
    which then get the ``Fallback`` rule (TVM-NOTES, CUDA). Scheduled PrimFuncs are kept."""
    from tvm.s_tir import dlight

    rules = dlight.ApplyDefaultSchedule(
        dlight.gpu.Matmul(),
        dlight.gpu.GEMV(),
        dlight.gpu.Reduction(),
        dlight.gpu.GeneralReduction(),
        dlight.gpu.Fallback(),
    )
    with target:
        return rules(mod)


def compile_prepared(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Executable:
    """Compile a :func:`prepare` d (and possibly scheduled) module to a VM executable."""
    if _is_gpu(target):
        mod = _default_gpu_schedules(mod, target)
        backend = cuda_pipeline
    else:
        backend = cpu_pipeline

    @tvm.transform.module_pass(opt_level=0, name="dyadiq_vm_lowering")
    def vm_lowering(module: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        # the default pipeline minus legalization and fusion, which prepare() already did
        with target:
            seq = backend.dataflow_lower_passes(target) + backend.finalize_passes(target)
            return tvm.transform.Sequential(seq)(module)

    return tvm.compile(mod, target, relax_pipeline=vm_lowering)


def _quant_json(program: ip.IntegerProgram | None, tensor: str | None) -> dict[str, Any] | None:
    if program is None or tensor is None or tensor not in program.quant:
        return None
    q = program.quant[tensor]
    return {"scale": q.scale, "zero_point": q.zero_point, "bits": q.bits, "signed": q.signed}


def _tensor_json(ty: Any) -> dict[str, Any]:
    return {"shape": [int(d) for d in ty.shape], "dtype": str(ty.dtype)}


def model_metadata(
    mod: tvm.IRModule, target_name: str, program: ip.IntegerProgram | None
) -> dict[str, Any]:
    """What a caller needs to feed the library and read its outputs."""
    main = mod["main"]
    quantized_input = {
        op.input: op.output
        for op in (program.ops if program else [])
        if isinstance(op, ip.QuantizeInput)
    }
    inputs = [
        {
            "name": p.name,
            **_tensor_json(p.ty),
            "quant": _quant_json(program, quantized_input.get(p.name)),
        }
        for p in main.params
    ]
    fields = list(main.ret_ty.fields) if hasattr(main.ret_ty, "fields") else [main.ret_ty]
    names = main_output_names(program) if program else [f"output_{i}" for i in range(len(fields))]
    outputs = []
    for name, ty in zip(names, fields, strict=True):
        codes_of = name.removesuffix(CODES_SUFFIX) if name.endswith(CODES_SUFFIX) else None
        codes = program.int_outputs.get(codes_of) if (program and codes_of) else None
        outputs.append({"name": name, **_tensor_json(ty), "quant": _quant_json(program, codes)})
    isa = isa_level(target_name)
    return {
        "format": FORMAT,
        "library": LIBRARY_NAME,
        "target_name": target_name,
        "target": target_spec(target_name),
        "isa_level": isa,
        "required_cpu_flags": required_cpu_flags(target_name),
        "dyadiq_version": _version("dyadiq"),
        "tvm_version": tvm.__version__,
        "inputs": inputs,
        "outputs": outputs,
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def build(
    mod: tvm.IRModule,
    target_name: str,
    out_dir: Path,
    *,
    program: ip.IntegerProgram | None = None,
    schedule: Callable[[tvm.IRModule, tvm.target.Target], tvm.IRModule] | None = None,
) -> Path:
    """Prepare, compile and export ``mod`` for the target ``target_name``; returns model.so.

    ``program`` (the one ``mod`` was lowered from) names the outputs and records the
    quantizers in model.json; without it outputs are ``output_0``, ``output_1``, ...
    ``schedule`` rewrites the prepared (fused) module's PrimFuncs before compilation, e.g.
    :func:`dyadiq.backends.tvm.tuning.schedule_module`.
    """
    target = target_for(target_name)
    out = prepare_output_dir(Path(out_dir))
    prepared = prepare(mod, target)
    if schedule is not None:
        prepared = schedule(prepared, target)
    executable = compile_prepared(prepared, target)
    library = out / LIBRARY_NAME
    staging = out / f".{LIBRARY_NAME}.tmp"
    if tvm_target(target_name).device is Device.AARCH64:
        executable.export_library(str(staging), fcompile=cc.cross_compiler(AARCH64_COMPILER))
    else:
        executable.export_library(str(staging))
    os.replace(staging, library)
    info = model_metadata(mod, target_name, program)
    write_text_atomic(out / METADATA_NAME, json.dumps(info, indent=2) + "\n")
    shutil.copyfile(tvm_model_runner.__file__, out / RUNNER_NAME)
    return library


def run_library(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a built model.so (or its folder) here; outputs by the names in model.json."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    info = json.loads((folder / METADATA_NAME).read_text())
    device_kind = tvm_target(str(info["target_name"])).device
    if device_kind is Device.AARCH64 or info.get("target", {}).get("mtriple"):
        raise ConfigError(
            f"{folder} holds an aarch64 library; run it there (or under qemu) with run_model.py"
        )
    device = tvm.cuda() if device_kind is Device.CUDA else tvm.cpu()
    if not device.exist:
        raise ConfigError(f"{folder} was built for {info['target_name']}, absent on this machine")
    try:
        return tvm_model_runner.run(folder, feeds, device)
    except tvm_model_runner.UnsupportedCpuError as exc:
        raise ConfigError(str(exc)) from exc
    except (KeyError, ValueError) as exc:  # the runner's own checks of the feeds
        raise DyadiqError(f"bad input for {folder}: {exc}") from exc
