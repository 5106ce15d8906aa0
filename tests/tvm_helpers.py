"""Small integer programs for the TVM backend tests: readable ONNX graphs, quantized and
integerized in-process (no files), plus the samples of a feed batch one by one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import onnx

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.graph import QGraph
from dyadiq.integer_program import IntegerProgram
from dyadiq.passes.integerize import integerize
from dyadiq.pipeline import quantize_graph
from dyadiq.plan import LayerFormat, PrecisionPlan
from tests.builders import with_weights

if TYPE_CHECKING:
    import tvm


def integer_program(
    model: onnx.ModelProto | str,
    calibration: list[dict[str, np.ndarray]],
    *,
    weight_bits: int = 8,
    mixed_w4: bool = False,
    simplify: bool = True,
    act_signed: bool = False,
) -> IntegerProgram:
    """Uniform ``weight_bits`` W/A8 plan, or (``mixed_w4``) 8-bit first and last layers and
    4-bit weights in between, the usual hand heuristic."""
    graph = load_onnx(model, simplify=simplify)
    plan = (
        _mixed_plan(graph)
        if mixed_w4
        else PrecisionPlan.uniform(graph, weight_bits=weight_bits, act_signed=act_signed)
    )
    result = quantize_graph(graph, plan, calibration)
    return integerize(result.graph, plan, result.sites, result.qdq.act_params)


def _mixed_plan(graph: QGraph) -> PrecisionPlan:
    layers = [n.name for n in graph.weighted_layers()]
    last = len(layers) - 1
    return PrecisionPlan(
        {name: LayerFormat(8 if i in (0, last) else 4, 8) for i, name in enumerate(layers)}
    )


def samples(
    batches: Iterable[dict[str, np.ndarray]], limit: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batch-1 feeds, up to ``limit``, cut from feeds of any batch size."""
    count = 0
    for feeds in batches:
        for i in range(next(iter(feeds.values())).shape[0]):
            if count == limit:
                return
            yield {name: value[i : i + 1] for name, value in feeds.items()}
            count += 1


def depthwise_se_hard_swish(rng: np.random.Generator) -> onnx.ModelProto:
    """MobileNetV3 block: Conv -> HardSwish -> depthwise Conv (stride 2) -> HardSwish ->
    SE (GAP -> Conv -> Relu -> Conv -> HardSigmoid -> Mul) -> Conv."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 9, 9] x) => (float[1, 6, 5, 5] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        h = HardSwish (c)
        d = Conv <group = 8, strides = [2, 2], pads = [1, 1, 1, 1]> (h, wd, bd)
        hd = HardSwish (d)
        p = GlobalAveragePool (hd)
        s1 = Conv (p, ws1, bs1)
        r = Relu (s1)
        s2 = Conv (r, ws2, bs2)
        g = HardSigmoid <alpha = 0.2, beta = 0.5> (s2)
        m = Mul (hd, g)
        y = Conv (m, w2, b2)
    }
    """
    return with_weights(
        text,
        w1=rng.normal(size=(8, 3, 3, 3)) * 0.5,
        b1=rng.normal(size=8) * 0.1,
        wd=rng.normal(size=(8, 1, 3, 3)) * 0.5,
        bd=rng.normal(size=8) * 0.1,
        ws1=rng.normal(size=(4, 8, 1, 1)) * 0.5,
        bs1=rng.normal(size=4) * 0.1,
        ws2=rng.normal(size=(8, 4, 1, 1)) * 0.5,
        bs2=rng.normal(size=8) * 0.1,
        w2=rng.normal(size=(6, 8, 1, 1)) * 0.5,
        b2=rng.normal(size=6) * 0.1,
    )


def dilated_grouped_leaky(rng: np.random.Generator) -> onnx.ModelProto:
    """Dilated padded Conv -> LeakyRelu -> grouped Conv (2 groups) -> PRelu (per channel) ->
    Conv; input asymmetric, so the padding must carry the zero point."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [2, 2, 2, 2], dilations = [2, 2]> (x, w1)
        a = LeakyRelu <alpha = 0.1> (c)
        g = Conv <group = 2, pads = [1, 0, 1, 0], kernel_shape = [3, 1]> (a, wg)
        p = PRelu (g, slope)
        y = Conv (p, w2)
    }
    """
    return with_weights(
        text,
        w1=rng.normal(size=(6, 3, 3, 3)),
        wg=rng.normal(size=(6, 3, 3, 1)),
        slope=np.array([0.05, 0.1, 0.2, 0.3, 0.02, 0.25]).reshape(6, 1, 1),
        w2=rng.normal(size=(4, 6, 1, 1)),
    )


def attention(rng: np.random.Generator) -> onnx.ModelProto:
    """Single-head attention: q, k, v projections (MatMul with constant weights and bias),
    Transpose, activation x activation MatMuls and an integer Softmax."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 6, 16] x) => (float[1, 6, 8] y) {
        q = MatMul (x, wq)
        k = MatMul (x, wk)
        v0 = MatMul (x, wv)
        v = Add (v0, bv)
        kt = Transpose <perm = [0, 2, 1]> (k)
        s = MatMul (q, kt)
        p = Softmax <axis = -1> (s)
        y = MatMul (p, v)
    }
    """
    return with_weights(
        text,
        wq=rng.normal(size=(16, 8)) * 0.3,
        wk=rng.normal(size=(16, 8)) * 0.3,
        wv=rng.normal(size=(16, 8)) * 0.3,
        bv=rng.normal(size=8) * 0.1,
    )


def float_islands(rng: np.random.Generator) -> onnx.ModelProto:
    """Two ops without an integer kernel (a channel Softmax, LRN) between integer convolutions
    (elementwise ones such as Sigmoid would become integer lookup tables)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1)
        s = Softmax <axis = 1> (c)
        d = Conv (s, w2)
        t = LRN <size = 3> (d)
        y = Conv (t, w3)
    }
    """
    return with_weights(
        text,
        w1=rng.normal(size=(4, 3, 3, 3)),
        w2=rng.normal(size=(4, 4, 1, 1)),
        w3=rng.normal(size=(4, 4, 1, 1)),
    )


def cuda_sources(module: tvm.runtime.Module) -> list[str]:
    """The CUDA device code under a compiled executable's module: the module and everything
    it imports (VM -> host code -> device code), sources of ``kind == "cuda"`` only."""
    own = [module.inspect_source()] if module.kind == "cuda" else []
    return own + [source for child in module.imports for source in cuda_sources(child)]


def assert_cpu_build_matches_reference(
    executable: tvm.runtime.Executable,
    program: IntegerProgram,
    feeds: Iterable[dict[str, np.ndarray]],
) -> None:
    """Run a compiled CPU build on each feed: every output's codes equal the reference
    interpreter's, bit for bit."""
    import tvm
    from tvm import relax

    from dyadiq.backends.tvm.lower import main_output_names
    from dyadiq.reference_interpreter import ReferenceInterpreter

    vm = relax.VirtualMachine(executable, tvm.cpu())
    reference = ReferenceInterpreter(program)
    for feed in feeds:
        values = vm["main"](*(tvm.runtime.tensor(feed[n]) for n in program.inputs))
        got = dict(zip(main_output_names(program), (v.numpy() for v in values), strict=True))
        for name, codes in reference.outputs(feed).items():
            assert np.array_equal(got[f"{name}_codes"], codes), name
