"""Honest splits in the simulation: a grouped split that leaves a class out says so, and ``stratify``
keeps every class in both the pool and the test set, by group where the groups allow."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from learner.simulation import learning_curves as lc
from learner.simulation.runs import Config, split_rows
from learner.simulation.source import SourceSet


def source(groups_per_class: list[int], per_group: int = 5) -> SourceSet:
    """Class c has groups_per_class[c] groups of per_group images each."""
    labels, groups = [], []
    for c, n in enumerate(groups_per_class):
        for g in range(n):
            labels += [c] * per_group
            groups += [f"c{c}:g{g}"] * per_group
    n = len(labels)
    return SourceSet(
        project=None,  # type: ignore[arg-type]  # the split reads labels and groups only
        class_names=[f"class{c}" for c in range(len(groups_per_class))],
        patch_ids=np.arange(n),
        slide_ids=np.arange(n),
        labels=np.array(labels),
        groups=np.array(groups),
    )


def config(**changes: Any) -> Config:
    return Config(test_fraction=0.2, gold_size=0, **changes)


def classes(src: SourceSet, rows: np.ndarray) -> set[int]:
    return set(src.labels[rows].tolist())


def test_a_grouped_split_that_leaves_a_class_out_of_a_side_says_so() -> None:
    src = source([20, 20, 1])  # class2 lives in one group: it is either all test or all pool
    found = []
    for seed in range(12):
        split = split_rows(src, config(), seed)
        side = "test set" if 2 not in classes(src, split.test_rows) else "training pool"
        assert 2 not in classes(src, split.test_rows) or 2 not in classes(src, split.pool_rows)
        assert any(f"class 'class2' (1 group(s)) has no image in the {side}" in w for w in split.warnings)
        found.append(side)
    assert set(found) == {"test set", "training pool"}  # both happen over seeds


def test_a_split_that_keeps_every_class_has_no_warning_and_is_what_it_always_was() -> None:
    src = source([20, 20, 20])
    split = split_rows(src, config(), 3)
    assert split.warnings == ()
    # Today's split, unchanged: the seeded shuffle of the groups, the first 20% to test.
    rng = np.random.default_rng([3, 104729])
    groups = np.unique(src.groups)
    rng.shuffle(groups)
    assert np.array_equal(split.test_rows, np.flatnonzero(np.isin(src.groups, groups[:12])))


@pytest.mark.parametrize("seed", range(8))
def test_stratify_keeps_every_class_on_both_sides_and_groups_whole(seed: int) -> None:
    src = source([20, 6, 3], per_group=4)
    split = split_rows(src, config(stratify=True), seed)
    assert classes(src, split.test_rows) == classes(src, split.pool_rows) == {0, 1, 2}
    test_groups, pool_groups = set(src.groups[split.test_rows]), set(src.groups[split.pool_rows])
    assert not test_groups & pool_groups  # every class has 3+ groups: nothing was split by image
    assert split.warnings == ()
    assert len(split.test_rows) + len(split.pool_rows) == len(src.labels)
    # Stratified: each class's share of test groups is near the test fraction.
    for c, n_groups in enumerate([20, 6, 3]):
        held = len({g for g in test_groups if g.startswith(f"c{c}:")})
        assert 1 <= held <= max(1, round(0.5 * n_groups))


def test_stratify_splits_a_one_group_class_by_image_and_says_so() -> None:
    src = source([20, 20, 1], per_group=10)
    split = split_rows(src, config(stratify=True), 0)
    assert classes(src, split.test_rows) == classes(src, split.pool_rows) == {0, 1, 2}
    lone = np.flatnonzero(src.labels == 2)
    assert 0 < np.isin(lone, split.test_rows).sum() < len(lone)
    assert any("'class2' lives in one group" in w and "split by image" in w for w in split.warnings)
    # The other classes stay grouped.
    assert not set(src.groups[split.test_rows]) & set(src.groups[split.pool_rows]) - {"c2:g0"}


def test_stratified_gold_groups_never_take_a_class_out_of_the_pool() -> None:
    src = source([20, 3, 3], per_group=4)
    split = split_rows(src, Config(test_fraction=0.2, gold_size=40, gold_per_group=4, stratify=True), 1)
    assert classes(src, split.pool_rows) == classes(src, split.test_rows) == {0, 1, 2}
    assert len(split.gold_rows) > 0 and classes(src, split.gold_rows) == {0, 1, 2}
    assert not set(split.gold_rows.tolist()) & set(split.pool_rows.tolist()) | set(split.test_rows.tolist()) & set(
        split.gold_rows.tolist()
    )
    # Without stratify the same gold size takes whole groups blindly and can empty a class from the pool.
    blind = [split_rows(src, Config(test_fraction=0.2, gold_size=40, gold_per_group=4), s) for s in range(10)]
    assert any(2 not in classes(src, b.pool_rows) or 1 not in classes(src, b.pool_rows) for b in blind)
    assert all(b.warnings for b in blind if classes(src, b.pool_rows) != {0, 1, 2})


def test_the_summary_shouts_the_split_warnings_once_and_suggests_stratify() -> None:
    warning = "seed 0: class 'x' (1 group(s)) has no image in the training pool: no label of it can be asked for"
    rows = [
        {"setting": "oracle", "arm": arm, "seed": 0, "budget": b, "test_accuracy": 0.5, "split_warnings": warning}
        for arm in ("random", "margin")
        for b in (10, 20)
    ]
    text = lc.summary(rows)
    assert text.count(warning) == 1
    assert "WARNING: the split is not whole" in text and "--stratify" in text
    assert "WARNING" not in lc.summary([{**r, "split_warnings": ""} for r in rows])
