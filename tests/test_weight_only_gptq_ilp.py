"""Issue 17 follow-ups: per-layer candidate widths in the weight-only ILP, and GPTQ with
columns kept out of the grid (swept last, their compensated values returned)."""

from __future__ import annotations

import numpy as np
import pytest

from dyadiq.errors import ConfigError
from dyadiq.passes.compensation.gptq import gptq_factor, gptq_group_codes
from dyadiq.passes.weight_only.allocation import allocate_widths
from dyadiq.passes.weight_only.groupwise import GroupwiseFormat, dequantize, group_scales
from tests.test_weight_only_allocation import DAMAGE, LAYERS


def test_per_layer_widths_limit_each_layers_candidates() -> None:
    widths = {"a": [2, 3, 4], "b": [2, 3], "c": [2, 3, 4], "d": [2, 3, 4]}
    bits, _ = allocate_widths(LAYERS, DAMAGE, widths, "avg-wbits=4")
    assert bits["b"] in (2, 3)  # 4 fits the budget but is not offered
    full, _ = allocate_widths(LAYERS, DAMAGE, [2, 3, 4], "avg-wbits=4")
    assert full["b"] == 4
    with pytest.raises(ConfigError, match="no candidate widths"):
        allocate_widths(LAYERS, DAMAGE, {"a": [2, 3]}, "avg-wbits=3")
    with pytest.raises(ConfigError, match="no measured damage"):
        allocate_widths(LAYERS, DAMAGE, {**widths, "b": [2, 8]}, "avg-wbits=3")


def _problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(4096, 128)) @ rng.normal(size=(128, 128))
    x[:, :4] *= 20  # a few outlier input channels, as LLM activations have
    return (x.T @ x / len(x)), rng.normal(size=(48, 128)).astype(np.float32)


def _error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    d = w - q
    return float(np.einsum("rk,kl,rl->", d, h, d))


def test_kept_columns_are_swept_last_and_absorb_the_error() -> None:
    h, w = _problem()
    fmt = GroupwiseFormat(4, 32)
    scales, zeros = group_scales(w, fmt)
    kept = np.zeros(128, bool)
    kept[:4] = True
    factor = gptq_factor(h[None], last=kept[None])
    assert set(factor.order[0, -4:]) == {0, 1, 2, 3}
    values = np.zeros(w.shape)
    codes = gptq_group_codes(
        w, factor, scales, zeros, fmt.group_size, fmt.code_range, kept=kept, kept_values=values
    )
    q = dequantize(codes, scales, zeros, fmt)
    mixed = q.copy()
    mixed[:, kept] = values[:, kept]
    plain = gptq_group_codes(w, gptq_factor(h[None]), scales, zeros, 32, fmt.code_range)
    # the kept columns exact and compensating: far less output error than plain GPTQ
    assert _error(w, mixed, h) < 0.5 * _error(w, dequantize(plain, scales, zeros, fmt), h)
    with pytest.raises(ValueError, match="kept_values"):
        gptq_group_codes(w, factor, scales, zeros, 32, fmt.code_range, kept=kept)


def test_no_kept_columns_leaves_gptq_unchanged() -> None:
    h, w = _problem()
    fmt = GroupwiseFormat(3, 32)
    scales, zeros = group_scales(w, fmt)
    nothing = np.zeros((1, 128), bool)
    a = gptq_group_codes(w, gptq_factor(h[None]), scales, zeros, 32, fmt.code_range)
    b = gptq_group_codes(w, gptq_factor(h[None], last=nothing), scales, zeros, 32, fmt.code_range)
    np.testing.assert_array_equal(a, b)


def test_tied_table_gets_its_own_dampening() -> None:
    from dyadiq.passes.weight_only.layers import find_weights
    from dyadiq.passes.weight_only.quantize import LayerQuantizer, Method, WeightOnlySettings
    from tests.test_weight_only import tied_lm

    layers = find_weights(tied_lm(np.random.default_rng(0))).by_id()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(512, 256)) * rng.uniform(0.1, 5, size=256)
    h = x.T @ x / len(x)
    quantizer = LayerQuantizer(WeightOnlySettings(method=Method.GPTQ), {"d": h, "emb": h})
    head, up = quantizer.factor(layers["head"]), quantizer.factor(layers["up"])
    assert head is not None and up is not None
    np.testing.assert_allclose(head.inverse_factor, gptq_factor(h[None], damp=0.3).inverse_factor)
    np.testing.assert_allclose(up.inverse_factor, gptq_factor(h[None], damp=0.01).inverse_factor)
    with pytest.raises(ConfigError, match="tied-table"):
        WeightOnlySettings(tied_damp=1.0)
