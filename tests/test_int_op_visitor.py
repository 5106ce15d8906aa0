"""IntOpVisitor: dispatch by op class, supported ops read off the methods, typos refused."""

from __future__ import annotations

import onnx
import pytest

from dyadiq import integer_program as ip
from dyadiq.errors import InternalError
from dyadiq.int_op_visitor import IntOpVisitor
from dyadiq.reference_interpreter import ReferenceInterpreter


class _Names(IntOpVisitor[str]):
    def visit_Clip(self, op: ip.Clip) -> str:
        return f"clip {op.output}"

    def visit_Reshape(self, op: ip.Reshape) -> str:
        return f"reshape {op.output}"


def test_visit_calls_the_method_named_after_the_op_class() -> None:
    names = _Names()
    assert names.visit(ip.Clip("y", "x", 0, 5)) == "clip y"
    assert names.visit(ip.Reshape("z", "y", (1, -1))) == "reshape z"


def test_supported_ops_are_the_classes_with_a_method_including_inherited_ones() -> None:
    class _More(_Names):
        def visit_Transpose(self, op: ip.Transpose) -> str:
            return "transpose"

    assert _Names.supported_ops() == {ip.Clip, ip.Reshape}
    assert _More.supported_ops() == {ip.Clip, ip.Reshape, ip.Transpose}


def test_an_op_without_a_method_is_an_internal_error_naming_both() -> None:
    with pytest.raises(InternalError, match=r"_Names has no visit_Transpose for t"):
        _Names().visit(ip.Transpose("t", "x", (1, 0)))


def test_a_visit_method_that_names_no_op_class_is_refused_at_definition() -> None:
    with pytest.raises(InternalError, match="visit_Maxpool"):

        class _Typo(IntOpVisitor[None]):
            def visit_Maxpool(self, op: ip.MaxPool) -> None:  # MaxPool, misspelled
                pass


def test_the_reference_interpreter_defines_every_op() -> None:
    # the reference is the semantics: a backend may lack an op, the reference may not
    assert ReferenceInterpreter.supported_ops() == frozenset(ip.INT_OP_CLASSES)


def test_integer_onnx_lowers_every_op() -> None:
    from dyadiq.backends.onnx.integer import _Lowering

    assert _Lowering.supported_ops() == frozenset(ip.INT_OP_CLASSES)


def test_tvm_lowers_every_op_and_refuses_float_islands_unless_asked() -> None:
    pytest.importorskip("tvm")
    from dyadiq.backends.tvm.lower import _Lowering, unsupported_ops
    from dyadiq.backends.tvm.lower_x86 import X86Lowering

    assert _Lowering.supported_ops() == frozenset(ip.INT_OP_CLASSES)
    assert X86Lowering.supported_ops() == _Lowering.supported_ops()
    island = ip.FloatIsland(
        (onnx.helper.make_node("Erf", ["x"], ["y"], name="erf"),), (), ("x",), ("y",)
    )
    program = ip.IntegerProgram([island], {}, {"x": (1, 4), "y": (1, 4)}, {}, ["y"])
    assert unsupported_ops(program) == ["FloatIsland [Erf erf]"]
    assert unsupported_ops(program, float_islands=True) == []


def test_the_microcontroller_emitter_refuses_exactly_the_ops_it_has_no_method_for() -> None:
    from dyadiq.backends.mcu.emit_c import _Emitter

    # float islands and their Quantize run as float C now (backends/mcu/float_c.py)
    assert frozenset(ip.INT_OP_CLASSES) - _Emitter.supported_ops() == frozenset()
