"""What ``dyadiq inspect`` reports: op counts, parameters and per-node quantizability."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import onnx_graphsurgeon as gs

from dyadiq.errors import DyadiqError
from dyadiq.graph import QGraph, is_whole_input_average_pool
from dyadiq.op_facts import OpKind
from dyadiq.passes.activation_sites import ActivationSites, find_activation_sites
from dyadiq.passes.elementwise_lookup import ELEMENTWISE, UNARY, lookup_chain
from dyadiq.passes.integer_embedding import EmbeddingSum, find_embedding_sum, integer_embedding
from dyadiq.passes.integer_layer_norm import layer_norm_operands
from dyadiq.passes.masked_softmax import find_masked_softmax
from dyadiq.passes.sentence_pooling import find_sentence_pooling
from dyadiq.plan import PrecisionPlan
from dyadiq.quantizers import ActQuant


def quantizability(graph: QGraph, node: gs.Node) -> tuple[bool, str]:
    """Whether dyadiq quantizes a node, and the reason in words (with what integer models
    and compiled targets do with it where that differs from the QDQ model)."""
    facts = graph.facts(node)
    weight = graph.weight(node)
    if facts.quantizable and weight is not None:
        island = _integer_island_reason(graph, node, weight)
        if island is not None:
            return (
                True,
                "weighted layer, quantized in QDQ; a float island in --integer and --target: "
                + island,
            )
        return True, "weighted layer: per-channel weights and quantized inputs"
    if facts.quantizable and facts.has_weight:
        return True, "no constant weight: both operands quantized as activations"
    if facts.shares_input_scale:
        return True, "data movement: output shares its input's scale"
    if facts.unifies_input_scales:
        return True, "inputs and output share one scale: an integer op on their codes"
    if facts.quantizable and graph.kind(node) in UNARY:
        return True, "on a quantized input: an integer lookup table of its 256 codes"
    if graph.kind(node) is OpKind.AVGPOOL and not is_whole_input_average_pool(node):
        return True, (
            "quantized in QDQ; a float island in --integer and --target: only an AveragePool "
            "over its whole input (a GlobalAveragePool) has an integer kernel"
        )
    if facts.quantizable:
        return True, "integer op on quantized activations"
    if facts.fusable_activation:
        return False, "activation: fused into the producing layer's quantizer bounds"
    if graph.kind(node) in ELEMENTWISE:
        return False, (
            "elementwise float op: in --integer and --target, a chain of these from one "
            "quantized tensor to another (SiLU, Sigmoid, Tanh, GELU) becomes an integer lookup "
            "table; otherwise it runs in float between DQ and Q"
        )
    return False, f"{node.op} has no integer kernel here: runs in float between DQ and Q"


def transformer_rules(graph: QGraph) -> dict[str, tuple[bool, str]]:
    """Node id -> (quantizable, reason) for the rules whose outcome depends on which tensors
    a plan quantizes (masked softmax, integer LayerNorm, ops on activation codes, lookup
    tables): decided as integerize decides, on the activation sites of a uniform 8-bit plan,
    so that what inspect says is what --integer does."""
    try:
        sites = find_activation_sites(graph, PrecisionPlan.uniform(graph))
    except DyadiqError:
        return {}
    quantized = set(sites.tensors)
    rules: dict[str, tuple[bool, str]] = {}
    masked = find_masked_softmax(graph, quantized)
    for match in masked.matches.values():
        why = "with its attention-mask Add, one integer masked softmax (I-BERT exp over the "
        why += "kept positions; it reads the integer mask, the float mask is never computed)"
        rules[match.add.name] = rules[match.softmax.name] = (True, why)
    # the float mask's own ops (Where, Cast, Sub, Mul ...)
    _replaced_mask_rules(rules, masked.absorbed, "attention mask", "integer masked softmax")
    _declined_rules(rules, masked.declined, "Add ", "attention-mask Add runs in float")
    graph.graph.toposort()
    _layer_norm_rules(graph, quantized, rules)
    _pooling_rules(graph, quantized, rules)
    _operand_rules(graph, sites, quantized, rules)
    return rules


def _layer_norm_rules(
    graph: QGraph, quantized: set[str], rules: dict[str, tuple[bool, str]]
) -> None:
    """Integer LayerNorms in graph order, as integerize plans them; ``quantized`` grows by
    the outputs they give codes (8-bit or the wide residual stream)."""
    for node in graph.nodes():
        if graph.kind(node) is not OpKind.LAYER_NORM:
            continue
        out = node.outputs[0]
        embedding = _embedding_sum(node.inputs[0], quantized)
        if embedding is not None:  # tentatively, as integerize plans it
            quantized.add(node.inputs[0].name)
        found = layer_norm_operands(node, quantized, ())
        shared = any(
            graph.facts(c).shares_input_scale and c.outputs and c.outputs[0].name in quantized
            for c in out.outputs
        )
        if isinstance(found, str):
            if embedding is not None:
                quantized.discard(node.inputs[0].name)
            rules[node.name] = (False, f"runs in float between DQ and Q: {found}")
            if shared:  # its output gets 8-bit codes for the next LayerNorm (integerize)
                quantized.add(out.name)
            continue
        quantized.add(out.name)  # 8-bit codes or the wide residual stream
        _, add = found
        why = "integer LayerNorm (I-BERT: integer mean, variance and square root)"
        if add is not None:
            why += " over the residual Add, whose two quantized inputs it sums wide"
            rules[add.name] = (True, "residual Add: summed wide inside the integer LayerNorm")
        if embedding is not None:
            why += " over the token embedding sum, read wide"
            summed = (
                "token embedding sum: an int8 table's rows plus the constant rows, summed "
                "as int32 codes for the integer LayerNorm"
            )
            for member in (embedding.gather, *embedding.adds):
                rules[member.name] = (True, summed)
        rules[node.name] = (True, why + "; its output is quantized")


def _pooling_rules(graph: QGraph, quantized: set[str], rules: dict[str, tuple[bool, str]]) -> None:
    """A sentence embedding's masked mean pooling and L2 normalisation over codes (the last
    LayerNorm's), as integerize plans them; their outputs join ``quantized``."""
    found = find_sentence_pooling(graph, quantized)
    pooled = (
        "masked mean pooling: one integer op over the codes (exact token sums of the kept "
        "positions, a rounded division by their count), reading the integer mask"
    )
    normed = (
        "L2 normalisation: one integer op (the integer LayerNorm's square root, a rounded "
        "division) writing int32 codes"
    )
    for matches, why in ((found.pools, pooled), (found.norms, normed)):
        for match in matches.values():
            for node in (*match.nodes, match.div):
                rules[node.name] = (True, why)
            quantized.add(match.div.outputs[0].name)
    # the float pooling mask's Unsqueeze and Cast
    _replaced_mask_rules(rules, found.absorbed, "pooling mask", "integer pooling")
    _declined_rules(rules, found.declined, "Div ", "runs in float between DQ and Q")


def _replaced_mask_rules(
    rules: dict[str, tuple[bool, str]], absorbed: Iterable[str], mask: str, integer_op: str
) -> None:
    """The ops that build a float mask an integer op replaces by the integer mask."""
    why = f"makes the float {mask}, which the {integer_op} replaces by the integer mask it is "
    for name in absorbed:
        rules.setdefault(name, (True, why + "made from: not computed"))


def _declined_rules(
    rules: dict[str, tuple[bool, str]], declined: Iterable[str], op_prefix: str, label: str
) -> None:
    """Matches a finder declined, as ``"<op> <node id>: <reason>"``: float, with the reason."""
    for entry in declined:
        node_id, reason = entry.removeprefix(op_prefix).split(": ", 1)
        rules[node_id] = (False, f"{label} ({reason})")


def _embedding_sum(tensor: gs.Tensor, quantized: set[str]) -> EmbeddingSum | None:
    """A LayerNorm input that integerize computes as an :class:`ip.Embedding`, or None."""
    if tensor.name in quantized:
        return None
    found = find_embedding_sum(tensor)
    if isinstance(found, str) or isinstance(integer_embedding(found, tensor.name), str):
        return None
    return found


def _operand_rules(
    graph: QGraph,
    sites: ActivationSites,
    quantized: set[str],
    rules: dict[str, tuple[bool, str]],
) -> None:
    """The nodes integerize rewrites only when their operands have codes, decided in graph
    order as it decides: an op on activations needs every data input and its output
    quantized (the embeddings' Adds read float Gathers: float), and an elementwise chain
    from one quantized tensor to another (GELU's Div, Erf, Add, Mul, Mul) becomes one lookup
    table, its Add and Muls included."""

    # lookup_chain reads the quantizers' widths only; a uniform plan's are its groups' bits
    def bits(tensor: str) -> int:  # a LayerNorm's output (not a site) has 8-bit codes
        group = sites.group_of.get(tensor)
        return sites.group_bits[group] if group is not None else 8

    widths = {t: ActQuant(1.0, 0, bits(t), False) for t in quantized}
    skip = set(sites.fused_activations.values()) | set(sites.fused_biases.values()) | set(rules)
    for node in graph.nodes():
        if node.name in skip:
            continue
        facts = graph.facts(node)
        data = [t for t in node.inputs if isinstance(t, gs.Variable)]
        output = node.outputs[:1]
        absorbed = sites.fused_activations.get(node.name)
        if absorbed is not None and graph.kind(node) is OpKind.ADD:  # its codes are the Relu's
            output = graph.node(absorbed).outputs[:1]
        on_codes = bool(data) and all(t.name in quantized for t in [*data, *output])
        integer_op = (
            (facts.quantizable or facts.shares_input_scale or facts.unifies_input_scales)
            and graph.weight(node) is None
            and graph.kind(node) in _INTEGER_ON_CODES
        )
        if integer_op and on_codes:
            continue  # quantizability's reason holds
        if facts.fusable_activation:  # a Relu / Clip no layer absorbed (those are skipped)
            rules[node.name] = (
                (
                    True,
                    "activation on quantized codes that no layer absorbs: an integer clip, "
                    "requantized when its output has its own scale",
                )
                if on_codes
                else (
                    False,
                    "activation that no layer absorbs, on a tensor without integer "
                    "codes: runs in float between DQ and Q",
                )
            )
            continue
        chain = lookup_chain(graph, node, widths, skip)
        if chain is not None:
            why = (
                "part of an elementwise chain from one quantized tensor to another "
                f"({' -> '.join(n.op for n in chain.nodes)}): in --integer and --target one "
                "integer lookup table of its input's codes"
            )
            for member in chain.nodes:
                rules[member.name] = (True, why)
            skip.update(n.name for n in chain.nodes)
        elif integer_op:
            missing = [t.name for t in [*data, *output] if t.name not in quantized]
            why = f"{missing[0]} has no integer codes" if missing else "no activation input"
            rules[node.name] = (
                False,
                f"runs in float between DQ and Q: {why} (an op on activations needs every "
                "operand quantized)",
            )


# ops integerize rewrites on activation codes (its dispatch table), whose label depends on
# whether their operands are quantized
_INTEGER_ON_CODES = frozenset(
    {
        OpKind.ADD,
        OpKind.MUL,
        OpKind.MATMUL,
        OpKind.GLOBAL_AVGPOOL,
        OpKind.AVGPOOL,
        OpKind.HARD_SIGMOID,
        OpKind.HARD_SWISH,
        OpKind.SOFTMAX,
        OpKind.LEAKY_RELU,
        OpKind.PRELU,
        OpKind.MAXPOOL,
        OpKind.CONCAT,
        OpKind.MAX,
        OpKind.MIN,
        OpKind.TRANSPOSE,
        OpKind.RESHAPE,
        OpKind.FLATTEN,
        OpKind.SQUEEZE,
        OpKind.UNSQUEEZE,
    }
)


def _integer_island_reason(graph: QGraph, node: gs.Node, weight: gs.Constant) -> str | None:
    """Why integerize keeps this weighted layer in float, or None (it gets a kernel); the
    same tests integerize applies."""
    from dyadiq.passes.integerize import conv_transpose_blocker

    kind = graph.kind(node)
    if kind is OpKind.CONV_TRANSPOSE:
        return conv_transpose_blocker(node)
    if kind is OpKind.CONV and len(weight.shape) != 4:
        return f"integer Conv is 2-D only, this kernel is {len(weight.shape) - 2}-D"
    return None


def _element_count(constant: gs.Constant) -> int:
    """From the declared shape: counting never reads (or decodes) the tensor's data."""
    return int(math.prod(constant.shape))


def describe(graph: QGraph) -> dict[str, Any]:
    constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    layers = []
    rules = transformer_rules(graph)
    for node in graph.nodes():
        ok, reason = rules.get(node.name) or quantizability(graph, node)
        weight = graph.weight(node)
        layers.append(
            {
                "id": node.name,
                "op": node.op,
                "params": _element_count(weight) if weight is not None else 0,
                "quantizable": ok,
                "reason": reason,
            }
        )
    return {
        "source": graph.source,
        "opset": graph.opset,
        "parameters": sum(_element_count(c) for c in constants.values()),
        "op_counts": dict(Counter(node.op for node in graph.nodes()).most_common()),
        "weighted_layers": len(graph.weighted_layers()),
        "layers": layers,
        "notes": graph.notes,
    }
