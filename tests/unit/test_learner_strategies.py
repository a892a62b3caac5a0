"""Query strategies on hand-made probability and embedding arrays."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from learner.core.errors import Cancelled, LearnerError
from learner.core.strategies import (
    RANDOM_ARM,
    cold_start,
    entropy,
    interleave,
    kcenter_greedy,
    least_confidence,
    margin,
    select_batch,
)

PROBA = np.array(
    [
        [0.98, 0.01, 0.01],  # 0 certain
        [0.34, 0.33, 0.33],  # 1 nearly uniform: most uncertain by every measure
        [0.50, 0.495, 0.005],  # 2 two-way tie: smallest margin, not the highest entropy
        [0.70, 0.20, 0.10],  # 3
        [0.90, 0.05, 0.05],  # 4
        [0.40, 0.30, 0.30],  # 5 high entropy, large-ish margin
    ]
)


def test_least_confidence_is_one_minus_top_probability() -> None:
    np.testing.assert_allclose(least_confidence(PROBA), 1 - PROBA.max(axis=1))


def test_margin_is_highest_for_the_closest_two_way_tie() -> None:
    scores = margin(PROBA)
    np.testing.assert_allclose(scores[2], 1 - (0.50 - 0.495))
    assert int(np.argmax(scores)) == 2
    assert int(np.argmin(scores)) == 0


def test_entropy_is_in_nats_and_highest_for_the_flattest_row() -> None:
    scores = entropy(PROBA)
    assert int(np.argmax(scores)) == 1
    np.testing.assert_allclose(entropy(np.array([[0.5, 0.5]])), [np.log(2)])
    np.testing.assert_allclose(entropy(np.array([[1.0, 0.0]])), [0.0])


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [("least_confidence", [1, 5, 2]), ("margin", [2, 1, 5]), ("entropy", [1, 5, 3])],
)
def test_uncertainty_strategies_pick_the_known_top_items_in_order(strategy: str, expected: list[int]) -> None:
    picks = select_batch(strategy, 3, proba=PROBA, random_fraction=0.0, rng=0)
    assert [p.index for p in picks] == expected
    assert {p.arm for p in picks} == {strategy}
    assert [p.score for p in picks] == sorted((p.score for p in picks), reverse=True)  # type: ignore[type-var]


def test_control_arm_fraction_is_honoured_and_every_item_is_named() -> None:
    rng = np.random.default_rng(1)
    proba = rng.dirichlet(np.ones(3), size=500)
    picks = select_batch("entropy", 40, proba=proba, random_fraction=0.25, rng=7)
    assert Counter(p.arm for p in picks) == {"entropy": 30, RANDOM_ARM: 10}
    assert len({p.index for p in picks}) == 40  # no item chosen twice
    # the strategy arm is the top of the pool outside the random picks
    scores = entropy(proba)
    random_idx = {p.index for p in picks if p.arm == RANDOM_ARM}
    rest = [i for i in np.argsort(-scores) if i not in random_idx][:30]
    assert sorted(p.index for p in picks if p.arm == "entropy") == sorted(rest)


def test_random_arm_is_spread_through_the_batch_not_appended() -> None:
    picks = select_batch("margin", 20, proba=np.random.default_rng(0).dirichlet(np.ones(3), 200), rng=0)
    positions = [i for i, p in enumerate(picks) if p.arm == RANDOM_ARM]
    assert len(positions) == 2
    assert positions[0] < 10 <= positions[1]


def test_random_control_arm_is_uniform_over_the_pool() -> None:
    proba = np.tile([[0.9, 0.1]], (10, 1))
    proba[0] = [0.5, 0.5]  # the strategy always wants item 0
    hits = np.zeros(10)
    for seed in range(2000):
        for p in select_batch("least_confidence", 2, proba=proba, random_fraction=0.5, rng=seed):
            if p.arm == RANDOM_ARM:
                hits[p.index] += 1
    # drawn before the strategy arm, so item 0 is as likely as any other
    assert hits.min() > 150 and hits.max() < 250


def test_random_strategy_returns_only_random_arm_items() -> None:
    picks = select_batch("random", 5, proba=PROBA, rng=3)
    assert {p.arm for p in picks} == {RANDOM_ARM}
    assert len({p.index for p in picks}) == 5


def test_batch_is_capped_at_the_pool_size() -> None:
    assert len(select_batch("entropy", 50, proba=PROBA, rng=0)) == len(PROBA)


def blobs(centres: np.ndarray, per: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + rng.normal(0, spread, size=(per, centres.shape[1])) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(len(centres)), per)


CENTRES = np.array([[0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]], dtype=float)


@pytest.mark.parametrize("method", ["kmeans", "kcenter"])
def test_cold_start_picks_one_item_from_each_cluster(method: str) -> None:
    # unequal cluster sizes: a random batch of 5 would very likely miss a small cluster
    x, cluster = blobs(CENTRES, 40, 0.3)
    keep = np.concatenate([np.arange(0, 40), np.arange(40, 200, 8)])  # 40 in cluster 0, 5 in each of the others
    x, cluster = x[keep], cluster[keep]
    picks = cold_start(x, 5, method=method, random_fraction=0.0, rng=0)  # type: ignore[arg-type]
    assert sorted(cluster[[p.index for p in picks]]) == [0, 1, 2, 3, 4]
    assert {p.arm for p in picks} == {f"cold_start_{method}"}


def test_cold_start_keeps_a_random_control_arm() -> None:
    x, _ = blobs(CENTRES, 30, 0.3)
    picks = cold_start(x, 10, random_fraction=0.2, rng=0)
    assert Counter(p.arm for p in picks) == {"cold_start_kmeans": 8, RANDOM_ARM: 2}


def test_kcenter_with_labelled_centres_goes_to_the_unlabelled_cluster_first() -> None:
    x, cluster = blobs(CENTRES[:3], 20, 0.3)
    labelled = np.concatenate([x[cluster == 0][:5], x[cluster == 1][:5]])  # clusters 0 and 1 already labelled
    picks = select_batch("kcenter", 1, embeddings=x, labelled_embeddings=labelled, random_fraction=0.0, rng=0)
    assert cluster[picks[0].index] == 2
    assert picks[0].score is not None and picks[0].score > 5


def test_kcenter_greedy_covers_the_square_corners() -> None:
    square = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0.5, 0.5], [0.5, 0.45]], dtype=np.float32)
    idx, _ = kcenter_greedy(square, 5, np.arange(6))
    assert idx[0] in (4, 5)  # nearest the mean first
    assert set(idx[1:].tolist()) == {0, 1, 2, 3}


def test_diverse_strategy_takes_the_most_uncertain_item_of_each_cluster() -> None:
    x, cluster = blobs(CENTRES[:3], 30, 0.2)
    proba = np.tile([[0.95, 0.05]], (len(x), 1))
    proba[:30, 0] = np.linspace(0.55, 0.9, 30)  # cluster 0 is the most uncertain overall
    proba[30:60, 0] = np.linspace(0.6, 0.9, 30)
    proba[60:, 0] = np.linspace(0.7, 0.9, 30)
    proba[:, 1] = 1 - proba[:, 0]
    picks = select_batch("diverse", 3, proba=proba, embeddings=x, random_fraction=0.0, rng=0, uncertainty="margin")
    # plain margin sampling would take three items from cluster 0
    assert sorted(cluster[[p.index for p in picks]]) == [0, 1, 2]
    assert sorted(p.index for p in picks) == [0, 30, 60]


def test_strategies_refuse_missing_inputs_with_a_clear_message() -> None:
    with pytest.raises(LearnerError, match="needs class probabilities"):
        select_batch("entropy", 3, embeddings=np.zeros((5, 2)))
    with pytest.raises(LearnerError, match="Unknown query strategy 'bald'"):
        select_batch("bald", 3, proba=PROBA)
    with pytest.raises(LearnerError, match="same pool"):
        select_batch("diverse", 3, proba=PROBA, embeddings=np.zeros((5, 2)))
    with pytest.raises(LearnerError, match="random_fraction"):
        select_batch("margin", 3, proba=PROBA, random_fraction=1.5)


def test_selection_is_cancelled_when_asked_to_stop() -> None:
    x, _ = blobs(CENTRES, 50, 0.3)
    calls = iter([False, False, True])
    with pytest.raises(Cancelled):
        select_batch("kcenter", 20, embeddings=x, random_fraction=0.0, should_stop=lambda: next(calls, True))


def test_interleave_keeps_every_item_once() -> None:
    from learner.core.strategies import Selection

    s = [Selection(i, "margin", 1.0) for i in range(7)]
    r = [Selection(100 + i, RANDOM_ARM, None) for i in range(3)]
    out = interleave(s, r)
    assert sorted(x.index for x in out) == sorted(x.index for x in s + r)
    assert [x.index for x in out if x.arm == "margin"] == list(range(7))
