"""The hand-written x86 VNNI kernels, one by one against numpy, and where the x86 lowering
uses them. Whole programs through this lowering are checked in tests/test_tvm_backend.py."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from dyadiq import integer_program as ip
from dyadiq.backends.tvm import x86_kernels as kernels
from dyadiq.backends.tvm.build import target_for
from dyadiq.backends.tvm.lower import lower_program
from dyadiq.backends.tvm.lower_x86 import has_vnni
from dyadiq.errors import InternalError
from tests import tvm_helpers
from tests.builders import calibration

X86 = target_for("x86")
pytestmark = pytest.mark.skipif(not has_vnni(X86), reason="host CPU lacks AVX-512 VNNI")


def _run(func: tvm.tirx.PrimFunc, *args: np.ndarray) -> list[np.ndarray]:
    library = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), X86)
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    library["main"](*tensors)
    return [t.numpy() for t in tensors]


def _requant(acc: np.ndarray, ep: kernels.Epilogue, channels: int) -> np.ndarray:
    """The reference interpreter's requantization, channel last."""
    v = acc.astype(np.int64) + ep.offset[:channels]
    v = (v * ep.mult[:channels] + ep.rounding[:channels]) >> ep.shift[:channels]
    return np.clip(v + ep.zero_point, ep.lo, ep.hi).astype(ep.out_dtype)


def _epilogue(rng: np.random.Generator, n: int, out_dtype: str) -> kernels.Epilogue:
    lo, hi = (0, 255) if out_dtype == "uint8" else (-128, 127)
    return kernels.Epilogue.per_channel(
        n,
        rng.integers(-5000, 5000, n),
        rng.integers(1 << 20, 1 << 30, n),
        rng.integers(18, 30, n),  # some outputs saturate, most do not
        zero_point=int(rng.integers(lo, hi)),
        lo=lo,
        hi=hi,
        out_dtype=out_dtype,
    )


def _codes(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


@pytest.mark.parametrize(
    ("m", "k", "n", "in_dtype"),
    [
        (64, 16, 24, "uint8"),  # N not a multiple of 16: scalar tail
        (49, 96, 48, "int8"),  # int8 codes flipped to u8 in the register
        (1, 132, 10, "uint8"),  # one row (a dense layer at batch 1)
        (30, 8, 160, "int8"),  # several 16-channel blocks per tile
    ],
)
def test_packed_matmul_matches_numpy(m, k, n, in_dtype):
    rng = np.random.default_rng(m + k + n)
    a = _codes(rng, (m, k), in_dtype)
    w = _codes(rng, (n, k), "int8")
    ep = _epilogue(rng, n, "uint8")
    func = kernels.packed_matmul((m, k), n, in_dtype, ep)
    npad = -(-n // kernels.LANES) * kernels.LANES
    out = _run(func, a, kernels.pack_weight(w), *ep.kernel_args(npad), np.zeros((m, n), np.uint8))[
        -1
    ]
    acc = a.astype(np.int64) @ w.astype(np.int64).T
    if in_dtype == "int8":  # the kernel sums (a + 128) w; callers take 128 sum w out via offset
        acc += 128 * w.astype(np.int64).sum(axis=1)
    expected = _requant(acc, ep, n)
    assert np.array_equal(out, expected)
    assert 0 < (expected == 255).sum() < expected.size  # the clip is exercised, not everywhere


def test_packed_matmul_reads_nhwc_without_a_reshape():
    rng = np.random.default_rng(1)
    x = _codes(rng, (1, 5, 7, 12), "uint8")
    w = _codes(rng, (20, 12), "int8")
    ep = _epilogue(rng, 20, "int8")
    func = kernels.packed_matmul(x.shape, 20, "uint8", ep, (1, 5, 7, 20))
    out = _run(
        func, x, kernels.pack_weight(w), *ep.kernel_args(32), np.zeros((1, 5, 7, 20), np.int8)
    )
    acc = x.reshape(-1, 12).astype(np.int64) @ w.astype(np.int64).T
    assert np.array_equal(out[-1].reshape(-1, 20), _requant(acc, ep, 20))


def _depthwise_reference(
    x: np.ndarray, taps: np.ndarray, stride: int, pad: int, fill: int
) -> np.ndarray:
    kh, kw, c = taps.shape
    padded = np.pad(
        x.astype(np.int64), [(0, 0), (pad, pad), (pad, pad), (0, 0)], constant_values=fill
    )
    oh = (padded.shape[1] - kh) // stride + 1
    ow = (padded.shape[2] - kw) // stride + 1
    acc = np.zeros((x.shape[0], oh, ow, c), np.int64)
    for u in range(kh):
        for v in range(kw):
            window = padded[
                :, u : u + stride * (oh - 1) + 1 : stride, v : v + stride * (ow - 1) + 1 : stride
            ]
            acc += window * taps[u, v].astype(np.int64)
    return acc


@pytest.mark.parametrize(
    ("stride", "in_dtype", "channels"), [(1, "uint8", 32), (2, "int8", 24), (1, "int8", 6)]
)
def test_depthwise_pads_in_the_kernel_with_the_zero_point(stride, in_dtype, channels):
    rng = np.random.default_rng(stride + channels)
    x = _codes(rng, (1, 9, 10, channels), in_dtype)
    taps = _codes(rng, (3, 3, channels), "int8")
    fill = 7 if in_dtype == "uint8" else -5  # the input's zero point
    ep = _epilogue(rng, channels, "uint8")
    func, (oh, ow) = kernels.depthwise_nhwc(
        x.shape, (3, 3), (stride, stride), (1, 1), (1, 1, 1, 1), in_dtype, fill, ep
    )
    out = _run(func, x, taps, *ep.kernel_args(channels), np.zeros((1, oh, ow, channels), np.uint8))
    expected = _requant(_depthwise_reference(x, taps, stride, 1, fill), ep, channels)
    assert out[-1].shape == expected.shape and np.array_equal(out[-1], expected)


def test_im2col_rows_and_channel_padding():
    rng = np.random.default_rng(3)
    x = _codes(rng, (1, 6, 5, 3), "uint8")
    func, c4, (oh, ow) = kernels.im2col_nhwc(
        x.shape, "uint8", (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 9
    )
    assert c4 == 4 and (oh, ow) == (3, 3)
    rows = _run(func, x, np.zeros((oh * ow, 9 * c4), np.uint8))[-1].reshape(oh, ow, 3, 3, c4)
    padded = np.pad(x[0], [(1, 1), (1, 1), (0, 0)], constant_values=9)
    for y in range(oh):
        for xo in range(ow):
            window = padded[2 * y : 2 * y + 3, 2 * xo : 2 * xo + 3]
            assert np.array_equal(rows[y, xo, :, :, :3], window)
            assert (rows[y, xo, :, :, 3] == 9).all()  # padded channels hold the fill


def test_pack_weight_refuses_k_not_a_multiple_of_four():
    with pytest.raises(InternalError, match="K % 4"):
        kernels.pack_weight(np.zeros((16, 6), np.int8))


def test_vnni_detection_follows_the_target():
    assert has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    assert not has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    assert not has_vnni(target_for("aarch64"))
    assert not has_vnni(target_for("cuda"))


def test_x86_lowering_puts_every_depthwise_and_group1_conv_in_a_vnni_kernel():
    rng = np.random.default_rng(4)
    program = tvm_helpers.integer_program(
        tvm_helpers.depthwise_se_hard_swish(rng), calibration((1, 3, 9, 9), rng, n=4)
    )
    convs = [op for op in program.ops if isinstance(op, ip.Conv)]
    weighted = convs + [
        op for op in program.ops if isinstance(op, ip.MatMul) and op.weight is not None
    ]
    mod = lower_program(program, target=X86)
    hand = [
        f
        for f in mod.functions.values()
        if isinstance(f, tvm.tirx.PrimFunc) and kernels.HAND_SCHEDULED in f.attrs
    ]
    # one kernel per weighted layer, plus one im2col per KxK group-1 convolution
    im2cols = sum(1 for op in convs if op.group == 1 and op.weight.shape[2:] != (1, 1))
    assert len(hand) == len(weighted) + im2cols
    vnni = [f for f in hand if "vpdpbusd" in str(f)]
    assert len(vnni) == sum(1 for op in convs if op.group == 1) + (len(weighted) - len(convs))
    assert "relax.nn.conv2d" not in str(mod["main"])  # no portable convolution left


@pytest.mark.parametrize("single_rounding", [False, True])
def test_residual_add_matches_the_reference_rounding(single_rounding):
    from dyadiq.dyadic import requantize

    rng = np.random.default_rng(5)
    shape = (1, 6, 5, 24)
    a, b = _codes(rng, shape, "uint8"), _codes(rng, shape, "int8")
    zps, z, (lo, hi) = (13, -7), 5, (0, 255)
    shifts = (30, 30) if single_rounding else (30, 27)
    mults = (int(rng.integers(1 << 28, 1 << 30)), int(rng.integers(1 << 26, 1 << 29)))
    add = kernels.ResidualAdd(mults, shifts, zps, z, lo, hi, single_rounding)
    out = _run(
        kernels.residual_add(shape, ("uint8", "int8"), "uint8", add),
        a,
        b,
        np.zeros(shape, np.uint8),
    )
    va, vb = a.astype(np.int64) - zps[0], b.astype(np.int64) - zps[1]
    if single_rounding:
        total = requantize(va * mults[0] + vb * mults[1], 1, shifts[0])
    else:
        total = requantize(va, mults[0], shifts[0]) + requantize(vb, mults[1], shifts[1])
    expected = np.clip(total + z, lo, hi).astype(np.uint8)
    assert np.array_equal(out[-1], expected)
    assert 0 < ((expected == lo) | (expected == hi)).sum() < expected.size  # clipping exercised
