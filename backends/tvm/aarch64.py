"""Execute TVM libraries cross-compiled for aarch64 Linux on this x86 machine, under qemu-user.

``scripts/setup_aarch64.sh`` builds, once, an aarch64 sysroot (Debian arm64 python3.11, libc,
libstdc++) and a folder of aarch64 wheels (apache-tvm runtime, numpy) under
``${DYADIQ_CACHE:-~/.cache/dyadiq}/aarch64``. :func:`run_many_under_qemu` writes the feeds to an
``.npz`` in a temporary folder, starts ``shipped/aarch64_runner.py`` with
``qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11`` (the TVM runtime in runtime-only mode,
``TVM_USE_RUNTIME_LIB=1``) and reads the outputs back. Integer kernels are exact on every
target, so the outputs must equal the x86 build's and the reference interpreter's bit for bit;
emulated timings mean nothing and none are reported.

Python's start-up under emulation costs seconds, so one launch runs every feed of a batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.errors import DyadiqError

SETUP_COMMAND = "bash scripts/setup_aarch64.sh"
RUNNER = Path(__file__).parent / "shipped" / "aarch64_runner.py"
DEFAULT_TIMEOUT_S = 900.0


class Aarch64RuntimeMissingError(DyadiqError):
    """qemu-aarch64 or the aarch64 sysroot / TVM runtime is not installed on this machine."""


class Aarch64RunError(DyadiqError):
    """The library failed to load or run under emulation, or the feeds do not fit it."""


@dataclass(frozen=True)
class Aarch64Runtime:
    """Where the emulated aarch64 Python and its packages live."""

    qemu: Path
    sysroot: Path
    site_packages: Path

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / "python3.11"


def aarch64_root() -> Path:
    """The folder ``scripts/setup_aarch64.sh`` fills (same rule as the script)."""
    return Path(os.environ.get("DYADIQ_CACHE", Path.home() / ".cache" / "dyadiq")) / "aarch64"


def locate_aarch64_runtime() -> Aarch64Runtime:
    """The installed runtime, or :class:`Aarch64RuntimeMissingError` naming the setup command."""
    root = aarch64_root()
    qemu = shutil.which("qemu-aarch64")
    ready = any(root.glob(".ready-*"))
    if qemu is not None and ready:
        return Aarch64Runtime(Path(qemu), root / "sysroot", root / "site-packages")
    problems = []
    if qemu is None:
        problems.append("qemu-aarch64 is not on PATH (Debian package qemu-user)")
    if not ready:
        problems.append(f"no finished aarch64 sysroot under {root}")
    raise Aarch64RuntimeMissingError(
        "cannot run aarch64 code here: "
        + "; ".join(problems)
        + f". Run `{SETUP_COMMAND}` (as root, or follow what it prints) to install it."
    )


def aarch64_runtime_available() -> bool:
    try:
        locate_aarch64_runtime()
    except Aarch64RuntimeMissingError:
        return False
    return True


def run_under_qemu(
    library: Path, feeds: Mapping[str, np.ndarray], *, function: str = "main"
) -> list[np.ndarray]:
    """Outputs of ``function`` of the aarch64 Relax library for one feed (name -> array).

    Prefer :func:`run_many_under_qemu` for several feeds: each launch pays Python's start-up.
    """
    return run_many_under_qemu(library, [feeds], function=function)[0]


def run_many_under_qemu(
    library: Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    function: str = "main",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[list[np.ndarray]]:
    """For each feed, the flattened outputs of ``function``, all in one emulator launch.

    Feed names are the Relax function's parameter names; every parameter must be given.
    """
    runtime = locate_aarch64_runtime()
    library = Path(library).resolve()
    if not library.is_file():
        raise Aarch64RunError(f"no library at {library}")
    if not feeds:
        return []
    with tempfile.TemporaryDirectory(prefix="dyadiq-aarch64-") as scratch:
        folder = Path(scratch)
        # Any: numpy's stubs reject **dict[str, ndarray] in savez (allow_pickle is a keyword).
        arrays: dict[str, Any] = {
            f"{i}/{name}": np.asarray(a) for i, feed in enumerate(feeds) for name, a in feed.items()
        }
        np.savez(folder / "inputs.npz", **arrays)
        request = {
            "library": str(library),
            "function": function,
            "inputs": str(folder / "inputs.npz"),
            "outputs": str(folder / "outputs.npz"),
            "count": len(feeds),
        }
        (folder / "request.json").write_text(json.dumps(request))
        _launch(runtime, folder / "request.json", timeout_s)
        with np.load(folder / "outputs.npz") as stored:
            return [_outputs_of_call(stored, call) for call in range(len(feeds))]


def run_model_folder_under_qemu(
    folder: Path, feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """Run an aarch64 folder written by :func:`dyadiq.backends.tvm.build.build` on each feed.

    Feeds are checked against ``model.json`` here (names, shapes; values cast to the declared
    dtype, as its own ``run_model.py`` does) before paying for an emulator launch. Returns, per
    feed, the outputs by their ``model.json`` names (``NAME_codes`` and float ``NAME``).
    """
    from dyadiq.backends.tvm.build import METADATA_NAME

    folder = Path(folder)
    try:
        info = json.loads((folder / METADATA_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise Aarch64RunError(f"{folder} is not a built TVM model folder: {exc}") from exc
    if info.get("target_name") != "aarch64":
        raise Aarch64RunError(
            f"{folder} holds a library for {info.get('target_name')!r}, not aarch64"
        )
    specs = info["inputs"]
    prepared = []
    for index, feed in enumerate(feeds):
        expected = [spec["name"] for spec in specs]
        if sorted(feed) != sorted(expected):
            raise Aarch64RunError(f"feed {index} names {sorted(feed)}; the model takes {expected}")
        args = {}
        for spec in specs:
            value = np.ascontiguousarray(feed[spec["name"]], dtype=spec["dtype"])
            if list(value.shape) != spec["shape"]:
                raise Aarch64RunError(
                    f"feed {index}: input {spec['name']!r} has shape {list(value.shape)}, "
                    f"the model takes {spec['shape']}"
                )
            args[spec["name"]] = value
        prepared.append(args)
    names = [spec["name"] for spec in info["outputs"]]
    results = run_many_under_qemu(folder / info["library"], prepared)
    return [dict(zip(names, values, strict=True)) for values in results]


def _launch(runtime: Aarch64Runtime, request: Path, timeout_s: float) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "PYTHONPATH": str(runtime.site_packages),
        "PYTHONNOUSERSITE": "1",
        # Only libtvm_runtime: the aarch64 wheel's compiler library is not needed to run.
        "TVM_USE_RUNTIME_LIB": "1",
        # Emulated OpenMP threads only contend for the host's cores.
        "OMP_NUM_THREADS": "1",
        "TVM_NUM_THREADS": "1",
    }
    command = [
        str(runtime.qemu),
        "-L",
        str(runtime.sysroot),
        str(runtime.python),
        str(RUNNER),
        str(request),
    ]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise Aarch64RunError(f"the aarch64 run did not finish within {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise Aarch64RunError(f"the aarch64 run failed (exit status {done.returncode}):\n{tail}")


def _outputs_of_call(stored: np.lib.npyio.NpzFile, call: int) -> list[np.ndarray]:
    count = sum(1 for key in stored.files if key.startswith(f"{call}/"))
    return [stored[f"{call}/{index}"] for index in range(count)]
