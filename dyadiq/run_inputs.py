"""What a user hands :func:`dyadiq.quantize`, resolved and checked before any work: the
model (a file, a ModelProto, a Relax module or ``zoo:NAME``), the calibration source, the
layers ``exclude`` / ``pin`` name, and options that contradict each other (all listed at once)."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dyadiq.backends.onnx.qdq import QDQStyle
from dyadiq.errors import CalibrationDataError, ConfigError, listed
from dyadiq.progress import stage

ModelInput = str | os.PathLike[str] | onnx.ModelProto
ZOO_PREFIX = "zoo:"


def data_problems(model: ModelInput, inputs: Any, preset: str | None) -> list[str]:
    """What is wrong with --val / --test data too, so that one error lists everything (an
    ONNX file's inputs are read without loading the model; others are checked later)."""
    from dyadiq.errors import DyadiqError
    from dyadiq.quality_sources import read_user_data

    if not isinstance(model, str | os.PathLike) or Path(model).suffix != ".onnx":
        return []
    try:
        read_user_data(Path(model), inputs, image_preset=preset)
    except DyadiqError as exc:
        return [str(exc)]
    except Exception:  # an unreadable model: its own error comes once the options are fixed
        return []
    return []


def is_zoo(item: Any) -> bool:
    return isinstance(item, str) and item.startswith(ZOO_PREFIX)


def check_output(final: Path, inputs: list[Path]) -> None:
    from dyadiq.io import check_output_dir

    check_output_dir(final, *inputs)


def option_conflicts(
    budget: str | None,
    max_drop: str | None,
    plan: Any,
    pin: Sequence[str],
    style: QDQStyle,
    integer: bool,
    target: str | None,
    act_dtype: str,
) -> list[str]:
    """Options that contradict each other or mean nothing: refused (all at once), never
    ignored."""
    problems = []
    if plan is not None and (budget or max_drop):
        chooser = "--budget" if budget else "--max-drop"
        problems.append(f"--plan gives every layer's format; {chooser} would choose them: pick one")
    if budget and max_drop:
        problems.append("--budget and --max-drop both choose the plan: pick one")
    if pin and not (budget or max_drop):
        problems.append("--pin restricts what --budget / --max-drop may choose: add one of them")
    if act_dtype not in ("uint8", "int8"):
        problems.append(f"--act-dtype must be uint8 or int8, got {act_dtype!r}")
    if style is QDQStyle.TENSORRT and (integer or target is not None):
        problems.append(
            "--qdq-style tensorrt writes a QDQ model for TensorRT; the integer model and "
            "--target builds use the default style: drop --integer / --target, or the style"
        )
    return problems


def model_source(model: ModelInput, stack: contextlib.ExitStack) -> tuple[Any, Path]:
    """(zoo artifacts or None, an ONNX file): a zoo model materialised, a Relax IRModule
    translated, a ModelProto saved, each into a folder that lives as long as ``stack``."""
    if is_zoo(model):
        from dyadiq import zoo

        name = str(model)[len(ZOO_PREFIX) :]
        cached = any(zoo.cache_dir().glob(f"{name}-*.onnx"))
        with (
            contextlib.nullcontext()
            if cached
            else stage(
                f"materialising zoo model {name} (first use: export into {zoo.cache_dir()}, "
                "installing what it needs; later runs reuse it)"
            )
        ):
            artifacts = zoo.get(name)
        return artifacts, Path(artifacts.model_path)
    if isinstance(model, onnx.ModelProto):
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dyadiq_model_")))
        path = folder / "model.onnx"
        onnx.save(model, str(path))
        return None, path
    path = Path(model)
    if path.suffix != ".json":
        return None, path
    from dyadiq.frontends.relax_frontend import load_relax_file, relax_to_onnx

    translated = relax_to_onnx(load_relax_file(path))
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dyadiq_relax_")))
    onnx_path = folder / (path.stem + ".onnx")
    onnx.save(translated, str(onnx_path))
    return None, onnx_path


def parse_bindings(items: Sequence[str]) -> dict[str, list[float]]:
    """``--bind NAME=VALUE[,VALUE...]`` items as ``{name: values}``; every malformed item is
    listed in one error."""
    bound: dict[str, list[float]] = {}
    problems = []
    for item in items:
        name, sep, text = item.partition("=")
        try:
            values = [float(v) for v in text.split(",")] if sep and name else None
        except ValueError:
            values = None
        if values is None:
            problems.append(f"--bind {item!r}: expected NAME=VALUE or NAME=V1,V2,... (numbers)")
        else:
            bound[name.strip()] = values
    if problems:
        raise ConfigError(listed("bad --bind:", problems))
    return bound


def bound_model(path: Path, bind: Mapping[str, Any], folder: Path) -> Path:
    """A copy of the ONNX file ``path`` in ``folder`` whose ``bind`` inputs are constants.

    For inputs that select behaviour rather than carry data (a sample rate that picks an
    ``If`` branch): once constant, the frontend folds what depends on them
    (:mod:`dyadiq.passes.fold_static_if`), and calibration and evaluation data feed the
    remaining inputs only. Values are cast to the input's element type and shaped to its
    static shape (a single value also fills a shape of ones)."""
    from onnx import helper
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    from dyadiq.passes.fold_static_if import bind_inputs

    model = onnx.load(str(path), load_external_data=False)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    if external:  # read once; the copy is written the way it came
        load_external_data_for_model(model, str(path.parent))
    inputs = {i.name: i for i in model.graph.input}
    problems = [
        f"--bind {name}: not an input of {path.name} (its inputs: {', '.join(inputs)})"
        for name in bind
        if name not in inputs
    ]
    values: dict[str, np.ndarray] = {}
    for name, given in bind.items():
        if name not in inputs:
            continue
        tensor = inputs[name].type.tensor_type
        array = np.asarray(given, dtype=helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        static = [d if d is not None else 1 for d in dims]
        if array.size != int(np.prod(static)) or (array.size > 1 and None in dims):
            problems.append(
                f"--bind {name}: {array.size} value(s) for an input of shape "
                f"{['?' if d is None else d for d in dims]}"
            )
            continue
        values[name] = array.reshape(static)
    if problems:
        raise ConfigError(listed("bad --bind:", problems))
    bind_inputs(model, values)
    out = folder / path.name
    onnx.save(model, str(out), save_as_external_data=external)
    return out


def calibration_source(calibration: Any, artifacts: Any, limit: int | None) -> Any:
    """The calibration source: the given one, a single .npz file as one batch, or the zoo
    model's own batches."""
    if calibration is None:
        if artifacts is None:
            raise ConfigError(
                "calibration data is required: --calib FOLDER (.npz/.npy files, or images with "
                "--calib-preset) or one .npz file"
            )
        return list(artifacts.calibration_batches(limit))
    if isinstance(calibration, str | os.PathLike) and Path(calibration).is_file():
        path = Path(calibration)
        if path.suffix.lower() != ".npz":
            raise CalibrationDataError(
                f"{path} is a file: --calib takes a folder of batches or one .npz file "
                "(numpy.savez(path, input_name=array, ...))"
            )
        try:
            with np.load(path, allow_pickle=False) as archive:
                return [{key: archive[key] for key in archive.files}]
        except (OSError, ValueError, EOFError) as exc:
            raise CalibrationDataError(f"cannot read calibration file {path}: {exc}") from exc
    return calibration


def resolve_layers(
    model_path: Path,
    exclude: Sequence[str],
    pin: Sequence[str],
    input_shapes: Mapping[str, Sequence[int]] | None,
) -> frozenset[str]:
    """``exclude`` entries (node id, glob pattern or op type, like NNCF's ignored_scope) as
    node ids; every entry, and every ``pin`` pattern, must match a weighted layer."""
    from dyadiq.frontends.onnx_frontend import load_onnx

    graph = load_onnx(model_path, input_shapes=input_shapes)
    layers = {node.name: node.op for node in graph.weighted_layers()}
    ids: set[str] = set()
    for entry in exclude:
        matched = match_layers(entry, layers)
        if not matched:
            raise ConfigError(_no_match("--exclude", entry, layers))
        ids |= matched
    for item in pin:
        pattern = item.partition("=")[0]
        if pattern not in layers and not fnmatch.filter(layers, pattern):
            raise ConfigError(_no_match("--pin", pattern, layers))
    return frozenset(ids)


def match_layers(entry: str, layers: Mapping[str, str]) -> set[str]:
    """Layer ids ``entry`` names: itself, those its glob pattern matches, or those of its op
    type (``Conv``, ``Gemm``, ``MatMul``)."""
    if entry in layers:
        return {entry}
    by_type = {layer for layer, op in layers.items() if op == entry}
    return by_type | set(fnmatch.filter(layers, entry))


def _no_match(option: str, entry: str, layers: Mapping[str, str]) -> str:
    """The error for a name that matches no layer, with the closest ids (and the op types)."""
    stem = entry.strip("*?[]") or entry
    close = difflib.get_close_matches(stem, list(layers), n=5, cutoff=0.3)
    close += [k for k in layers if stem in k and k not in close][: 5 - len(close)]
    ops = sorted(set(layers.values()))
    hint = f"closest layer ids: {', '.join(close)}" if close else "no layer id is close"
    return (
        f"{option} {entry!r} matches no layer ({hint}; op types here: "
        f"{', '.join(ops)}; `dyadiq inspect MODEL` lists every id)"
    )


def layer_ids(model: ModelInput) -> list[str]:
    """The ids of ``model``'s weighted layers, as ``exclude`` / ``pin`` / plans name them."""
    from dyadiq.frontends.onnx_frontend import load_onnx

    with contextlib.ExitStack() as stack:
        _, path = model_source(model, stack)
        return [node.name for node in load_onnx(path).weighted_layers()]
