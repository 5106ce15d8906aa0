"""Ops that move or compare codes of one scale group (MaxPool, Concat, Max / Min, Transpose,
Reshape-likes): no requantization. (A Relu / Clip of one scale group is in ``elementwise``,
beside its requantizing form.)"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from dyadiq import integer_program as ip
from dyadiq.op_facts import OpKind
from dyadiq.passes.integerize.state import IntegerizerState, _static_shape


class CodeMovement(IntegerizerState):
    def _maxpool(self, node: gs.Node) -> bool:
        x, out = node.inputs[0], node.outputs[0]
        if int(node.attrs.get("ceil_mode", 0)) or any(
            d != 1 for d in node.attrs.get("dilations", [1])
        ):
            return False
        self._same_scale(node, [x, out])
        kernel = tuple(node.attrs["kernel_shape"])
        x_codes = self.codes(x)
        out_codes, _ = self.define(out)
        self.ops.append(
            ip.MaxPool(
                out_codes,
                x_codes,
                kernel,
                tuple(node.attrs.get("strides", [1] * len(kernel))),
                tuple(node.attrs.get("pads", [0] * 2 * len(kernel))),
            )
        )
        return True

    def _concat(self, node: gs.Node) -> bool:
        self._same_scale(node, [*node.inputs, node.outputs[0]])
        inputs = tuple(self.codes(t) for t in node.inputs)
        out_codes, _ = self.define(node.outputs[0])
        self.ops.append(ip.Concat(out_codes, inputs, int(node.attrs.get("axis", 0))))
        return True

    def _extremum(self, node: gs.Node) -> bool:
        """Max / Min of two activations in one scale group: compared as codes (:class:`ip.Max`)."""
        if len(node.inputs) != 2 or not all(isinstance(t, gs.Variable) for t in node.inputs):
            return False  # a constant operand or a variadic Max: runs in float
        out = node.outputs[0]
        self._same_scale(node, [*node.inputs, out])
        a_codes, b_codes = (self.codes(t) for t in node.inputs)
        out_codes, _ = self.define(out)
        op_type = ip.Max if self.graph.kind(node) is OpKind.MAX else ip.Min
        self.ops.append(op_type(out_codes, (a_codes, b_codes)))
        return True

    def _moved_codes(self, node: gs.Node) -> tuple[str, str]:
        """(input codes, output codes) of an op that only moves codes: one quantizer for both."""
        x, out = node.inputs[0], node.outputs[0]
        self._same_scale(node, [x, out])
        x_codes = self.codes(x)
        out_codes, _ = self.define(out)
        return x_codes, out_codes

    def _transpose(self, node: gs.Node) -> bool:
        x_codes, out_codes = self._moved_codes(node)
        rank = len(node.inputs[0].shape or ())
        perm = tuple(node.attrs.get("perm", range(rank)[::-1]))
        self.ops.append(ip.Transpose(out_codes, x_codes, perm))
        return True

    def _reshape(self, node: gs.Node) -> bool:
        x_codes, out_codes = self._moved_codes(node)
        self.ops.append(ip.Reshape(out_codes, x_codes, _static_shape(node.outputs[0])))
        return True
