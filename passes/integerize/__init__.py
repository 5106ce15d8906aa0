"""Rewrite: a calibrated, planned graph -> an :class:`IntegerProgram` (HAWQ-V3 dyadic).

Preconditions: BatchNorm folded, hard-swish canonicalized, and the activation quantizers of the
QDQ simulator computed for the same plan (``insert_qdq``), so that the integer model quantizes
exactly the tensors the simulator quantizes, with the same scales and zero points.

Per op (v = q - z, the zero-point-free codes):
- weighted Conv / Gemm / MatMul: acc = sum(v_x * q_w) + q_b  (int32, q_b = round(b/(s_x s_w)));
  y = clip(requant(acc; s_x s_w[c] / s_y) + z_y, lo, hi), fused Relu/Clip bounds in lo/hi;
- Add: one rounding of v_a m_a + v_b m_b over a common shift, as the simulator rounds
  (``single_rounding_add=False``: requant(v_a; s_a/s_y) + requant(v_b; s_b/s_y) + z_y);
  Mul: requant(v_a v_b; s_a s_b/s_y);
- GlobalAveragePool: requant(sum_hw v; s_x / (H W s_y));  HardSigmoid, HardSwish in fixed point;
- MaxPool, Reshape-likes, Transpose, Concat, Max, Min: on codes (they share one scale);
- an elementwise float chain from one quantized tensor to another (SiLU, Sigmoid, Tanh, GELU):
  a 256-entry table of output codes (``elementwise_lookup``);
- ConvTranspose with stride = kernel (no overlap): a 1x1 Conv to C_out kh kw columns, then
  Reshape / Transpose on codes interleave them (``conv_transpose_blocker`` says when not);
- LayerNormalization: I-BERT's integer LayerNorm over its input's codes or over the residual
  Add before it, summed wide (``integer_layer_norm``); where the simulator keeps the output
  (the residual stream) in float, the op also writes it as int32 codes for the next one;
- a token embedding sum before a LayerNorm, Gather(table, ids) + constant rows: one Embedding
  (int8 table codes, the sum as wide int32 codes) that the LayerNorm reads
  (``integer_embedding``);
- Softmax(scores + attention mask): one masked softmax that reads the integer mask the float
  mask was made from (``masked_softmax``; declined candidates are listed in the notes);
- a sentence embedding's masked mean pooling and L2 normalisation: one integer op each over
  the wide codes, reading the integer mask (``sentence_pooling``);
Everything else runs in float between Dequantize and Quantize and is listed in ``float_ops``.
Every weighted layer's accumulator is bounded first; a possible int32 overflow is an error.
Layers that read one weight initializer share one array of codes (``shared_weights``).

The rewrite of each kind of op lives in its own module, a mixin of :class:`_Integerizer` over
the shared :class:`~dyadiq.passes.integerize.state.IntegerizerState`: ``weighted`` (Conv / Gemm /
MatMul / ConvTranspose and the overflow check), ``elementwise`` (Add, Mul, pools, activations,
lookup tables), ``transformer`` (softmax, masked softmax, LayerNorm), ``pooling`` (masked mean
pooling, L2 normalisation), ``code_movement`` (ops on codes of one scale) and
``float_islands``; this module dispatches and assembles the program.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq import integer_program as ip
from dyadiq.graph import QGraph
from dyadiq.op_facts import OpKind
from dyadiq.passes.activation_sites import ActivationSites
from dyadiq.passes.integerize.code_movement import CodeMovement
from dyadiq.passes.integerize.elementwise import (
    HARD_SWISH_FRAC_BITS,
    ElementwiseOps,
    common_shift_dyadic,
)
from dyadiq.passes.integerize.float_islands import FloatIslands, outer_scope_names
from dyadiq.passes.integerize.pooling import PoolingOps
from dyadiq.passes.integerize.state import _known_dims, _static_shape
from dyadiq.passes.integerize.transformer import (
    SOFTMAX_FRAC_BITS,
    SOFTMAX_WORK_BITS,
    TransformerOps,
)
from dyadiq.passes.integerize.weighted import (
    INT32_LIMIT,
    AccumulatorOverflowError,
    WeightedLayers,
    conv_transpose_blocker,
)
from dyadiq.passes.masked_softmax import find_masked_softmax
from dyadiq.passes.shared_weights import shared_weight_quants
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import ROUND_TO_NEAREST, ActQuant, WeightQuantizer

__all__ = [
    "HARD_SWISH_FRAC_BITS",
    "INT32_LIMIT",
    "SOFTMAX_FRAC_BITS",
    "SOFTMAX_WORK_BITS",
    "AccumulatorOverflowError",
    "common_shift_dyadic",
    "conv_transpose_blocker",
    "integerize",
    "outer_scope_names",
]


class _Integerizer(
    WeightedLayers, ElementwiseOps, TransformerOps, PoolingOps, CodeMovement, FloatIslands
):
    def __init__(
        self,
        graph: QGraph,
        plan: PrecisionPlan,
        sites: ActivationSites,
        params: Mapping[str, ActQuant],
        single_rounding_add: bool = True,
        weights: WeightQuantizer = ROUND_TO_NEAREST,
    ) -> None:
        self.graph = graph
        self.weights = weights
        self.single_rounding_add = single_rounding_add
        self.plan = plan
        self.sites = sites
        self.params = dict(params)  # LayerNorm outputs get their consumers' quantizers
        # from insert_qdq's quantizers (``params`` as given), so that the codes are its codes
        self.shared = shared_weight_quants(graph, plan, params, weights)
        self.shared_codes = {}
        self.ops: list[ip.IntOp] = []
        self.quant: dict[str, ActQuant] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.int_name: dict[str, str] = {}
        self.float_ready: set[str] = set()
        self.float_ops: list[str] = []
        self.absorbed = set(sites.fused_activations.values()) | set(sites.fused_biases.values())
        self.tabulated: set[str] = set()  # nodes folded into an ip.Lookup
        self.notes: list[str] = []
        masked = find_masked_softmax(graph, params.keys(), self._softmax_blocker)
        self.masked_softmax = masked.matches
        self.tabulated.update(masked.absorbed)  # Softmax and mask ops a match replaces
        self.notes.extend(f"masked softmax declined: {reason}" for reason in masked.declined)
        self.notes.extend(f"{layer} {reason}" for layer, reason in self.shared.report.skipped)
        self.wide_of: dict[str, str] = {}  # float tensor -> its wide int32 codes
        self.embeddings = {}
        self.layer_norms = self._plan_layer_norms()
        self.pooling = {}
        self._plan_pooling()  # after the LayerNorms: it reads their wide outputs

    # --- dispatch ----------------------------------------------------------------------------
    def run(self) -> ip.IntegerProgram:
        g = self.graph.graph
        g.toposort()
        for tensor in g.inputs:
            self.float_ready.add(tensor.name)
        self._check_overflow()
        layer_of = {act: layer for layer, act in self.sites.fused_activations.items()}
        layer_of.update({add: layer for layer, add in self.sites.fused_biases.items()})
        lowered: set[str] = set()
        for node in g.nodes:
            if node.name in self.absorbed and layer_of[node.name] in lowered:
                continue  # its bounds are the lowered layer's clip
            if node.name in self.tabulated:
                continue  # part of a lookup table (or masked softmax) an earlier node started
            if node.name in self.masked_softmax:
                self._masked_softmax(self.masked_softmax[node.name])
                lowered.add(node.name)
            elif node.name in self.embeddings:
                self._embedding(node)
                lowered.add(node.name)
            elif node.name in self.layer_norms:
                self._layer_norm(node, self.layer_norms[node.name])
                lowered.add(node.name)
            elif node.name in self.pooling:
                self._pooling_op(node)
                lowered.add(node.name)
            elif self._lower(node):
                lowered.add(node.name)
            elif not self._lookup(node):
                self._float(node)
        outputs = [t.name for t in g.outputs]
        # a float output (an If's, say) may keep a dim only the data fixes: -1
        self.shapes.update(
            {
                t.name: _static_shape(t) if t.name in self.int_name else _known_dims(t)
                for t in g.outputs
            }
        )
        int_outputs = {}
        for name in outputs:
            codes = self.wide_of.get(name) or self.int_name.get(name)
            if codes is not None:
                int_outputs[name] = codes
                if name not in self.float_ready:
                    self.ops.append(ip.Dequantize(name, codes))
        inputs = {
            t.name: (np.dtype(t.dtype), _static_shape(t))
            for t in g.inputs
            if isinstance(t, gs.Variable)
        }
        return ip.IntegerProgram(
            self.ops,
            self.quant,
            self.shapes,
            inputs,
            outputs,
            int_outputs,
            self.float_ops,
            self.notes,
            opset=self.graph.opset,
        )

    def _lower(self, node: gs.Node) -> bool:
        kind = self.graph.kind(node)
        weight = self.graph.weight(node)
        if weight is not None and kind in (OpKind.CONV, OpKind.GEMM, OpKind.MATMUL):
            if node.name not in self.plan.layers:
                return False
            return self._weighted(node, kind, weight)
        if weight is not None and kind is OpKind.CONV_TRANSPOSE:
            if node.name not in self.plan.layers or conv_transpose_blocker(node) is not None:
                return False  # a float island, as inspect says (conv_transpose_blocker)
            return self._weighted(node, kind, weight)
        data = [t for t in node.inputs if isinstance(t, gs.Variable)]
        out = node.outputs[0]
        if kind is OpKind.ADD:  # writes the codes of a Relu / Clip it absorbs (_add_output)
            out = self._add_output(node)[0]
        if not data or not self._quantized(*data, out):
            return False
        if kind is OpKind.MATMUL and len(data) == 2:
            return self._act_matmul(node)
        lowering = {
            OpKind.ADD: self._add,
            OpKind.MUL: self._mul,
            OpKind.GLOBAL_AVGPOOL: self._gap,
            OpKind.AVGPOOL: self._whole_input_average_pool,
            OpKind.HARD_SIGMOID: self._hard_sigmoid,
            OpKind.HARD_SWISH: self._hard_swish,
            OpKind.SOFTMAX: self._softmax,
            OpKind.LEAKY_RELU: self._leaky_relu,
            OpKind.PRELU: self._leaky_relu,
            OpKind.MAXPOOL: self._maxpool,
            OpKind.CONCAT: self._concat,
            OpKind.MAX: self._extremum,
            OpKind.MIN: self._extremum,
            OpKind.TRANSPOSE: self._transpose,
            OpKind.RESHAPE: self._reshape,
            OpKind.FLATTEN: self._reshape,
            OpKind.SQUEEZE: self._reshape,
            OpKind.UNSQUEEZE: self._reshape,
            OpKind.RELU: self._requantized_activation,
            OpKind.CLIP: self._requantized_activation,
        }.get(kind)
        return lowering(node) if lowering is not None else False


def integerize(
    graph: QGraph,
    plan: PrecisionPlan,
    sites: ActivationSites,
    params: Mapping[str, ActQuant],
    *,
    single_rounding_add: bool = True,
    weights: WeightQuantizer = ROUND_TO_NEAREST,
) -> ip.IntegerProgram:
    """Build the integer program for ``plan`` (see the module docstring).

    ``weights`` must be the quantizer the QDQ model was built with (``insert_qdq``): the
    integer codes, scales and corrected biases then match the simulator's.

    ``single_rounding_add`` (the default) emits residual Adds that round once, as the QDQ
    simulator does (:class:`ip.Add`); ``False`` gives the older two-rounding form, 1 LSB off
    the simulator on about a quarter of the elements (benchmarks/results/add_rounding.md).
    Every backend lowers both.
    """
    return _Integerizer(graph, plan, sites, params, single_rounding_add, weights).run()
