"""ONNX QDQ backend: export a fake-quantized graph as a standard ONNX model, in one of two
styles.

The model uses only default-domain QuantizeLinear / DequantizeLinear around float ops, so any
ONNX runtime runs it. 4-bit codes need opset 21 (int4/uint4 tensors), which the pipeline
arranges before rewriting.

- ``ort`` (default): onnxruntime's QDQ layout. Activations asymmetric (uint8 by default), the
  bias an int32 DequantizeLinear at ``s_x * s_w``, Relu / Clip removed where the quantizer's
  saturation reproduces them, so onnxruntime fuses ``DQ -> Conv -> Q`` into one integer kernel.
- ``tensorrt``: what TensorRT's explicit quantization accepts and fuses (TensorRT developer
  guide, "Explicit Quantization" and "Q/DQ Layer-Placement Recommendations"): symmetric
  quantization only, so every zero point is 0 (the ONNX parser refuses others); activations
  per-tensor signed int8 in [-128, 127], scale ``amax / 127``; weights per output channel
  signed int8 in [-127, 127], pre-quantized and followed by a DequantizeLinear on the
  channel axis; Q/DQ on the inputs of weighted ops, and no Q/DQ on the output of a weighted op
  that nothing quantized reads (the model's outputs stay float); ReLU kept as written
  (TensorRT fuses it, "do not simulate ReLU fusion"); the bias in float, because TensorRT
  quantizes only the operands of its int8 kernels and folds a float bias into them.
  :func:`tensorrt_violations` checks a model against these rules.

The pipeline makes the numbers of the ``tensorrt`` style (symmetric ranges, output sites)
before rewriting (:mod:`dyadiq.pipeline`); this module only writes the bias as TensorRT
wants it, which leaves every value the model computes unchanged.
"""

from __future__ import annotations

import enum
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dyadiq.backends.onnx.checked import checked
from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph
from dyadiq.io import save_model_atomic


class QDQStyle(enum.Enum):
    """The QDQ layout written: onnxruntime's (default) or TensorRT's (module docstring)."""

    ORT = "ort"
    TENSORRT = "tensorrt"

    @classmethod
    def parse(cls, value: str | QDQStyle) -> QDQStyle:
        """``"ort"`` / ``"tensorrt"`` (or a style) as a style; anything else is a ConfigError."""
        if isinstance(value, QDQStyle):
            return value
        try:
            return cls(value)
        except ValueError as exc:
            choices = ", ".join(s.value for s in cls)
            raise ConfigError(f"qdq style must be one of {choices}, got {value!r}") from exc


# Ops TensorRT runs as int8 kernels when their inputs come out of DequantizeLinear.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# The output channel axis of each weighted op's weight, where per-channel scales must lie.
_WEIGHT_CHANNEL_AXIS = {"Conv": 0, "ConvTranspose": 1}


def export_qdq(graph: QGraph, style: QDQStyle = QDQStyle.ORT) -> onnx.ModelProto:
    """The simulator graph as a checked ONNX model in ``style``."""
    model = graph.to_onnx()
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", graph.opset))
    if style is QDQStyle.TENSORRT:
        float_bias(model)
    return checked(model, "QDQ")


def write_qdq(graph: QGraph, path: Path, style: QDQStyle = QDQStyle.ORT) -> onnx.ModelProto:
    """:func:`export_qdq`, saved atomically to ``path``; returns the model."""
    model = export_qdq(graph, style)
    save_model_atomic(model, path)
    return model


def float_bias(model: onnx.ModelProto) -> int:
    """Replace each DequantizeLinear of int32 constant codes (a bias) by the float constant it
    computes, in place; returns how many. The value is the one onnxruntime computes,
    ``float32(code) * scale`` in float32, so outputs do not change."""
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    folded = 0
    for node in model.graph.node:
        codes = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if codes is None or codes.data_type != onnx.TensorProto.INT32:
            keep.append(node)
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        values = numpy_helper.to_array(codes).astype(np.float32) * scale
        model.graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
        folded += 1
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {name for node in model.graph.node for name in node.input}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for tensor in unused:
        model.graph.initializer.remove(tensor)
    return folded


def tensorrt_violations(model: onnx.ModelProto) -> list[str]:
    """Every way ``model`` departs from TensorRT's explicit-quantization rules (see the module
    docstring); empty when TensorRT can build it as written."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    outputs = {o.name for o in model.graph.output}
    problems: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            problems.append(f"{node.name}: zero point must be int8 0, got {_describe(zero)}")
        scale = inits.get(node.input[1])
        if scale is None or np.any(scale <= 0):
            problems.append(f"{node.name}: scale must be a positive constant")
        codes = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if codes is None:  # an activation quantizer: per tensor
            if scale is not None and scale.size != 1:
                problems.append(f"{node.name}: activation scales must be per tensor")
        elif codes.dtype != np.int8:
            problems.append(f"{node.name}: DequantizeLinear of {codes.dtype} (weights are int8)")
        elif np.any(codes < -127):
            problems.append(f"{node.name}: weight codes must lie in [-127, 127]")
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        weight = node.input[1]
        if weight in inits:  # a float weight: TensorRT would not run this op in int8
            problems.append(f"{node.name}: weight {weight} is not dequantized int8")
            continue
        w_dq = producer.get(weight)
        if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in inits:
            continue  # activation x activation MatMul: both inputs are activations
        expected = _WEIGHT_CHANNEL_AXIS.get(node.op_type)
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            expected = 0 if trans_b else 1
        elif node.op_type == "MatMul":
            expected = inits[w_dq.input[0]].ndim - 1
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        if inits[w_dq.input[1]].size > 1 and axis % inits[w_dq.input[0]].ndim != expected:
            problems.append(f"{node.name}: weight scales on axis {axis}, not {expected}")
        data = producer.get(node.input[0])
        if data is None or data.op_type != "DequantizeLinear":
            problems.append(f"{node.name}: input {node.input[0]} is not quantized (Q/DQ)")
    # "do not quantize the outputs of weighted operations" where nothing quantized reads them
    for name in outputs:
        made_by = producer.get(name)
        if made_by is not None and made_by.op_type == "DequantizeLinear":
            problems.append(f"model output {name} comes out of a DequantizeLinear")
    return problems


def _describe(zero: np.ndarray | None) -> str:
    if zero is None:
        return "none"
    return f"{zero.dtype} {np.unique(zero)[:4].tolist()}"
