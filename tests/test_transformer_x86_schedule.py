"""The transformer block through the x86 build that ``--target x86`` runs: lowered, fused,
*scheduled* (the default schedules inline elementwise chains) and compiled. MiniLM's build
never finished: the integer LayerNorm's square root, written as Relax ops, fused into one
PrimFunc whose inlined Newton steps grew as 3^steps. It is now one TIR loop; these tests keep
every scheduled PrimFunc small and the library bit-exact against the reference."""

from __future__ import annotations

import numpy as np
import pytest

from dyadiq import integer_program as ip
from dyadiq.reference_interpreter import ReferenceInterpreter, integer_sqrt
from tests.transformer_block import quantized_block

tvm = pytest.importorskip("tvm")

# the largest scheduled PrimFunc of the block is some 4k characters of TVMScript; the inlined
# Newton chain was 115k
LARGEST_PRIMFUNC_CHARS = 20_000


def _needs_avx2() -> None:
    from dyadiq.backends.tvm import model_runner

    if "avx2" not in model_runner.cpu_flags():
        pytest.skip("host CPU lacks AVX2")


def test_scheduled_primfuncs_stay_small() -> None:
    from dyadiq.backends.tvm.build import prepare, target_for
    from dyadiq.backends.tvm.lower import lower_program
    from dyadiq.backends.tvm.tuning import schedule_module_with_report

    target = target_for("x86-64-v3")
    program = quantized_block(batched=True).program
    prepared = prepare(lower_program(program, target=target, float_islands=True), target)
    scheduled, _ = schedule_module_with_report(prepared, target, database_dir=None, trials=0)
    sizes = {
        gv.name_hint: len(str(func))
        for gv, func in scheduled.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc)
    }
    roots = [name for name in sizes if name.startswith("dq_integer_sqrt")]
    layer_norms = sum(isinstance(op, ip.LayerNorm) for op in program.ops)
    assert layer_norms == 3 and roots  # one kernel per shape: add_func shares equal ones
    largest = max(sizes, key=sizes.__getitem__)
    assert sizes[largest] < LARGEST_PRIMFUNC_CHARS, largest


def test_integer_sqrt_kernel_is_the_reference() -> None:
    from tvm import relax

    from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
    from dyadiq.backends.tvm.integer_sqrt_kernel import integer_sqrt_kernel

    rng = np.random.default_rng(0)
    # every bit length up to 2^62, with squares and their neighbours
    bits = np.arange(62, dtype=np.int64)
    n = np.concatenate(
        [
            np.left_shift(np.int64(1), bits),
            np.left_shift(np.int64(1), bits) - 1,
            rng.integers(1, 2**62, size=200, dtype=np.int64),
            np.arange(1, 100, dtype=np.int64) ** 2,
            np.arange(2, 100, dtype=np.int64) ** 2 - 1,
        ]
    )
    n = n[n >= 1]
    bb = relax.BlockBuilder()
    x = relax.Var("n", relax.TensorType((n.size,), "int64"))
    with bb.function("main", [x]):
        gv = bb.add_func(integer_sqrt_kernel(n.size), "isqrt")
        out = bb.emit(relax.call_tir(gv, [x], relax.TensorType((n.size,), "int64")))
        bb.emit_func_output(out)
    target = target_for("x86")
    vm = relax.VirtualMachine(compile_prepared(prepare(bb.get(), target), target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(n)).numpy()
    assert np.array_equal(got, integer_sqrt(n))


def test_scheduled_x86_library_is_bit_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The library ``TvmTarget.emit`` builds (lowered, fused, scheduled, compiled, exported)
    gives the reference's codes, with padding masks of every length and a fully masked one."""
    from dyadiq.backends.target import EmitOptions
    from dyadiq.backends.tvm.build import run_library
    from dyadiq.backends.tvm.lower import main_output_names
    from dyadiq.backends.tvm.target import tvm_target

    _needs_avx2()
    block = quantized_block(batched=True)
    program = block.program
    artifact = tvm_target("x86-64-v3").emit(program, tmp_path, EmitOptions())
    assert artifact.report.get("kernels_by_schedule_source", {}).get("default", 0) > 0
    reference = ReferenceInterpreter(program)
    feeds_list = [*block.feeds, dict(block.feeds[0], attention_mask=np.zeros((1, 6), np.int64))]
    for feeds in feeds_list:
        got = run_library(artifact.path, feeds)
        assert sorted(got) == sorted(main_output_names(program))
        for name, codes in reference.outputs(feeds).items():
            assert np.array_equal(got[f"{name}_codes"], codes), name
