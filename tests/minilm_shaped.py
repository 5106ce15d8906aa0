"""A one-layer MiniLM-shaped sentence embedder in ONNX text (vocab 40, 8 tokens, hidden 16,
two heads), written as ``torch.onnx`` exports all-MiniLM-L6-v2: token ids and attention mask
in; embeddings (Gather + constant rows, LayerNorm); the attention mask expanded as
transformers does (Cast to bool, Flatten, a Gather of rows 0..T-1, Reshape, And with an
all-True constant, Where); one encoder layer with [1, T, H] tensors; masked mean pooling
(Unsqueeze, Cast, Mul, ReduceSum, Clip, Div) and L2 normalisation (ReduceL2, Clip, Expand,
Div). The shared fixture of the pooling, L2 and mask tests."""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import numpy_helper

from dyadiq import integer_program as ip
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.integerize import integerize
from dyadiq.pipeline import QuantizeResult, quantize_graph
from dyadiq.plan import PrecisionPlan

VOCAB, TOKENS, HIDDEN, HEADS, FFN = 40, 8, 16, 2, 32

TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
minilm (int64[1, {TOKENS}] input_ids, int64[1, {TOKENS}] attention_mask)
    => (float[1, {HIDDEN}] embedding) {{
    e = Gather (table, input_ids)
    p = Add (e, position)
    ln0 = LayerNormalization <axis = -1, epsilon = 1e-12> (p, g0, b0)
    keep = Cast <to = 9> (attention_mask)
    flat = Flatten <axis = 2> (keep)
    rows = Gather <axis = 0> (flat, row_ids)
    keep4 = Reshape (rows, keep_shape)
    both = And (all_true, keep4)
    zero = Constant <value = float {{0.0}}> ()
    lowest = Constant <value = float {{-3.4028234e38}}> ()
    mask = Where (both, zero, lowest)
    q0 = MatMul (ln0, wq)
    q = Add (q0, bq)
    k0 = MatMul (ln0, wk)
    k = Add (k0, bk)
    v0 = MatMul (ln0, wv)
    v = Add (v0, bv)
    heads = Constant <value = int64[4] {{1, {TOKENS}, {HEADS}, {HIDDEN // HEADS}}}> ()
    qh = Reshape (q, heads)
    kh = Reshape (k, heads)
    vh = Reshape (v, heads)
    qt = Transpose <perm = [0, 2, 1, 3]> (qh)
    kt = Transpose <perm = [0, 2, 3, 1]> (kh)
    vt = Transpose <perm = [0, 2, 1, 3]> (vh)
    s = MatMul (qt, kt)
    temperature = Constant <value = float {{0.35}}> ()
    scaled = Mul (s, temperature)
    masked = Add (scaled, mask)
    attn = Softmax <axis = -1> (masked)
    ctx = MatMul (attn, vt)
    ctxt = Transpose <perm = [0, 2, 1, 3]> (ctx)
    flat3 = Constant <value = int64[3] {{1, {TOKENS}, {HIDDEN}}}> ()
    ctxf = Reshape (ctxt, flat3)
    o0 = MatMul (ctxf, wo)
    o = Add (o0, bo)
    r1 = Add (o, ln0)
    ln1 = LayerNormalization <axis = -1, epsilon = 1e-12> (r1, g1, b1)
    f0 = MatMul (ln1, w1)
    f = Add (f0, bf1)
    sqrt2 = Constant <value = float {{1.4142135}}> ()
    half = Constant <value = float {{0.5}}> ()
    unit = Constant <value = float {{1.0}}> ()
    fd = Div (f, sqrt2)
    fe = Erf (fd)
    fp = Add (fe, unit)
    fm = Mul (f, fp)
    gelu = Mul (fm, half)
    d0 = MatMul (gelu, w2)
    d = Add (d0, bf2)
    r2 = Add (d, ln1)
    hidden = LayerNormalization <axis = -1, epsilon = 1e-12> (r2, g2, b2)
    last = Constant <value = int64[1] {{-1}}> ()
    mask3 = Unsqueeze (attention_mask, last)
    maskf = Cast <to = 1> (mask3)
    weighted = Mul (hidden, maskf)
    token_axis = Constant <value = int64[1] {{1}}> ()
    summed = ReduceSum <keepdims = 0> (weighted, token_axis)
    counted = ReduceSum <keepdims = 0> (maskf, token_axis)
    tiny = Constant <value = float {{1e-9}}> ()
    count = Clip (counted, tiny)
    pooled = Div (summed, count)
    norm = ReduceL2 <axes = [1], keepdims = 1> (pooled)
    eps = Constant <value = float {{1e-12}}> ()
    norm_pos = Clip (norm, eps)
    wide = Constant <value = int64[2] {{1, {HIDDEN}}}> ()
    divisor = Expand (norm_pos, wide)
    embedding = Div (pooled, divisor)
}}
"""


def minilm_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(TEXT)

    def dense(rows: int, cols: int) -> np.ndarray:
        return rng.normal(size=(rows, cols)) / np.sqrt(rows)

    floats = {
        "table": rng.normal(size=(VOCAB, HIDDEN)),
        "position": rng.normal(size=(1, TOKENS, HIDDEN)) * 0.2,
        "wq": dense(HIDDEN, HIDDEN),
        "wk": dense(HIDDEN, HIDDEN),
        "wv": dense(HIDDEN, HIDDEN),
        "wo": dense(HIDDEN, HIDDEN),
        "w1": dense(HIDDEN, FFN),
        "w2": dense(FFN, HIDDEN),
        "bq": rng.normal(size=HIDDEN) * 0.1,
        "bk": rng.normal(size=HIDDEN) * 0.1,
        "bv": rng.normal(size=HIDDEN) * 0.1,
        "bo": rng.normal(size=HIDDEN) * 0.1,
        "bf1": rng.normal(size=FFN) * 0.1,
        "bf2": rng.normal(size=HIDDEN) * 0.1,
    }
    for i in range(3):
        floats[f"g{i}"] = rng.normal(size=HIDDEN) * 0.5 + 1.0
        floats[f"b{i}"] = rng.normal(size=HIDDEN) * 0.2
    tensors = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in floats.items()]
    tensors += [
        numpy_helper.from_array(
            np.arange(TOKENS, dtype=np.int64).reshape(1, 1, 1, TOKENS), "row_ids"
        ),
        numpy_helper.from_array(np.array([1, 1, 1, TOKENS], np.int64), "keep_shape"),
        numpy_helper.from_array(np.ones((1, 1, TOKENS, 1), bool), "all_true"),
    ]
    model.graph.initializer.extend(tensors)
    onnx.checker.check_model(model)
    return model


def minilm_feeds(seed: int, n: int = 6) -> list[dict[str, np.ndarray]]:
    """Random ids and padding masks of every length from all tokens down to none."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        mask = np.zeros((1, TOKENS), np.int64)
        mask[0, : max(TOKENS - 2 * i, 0)] = 1
        ids = rng.integers(0, VOCAB, size=(1, TOKENS), dtype=np.int64)
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


@functools.cache
def minilm_quantized() -> tuple[QuantizeResult, ip.IntegerProgram]:
    graph = load_onnx(minilm_model())
    plan = PrecisionPlan.uniform(graph)
    calibration = [f for f in minilm_feeds(1, 8) if f["attention_mask"].any()]
    result = quantize_graph(graph, plan, calibration)
    return result, integerize(result.graph, plan, result.sites, result.qdq.act_params)


def minilm_program() -> ip.IntegerProgram:
    return minilm_quantized()[1]
