import numpy as np

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.activation_sites import find_activation_sites
from dyadiq.plan import PrecisionPlan
from tests.builders import conv_relu_pool_fc, residual_concat


def _graph(builder):
    return load_onnx(builder(np.random.default_rng(0)))


def test_conv_relu_pool_fc_sites_and_groups():
    graph = _graph(conv_relu_pool_fc)
    sites = find_activation_sites(graph, PrecisionPlan.uniform(graph))
    assert list(sites.tensors) == ["x", "r", "p", "f", "y"]
    conv, relu = (n.name for n in graph.nodes() if n.op in ("Conv", "Relu"))
    assert sites.fused_activations == {conv: relu}  # the conv output itself is never quantized
    group = sites.group_of
    assert group["r"] == group["p"] == group["f"]  # MaxPool and Flatten share the input scale
    assert len({group["x"], group["r"], group["y"]}) == 3
    assert set(sites.group_bits.values()) == {8}


def test_residual_add_and_concat_sharing():
    graph = _graph(residual_concat)
    sites = find_activation_sites(graph, PrecisionPlan.uniform(graph))
    assert set(sites.tensors) == {"x", "a6", "b", "s", "y"}
    g = sites.group_of
    assert g["s"] == g["a6"] == g["y"]  # Concat: inputs and output share one scale
    assert g["b"] != g["x"] != g["s"]  # Add: each input and the output keep their own scale
    clip = next(n.name for n in graph.nodes() if n.op == "Clip")
    assert clip in sites.fused_activations.values()


def test_excluded_layer_is_not_quantized_and_nothing_fuses_into_it():
    graph = _graph(conv_relu_pool_fc)
    conv = next(n.name for n in graph.nodes() if n.op == "Conv")
    plan = PrecisionPlan.uniform(graph, exclude=frozenset({conv}))
    sites = find_activation_sites(graph, plan)
    assert sites.fused_activations == {}
    assert "x" not in sites.tensors and "r" not in sites.tensors
    assert "f" in sites.tensors  # still the Gemm's input
    assert sites.float_layers == ((conv, "excluded by the plan"),)


def test_activation_bits_follow_the_consumer_layer():
    graph = _graph(conv_relu_pool_fc)
    plan = PrecisionPlan.uniform(graph)
    gemm = next(n.name for n in graph.nodes() if n.op == "Gemm")
    layers = dict(plan.layers)
    layers[gemm] = type(layers[gemm])(weight_bits=4, act_bits=4)
    mixed = PrecisionPlan(layers)
    sites = find_activation_sites(graph, mixed)
    # f feeds the 4-bit-activation Gemm, but r/p/f are one group: the group takes the widest.
    assert sites.group_bits[sites.group_of["f"]] == 8
    assert sites.group_bits[sites.group_of["y"]] == 8


def test_stable_ids_keep_unique_names_and_never_collide():
    import onnx_graphsurgeon as gs

    from dyadiq.graph import assign_stable_ids

    x = gs.Variable("x", np.float32, [1])
    nodes = [
        gs.Node("Relu", "", inputs=[x], outputs=[gs.Variable("a", np.float32, [1])]),
        gs.Node("Relu", "Relu_0", inputs=[x], outputs=[gs.Variable("b", np.float32, [1])]),
        gs.Node("Relu", "dup", inputs=[x], outputs=[gs.Variable("c", np.float32, [1])]),
        gs.Node("Relu", "dup", inputs=[x], outputs=[gs.Variable("d", np.float32, [1])]),
    ]
    graph = gs.Graph(nodes=nodes, inputs=[x])
    assign_stable_ids(graph)
    names = [n.name for n in graph.nodes]
    assert names[1] == "Relu_0"  # an existing unique name is never taken away
    assert len(set(names)) == 4 and all(names)
