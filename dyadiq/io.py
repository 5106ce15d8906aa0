"""Safe output: atomic writes, and refusing output locations that would clobber the input."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
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
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def save_model_atomic(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() >= 2**31 - 1:
        raise OutputPathError(
            f"{path}: models over 2 GB need external data, which dyadiq does not write yet"
        )
    write_bytes_atomic(path, model.SerializeToString())


def prepare_output_dir(output_dir: Path, *inputs: Path) -> Path:
    """Create ``output_dir``; refuse it when it is (or would overwrite) one of the inputs."""
    out = Path(output_dir).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src or out == src.parent:
            raise OutputPathError(
                f"output folder {output_dir} is the input model's folder ({src.parent}); "
                "choose a separate folder so the input is never overwritten"
            )
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output path {output_dir} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create output folder {output_dir}: {exc}") from exc
    return out


def save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    savez: Any = np.savez  # numpy's stubs type **arrays as its allow_pickle keyword
    savez(buffer, **dict(arrays))
    write_bytes_atomic(path, buffer.getvalue())
