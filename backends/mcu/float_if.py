"""A data-dependent ``If`` inside a float island, as C: ``if (cond[0]) { then } else { else }``.

Each branch is a small graph that reads tensors of the enclosing island by name (its *free
inputs*). Its tensors' shapes, types and constant values come from running the branch alone in
onnxruntime on its free inputs (their constant values where the island knows them, zeros
otherwise); its own tensors live in ``static`` arrays local to the branch's block (a branch
runs or not, so it does not share the island scratch), and its outputs are copied into the
``If``'s outputs. Both branches must give outputs of the ``If``'s static shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx

from dyadiq.errors import UnsupportedModelError

from . import float_ops


def free_inputs(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` reads from enclosing scopes, in first-use order."""
    local = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    seen: list[str] = []
    for node in graph.node:
        for name in node_reads(node):
            if name not in local and name not in seen:
                seen.append(name)
        local.update(node.output)
    return seen


def node_reads(node: onnx.NodeProto) -> list[str]:
    """A node's inputs plus what its subgraphs read from outside them."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            names.extend(free_inputs(attr.g))
    return names


def branch_ops(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Every node of an If's branches, nested ones included."""
    nodes: list[onnx.NodeProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            for inner in attr.g.node:
                nodes.append(inner)
                nodes.extend(branch_ops(inner))
    return nodes


class Layout:
    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, np.dtype],
        constants: dict[str, np.ndarray],
    ) -> None:
        self.shapes, self.dtypes, self.constants = shapes, dtypes, constants


def probe_branch(graph: onnx.GraphProto, outer: float_ops.Layout, opset: int) -> Layout:
    from dyadiq.ort_sessions import Kernels, open_session

    inputs = free_inputs(graph)
    infos = [
        onnx.helper.make_tensor_value_info(
            n, onnx.helper.np_dtype_to_tensor_dtype(outer.dtypes[n]), outer.shapes[n]
        )
        for n in inputs
    ]
    produced = [o for node in graph.node for o in node.output if o]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(list(graph.node), "branch", infos, [], list(graph.initializer)),
        opset_imports=[onnx.helper.make_opsetid("", opset)],
    )
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({o.name: o.type.tensor_type.elem_type for o in graph.output})
    for name in produced:
        if name not in types:
            raise UnsupportedModelError(f"If branch tensor {name}: type unknown")
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    feeds = {
        n: outer.constants[n]
        if n in outer.constants
        else np.zeros(outer.shapes[n], outer.dtypes[n])
        for n in inputs
    }
    session = open_session(model, kernels=Kernels.EXACT, threads=1)
    values = dict(zip(produced, session.run(produced, feeds), strict=True))
    for init in graph.initializer:
        values[init.name] = onnx.numpy_helper.to_array(init)
    known = {n for n in inputs if n in outer.constants} | {i.name for i in graph.initializer}
    for node in graph.node:
        reads = node_reads(node)
        if node.op_type in ("Constant", "Shape", "Size") or (
            reads and all(n in known for n in reads)
        ):
            known.update(node.output)
    return Layout(
        {n: tuple(np.shape(v)) for n, v in values.items()},
        {n: np.asarray(v).dtype for n, v in values.items()},
        {n: np.asarray(v) for n, v in values.items() if n in known},
    )


EmitNodes = Callable[[Sequence[onnx.NodeProto], float_ops.Layout, dict[str, str], str], list[str]]


def emit_if(
    node: onnx.NodeProto,
    layout: float_ops.Layout,
    names: dict[str, str],
    tag: str,
    emit_nodes: EmitNodes,
    opset: int,
) -> str:
    branches = {a.name: a.g for a in node.attribute}
    blocks = []
    for label in ("then_branch", "else_branch"):
        graph = branches[label]
        inner = probe_branch(graph, layout, opset)
        merged = Layout(
            {**layout.shapes, **inner.shapes},
            {**layout.dtypes, **inner.dtypes},
            {**layout.constants, **inner.constants},
        )
        local = dict(names)
        lines = []
        own = [n for n in inner.shapes if n not in layout.shapes]
        for i, name in enumerate(own):
            cname = f"{tag}_{label[0]}{i}"
            local[name] = cname
            if name in inner.constants:
                lines.append(float_ops.c_constant(cname, inner.constants[name]).strip())
            else:
                size = max(int(np.prod(inner.shapes[name], dtype=np.int64)), 1)
                ctype = float_ops.c_type(inner.dtypes[name])
                lines.append(f"static {ctype} {cname}[{size}];")
        lines.extend(emit_nodes(graph.node, merged, local, f"{tag}_{label[0]}"))
        for out, target in zip(graph.output, node.output, strict=True):
            if merged.shapes[out.name] != layout.shapes[target]:
                raise UnsupportedModelError(
                    f"If {node.name}: {label} gives {target} the shape "
                    f"{merged.shapes[out.name]}, not {layout.shapes[target]}"
                )
            size = int(np.prod(layout.shapes[target], dtype=np.int64))
            ctype = float_ops.c_type(layout.dtypes[target])
            lines.append(f"memcpy({names[target]}, {local[out.name]}, {size} * sizeof({ctype}));")
        blocks.append("{\n        " + "\n        ".join(lines) + "\n    }")
    return f"if ({names[node.input[0]]}[0]) {blocks[0]} else {blocks[1]}"
