"""Sequential GPTQ (passes/weight_only/sequential.py): each stage's Hessian comes from the
model with the earlier weights quantized, recomputed here in numpy on a tiny tied LM."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from onnx import numpy_helper

from dyadiq.io import save_model_atomic
from dyadiq.passes.weight_only.groupwise import GroupwiseWeight
from dyadiq.passes.weight_only.layers import WeightLayer, find_weights
from dyadiq.passes.weight_only.model_file import ModelFile, with_fed_weights
from dyadiq.passes.weight_only.quantize import LayerQuantizer, Method, WeightOnlySettings
from dyadiq.passes.weight_only.sequential import input_stages, segments, sequential_quantize
from dyadiq.passes.weight_only.statistics import activation_hessians
from tests.test_weight_only import SEQ, VOCAB, tied_lm


@pytest.fixture
def model(tmp_path: pathlib.Path) -> ModelFile:
    path = tmp_path / "tied.onnx"
    save_model_atomic(tied_lm(np.random.default_rng(0)), path, external_data=True)
    return ModelFile.load(path)


def _batches(count: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"ids": rng.integers(0, VOCAB, size=(1, SEQ))} for _ in range(count)]


def _gram(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return flat.T @ flat / flat.shape[0]


def test_segments_run_in_order_reproduce_the_graph(model: ModelFile) -> None:
    layers = find_weights(model.header).layers
    shapes = {x.initializer: tuple(model.array(x.initializer).shape) for x in layers}
    header = with_fed_weights(model.header, shapes)
    parts = segments(header, [["emb"], ["t"]])
    assert [[n.name for n in p.header.graph.node] for p in parts] == [["embed"], ["up", "act"]]
    assert parts[0].inputs == ("E", "ids") and parts[1].inputs == ("B", "emb")
    assert parts[0].outputs == ("emb",) and parts[1].outputs == ("t",)
    values: dict[str, np.ndarray] = {"ids": _batches(1)[0]["ids"]}
    values.update({name: model.array(name) for name in shapes})
    for part in parts:
        session = model.session(part.header)
        got = session.run(list(part.outputs), {n: values[n] for n in part.inputs})
        values.update(zip(part.outputs, got, strict=True))
    expected = np.tanh(model.array("E")[values["ids"]] @ model.array("B"))
    np.testing.assert_allclose(values["t"], expected, rtol=1e-5, atol=1e-6)


def test_stages_follow_the_graph_and_skip_the_tied_table(model: ModelFile) -> None:
    layers = find_weights(model.header).layers
    assert input_stages(model.header, layers, 1) == [["emb"], ["t"]]
    assert input_stages(model.header, layers, 4) == [["emb", "t"]]
    with pytest.raises(ValueError):
        input_stages(model.header, layers, 0)


@pytest.mark.parametrize("stage_size", [1, 2])
def test_each_weight_gets_the_hessian_of_the_quantized_prefix(
    model: ModelFile, stage_size: int
) -> None:
    layers = find_weights(model.header).layers
    by_init = {x.initializer: x for x in layers}
    batches = _batches()
    float_h = activation_hessians(model, layers, batches)
    quantizer = LayerQuantizer(WeightOnlySettings(method=Method.GPTQ, group_size=32), float_h)
    seen: dict[str, np.ndarray | None] = {}

    def quantize(
        layer: WeightLayer, w: np.ndarray, bits: int, h: np.ndarray | None
    ) -> GroupwiseWeight:
        seen[layer.initializer] = h
        return quantizer.on_hessian(layer, w, bits, h)

    bits = {x.id: 3 for x in layers}
    done = sequential_quantize(
        model, layers, batches, bits, quantize, float_h, stage_size=stage_size
    )
    assert set(done) == set(bits)
    # the tied table first, on the float model's H of the LM head's input
    np.testing.assert_allclose(seen["E"], float_h["d"])
    eq = done[by_init["E"].id].dequantize()
    bq = by_init["B"].stored(done[by_init["B"].id].dequantize())
    ids = np.concatenate([b["ids"] for b in batches])
    emb = eq[ids]  # the quantized table's rows feed every stage
    np.testing.assert_allclose(seen["B"], _gram(emb), rtol=1e-4, atol=1e-6)
    b_used = bq if stage_size == 1 else model.array("B")  # one stage: B float for its pass
    np.testing.assert_allclose(seen["B2"], _gram(np.tanh(emb @ b_used)), rtol=1e-4, atol=1e-6)
    # and it differs from the float model's H (the test would not see a float-prefix bug)
    assert not np.allclose(seen["B2"], float_h["t"], rtol=1e-3)
    # the codes are the plain GPTQ codes on that H
    w2 = by_init["B2"].matrix(numpy_helper.to_array(_tensor(model, "B2")))
    again = quantizer.on_hessian(by_init["B2"], w2, 3, seen["B2"])
    np.testing.assert_array_equal(again.codes, done[by_init["B2"].id].codes)


def _tensor(model: ModelFile, name: str) -> object:
    return numpy_helper.from_array(model.array(name), name)


def test_pipeline_quantizes_in_sequence(model: ModelFile, tmp_path: pathlib.Path) -> None:
    import json

    from dyadiq.backends.onnx.weight_only import WeightOnlyForm
    from dyadiq.passes.weight_only.pipeline import prepare, quantize_layers, run

    path = model.base_dir / "tied.onnx"
    batches = _batches()
    settings = WeightOnlySettings(method=Method.GPTQ, group_size=32, sequential=True)
    prepared = prepare(path, iter(batches), settings)
    assert len(prepared.calibration) == len(batches)
    layers = prepared.inventory.layers
    bits = {x.id: 3 for x in layers}
    expected = sequential_quantize(
        model, layers, batches, bits, prepared.quantizer.on_hessian, prepared.quantizer.hessians
    )
    got, _ = quantize_layers(prepared, bits)
    plain, _ = quantize_layers(
        prepare(path, iter(batches), WeightOnlySettings(group_size=32)), bits
    )
    for x in layers:
        np.testing.assert_array_equal(got[x.id].codes, expected[x.id].codes)
    # the weight after the first stage sees another H than in the float model
    down = next(x.id for x in layers if x.initializer == "B2")
    assert not np.array_equal(got[down].codes, plain[down].codes)
    report = run(path, tmp_path / "out", prepared, bits, WeightOnlyForm.DEQUANTIZE_LINEAR)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["sequential"] is True and report["settings"]["sequential"] is True
