"""C loops for single float ONNX nodes with static shapes (the kernels of :mod:`.float_c`).

Each writer gets the node, the island's layout (shape and element type of every tensor, the
values of constant ones) and ``names`` (tensor -> C array expression), and returns one C
block. Most nodes are an *index map*: a loop nest over a shape in which each operand's flat
offset is ``base + sum_a i_a * coef_a``; broadcasting (coef 0), Transpose (permuted strides),
Slice (start and step) and Concat (an offset into the output) are all such maps, written by
:func:`nd_loop`. Reductions loop over the input and accumulate into the output offset whose
coefficients are 0 on the reduced axes. Conv, pooling, MatMul and Gemm are direct loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from dyadiq.errors import UnsupportedModelError


class Layout(Protocol):
    @property
    def shapes(self) -> dict[str, tuple[int, ...]]: ...
    @property
    def dtypes(self) -> dict[str, np.dtype]: ...
    @property
    def constants(self) -> dict[str, np.ndarray]: ...


C_TYPES = {
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
    np.dtype(np.int64): "int64_t",
    np.dtype(np.int32): "int32_t",
    np.dtype(np.int8): "int8_t",
    np.dtype(np.uint8): "uint8_t",
    np.dtype(np.bool_): "uint8_t",
}

UNARY = {
    "Relu": "({a} > 0 ? {a} : 0)",
    "Neg": "(-{a})",
    "Abs": "({a} < 0 ? -{a} : {a})",
    "Sqrt": "sqrtf({a})",
    "Exp": "expf({a})",
    "Log": "logf({a})",
    "Tanh": "tanhf({a})",
    "Sigmoid": "(1.0f / (1.0f + expf(-{a})))",
    "Erf": "erff({a})",
    "Floor": "floorf({a})",
    "Ceil": "ceilf({a})",
    "Round": "rintf({a})",
    "Reciprocal": "(1.0f / {a})",
    "Sin": "sinf({a})",
    "Cos": "cosf({a})",
    "Softplus": "logf(1.0f + expf({a}))",
    "Identity": "{a}",
    "Not": "(!{a})",
    "Sign": "(({a} > 0) - ({a} < 0))",
}
BINARY = {
    "Add": "({a} + {b})",
    "Sub": "({a} - {b})",
    "Mul": "({a} * {b})",
    "Div": "({a} / {b})",
    "Pow": "powf({a}, {b})",
    "Max": "({a} > {b} ? {a} : {b})",
    "Min": "({a} < {b} ? {a} : {b})",
    "Sum": "({a} + {b})",
    "Mean": "({a} + {b})",
    "Equal": "({a} == {b})",
    "Greater": "({a} > {b})",
    "GreaterOrEqual": "({a} >= {b})",
    "Less": "({a} < {b})",
    "LessOrEqual": "({a} <= {b})",
    "And": "({a} && {b})",
    "Or": "({a} || {b})",
    "Xor": "(!{a} != !{b})",
}
WITH_ATTRIBUTES = {
    "LeakyRelu": lambda at: "({a} >= 0 ? {a} : " + float_literal(at.get("alpha", 0.01)) + " * {a})",
    "Elu": lambda at: (
        "({a} >= 0 ? {a} : " + float_literal(at.get("alpha", 1.0)) + " * (expf({a}) - 1.0f))"
    ),
    "HardSigmoid": lambda at: (
        "fminf(1.0f, fmaxf(0.0f, "
        + float_literal(at.get("alpha", 0.2))
        + " * {a} + "
        + float_literal(at.get("beta", 0.5))
        + "))"
    ),
    "HardSwish": lambda at: "({a} * fminf(1.0f, fmaxf(0.0f, {a} / 6.0f + 0.5f)))",
    "Gelu": lambda at: "(0.5f * {a} * (1.0f + erff({a} * 0.70710678f)))",
}
MOVES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Dropout"}
REDUCE_INIT = {"ReduceSum": "0", "ReduceMean": "0", "ReduceMax": "-INFINITY",
               "ReduceMin": "INFINITY", "ReduceProd": "1", "ReduceSumSquare": "0",
               "ReduceL2": "0", "GlobalAveragePool": "0", "GlobalMaxPool": "-INFINITY"}  # fmt: skip


def float_literal(value: float) -> str:
    v = float(np.float32(value))
    if not np.isfinite(v):  # math.h's constants (a -inf mask value, a NaN fill)
        return "NAN" if np.isnan(v) else ("INFINITY" if v > 0 else "(-INFINITY)")
    return v.hex() + "f"  # the exact float32 value


def c_type(dtype: np.dtype) -> str:
    if np.dtype(dtype) not in C_TYPES:
        raise UnsupportedModelError(f"float island tensor of type {dtype} in C")
    return C_TYPES[np.dtype(dtype)]


def c_constant(name: str, value: np.ndarray) -> str:
    value = np.asarray(value)
    ctype = c_type(value.dtype)
    flat = value.reshape(-1)
    if value.dtype == np.float32:
        items = [float_literal(v) for v in flat]
    elif value.dtype == np.float64:
        items = [repr(float(v)) if np.isfinite(v) else float_literal(v) for v in flat]
    else:
        items = [f"{int(v)}LL" if value.dtype == np.int64 else str(int(v)) for v in flat]
    items = items or ["0"]
    lines = ",\n    ".join(", ".join(items[i : i + 12]) for i in range(0, len(items), 12))
    return f"static const {ctype} {name}[{len(items)}] = {{\n    {lines}\n}};\n"


def strides(shape: Sequence[int]) -> list[int]:
    return [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]


def broadcast_coefs(shape: Sequence[int], out: Sequence[int]) -> list[int]:
    shape = (1,) * (len(out) - len(shape)) + tuple(shape)
    return [
        0 if d == 1 and o != 1 else s for d, o, s in zip(shape, out, strides(shape), strict=True)
    ]


def nd_loop(shape: Sequence[int], operands: Sequence[tuple[int, Sequence[int]]], body: str) -> str:
    """Loops over ``shape``; ``p<k>`` is operand k's offset, ``o`` the flat loop index and
    ``i<a>`` the index along axis a."""
    dims = list(shape) or [1]
    lines = ["{", "    int32_t o = 0;"]
    for a, d in enumerate(dims):
        lines.append(f"    for (int32_t i{a} = 0; i{a} < {d}; ++i{a}) {{")
    for k, (base, coefs) in enumerate(operands):
        coefs = list(coefs) or [0]
        terms = [str(base)] + [f"i{a} * {c}" for a, c in enumerate(coefs) if c]
        lines.append(f"        const int32_t p{k} = {' + '.join(terms)};")
    lines.append(f"        {body}")
    lines.append("        ++o;")
    lines.append("    " + "}" * len(dims))
    lines.append("}")
    return "\n    ".join(lines)


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Node:
    """The node with its operands' shapes, C names and constant values at hand."""

    def __init__(self, node: onnx.NodeProto, layout: Layout, names: dict[str, str]) -> None:
        self.node = node
        self.layout = layout
        self.names = names
        self.at = attributes(node)

    def shape(self, i: int) -> tuple[int, ...]:
        return self.layout.shapes[self.node.input[i]]

    def out_shape(self, i: int = 0) -> tuple[int, ...]:
        return self.layout.shapes[self.node.output[i]]

    def x(self, i: int) -> str:
        return self.names[self.node.input[i]]

    def y(self, i: int = 0) -> str:
        return self.names[self.node.output[i]]

    def const(self, i: int) -> np.ndarray | None:
        if i >= len(self.node.input) or not self.node.input[i]:
            return None
        value = self.layout.constants.get(self.node.input[i])
        if value is None:
            raise UnsupportedModelError(
                f"{self.node.op_type} {self.node.name}: input {i} must be a constant in C"
            )
        return value

    def out_ctype(self, i: int = 0) -> str:
        return c_type(self.layout.dtypes[self.node.output[i]])


def _elementwise(n: _Node, expression: str) -> str:
    out = n.out_shape()
    inputs = [i for i, name in enumerate(n.node.input) if name]
    operands = [(0, broadcast_coefs(n.shape(i), out)) for i in inputs]
    values = {k: f"{n.x(i)}[p{k}]" for k, i in enumerate(inputs)}
    expr = expression.format(**{"abc"[k]: v for k, v in values.items() if k < 3})
    return nd_loop(out, operands, f"{n.y()}[o] = ({n.out_ctype()})({expr});")


def _variadic(n: _Node) -> str:
    op = n.node.op_type
    inputs = [i for i, name in enumerate(n.node.input) if name]
    out = n.out_shape()
    operands = [(0, broadcast_coefs(n.shape(i), out)) for i in inputs]
    expr = f"{n.x(inputs[0])}[p0]"
    for k, i in enumerate(inputs[1:], start=1):
        expr = BINARY[op].format(a=expr, b=f"{n.x(i)}[p{k}]")
    if op == "Mean":
        expr = f"({expr}) / {len(inputs)}.0f"
    return nd_loop(out, operands, f"{n.y()}[o] = ({n.out_ctype()})({expr});")


def _binary(n: _Node) -> str:
    op = n.node.op_type
    if len([x for x in n.node.input if x]) != 2 or op in ("Sum", "Mean"):
        return _variadic(n)
    if op == "Pow":
        exponent = n.layout.constants.get(n.node.input[1])
        if exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0:
            return _elementwise(n, "({a} * {a})")  # exact, as onnxruntime's x * x
    return _elementwise(n, BINARY[op])


def _cast(n: _Node) -> str:
    if n.layout.dtypes[n.node.output[0]] == np.bool_:
        return _elementwise(n, "({a} != 0)")
    return _elementwise(n, "{a}")


def _clip_bound(n: _Node, i: int, attribute: str, default: float) -> float | str:
    """Clip's min (``i`` 1) or max (2): a constant, or the C read of a scalar the island
    computes (openWakeWord's log-mel clips at its own maximum - 80 dB)."""
    if len(n.node.input) <= i or not n.node.input[i]:
        return float(n.at.get(attribute, default))  # type: ignore[arg-type]
    value = n.layout.constants.get(n.node.input[i])
    if value is None:
        return f"(float){n.x(i)}[0]"
    return float(np.asarray(value).reshape(()))


def _clip(n: _Node) -> str:
    lo = _clip_bound(n, 1, "min", -np.inf)
    hi = _clip_bound(n, 2, "max", np.inf)
    expr = "{a}"
    if isinstance(lo, str) or np.isfinite(lo):
        expr = f"fmaxf({expr}, {lo if isinstance(lo, str) else float_literal(lo)})"
    if isinstance(hi, str) or np.isfinite(hi):
        expr = f"fminf({expr}, {hi if isinstance(hi, str) else float_literal(hi)})"
    x = n.node.input[0]
    n.node = helper.make_node("Clip", [x], list(n.node.output))
    return _elementwise(n, expr)


def _move(n: _Node) -> str:
    size = int(np.prod(n.out_shape(), dtype=np.int64))
    return f"memmove({n.y()}, {n.x(0)}, {size} * sizeof({n.out_ctype()}));"


def _transpose(n: _Node) -> str:
    shape = n.shape(0)
    perm = n.at.get("perm", list(range(len(shape)))[::-1])
    s = strides(shape)
    coefs = [s[p] for p in perm]  # type: ignore[attr-defined]
    return nd_loop(n.out_shape(), [(0, coefs)], f"{n.y()}[o] = {n.x(0)}[p0];")


def _slice(n: _Node) -> str:
    shape = n.shape(0)
    if "starts" in n.at:  # opset < 10
        starts, ends = list(n.at["starts"]), list(n.at["ends"])  # type: ignore[call-overload]
        axes = list(n.at.get("axes", range(len(starts))))  # type: ignore[call-overload]
        steps = [1] * len(starts)
    else:
        starts, ends = list(n.const(1)), list(n.const(2))  # type: ignore[arg-type]
        axes_c, steps_c = n.const(3), n.const(4)
        axes = list(range(len(starts))) if axes_c is None else list(axes_c)
        steps = [1] * len(starts) if steps_c is None else list(steps_c)
    start = [0] * len(shape)
    step = [1] * len(shape)
    for axis, s0, e0, st in zip(axes, starts, ends, steps, strict=True):
        a = int(axis) % len(shape)
        first, _, stride = slice(int(s0), int(e0), int(st)).indices(shape[a])
        start[a], step[a] = first, stride
    s = strides(shape)
    base = sum(b * c for b, c in zip(start, s, strict=True))
    coefs = [st * c for st, c in zip(step, s, strict=True)]
    return nd_loop(n.out_shape(), [(base, coefs)], f"{n.y()}[o] = {n.x(0)}[p0];")


def _expand(n: _Node) -> str:
    out = n.out_shape()
    return nd_loop(out, [(0, broadcast_coefs(n.shape(0), out))], f"{n.y()}[o] = {n.x(0)}[p0];")


def _concat(n: _Node) -> str:
    out = n.out_shape()
    axis = int(n.at.get("axis", 0)) % len(out)  # type: ignore[call-overload]
    out_strides = strides(out)
    blocks, offset = [], 0
    for i, name in enumerate(n.node.input):
        shape = n.shape(i)
        if not name or 0 in shape:
            continue
        body = f"{n.y()}[p1] = {n.x(i)}[o];"
        blocks.append(nd_loop(shape, [(0, []), (offset * out_strides[axis], out_strides)], body))
        offset += shape[axis]
    return "\n    ".join(blocks)


def _split(n: _Node) -> str:
    """Each output is a slice of the input along ``axis`` (sizes from the outputs' shapes)."""
    shape = n.shape(0)
    axis = int(n.at.get("axis", 0)) % len(shape)  # type: ignore[call-overload]
    s = strides(shape)
    blocks, start = [], 0
    for k, name in enumerate(n.node.output):
        if not name:
            continue
        out = n.out_shape(k)
        coefs = s  # the output's axes map one to one onto the input's
        blocks.append(nd_loop(out, [(start * s[axis], coefs)], f"{n.y(k)}[o] = {n.x(0)}[p0];"))
        start += out[axis]
    return "\n    ".join(blocks)


def _gather(n: _Node) -> str:
    data = n.shape(0)
    axis = int(n.at.get("axis", 0)) % len(data)  # type: ignore[call-overload]
    count = int(np.prod(n.shape(1), dtype=np.int64))
    outer, dim = int(np.prod(data[:axis], dtype=np.int64)), data[axis]
    inner = int(np.prod(data[axis + 1 :], dtype=np.int64))
    return (
        f"for (int32_t u = 0; u < {outer}; ++u) for (int32_t j = 0; j < {count}; ++j) {{\n"
        f"        int32_t k = (int32_t){n.x(1)}[j]; if (k < 0) k += {dim};\n"
        f"        memcpy({n.y()} + (u * {count} + j) * {inner}, {n.x(0)} + (u * {dim} + k) * "
        f"{inner}, {inner} * sizeof({n.out_ctype()}));\n    }}"
    )


def _pad(n: _Node) -> str:
    shape, out = n.shape(0), n.out_shape()
    pads = list(n.at["pads"]) if "pads" in n.at else list(n.const(1))  # type: ignore[call-overload,arg-type]
    axes_c = n.const(3) if len(n.node.input) > 3 else None
    begin = [0] * len(shape)
    if axes_c is None:
        begin = [int(p) for p in pads[: len(shape)]]
    else:
        for k, axis in enumerate(axes_c):
            begin[int(axis) % len(shape)] = int(pads[k])
    value = float(n.at.get("value", 0.0))  # type: ignore[arg-type]
    if len(n.node.input) > 2 and n.node.input[2]:
        value = float(np.asarray(n.const(2)).reshape(()))
    mode = n.at.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    s = strides(shape)
    lines, checks = [], []
    for a, d in enumerate(shape):
        lines.append(f"int32_t c{a} = i{a} - {begin[a]};")
        if mode == "edge":
            lines.append(f"c{a} = c{a} < 0 ? 0 : (c{a} >= {d} ? {d - 1} : c{a});")
        elif mode == "reflect":
            lines.append(f"if (c{a} < 0) c{a} = -c{a}; if (c{a} >= {d}) c{a} = {2 * d - 2} - c{a};")
        elif mode == "constant":
            checks.append(f"c{a} < 0 || c{a} >= {d}")
        else:
            raise UnsupportedModelError(f"Pad {n.node.name}: mode {mode} in C")
    offset = " + ".join(f"c{a} * {s[a]}" for a in range(len(shape))) or "0"
    read = f"{n.x(0)}[{offset}]"
    if checks:
        read = f"({' || '.join(checks)}) ? ({n.out_ctype()}){float_literal(value)} : {read}"
    body = " ".join(lines) + f" {n.y()}[o] = {read};"
    return nd_loop(out, [], body)


def _reduce(n: _Node) -> str:
    op = n.node.op_type
    shape = n.shape(0)
    if op.startswith("Global"):
        axes = list(range(2, len(shape)))
    elif "axes" in n.at:
        axes = [int(a) for a in n.at["axes"]]  # type: ignore[attr-defined]
    elif len(n.node.input) > 1 and n.node.input[1]:
        axes = [int(a) for a in n.const(1)]  # type: ignore[union-attr]
    else:
        axes = [] if n.at.get("noop_with_empty_axes", 0) else list(range(len(shape)))
    axes = sorted(a % len(shape) for a in axes)
    kept = [1 if a in axes else d for a, d in enumerate(shape)]
    kept_strides = strides(kept)
    coefs = [0 if a in axes else kept_strides[a] for a in range(len(shape))]
    count = int(np.prod([shape[a] for a in axes], dtype=np.int64)) or 1
    size = int(np.prod(n.out_shape(), dtype=np.int64))
    y, x = n.y(), n.x(0)
    accumulate = {
        "ReduceMax": f"if ({x}[o] > {y}[p0]) {y}[p0] = {x}[o];",
        "GlobalMaxPool": f"if ({x}[o] > {y}[p0]) {y}[p0] = {x}[o];",
        "ReduceMin": f"if ({x}[o] < {y}[p0]) {y}[p0] = {x}[o];",
        "ReduceProd": f"{y}[p0] *= {x}[o];",
        "ReduceSumSquare": f"{y}[p0] += {x}[o] * {x}[o];",
        "ReduceL2": f"{y}[p0] += {x}[o] * {x}[o];",
    }.get(op, f"{y}[p0] += {x}[o];")
    parts = [
        f"for (int32_t q = 0; q < {size}; ++q) {y}[q] = {REDUCE_INIT[op]};",
        nd_loop(shape, [(0, coefs)], accumulate),
    ]
    if op in ("ReduceMean", "GlobalAveragePool"):
        parts.append(f"for (int32_t q = 0; q < {size}; ++q) {y}[q] /= {count}.0f;")
    if op == "ReduceL2":
        parts.append(f"for (int32_t q = 0; q < {size}; ++q) {y}[q] = sqrtf({y}[q]);")
    return "\n    ".join(parts)


def _softmax(n: _Node, opset: int) -> str:
    shape = n.shape(0)
    default = -1 if opset >= 13 else 1
    axis = int(n.at.get("axis", default)) % len(shape)  # type: ignore[call-overload]
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    if opset >= 13:
        length, inner = shape[axis], int(np.prod(shape[axis + 1 :], dtype=np.int64))
    else:
        length, inner = int(np.prod(shape[axis:], dtype=np.int64)), 1
    x, y = n.x(0), n.y()
    at = f"(u * {length} + j) * {inner} + v"
    log = n.node.op_type == "LogSoftmax"
    final = f"{y}[{at}] = {x}[{at}] - m - logf(sum);" if log else f"{y}[{at}] /= sum;"
    exp_store = "" if log else f"{y}[{at}] = e; "
    return (
        f"for (int32_t u = 0; u < {outer}; ++u) for (int32_t v = 0; v < {inner}; ++v) {{\n"
        f"        float m = -INFINITY, sum = 0.0f;\n"
        f"        for (int32_t j = 0; j < {length}; ++j) if ({x}[{at}] > m) m = {x}[{at}];\n"
        f"        for (int32_t j = 0; j < {length}; ++j) {{ float e = expf({x}[{at}] - m); "
        f"{exp_store}sum += e; }}\n"
        f"        for (int32_t j = 0; j < {length}; ++j) {final}\n    }}"
    )


def _batch_norm(n: _Node) -> str:
    scale, bias, mean, var = (np.asarray(n.const(i), np.float32) for i in range(1, 5))
    eps = np.float32(n.at.get("epsilon", 1e-5))  # type: ignore[arg-type]
    a = (scale / np.sqrt(var + eps)).astype(np.float32)
    b = (bias - mean * a).astype(np.float32)
    shape = n.shape(0)
    channels, inner = shape[1], int(np.prod(shape[2:], dtype=np.int64))
    count = int(np.prod(shape, dtype=np.int64))
    return (
        "{\n    "
        + c_constant("bn_a", a).replace("\n", "\n    ")
        + c_constant("bn_b", b).replace("\n", "\n    ")
        + f"for (int32_t o = 0; o < {count}; ++o) {{ int32_t c = (o / {inner}) % {channels}; "
        f"{n.y()}[o] = {n.x(0)}[o] * bn_a[c] + bn_b[c]; }}\n    }}"
    )


def _layer_norm(n: _Node) -> str:
    shape = n.shape(0)
    axis = int(n.at.get("axis", -1)) % len(shape)  # type: ignore[call-overload]
    eps = float_literal(float(n.at.get("epsilon", 1e-5)))  # type: ignore[arg-type]
    rows = int(np.prod(shape[:axis], dtype=np.int64))
    length = int(np.prod(shape[axis:], dtype=np.int64))
    scale = n.x(1)
    s_len = int(np.prod(n.shape(1), dtype=np.int64))
    bias = n.x(2) if len(n.node.input) > 2 and n.node.input[2] else None
    b_len = int(np.prod(n.shape(2), dtype=np.int64)) if bias else 1
    x, y = n.x(0), n.y()
    b_term = f" + {bias}[j % {b_len}]" if bias else ""
    return (
        f"for (int32_t r = 0; r < {rows}; ++r) {{\n"
        f"        const float *xr = {x} + r * {length}; float *yr = {y} + r * {length};\n"
        f"        float mean = 0.0f, var = 0.0f;\n"
        f"        for (int32_t j = 0; j < {length}; ++j) mean += xr[j];\n"
        f"        mean /= {length}.0f;\n"
        f"        for (int32_t j = 0; j < {length}; ++j) var += (xr[j] - mean) * (xr[j] - mean);\n"
        f"        const float inv = 1.0f / sqrtf(var / {length}.0f + {eps});\n"
        f"        for (int32_t j = 0; j < {length}; ++j) "
        f"yr[j] = (xr[j] - mean) * inv * {scale}[j % {s_len}]{b_term};\n    }}"
    )


def _spatial(n: _Node, kernel: Sequence[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    """(strides, dilations, pads begin, input spatial dims) as 2-D lists (1-D: H = 1)."""
    rank = len(kernel)
    spatial = list(n.shape(0)[2:])
    st = list(n.at.get("strides", [1] * rank))  # type: ignore[call-overload]
    dl = list(n.at.get("dilations", [1] * rank))  # type: ignore[call-overload]
    pads = list(n.at.get("pads", [0] * 2 * rank))  # type: ignore[call-overload]
    auto = n.at.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    out = list(n.out_shape()[2:])
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((o - 1) * s + (k - 1) * d + 1 - i, 0)
                 for o, s, k, d, i in zip(out, st, kernel, dl, spatial, strict=True)]  # fmt: skip
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    else:
        begin = [int(p) for p in pads[:rank]]
    if rank == 1:
        return [1, st[0]], [1, dl[0]], [0, begin[0]], [1, spatial[0]]
    if rank != 2:
        raise UnsupportedModelError(f"{n.node.op_type} {n.node.name}: {rank}-d in C")
    return st, dl, begin, spatial


def _conv(n: _Node) -> str:
    w = n.const(1)
    assert w is not None
    kernel = list(w.shape[2:])
    st, dl, pt, (h, wd) = _spatial(n, kernel)
    kh, kw = [1, *kernel] if len(kernel) == 1 else kernel
    batch, cin = n.shape(0)[:2]
    cout = w.shape[0]
    oh, ow = [1, *n.out_shape()[2:]] if len(kernel) == 1 else n.out_shape()[2:]
    group = int(n.at.get("group", 1))  # type: ignore[call-overload]
    cin_g, cout_g = cin // group, cout // group
    bias = f"{n.x(2)}[co]" if len(n.node.input) > 2 and n.node.input[2] else "0.0f"
    x, wt, y = n.x(0), n.x(1), n.y()
    return (
        f"for (int32_t b = 0; b < {batch}; ++b) for (int32_t co = 0; co < {cout}; ++co) {{\n"
        f"        const int32_t g = co / {cout_g};\n"
        f"        for (int32_t oy = 0; oy < {oh}; ++oy) for (int32_t ox = 0; ox < {ow}; ++ox) {{\n"
        f"            float acc = {bias};\n"
        f"            for (int32_t ci = 0; ci < {cin_g}; ++ci) "
        f"for (int32_t ky = 0; ky < {kh}; ++ky) {{\n"
        f"                const int32_t iy = oy * {st[0]} - {pt[0]} + ky * {dl[0]};\n"
        f"                if (iy < 0 || iy >= {h}) continue;\n"
        f"                for (int32_t kx = 0; kx < {kw}; ++kx) {{\n"
        f"                    const int32_t ix = ox * {st[1]} - {pt[1]} + kx * {dl[1]};\n"
        f"                    if (ix < 0 || ix >= {wd}) continue;\n"
        f"                    acc += {x}[((b * {cin} + g * {cin_g} + ci) * {h} + iy) * {wd} + ix]"
        f" * {wt}[((co * {cin_g} + ci) * {kh} + ky) * {kw} + kx];\n"
        f"                }}\n            }}\n"
        f"            {y}[((b * {cout} + co) * {oh} + oy) * {ow} + ox] = acc;\n"
        f"        }}\n    }}"
    )


def _pool(n: _Node) -> str:
    kernel = list(n.at["kernel_shape"])  # type: ignore[call-overload]
    st, dl, pt, (h, wd) = _spatial(n, kernel)
    kh, kw = [1, *kernel] if len(kernel) == 1 else kernel
    planes = int(np.prod(n.shape(0)[:2], dtype=np.int64))
    oh, ow = [1, *n.out_shape()[2:]] if len(kernel) == 1 else n.out_shape()[2:]
    is_max = n.node.op_type == "MaxPool"
    include_pad = bool(n.at.get("count_include_pad", 0))
    x, y = n.x(0), n.y()
    if is_max:
        init, add, final = "-INFINITY", "if (v > acc) acc = v;", "acc"
    else:
        init, add = "0.0f", "acc += v; ++count;"
        final = f"acc / {kh * kw}.0f" if include_pad else "acc / (float)count"
    return (
        f"for (int32_t p = 0; p < {planes}; ++p) "
        f"for (int32_t oy = 0; oy < {oh}; ++oy) for (int32_t ox = 0; ox < {ow}; ++ox) {{\n"
        f"        float acc = {init}; int32_t count = 0; (void)count;\n"
        f"        for (int32_t ky = 0; ky < {kh}; ++ky) for (int32_t kx = 0; kx < {kw}; ++kx) {{\n"
        f"            const int32_t iy = oy * {st[0]} - {pt[0]} + ky * {dl[0]};\n"
        f"            const int32_t ix = ox * {st[1]} - {pt[1]} + kx * {dl[1]};\n"
        f"            if (iy < 0 || iy >= {h} || ix < 0 || ix >= {wd}) continue;\n"
        f"            const float v = {x}[(p * {h} + iy) * {wd} + ix]; {add}\n        }}\n"
        f"        {y}[(p * {oh} + oy) * {ow} + ox] = {final};\n    }}"
    )


def _matmul_loops(
    y: str, a: str, b: str, m: int, k: int, n_: int, a_t: bool, b_t: bool, extra: str
) -> str:
    a_at = f"{a}[pa + kk * {m} + i]" if a_t else f"{a}[pa + i * {k} + kk]"
    b_at = f"{b}[pb + j * {k} + kk]" if b_t else f"{b}[pb + kk * {n_} + j]"
    return (
        f"for (int32_t i = 0; i < {m}; ++i) for (int32_t j = 0; j < {n_}; ++j) {{\n"
        f"            float acc = 0.0f;\n"
        f"            for (int32_t kk = 0; kk < {k}; ++kk) acc += {a_at} * {b_at};\n"
        f"            {y}[py + i * {n_} + j] = {extra};\n        }}"
    )


def _matmul(n: _Node) -> str:
    a_shape, b_shape, out = list(n.shape(0)), list(n.shape(1)), list(n.out_shape())
    if len(a_shape) == 1:
        a_shape = [1, *a_shape]
    if len(b_shape) == 1:
        b_shape = [*b_shape, 1]
    m, k, n_ = a_shape[-2], a_shape[-1], b_shape[-1]
    batch = out[: len(out) - 2] if len(n.shape(0)) > 1 and len(n.shape(1)) > 1 else out[:-1]
    if len(n.shape(0)) == 1 or len(n.shape(1)) == 1:
        batch = [int(np.prod(out, dtype=np.int64)) // (m * n_)]
    a_coef = [c * m * k for c in broadcast_coefs(a_shape[:-2], batch)] if batch else []
    b_coef = [c * k * n_ for c in broadcast_coefs(b_shape[:-2], batch)] if batch else []
    y_coef = [c * m * n_ for c in strides(batch)]
    inner = _matmul_loops(n.y(), n.x(0), n.x(1), m, k, n_, False, False, "acc")
    body = f"const int32_t pa = p0, pb = p1, py = p2;\n        {inner}"
    return nd_loop(batch or [1], [(0, a_coef), (0, b_coef), (0, y_coef)], body)


def _gemm(n: _Node) -> str:
    a_t, b_t = bool(n.at.get("transA", 0)), bool(n.at.get("transB", 0))
    alpha = float_literal(float(n.at.get("alpha", 1.0)))  # type: ignore[arg-type]
    beta = float_literal(float(n.at.get("beta", 1.0)))  # type: ignore[arg-type]
    m, n_ = n.out_shape()
    k = n.shape(0)[0] if a_t else n.shape(0)[1]
    extra = f"{alpha} * acc"
    if len(n.node.input) > 2 and n.node.input[2]:
        c_coef = broadcast_coefs(n.shape(2), (m, n_))
        extra += f" + {beta} * {n.x(2)}[i * {c_coef[0]} + j * {c_coef[1]}]"
    inner = _matmul_loops(n.y(), n.x(0), n.x(1), m, k, n_, a_t, b_t, extra)
    return "{\n        const int32_t pa = 0, pb = 0, py = 0;\n        " + inner + "\n    }"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nearest_source_index(
    out_size: int, in_size: int, scale: float, transform: str, rounding: str
) -> np.ndarray:
    """The input index each output index of a nearest Resize reads along one axis, as the
    ONNX operator defines it, computed in float32 as onnxruntime does."""
    o = np.arange(out_size, dtype=np.float32)
    s = np.float32(scale)
    if transform == "asymmetric":
        x = o / s
    elif transform == "half_pixel":
        x = (o + np.float32(0.5)) / s - np.float32(0.5)
    elif transform == "pytorch_half_pixel":
        x = (o + np.float32(0.5)) / s - np.float32(0.5) if out_size > 1 else o * 0
    elif transform == "tf_half_pixel_for_nn":
        x = (o + np.float32(0.5)) / s
    elif transform == "align_corners":
        step = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else 0
        x = o * np.float32(step)
    else:
        raise UnsupportedModelError(f"Resize coordinate_transformation_mode {transform} in C")
    rounded = {
        "round_prefer_floor": np.ceil(x - np.float32(0.5)),
        "round_prefer_ceil": np.floor(x + np.float32(0.5)),
        "floor": np.floor(x),
        "ceil": np.ceil(x),
    }
    if rounding not in rounded:
        raise UnsupportedModelError(f"Resize nearest_mode {rounding} in C")
    return np.clip(rounded[rounding], 0, in_size - 1).astype(np.int64)


def _resize(n: _Node) -> str:
    """Nearest Resize as a gather: one index table per resized axis, computed here (the
    upsampling of YOLO / DBNet / PicoDet feature pyramids)."""
    mode = _text(n.at.get("mode", "nearest"))
    if mode != "nearest" or "axes" in n.at:
        what = f"mode {mode}" if mode != "nearest" else "the axes attribute"
        raise UnsupportedModelError(f"Resize {n.node.name}: {what} has no Cortex-M C kernel")
    transform = _text(n.at.get("coordinate_transformation_mode", "half_pixel"))
    rounding = _text(n.at.get("nearest_mode", "round_prefer_floor"))
    shape, out = n.shape(0), n.out_shape()
    scales_at = 1 if len(n.node.input) == 2 else 2  # opset 10: (X, scales)
    given = None
    if len(n.node.input) > scales_at and n.node.input[scales_at]:
        given = np.asarray(n.const(scales_at), np.float32).reshape(-1)
    if given is None or given.size != len(shape):  # sizes given: the scale is their ratio
        given = np.array([o / i for o, i in zip(out, shape, strict=True)], np.float32)
    in_strides = strides(shape)
    lines = ["{"]
    reads = []
    unscaled = bool(np.all(given == 1)) and tuple(out) == tuple(shape)  # onnxruntime copies
    for a, (o, i, scale) in enumerate(zip(out, shape, given, strict=True)):
        index = (
            np.arange(o)
            if unscaled
            else nearest_source_index(o, i, float(scale), transform, rounding)
        )
        if np.array_equal(index, np.arange(o)):
            reads.append(f"i{a} * {in_strides[a]}")
            continue
        table = ", ".join(str(int(v) * in_strides[a]) for v in index)
        lines.append(f"    static const int32_t rz{a}[{o}] = {{{table}}};")
        reads.append(f"rz{a}[i{a}]")
    lines.append("    int32_t o = 0;")
    for a, d in enumerate(out):
        lines.append(f"    for (int32_t i{a} = 0; i{a} < {d}; ++i{a}) {{")
    lines.append(f"        {n.y()}[o++] = {n.x(0)}[{' + '.join(reads) or '0'}];")
    lines.append("    " + "}" * len(out))
    lines.append("}")
    return "\n    ".join(lines)


def _where(n: _Node) -> str:
    return _elementwise(n, "({a} ? {b} : {c})")


WRITERS: dict[str, Callable[[_Node], str]] = {
    **{op: _binary for op in BINARY},
    **{op: _move for op in MOVES},
    "Cast": _cast, "Clip": _clip, "Transpose": _transpose, "Slice": _slice, "Expand": _expand,
    "Concat": _concat, "Gather": _gather, "Pad": _pad, "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm, "Conv": _conv, "MaxPool": _pool, "AveragePool": _pool,
    "MatMul": _matmul, "Gemm": _gemm, "Where": _where, "Split": _split, "Resize": _resize,
    **{op: _reduce for op in REDUCE_INIT},
}  # fmt: skip
SOFTMAX = ("Softmax", "LogSoftmax")


def has_kernel(node: onnx.NodeProto) -> bool:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return False
    return op in WRITERS or op in UNARY or op in WITH_ATTRIBUTES or op in SOFTMAX


def emit_node(node: onnx.NodeProto, layout: Layout, names: dict[str, str], opset: int) -> str:
    n = _Node(node, layout, names)
    op = node.op_type
    if op in UNARY:
        return _elementwise(n, UNARY[op])
    if op in WITH_ATTRIBUTES:
        return _elementwise(n, WITH_ATTRIBUTES[op](n.at))
    if op in SOFTMAX:
        return _softmax(n, opset)
    return WRITERS[op](n)
