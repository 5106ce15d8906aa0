"""One dispatch over the ops of an :class:`~dyadiq.integer_program.IntegerProgram`.

Every consumer of the integer program (the reference interpreter, integer ONNX, the TVM
lowerings, the microcontroller emitter) subclasses :class:`IntOpVisitor` and defines one
``visit_<OpClass>`` method per op class it handles, named exactly after the class
(``visit_Conv``, ``visit_GlobalAvgPool``, as :class:`ast.NodeVisitor` does). :meth:`visit`
calls the method for the op's class.

What a consumer supports is therefore what it defines: :meth:`IntOpVisitor.supported_ops`
reads it off the class, so no backend keeps a hand-written list that can drift from its code.
Adding an integer op is one class in :mod:`dyadiq.integer_program` and one method per
consumer; a consumer without the method refuses the op (before it starts, through
``supported_ops``) instead of lowering something else.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from dyadiq import integer_program as ip
from dyadiq.errors import InternalError

R = TypeVar("R")


def visit_method_name(op_class: type) -> str:
    return f"visit_{op_class.__name__}"


class IntOpVisitor(Generic[R]):
    """Dispatch ``visit(op)`` to ``self.visit_<type(op).__name__>(op)``.

    The base class defines no ``visit_*`` method: a subclass states what it handles by what
    it defines. It holds no state, so it can be mixed into a class that has its own base."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        """A ``visit_`` method that names no op class is a typo that would silently never be
        called (``visit_Maxpool``): refuse it when the class is defined."""
        super().__init_subclass__(**kwargs)
        known = {visit_method_name(op_class) for op_class in ip.INT_OP_CLASSES}
        strays = sorted(
            name for name in vars(cls) if name.startswith("visit_") and name not in known
        )
        if strays:
            raise InternalError(f"{cls.__name__}: {', '.join(strays)} name no integer op class")

    def visit(self, op: ip.IntOp) -> R:
        method = getattr(self, visit_method_name(type(op)), None)
        if method is None:
            # consumers refuse programs with ops outside supported_ops() before they start;
            # reaching this is a consumer that skipped that check
            raise InternalError(
                f"{type(self).__name__} has no {visit_method_name(type(op))} for "
                f"{getattr(op, 'output', type(op).__name__)}"
            )
        result: R = method(op)
        return result

    @classmethod
    def supported_ops(cls) -> frozenset[type]:
        """The integer op classes this visitor (with its base classes) has a method for."""
        return frozenset(
            op_class
            for op_class in ip.INT_OP_CLASSES
            if callable(getattr(cls, visit_method_name(op_class), None))
        )
