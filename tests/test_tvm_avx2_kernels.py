"""The AVX2 dot products of the x86 matmul kernel, against numpy, on operands that saturate
onnxruntime's u8 x s8 AVX2 kernels; and whole programs through the x86 lowering built for
x86-64-v3 (what an AVX2-only machine gets), bit for bit against the reference interpreter.

AVX2 code runs on AVX-512 machines too, so these run on either CPU kind; the x86-64-v3 library
is also run on an emulated Haswell in tests/test_x86_isa_levels.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from dyadiq import integer_program as ip
from dyadiq.backends.tvm import model_runner as tvm_model_runner
from dyadiq.backends.tvm import x86_kernels as kernels
from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
from dyadiq.backends.tvm.lower import lower_program, main_output_names
from dyadiq.reference_interpreter import ReferenceInterpreter
from tests import tvm_helpers
from tests.builders import calibration

V3 = target_for("x86-64-v3")
pytestmark = pytest.mark.skipif(
    "avx2" not in tvm_model_runner.cpu_flags(), reason="host CPU lacks AVX2"
)


def _run(func: tvm.tirx.PrimFunc, *args: np.ndarray) -> np.ndarray:
    library = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), V3)
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    library["main"](*tensors)
    return tensors[-1].numpy()


def _identity_epilogue(n: int) -> kernels.Epilogue:
    """The int32 accumulator itself (m = 1, no shift, no clip): every bit of it is compared."""
    return kernels.Epilogue.per_channel(
        n, np.zeros(n), np.ones(n), np.zeros(n), zero_point=0, lo=-(2**31), hi=2**31 - 1,
        out_dtype="int32",
    )  # fmt: skip


def _expected(a: np.ndarray, w: np.ndarray, flipped: bool) -> np.ndarray:
    acc = a.astype(np.int64) @ w.astype(np.int64).T
    if flipped:  # the kernel sums (a + 128) w; callers take 128 sum w out via the offset
        acc += 128 * w.astype(np.int64).sum(axis=1)
    return acc.astype(np.int32)


@pytest.mark.parametrize("isa", [kernels.AVX2_WIDE, kernels.AVX2_BYTES])
@pytest.mark.parametrize("in_dtype", ["uint8", "int8"])
@pytest.mark.parametrize(("m", "k", "n"), [(12, 64, 16), (1, 132, 10), (7, 40, 52)])
def test_avx2_matmul_is_exact_at_the_saturating_extremes(isa, in_dtype, m, k, n):
    rng = np.random.default_rng(m * k + n)
    info = np.iinfo(in_dtype)
    a = rng.choice([info.min, info.max], (m, k)).astype(in_dtype)  # the largest |codes|
    limit = 127 if isa is kernels.AVX2_WIDE else 64  # vpmaddubsw: pairs of |w| <= 128
    w = rng.choice([-limit, limit], (n, k)).astype(np.int8)
    assert isa.exact_for(w)
    func = kernels.packed_matmul((m, k), n, in_dtype, _identity_epilogue(n), isa=isa)
    npad = -(-n // isa.lanes) * isa.lanes
    packed = kernels.pack_weight(w, isa)
    out = _run(
        func, a, packed, *_identity_epilogue(n).kernel_args(npad), np.zeros((m, n), np.int32)
    )
    flipped = in_dtype == "int8" and isa.flips_int8
    assert np.array_equal(out, _expected(a, w, flipped))


def test_bytes_form_is_taken_only_where_int16_pair_sums_cannot_saturate():
    assert kernels.AVX2_BYTES.exact_for(np.full((4, 8), 63, np.int8))  # any 7-bit weights
    assert kernels.AVX2_BYTES.exact_for(np.array([[127, 1, -64, 64]], np.int8))
    assert not kernels.AVX2_BYTES.exact_for(np.array([[127, 2, 0, 0]], np.int8))
    assert kernels.AVX2_WIDE.exact_for(np.full((4, 8), 127, np.int8))


def _compiled_outputs(program: ip.IntegerProgram, feeds: dict[str, np.ndarray]) -> dict:
    lowered = lower_program(program, target=V3)
    vm = relax.VirtualMachine(compile_prepared(prepare(lowered, V3), V3), tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in program.inputs]
    values = [field.numpy() for field in vm["main"](*args)]
    return dict(zip(main_output_names(program), values, strict=True))


@pytest.mark.parametrize("mixed_w4", [False, True])
def test_x86_64_v3_lowering_is_bit_exact_with_both_dot_products(mixed_w4):
    rng = np.random.default_rng(9)
    calib = calibration((1, 3, 9, 9), rng, n=6)
    program = tvm_helpers.integer_program(
        tvm_helpers.depthwise_se_hard_swish(rng), calib, mixed_w4=mixed_w4
    )
    from dyadiq.backends.tvm.lower_x86 import X86Lowering

    bb = relax.BlockBuilder()
    lowering = X86Lowering(program, bb, vnni=False)
    picked = {lowering.dot_product(op.weight.reshape(op.weight.shape[0], -1)).name
              for op in program.ops if isinstance(op, ip.Conv) and op.group == 1}  # fmt: skip
    assert kernels.AVX2_BYTES.name in picked if mixed_w4 else kernels.AVX2_WIDE.name in picked
    reference = ReferenceInterpreter(program)
    for feeds in tvm_helpers.samples(calib, 4):
        got = _compiled_outputs(program, feeds)
        want = reference.outputs(feeds)
        for name, codes in want.items():
            assert np.array_equal(got[f"{name}_codes"], codes), name
