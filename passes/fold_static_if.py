"""Rewrite: inline an ``If`` whose condition is a constant once the input shapes are fixed.

Exporters wrap code in ``If`` on facts that are static for a deployed model: the sample rate,
``x.shape[1] == 512``, the rank of a state tensor. Kept, the ``If`` is an opaque float island
no backend compiles well (TVM refuses one whose branch computes its Pad widths). Folded, the
taken branch is ordinary graph that quantizes like the rest.

Algebra: ``If(c, then=T, else=E)`` with ``c`` known equals the nodes of ``T`` (``c`` true) or
``E``, followed by ``Identity(branch output -> If output)``. ``c`` is *known* when it is computed
only from initializers, ``Constant`` nodes, ``Shape`` / ``Size`` of tensors whose shape is
static (after ``--input-shape``) and small side-effect-free ops on such values, evaluated here
with ``onnx.reference``. Inside inlined branches the same folding runs, so nested shape-only
``If`` nodes go, and each small value computed from constants alone becomes a ``Constant``:
a backend then sees literal Pad widths and Reshape targets. The branches of an ``If`` whose
condition depends on data are left as they are (shapes inferred for the branch the data never
takes can be wrong, and folding on them breaks it); binding the input fixes such a condition.

Preconditions: a model that passes ``onnx.checker``. ``bound_inputs`` replaces graph inputs by
constants (the caller fixes, e.g., a sample-rate input the deployment never changes).
Declined folds land in the report with the graph inputs the condition depends on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from dyadiq.errors import ConfigError

MAX_FOLDED_ELEMENTS = 4096  # constant values computed here stay small (shapes, pads, indices)
MAX_ROUNDS = 8  # inlining exposes nested Ifs; shape inference reruns after each round
# every standard op is folded when its inputs are known, except those that are not functions
# of their inputs (random) and those with bodies (folded inside instead)
NOT_FOLDABLE_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
     "Bernoulli", "Dropout", "If", "Loop", "Scan", "Constant"}
)  # fmt: skip


@dataclass(frozen=True)
class IfDecision:
    node: str
    folded: bool
    reason: str


@dataclass
class FoldStaticIfResult:
    model: onnx.ModelProto
    modified: bool
    decisions: list[IfDecision] = field(default_factory=list)
    constants_folded: int = 0

    @property
    def notes(self) -> list[str]:
        """One line per decision, for the graph's notes (what a user reads in report.json)."""
        return [
            f"If {d.node}: {'inlined' if d.folded else 'kept'} ({d.reason})" for d in self.decisions
        ]

    @property
    def report(self) -> dict[str, object]:
        return {
            "pass": "fold_static_if",
            "folded": [vars(d) for d in self.decisions if d.folded],
            "declined": [vars(d) for d in self.decisions if not d.folded],
            "constants_folded": self.constants_folded,
        }


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every tensor (subgraphs included) whose shape shape inference knows completely."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # a model shape inference cannot handle: nothing is static
        inferred = model
    shapes: dict[str, tuple[int, ...]] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for info in [*graph.input, *graph.value_info, *graph.output]:
            t = info.type.tensor_type
            if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
                shapes[info.name] = tuple(d.dim_value for d in t.shape.dim)
        for init in graph.initializer:
            shapes[init.name] = tuple(init.dims)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    collect(attr.g)

    collect(inferred.graph)
    return shapes


def _shape_value(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[slice(start, end)], np.int64)


class _Folder:
    def __init__(self, shapes: dict[str, tuple[int, ...]], names: set[str]) -> None:
        self.shapes = shapes
        self.names = names  # every tensor name in the model (fresh names avoid these)
        self.decisions: list[IfDecision] = []
        self.constants_folded = 0
        self.inlined = False

    def fresh(self, name: str) -> str:
        candidate, i = name, 0
        while candidate in self.names:
            i += 1
            candidate = f"{name}__inl{i}"
        self.names.add(candidate)
        return candidate

    def fold_graph(
        self,
        graph: onnx.GraphProto,
        known: dict[str, np.ndarray],
        deps: dict[str, frozenset[str]],
    ) -> None:
        """Fold ``graph`` in place; ``known``/``deps`` hold the enclosing scopes' values and,
        per tensor, the graph inputs it depends on."""
        known, deps = dict(known), dict(deps)
        for init in graph.initializer:
            if int(np.prod(init.dims, dtype=np.int64)) <= MAX_FOLDED_ELEMENTS:
                known[init.name] = numpy_helper.to_array(init)
        for info in graph.input:
            known.pop(info.name, None)
            deps[info.name] = frozenset({info.name})
        out_nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            out_nodes.extend(self.fold_node(node, known, deps))
        del graph.node[:]
        graph.node.extend(out_nodes)

    def fold_node(
        self, node: onnx.NodeProto, known: dict[str, np.ndarray], deps: dict[str, frozenset[str]]
    ) -> list[onnx.NodeProto]:
        inputs = [n for n in node.input if n]
        for out in node.output:
            deps[out] = frozenset().union(*(deps.get(n, frozenset()) for n in inputs))
        if node.op_type == "If":
            return self.fold_if(node, known, deps)
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None:
                known[node.output[0]] = value
            return [node]
        if node.op_type in ("Shape", "Size") and node.input[0] in self.shapes:
            known[node.output[0]] = _shape_value(node, self.shapes[node.input[0]])
            deps[node.output[0]] = frozenset()
            return [self.as_constant(node, known[node.output[0]])]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:  # Loop, Scan: fold inside their bodies
                self.fold_graph(attr.g, known, deps)
        standard = node.domain in ("", "ai.onnx")
        foldable = standard and node.op_type not in NOT_FOLDABLE_OPS
        if foldable and inputs and all(n in known for n in inputs):
            try:
                values = ReferenceEvaluator(node).run(None, {n: known[n] for n in inputs})
            except Exception:  # left as it is: the runtime will compute it
                return [node]
            if all(np.asarray(v).size <= MAX_FOLDED_ELEMENTS for v in values):
                for out, v in zip(node.output, values, strict=True):
                    known[out] = np.asarray(v)
                if len(node.output) == 1:
                    return [self.as_constant(node, known[node.output[0]])]
        return [node]

    def as_constant(self, node: onnx.NodeProto, value: np.ndarray) -> onnx.NodeProto:
        self.constants_folded += 1
        tensor = numpy_helper.from_array(np.asarray(value), node.output[0])
        return helper.make_node("Constant", [], [node.output[0]], name=node.name, value=tensor)

    def fold_if(
        self, node: onnx.NodeProto, known: dict[str, np.ndarray], deps: dict[str, frozenset[str]]
    ) -> list[onnx.NodeProto]:
        branches = {a.name: a.g for a in node.attribute}
        cond = node.input[0]
        if cond not in known:
            on = sorted(deps.get(cond, frozenset()))
            why = (
                f"condition {cond} depends on graph input(s) {', '.join(on)}"
                if on
                else f"condition {cond} is computed from tensors of unknown shape or value"
            )
            self.decisions.append(IfDecision(node.name, False, why))
            # Its branches are left alone: shapes inferred for the branch the data does not
            # take can be wrong (silero's 8 kHz branch on 16 kHz input), and folding on them
            # made a branch onnxruntime refuses. Nested Ifs there are not reported either.
            return [node]
        taken = "then_branch" if bool(np.asarray(known[cond]).reshape(-1)[0]) else "else_branch"
        self.decisions.append(
            IfDecision(node.name, True, f"condition {cond} is {bool(known[cond])}: {taken}")
        )
        self.inlined = True
        branch = onnx.GraphProto()
        branch.CopyFrom(branches[taken])
        renames = {}
        produced = [o for n in branch.node for o in n.output] + [i.name for i in branch.initializer]
        for name in produced:
            if name in self.names:
                renames[name] = self.fresh(f"{node.name}/{name}")
            else:
                self.names.add(name)
        _rename(branch, renames)  # before folding: nested inlines then check these names
        self.fold_graph(branch, known, deps)
        nodes = [*_initializer_constants(branch), *branch.node]
        for out, result in zip(branch.output, node.output, strict=True):
            nodes.append(helper.make_node("Identity", [out.name], [result], name=f"{result}_if"))
            deps[result] = deps.get(out.name, deps.get(result, frozenset()))
            if out.name in known:
                known[result] = known[out.name]
        return nodes


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    attr = node.attribute[0] if node.attribute else None
    if attr is None or attr.name != "value":
        return None
    value = numpy_helper.to_array(attr.t)
    return value if value.size <= MAX_FOLDED_ELEMENTS else None


def _initializer_constants(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """A branch's initializers as Constant nodes (an inlined branch has no initializer list)."""
    return [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]


def _rename(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    """Rename tensors everywhere in ``graph``, nested subgraphs included."""
    if not renames:
        return
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for info in [*graph.output, *graph.value_info]:
        info.name = renames.get(info.name, info.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename(attr.g, renames)


def _all_names(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """Tensor names an inlined branch must not reuse: the graph's and its non-If bodies'
    (an If's own branches are what gets inlined; each is checked against the rest)."""
    names.update(i.name for i in graph.input)
    names.update(i.name for i in graph.initializer)
    for node in graph.node:
        names.update(node.output)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH and node.op_type != "If":
                _all_names(attr.g, names)
    return names


def _promote_constants(graph: onnx.GraphProto) -> None:
    """Top-level Constant nodes become initializers: shape inference reads those as data
    (Pad widths, Reshape targets), so the next round sees the shapes they fix."""
    keep = []
    for node in graph.node:
        value = node.attribute[0] if node.op_type == "Constant" and node.attribute else None
        if value is not None and value.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _has_if(graph: onnx.GraphProto) -> bool:
    return any(
        node.op_type == "If"
        or any(_has_if(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
        for node in graph.node
    )


def bind_inputs(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> None:
    """Turn graph inputs into initializers holding ``values`` (in place)."""
    by_name = {i.name: i for i in model.graph.input}
    problems = [f"{n} is not a model input" for n in values if n not in by_name]
    for name, value in values.items():
        if name not in by_name:
            continue
        t = by_name[name].type.tensor_type
        want = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np.asarray(value).dtype != want:
            problems.append(f"{name} is {want}, got {np.asarray(value).dtype}")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        shape = np.shape(value)
        if len(dims) != len(shape) or any(
            d not in (None, s) for d, s in zip(dims, shape, strict=True)
        ):
            problems.append(f"{name} has shape {dims}, got {list(shape)}")
    if problems:
        raise ConfigError("cannot bind inputs: " + "; ".join(problems))
    for name, value in values.items():
        model.graph.input.remove(by_name[name])
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))


def fold_static_if(
    model: onnx.ModelProto, *, bound_inputs: Mapping[str, np.ndarray] | None = None
) -> FoldStaticIfResult:
    """Inline every ``If`` whose condition is static; returns a new model and the report."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if bound_inputs:
        bind_inputs(out, bound_inputs)
    if not _has_if(out.graph):  # nothing to fold: the model is left exactly as it was
        return FoldStaticIfResult(out, bool(bound_inputs))
    decisions: list[IfDecision] = []
    folded_constants = 0
    for _ in range(MAX_ROUNDS):
        folder = _Folder(_static_shapes(out), _all_names(out.graph, set()))
        folder.fold_graph(out.graph, {}, {})
        _promote_constants(out.graph)
        decisions.extend(d for d in folder.decisions if d.folded)
        folded_constants += folder.constants_folded
        if not folder.inlined:
            decisions.extend(folder.decisions)  # the final round's declines, once each
            break
    modified = any(d.folded for d in decisions) or folded_constants > 0 or bool(bound_inputs)
    return FoldStaticIfResult(out, modified, decisions, folded_constants)
