"""Cortex-M refusals the support matrix hit that were backend gaps, not limits of the board:
ShuffleNet's 5-d channel shuffle (``Transpose of rank > 4``) and openWakeWord's log-mel
``Clip(x, max(x) - 80 dB)`` (``input 1 must be a constant in C``); each on a small graph of the
same shape, run on QEMU against the reference interpreter."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dyadiq import integer_program as ip
from dyadiq.backends.mcu.emit_c import emit_c_project
from dyadiq.backends.mcu.transpose_rank import collapse_transpose
from dyadiq.errors import UnsupportedModelError
from dyadiq.quantizers import ActQuant
from tests.mcu_helpers import assert_bit_exact_on_qemu
from tests.test_mcu_backend import needs_toolchain
from tests.test_mcu_float_islands import _device_vs_reference, _island_program


def test_collapsed_transpose_moves_the_same_elements_for_every_perm_up_to_rank_5() -> None:
    rng = np.random.default_rng(0)
    for rank in range(1, 6):
        for perm in itertools.permutations(range(rank)):
            for _ in range(3):
                shape = tuple(int(v) for v in rng.integers(1, 4, rank))
                x = rng.integers(0, 100, shape)
                new_shape, new_perm = collapse_transpose(shape, perm)
                assert len(new_shape) == len(new_perm) <= rank
                moved = np.transpose(x.reshape(new_shape), new_perm).reshape(-1)
                assert np.array_equal(np.transpose(x, perm).reshape(-1), moved), (shape, perm)
    # ShuffleNet's channel shuffle: [1, g, c/g, h, w] by (0, 2, 1, 3, 4) is [g, c/g, h*w]
    assert collapse_transpose((1, 3, 4, 5, 6), (0, 2, 1, 3, 4)) == ((3, 4, 30), (1, 0, 2))
    assert collapse_transpose((1, 1), (1, 0)) == ((1,), (0,))


def _transpose_program(shape: tuple[int, ...], perm: tuple[int, ...]) -> ip.IntegerProgram:
    out = tuple(shape[p] for p in perm)
    quant = {"x_q": ActQuant(1 / 16, 3, 8, False), "y_q": ActQuant(1 / 16, 3, 8, False)}
    ops: list[ip.IntOp] = [ip.QuantizeInput("x_q", "x"), ip.Transpose("y_q", "x_q", perm)]
    return ip.IntegerProgram(
        ops, quant, {"x": shape, "x_q": shape, "y_q": out},
        {"x": (np.dtype(np.float32), shape)}, ["y_q"],
    )  # fmt: skip


@needs_toolchain
def test_channel_shuffle_transpose_of_rank_5_is_bit_exact_under_qemu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    program = _transpose_program((1, 3, 4, 5, 6), (0, 2, 1, 3, 4))
    project = emit_c_project(program, tmp_path / "m4")
    rng = np.random.default_rng(1)
    calib = [{"x": rng.uniform(-0.1, 15, (1, 3, 4, 5, 6)).astype(np.float32)} for _ in range(2)]
    assert_bit_exact_on_qemu(project, program, calib)


def test_a_transpose_that_stays_rank_5_is_still_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    program = _transpose_program((2, 3, 4, 5, 6), (4, 2, 0, 3, 1))
    with pytest.raises(UnsupportedModelError, match="Transpose of rank > 4"):
        emit_c_project(program, tmp_path / "p")


# openWakeWord's melspectrogram: the log-mel clipped at its own maximum - 80 dB (here - 2)
CLIP_AT_COMPUTED_MIN = """
    r = ReduceMax <keepdims = 0> (xf)
    lo = Sub (r, db)
    yf = Clip (xf, lo, hi)
"""


@needs_toolchain
def test_clip_at_a_bound_the_island_computes_runs_in_c(tmp_path) -> None:  # type: ignore[no-untyped-def]
    inits = {"db": np.array(2.0, np.float32), "hi": np.array(3.0, np.float32)}
    program = _island_program(CLIP_AT_COMPUTED_MIN, (1, 4, 6), (1, 4, 6), inits, out_scale=1 / 32)
    rng = np.random.default_rng(3)
    calib = [{"x": rng.uniform(-3.9, 3.9, (1, 4, 6)).astype(np.float32)} for _ in range(3)]
    assert _device_vs_reference(program, calib, tmp_path)["y_q"] == 0
    model_c = (tmp_path / "m4" / "model.c").read_text()
    assert "fmaxf(" in model_c and "[0])" in model_c  # the bound read at run time


def _ort_resize(x: np.ndarray, out_size: int, transform: str, rounding: str) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node(
        "Resize", ["x", "", "", "sizes"], ["y"], mode="nearest",
        coordinate_transformation_mode=transform, nearest_mode=rounding,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, x.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_size])],
        [helper.make_tensor("sizes", TensorProto.INT64, [2], [1, out_size])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x[None]})[0][0])


def test_nearest_resize_index_tables_are_onnxruntimes() -> None:
    from dyadiq.backends.mcu.float_ops import nearest_source_index

    transforms = ("asymmetric", "half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                  "align_corners")  # fmt: skip
    roundings = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
    for in_size, out_size in ((4, 8), (5, 7), (6, 3), (3, 12), (7, 7), (1, 4)):
        x = np.arange(in_size, dtype=np.float32) * 10
        for transform, rounding in itertools.product(transforms, roundings):
            scale = np.float32(out_size) / np.float32(in_size)
            index = (
                np.arange(out_size)  # scale 1: onnxruntime copies, as the C kernel does
                if in_size == out_size
                else nearest_source_index(out_size, in_size, float(scale), transform, rounding)
            )
            want = _ort_resize(x, out_size, transform, rounding)
            assert np.array_equal(x[index], want), (in_size, out_size, transform, rounding)


# YOLOv8 / DBNet / PicoDet's feature-pyramid upsampling: nearest, asymmetric, floor
RESIZE_NEAREST = """
    u = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric",
                nearest_mode = "floor"> (xf, roi, scales)
    yf = Relu (u)
"""
RESIZE_HALF_PIXEL = """
    yf = Resize <mode = "nearest"> (xf, roi, scales)
"""


@needs_toolchain
@pytest.mark.parametrize(
    ("body", "scales", "out_shape"),
    [
        (RESIZE_NEAREST, [1, 1, 2, 2], (1, 2, 6, 8)),
        (RESIZE_HALF_PIXEL, [1, 1, 1.5, 0.5], (1, 2, 4, 2)),
    ],
)
def test_nearest_resize_in_a_float_island_runs_in_c(tmp_path, body, scales, out_shape) -> None:  # type: ignore[no-untyped-def]
    inits = {"roi": np.zeros(0, np.float32), "scales": np.array(scales, np.float32)}
    program = _island_program(body, (1, 2, 3, 4), out_shape, inits, out_scale=1 / 32)
    rng = np.random.default_rng(5)
    calib = [{"x": rng.uniform(-3.9, 3.9, (1, 2, 3, 4)).astype(np.float32)} for _ in range(2)]
    assert _device_vs_reference(program, calib, tmp_path)["y_q"] == 0
