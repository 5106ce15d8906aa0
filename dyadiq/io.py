"""Safe output: atomic files, all-or-nothing folders, and refusing outputs that clobber inputs.

A file is written to a temporary name in its folder and renamed into place. A whole output
folder is built the same way one level up (:func:`staged_output_dir`): everything goes into a
hidden sibling folder, which replaces the output folder only when the run succeeds, so a
failure, a full disk or Ctrl-C leaves the previous folder exactly as it was (or no folder).
Written files get the permissions the umask gives (0644 by default), like any other file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dyadiq.errors import OutputPathError


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; others' files follow umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


# A protobuf message cannot exceed 2 GiB; a model at or above this size keeps its weights in
# an external data file (the limit leaves room for the graph itself).
PROTOBUF_LIMIT = 2**31 - 1
# Tensors at least this large go to the data file when a model is written with external data.
EXTERNAL_DATA_THRESHOLD = 1024
# Offsets in the data file are aligned (onnxruntime can then memory-map each tensor).
EXTERNAL_DATA_ALIGNMENT = 4096


def save_model_atomic(
    model: onnx.ModelProto, path: Path, *, external_data: bool | None = None
) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written.

    ``external_data``: True puts every tensor of at least ``EXTERNAL_DATA_THRESHOLD`` bytes in
    ``<name>.data`` beside the model (offsets relative to that file, so the pair can move
    together); None (the default) does so only when the model would not fit one protobuf
    (2 GiB); False refuses such a model. ``model`` itself is never modified. The data file is
    renamed into place before the graph, so a graph on disk always finds its data.
    """
    path = Path(path)
    too_big = model.ByteSize() >= PROTOBUF_LIMIT
    if external_data is None:
        external_data = too_big
    if not external_data:
        if too_big:
            raise OutputPathError(f"{path}: a model over 2 GB must be written with external data")
        write_bytes_atomic(path, model.SerializeToString())
        return [path]
    data_path = path.with_name(path.name + ".data")
    header = _write_external_data(model, data_path)
    write_bytes_atomic(path, header.SerializeToString())
    return [path, data_path]


def _write_external_data(model: onnx.ModelProto, data_path: Path) -> onnx.ModelProto:
    """Stream the large tensors of ``model`` into ``data_path`` (atomically) and return a copy
    of the model whose tensors point there instead of holding their bytes. Only the small
    tensors are ever copied: the large ones are detached from ``model`` while the copy is
    made, then put back, so peak memory stays near one model."""
    from onnx import external_data_helper

    tensors = list(external_data_helper._get_all_tensors(model))
    large = [
        k
        for k, t in enumerate(tensors)
        if not external_data_helper.uses_external_data(t)
        and t.data_type != onnx.TensorProto.STRING  # strings cannot be external data
        and _tensor_nbytes(t) >= EXTERNAL_DATA_THRESHOLD
    ]
    detached: list[onnx.TensorProto] = []
    for k in large:
        keep = onnx.TensorProto()
        keep.CopyFrom(tensors[k])
        detached.append(keep)
        tensors[k].Clear()
        tensors[k].name, tensors[k].data_type = keep.name, keep.data_type
        tensors[k].dims.extend(keep.dims)
    try:
        header = onnx.ModelProto()
        header.CopyFrom(model)
    finally:
        for k, keep in zip(large, detached, strict=True):
            tensors[k].CopyFrom(keep)
    header_tensors = list(external_data_helper._get_all_tensors(header))
    data_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{data_path.name}.", suffix=".tmp", dir=data_path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            offset = 0
            for k, keep in zip(large, detached, strict=True):
                payload = keep.raw_data or _as_raw(keep)
                pad = -offset % EXTERNAL_DATA_ALIGNMENT
                handle.write(b"\0" * pad)
                offset += pad
                handle.write(payload)
                _point_to(header_tensors[k], data_path.name, offset, len(payload))
                offset += len(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, data_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return header


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make a payload-free tensor refer to ``length`` bytes at ``offset`` of ``location``."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _as_raw(tensor: onnx.TensorProto) -> bytes:
    """The raw little-endian bytes of a tensor held in typed fields (int4 packed two a byte,
    as the external-data format stores it)."""
    from onnx import numpy_helper

    return bytes(numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data)


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's payload as stored (raw bytes, or its typed fields)."""
    if tensor.raw_data:
        return len(tensor.raw_data)
    return tensor.ByteSize()


def input_overlap(output_dir: Path, item: Path) -> str | None:
    """Why writing (or replacing) folder ``output_dir`` would touch input ``item``, or None.

    Both are compared after resolving links, so a symlinked folder is caught too."""
    out = Path(output_dir).resolve()
    src = Path(item).resolve()
    if out == src.parent:
        return (
            f"is the input model's folder ({src.parent})"
            if src.is_file()
            else (f"is the folder of input {item}")
        )
    if out == src:
        return f"is the input {item}"
    if src.is_relative_to(out):
        return f"holds the input {item}"
    if src.is_dir() and out.is_relative_to(src):
        return f"is inside the input folder {item}"
    return None


def check_output_dir(output_dir: Path, *inputs: Path) -> Path:
    """The resolved output folder; refuse one that is, holds or sits in one of the inputs."""
    out = Path(output_dir).resolve()
    for item in inputs:
        why = input_overlap(out, item)
        if why is not None:
            raise OutputPathError(
                f"output folder {output_dir} {why}; choose a separate folder so the input "
                "is never overwritten"
            )
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output path {output_dir} exists and is not a folder")
    return out


def prepare_output_dir(output_dir: Path, *inputs: Path) -> Path:
    """Create ``output_dir``; refuse it when it is (or would overwrite) one of the inputs."""
    out = check_output_dir(output_dir, *inputs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create output folder {output_dir}: {exc}") from exc
    return out


# What a quantize run writes; an earlier run's copies are replaced, never mixed with new ones.
# Anything else in a reused folder (sensitivity.json, the bisection state, a user's notes) is
# carried over into the new folder untouched.
QUANTIZE_OUTPUTS = frozenset(
    {"model.qdq.onnx", "model.int.onnx", "plan.json", "report.json", "ort_quantize_static.qdq.onnx"}
)


def _missing_ancestors(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _carry_over(old: Path, new: Path, replaced: Iterable[str]) -> None:
    """Hard-link (or copy) the entries of ``old`` that this run does not write into ``new``."""
    replaced = set(replaced)
    for entry in old.iterdir():
        if entry.name in replaced or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _link_or_copy(source: str, target: str) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copy2(source, target)


def _commit(staging: Path, out: Path, replaced: Iterable[str]) -> None:
    """Put ``staging`` where ``out`` is; the old folder is renamed aside, then deleted."""
    if not out.exists():
        os.rename(staging, out)
        return
    _carry_over(out, staging, replaced)
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old / out.name, out)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_output_dir(
    output_dir: Path,
    *inputs: Path,
    replaces: Iterable[str] = QUANTIZE_OUTPUTS,
    keep_on: tuple[type[BaseException], ...] = (),
) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``output_dir`` to write into; it replaces
    ``output_dir`` when the block ends normally (or raises one of ``keep_on``: a complete
    result kept for inspection). On any other exception, Ctrl-C included, the sibling is
    deleted and ``output_dir`` is left as it was (absent if it was); the exception says so.

    Entries of an existing ``output_dir`` outside ``replaces`` are carried over.
    """
    out = check_output_dir(output_dir, *inputs)
    created = _missing_ancestors(out.parent)
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700
    except OSError as exc:
        _remove_empty(created)
        raise OutputPathError(f"cannot create output folder {output_dir}: {exc}") from exc
    state = "left as it was" if existed else "not created"
    try:
        yield staging
    except keep_on:
        _finish(staging, out, replaces, created, output_dir, state)
        raise
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        _say_what_became_of(exc, output_dir, state)
        raise
    _finish(staging, out, replaces, created, output_dir, state)


def _finish(
    staging: Path,
    out: Path,
    replaces: Iterable[str],
    created: list[Path],
    output_dir: Path,
    state: str,
) -> None:
    try:
        _commit(staging, out, replaces)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        _say_what_became_of(exc, output_dir, state)
        if isinstance(exc, OSError):
            raise OutputPathError(f"cannot move the result into {output_dir}: {exc}") from exc
        raise


def _say_what_became_of(exc: BaseException, output_dir: Path, state: str) -> None:
    """Note on ``exc`` what happened to the output folder; an outer staging (the CLI's around
    the pipeline's) replaces the inner one's note, which names a hidden temporary folder."""
    notes = getattr(exc, "__notes__", None)
    if notes is not None:
        notes[:] = [n for n in notes if not n.startswith(_NOTE_PREFIX)]
    exc.add_note(f"{_NOTE_PREFIX}{output_dir} {state}")


_NOTE_PREFIX = "output folder "


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


def relocated(value: Any, staging: Path, final: Path) -> Any:
    """``value`` (JSON-like) with paths under ``staging`` rewritten to lie under ``final``."""
    if isinstance(value, str):
        prefix = str(staging)
        if value == prefix or value.startswith(prefix + os.sep):
            return str(final) + value[len(prefix) :]
        return value
    if isinstance(value, dict):
        return {k: relocated(v, staging, final) for k, v in value.items()}
    if isinstance(value, list):
        return [relocated(v, staging, final) for v in value]
    return value


def describe_os_error(exc: OSError) -> str:
    """One line for a fault a user can act on (full disk, permissions, read-only disk)."""
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    where = f": {exc.filename}" if exc.filename else ""
    return f"{reason}{where}"


def save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    savez: Any = np.savez  # numpy's stubs type **arrays as its allow_pickle keyword
    savez(buffer, **dict(arrays))
    write_bytes_atomic(path, buffer.getvalue())
