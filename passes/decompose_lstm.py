"""Rewrite: unroll an ``LSTM`` of static sequence length into MatMul / Add / Sigmoid / Tanh / Mul.

ONNX LSTM (gate order i, o, f, c; default activations; forward; layout 0), per step t with
input ``x_t`` and state ``(h, C)``::

    g_k = x_t W_k^T + h R_k^T + (Wb_k + Rb_k)        k in {i, o, f, c}
    i, o, f = sigmoid(g_i), sigmoid(g_o), sigmoid(g_f);  c~ = tanh(g_c)
    C' = f * C + i * c~;   h' = o * tanh(C')
    Y[t] = h';  Y_h = h_T;  Y_c = C_T

Unrolled, the cell is ops every backend has (TVM's ONNX importer has no LSTM; silero_vad's
decoder is one), and its matrix products are ordinary weighted layers. Preconditions: constant
W, R (and B), one direction ``forward``, no peepholes, no ``sequence_lens``, no ``clip`` and
default activations, a static sequence length; any other LSTM is left alone with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph
from dyadiq.rewrite_report import RewriteReport

GATES = ("i", "o", "f", "c")


def _why_not(node: gs.Node) -> str | None:
    ins = list(node.inputs) + [None] * (8 - len(node.inputs))
    if not all(isinstance(t, gs.Constant) for t in ins[1:3]):
        return "W or R is not a constant"
    if ins[3] is not None and ins[3].name and not isinstance(ins[3], gs.Constant):
        return "B is not a constant"
    if ins[4] is not None and ins[4].name:
        return "sequence_lens given"
    if ins[7] is not None and ins[7].name:
        return "peephole weights"
    attrs = node.attrs
    if attrs.get("direction", "forward") != "forward" or attrs.get("layout", 0) != 0:
        return "not one forward direction in layout 0"
    if attrs.get("clip") is not None or attrs.get("input_forget", 0):
        return "clip or input_forget"
    if "activations" in attrs and list(attrs["activations"]) != ["Sigmoid", "Tanh", "Tanh"]:
        return f"activations {attrs['activations']}"
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) and d > 0 for d in shape[:2]):
        return f"sequence length / batch not static ({shape})"
    return None


def _unroll(g: gs.Graph, node: gs.Node) -> None:
    x, w, r = node.inputs[:3]
    hidden = int(node.attrs["hidden_size"])
    steps, batch = int(x.shape[0]), int(x.shape[1])
    ins = list(node.inputs) + [None] * (8 - len(node.inputs))
    bias = ins[3].values[0] if ins[3] is not None and ins[3].name else np.zeros(8 * hidden)
    name = node.name
    nodes: list[gs.Node] = []
    count = [0]

    state_shape = [batch, hidden]

    def op(
        kind: str, inputs: list[gs.Tensor], shape: list[int] = state_shape, **attrs: object
    ) -> gs.Variable:
        """One op of the cell; its output is static (every rewrite after this one, the
        integer model's requantization among them, reads shapes)."""
        count[0] += 1
        out = gs.Variable(f"{name}/{kind}_{count[0]}", dtype=np.float32, shape=list(shape))
        nodes.append(gs.Node(kind, f"{name}/{kind}_{count[0]}", attrs, inputs, [out]))
        return out

    def const(label: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{name}/{label}", np.ascontiguousarray(value, np.float32))

    def initial(index: int) -> gs.Tensor:
        t = ins[index]
        if t is None or not t.name:
            return const(f"zero_{index}", np.zeros((batch, hidden)))
        return op("Squeeze", [t, gs.Constant(f"{name}/axis0_{index}", np.array([0]))])

    h, c = initial(5), initial(6)
    weights = {}  # one copy per gate, read by every step
    for k, gate in enumerate(GATES):
        rows = slice(k * hidden, (k + 1) * hidden)
        weights[gate] = (
            const(f"W_{gate}", w.values[0][rows].T),
            const(f"R_{gate}", r.values[0][rows].T),
            const(f"B_{gate}", bias[rows] + bias[4 * hidden :][rows]),
        )
    ys = []
    for t in range(steps):
        index = gs.Constant(f"{name}/t{t}", np.array(t, np.int64))
        x_t = op("Gather", [x, index], [batch, int(w.values.shape[2])], axis=0)
        gates = {}
        for gate in GATES:
            w_k, r_k, b_k = weights[gate]
            pre = op("Add", [op("Add", [op("MatMul", [x_t, w_k]), op("MatMul", [h, r_k])]), b_k])
            gates[gate] = op("Tanh" if gate == "c" else "Sigmoid", [pre])
        c = op("Add", [op("Mul", [gates["f"], c]), op("Mul", [gates["i"], gates["c"]])])
        h = op("Mul", [gates["o"], op("Tanh", [c])])
        ys.append(h)
    y, y_h, y_c = [*node.outputs, None, None, None][:3]
    axes01 = gs.Constant(f"{name}/axes01", np.array([0, 1], np.int64))
    axis0 = gs.Constant(f"{name}/axes0", np.array([0], np.int64))
    if y is not None and y.name:
        parts = [op("Unsqueeze", [h_t, axes01], [1, 1, batch, hidden]) for h_t in ys]
        nodes.append(gs.Node("Concat", f"{name}/Y", {"axis": 0}, parts, [y]))
    for state, out in ((h, y_h), (c, y_c)):
        if out is not None and out.name:
            nodes.append(gs.Node("Unsqueeze", f"{name}/{out.name}", {}, [state, axis0], [out]))
    node.outputs.clear()
    node.inputs.clear()
    g.nodes.extend(nodes)


def decompose_lstm(graph: QGraph) -> RewriteReport:
    """Unroll every LSTM that meets the preconditions, in place (on the caller's copy)."""
    report = RewriteReport("decompose_lstm")
    g = graph.graph
    for node in [n for n in g.nodes if n.op == "LSTM"]:
        reason = _why_not(node)
        if reason is not None:
            report.skip(node.name, reason)
            continue
        _unroll(g, node)
        report.changed.append(node.name)
    if report.changed:
        g.cleanup().toposort()
    return report
