"""The array Dawid-Skene fit (annotations.domain.dawid_skene) against crowd-kit's, which the batch consensus
uses, and the value-routing rule (annotations.domain.value_routing) on crowds whose accuracy is known."""

from __future__ import annotations

import numpy as np
import pytest

from annotations.domain.consensus import VoteRecord, fit_dawid_skene
from annotations.domain.dawid_skene import confusion_from_counts, fit_arrays
from annotations.domain.value_routing import crowd_outcome, route, top_two_kappa

LABELS = ["a", "b", "c"]


def simulated(seed: int = 0, n_items: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """(votes as item, worker, label rows; true labels): 3 of 6 workers of accuracy 0.9 ... 0.4 per item."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, n_items)
    accuracy = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    rows = []
    for item in range(n_items):
        for worker in rng.choice(6, 3, replace=False):
            wrong = [c for c in range(3) if c != truth[item]]
            label = truth[item] if rng.random() < accuracy[worker] else rng.choice(wrong)
            rows.append((item, worker, label))
    return np.array(rows), truth


def test_the_array_fit_learns_what_crowdkit_learns() -> None:
    votes, truth = simulated()
    known = np.full(len(truth), -1)
    known[:30] = truth[:30]
    fit = fit_arrays(votes[:, 0], votes[:, 1], votes[:, 2], n_items=len(truth), n_workers=6, n_classes=3, truth=known)
    records = [VoteRecord(item=int(i), annotator=int(w), label=LABELS[c], role="crowd") for i, w, c in votes]
    reference = fit_dawid_skene(records, LABELS, truth={i: LABELS[truth[i]] for i in range(30)})
    for worker in range(6):
        assert np.allclose(fit.confusion[worker], np.array(reference.confusion[worker]), atol=0.02)
    posteriors = np.array([[reference.posteriors[i][label] for label in LABELS] for i in range(len(truth))])
    assert (fit.posteriors.argmax(axis=1) == posteriors.argmax(axis=1)).mean() > 0.99
    assert (fit.posteriors[:30].argmax(axis=1) == truth[:30]).all()  # clamped to the known labels
    # The workers come out in their true order of accuracy.
    accuracy = np.einsum("wii->w", fit.confusion) / 3
    assert list(np.argsort(-accuracy)) == [0, 1, 2, 3, 4, 5]


def test_a_warm_start_converges_in_fewer_iterations_to_the_same_fit() -> None:
    votes, truth = simulated(seed=1)
    args = (votes[:, 0], votes[:, 1], votes[:, 2])
    sizes = {"n_items": len(truth), "n_workers": 6, "n_classes": 3}
    cold = fit_arrays(*args, **sizes, max_iter=500, tol=1e-7)
    warm = fit_arrays(*args, **sizes, warm_confusion=cold.confusion, warm_priors=cold.priors, max_iter=500, tol=1e-7)
    assert cold.converged and warm.converged and warm.iterations < cold.iterations / 2
    assert np.allclose(warm.confusion, cold.confusion, atol=1e-4)


def test_the_deadline_stops_the_fit() -> None:
    votes, truth = simulated(seed=2)
    fit = fit_arrays(
        votes[:, 0], votes[:, 1], votes[:, 2], n_items=len(truth), n_workers=6, n_classes=3, tol=0.0, deadline=0.0
    )
    assert (fit.iterations, fit.converged) == (1, False)


def test_a_weight_scales_a_vote_and_bad_labels_are_refused() -> None:
    item, worker, label = np.array([0, 0]), np.array([0, 1]), np.array([0, 1])
    sizes = {"n_items": 1, "n_workers": 2, "n_classes": 3, "max_iter": 1}
    even = fit_arrays(item, worker, label, **sizes)
    leaning = fit_arrays(item, worker, label, weight=np.array([1.0, 0.5]), **sizes)
    assert even.posteriors[0, 0] == pytest.approx(even.posteriors[0, 1])
    assert leaning.posteriors[0, 0] > leaning.posteriors[0, 1]
    with pytest.raises(ValueError, match="outside the label set"):
        fit_arrays(item, worker, np.array([0, 3]), **sizes)


def test_confusion_rows_without_evidence_are_uniform() -> None:
    counts = np.array([[[4.0, 1.0], [0.0, 0.0]]])
    matrix = confusion_from_counts(counts)
    assert np.allclose(matrix[0, 1], [0.5, 0.5]) and matrix[0, 0, 0] == pytest.approx(0.8, abs=1e-5)


def symmetric(accuracy: float, k: int = 3) -> np.ndarray:
    matrix = np.full((k, k), (1 - accuracy) / (k - 1))
    np.fill_diagonal(matrix, accuracy)
    return matrix


def test_the_crowd_outcome_follows_the_students_accuracy_and_adaptive_redundancy() -> None:
    priors = np.full(3, 1 / 3)
    options = {"votes_required": 5, "contested_threshold": 0.34}
    good = crowd_outcome(symmetric(0.9), priors, early_confidence=None, **options)
    poor = crowd_outcome(symmetric(0.5), priors, early_confidence=None, **options)
    assert (good.right > 0.97).all() and (good.votes == 5).all() and (good.contested < poor.contested).all()
    adaptive = crowd_outcome(symmetric(0.9), priors, early_confidence=0.9, **options)
    # Two agreeing votes settle most patches: P(agree on two) = 0.81 + 2 * 0.05**2.
    assert adaptive.votes == pytest.approx(2 * 0.815 + 5 * 0.185, abs=0.25)


def test_route_sends_a_patch_to_experts_only_where_the_crowd_is_a_poor_buy() -> None:
    priors = np.full(3, 1 / 3)
    p = np.array([[0.5, 0.0, 0.5], [0.34, 0.33, 0.33], [0.98, 0.01, 0.01]])
    outcome = crowd_outcome(symmetric(0.45), priors, votes_required=3, contested_threshold=0.34, early_confidence=None)
    poor = route(p, symmetric(0.45), outcome, expert_cost=10, crowd_cost=1, labels=LABELS)
    # Even on the almost certain patch: such a crowd would leave its label worse than the model's own guess.
    assert poor.to_expert.tolist() == [True, True, True]
    certain = route(np.array([[1.0, 0.0, 0.0]]), symmetric(0.45), outcome, expert_cost=10, crowd_cost=1, labels=LABELS)
    assert certain.to_expert.tolist() == [False]  # nothing for an expert to add: the cheaper crowd
    assert poor.reasons[0].startswith("expert: crowd expected right") and "on a vs c" in poor.reasons[0]
    outcome = crowd_outcome(symmetric(0.9), priors, votes_required=3, contested_threshold=0.34, early_confidence=None)
    good = route(p, symmetric(0.9), outcome, expert_cost=10, crowd_cost=1, labels=LABELS)
    assert not good.to_expert.any()
    # With experts as cheap as three crowd votes, even a good crowd is the poorer buy on an open question.
    cheap = route(p, symmetric(0.9), outcome, expert_cost=2, crowd_cost=1, labels=LABELS)
    assert cheap.to_expert.tolist()[:2] == [True, True]


def test_top_two_kappa() -> None:
    kappa, a, b = top_two_kappa(np.array([[0.1, 0.6, 0.3]]), symmetric(1.0))
    assert (kappa[0], a[0], b[0]) == (pytest.approx(1.0), 1, 2)
    chance = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert top_two_kappa(np.array([[0.6, 0.4, 0.0]]), chance)[0][0] == pytest.approx(0.0)
