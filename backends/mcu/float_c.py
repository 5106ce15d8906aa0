"""Float C for the float islands of an :class:`IntegerProgram` on Cortex-M.

An island (``ip.FloatIsland``: float ONNX nodes between ``Dequantize`` and ``Quantize``) becomes
one C function of plain float32 loops, one loop nest per node: the FPU runs it on M4/M7/M55
(``-mfloat-abi=hard``), the compiler's soft-float library on M3. Shapes are static, so every
bound, stride and broadcast is a literal; the layout of each node is worked out here
(:mod:`.float_ops` writes the loops).

Values that do not depend on the island's inputs (initializers, ``Constant``, ``Shape`` of a
static tensor and anything computed from those alone) are computed here, once, by onnxruntime
on the island, and stored in flash: a Reshape target or a Gather index list costs no code.
Every other tensor the island makes lives in one scratch buffer shared by all islands (they
run one after another), laid out by the arena's greedy-by-size rule over the island's own
liveness. Island inputs and outputs are arena buffers of 4-byte floats (:mod:`.arena`).

Numerics: float32 throughout, as onnxruntime; transcendental functions come from newlib's
``libm``, whose last bit may differ from onnxruntime's, so island outputs are compared with a
tolerance (``ISLAND_CODE_TOLERANCE``) and integer ops downstream of an island inherit it. Ops
with no kernel here are refused, all of them listed in one message.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from dyadiq import integer_program as ip
from dyadiq.errors import UnsupportedModelError

from . import float_ops
from .arena import ALIGNMENT, ArenaPlan, Buffer, _greedy_by_size, static_shape
from .float_if import branch_ops, emit_if, node_reads

CONSTANT_PRODUCERS = frozenset({"Constant", "Shape", "Size"})


RAW_INPUT_TYPES = {np.dtype(np.float32): "float", np.dtype(np.int32): "int32_t",
                   np.dtype(np.int64): "int64_t"}  # fmt: skip


def model_input_problems(program: ip.IntegerProgram) -> list[str]:
    """The device takes one input: float codes quantized on the device, or a float or integer
    tensor a float island reads directly; or several raw integer inputs of one type (token
    ids and an attention mask), one after another in one buffer."""
    if len(program.inputs) != 1:
        # several integer inputs (token ids and an attention mask) as one raw buffer
        kinds = {np.dtype(dtype) for dtype, _ in program.inputs.values()}
        quantized = any(isinstance(op, ip.QuantizeInput) for op in program.ops)
        if quantized or len(kinds) != 1 or not kinds <= {np.dtype(np.int32), np.dtype(np.int64)}:
            return [
                f"{len(program.inputs)} model inputs (one, or several raw inputs of one "
                "integer type, are supported)"
            ]
        return []
    (name,) = program.inputs
    dtype = np.dtype(program.inputs[name][0])
    if dtype not in RAW_INPUT_TYPES:
        return [f"input {name} is {dtype} (float32, int32 or int64 are supported)"]
    return []


def raw_input_copy(program: ip.IntegerProgram, name: str, *more: str) -> tuple[int, str]:
    """(bytes, C body of ``dq_model_quantize_input``) for an input an island reads as it is:
    the harness hands over floats, converted to the input's type (integer inputs such as byte
    values or token ids are exact in float32 up to 2^24). Several inputs of one type
    (``more``) follow each other in one buffer, in that order."""
    dtype = np.dtype(program.inputs[name][0])
    count = sum(int(np.prod(static_shape(program, n), dtype=np.int64)) for n in (name, *more))
    ctype = RAW_INPUT_TYPES[dtype]
    body = (
        f"    {ctype} *values = ({ctype} *)(void *)codes;\n"
        f"    for (int32_t i = 0; i < {count}; ++i) values[i] = ({ctype})x[i];\n"
    )
    return count * dtype.itemsize, body


def island_output_dtype(program: ip.IntegerProgram, name: str) -> np.dtype:
    for op in program.ops:
        if isinstance(op, ip.FloatIsland) and name in op.outputs:
            types = op.output_types or (onnx.TensorProto.FLOAT,) * len(op.outputs)
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(types[op.outputs.index(name)]))
    raise UnsupportedModelError(f"{name} is not a float island's output")


def quantize_problems(program: ip.IntegerProgram) -> list[str]:
    """A Quantize on the device reads floats a float island wrote (or the float input, when
    no QuantizeInput turned it into codes on the way in)."""
    floats = {o for op in program.ops if isinstance(op, ip.FloatIsland) for o in op.outputs}
    if not any(isinstance(op, ip.QuantizeInput) for op in program.ops):
        floats |= set(program.inputs)
    return [
        f"Quantize {op.output} reads {op.input}, which no float island computes"
        for op in program.ops
        if isinstance(op, ip.Quantize) and op.input not in floats
    ]


def constant_tensors(island: ip.FloatIsland, constant_inputs: Iterable[str] = ()) -> set[str]:
    """Tensors of the island whose values do not depend on its inputs (``constant_inputs``:
    inputs an earlier island computed from constants alone, e.g. a Shape)."""
    known = {t.name for t in island.initializers} | set(constant_inputs)
    for node in island.nodes:
        reads = node_reads(node)  # an If's branches read enclosing tensors by name
        if node.op_type in CONSTANT_PRODUCERS or (reads and all(n in known for n in reads)):
            known.update(node.output)
    return known


def island_problems(island: ip.FloatIsland) -> list[str]:
    """Every node of ``island`` that has no C kernel (nodes computing constants need none)."""
    constants = constant_tensors(island)
    computed = [n for n in island.nodes if not all(o in constants for o in n.output if o)]
    for node in list(computed):
        if node.op_type == "If":  # C if / else over the branches' own nodes
            computed.extend(n for n in branch_ops(node) if n.op_type not in CONSTANT_PRODUCERS)
    missing = sorted(
        {n.op_type for n in computed if n.op_type != "If" and not float_ops.has_kernel(n)}
    )
    return [f"float op {op} has no Cortex-M C kernel" for op in missing]


@dataclass(frozen=True)
class IslandLayout:
    """The island's tensors: shapes and element types of all, values of the constant ones."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    constants: dict[str, np.ndarray]


def probe_island(
    program: ip.IntegerProgram,
    island: ip.FloatIsland,
    known: Mapping[str, np.ndarray] | None = None,
) -> IslandLayout:
    """Run the island once in onnxruntime on zeros of its static input shapes (``known``: the
    values of inputs that earlier islands computed from constants), every node output
    exposed: the shape and type of each tensor, the value of each constant one."""
    known = known or {}
    from dyadiq.ort_sessions import Kernels, open_session
    from dyadiq.reference_interpreter import island_model

    model = island_model(island, program.opset)
    exposed = [o for n in island.nodes for o in n.output if o and o not in island.outputs]
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for name in exposed:
        if name in types:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    feeds = {}
    for name, kind in zip(
        island.inputs, island.input_types or (1,) * len(island.inputs), strict=True
    ):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(kind)
        feeds[name] = known[name] if name in known else np.zeros(static_shape(program, name), dtype)
    session = open_session(model, kernels=Kernels.EXACT, threads=1)
    names = [o.name for o in model.graph.output]
    values = dict(zip(names, session.run(names, feeds), strict=True))
    values.update(feeds)
    for init in island.initializers:
        values[init.name] = onnx.numpy_helper.to_array(init)
    constant = constant_tensors(island, [n for n in island.inputs if n in known])
    return IslandLayout(
        {n: tuple(np.shape(v)) for n, v in values.items()},
        {n: np.asarray(v).dtype for n, v in values.items()},
        {n: np.asarray(v) for n, v in values.items() if n in constant},
    )


def with_float_shapes(program: ip.IntegerProgram) -> ip.IntegerProgram:
    """The program with the shapes of its float tensors added (a Dequantize's output has its
    input's shape; an island's outputs, what onnxruntime computes on its input shapes)."""
    islands = [op for op in program.ops if isinstance(op, ip.FloatIsland)]
    if all(o in program.shapes for op in islands for o in op.outputs):
        return program  # nothing to add (or done already)
    shapes = dict(program.shapes)
    shapes.update({name: tuple(spec[1]) for name, spec in program.inputs.items()})
    extended = dataclasses.replace(program, shapes=shapes)
    known: dict[str, np.ndarray] = {}
    for op in program.ops:
        if isinstance(op, ip.Dequantize):
            shapes.setdefault(op.output, shapes[op.input])
        elif isinstance(op, ip.FloatIsland):
            layout = probe_island(extended, op, known)
            for name in op.outputs:
                shapes.setdefault(name, layout.shapes[name])
                if name in layout.constants:
                    known[name] = layout.constants[name]
    return extended


def island_scratch_plan(island: ip.FloatIsland, layout: IslandLayout) -> tuple[dict[str, int], int]:
    """Offsets in the island scratch of every tensor the island computes internally."""
    boundary = set(island.inputs) | set(island.outputs) | set(layout.constants)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for step, node in enumerate(island.nodes):
        for name in node_reads(node):
            if name in first:
                last[name] = step
        for name in node.output:
            if name and name not in boundary:
                first[name], last[name] = step, step
    sizes = {
        n: int(np.prod(layout.shapes[n], dtype=np.int64)) * _itemsize(layout, n) for n in first
    }
    buffers = {n: Buffer(n, sizes[n], first[n], last[n]) for n in first}
    offsets = _greedy_by_size(buffers)
    end = max((offsets[n] + sizes[n] for n in offsets), default=0)
    return offsets, (end + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _itemsize(layout: IslandLayout, name: str) -> int:
    return max(layout.dtypes[name].itemsize, 1)


class IslandEmitter:
    """Writes float islands, and the Dequantize / Quantize ops at their edges, as C.

    ``decls`` and ``calls`` are the C emitter's lists (constants and functions go before
    ``dq_model_run``, calls into it); ``ref`` gives a tensor's arena address expression."""

    def __init__(
        self,
        program: ip.IntegerProgram,
        arena: ArenaPlan,
        decls: list[str],
        calls: list[str],
        ref: Callable[[str], str],
    ) -> None:
        self.program = program
        self.arena = arena
        self.decls = decls
        self.calls = calls
        self.ref = ref
        self.scratch_bytes = 0
        self.stored: dict[tuple[str, tuple[int, ...], str], str] = {}  # value -> its C array
        self.known: dict[str, np.ndarray] = {}  # island outputs computed from constants alone

    def constant(self, cname: str, value: np.ndarray) -> str:
        """The C array holding ``value``, declared once: equal values (a weight every step
        of an unrolled LSTM reads, in many islands) share one array in flash."""
        value = np.ascontiguousarray(value)
        key = (value.dtype.str, value.shape, hashlib.sha256(value.tobytes()).hexdigest())
        if key not in self.stored:
            self.stored[key] = cname
            self.decls.append(float_ops.c_constant(cname, value))
        return self.stored[key]

    def dequantize(self, op: ip.Dequantize) -> None:
        """``(float)(code - z) * s`` in float32: the reference's exact arithmetic."""
        q = self.program.quant[op.input]
        count = int(np.prod(static_shape(self.program, op.input), dtype=np.int64))
        ctype = "int8_t" if q.signed else "uint8_t"
        scale = float_ops.float_literal(q.scale)
        self.calls.append(
            f"{{ const {ctype} *x = (const {ctype} *){self.ref(op.input)}; "
            f"float *y = (float *){self.ref(op.output)}; "
            f"for (int32_t i = 0; i < {count}; ++i) "
            f"y[i] = (float)((int32_t)x[i] - {q.zero_point}) * {scale}; }}"
        )

    def quantize(self, op: ip.Quantize) -> None:
        q = self.program.quant[op.output]
        count = int(np.prod(static_shape(self.program, op.output), dtype=np.int64))
        self.calls.append(
            f"dq_quantize_input((const float *){self.ref(op.input)}, {self.ref(op.output)}, "
            f"{count}, {float_ops.float_literal(q.scale)}, {q.zero_point}, {q.qmin}, {q.qmax});"
        )

    def island(self, op: ip.FloatIsland, tag: str) -> None:
        problems = island_problems(op)
        if problems:
            raise UnsupportedModelError(f"{tag}: " + "; ".join(problems))
        layout = probe_island(self.program, op, self.known)
        offsets, scratch = island_scratch_plan(op, layout)
        self.scratch_bytes = max(self.scratch_bytes, scratch)
        names: dict[str, str] = {}
        body: list[str] = []
        for i, (name, value) in enumerate(sorted(layout.constants.items())):
            names[name] = self.constant(f"{tag}_c{i}", value)
        for name in {*op.inputs, *op.outputs}:
            if name not in names:
                ctype = float_ops.c_type(layout.dtypes[name])
                names[name] = f"(({ctype} *){self.ref(name)})"
        for name, offset in offsets.items():
            ctype = float_ops.c_type(layout.dtypes[name])
            names[name] = f"(({ctype} *)(dq_island_scratch + {offset}))"
        body.extend(self.emit_nodes(op.nodes, layout, names, tag))
        for name in op.outputs:
            if name in layout.constants:  # later islands read it as a constant; Quantize not
                self.known[name] = layout.constants[name]
                size = layout.constants[name].nbytes
                body.append(f"memcpy({self.ref(name)}, {names[name]}, {size});")
        head = f"static void {tag}_island(const uint8_t *input)\n{{\n    (void)input;\n    "
        self.decls.append(head + "\n    ".join(body) + "\n}\n")
        self.calls.append(f"{tag}_island(input);")  # ``input``: the model input, if it reads it

    def emit_nodes(
        self,
        nodes: Sequence[onnx.NodeProto],
        layout: float_ops.Layout,
        names: dict[str, str],
        tag: str,
    ) -> list[str]:
        """One C block per node that computes something (constants are already in flash)."""
        body = []
        for k, node in enumerate(nodes):
            if all(o in layout.constants for o in node.output if o):
                continue
            body.append(f"/* {node.op_type} {node.name} */")
            if node.op_type == "If":
                opset = self.program.opset
                body.append(emit_if(node, layout, names, f"{tag}_if{k}", self.emit_nodes, opset))
            else:
                body.append(float_ops.emit_node(node, layout, names, self.program.opset))
        return body

    def scratch_declaration(self) -> str:
        size = max(self.scratch_bytes, 4)
        return f"static uint8_t dq_island_scratch[{size}] __attribute__((aligned(8), unused));\n"


def island_report(program: ip.IntegerProgram, output_codes: list[str]) -> dict[str, object]:
    """report.json's account of the islands: each island's ops and where it sits, whether the
    program is fully integer, and which outputs the QEMU check compares exactly (no island
    feeds them) and which within the island tolerance."""
    islands = [
        {"step": step, "ops": [f"{n.op_type} {n.name}".strip() for n in op.nodes],
         "reads": list(op.inputs), "writes": list(op.outputs)}
        for step, op in enumerate(program.ops)
        if isinstance(op, ip.FloatIsland)
    ]  # fmt: skip
    if not islands:
        return {"fully_integer": True}
    tainted = downstream_of_islands(program)
    return {
        "fully_integer": False,
        "float_c_islands": islands,
        "outputs_compared_exactly": [o for o in output_codes if o not in tainted],
        "outputs_compared_with_tolerance": [o for o in output_codes if o in tainted],
    }


def downstream_of_islands(program: ip.IntegerProgram) -> set[str]:
    """Tensors whose values depend on a float island (compared with a tolerance)."""
    tainted: set[str] = set()
    for op in program.ops:
        if isinstance(op, ip.FloatIsland):
            tainted.update(op.outputs)
            continue
        reads = [getattr(op, "input", None), *getattr(op, "inputs", ())]
        reads.append(getattr(op, "weight_input", None))
        if any(r in tainted for r in reads if r) and op.output is not None:
            tainted.add(op.output)
    return tainted
