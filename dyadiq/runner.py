"""``dyadiq run``: execute a folder written by ``dyadiq quantize --target`` on given inputs.

The folder's ``model.json`` says what it holds: a TVM library (run here for x86 / CUDA, under
qemu-user for aarch64) or Cortex-M C with its ELF (run on the QEMU board of its CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dyadiq.errors import CalibrationDataError, ConfigError


def read_inputs(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Inputs from ``.npz`` (arrays by input name) or ``.npy`` (a model with one input)."""
    if not path.is_file():
        raise CalibrationDataError(f"input file not found: {path}")
    try:
        if path.suffix == ".npy":
            if len(names) != 1:
                raise CalibrationDataError(f"the model takes {names}: give an .npz by name")
            return {names[0]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as stored:
            feeds = {name: stored[name] for name in stored.files}
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"{path} is not a readable .npy/.npz: {exc}") from exc
    missing = [n for n in names if n not in feeds]
    if missing:
        raise CalibrationDataError(f"{path} lacks inputs {missing} (it has {sorted(feeds)})")
    return feeds


def run_artifact(folder: Path, inputs: Path) -> dict[str, np.ndarray]:
    info_path = folder / "model.json"
    if not info_path.is_file():
        raise ConfigError(f"{folder} is not a folder written by `dyadiq quantize --target`")
    info = json.loads(info_path.read_text())
    if "target_name" in info:  # a TVM library
        from dyadiq.backends.tvm import build as tvm_build
        from dyadiq.backends.tvm.target import Device, tvm_target

        names = [spec["name"] for spec in info["inputs"]]
        feeds = read_inputs(inputs, names)
        if tvm_target(str(info["target_name"])).device is Device.AARCH64:
            from dyadiq.backends.tvm.aarch64 import run_under_qemu

            values = run_under_qemu(folder / info["library"], feeds)
            return {spec["name"]: v for spec, v in zip(info["outputs"], values, strict=True)}
        return tvm_build.run_library(folder, feeds)
    if "cpu" in info:  # Cortex-M C
        return _run_mcu_folder(folder, inputs)
    raise ConfigError(f"{info_path} describes no target dyadiq knows")


def _run_mcu_folder(folder: Path, inputs: Path) -> dict[str, np.ndarray]:
    """Run the folder's app.elf on QEMU: float inputs in (the device quantizes them), each
    output's integer codes out, one row per input."""
    from dyadiq.backends.mcu.build import run_qemu
    from dyadiq.backends.mcu.emit_c import load_project

    elf = folder / "app.elf"
    if not elf.is_file():
        raise ConfigError(f"{folder} has no app.elf: build it first (make -C {folder})")
    project = load_project(folder)
    shape = project.input.shape
    feeds = read_inputs(inputs, ["input"]) if inputs.suffix == ".npy" else None
    if feeds is None:
        with np.load(inputs, allow_pickle=False) as stored:
            if len(stored.files) != 1:
                raise CalibrationDataError(f"{inputs}: a microcontroller model takes one input")
            feeds = {"input": stored[stored.files[0]]}
    x = np.asarray(feeds["input"], np.float32).reshape(-1, *shape[1:])
    run = run_qemu(project, elf, x)
    return project.decode_outputs(run.outputs)
