"""A model whose weights live in external data files, handled through its small header.

Language models do not fit comfortably in memory twice, and over 2 GB cannot be one
protobuf at all, so weight-only quantization never serialises the whole model: it edits the
header (the graph, with initializers that only *point* into the data files), reads one
weight at a time, and opens onnxruntime sessions from the header, told where the original
data files are (nothing copied or linked).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, numpy_helper

from dyadiq.errors import ModelLoadError
from dyadiq.ort_sessions import Kernels

# onnxruntime reads external data of a model given as bytes from this folder
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def session_options(kernels: Kernels, threads: int = 2) -> ort.SessionOptions:
    """The options :func:`dyadiq.ort_sessions.open_session` uses, to add to."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if kernels is Kernels.EXACT:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


@dataclass(frozen=True)
class ModelFile:
    """``header``: the model with external tensors left unloaded; ``base_dir``: the folder
    their locations are relative to."""

    header: onnx.ModelProto
    base_dir: Path

    @classmethod
    def load(cls, path: Path) -> ModelFile:
        path = Path(path)
        try:
            header = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's and onnx's own errors
            raise ModelLoadError(f"{path} is not a readable ONNX model: {exc}") from exc
        base = path.parent.resolve()
        for location in _locations(header):
            target = (base / location).resolve()
            if not target.is_relative_to(base):
                raise ModelLoadError(f"refusing external data outside {base}: {location}")
            if not target.is_file():
                raise ModelLoadError(f"external data file not found: {target}")
        return cls(header, base)

    def array(self, name: str) -> np.ndarray:
        """One initializer's values (read from its data file if external)."""
        for tensor in self.header.graph.initializer:
            if tensor.name == name:
                return numpy_helper.to_array(tensor, base_dir=str(self.base_dir))
        raise ModelLoadError(f"no initializer named {name!r}")

    def materialised(self, header: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``header`` (derived from this file's) with every external tensor's
        bytes loaded into it: ready to be saved anywhere."""
        model = onnx.ModelProto()
        model.CopyFrom(header)
        external_data_helper.load_external_data_for_model(model, str(self.base_dir))
        return model

    def session(self, header: onnx.ModelProto, *, kernels: Kernels = Kernels.RUNTIME) -> Any:
        """An onnxruntime session for ``header`` (this file's header, edited), its unchanged
        external tensors read from the original data files (``base_dir``), never copied."""
        options = session_options(kernels)
        options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(self.base_dir))
        return ort.InferenceSession(
            header.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )


def _locations(header: onnx.ModelProto) -> set[str]:
    out = set()
    for tensor in external_data_helper._get_all_tensors(header):
        if external_data_helper.uses_external_data(tensor):
            out.add(external_data_helper.ExternalDataInfo(tensor).location)
    return out


def copy_header(header: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(header)
    return model


def with_outputs(header: onnx.ModelProto, names: Iterator[str] | list[str]) -> onnx.ModelProto:
    """A copy of ``header`` that also outputs the float tensors ``names``."""
    model = copy_header(header)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
            present.add(name)
    return model


def with_fed_weights(
    header: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]
) -> onnx.ModelProto:
    """A copy of ``header`` in which the initializers ``shapes`` names are graph inputs."""
    model = copy_header(header)
    kept = [t for t in model.graph.initializer if t.name not in shapes]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name, shape in shapes.items():
        model.graph.input.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape))
        )
    return model
