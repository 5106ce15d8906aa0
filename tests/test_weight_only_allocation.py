"""Weight-only widths from the existing ILP, and the KL damage measurement on a tiny model."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from dyadiq.errors import ConfigError
from dyadiq.io import save_model_atomic
from dyadiq.passes.allocation import brute_force, parse_budget
from dyadiq.passes.weight_only.allocation import allocate_widths, weight_only_problem
from dyadiq.passes.weight_only.groupwise import GroupwiseFormat, round_to_nearest
from dyadiq.passes.weight_only.layers import Orientation, Reader, Use, WeightLayer, find_weights
from dyadiq.passes.weight_only.model_file import ModelFile
from dyadiq.passes.weight_only.sensitivity import WeightFedModel, kl_damage
from tests.test_weight_only import SEQ, VOCAB, tied_lm


def _layer(name: str, rows: int, columns: int) -> WeightLayer:
    reader = Reader(name, Use.MATMUL, f"{name}_x")
    return WeightLayer(name, f"{name}_w", Orientation.TRANSPOSED, rows, columns, (reader,))


LAYERS = [_layer("a", 64, 128), _layer("b", 256, 128), _layer("c", 32, 128), _layer("d", 128, 64)]
DAMAGE = {
    "a": {2: 4.0, 3: 1.0, 4: 0.2},
    "b": {2: 0.5, 3: 0.2, 4: 0.1},
    "c": {2: 9.0, 3: 2.0, 4: 0.1},
    "d": {2: 1.0, 3: 0.5, 4: 0.05},
}


@pytest.mark.parametrize("average", [2.5, 3.0, 3.5])
def test_ilp_widths_within_budget_and_optimal(average: float) -> None:
    bits, allocation = allocate_widths(LAYERS, DAMAGE, [2, 3, 4], f"avg-wbits={average}")
    params = sum(layer.params for layer in LAYERS)
    code_bits = sum(layer.params * bits[layer.id] for layer in LAYERS)
    assert code_bits / params <= average + 1e-9
    problem = weight_only_problem(LAYERS, DAMAGE, [2, 3, 4])
    best = brute_force(problem, parse_budget(f"avg-wbits={average}", problem))
    assert allocation.predicted_damage == pytest.approx(best.predicted_damage)
    assert bits["c"] >= bits["b"]  # the sensitive small layer is kept wider


def test_non_size_budget_and_missing_damage_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        allocate_widths(LAYERS, DAMAGE, [2, 3, 4], "bops=0.5x")
    with pytest.raises(ConfigError, match="no measured damage"):
        allocate_widths(LAYERS, DAMAGE, [2, 3, 4, 8], "avg-wbits=3")


def test_kl_damage_grows_as_width_shrinks(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(5)
    save_model_atomic(tied_lm(rng), tmp_path / "m.onnx", external_data=True)
    source = ModelFile.load(tmp_path / "m.onnx")
    inventory = find_weights(source.header)
    batches = [{"ids": rng.integers(0, VOCAB, size=(1, SEQ)).astype(np.int64)} for _ in range(2)]
    model = WeightFedModel(source, inventory.layers, batches)
    assert model.kl({}) == pytest.approx(0.0, abs=1e-6)

    def quantized(layer: WeightLayer, bits: int) -> np.ndarray:
        w = np.asarray(layer.matrix(source.array(layer.initializer)), np.float32)
        return round_to_nearest(w, GroupwiseFormat(bits, 32)).dequantize()

    damage = kl_damage(model, quantized, [2, 4, 8])
    assert set(damage) == {"up", "down", "head"}
    for per_width in damage.values():
        assert per_width[2] > per_width[4] > per_width[8] >= 0
