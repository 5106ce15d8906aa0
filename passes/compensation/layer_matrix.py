"""A weighted layer as grouped matrices: W[g] (rows = output channels, columns = inputs) and
the input rows x[g] that multiply them, so that every compensation pass is written once.

- Conv, weight [Cout, Cin/G, kh, kw], G groups: W[g] = rows g*Cout/G .. (g+1)*Cout/G of the
  weight reshaped to [Cout, Cin/G*kh*kw]; x[g] are the im2col patches of input channels
  g*Cin/G .. (g+1)*Cin/G in (channel, kernel row, kernel column) order, one per output
  position and sample, zero padding included (the padded zeros do enter the product).
  Depthwise is G = Cin = Cout: one 1 x kh*kw matrix per channel.
- MatMul, weight [K, N]: W[0] = weight^T ([N, K]), x[0] = input rows [..., K].
- Gemm: transB=1 stores [N, K] (W[0] = weight), transB=0 stores [K, N].
The layer output y[g] = W[g] x[g] (+ bias), per output position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from dyadiq.graph import QGraph
from dyadiq.op_facts import OpKind


@dataclass(frozen=True)
class LayerGeometry:
    kind: OpKind
    weight_shape: tuple[int, ...]
    groups: int
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    transposed_weight: bool = False  # MatMul / Gemm(transB=0): stored [K, N]

    @property
    def columns(self) -> int:
        """Inputs per output channel (d, the size of each group's Hessian)."""
        if self.kind is OpKind.CONV:
            return int(np.prod(self.weight_shape[1:]))
        return self.weight_shape[0] if self.transposed_weight else self.weight_shape[1]

    @property
    def out_channels(self) -> int:
        if self.kind is OpKind.CONV:
            return self.weight_shape[0]
        return self.weight_shape[1] if self.transposed_weight else self.weight_shape[0]

    def to_groups(self, weight: np.ndarray) -> np.ndarray:
        """ONNX weight -> [G, Cout/G, d]."""
        if self.kind is OpKind.CONV:
            return weight.reshape(self.groups, self.out_channels // self.groups, self.columns)
        matrix = weight.T if self.transposed_weight else weight
        return matrix.reshape(1, *matrix.shape)

    def from_groups(self, grouped: np.ndarray) -> np.ndarray:
        """[G, Cout/G, d] -> the ONNX weight layout."""
        if self.kind is OpKind.CONV:
            return grouped.reshape(self.weight_shape)
        matrix = grouped.reshape(self.out_channels, self.columns)
        return np.ascontiguousarray(matrix.T if self.transposed_weight else matrix)

    def input_rows(self, x: np.ndarray) -> np.ndarray:
        """The layer's input tensor -> x rows [G, P, d] (P: output positions x samples)."""
        if self.kind is not OpKind.CONV:
            return x.reshape(1, -1, x.shape[-1])
        return _im2col(x, self)


def _im2col(x: np.ndarray, geo: LayerGeometry) -> np.ndarray:
    """[N, Cin, H, W] -> [G, N*OH*OW, Cin/G*kh*kw] patches, as the Conv reads them."""
    kh, kw = geo.kernel
    sh, sw = geo.strides
    dh, dw = geo.dilations
    top, left, bottom, right = geo.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, OH, OW, kh, kw]
    n, c, oh, ow = windows.shape[:4]
    g = geo.groups
    patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, g, (c // g) * kh * kw)
    return np.ascontiguousarray(patches.transpose(1, 0, 2))


def layer_geometry(graph: QGraph, node: gs.Node) -> LayerGeometry | None:
    """The geometry of a Conv (2-D) / MatMul / Gemm with a constant weight; None otherwise."""
    kind = graph.kind(node)
    weight = graph.weight(node)
    if weight is None:
        return None
    shape = tuple(int(d) for d in weight.values.shape)
    if kind is OpKind.CONV:
        if len(shape) != 4 or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return None
        return LayerGeometry(
            kind,
            shape,
            int(node.attrs.get("group", 1)),
            kernel=shape[2:],
            strides=tuple(node.attrs.get("strides", [1, 1])),
            pads=tuple(node.attrs.get("pads", [0, 0, 0, 0])),
            dilations=tuple(node.attrs.get("dilations", [1, 1])),
        )
    if kind is OpKind.MATMUL and len(shape) == 2:
        return LayerGeometry(kind, shape, 1, transposed_weight=True)
    if kind is OpKind.GEMM and len(shape) == 2 and not int(node.attrs.get("transA", 0)):
        return LayerGeometry(kind, shape, 1, transposed_weight=not int(node.attrs.get("transB", 0)))
    return None


def bias_constant(graph: QGraph, node: gs.Node) -> gs.Constant | None:
    """The constant a bias correction folds into: the layer's own bias input (Conv, Gemm with
    unit alpha and beta), or the per-channel constant of an Add right after a MatMul."""
    kind = graph.kind(node)
    facts = graph.facts(node)
    if kind is OpKind.GEMM and (
        float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0
    ):
        return None
    index = facts.bias_input
    if index is not None and index < len(node.inputs):
        bias = node.inputs[index]
        return bias if isinstance(bias, gs.Constant) else None
    weight = graph.weight(node)
    output = node.outputs[0]
    if kind is not OpKind.MATMUL or weight is None or len(output.outputs) != 1:
        return None
    add = output.outputs[0]
    constants = [t for t in add.inputs if isinstance(t, gs.Constant)]
    if graph.kind(add) is not OpKind.ADD or len(constants) != 1:
        return None
    channels = weight.values.shape[-1]
    values = np.asarray(constants[0].values)
    return constants[0] if values.size == channels and values.shape[-1] == channels else None
