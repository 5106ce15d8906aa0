"""Run a dyadiq TVM library: ``python run_model.py inputs.npz outputs.npz``.

``build`` copies this file next to ``model.so`` and ``model.json`` as ``run_model.py``. It
needs only numpy and the TVM runtime (it works in the runtime-only mode of a target board's
TVM wheel), never dyadiq: ``inputs.npz`` holds one array per input named in model.json, and
``outputs.npz`` receives the integer codes (``NAME_codes``) and float outputs by name.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine


def _fields(value: Any) -> list[np.ndarray]:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    return [field.numpy() for field in value]


class UnsupportedCpuError(RuntimeError):
    """The library needs instructions this CPU lacks (loading it would crash with SIGILL)."""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The x86 flags of /proc/cpuinfo (or of ``cpuinfo``); empty where they cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def missing_cpu_flags(required: list[str], cpuinfo: str | None = None) -> list[str]:
    """The flags in ``required`` this CPU lacks; none where the flags cannot be read."""
    have = cpu_flags(cpuinfo)
    return [flag for flag in required if have and flag not in have]


def run(folder: Path, feeds: Mapping[str, np.ndarray], device: Any) -> dict[str, np.ndarray]:
    """Load ``folder/model.so`` and run ``main`` once on ``feeds``."""
    info = json.loads((Path(folder) / "model.json").read_text())
    missing = missing_cpu_flags(info.get("required_cpu_flags", []))
    if missing:
        raise UnsupportedCpuError(
            f"{folder} was built for {info.get('isa_level')} and this CPU lacks "
            f"{', '.join(missing)}; rebuild with --target x86-64-v3 (any AVX2 CPU)"
        )
    args = []
    for spec in info["inputs"]:
        if spec["name"] not in feeds:
            raise KeyError(f"missing input {spec['name']!r}; the model takes {info['inputs']}")
        value = np.ascontiguousarray(feeds[spec["name"]], dtype=spec["dtype"])
        if list(value.shape) != spec["shape"]:
            raise ValueError(f"input {spec['name']!r} has shape {value.shape}, not {spec['shape']}")
        args.append(tvm.runtime.tensor(value, device))
    library = tvm.runtime.load_module(str(Path(folder) / info["library"]))
    vm = VirtualMachine(library, device)
    values = _fields(vm["main"](*args))
    return {spec["name"]: v for spec, v in zip(info["outputs"], values, strict=True)}


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python run_model.py inputs.npz outputs.npz")
    with np.load(sys.argv[1]) as stored:
        feeds = {name: stored[name] for name in stored.files}
    # typed loosely: savez's stub mistakes array keyword arguments for its own options
    try:
        outputs: dict[str, Any] = run(Path(__file__).resolve().parent, feeds, tvm.cpu())
    except UnsupportedCpuError as exc:
        sys.exit(f"error: {exc}")
    np.savez(sys.argv[2], **outputs)


if __name__ == "__main__":
    main()
