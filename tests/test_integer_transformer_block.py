"""A one-block transformer (integer LayerNorms over residual Adds, a masked softmax, GELU as a
lookup table) on the compiled targets: the x86 TVM library and Cortex-M C under QEMU give the
reference interpreter's codes bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from dyadiq import integer_program as ip
from dyadiq.reference_interpreter import ReferenceInterpreter
from tests.transformer_block import DEVICE_MASK, quantized_block


def test_every_consumer_has_layer_norm_and_masked_softmax() -> None:
    from dyadiq.backends.mcu.emit_c import _Emitter
    from dyadiq.backends.onnx.integer import _Lowering as OnnxLowering

    for visitor in (ReferenceInterpreter, OnnxLowering, _Emitter):
        assert {ip.LayerNorm, ip.MaskedSoftmax} <= visitor.supported_ops(), visitor.__name__


def test_x86_tvm_build_is_bit_exact() -> None:
    pytest.importorskip("tvm")
    from dyadiq.backends.tvm import model_runner
    from dyadiq.backends.tvm.build import compile_prepared, prepare, target_for
    from dyadiq.backends.tvm.lower import _Lowering, lower_program
    from tests.tvm_helpers import assert_cpu_build_matches_reference

    assert {ip.LayerNorm, ip.MaskedSoftmax} <= _Lowering.supported_ops()
    if "avx2" not in model_runner.cpu_flags():
        pytest.skip("host CPU lacks AVX2")
    target = target_for("x86-64-v3")
    block = quantized_block(batched=True)  # the residual stream passed on wide (int32)
    program = block.program
    assert [op.split()[0] for op in program.float_ops] == ["Reshape"]  # of the float input
    assert any(isinstance(op, ip.LayerNorm) and op.wide_output for op in program.ops)
    lowered = lower_program(program, target=target, float_islands=True)
    executable = compile_prepared(prepare(lowered, target), target)
    feeds_list = [*block.feeds, dict(block.feeds[0], attention_mask=np.zeros((1, 6), np.int64))]
    assert_cpu_build_matches_reference(executable, program, feeds_list)


def test_cortex_m_is_bit_exact_under_qemu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """One input (what the device takes): the mask is computed on the device by float C
    islands from the sign of one channel of the first layer's output."""
    from dyadiq.backends.mcu.build import ToolchainError, find_toolchain
    from dyadiq.backends.mcu.emit_c import emit_c_project
    from tests.mcu_helpers import assert_bit_exact_on_qemu

    try:
        find_toolchain(need_qemu=True)
    except ToolchainError as exc:
        pytest.skip(str(exc))
    block = quantized_block(DEVICE_MASK)
    program = block.program
    kinds = {type(op) for op in program.ops}
    assert {ip.LayerNorm, ip.MaskedSoftmax} <= kinds and ip.Softmax not in kinds
    project = emit_c_project(program, tmp_path, cpu="cortex-m4")
    model_c = (tmp_path / "model.c").read_text()
    assert "dq_layer_norm(" in model_c and "dq_masked_softmax(" in model_c
    assert_bit_exact_on_qemu(project, program, block.feeds)
