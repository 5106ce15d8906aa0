"""Exact vector-Jacobian products u -> J^T u of a float ONNX model, by TVM Relax reverse mode.

J is the Jacobian of the model's first output with respect to chosen weight tensors. The
scalar s(W) = sum(u * f(x; W)) has gradient J^T u, so one reverse pass per cotangent u gives
the product exactly (to float32 rounding). With the forward finite difference for J v this
yields Gauss-Newton products H v = J^T (H_out (J v)) for power iteration, and per-sample
gradients J^T (p - e_y) for the Fisher diagonal and the Taylor proxy.

Recipe (TVM-NOTES.md "Gradients"): import with ``keep_params_in_input=True`` so weights are
function parameters, add s in Relax, inline the imported function into it (Gradient treats
calls as opaque and would silently return zeros), then ``relax.transform.Gradient``; compile
once per model and input shape.

Preconditions the importer or Gradient would otherwise trip over, handled here:
- ONNX ``Clip`` with constant bounds is imported as an opaque ``call_tir`` without a gradient;
  the model copy differentiated here spells it ``lo + relu(x - lo) - relu(x - hi)``, the same
  function (the importer turns Min/Max into reductions without gradient rules);
- ``relax.clip`` (from HardSigmoid), ``relax.erf`` (GELU) and ``relax.nn.layer_norm`` get
  gradient rules registered below: d clip / dx = 1 inside [lo, hi], else 0;
  d erf / dx = 2 / sqrt(pi) exp(-x^2); layer norm's input gradient in closed form;
- integer initializers (shape operands) stay constants: as function parameters they make
  e.g. Expand's target shape a run-time value, which the importer binds with ``match_cast``,
  and Gradient rejects any binding that is not a plain variable binding (``Check failed:
  (var_binding) is false``, the error MiniLM's reverse mode failed with).
Ops without a gradient rule raise :class:`VjpUnsupportedError` naming them (never zeros).

The gradient module is legalized, fused and given the backend's default CPU schedules before
compiling (``scheduled=True``): one MiniLM reverse pass took 6.6 s unscheduled and 0.47 s
scheduled on 2 idle cores (MobileNetV2: 0.95 s and 0.37 s), gradients equal to within 3e-6
(MiniLM) and 2e-3 (MobileNetV2: summation order through 52 layers, probably; not
investigated) relative, the worst layer each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper

from dyadiq.backends.tvm.gradients import compile_for_this_cpu
from dyadiq.errors import DyadiqError, InternalError


class VjpUnsupportedError(DyadiqError):
    """The model contains an operation reverse mode cannot differentiate."""


_GRADIENTS_REGISTERED = False


def _prim_float(value: Any) -> float:
    """A relax PrimValue bound (FloatImm / IntImm inside) as a Python float."""
    inner = getattr(value, "value", value)
    return float(getattr(inner, "value", inner))


def _register_missing_gradients() -> None:
    global _GRADIENTS_REGISTERED
    if _GRADIENTS_REGISTERED:
        return
    import tvm
    from tvm import relax
    from tvm.relax.op.base import register_gradient
    from tvm.relax.op.grad import no_grad

    def clip_grad(orig_var: Any, orig_call: Any, output_grad: Any, ctx: Any) -> list[Any]:
        x, lo, hi = orig_call.args
        dtype = str(x.ty.dtype)
        inside = relax.op.logical_and(
            relax.op.greater_equal(x, relax.const(_prim_float(lo), dtype)),
            relax.op.less_equal(x, relax.const(_prim_float(hi), dtype)),
        )
        zero = relax.const(0.0, dtype)
        return [relax.op.where(inside, output_grad, zero), no_grad(lo), no_grad(hi)]

    def erf_grad(orig_var: Any, orig_call: Any, output_grad: Any, ctx: Any) -> list[Any]:
        x = orig_call.args[0]
        dtype = str(x.ty.dtype)
        slope = relax.op.multiply(
            relax.const(2.0 / math.sqrt(math.pi), dtype),
            relax.op.exp(relax.op.negative(relax.op.multiply(x, x))),
        )
        return [relax.op.multiply(output_grad, slope)]

    def layer_norm_grad(orig_var: Any, orig_call: Any, output_grad: Any, ctx: Any) -> list[Any]:
        """dx = (g' - mean(g') - xhat mean(g' xhat)) / sigma with g' = gamma * g; no
        gradients for gamma and beta (they are not weighted layers here)."""
        x, gamma, beta = orig_call.args
        attrs = orig_call.attrs
        axes = [int(a) for a in attrs.axes]
        dtype = str(x.ty.dtype)
        centred = relax.op.subtract(x, relax.op.mean(x, axis=axes, keepdims=True))
        variance = relax.op.variance(x, axis=axes, keepdims=True)
        inv_sigma = relax.op.divide(
            relax.const(1.0, dtype),
            relax.op.sqrt(relax.op.add(variance, relax.const(float(attrs.epsilon), dtype))),
        )
        xhat = relax.op.multiply(centred, inv_sigma)
        scaled = relax.op.multiply(output_grad, gamma) if attrs.scale else output_grad
        dx = relax.op.multiply(
            inv_sigma,
            relax.op.subtract(
                relax.op.subtract(scaled, relax.op.mean(scaled, axis=axes, keepdims=True)),
                relax.op.multiply(
                    xhat,
                    relax.op.mean(relax.op.multiply(scaled, xhat), axis=axes, keepdims=True),
                ),
            ),
        )
        return [dx, no_grad(gamma), no_grad(beta)]

    for name, rule in (
        ("relax.clip", clip_grad),
        ("relax.erf", erf_grad),
        ("relax.nn.layer_norm", layer_norm_grad),
    ):
        if tvm.ir.Op.get(name).get_attr("FPrimalGradient") is None:
            register_gradient(name, rule)
    _GRADIENTS_REGISTERED = True


def _renamed(model: onnx.ModelProto, names: Mapping[str, str]) -> None:
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
    for tensor in model.graph.initializer:
        tensor.name = names.get(tensor.name, tensor.name)
    for value in model.graph.input:
        value.name = names.get(value.name, value.name)


def _clip_as_relus(x: str, lo: str, hi: str, output: str) -> list[onnx.NodeProto]:
    """clip(x, lo, hi) = lo + relu(x - lo) - relu(x - hi) (for lo <= hi); either bound may be
    absent. The importer turns ONNX Min/Max into reductions without gradient rules."""
    make = onnx.helper.make_node
    nodes: list[onnx.NodeProto] = []
    current = x
    if lo:
        nodes += [
            make("Sub", [x, lo], [f"{output}__above_lo"]),
            make("Relu", [f"{output}__above_lo"], [f"{output}__relu_lo"]),
            make("Add", [f"{output}__relu_lo", lo], [f"{output}__lo"]),
        ]
        current = f"{output}__lo"
    if hi:
        nodes += [
            make("Sub", [x, hi], [f"{output}__above_hi"]),
            make("Relu", [f"{output}__above_hi"], [f"{output}__relu_hi"]),
            make("Sub", [current, f"{output}__relu_hi"], [output]),
        ]
    else:
        nodes.append(make("Identity", [current], [output]))
    return nodes


def differentiable_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The same function with constant-bound Clip spelled with Relu (module docstring),
    graph inputs and initializers renamed ``input_i`` / ``param_i`` (the importer rewrites
    names such as ``onnx::Conv_36``). Returns the copy and original name -> new name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        bounds = [*node.input[1:3], "", ""][:2]
        if node.op_type != "Clip" or not all(b == "" or b in constants for b in bounds):
            nodes.append(node)
            continue
        nodes.extend(_clip_as_relus(node.input[0], bounds[0], bounds[1], node.output[0]))
    # integer initializers (shapes, indices) become Constant nodes: as function parameters
    # they would turn shape arithmetic such as Expand's target shape dynamic
    integer = [t for t in out.graph.initializer if t.data_type != onnx.TensorProto.FLOAT]
    shapes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in integer]
    kept = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    integer_names = {t.name for t in integer}
    graph_inputs = [v for v in out.graph.input if v.name not in integer_names]
    del out.graph.input[:]
    out.graph.input.extend(graph_inputs)
    del out.graph.node[:]
    out.graph.node.extend([*shapes, *nodes])
    del out.graph.value_info[:]
    initializers = [t.name for t in out.graph.initializer]
    inputs = [v.name for v in out.graph.input if v.name not in set(initializers)]
    names = {n: f"input_{i}" for i, n in enumerate(inputs)}
    names.update({n: f"param_{i}" for i, n in enumerate(initializers)})
    _renamed(out, names)
    return out, names


class VectorJacobianProduct:
    """J^T u for the first output of ``model`` w.r.t. the initializers ``weight_names``.

    ``input_shapes`` fixes every graph input's shape; one compiled module serves all calls.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        input_shapes: Mapping[str, Sequence[int]],
        weight_names: Sequence[str],
        *,
        scheduled: bool = True,
    ) -> None:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        _register_missing_gradients()
        self.input_shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
        self.weight_names = list(weight_names)
        copy, renamed = differentiable_copy(model)
        self._original = {new: old for old, new in renamed.items()}
        imported = from_onnx(
            copy,
            {renamed[k]: list(v) for k, v in self.input_shapes.items()},
            keep_params_in_input=True,
        )
        forward = imported["main"]
        num_inputs = int(forward.attrs["num_input"])
        params = list(forward.params)
        self.input_order = [self._original[p.name] for p in params[:num_inputs]]
        by_name = {self._original[p.name]: p for p in params[num_inputs:]}
        missing = [n for n in self.weight_names if n not in by_name]
        if missing:
            raise VjpUnsupportedError(f"weights not found among the imported parameters: {missing}")
        # every other parameter (biases, clip bounds) is fed its float value, in the shape
        # the importer gave it (it turns some one-element tensors into scalars)
        values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        self.param_order = [self._original[p.name] for p in params[num_inputs:]]
        self.param_shapes = {
            self._original[p.name]: tuple(int(d) for d in p.ty.shape) for p in params[num_inputs:]
        }
        self.constants = {n: values[n].reshape(self.param_shapes[n]) for n in self.param_order}
        output_ty = forward.ret_ty
        if isinstance(output_ty, relax.TupleType):
            output_ty = output_ty.fields[0]
        # a dynamically shaped output (shape None) is checked at run time by the VM instead
        shape = getattr(output_ty, "shape", None)
        self.output_shape = None if shape is None else tuple(int(d) for d in shape)

        builder = relax.BlockBuilder()
        forward_gv = builder.add_func(forward.without_attr("params"), "forward")
        args = [relax.Var(p.name, p.ty) for p in params]
        cotangent = relax.Var("cotangent", output_ty)
        with builder.function("vjp_target", [*args, cotangent]):
            with builder.dataflow():
                output = builder.emit(relax.Call(forward_gv, args))
                if isinstance(forward.ret_ty, relax.TupleType):
                    output = builder.emit(relax.TupleGetItem(output, 0))
                scalar = builder.emit_output(relax.op.sum(relax.op.multiply(cotangent, output)))
            builder.emit_func_output(scalar)
        module = builder.get()
        module = tvm.IRModule(
            {"vjp_target": module["vjp_target"].inline_functions({"forward": module["forward"]})}
        )
        target_fn = module["vjp_target"]
        wanted = {renamed[n] for n in self.weight_names}
        grads_of = [v for v in target_fn.params if v.name in wanted]
        try:
            module = relax.transform.Gradient("vjp_target", require_grads=grads_of)(module)
        except Exception as exc:  # TVM's TVMError: which op has no gradient rule
            raise VjpUnsupportedError(f"reverse mode failed on this model: {exc}") from exc
        self._grad_order = [self._original[v.name] for v in grads_of]
        self._adjoint = compile_for_this_cpu(module, "vjp_target_adjoint", scheduled=scheduled)
        self.calls = 0

    def __call__(
        self,
        feeds: Mapping[str, np.ndarray],
        weights: Mapping[str, np.ndarray],
        cotangent: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """J^T u at the given inputs and weights (initializer name -> array; unnamed weights
        keep their float values). Returns initializer name -> gradient."""
        import tvm

        if self.output_shape is not None and tuple(cotangent.shape) != self.output_shape:
            raise InternalError(f"cotangent shape {cotangent.shape} != output {self.output_shape}")
        args = []
        for name in self.input_order:
            array = np.asarray(feeds[name])
            if array.shape != self.input_shapes[name]:
                expected = self.input_shapes[name]
                raise InternalError(f"input {name} shape {array.shape} != {expected}")
            args.append(tvm.runtime.tensor(np.ascontiguousarray(array)))
        for name in self.param_order:
            value = weights[name] if name in weights else self.constants[name]
            value = np.ascontiguousarray(value).reshape(self.param_shapes[name])
            args.append(tvm.runtime.tensor(value))
        args.append(tvm.runtime.tensor(np.ascontiguousarray(cotangent, np.float32)))
        _, grads = self._adjoint(*args)
        self.calls += 1
        return {name: grads[i].numpy() for i, name in enumerate(self._grad_order)}
