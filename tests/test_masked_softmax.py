"""Masked attention softmax: the structural match (Where and 1 - mask forms, stepping back to
the integer attention_mask), declined candidates with their reasons, masked positions at
probability 0, closeness to the float softmax, and integer ONNX bit-exact against the
reference interpreter (TVM and Cortex-M: tests/test_integer_transformer_block.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dyadiq import integer_program as ip
from dyadiq.backends.onnx.integer import export_integer_onnx
from dyadiq.consistency import bit_exactness
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.inspection import describe
from dyadiq.reference_interpreter import ReferenceInterpreter
from tests.transformer_block import (
    COMPLEMENT_MASK,
    WHERE_MASK,
    block_model,
    quantized_block,
)

INVERTED_WHERE_MASK = """
        mask4 = Unsqueeze (attention_mask, mask_axes)
        none = Constant <value = int64 {0}> ()
        dropped = Equal (mask4, none)
        zero = Constant <value = float {0.0}> ()
        lowest = Constant <value = float {-1e9}> ()
        mask = Where (dropped, lowest, zero)
"""
SMALL_WHERE_MASK = WHERE_MASK.replace("-3.4028234e38", "-1.0")


def _masked(program: ip.IntegerProgram) -> list[ip.MaskedSoftmax]:
    return [op for op in program.ops if isinstance(op, ip.MaskedSoftmax)]


@pytest.mark.parametrize("mask", [WHERE_MASK, COMPLEMENT_MASK], ids=["where", "complement"])
def test_the_mask_add_and_softmax_become_one_op_reading_the_integer_mask(mask: str) -> None:
    program = quantized_block(mask).program
    (op,) = _masked(program)
    assert op.mask == "attention_mask" and op.keep_nonzero
    assert program.float_ops == []  # Cast / Unsqueeze / Where / Sub / Mul are all gone
    assert not any(isinstance(o, ip.Softmax) for o in program.ops)


def test_an_inverted_where_keeps_where_its_condition_is_false() -> None:
    """Where(mask == 0, -big, 0): the match reads Equal's output (an island on the integer
    mask) and keeps the positions where it is zero (false)."""
    block = quantized_block(INVERTED_WHERE_MASK)
    (op,) = _masked(block.program)
    assert not op.keep_nonzero
    assert [name.split()[0] for name in block.program.float_ops] == ["Unsqueeze", "Equal"]
    report = bit_exactness(block.program, export_integer_onnx(block.program), block.feeds)
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


def test_a_mask_that_is_not_large_and_negative_is_declined_with_the_reason() -> None:
    program = quantized_block(SMALL_WHERE_MASK).program
    assert _masked(program) == []
    assert any(
        "masked softmax declined" in note and "not 0 and <= -10000" in note
        for note in program.notes
    ), program.notes
    assert {"Add", "Softmax", "Where"} <= {op.split()[0] for op in program.float_ops}


def test_masked_positions_get_probability_zero_and_rows_sum_to_one() -> None:
    block = quantized_block()
    program = block.program
    (op,) = _masked(program)
    q = program.quant[op.output]
    reference = ReferenceInterpreter(program)
    for feeds in block.feeds:
        probs = reference.run(feeds)[op.output].astype(np.int64)
        kept = feeds["attention_mask"][0].astype(bool)
        assert (probs[..., ~kept] == q.zero_point).all()
        sums = ((probs[..., kept] - q.zero_point) * q.scale).sum(axis=-1)
        assert np.abs(sums - 1.0).max() <= kept.sum() * q.scale  # half an LSB per element


def test_integer_masked_softmax_is_within_two_codes_of_the_float_softmax() -> None:
    """Against softmax(scores + mask) in float64 of the same dequantized scores."""
    block = quantized_block()
    program = block.program
    (op,) = _masked(program)
    qs, qy = program.quant[op.input], program.quant[op.output]
    reference = ReferenceInterpreter(program)
    diffs = []
    for feeds in block.feeds:
        env = reference.run(feeds)
        scores = (env[op.input].astype(np.float64) - qs.zero_point) * qs.scale
        scores = scores + np.where(feeds["attention_mask"][0].astype(bool), 0.0, -1e30)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = e / e.sum(axis=-1, keepdims=True)
        want = np.clip(np.round(probs / qy.scale) + qy.zero_point, qy.qmin, qy.qmax)
        diffs.append(np.abs(env[op.output].astype(np.int64) - want).ravel())
    diff = np.concatenate(diffs)
    assert diff.max() <= 2, diff.max()
    assert (diff == 0).mean() >= 0.9, (diff == 0).mean()


def test_a_fully_masked_row_is_a_plain_softmax_in_every_consumer() -> None:
    block = quantized_block()
    program = block.program
    feeds = [dict(block.feeds[0], attention_mask=np.zeros((1, 6), np.int64))]
    (op,) = _masked(program)
    probs = ReferenceInterpreter(program).run(feeds[0])[op.output]
    assert (probs != program.quant[op.output].zero_point).any()
    report = bit_exactness(program, export_integer_onnx(program), feeds)
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


@pytest.mark.parametrize("mask", [WHERE_MASK, COMPLEMENT_MASK], ids=["where", "complement"])
@pytest.mark.parametrize("act_signed", [False, True])
def test_integer_onnx_is_bit_exact(mask: str, act_signed: bool) -> None:
    block = quantized_block(mask, act_signed=act_signed)
    report = bit_exactness(block.program, export_integer_onnx(block.program), block.feeds)
    assert report["tensors"] > 0
    assert report["exact_tensors"] == report["tensors"], report["mismatches"]


def test_inspect_reports_the_masked_softmax() -> None:
    layers = {layer["op"]: layer for layer in describe(load_onnx(block_model()))["layers"]}
    for op in ("Softmax",):
        assert layers[op]["quantizable"] and "masked softmax" in layers[op]["reason"], layers[op]
