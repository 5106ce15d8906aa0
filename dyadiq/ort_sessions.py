"""onnxruntime sessions that score models the same way on every CPU.

With graph optimisation on, onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into
QLinearConv and runs u8 x s8 products with its MLAS kernels. On x86 CPUs without VNNI those use
``vpmaddubsw``, which saturates pairwise sums at int16: a QDQ model then scores differently on
an AVX2 machine than on an AVX-512 VNNI one (0.66 vs 0.84 top-1 agreement for the same
ImageNet model). A quality figure must describe the model, not the CPU, so dyadiq scores with
``Kernels.EXACT``: optimisation off, every QDQ pair run as written (dequantize, float op,
quantize), integer ops on the kernels they name. ``Kernels.RUNTIME`` is what onnxruntime on
this CPU would give a user who deploys the QDQ model as is; it is reported next to the exact
figure, never instead of it.
"""

from __future__ import annotations

import enum
from pathlib import Path

import onnx
import onnxruntime as ort


class Kernels(enum.Enum):
    EXACT = "exact"  # graph optimisation off: an exact simulation of the QDQ arithmetic
    RUNTIME = "runtime"  # onnxruntime's fused kernels on this CPU (may saturate without VNNI)


def open_session(
    model: onnx.ModelProto | Path | str | bytes,
    *,
    kernels: Kernels = Kernels.EXACT,
    threads: int = 2,
) -> ort.InferenceSession:
    """A CPU session for ``model`` (a proto, serialized bytes or a path) with ``kernels``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if kernels is Kernels.EXACT:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source: str | bytes
    if isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    elif isinstance(model, Path):
        source = str(model)
    else:
        source = model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
