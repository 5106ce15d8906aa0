"""The one table of op facts that every pass consults.

Frontends map an ONNX ``(domain, op_type)`` to an :class:`OpKind` once; passes ask
:data:`OP_FACTS` what the kind means for quantization instead of comparing op-type strings.
Any other op of the default ONNX domain is :attr:`OpKind.FLOAT_ONLY`: it has no integer
implementation and runs in float (a float island in integer models), so one op dyadiq has no
rule for (LRN, Sum, GreaterOrEqual, ...) never refuses a whole model. Ops of other domains
(custom ops) are unsupported: the frontend lists all of them in one error before doing
anything else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import onnx


class OpKind(enum.Enum):
    # Layers with weights: the ones whose precision a plan chooses.
    CONV = "Conv"
    CONV_TRANSPOSE = "ConvTranspose"
    GEMM = "Gemm"
    MATMUL = "MatMul"
    # Elementwise arithmetic.
    ADD = "Add"
    SUB = "Sub"
    MUL = "Mul"
    DIV = "Div"
    POW = "Pow"
    SQRT = "Sqrt"
    EXP = "Exp"
    ERF = "Erf"
    TANH = "Tanh"
    NEG = "Neg"
    ABS = "Abs"
    RECIPROCAL = "Reciprocal"
    MIN = "Min"
    MAX = "Max"
    WHERE = "Where"
    EQUAL = "Equal"
    GREATER = "Greater"
    LESS = "Less"
    AND = "And"
    OR = "Or"
    NOT = "Not"
    FLOOR = "Floor"
    CEIL = "Ceil"
    ROUND = "Round"
    LOG = "Log"
    SIN = "Sin"
    COS = "Cos"
    # Activations.
    RELU = "Relu"
    CLIP = "Clip"
    LEAKY_RELU = "LeakyRelu"
    PRELU = "PRelu"
    SIGMOID = "Sigmoid"
    HARD_SIGMOID = "HardSigmoid"
    HARD_SWISH = "HardSwish"
    GELU = "Gelu"
    SOFTMAX = "Softmax"
    LOG_SOFTMAX = "LogSoftmax"
    ELU = "Elu"
    SELU = "Selu"
    SOFTPLUS = "Softplus"
    MISH = "Mish"
    # Normalisation.
    BATCH_NORM = "BatchNormalization"
    LAYER_NORM = "LayerNormalization"
    INSTANCE_NORM = "InstanceNormalization"
    GROUP_NORM = "GroupNormalization"
    # Pooling and reductions.
    MAXPOOL = "MaxPool"
    AVGPOOL = "AveragePool"
    GLOBAL_AVGPOOL = "GlobalAveragePool"
    GLOBAL_MAXPOOL = "GlobalMaxPool"
    REDUCE_MEAN = "ReduceMean"
    REDUCE_SUM = "ReduceSum"
    REDUCE_MAX = "ReduceMax"
    REDUCE_MIN = "ReduceMin"
    REDUCE_L2 = "ReduceL2"
    REDUCE_PROD = "ReduceProd"
    ARGMAX = "ArgMax"
    TOPK = "TopK"
    # Data movement.
    RESHAPE = "Reshape"
    FLATTEN = "Flatten"
    TRANSPOSE = "Transpose"
    SQUEEZE = "Squeeze"
    UNSQUEEZE = "Unsqueeze"
    CONCAT = "Concat"
    SPLIT = "Split"
    SLICE = "Slice"
    GATHER = "Gather"
    GATHER_ELEMENTS = "GatherElements"
    SCATTER_ND = "ScatterND"
    DEPTH_TO_SPACE = "DepthToSpace"
    SPACE_TO_DEPTH = "SpaceToDepth"
    UPSAMPLE = "Upsample"
    PAD = "Pad"
    RESIZE = "Resize"
    EXPAND = "Expand"
    TILE = "Tile"
    IDENTITY = "Identity"
    DROPOUT = "Dropout"
    # Shape plumbing and constants (folded away by simplification when inputs are static).
    SHAPE = "Shape"
    CAST = "Cast"
    CONSTANT = "Constant"
    CONSTANT_OF_SHAPE = "ConstantOfShape"
    RANGE = "Range"
    NON_ZERO = "NonZero"
    SIZE = "Size"
    # Quantization ops that dyadiq itself inserts (accepted on import so a QDQ model re-imports).
    QUANTIZE_LINEAR = "QuantizeLinear"
    DEQUANTIZE_LINEAR = "DequantizeLinear"
    # Every other standard ONNX op: run in float, never quantized.
    FLOAT_ONLY = "(other standard ONNX op)"


@dataclass(frozen=True)
class OpFacts:
    """What an op kind means for quantization.

    quantizable: the op has an integer implementation, so its float activation inputs (and
        its output) are quantized when the op is.
    weight_input / bias_input: positions of the constant weight and bias, when the op has them.
    channel_axis: the weight's output-channel axis for per-channel scales (Gemm depends on
        ``transB``; see :func:`dyadiq.graph.weight_channel_axis`).
    shares_input_scale: the output keeps the input's quantization parameters exactly (pure data
        movement or order-preserving selection), so no new range is calibrated for it.
    unifies_input_scales: every activation input and the output join one scale group, so the
        integer op works on codes with no rescale (Concat copies them; Max / Min compare them,
        exact because quantization is monotone).
    fusable_activation: a following quantized layer can absorb this activation into its clip
        bounds, so the tensor between them is never quantized.
    needs_quantized_inputs: an elementwise op that is quantized only when every non-constant
        input already comes out of a quantized op. Quantizing an Add that mixes in a float
        tensor of another range (an attention mask of -1e4, a transformer's residual stream
        after LayerNorm) forces one 8-bit scale over both and wipes out the smaller one.
    wide_input: a residual Add that feeds only this op is not quantized, nor is the op's
        input. The integer op reads the Add's two inputs and sums them at a wide precision
        (LayerNorm: a transformer's residual stream has outlier channels that one 8-bit
        scale would crush).
    """

    quantizable: bool = False
    weight_input: int | None = None
    bias_input: int | None = None
    channel_axis: int | None = None
    shares_input_scale: bool = False
    unifies_input_scales: bool = False
    fusable_activation: bool = False
    needs_quantized_inputs: bool = False
    wide_input: bool = False

    @property
    def has_weight(self) -> bool:
        return self.weight_input is not None


_NOT_QUANTIZABLE = OpFacts()
_SHARES = OpFacts(quantizable=True, shares_input_scale=True)

OP_FACTS: dict[OpKind, OpFacts] = {kind: _NOT_QUANTIZABLE for kind in OpKind}
OP_FACTS.update(
    {
        OpKind.CONV: OpFacts(quantizable=True, weight_input=1, bias_input=2, channel_axis=0),
        OpKind.CONV_TRANSPOSE: OpFacts(
            quantizable=True, weight_input=1, bias_input=2, channel_axis=1
        ),
        OpKind.GEMM: OpFacts(quantizable=True, weight_input=1, bias_input=2, channel_axis=0),
        OpKind.MATMUL: OpFacts(quantizable=True, weight_input=1, channel_axis=-1),
        OpKind.ADD: OpFacts(quantizable=True, needs_quantized_inputs=True),
        OpKind.MUL: OpFacts(quantizable=True, needs_quantized_inputs=True),
        OpKind.CONCAT: OpFacts(
            quantizable=True, shares_input_scale=True, unifies_input_scales=True
        ),
        # one group over both inputs, so (as for Add) only when both are quantized already:
        # a float input of another range would squeeze the other input's codes
        OpKind.MAX: OpFacts(
            quantizable=True, unifies_input_scales=True, needs_quantized_inputs=True
        ),
        OpKind.MIN: OpFacts(
            quantizable=True, unifies_input_scales=True, needs_quantized_inputs=True
        ),
        OpKind.AVGPOOL: OpFacts(quantizable=True),
        OpKind.GLOBAL_AVGPOOL: OpFacts(quantizable=True),
        OpKind.MAXPOOL: _SHARES,
        OpKind.GLOBAL_MAXPOOL: _SHARES,
        OpKind.RESHAPE: _SHARES,
        OpKind.FLATTEN: _SHARES,
        OpKind.TRANSPOSE: _SHARES,
        OpKind.SQUEEZE: _SHARES,
        OpKind.UNSQUEEZE: _SHARES,
        OpKind.HARD_SIGMOID: OpFacts(quantizable=True),  # affine + clip: dyadic
        # a 256-entry table of codes (passes/elementwise_lookup), only on an input quantized
        # already: SiLU's x * sigmoid(x) then is an integer Mul of two quantized tensors
        OpKind.SIGMOID: OpFacts(quantizable=True, needs_quantized_inputs=True),
        OpKind.HARD_SWISH: OpFacts(quantizable=True),  # fixed-point gate, see integerize
        OpKind.LEAKY_RELU: OpFacts(quantizable=True),  # two dyadic slopes, see integerize
        OpKind.PRELU: OpFacts(quantizable=True),
        # I-BERT integer exp; only on quantized logits (never on a float mask-added score).
        OpKind.SOFTMAX: OpFacts(quantizable=True, needs_quantized_inputs=True),
        # I-BERT integer LayerNorm (integer mean, variance and square root) over the residual
        # Add of two quantized tensors, summed wide inside the op; its output is quantized
        # only where a consumer quantizes it, and feeds the residual stream wide (int32)
        OpKind.LAYER_NORM: OpFacts(wide_input=True),
        OpKind.RELU: OpFacts(fusable_activation=True),
        OpKind.CLIP: OpFacts(fusable_activation=True),
    }
)

# ONNX (domain, op_type) -> kind. The default domain is spelled "" as in ModelProto.
ONNX_OP_KINDS: dict[tuple[str, str], OpKind] = {("", kind.value): kind for kind in OpKind}


def onnx_op_kind(domain: str, op_type: str) -> OpKind | None:
    """The kind of an ONNX op, or None when dyadiq does not support it (a custom op)."""
    domain = "" if domain == "ai.onnx" else domain
    kind = ONNX_OP_KINDS.get((domain, op_type))
    if kind is None and domain == "" and onnx.defs.has(op_type):
        return OpKind.FLOAT_ONLY
    return kind


def facts(kind: OpKind) -> OpFacts:
    return OP_FACTS[kind]
