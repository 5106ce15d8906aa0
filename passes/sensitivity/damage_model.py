"""A sensitivity report as a damage model over plans: one layer's predicted damage at a width
under a proxy, a pair's cross term, a whole plan's predicted damage.

Pair terms are measured in the empirical loss's units; under another proxy a pair contributes
the same *relative* interaction, r_ab = c_ab / (D_a + D_b) (c_ab the safe cross term of
``pairs.py``, D the measured single-layer losses it was taken with), times that proxy's own
single-layer damages: P_a + P_b + r_ab (P_a + P_b). Under the empirical proxy that is c_ab
itself; under SNR or entropy, whose units are not a loss, it still reads as "this pair hurts
20% more together than apart".
"""

from __future__ import annotations

from collections.abc import Mapping

from dyadiq.errors import ConfigError
from dyadiq.passes.sensitivity.pairs import PairModel, safe_cross_term
from dyadiq.passes.sensitivity.proxy import Proxy
from dyadiq.passes.sensitivity.report import LayerSensitivity, PairTerm, SensitivityReport

# what an analysis needs to compute each proxy, for the error when a report lacks one
_HOW_TO_GET = {
    "hessian_damage": "--proxy trace (SensitivityConfig(trace=True))",
    "empirical_damage": "SensitivityConfig(empirical=True)",
    "snr_db": "SensitivityConfig(empirical=True)",
    "eigen_damage": "analyze --gradients (SensitivityConfig(gradients=True))",
    "fisher_damage": "analyze --gradients (SensitivityConfig(gradients=True))",
    "taylor_damage": "analyze --gradients, on a model with a labelled task loss (not embeddings)",
    "entropy_damage": "SensitivityConfig(entropy=True)",
}


class MissingProxyError(ConfigError):
    """The sensitivity report has no data for the chosen proxy: pricing every layer at 0
    would let the allocator pick the narrowest widths for free."""


def layer_damage(layer: LayerSensitivity, bits: int, proxy: Proxy | str) -> float:
    """One layer's predicted damage at ``bits`` weight bits (0 when left in float, at 32
    bits). Raises :class:`MissingProxyError` when the report lacks that proxy."""
    chosen = Proxy.parse(proxy)
    values: Mapping[int, float] = getattr(layer, chosen.damage_field)
    if not values:
        raise MissingProxyError(
            f"the sensitivity report has no {chosen.base.value} damage for this {layer.op} "
            f"layer: rerun the analysis with {_HOW_TO_GET[chosen.damage_field]}, or choose "
            "another proxy"
        )
    if chosen.base is Proxy.SNR:
        return 10 ** (-values.get(bits, 300.0) / 10) if bits < 32 else 0.0
    return values.get(bits, 0.0)


def relative_interaction(
    term: PairTerm, *, z: float = 2.0, model: PairModel = PairModel.NONNEGATIVE
) -> float:
    """r_ab: the safe cross term as a fraction of the pair's summed single-layer losses."""
    singles = term.single_a + term.single_b
    if singles <= 0:
        return 0.0
    cross = safe_cross_term(term.delta, term.stderr, term.single_a, term.single_b, z=z, model=model)
    return cross / singles


def pair_damage(
    report: SensitivityReport,
    term: PairTerm,
    proxy: Proxy | str = Proxy.EMPIRICAL_PAIRS,
    *,
    model: PairModel = PairModel.NONNEGATIVE,
) -> float:
    """The cross term one measured pair adds, at its own widths, under ``proxy``."""
    chosen = Proxy.parse(proxy)
    z = float(report.settings.get("pair_noise_z", 2.0))
    r = relative_interaction(term, z=z, model=model)
    if r == 0.0:
        return 0.0
    own = layer_damage(report.layers[term.a], term.bits_a, chosen) + layer_damage(
        report.layers[term.b], term.bits_b, chosen
    )
    return r * own


def pair_terms_at(report: SensitivityReport, bits: Mapping[str, int]) -> list[PairTerm]:
    """The measured terms that apply to a plan: both layers at the widths they were measured
    at (a layer at an unmeasured width interacts with nothing in the model)."""
    return [
        p for p in report.pairs if bits.get(p.a, 8) == p.bits_a and bits.get(p.b, 8) == p.bits_b
    ]


def predict_damage(
    report: SensitivityReport,
    bits: Mapping[str, int],
    proxy: Proxy | str,
    *,
    pair_model: PairModel = PairModel.NONNEGATIVE,
) -> float:
    """Predicted damage of giving each layer ``bits[layer]`` weight bits (8 where absent)."""
    chosen = Proxy.parse(proxy)
    total = sum(layer_damage(layer, bits.get(i, 8), chosen) for i, layer in report.layers.items())
    if chosen.with_pairs:
        total += sum(
            pair_damage(report, p, chosen, model=pair_model) for p in pair_terms_at(report, bits)
        )
    return total
