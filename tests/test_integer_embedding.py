"""BERT's embeddings in integers: ``Gather(table, ids) + constant rows`` before the first
LayerNorm becomes one :class:`ip.Embedding` (int8 table codes, wide int32 sum) that the
integer LayerNorm reads as it reads the residual stream. The reference interpreter, integer
ONNX, the x86 TVM library and the Cortex-M C (under QEMU) agree bit for bit."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from dyadiq import integer_program as ip
from dyadiq.backends.onnx.integer import export_integer_onnx
from dyadiq.consistency import bit_exactness
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.integerize import integerize
from dyadiq.pipeline import quantize_graph
from dyadiq.plan import PrecisionPlan
from dyadiq.reference_interpreter import ReferenceInterpreter
from tests.test_inspect_agrees_with_integer import TOKENS, VOCAB, _embeddings_model


def _feeds(seed: int, n: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = [{"ids": rng.integers(0, VOCAB, size=(1, TOKENS), dtype=np.int64)} for _ in range(n)]
    feeds[0]["ids"][0, :2] = [-1, -VOCAB]  # ONNX Gather: negative ids count from the end
    return feeds


@functools.cache
def _program() -> ip.IntegerProgram:
    graph = load_onnx(_embeddings_model())
    plan = PrecisionPlan.uniform(graph)
    result = quantize_graph(graph, plan, _feeds(1))
    return integerize(result.graph, plan, result.sites, result.qdq.act_params)


def test_embedding_sum_and_layer_norm_are_integer() -> None:
    program = _program()
    embeddings = [op for op in program.ops if isinstance(op, ip.Embedding)]
    assert len(embeddings) == 1
    (embedding,) = embeddings
    assert embedding.table.dtype == np.int8 and program.quant[embedding.output].bits == 32
    norms = [op for op in program.ops if isinstance(op, ip.LayerNorm)]
    assert len(norms) == 1 and norms[0].inputs == (embedding.output,)
    assert not program.float_ops, program.float_ops  # the Gather, two Adds, LayerNorm were


def test_reference_is_the_float_sum_within_rounding() -> None:
    """The wide codes are the float embedding sum to within the table's rounding."""
    program = _program()
    (embedding,) = [op for op in program.ops if isinstance(op, ip.Embedding)]
    feeds = _feeds(2)[0]
    env = ReferenceInterpreter(program).run(feeds)
    got = env[embedding.output].astype(np.float64) * program.quant[embedding.output].scale
    model = _embeddings_model()
    weights = {t.name: t for t in model.graph.initializer}
    from onnx import numpy_helper

    table = numpy_helper.to_array(weights["table"]).astype(np.float64)
    want = (
        table[feeds["ids"]]
        + numpy_helper.to_array(weights["token_type"])
        + numpy_helper.to_array(weights["position"])
    )
    # each row on its own int8 grid: half a step of that row, its scale's rounding (2^-11 of
    # it) and half an output step for the constants
    row_step = np.abs(table).max(axis=1) / 127
    error = np.abs(got - want)
    allowed = (
        row_step[feeds["ids"]][..., None] * (0.5 + 2.0**-10) + program.quant[embedding.output].scale
    )
    assert (error <= allowed).all()
    # per-row scales: the small rows are much finer than one table-wide scale allows
    assert error.max() < 0.5 * np.abs(table).max() / 127


def test_row_scales_put_every_row_on_its_own_grid() -> None:
    (embedding,) = [op for op in _program().ops if isinstance(op, ip.Embedding)]
    assert embedding.row_scales.dtype == np.int32
    assert embedding.row_scales.min() >= 2**10  # the finest row keeps 10 bits of its scale
    assert (np.abs(embedding.table).max(axis=1) == 127).all()  # each row spans the grid


def test_integer_onnx_is_bit_exact() -> None:
    program = _program()
    report = bit_exactness(program, export_integer_onnx(program), _feeds(3))
    assert report["tensors"] > 0
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


def test_x86_tvm_is_bit_exact() -> None:
    pytest.importorskip("tvm")

    from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
    from dyadiq.backends.tvm.lower import lower_program
    from tests.tvm_helpers import assert_cpu_build_matches_reference

    program = _program()
    target = target_for("x86")
    lowered = lower_program(program, target=target, float_islands=True)
    executable = compile_prepared(prepare(lowered, target), target)
    assert_cpu_build_matches_reference(executable, program, _feeds(4))


def test_cortex_m_is_bit_exact_under_qemu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The int64 ids are the device's raw input; the table lookup writes int32 codes that the
    C LayerNorm reads wide."""
    from dyadiq.backends.mcu.build import ToolchainError, find_toolchain
    from dyadiq.backends.mcu.emit_c import emit_c_project
    from tests.mcu_helpers import assert_bit_exact_on_qemu

    try:
        find_toolchain(need_qemu=True)
    except ToolchainError as exc:
        pytest.skip(str(exc))
    program = _program()
    project = emit_c_project(program, tmp_path, cpu="cortex-m4")
    assert "dq_embedding(" in (tmp_path / "model.c").read_text()
    feeds = _feeds(5)
    inputs = np.stack([f["ids"].astype(np.float32).reshape(-1) for f in feeds])
    assert_bit_exact_on_qemu(project, program, feeds, device_inputs=inputs)


def test_flash_precheck_counts_the_token_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The precheck's flash (from the program) is what the emitter stores, table included."""
    from dyadiq.backends.mcu.costs import program_weight_flash_bytes
    from dyadiq.backends.mcu.emit_c import emit_c_project

    program = _program()
    (embedding,) = [op for op in program.ops if isinstance(op, ip.Embedding)]
    project = emit_c_project(program, tmp_path, cpu="cortex-m4")
    table = (
        embedding.table.size + 4 * embedding.row_scales.size + 4 * TOKENS * embedding.table.shape[1]
    )
    assert program_weight_flash_bytes(program) == project.weight_flash_bytes
    assert table in [layer.total for layer in project.layers]
