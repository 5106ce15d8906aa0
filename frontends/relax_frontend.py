"""Relax frontend: a TVM Relax ``IRModule`` in, the same float model as ONNX out.

dyadiq's passes work on one graph representation (:class:`dyadiq.graph.QGraph`, built by the
ONNX frontend), so a Relax function is translated op by op into an equivalent float ONNX
graph and then goes through exactly the same loading, checking and simplification as an ONNX
file. Translating to ONNX rather than to ``QGraph`` directly keeps one import path to maintain
and lets onnxruntime check the translation: the tests compare both models' outputs.

What is accepted: one Relax function (``main`` by default) whose body is a sequence of
bindings of float32 tensor ops from the table below, weights as constants (``from_onnx(...,
keep_params_in_input=False)``) or as trailing parameters bound through ``params``. Every op
outside the table is listed in one :class:`UnsupportedModelError`.

The Relax ONNX importer lowers ``Clip`` to ``call_tir`` of TOPI's ``maximum`` / ``minimum``
with NaN-guarded bounds; those calls are translated back (Max / Min, then Clip after constant
folding) so that importer-made modules round-trip.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dyadiq.errors import ModelLoadError, UnsupportedModelError

RELAX_OPSET = 18  # ReduceMean/ReduceSum/ReduceMax with axes as an input; LayerNormalization

_ELEMENTWISE = {
    "relax.add": "Add",
    "relax.subtract": "Sub",
    "relax.multiply": "Mul",
    "relax.divide": "Div",
    "relax.maximum": "Max",
    "relax.minimum": "Min",
    "relax.power": "Pow",
    "relax.nn.relu": "Relu",
    "relax.sigmoid": "Sigmoid",
    "relax.tanh": "Tanh",
    "relax.erf": "Erf",
    "relax.sqrt": "Sqrt",
    "relax.exp": "Exp",
    "relax.negative": "Neg",
    "relax.isnan": "IsNaN",
    "relax.where": "Where",
    "relax.matmul": "MatMul",
}
_REDUCTIONS = {"relax.mean": "ReduceMean", "relax.sum": "ReduceSum", "relax.max": "ReduceMax"}
# call_tir targets the ONNX importer emits for Clip (possibly with a numeric suffix).
_TIR_ELEMENTWISE = {"maximum": "Max", "minimum": "Min"}

_DTYPES = {
    "float32": TensorProto.FLOAT,
    "int64": TensorProto.INT64,
    "bool": TensorProto.BOOL,
    "int32": TensorProto.INT32,
}


def _prim_number(expr: Any) -> float | None:
    """The number held by a Relax PrimValue (or a bare IntImm / FloatImm), else None."""
    value = getattr(expr, "value", expr)
    value = getattr(value, "value", value)
    return float(value) if isinstance(value, int | float) else None


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


@dataclass
class _Emitter:
    """Accumulates ONNX nodes / initializers while walking one Relax function."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    names: dict[Any, str] = field(default_factory=dict)  # Relax Var -> ONNX tensor name
    tuples: dict[Any, list[str]] = field(default_factory=dict)  # tuple-valued Var -> names
    counter: int = 0

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def constant(self, array: np.ndarray, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


class _Translator:
    def __init__(self, params: Mapping[str, np.ndarray]) -> None:
        self.params = params
        self.emit = _Emitter()
        self.unsupported: dict[str, int] = {}

    # -- operands ---------------------------------------------------------------------------
    def operand(self, expr: Any) -> str:
        import tvm
        from tvm import relax

        if isinstance(expr, relax.Var):
            if expr in self.emit.names:
                return self.emit.names[expr]
            raise UnsupportedModelError(f"Relax variable {expr.name} is used before it is bound")
        if isinstance(expr, tvm.ir.expr.Constant):  # relax.const / GenericConst in 0.27
            return self.emit.constant(expr.value.numpy())
        number = _prim_number(expr)
        if number is not None:
            return self.emit.constant(np.array(number, np.float32))
        raise UnsupportedModelError(f"unsupported Relax operand {type(expr).__name__}: {expr}")

    # -- ops ---------------------------------------------------------------------------------
    def call(self, call: Any, hint: str) -> str | list[str] | None:
        from tvm import relax

        op = call.op
        name = getattr(op, "name", None)
        if name == "relax.call_tir":
            return self._call_tir(call, hint)
        handler = self._handlers().get(name or "")
        if name in _ELEMENTWISE:
            return self.emit.node(_ELEMENTWISE[name], [self.operand(a) for a in call.args], hint)
        if name in _REDUCTIONS:
            return self._reduce(_REDUCTIONS[name], call, hint)
        if handler is None:
            label = name if name else f"call to {getattr(op, 'name_hint', op)}"
            if isinstance(op, relax.GlobalVar):
                label = f"call to Relax function {op.name_hint} (inline it first)"
            self.unsupported[label] = self.unsupported.get(label, 0) + 1
            return None
        return handler(call, hint)

    def _handlers(self) -> dict[str, Callable[[Any, str], str | list[str]]]:
        return {
            "relax.nn.conv2d": self._conv2d,
            "relax.clip": self._clip,
            "relax.nn.max_pool2d": self._pool("MaxPool"),
            "relax.nn.avg_pool2d": self._pool("AveragePool"),
            "relax.nn.adaptive_avg_pool2d": self._adaptive_avg_pool,
            "relax.reshape": self._reshape,
            "relax.permute_dims": self._permute_dims,
            "relax.concat": self._concat,
            "relax.nn.softmax": self._softmax,
            "relax.flatten": self._flatten,
            "relax.nn.batch_norm": self._batch_norm,
            "relax.nn.layer_norm": self._layer_norm,
            "relax.nn.leakyrelu": self._leaky_relu,
            "relax.nn.gelu": self._gelu,
            "relax.nn.silu": self._silu,
            "relax.astype": self._astype,
            "relax.expand_dims": self._expand_dims,
            "relax.squeeze": self._squeeze,
        }

    def _call_tir(self, call: Any, hint: str) -> str | None:
        callee = call.args[0].name_hint
        base = re.sub(r"\d+$", "", callee)
        if base in _TIR_ELEMENTWISE and len(call.args[1].fields) == 2:
            inputs = [self.operand(a) for a in call.args[1].fields]
            return self.emit.node(_TIR_ELEMENTWISE[base], inputs, hint)
        label = f"call_tir({callee})"
        self.unsupported[label] = self.unsupported.get(label, 0) + 1
        return None

    def _conv2d(self, call: Any, hint: str) -> str:
        a = call.attrs
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
            raise UnsupportedModelError(
                f"conv2d with layout {a.data_layout}/{a.kernel_layout}: only NCHW/OIHW is "
                "supported (run relax.transform.ConvertLayout to NCHW first)"
            )
        return self.emit.node(
            "Conv",
            [self.operand(call.args[0]), self.operand(call.args[1])],
            hint,
            strides=_ints(a.strides),
            pads=_ints(a.padding),  # Relax (top, left, bottom, right) == ONNX begin..., end...
            dilations=_ints(a.dilation),
            group=int(a.groups),
        )

    def _clip(self, call: Any, hint: str) -> str:
        lo, hi = (_prim_number(arg) for arg in call.args[1:3])
        if lo is None or hi is None:
            raise UnsupportedModelError("clip with non-constant bounds")
        x = self.operand(call.args[0])
        bounds = [self.emit.constant(np.array(v, np.float32)) for v in (lo, hi)]
        return self.emit.node("Clip", [x, *bounds], hint)

    def _pool(self, op_type: str) -> Callable[[Any, str], str]:
        def emit(call: Any, hint: str) -> str:
            a = call.attrs
            if str(a.layout) != "NCHW":
                raise UnsupportedModelError(f"{call.op.name} with layout {a.layout}: need NCHW")
            attrs: dict[str, Any] = {
                "kernel_shape": _ints(a.pool_size),
                "strides": _ints(a.strides),
                "pads": _ints(a.padding),
                "ceil_mode": int(bool(a.ceil_mode)),
            }
            if op_type == "MaxPool":
                attrs["dilations"] = _ints(a.dilation)
            else:
                attrs["count_include_pad"] = int(bool(a.count_include_pad))
            return self.emit.node(op_type, [self.operand(call.args[0])], hint, **attrs)

        return emit

    def _adaptive_avg_pool(self, call: Any, hint: str) -> str:
        size = call.attrs.output_size
        if size is not None and any(int(s) != 1 for s in size):
            raise UnsupportedModelError(
                f"adaptive_avg_pool2d to {list(size)}: only a global (1x1) pool is supported"
            )
        return self.emit.node("GlobalAveragePool", [self.operand(call.args[0])], hint)

    def _reduce(self, op_type: str, call: Any, hint: str) -> str:
        x = call.args[0]
        rank = len(x.ty.shape.values)
        axes = _ints(call.attrs.axis) if call.attrs.axis is not None else list(range(rank))
        keep = int(bool(call.attrs.keepdims))
        if op_type == "ReduceMean" and keep and sorted(a % rank for a in axes) == [2, 3]:
            return self.emit.node("GlobalAveragePool", [self.operand(x)], hint)
        axes_name = self.emit.constant(np.array(axes, np.int64), "axes")
        return self.emit.node(op_type, [self.operand(x), axes_name], hint, keepdims=keep)

    def _reshape(self, call: Any, hint: str) -> str:
        from tvm import relax

        x, shape = call.args
        if not isinstance(shape, relax.ShapeExpr):
            raise UnsupportedModelError("reshape to a computed shape: fix the input shapes first")
        in_dims = list(x.ty.shape.values)
        target: list[int] = []
        for i, dim in enumerate(shape.values):
            if hasattr(dim, "value"):
                target.append(int(dim.value))
            elif i < len(in_dims) and in_dims[i].same_as(dim):
                target.append(0)  # ONNX: copy this dim from the input (a symbolic batch)
            else:
                target.append(-1)
        if target.count(-1) > 1:
            raise UnsupportedModelError(f"reshape with several symbolic dims: {shape}")
        shape_name = self.emit.constant(np.array(target, np.int64), "shape")
        return self.emit.node("Reshape", [self.operand(x), shape_name], hint)

    def _permute_dims(self, call: Any, hint: str) -> str:
        x = call.args[0]
        axes = call.attrs.axes
        perm = _ints(axes) if axes is not None else list(reversed(range(len(x.ty.shape.values))))
        return self.emit.node("Transpose", [self.operand(x)], hint, perm=perm)

    def _concat(self, call: Any, hint: str) -> str:
        parts = [self.operand(f) for f in call.args[0].fields]
        return self.emit.node("Concat", parts, hint, axis=int(call.attrs.axis))

    def _softmax(self, call: Any, hint: str) -> str:
        return self.emit.node(
            "Softmax", [self.operand(call.args[0])], hint, axis=int(call.attrs.axis)
        )

    def _flatten(self, call: Any, hint: str) -> str:
        shape = self.emit.constant(np.array([-1], np.int64), "shape")
        return self.emit.node("Reshape", [self.operand(call.args[0]), shape], hint)

    def _batch_norm(self, call: Any, hint: str) -> list[str]:
        a = call.attrs
        if int(a.axis) != 1:
            raise UnsupportedModelError("batch_norm over an axis other than 1 (channels)")
        if bool(a.training):
            # Relax's default: normalise with the batch's own statistics, which no
            # inference graph (and no calibration) can reproduce.
            raise UnsupportedModelError("batch_norm with training=True: export for inference")
        if not (bool(a.center) and bool(a.scale)):
            raise UnsupportedModelError("batch_norm without center/scale")
        inputs = [self.operand(a) for a in call.args[:5]]
        out = self.emit.node("BatchNormalization", inputs, hint, epsilon=float(a.epsilon))
        return [out]  # Relax returns (y, new mean, new var); inference uses only y

    def _layer_norm(self, call: Any, hint: str) -> str:
        x = call.args[0]
        rank = len(x.ty.shape.values)
        axes = sorted(a % rank for a in _ints(call.attrs.axes))
        if axes != list(range(axes[0], rank)):
            raise UnsupportedModelError(f"layer_norm over non-trailing axes {axes}")
        inputs = [self.operand(a) for a in call.args[:3]]
        return self.emit.node(
            "LayerNormalization", inputs, hint, axis=axes[0], epsilon=float(call.attrs.epsilon)
        )

    def _leaky_relu(self, call: Any, hint: str) -> str:
        return self.emit.node(
            "LeakyRelu", [self.operand(call.args[0])], hint, alpha=float(call.attrs.alpha)
        )

    def _gelu(self, call: Any, hint: str) -> str:
        # 0.5 x (1 + erf(x / sqrt 2)), the form exporters emit and the frontend recognises.
        x = self.operand(call.args[0])
        e = self.emit
        scaled = e.node("Div", [x, e.constant(np.array(np.sqrt(2.0), np.float32))], hint)
        erf = e.node("Erf", [scaled], hint)
        one_plus = e.node("Add", [erf, e.constant(np.array(1.0, np.float32))], hint)
        half_x = e.node("Mul", [x, e.constant(np.array(0.5, np.float32))], hint)
        return e.node("Mul", [half_x, one_plus], hint)

    def _silu(self, call: Any, hint: str) -> str:
        x = self.operand(call.args[0])
        return self.emit.node("Mul", [x, self.emit.node("Sigmoid", [x], hint)], hint)

    def _astype(self, call: Any, hint: str) -> str:
        dtype = str(call.attrs.dtype)
        if dtype not in _DTYPES:
            raise UnsupportedModelError(f"astype to {dtype}")
        return self.emit.node("Cast", [self.operand(call.args[0])], hint, to=_DTYPES[dtype])

    def _expand_dims(self, call: Any, hint: str) -> str:
        axes = self.emit.constant(np.array(_ints(call.attrs.axis), np.int64), "axes")
        return self.emit.node("Unsqueeze", [self.operand(call.args[0]), axes], hint)

    def _squeeze(self, call: Any, hint: str) -> str:
        inputs = [self.operand(call.args[0])]
        if call.attrs.axis is not None:
            inputs.append(self.emit.constant(np.array(_ints(call.attrs.axis), np.int64), "axes"))
        return self.emit.node("Squeeze", inputs, hint)


def _value_info(var: Any, name: str) -> onnx.ValueInfoProto:
    ty = var.ty
    dtype = str(ty.dtype)
    if dtype not in _DTYPES:
        raise UnsupportedModelError(f"{name}: tensors of dtype {dtype} are not supported")
    dims: list[int | str] = [
        int(d.value) if hasattr(d, "value") else str(d) for d in ty.shape.values
    ]
    return helper.make_tensor_value_info(name, _DTYPES[dtype], dims)


def relax_to_onnx(
    mod: Any, params: Mapping[str, np.ndarray] | None = None, *, function: str = "main"
) -> onnx.ModelProto:
    """Translate one float Relax function into an equivalent ONNX model (see module doc)."""
    from tvm import relax

    if function not in [gv.name_hint for gv in mod.functions]:
        raise ModelLoadError(f"the IRModule has no function {function!r}")
    func = mod[function]
    if not isinstance(func, relax.Function):
        raise ModelLoadError(f"{function!r} is not a Relax function")
    params = dict(params or {})
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else None
    tr = _Translator(params)
    graph_inputs: list[onnx.ValueInfoProto] = []
    missing: list[str] = []
    for i, var in enumerate(func.params):
        if (num_input is not None and i >= num_input) or var.name in params:
            if var.name not in params:
                missing.append(var.name)
                continue
            tr.emit.names[var] = tr.emit.constant(np.asarray(params[var.name]), var.name)
        else:
            graph_inputs.append(_value_info(var, var.name))
            tr.emit.names[var] = var.name
    if missing:
        raise ModelLoadError(f"Relax weight parameters without values (pass params=): {missing}")

    body = func.body
    for block in body.blocks:
        for binding in block.bindings:
            var, value = binding.var, binding.value
            hint = var.name
            if isinstance(value, relax.Call):
                out = tr.call(value, hint)
            elif isinstance(value, relax.TupleGetItem) and value.tuple_value in tr.emit.tuples:
                out = tr.emit.tuples[value.tuple_value][value.index]
            elif isinstance(value, relax.Var):
                out = tr.operand(value)
            else:
                out = None
                label = f"binding of {type(value).__name__}"
                tr.unsupported[label] = tr.unsupported.get(label, 0) + 1
            if isinstance(out, list):
                tr.emit.tuples[var] = out
            elif out is not None:
                tr.emit.names[var] = out
            else:
                tr.emit.names[var] = tr.emit.fresh("unsupported")
    if tr.unsupported:
        listed = ", ".join(f"{op} x{n}" for op, n in sorted(tr.unsupported.items()))
        raise UnsupportedModelError(f"Relax ops dyadiq cannot import: {listed}")

    results = list(body.body.fields) if isinstance(body.body, relax.Tuple) else [body.body]
    outputs: list[onnx.ValueInfoProto] = []
    for k, result in enumerate(results):
        name = tr.operand(result)
        out_name = "output" if len(results) == 1 else f"output_{k}"
        tr.emit.nodes.append(helper.make_node("Identity", [name], [out_name], name=out_name))
        outputs.append(_value_info(result, out_name))
    graph = helper.make_graph(
        tr.emit.nodes, function, graph_inputs, outputs, initializer=tr.emit.initializers
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", RELAX_OPSET)], producer_name="dyadiq-relax"
    )
    return _clips_from_min_max(_fold_constants(model))


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold (the importer's NaN-guarded clip bounds, reshaped biases) via onnxsim."""
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:  # onnxsim raises bare RuntimeErrors from C++
        raise ModelLoadError(f"the translated Relax model does not simplify: {exc}") from exc
    return simplified if ok else model


def _scalar(initializers: Mapping[str, np.ndarray], name: str) -> float | None:
    value = initializers.get(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _clips_from_min_max(model: onnx.ModelProto) -> onnx.ModelProto:
    """Max(x, c) -> Clip(x, c, None) and Min(x, c) -> Clip(x, None, c); then merge
    Clip(Clip(x)) into one Clip so a ReLU6 reads as the Clip the rest of dyadiq knows."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    graph = model.graph
    new_inits: list[onnx.TensorProto] = []
    for node in graph.node:
        if node.op_type not in ("Max", "Min") or len(node.input) != 2:
            continue
        value = _scalar(inits, node.input[1])
        if value is None:
            continue
        bound = node.name + "_bound"
        new_inits.append(numpy_helper.from_array(np.array(value, np.float32), bound))
        x = node.input[0]
        args = [x, bound, ""] if node.op_type == "Max" else [x, "", bound]
        del node.input[:]
        node.input.extend(args)
        node.op_type = "Clip"
    graph.initializer.extend(new_inits)
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producer = {out: node for node in graph.node for out in node.output}
    removed: set[int] = set()
    for node in graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Clip" and node.input else None
        if first is None or first.op_type != "Clip" or consumers.get(first.output[0], 0) != 1:
            continue
        lo = first.input[1] if len(first.input) > 1 else ""
        hi = node.input[2] if len(node.input) > 2 else ""
        if (len(node.input) > 1 and node.input[1]) or (len(first.input) > 2 and first.input[2]):
            continue  # both clips bound the same side: leave them
        del node.input[:]
        node.input.extend([first.input[0], lo, hi])
        removed.add(id(first))
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    onnx.checker.check_model(model)
    return model


def load_relax_file(path: str | Path) -> Any:
    """Read an IRModule saved with ``tvm.ir.save_json`` (weights included as constants)."""
    import tvm

    path = Path(path)
    try:
        return tvm.ir.load_json(path.read_text())
    except Exception as exc:  # tvm raises its own error types from C++
        raise ModelLoadError(
            f"{path} is not a saved TVM IRModule (tvm.ir.save_json): {exc}"
        ) from exc
