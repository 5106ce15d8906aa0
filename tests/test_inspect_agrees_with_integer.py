"""``inspect`` says of every node what ``--integer`` then does with it: the nodes it marks not
quantizable are exactly the integer program's float ops. On MiniLM it marked the embeddings'
Adds as integer ops while --integer ran them in float, and the GELU's Add as a float op though
it is part of the GELU's lookup table. (The embedding sum is integer now: both agree on it.)"""

from __future__ import annotations

import numpy as np
import onnx

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.inspection import describe
from dyadiq.passes.integerize import integerize
from dyadiq.pipeline import quantize_graph
from dyadiq.plan import PrecisionPlan
from tests.builders import with_weights
from tests.transformer_block import WHERE_MASK, block_feeds, block_model

TOKENS, HIDDEN, VOCAB = 6, 16, 50

# BERT's embeddings: a Gather of the token table, Adds of constant position rows, a float
# LayerNorm, then a dense layer with GELU
EMBEDDINGS = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    embed (int64[1, {TOKENS}] ids) => (float[1, {TOKENS}, {HIDDEN}] y) {{
        e = Gather (table, ids)
        t = Add (e, token_type)
        p = Add (t, position)
        ln = LayerNormalization <axis = -1, epsilon = 1e-5> (p, g, b)
        f0 = MatMul (ln, w1)
        f = Add (f0, b1)
        sqrt2 = Constant <value = float {{1.4142135}}> ()
        half = Constant <value = float {{0.5}}> ()
        unit = Constant <value = float {{1.0}}> ()
        fd = Div (f, sqrt2)
        fe = Erf (fd)
        fp = Add (fe, unit)
        fm = Mul (f, fp)
        gelu = Mul (fm, half)
        y = MatMul (gelu, w2)
    }}
"""


def _embeddings_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return with_weights(
        EMBEDDINGS,
        table=rng.normal(size=(VOCAB, HIDDEN)),
        token_type=rng.normal(size=(HIDDEN,)) * 0.1,
        position=rng.normal(size=(1, TOKENS, HIDDEN)) * 0.1,
        g=rng.normal(size=HIDDEN) * 0.5 + 1.0,
        b=rng.normal(size=HIDDEN) * 0.2,
        w1=rng.normal(size=(HIDDEN, 2 * HIDDEN)) / 4,
        b1=rng.normal(size=2 * HIDDEN) * 0.1,
        w2=rng.normal(size=(2 * HIDDEN, HIDDEN)) / 6,
    )


def _labels_and_float_ops(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
) -> tuple[dict[str, tuple[str, bool, str]], set[str]]:
    labels = {
        layer["id"]: (layer["op"], layer["quantizable"], layer["reason"])
        for layer in describe(load_onnx(model))["layers"]
    }
    graph = load_onnx(model)
    plan = PrecisionPlan.uniform(graph)
    result = quantize_graph(graph, plan, feeds)
    program = integerize(result.graph, plan, result.sites, result.qdq.act_params)
    return labels, {op.split(" ", 1)[1] for op in program.float_ops}


def _assert_agree(labels: dict[str, tuple[str, bool, str]], float_ops: set[str]) -> None:
    marked_float = {node for node, (_, ok, _) in labels.items() if not ok}
    assert marked_float == float_ops, (marked_float - float_ops, float_ops - marked_float)


def test_embeddings_adds_are_float_and_gelu_is_a_table() -> None:
    rng = np.random.default_rng(1)
    feeds = [{"ids": rng.integers(0, VOCAB, size=(1, TOKENS), dtype=np.int64)} for _ in range(6)]
    labels, float_ops = _labels_and_float_ops(_embeddings_model(), feeds)
    by_op: dict[str, list[tuple[bool, str]]] = {}
    for op, ok, reason in labels.values():
        by_op.setdefault(op, []).append((ok, reason))
    embedding_sum = [(ok, why) for ok, why in [*by_op["Add"], *by_op["Gather"]] if "token" in why]
    assert len(embedding_sum) == 3 and all(ok for ok, _ in embedding_sum)
    assert all(why.startswith("token embedding sum") for _, why in embedding_sum)
    gelu = [node for node, (op, _, _) in labels.items() if op in ("Div", "Erf", "Mul")]
    assert len(gelu) == 4
    for node in gelu:
        ok, reason = labels[node][1:]
        assert ok and "lookup table" in reason, (node, reason)
    gelu_add = [why for ok, why in by_op["Add"] if ok and "Div -> Erf -> Add" in why]
    assert len(gelu_add) == 1
    _assert_agree(labels, float_ops)


def test_transformer_block_labels_agree_with_integer() -> None:
    rng = np.random.default_rng(5)
    for batched in (False, True):
        model = block_model(WHERE_MASK, batched=batched)
        labels, float_ops = _labels_and_float_ops(model, block_feeds(rng, batched=batched))
        _assert_agree(labels, float_ops)
        wheres = [why for op, ok, why in labels.values() if op == "Where"]
        assert wheres and all("not computed" in why for why in wheres)
