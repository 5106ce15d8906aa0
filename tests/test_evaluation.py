"""Metric functions on small hand-made arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dyadiq.errors import ConfigError
from dyadiq.evaluation import classification_metrics, embedding_metrics


def test_classification_identical_is_perfect() -> None:
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    m = classification_metrics(ref, ref.copy(), np.array([0, 1]))
    assert m == {
        "top1_agreement": 1.0,
        "top5_contains_reference_top1": 1.0,
        "logit_cosine": pytest.approx(1.0),
        "accuracy": 1.0,
    }


def test_classification_known_values() -> None:
    ref = np.array(
        [
            [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # ref top1 = 0
            [0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # ref top1 = 1
            [0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0],  # ref top1 = 2
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # ref top1 = 0
        ]
    )
    out = np.array(
        [
            [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # agrees
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0],  # top1 = 5; class 1 ranks 5th -> in top 5
            [0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0],  # class 2 ranks 7th (below 4 zeros? no: ties)
            [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # top1 = 1 (first max); class 0 is last
        ]
    )
    labels = np.array([0, 5, 1, 0])
    m = classification_metrics(ref, out, labels)
    assert m["top1_agreement"] == pytest.approx(0.25)
    # Row 3: 4 classes score strictly higher than class 2 -> rank 5 -> contained.
    # Row 4: 6 classes score higher than class 0 -> not contained.
    assert m["top5_contains_reference_top1"] == pytest.approx(0.75)
    cosines = [1.0, 1 / math.sqrt(55), 0.0, -1.0]
    assert m["logit_cosine"] == pytest.approx(np.mean(cosines))
    assert m["accuracy"] == pytest.approx(0.5)  # rows 1 and 2


def test_classification_without_labels_has_no_accuracy() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    m = classification_metrics(ref, ref[::-1].copy(), None)
    assert "accuracy" not in m
    assert m["top1_agreement"] == 0.0
    assert m["top5_contains_reference_top1"] == 1.0  # only 2 classes: top-2 holds everything
    assert m["logit_cosine"] == pytest.approx(0.0)


def test_classification_flattens_extra_dims_and_checks_shapes() -> None:
    ref = np.zeros((2, 1, 3))
    ref[0, 0, 2] = 1
    ref[1, 0, 1] = 1
    assert classification_metrics(ref, ref, None)["top1_agreement"] == 1.0
    with pytest.raises(ConfigError, match="shape mismatch"):
        classification_metrics(np.zeros((2, 3)), np.zeros((3, 3)), None)
    with pytest.raises(ConfigError, match="labels"):
        classification_metrics(np.eye(3), np.eye(3), np.array([0, 1]))


def test_embedding_identical_is_perfect() -> None:
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 4))
    m = embedding_metrics(e, e.copy())
    assert m["mean_cosine"] == pytest.approx(1.0)
    assert m["min_cosine"] == pytest.approx(1.0)
    assert m["nn_agreement"] == 1.0
    assert m["similarity_spearman"] == pytest.approx(1.0)


def test_embedding_scale_invariant_cosine() -> None:
    e = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    m = embedding_metrics(e, 3.0 * e)
    assert m["mean_cosine"] == pytest.approx(1.0)
    assert m["nn_agreement"] == 1.0


def test_embedding_known_values() -> None:
    # Reference: unit-circle points at 0, 10, 90 and 105 degrees (two tight pairs).
    ang = np.deg2rad([0.0, 10.0, 90.0, 105.0])
    ref = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    # Candidate: the last point moves to 175 degrees.
    ang2 = np.deg2rad([0.0, 10.0, 90.0, 175.0])
    out = np.stack([np.cos(ang2), np.sin(ang2)], axis=1)
    m = embedding_metrics(ref, out)
    assert m["mean_cosine"] == pytest.approx((3.0 + np.cos(np.deg2rad(70.0))) / 4)
    assert m["min_cosine"] == pytest.approx(np.cos(np.deg2rad(70.0)))
    # NN in ref: 0->1, 1->0, 2->3, 3->2. In out: 0->1, 1->0, 2->1 (80 deg beats 85),
    # 3->2 (85 deg beats 165). Points 0, 1 and 3 agree.
    assert m["nn_agreement"] == pytest.approx(0.75)
    # Pair angles (01, 02, 03, 12, 13, 23): ref 10, 90, 105, 80, 95, 15 -> ranks 1 4 6 3 5 2;
    # out 10, 90, 175, 80, 165, 85 -> ranks 1 4 6 2 5 3. sum d^2 = 2, rho = 1 - 6*2/(6*35).
    assert m["similarity_spearman"] == pytest.approx(1 - 12 / 210)


def test_embedding_reversed_similarity_order_is_negative() -> None:
    ang = np.deg2rad([0.0, 30.0, 100.0])
    ref = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    m = embedding_metrics(ref, -ref)
    assert m["mean_cosine"] == pytest.approx(-1.0)
    assert m["similarity_spearman"] == pytest.approx(1.0)  # negation keeps pairwise similarities


def test_embedding_small_sets_are_nan_not_errors() -> None:
    one = np.array([[1.0, 0.0]])
    m = embedding_metrics(one, one)
    assert m["mean_cosine"] == pytest.approx(1.0)
    assert math.isnan(m["nn_agreement"])
    assert math.isnan(m["similarity_spearman"])


def test_zero_vectors_count_as_identical_not_nan() -> None:
    z = np.zeros((2, 3))
    m = classification_metrics(z, z, None)
    assert m["logit_cosine"] == 1.0
