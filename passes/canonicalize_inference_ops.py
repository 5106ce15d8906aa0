"""Rewrite: spell ops that only matter for training or that have a quantizable twin as that twin.

Older exporters (the ONNX model zoo's opset 3-9 CNNs) leave two such ops behind:

- ``Dropout`` at inference is the identity (ONNX: ``training_mode`` absent or false, or
  ``is_test=1`` before opset 7). Kept, it is an opaque float node between two quantized layers,
  so the tensor is dequantized and requantized around it and backends see a float island.
  Removed (its consumers read its input), the layers on either side join up.
- ``Sum`` of two tensors is ``Add``; of n tensors, a chain of ``Add``. ``Add`` has an integer
  kernel, ``Sum`` does not, so ResNet-50's residual ``Sum`` nodes would stay float.
  ``Sum(a, b)`` and ``Add(a, b)`` are the same float32 operation (one rounding). For n > 2 the
  chain adds left to right; onnxruntime's ``Sum`` also accumulates in input order, so the
  outputs agree to float32 rounding either way.

Runs on the ONNX proto before simplification (onnxsim then drops what the rewrite leaves
unused), so ``inspect`` and every later pass see the same graph. Declined cases (a Dropout in
training mode or whose mask is read) are left as they are and named in the returned notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dyadiq.graph import default_opset


@dataclass
class InferenceOpsRewrite:
    dropouts_removed: int = 0
    sums_rewritten: int = 0
    declined: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        notes = []
        if self.dropouts_removed:
            notes.append(f"removed {self.dropouts_removed} inference-mode Dropout node(s)")
        if self.sums_rewritten:
            notes.append(f"rewrote {self.sums_rewritten} Sum node(s) as Add")
        return notes + self.declined


def _dropout_is_identity(node: onnx.NodeProto, opset: int, constants: dict[str, bool]) -> bool:
    if opset < 7:  # before opset 7 Dropout trains unless told it is a test
        is_test = next((a.i for a in node.attribute if a.name == "is_test"), 0)
        return bool(is_test)
    if opset >= 12 and len(node.input) > 2 and node.input[2]:
        return constants.get(node.input[2]) is False  # a computed training_mode is unknown
    return True


def _why_keep_dropout(
    node: onnx.NodeProto, opset: int, constants: dict[str, bool], used: set[str]
) -> str | None:
    if not _dropout_is_identity(node, opset, constants):
        return "not known to be in inference mode"
    mask = node.output[1] if len(node.output) > 1 else ""
    if mask and mask in used:
        return "its mask output is read"
    return None


def _training_modes(model: onnx.ModelProto) -> dict[str, bool]:
    """The constant ``training_mode`` inputs of the Dropout nodes, by name. Only those
    initializers are converted: a model's weights (a gigabyte for an LLM) are never read."""
    wanted = {
        node.input[2]
        for node in model.graph.node
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]
    }
    return {
        init.name: bool(numpy_helper.to_array(init).reshape(()))
        for init in model.graph.initializer
        if init.name in wanted and int(np.prod(init.dims)) == 1
    }


def canonicalize_inference_ops(model: onnx.ModelProto) -> InferenceOpsRewrite:
    """Rewrite ``model``'s main graph in place (the caller's copy); see the module docstring."""
    result = InferenceOpsRewrite()
    graph = model.graph
    opset = default_opset(model)
    constants = _training_modes(model)
    read = {name for node in graph.node for name in node.input}
    graph_outputs = {o.name for o in graph.output}
    read_in_subgraphs = _names_read_in_subgraphs(graph)
    renamed: dict[str, str] = {}  # a removed Dropout's output -> the tensor it passed on
    nodes: list[onnx.NodeProto] = []
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # detached: the graph's node list is rebuilt below
        node.input[:] = [renamed.get(name, name) for name in node.input]
        if node.domain in ("", "ai.onnx") and node.op_type == "Dropout":
            reason = _why_keep_dropout(node, opset, constants, read | graph_outputs)
            if reason is not None:
                result.declined.append(f"kept Dropout {node.name or node.output[0]}: {reason}")
                nodes.append(node)
            elif node.output[0] in graph_outputs | read_in_subgraphs:  # its name must survive
                nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]]))
                result.dropouts_removed += 1
            else:
                renamed[node.output[0]] = node.input[0]
                result.dropouts_removed += 1
            continue
        if node.domain in ("", "ai.onnx") and node.op_type == "Sum" and len(node.input) >= 1:
            nodes.extend(_as_adds(node))
            result.sums_rewritten += 1
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return result


def _names_read_in_subgraphs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                names |= {name for inner in sub.node for name in inner.input}
                names |= _names_read_in_subgraphs(sub)
    return names


def _as_adds(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    inputs, out = list(node.input), node.output[0]
    base = node.name or out
    if len(inputs) == 1:
        return [helper.make_node("Identity", inputs, [out], name=base)]
    adds = []
    acc = inputs[0]
    for k, term in enumerate(inputs[1:], start=1):
        last = k == len(inputs) - 1
        target = out if last else f"{base}/partial_{k}"
        adds.append(helper.make_node("Add", [acc, term], [target], name=base if last else target))
        acc = target
    return adds
