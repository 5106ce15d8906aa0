"""Float islands: a node without an integer rewrite runs in float between Dequantize and
Quantize, exported as its own ONNX node (with the outer-scope tensors its subgraphs read)."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from dyadiq import integer_program as ip
from dyadiq.passes.integerize.state import IntegerizerState, _onnx_type


class FloatIslands(IntegerizerState):
    def _float(self, node: gs.Node) -> None:
        proto = OnnxExporter.export_node(node)
        tensors = self.graph.tensors()
        # an If / Loop / Scan body may read tensors of this graph by name (outer scope): they
        # are inputs of the island too, or the island would run before they exist
        captured = [tensors[n] for n in outer_scope_names(proto) if n in tensors]
        read = [t for t in [*node.inputs, *captured] if t.name]
        inputs = [self.real(t) for t in read if isinstance(t, gs.Variable)]
        constants = {t.name: t for t in read if isinstance(t, gs.Constant)}
        initializers = tuple(OnnxExporter.export_tensor_proto(t) for t in constants.values())
        outputs = tuple(t.name for t in node.outputs)
        self.ops.append(
            ip.FloatIsland(
                (proto,),
                initializers,
                tuple(inputs),
                outputs,
                tuple(_onnx_type(tensors[n]) for n in inputs),
                tuple(_onnx_type(t) for t in node.outputs),
            )
        )
        self.float_ready.update(outputs)
        self.float_ops.append(f"{node.op} {node.name}")


def outer_scope_names(node: onnx.NodeProto) -> list[str]:
    """Tensors that ``node``'s subgraphs (If branches, Loop / Scan bodies, nested) read from
    the enclosing graph, in first-use order: names no subgraph defines before using them."""
    found: dict[str, None] = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            bodies = [attr.g]
        elif attr.type == onnx.AttributeProto.GRAPHS:
            bodies = list(attr.graphs)
        else:
            continue
        for body in bodies:
            local = {i.name for i in body.input} | {t.name for t in body.initializer}
            local |= {t.values.name for t in body.sparse_initializer}
            for inner in body.node:
                for name in [*inner.input, *outer_scope_names(inner)]:
                    if name and name not in local:
                        found[name] = None
                local.update(inner.output)
    return list(found)
