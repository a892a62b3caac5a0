"""The array batch consensus against the record one: same rows, field by field, on random vote sets.

``batch_consensus_arrays`` (annotations.domain.consensus_arrays) replaces ``batch_consensus`` in a project's
bulk recompute for the cheap methods and Dawid-Skene; these tests hold it to ``batch_consensus``'s results
(label, status, vote count and method exactly, the floats to 1e-9) on vote sets with ties, experts and admins,
gold, one suggestion weight, and down-weighted votes of either role, in any order. Dawid-Skene on arrays
(annotations.domain.dawid_skene_crowdkit) is also held to crowd-kit's own fit directly.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotations.domain.consensus import VoteRecord, batch_consensus
from annotations.domain.consensus_arrays import (
    STATUSES,
    ArrayResults,
    VoteArrays,
    batch_consensus_arrays,
)
from annotations.domain.dawid_skene_crowdkit import fit_crowdkit

TOLERANCE = 1e-9
ALL_LABELS = ["a", "b", "c", "d"]
EXPERTS = {100: "expert", 101: "expert", 102: "admin"}


def as_arrays(votes: list[VoteRecord], labels: list[str]) -> VoteArrays:
    index = {label: j for j, label in enumerate(labels)}
    return VoteArrays(
        item=np.array([v.item for v in votes], dtype=np.int64),
        annotator=np.array([v.annotator for v in votes], dtype=np.int64),
        label=np.array([index[v.label] for v in votes], dtype=np.int64),
        expert=np.array([v.is_expert for v in votes], dtype=bool),
        weight=np.array([v.weight for v in votes], dtype=np.float64),
    )


def assert_same(found: ArrayResults, expected: dict, labels: list[str], method: str) -> None:
    assert found.item.tolist() == sorted(expected)
    assert found.method == method
    for row, item in enumerate(found.item.tolist()):
        want = expected[item]
        got_label = labels[found.label[row]] if found.label[row] >= 0 else None
        context = f"item {item}: {want}"
        assert got_label == want.label, context
        assert STATUSES[found.status[row]] == want.status, context
        assert int(found.vote_count[row]) == want.vote_count, context
        assert want.method == method
        assert abs(float(found.confidence[row]) - want.confidence) <= TOLERANCE, context
        assert abs(float(found.agreement[row]) - want.agreement) <= TOLERANCE, context
        assert set(want.posterior) == set(labels)
        for j, label in enumerate(labels):
            assert abs(float(found.posterior[row, j]) - want.posterior[label]) <= TOLERANCE, context


@st.composite
def vote_sets(draw: st.DrawFn) -> tuple[list[VoteRecord], list[str], dict[int, str]]:
    """Votes on up to 12 items by up to 6 students and 3 experts/admins (one vote per pair), labels drawn from a
    few (so ties are frequent), one suggestion weight on some votes, gold on some items, shuffled."""
    labels = ALL_LABELS[: draw(st.integers(1, 4))]
    n_items = draw(st.integers(1, 12))
    used = labels[: draw(st.integers(1, len(labels)))]  # sometimes a label nobody votes for
    weight = draw(st.sampled_from([1.0, 0.5, 0.3, 0.25, 0.7]))
    votes: list[VoteRecord] = []
    for item in range(n_items):
        students = draw(st.lists(st.integers(0, 5), unique=True, max_size=6))
        experts = draw(st.lists(st.sampled_from(sorted(EXPERTS)), unique=True, max_size=2))
        for annotator in students + experts:
            role = EXPERTS.get(annotator, "crowd")
            w = weight if draw(st.integers(0, 3)) == 0 else 1.0
            votes.append(
                VoteRecord(item=item, annotator=annotator, label=draw(st.sampled_from(used)), role=role, weight=w)
            )
    votes = draw(st.permutations(votes))
    gold_items = draw(st.lists(st.integers(0, n_items + 1), unique=True, max_size=4))
    gold = {item: draw(st.sampled_from(labels)) for item in gold_items}
    return list(votes), labels, gold


OPTIONS = st.fixed_dictionaries(
    {
        "votes_required": st.integers(1, 4),
        "expert_weight": st.sampled_from([1.0, 3.0, 2.5]),
        "contested_threshold": st.sampled_from([0.0, 0.34, 0.5, 0.25]),
        "early_confidence": st.sampled_from([None, 0.6, 0.9, 0.5]),
    }
)


def run_both(
    votes: list[VoteRecord],
    labels: list[str],
    gold: dict[int, str],
    method: str,
    options: dict,
    priors: dict[int, dict[str, float]] | None = None,
) -> dict:
    expected = batch_consensus(votes, labels, method=method, gold=gold, priors=priors, **options) if votes else {}
    index = {label: j for j, label in enumerate(labels)}
    priors = priors or {}
    found = batch_consensus_arrays(
        as_arrays(votes, labels),
        len(labels),
        method=method,
        gold_item=np.array(list(gold), dtype=np.int64),
        gold_label=np.array([index[v] for v in gold.values()], dtype=np.int64),
        prior_item=np.array(list(priors), dtype=np.int64),
        prior=np.array([[p.get(label, 0.0) for label in labels] for p in priors.values()]).reshape(-1, len(labels)),
        **options,
    )
    assert_same(found, expected, labels, method)
    return expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vote_sets(), st.sampled_from(["majority", "weighted", "expert_override"]), OPTIONS)
def test_the_cheap_methods_give_batch_consensus_results(case, method, options) -> None:
    votes, labels, gold = case
    run_both(votes, labels, gold, method, options)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vote_sets(), OPTIONS)
def test_dawid_skene_gives_batch_consensus_results(case, options) -> None:
    votes, labels, gold = case
    run_both(votes, labels, gold, "dawid_skene", options)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vote_sets(), OPTIONS)
def test_dawid_skene_with_platform_gold_gives_batch_consensus_results(case, options) -> None:
    """Gold as the platform passes it (the experts' untied decision on gold patches: annotations.consensus)."""
    from annotations.domain.agreement import expert_labels

    votes, labels, gold = case
    decided = expert_labels(votes, labels)
    run_both(votes, labels, {item: decided[item] for item in gold if item in decided}, "dawid_skene", options)


@st.composite
def model_priors(draw: st.DrawFn, labels: list[str], n_items: int) -> dict[int, dict[str, float]]:
    """The model's posterior on some items (and on an item without votes), sometimes sure, sometimes tied or zero."""
    chosen = draw(st.lists(st.integers(0, n_items + 1), unique=True, max_size=n_items + 2))
    weights = st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.9, 1.0])
    return {item: {label: draw(weights) for label in labels} for item in chosen}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vote_sets(), OPTIONS, st.data())
def test_dawid_skene_with_model_priors_gives_batch_consensus_results(case, options, data) -> None:
    """The model prior's early stop (adaptive redundancy weighing the votes by the model's posterior) is the
    same on arrays as on records, and it only ever settles items, never unsettles one."""
    votes, labels, gold = case
    n_items = max((v.item for v in votes), default=0) + 1
    priors = data.draw(model_priors(labels, n_items))
    with_priors = run_both(votes, labels, gold, "dawid_skene", options, priors)
    without = batch_consensus(votes, labels, method="dawid_skene", gold=gold, **options) if votes else {}
    for item, result in with_priors.items():
        before = without[item]
        assert result.posterior == before.posterior  # the prior never moves the votes' own posterior
        if result.status != before.status:
            assert before.status == "pending" and options["early_confidence"] is not None and item in priors
            assert result.label == max(labels, key=lambda label: before.posterior[label])


def test_an_empty_vote_set_has_no_rows() -> None:
    empty = VoteArrays(*(np.zeros(0, dtype=t) for t in (np.int64, np.int64, np.int64, bool, np.float64)))
    assert len(batch_consensus_arrays(empty, 3, method="dawid_skene", votes_required=3)) == 0


def test_two_votes_of_one_annotator_on_an_item_are_refused() -> None:
    votes = [VoteRecord(1, 7, "a", "crowd"), VoteRecord(1, 7, "b", "crowd")]
    with pytest.raises(ValueError, match="more than one vote"):
        batch_consensus_arrays(as_arrays(votes, ["a", "b"]), 2, method="majority", votes_required=1)


def test_two_weights_below_one_are_refused_by_dawid_skene() -> None:
    votes = [VoteRecord(1, 1, "a", "crowd", 0.5), VoteRecord(1, 2, "b", "crowd", 0.25)]
    with pytest.raises(ValueError, match="one weight below 1"):
        batch_consensus_arrays(as_arrays(votes, ["a", "b"]), 2, method="dawid_skene", votes_required=1)


# --- crowd-kit's fit itself -----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_array_fit_is_crowdkits_fit(data: st.DataObject) -> None:
    """Posteriors, priors and the number of EM iterations of crowd-kit's ``DawidSkene(n_iter=100)`` with
    ``true_labels``, including known labels no crowd vote used (crowd-kit adds their column mid-correction)."""
    from crowdkit.aggregation import DawidSkene

    k = data.draw(st.integers(1, 4))
    n_tasks = data.draw(st.integers(1, 30))
    rows = []
    for t in range(n_tasks):
        for w in data.draw(st.lists(st.integers(0, 5), unique=True, min_size=1, max_size=6)):
            rows.append((t, w, data.draw(st.integers(0, max(0, k - 2)) if k > 1 else st.just(0))))
    rows = data.draw(st.permutations(rows))
    known = data.draw(st.lists(st.integers(0, n_tasks - 1), unique=True, max_size=n_tasks))
    truth = {t: data.draw(st.integers(0, k - 1)) for t in known}
    names = [f"l{j}" for j in range(k)]
    frame = pd.DataFrame([(t, w, names[lbl]) for t, w, lbl in rows], columns=["task", "worker", "label"]).astype(object)
    series = (
        pd.Series([names[v] for v in truth.values()], index=pd.Index(list(truth), dtype=object), dtype=object)
        if truth
        else None
    )
    model = DawidSkene(n_iter=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probas = model.fit_predict_proba(frame, true_labels=series)
    want = probas.reindex(columns=names, fill_value=0.0).to_numpy(dtype=float)
    want = want / want.sum(axis=1, keepdims=True)
    want_priors = model.priors_.reindex(names, fill_value=0.0).to_numpy(dtype=float)

    task = np.array([r[0] for r in rows], dtype=np.int64)
    truth_array = np.full(n_tasks, -1, dtype=np.int64)
    for t, v in truth.items():
        truth_array[t] = v
    fit = fit_crowdkit(
        task,
        np.array([r[1] for r in rows], dtype=np.int64),
        np.array([r[2] for r in rows], dtype=np.int64),
        n_tasks=n_tasks,
        n_classes=k,
        truth=truth_array,
        truth_order=np.array(list(truth), dtype=np.int64),
    )
    assert fit.iterations == len(model.loss_history_)
    order = [int(t) for t in probas.index]
    assert np.abs(fit.posteriors[order] - want).max() <= TOLERANCE
    assert np.abs(fit.priors - want_priors).max() <= TOLERANCE
