"""Sentence-embedding heads: masked mean pooling and L2 normalisation as integer ops
(:mod:`dyadiq.passes.sentence_pooling`), planned after the LayerNorms (the pooling reads the
last one's wide residual stream) and emitted at each pattern's Div."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from dyadiq import integer_program as ip
from dyadiq.errors import InternalError
from dyadiq.passes.integerize.state import IntegerizerState, _known_dims, _static_shape
from dyadiq.passes.sentence_pooling import (
    L2NormalizeMatch,
    MaskedMeanPoolMatch,
    absorbed_nodes,
    find_sentence_pooling,
    l2_normalize_op,
    mean_pool_op,
)
from dyadiq.quantizers import ActQuant


class PoolingOps(IntegerizerState):
    def _plan_pooling(self) -> None:
        """Fill ``pooling`` (Div node -> its integer op and output quantizer); the patterns'
        other nodes join ``tabulated``; a declined or refused one says why (notes)."""
        codes = {name: (f"{name}_q", q) for name, q in self.params.items()}
        for node in self.graph.nodes():
            norm = self.layer_norms.get(node.name)
            if norm is not None:
                wide = norm.op.output if norm.op.requant is None else norm.op.wide_output
                if wide is not None:
                    codes[node.outputs[0].name] = (wide, norm.wide)
        found = find_sentence_pooling(self.graph, codes.keys())
        self.notes.extend(f"sentence pooling declined: {reason}" for reason in found.declined)
        pools: dict[str, MaskedMeanPoolMatch] = {}
        norms: dict[str, L2NormalizeMatch] = {}
        for node in self.graph.nodes():  # graph order: a pooling before the norm of its output
            match = found.pools.get(node.name) or found.norms.get(node.name)
            if match is None:
                continue
            if match.x.name not in codes:
                self.notes.append(f"{node.name} in float: its input has no integer codes")
                continue
            x_codes, qx = codes[match.x.name]
            out = node.outputs[0].name
            built: tuple[ip.MaskedMeanPool | ip.L2Normalize, ActQuant] | str
            if isinstance(match, MaskedMeanPoolMatch):
                built = mean_pool_op(match, x_codes, qx, f"{out}_wide")
            else:
                built = l2_normalize_op(match, x_codes, qx, f"{out}_wide")
            if isinstance(built, str):
                self.notes.append(f"{node.name} in float: {built}")
                continue
            if isinstance(match, MaskedMeanPoolMatch):
                pools[node.name] = match
            else:
                norms[node.name] = match
            self.pooling[node.name] = (match.x, *built)
            codes[out] = (built[0].output, built[1])
        self.tabulated.update(absorbed_nodes(pools, norms))

    def _pooling_op(self, node: gs.Node) -> None:
        x, op, quant = self.pooling[node.name]
        read = self.wide_of.get(x.name) or self.codes(x)  # an 8-bit site may be float still
        if read != op.input:
            raise InternalError(f"{node.name}: reads {read}, planned {op.input}")
        if isinstance(op, ip.MaskedMeanPool):
            if op.mask not in self.float_ready:
                raise InternalError(f"{node.name}: the mask {op.mask} is not computed before it")
            self.shapes.setdefault(op.mask, _known_dims(self.graph.tensors()[op.mask]))
        out = node.outputs[0]
        self.quant[op.output] = quant
        self.shapes[op.output] = _static_shape(out)
        self.wide_of[out.name] = op.output
        self.ops.append(op)
