"""Transformer ops: the I-BERT softmax, the masked attention softmax, and the integer
LayerNorm (planned in graph order, with the wide residual stream between LayerNorms)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq import integer_program as ip
from dyadiq.errors import InternalError
from dyadiq.op_facts import OpKind
from dyadiq.passes.integer_embedding import EmbeddingSum, find_embedding_sum, integer_embedding
from dyadiq.passes.integer_layer_norm import (
    IntegerLayerNorm,
    integer_layer_norm,
    layer_norm_operands,
)
from dyadiq.passes.integerize.state import IntegerizerState, _known_dims, _requant, _static_shape
from dyadiq.passes.masked_softmax import MaskedSoftmaxMatch
from dyadiq.quantizers import ActQuant

SOFTMAX_FRAC_BITS = 16
SOFTMAX_WORK_BITS = 10


class TransformerOps(IntegerizerState):
    @staticmethod
    def _softmax_constants(qx: ActQuant) -> tuple[int, int, int, int] | str:
        """(upscale bits, q_ln2, q_b, q_c) of the I-BERT exp at input scale ``qx.scale``, or
        why this scale has none."""
        # Work at a scale of at most 2^-10 so that ln 2 and the fit's constants have ~10 bits.
        upscale = max(0, int(np.ceil(np.log2(qx.scale * 2**SOFTMAX_WORK_BITS))))
        if upscale > ip.SOFTMAX_MAX_UPSCALE_BITS:
            return "logits too large for the int64 working scale"
        work = qx.scale / 2**upscale
        if work < 2.0**-20:
            return "(p + q_b)^2 2^F could leave int64 at this fine an input scale"
        ln2_codes = int(np.floor(np.log(2.0) / work))
        # I-BERT's second-order fit exp(p) ~ 0.3585 (p + 1.353)^2 + 0.344 on (-ln 2, 0];
        # q_c folds c into the squared term's scale a S^2.
        b_codes = int(np.floor(1.353 / work))
        c_codes = int(np.floor(0.344 / (0.3585 * work**2)))
        return upscale, ln2_codes, b_codes, c_codes

    def _softmax_blocker(self, scores: gs.Tensor) -> str | None:
        found = self._softmax_constants(self.q(scores))
        return found if isinstance(found, str) else None

    def _softmax(self, node: gs.Node) -> bool:
        x, out = node.inputs[0], node.outputs[0]
        rank = len(x.shape or ())
        if int(node.attrs.get("axis", -1)) % max(rank, 1) != rank - 1:
            return False
        constants = self._softmax_constants(self.q(x))
        if isinstance(constants, str):
            return False  # keep this softmax in float
        x_codes = self.codes(x)
        out_codes, qy = self.define(out)
        frac = SOFTMAX_FRAC_BITS
        rq = _requant(1.0 / (2**frac * qy.scale), qy, axis=-1)
        self.ops.append(ip.Softmax(out_codes, x_codes, *constants, frac, rq))
        return True

    def _masked_softmax(self, match: MaskedSoftmaxMatch) -> None:
        constants = self._softmax_constants(self.q(match.scores))
        if isinstance(constants, str):
            raise InternalError(f"{match.add.name}: a matched masked softmax {constants}")
        x_codes = self.codes(match.scores)
        keep = match.keep.name
        if keep not in self.float_ready:
            raise InternalError(f"{match.add.name}: the mask {keep} is not computed before it")
        self.shapes.setdefault(keep, _known_dims(match.keep))
        out_codes, qy = self.define(match.softmax.outputs[0])
        frac = SOFTMAX_FRAC_BITS
        rq = _requant(1.0 / (2**frac * qy.scale), qy, axis=-1)
        self.ops.append(
            ip.MaskedSoftmax(out_codes, x_codes, keep, match.keep_nonzero, *constants, frac, rq)
        )

    def _plan_layer_norms(self) -> dict[str, IntegerLayerNorm]:
        """LayerNorm node -> its integer op, in graph order; a residual Add it absorbs is
        skipped (``tabulated``); a LayerNorm that stays float says why (notes).

        Its 8-bit output takes the quantizer the simulator gives the output, or else the one
        of a scale-sharing consumer (the Reshape before a MatMul); a wide int32 output carries
        the value the simulator keeps in float (the residual stream) to the next LayerNorm."""
        planned: dict[str, IntegerLayerNorm] = {}
        simulated = set(self.params)
        codes = {name: (f"{name}_q", q) for name, q in self.params.items()}
        graph_outputs = {t.name for t in self.graph.graph.outputs}
        self.graph.graph.toposort()
        for node in self.graph.nodes():
            if self.graph.kind(node) is not OpKind.LAYER_NORM:
                continue
            out = node.outputs[0]
            embedding = self._embedding_sum(node.inputs[0], codes)
            if embedding is not None:  # tentatively: kept only if the LayerNorm is integer
                codes[node.inputs[0].name] = (embedding[0].output, embedding[1])
            found = layer_norm_operands(node, codes.keys(), self.tabulated)
            if isinstance(found, str):
                self.notes.append(f"LayerNormalization {node.name} in float: {found}")
                self._float_output_codes(out, codes)
                continue
            operands, add = found
            out_q = self.params.get(out.name) or self._shared_quantizer(out)
            coded = [c for c in out.outputs if out_q is not None and self._keeps_codes(c)]
            wide = out.name not in simulated and (
                len(coded) < len(out.outputs) or out.name in graph_outputs
            )
            built = integer_layer_norm(
                node,
                [codes[t.name] for t in operands],
                (f"{out.name}_q", out_q) if out_q is not None else None,
                f"{out.name}_wide" if wide else None,
            )
            if isinstance(built, str):
                self.notes.append(f"LayerNormalization {node.name} in float: {built}")
                self._float_output_codes(out, codes)
                continue
            planned[node.name] = built
            if embedding is not None:
                op, quant, found_sum = embedding
                self.embeddings[found_sum.gather.name] = (op, quant, node.inputs[0].name)
                self.tabulated.update(a.name for a in found_sum.adds)
            if add is not None:
                self.tabulated.add(add.name)
            if out_q is not None:
                self.params[out.name] = out_q
                codes[out.name] = (f"{out.name}_q", out_q)
            if wide:  # the next LayerNorm reads the residual stream wide
                codes[out.name] = (f"{out.name}_wide", built.wide)
        return planned

    def _embedding_sum(
        self, tensor: gs.Tensor, codes: dict[str, tuple[str, ActQuant]]
    ) -> tuple[ip.Embedding, ActQuant, EmbeddingSum] | None:
        """A LayerNorm input without codes that is a token embedding sum, as an integer op
        (:mod:`dyadiq.passes.integer_embedding`); None (with a note if it looked like one)."""
        if tensor.name in codes:
            return None
        found = find_embedding_sum(tensor)
        if isinstance(found, str):
            return None
        built = integer_embedding(found, f"{tensor.name}_wide")
        if isinstance(built, str):
            self.notes.append(f"embedding sum {tensor.name} in float: {built}")
            return None
        return built[0], built[1], found

    def _embedding(self, node: gs.Node) -> None:
        """The Gather that starts a planned embedding sum: the whole sum as wide codes."""
        op, quant, total = self.embeddings[node.name]
        if op.indices not in self.float_ready:
            raise InternalError(f"{node.name}: the ids {op.indices} are not computed before it")
        self.shapes.setdefault(op.indices, _known_dims(self.graph.tensors()[op.indices]))
        self.quant[op.output] = quant
        self.shapes[op.output] = self.shapes.get(op.output) or _static_shape(
            self.graph.tensors()[total]
        )
        self.wide_of[total] = op.output
        self.ops.append(op)

    def _float_output_codes(self, out: gs.Tensor, codes: dict[str, tuple[str, ActQuant]]) -> None:
        """A float LayerNorm's output (the embeddings' in a BERT) gets 8-bit codes in its
        scale-sharing consumer's quantizer, so the next LayerNorm can read it: quantized where
        the simulator keeps it float (one 8-bit residual step), since only integer ops can
        write the wide int32 codes."""
        if out.name in self.params:
            return
        shared = self._shared_quantizer(out)
        if shared is not None:
            self.params[out.name] = shared
            codes[out.name] = (f"{out.name}_q", shared)
            self.notes.append(
                f"{out.name}: a float LayerNorm's output, quantized to 8 bits for the residual "
                "stream the simulator keeps in float"
            )

    def _shared_quantizer(self, tensor: gs.Tensor) -> ActQuant | None:
        """The quantizer of a scale-sharing consumer's quantized output (the Reshape of a
        LayerNorm's output before a MatMul), which the tensor's codes can share."""
        for consumer in tensor.outputs:
            if self._keeps_codes(consumer):
                return self.params[consumer.outputs[0].name]
        return None

    def _keeps_codes(self, node: gs.Node) -> bool:
        facts = self.graph.facts(node)
        return (
            facts.shares_input_scale
            and not facts.unifies_input_scales
            and len(node.outputs) == 1
            and node.outputs[0].name in self.params
        )

    def _layer_norm(self, node: gs.Node, built: IntegerLayerNorm) -> None:
        op = built.op
        names = []
        for tensor, name in zip(self._ln_operands(node), op.inputs, strict=True):
            names.append(name if name == self.wide_of.get(tensor.name) else self.codes(tensor))
        if tuple(names) != op.inputs:
            raise InternalError(f"{node.name}: integer LayerNorm reads {names}, not {op.inputs}")
        out = node.outputs[0]
        if op.requant is not None:
            out_codes, _ = self.define(out)
            if out_codes != op.output:
                raise InternalError(f"{node.name}: integer LayerNorm writes {out_codes}")
        wide = op.output if op.requant is None else op.wide_output
        if wide is not None:
            self.quant[wide] = built.wide
            self.shapes[wide] = _static_shape(out)
            self.wide_of[out.name] = wide
        self.ops.append(op)

    def _ln_operands(self, node: gs.Node) -> list[gs.Tensor]:
        x = node.inputs[0]
        if x.name in self.params or x.name in self.wide_of:
            return [x]
        return [t for t in x.inputs[0].inputs if isinstance(t, gs.Variable)]
