"""A one-block transformer encoder in ONNX text (hidden 16, two heads, 6 tokens), quantized and
integerized: the shared fixture of the integer LayerNorm and masked-softmax tests."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx

from dyadiq import integer_program as ip
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.integerize import integerize
from dyadiq.pipeline import QuantizeResult, quantize_graph
from dyadiq.plan import PrecisionPlan
from tests.builders import with_weights

TOKENS, HIDDEN, HEADS, FFN = 6, 16, 2, 32
SHAPE = (TOKENS, HIDDEN)  # 2-D: the first MatMul needs no Reshape of the float input

# the two additive masks exporters write: transformers' Where(mask, 0, finfo.min), and the
# BERT-era (1 - mask) * -10000
WHERE_MASK = """
        keep = Cast <to = 9> (attention_mask)
        keep4 = Unsqueeze (keep, mask_axes)
        zero = Constant <value = float {0.0}> ()
        lowest = Constant <value = float {-3.4028234e38}> ()
        mask = Where (keep4, zero, lowest)
"""
COMPLEMENT_MASK = """
        mask4 = Unsqueeze (attention_mask, mask_axes)
        maskf = Cast <to = 1> (mask4)
        one = Constant <value = float {1.0}> ()
        dropped = Sub (one, maskf)
        big = Constant <value = float {-10000.0}> ()
        mask = Mul (dropped, big)
"""

# a one-input model (what a microcontroller build takes): the mask is computed on the device,
# by float islands, from the sign of one channel of the first layer's output
DEVICE_MASK = """
        start = Constant <value = int64[1] {0}> ()
        stop = Constant <value = int64[1] {1}> ()
        channel_axis = Constant <value = int64[1] {1}> ()
        column = Slice (xi, start, stop, channel_axis)
        row = Transpose <perm = [1, 0]> (column)
        threshold = Constant <value = float {0.0}> ()
        keep = Greater (row, threshold)
        zero = Constant <value = float {0.0}> ()
        lowest = Constant <value = float {-3.4028234e38}> ()
        mask = Where (keep, zero, lowest)
"""


def block_text(mask: str, *, batched: bool = False) -> str:
    """``batched``: [1, tokens, hidden] tensors, as exporters write them; the frontend then
    puts a Reshape between each LayerNorm and its MatMuls, so the simulator keeps LayerNorm
    outputs (the residual stream) in float and the integer LayerNorms pass it on wide."""
    mask_input = "" if mask == DEVICE_MASK else f", int64[1, {TOKENS}] attention_mask"
    lead = "1, " if batched else ""
    return f"""
    <ir_version: 8, opset_import: ["" : 18]>
    block (float[{lead}{TOKENS}, {HIDDEN}] x{mask_input})
        => (float[{lead}{TOKENS}, {HIDDEN}] y) {{
        xi0 = MatMul (x, wi)
        xi = Add (xi0, bi)
        ln0 = LayerNormalization <axis = -1, epsilon = 1e-5> (xi, g0, b0)
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
        mask_axes = Constant <value = int64[2] {{1, 2}}> ()
        {mask}
        masked = Add (scaled, mask)
        p = Softmax <axis = -1> (masked)
        ctx = MatMul (p, vt)
        ctxt = Transpose <perm = [0, 2, 1, 3]> (ctx)
        flat = Constant <value = int64[{2 + batched}] {{{lead}{TOKENS}, {HIDDEN}}}> ()
        ctxf = Reshape (ctxt, flat)
        o0 = MatMul (ctxf, wo)
        o = Add (o0, bo)
        r1 = Add (o, ln0)
        ln1 = LayerNormalization <axis = -1, epsilon = 1e-5> (r1, g1, b1)
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
        ln2 = LayerNormalization <axis = -1, epsilon = 1e-5> (r2, g2, b2)
        y = MatMul (ln2, wy)
    }}
    """


def block_model(mask: str = WHERE_MASK, seed: int = 0, *, batched: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def dense(rows: int, cols: int) -> np.ndarray:
        return rng.normal(size=(rows, cols)) / np.sqrt(rows)

    weights = {
        "wi": dense(HIDDEN, HIDDEN),
        "bi": rng.normal(size=HIDDEN) * 0.1,
        "wq": dense(HIDDEN, HIDDEN),
        "wk": dense(HIDDEN, HIDDEN),
        "wv": dense(HIDDEN, HIDDEN),
        "wo": dense(HIDDEN, HIDDEN),
        "wy": dense(HIDDEN, HIDDEN),
        "w1": dense(HIDDEN, FFN),
        "w2": dense(FFN, HIDDEN),
        "bq": rng.normal(size=HIDDEN) * 0.1,
        "bk": rng.normal(size=HIDDEN) * 0.1,
        "bv": rng.normal(size=HIDDEN) * 0.1,
        "bo": rng.normal(size=HIDDEN) * 0.1,
        "bf1": rng.normal(size=FFN) * 0.1,
        "bf2": rng.normal(size=HIDDEN) * 0.1,
    }
    for i in range(3):  # LayerNorm scales of both signs and several sizes, as trained ones
        weights[f"g{i}"] = rng.normal(size=HIDDEN) * 0.5 + 1.0
        weights[f"b{i}"] = rng.normal(size=HIDDEN) * 0.2
    return with_weights(block_text(mask, batched=batched), **weights)


def block_feeds(
    rng: np.random.Generator, n: int = 6, *, mask_input: bool = True, batched: bool = False
) -> list[dict[str, np.ndarray]]:
    """Token vectors with a few large channels (as a residual stream has) and padding masks
    of every length from all tokens kept down to one."""
    feeds = []
    for i in range(n):
        x = rng.normal(size=SHAPE) * 1.5
        x[..., 3] *= 4.0
        mask = np.zeros((1, TOKENS), np.int64)
        mask[0, : TOKENS - i % TOKENS] = 1
        x = x.reshape((1, *SHAPE)) if batched else x
        feeds.append({"x": x.astype(np.float32), "attention_mask": mask})
        if not mask_input:
            del feeds[-1]["attention_mask"]
    return feeds


@dataclass(frozen=True)
class QuantizedBlock:
    result: QuantizeResult
    program: ip.IntegerProgram
    feeds: list[dict[str, np.ndarray]]


@functools.cache  # shared by the tests (none of them edits it): calibrate each variant once
def quantized_block(
    mask: str = WHERE_MASK, *, act_signed: bool = False, batched: bool = False
) -> QuantizedBlock:
    graph = load_onnx(block_model(mask, batched=batched))
    plan = PrecisionPlan.uniform(graph, act_signed=act_signed)
    rng = np.random.default_rng(5)
    feeds = block_feeds(rng, mask_input=mask != DEVICE_MASK, batched=batched)
    result = quantize_graph(graph, plan, feeds)
    program = integerize(result.graph, plan, result.sites, result.qdq.act_params)
    return QuantizedBlock(result, program, feeds)
