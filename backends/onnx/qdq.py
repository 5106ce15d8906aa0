"""ONNX QDQ backend: export a fake-quantized graph as a standard ONNX model.

The model uses only default-domain QuantizeLinear / DequantizeLinear around float ops, so any
ONNX runtime runs it and onnxruntime fuses it into its integer kernels. 4-bit codes need
opset 21 (int4/uint4 tensors), which the pipeline arranges before rewriting.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from dyadiq.backends.onnx.checked import checked
from dyadiq.graph import QGraph
from dyadiq.io import save_model_atomic


def export_qdq(graph: QGraph) -> onnx.ModelProto:
    model = graph.to_onnx()
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", graph.opset))
    return checked(model, "QDQ")


def write_qdq(graph: QGraph, path: Path) -> onnx.ModelProto:
    model = export_qdq(graph)
    save_model_atomic(model, path)
    return model
