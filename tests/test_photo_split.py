"""benchmarks.photo_split: scores and paired comparisons clustered by photo (no model runs)."""

from __future__ import annotations

import numpy as np

from benchmarks.photo_split import SplitScores


def _scores(a: list[int], b: list[int], photo: list[int]) -> SplitScores:
    return SplitScores({"a": np.asarray(a, bool), "b": np.asarray(b, bool)}, np.asarray(photo))


def test_identical_models_differ_by_exactly_zero() -> None:
    s = _scores([1, 0, 1, 1], [1, 0, 1, 1], [0, 0, 1, 1])
    paired = s.paired("a", "b")
    assert paired["difference"] == 0.0
    assert paired["standard_error"] == 0.0
    assert paired["p_not_worse"] == 1.0


def test_a_model_better_on_every_photo_is_never_worse() -> None:
    photo = [p for p in range(6) for _ in range(4)]
    a = [1] * 24
    b = [1, 1, 1, 0] * 6  # one miss per photo
    s = _scores(a, b, photo)
    paired = s.paired("a", "b")
    assert np.isclose(paired["difference"], 0.25)
    assert paired["ci95_low"] > 0 and paired["p_not_worse"] == 1.0
    assert np.isclose(s.agreement("b"), 0.75)


def test_the_bootstrap_resamples_photos_not_crops() -> None:
    """All misses on one photo: the clustered error is that of 4 photos, larger than the
    binomial error of 16 independent crops would be."""
    photo = [p for p in range(4) for _ in range(4)]
    a = [0] * 4 + [1] * 12
    s = _scores(a, a, photo)
    binomial = np.sqrt(0.75 * 0.25 / 16)
    assert s.standard_error("a") > 1.3 * binomial
