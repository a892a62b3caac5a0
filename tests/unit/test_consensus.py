"""Consensus per patch: cheap per-vote methods, batch methods (crowd-kit) and the status rules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annotations.domain.consensus import (
    CHEAP_METHODS,
    ITERATIVE_METHODS,
    ConsensusResult,
    VoteRecord,
    batch_consensus,
    consensus_for_item,
    fit_dawid_skene,
)

LABELS = ["a", "b", "c"]
STATUSES = {"pending", "agreed", "contested", "expert"}


def crowd(item: int | str, annotator: int | str, label: str) -> VoteRecord:
    return VoteRecord(item=item, annotator=annotator, label=label, role="crowd")


def expert(item: int | str, annotator: int | str, label: str, role: str = "expert") -> VoteRecord:
    return VoteRecord(item=item, annotator=annotator, label=label, role=role)


def one(votes: list[VoteRecord], method: str = "majority", votes_required: int = 3, **kw: float) -> ConsensusResult:
    return consensus_for_item(votes, LABELS, method=method, votes_required=votes_required, **kw)  # type: ignore[arg-type]


# --- cheap methods and statuses -------------------------------------------------------------------


def test_it_takes_the_majority_label_and_reports_its_share() -> None:
    result = one([crowd(1, 1, "b"), crowd(1, 2, "b"), crowd(1, 3, "a")])
    assert (result.label, result.status, result.method) == ("b", "agreed", "majority")
    assert result.vote_count == 3
    assert result.agreement == pytest.approx(2 / 3)
    assert result.confidence == pytest.approx(2 / 3)
    assert result.posterior == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 0.0})


def test_it_breaks_a_tie_by_label_order_and_marks_it_contested() -> None:
    result = one([crowd(1, 1, "c"), crowd(1, 2, "b")], votes_required=2, contested_threshold=0.9)
    assert result.label == "b"  # "b" comes before "c" in the project's label order
    assert result.status == "contested"  # even with a threshold that a 50% split would pass


def test_it_marks_all_disagreeing_votes_as_contested() -> None:
    result = one([crowd(1, 1, "c"), crowd(1, 2, "b"), crowd(1, 3, "a")])
    assert (result.label, result.status) == ("a", "contested")
    assert result.agreement == pytest.approx(1 / 3)


def test_it_leaves_a_single_crowd_vote_pending_without_a_label() -> None:
    result = one([crowd(1, 1, "c")], votes_required=3)
    assert (result.label, result.status, result.confidence, result.agreement) == (None, "pending", 0.0, 0.0)
    assert result.posterior["c"] == 1.0  # the interim leaning stays visible


def test_it_agrees_on_a_single_vote_when_one_vote_is_required() -> None:
    assert one([crowd(1, 1, "c")], votes_required=1).status == "agreed"


def test_it_calls_two_to_one_agreed_at_the_default_threshold_and_contested_below_a_third() -> None:
    votes = [crowd(1, 1, "a"), crowd(1, 2, "a"), crowd(1, 3, "b")]
    assert one(votes).status == "agreed"
    assert one(votes, contested_threshold=0.3).status == "contested"


def test_it_lets_any_expert_vote_decide_under_expert_override() -> None:
    votes = [crowd(1, 1, "a"), crowd(1, 2, "a"), crowd(1, 3, "a"), expert(1, 9, "c")]
    result = one(votes, method="expert_override")
    assert (result.label, result.status) == ("c", "expert")
    assert result.agreement == pytest.approx(1 / 4)


def test_it_falls_back_to_the_crowd_majority_without_an_expert_under_expert_override() -> None:
    result = one([crowd(1, 1, "c"), crowd(1, 2, "c"), crowd(1, 3, "a")], method="expert_override")
    assert (result.label, result.status) == ("c", "agreed")


def test_it_treats_an_admin_vote_as_an_expert_vote() -> None:
    result = one([crowd(1, 1, "a"), expert(1, 9, "b", role="admin")], method="expert_override")
    assert (result.label, result.status) == ("b", "expert")


def test_it_lets_a_weighted_expert_vote_flip_the_crowd_majority() -> None:
    votes = [crowd(1, 1, "a"), crowd(1, 2, "a"), expert(1, 9, "b")]
    assert one(votes, method="majority").label == "a"
    flipped = one(votes, method="weighted", expert_weight=3.0)
    assert (flipped.label, flipped.status) == ("b", "expert")
    assert flipped.posterior["b"] == pytest.approx(3 / 5)
    assert one(votes, method="weighted", expert_weight=1.5).label == "a"


def test_it_marks_an_outvoted_expert_as_contested() -> None:
    result = one([crowd(1, 1, "a"), crowd(1, 2, "a"), expert(1, 9, "b")], method="majority")
    assert (result.label, result.status) == ("a", "contested")


def test_it_decides_an_item_with_only_expert_votes() -> None:
    result = one([expert(1, 9, "c")], votes_required=3)
    assert (result.label, result.status, result.vote_count, result.agreement) == ("c", "expert", 1, 1.0)


def test_it_marks_experts_who_tie_among_themselves_as_contested() -> None:
    result = one([expert(1, 8, "c"), expert(1, 9, "b")], method="expert_override")
    assert (result.label, result.status) == ("b", "contested")


def test_it_records_the_weighted_interim_result_for_an_iterative_method() -> None:
    for method in ITERATIVE_METHODS:
        result = one([crowd(1, 1, "a"), crowd(1, 2, "a"), expert(1, 9, "b")], method=method)
        assert (result.method, result.label) == ("weighted", "b")


def test_it_accepts_string_ids_and_an_annotator_seen_only_once() -> None:
    result = one([crowd("p-1", "u-new", "a"), crowd("p-1", "u-2", "a"), crowd("p-1", "u-3", "a")])
    assert (result.item, result.label, result.status, result.agreement) == ("p-1", "a", "agreed", 1.0)


# --- bad input ------------------------------------------------------------------------------------


def test_it_rejects_a_vote_with_an_unknown_label() -> None:
    with pytest.raises(ValueError, match=r"label 'z'.*not one of the project's labels"):
        one([crowd(1, 1, "a"), crowd(1, 2, "z")])


def test_it_rejects_a_second_vote_from_the_same_annotator() -> None:
    with pytest.raises(ValueError, match="more than one vote on item 1"):
        one([crowd(1, 1, "a"), crowd(1, 1, "b")])


@pytest.mark.parametrize(
    ("votes", "options", "message"),
    [
        ([], {}, "at least one vote"),
        ([crowd(1, 1, "a"), crowd(2, 1, "a")], {}, "several items"),
        ([VoteRecord(1, 1, "a", "guest")], {}, "role 'guest'"),
        ([crowd(1, 1, "a")], {"method": "vibes"}, "Unknown consensus method 'vibes'"),
        ([crowd(1, 1, "a")], {"votes_required": 0}, "votes_required"),
        ([crowd(1, 1, "a")], {"expert_weight": 0.0}, "expert_weight"),
    ],
)
def test_it_rejects_unusable_input_with_a_clear_message(votes: list[VoteRecord], options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        one(votes, **options)


def test_it_rejects_a_gold_label_outside_the_label_set() -> None:
    with pytest.raises(ValueError, match="Gold labels"):
        batch_consensus([crowd(1, 1, "a")], LABELS, method="dawid_skene", votes_required=1, gold={1: "z"})


# --- batch methods --------------------------------------------------------------------------------


def biased_crowd_votes() -> tuple[list[VoteRecord], dict[int, str], dict[int, str]]:
    """Two reliable annotators outvoted on class "a" by three who always answer "b" for an "a".

    Items 0-9 are "a", 10-19 "b", 20-29 "c"; every item has all five votes. Majority vote gets every "a"
    item wrong; the biased annotators are right on "b" and "c", so only their confusion matrix gives them away.
    Returns votes, the truth and a gold set of three "a" items.
    """
    truth = {i: "abc"[i // 10] for i in range(30)}
    votes = []
    for item, label in truth.items():
        votes += [crowd(item, "r1", label), crowd(item, "r2", label)]
        votes += [crowd(item, b, "b" if label == "a" else label) for b in ("x1", "x2", "x3")]
    return votes, truth, {0: "a", 1: "a", 2: "a"}


def test_it_recovers_the_truth_with_dawid_skene_where_majority_vote_fails() -> None:
    votes, truth, gold = biased_crowd_votes()
    majority = batch_consensus(votes, LABELS, method="majority", votes_required=3)
    seeded = batch_consensus(votes, LABELS, method="dawid_skene", votes_required=3, gold=gold)
    a_items = [i for i, label in truth.items() if label == "a" and i not in gold]
    assert all(majority[i].label == "b" for i in a_items)
    assert all(seeded[i].label == truth[i] for i in truth)
    assert all(seeded[i].method == "dawid_skene" and seeded[i].confidence > 0.9 for i in a_items)
    assert all(seeded[i].status == "expert" for i in gold)
    assert all(seeded[i].status == "contested" for i in a_items)  # 3 of 5 crowd votes disagree with the label


def test_it_learns_from_gold_that_the_crowd_calls_every_a_a_b() -> None:
    # Items 0-9 are "a" but all three annotators answer "b", exactly as on the "b" items 10-19: the votes
    # alone cannot show the mistake, only the gold labels on items 0-4 can.
    truth = {i: "abc"[i // 10] for i in range(30)}
    votes = [crowd(i, w, "b" if label == "a" else label) for i, label in truth.items() for w in ("x1", "x2", "x3")]
    gold = dict.fromkeys(range(5), "a")
    unseeded = fit_dawid_skene(votes, LABELS)
    seeded = fit_dawid_skene(votes, LABELS, truth=gold)
    a, b = LABELS.index("a"), LABELS.index("b")
    assert seeded.confusion["x1"][a][b] > 0.95  # "when the truth is a, x1 answers b"
    assert unseeded.confusion["x1"][a] == pytest.approx([1 / 3] * 3)  # never saw an "a": no evidence
    assert seeded.priors["a"] > unseeded.priors["a"]
    assert all(math.isclose(sum(row), 1.0) for row in seeded.confusion["x1"])


def test_it_reports_a_uniform_confusion_row_for_a_class_the_annotator_never_met() -> None:
    truth = {i: "abc"[i % 3] for i in range(12)}
    votes = [crowd(i, w, label) for i, label in truth.items() for w in ("r1", "r2")]
    votes += [crowd(i, "ab_only", label) for i, label in truth.items() if label != "c"]
    confusion = fit_dawid_skene(votes, LABELS).confusion["ab_only"]
    assert confusion[LABELS.index("c")] == pytest.approx([1 / 3] * 3)
    assert confusion[LABELS.index("a")][LABELS.index("a")] > 0.95


def test_it_seeds_dawid_skene_with_expert_votes_as_well_as_gold() -> None:
    votes, truth, gold = biased_crowd_votes()
    with_experts = votes + [expert(item, "e1", label) for item, label in gold.items()]
    results = batch_consensus(with_experts, LABELS, method="dawid_skene", votes_required=3)
    assert all(results[i].label == truth[i] for i in truth)


def test_it_lets_gold_override_a_disagreeing_expert_in_batch() -> None:
    votes = [crowd(1, 1, "a"), crowd(1, 2, "a"), crowd(1, 3, "a"), expert(1, 9, "b"), crowd(2, 1, "c")]
    result = batch_consensus(votes, LABELS, method="dawid_skene", votes_required=1, gold={1: "c"})
    assert (result[1].label, result[1].status, result[1].confidence) == ("c", "expert", 1.0)


@pytest.mark.parametrize("method", ["glad", "mace"])
def test_it_runs_glad_and_mace_and_keeps_expert_decisions(method: str) -> None:
    votes = [crowd(i, a, "abc"[i % 3]) for i in range(12) for a in (1, 2, 3)]
    votes[0] = crowd(0, 1, "b")  # one dissenting vote
    votes.append(expert(5, 9, "a"))  # truth of item 5 is "c"; the expert decides anyway
    results = batch_consensus(votes, LABELS, method=method, votes_required=3)
    assert all(results[i].label == "abc"[i % 3] for i in range(12) if i != 5)
    assert (results[5].label, results[5].status, results[5].method) == ("a", "expert", method)


def test_it_handles_items_with_only_expert_votes_and_a_single_crowd_vote_in_batch() -> None:
    votes = [expert(1, 9, "c"), crowd(2, 1, "a"), expert(3, 8, "a"), expert(3, 9, "b")]
    for method in ITERATIVE_METHODS:
        results = batch_consensus(votes, LABELS, method=method, votes_required=3)
        assert (results[1].label, results[1].status) == ("c", "expert")
        assert (results[2].label, results[2].status) == (None, "pending")
        assert results[3].status == "contested"


def test_it_labels_everything_with_the_only_label_in_use() -> None:
    votes = [crowd(i, a, "b") for i in range(3) for a in range(3)]
    for method in ITERATIVE_METHODS:
        results = batch_consensus(votes, LABELS, method=method, votes_required=3)
        assert {r.label for r in results.values()} == {"b"}


def test_it_gives_the_same_result_per_item_and_in_batch_for_cheap_methods() -> None:
    votes = [crowd(1, 1, "a"), crowd(1, 2, "b"), expert(1, 9, "b"), crowd(2, 1, "c"), crowd(2, 3, "c")]
    for method in CHEAP_METHODS:
        batch = batch_consensus(votes, LABELS, method=method, votes_required=2, gold={1: "c"})
        for item in (1, 2):
            item_votes = [v for v in votes if v.item == item]
            assert batch[item] == consensus_for_item(item_votes, LABELS, method=method, votes_required=2)


# --- properties -----------------------------------------------------------------------------------


@st.composite
def vote_sets(draw: st.DrawFn) -> list[VoteRecord]:
    keys = draw(st.sets(st.tuples(st.integers(0, 4), st.integers(0, 5)), min_size=1, max_size=20))
    return [
        VoteRecord(item, annotator, draw(st.sampled_from(LABELS)), draw(st.sampled_from(["crowd", "crowd", "expert"])))
        for item, annotator in sorted(keys)
    ]


def check_result(result: ConsensusResult) -> None:
    assert math.isclose(sum(result.posterior.values()), 1.0)
    assert list(result.posterior) == LABELS
    assert all(0.0 <= p <= 1.0 for p in result.posterior.values())
    assert result.label is None or result.label in LABELS
    assert (result.label is None) == (result.status == "pending")
    assert 0.0 <= result.agreement <= 1.0
    assert 0.0 <= result.confidence <= 1.0
    assert result.status in STATUSES


@given(votes=vote_sets(), method=st.sampled_from(CHEAP_METHODS), votes_required=st.integers(1, 4), data=st.data())
def test_it_keeps_cheap_results_well_formed_and_independent_of_vote_order(
    votes: list[VoteRecord], method: str, votes_required: int, data: st.DataObject
) -> None:
    results = batch_consensus(votes, LABELS, method=method, votes_required=votes_required)
    for result in results.values():
        check_result(result)
    shuffled = data.draw(st.permutations(votes))
    assert batch_consensus(shuffled, LABELS, method=method, votes_required=votes_required) == results


@settings(max_examples=15, deadline=None)
@given(votes=vote_sets(), data=st.data())
def test_it_keeps_dawid_skene_results_well_formed_and_labels_independent_of_vote_order(
    votes: list[VoteRecord], data: st.DataObject
) -> None:
    results = batch_consensus(votes, LABELS, method="dawid_skene", votes_required=2)
    for result in results.values():
        check_result(result)
    shuffled = batch_consensus(data.draw(st.permutations(votes)), LABELS, method="dawid_skene", votes_required=2)
    assert {i: (r.label, r.status) for i, r in shuffled.items()} == {i: (r.label, r.status) for i, r in results.items()}


# --- vote weights (suggestion-made votes) -------------------------------------------------------------------------


def weighed(item: int, annotator: int, label: str, weight: float, role: str = "crowd") -> VoteRecord:
    return VoteRecord(item=item, annotator=annotator, label=label, role=role, weight=weight)


def test_a_weight_scales_a_vote_in_the_scores_the_disagreement_and_the_agreement() -> None:
    votes = [crowd(1, 1, "a"), weighed(1, 2, "b", 0.4), weighed(1, 3, "b", 0.4)]
    result = one(votes, contested_threshold=0.5)
    assert result.label == "a" and result.posterior["a"] == pytest.approx(1 / 1.8)
    assert result.agreement == pytest.approx(1 / 1.8)  # weighted: a's 1 of 1.8
    assert result.status == "agreed"  # 0.8 of 1.8 disagree: 0.44 < 0.5
    assert result.vote_count == 3  # a down-weighted vote still counts towards the quorum
    full = one([crowd(1, 1, "a"), crowd(1, 2, "b"), crowd(1, 3, "b")], contested_threshold=0.5)
    assert full.label == "b"


def test_weighted_expert_votes_decide_by_weight() -> None:
    votes = [expert(1, 1, "a"), weighed(1, 2, "b", 0.3, "expert"), weighed(1, 3, "b", 0.3, "expert")]
    result = one(votes, method="weighted")
    assert (result.label, result.status) == ("a", "expert")


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, math.nan])
def test_a_weight_outside_zero_to_one_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        one([weighed(1, 1, "a", bad)])


def test_all_weights_one_give_the_unweighted_batch_results() -> None:
    votes = [crowd(i, a, LABELS[(i + a) % 3 if a == 2 else i % 3]) for i in range(6) for a in range(3)]
    same = [VoteRecord(v.item, v.annotator, v.label, v.role, 1.0) for v in votes]
    for method in ITERATIVE_METHODS:
        assert batch_consensus(same, LABELS, method=method, votes_required=3) == batch_consensus(
            votes, LABELS, method=method, votes_required=3
        )


@pytest.mark.parametrize("method", ITERATIVE_METHODS)
def test_iterative_methods_interpolate_towards_the_posterior_without_the_down_weighted_votes(method: str) -> None:
    # Three reliable annotators agree on items 0-4; on item 5 one labels "a", two down-weighted votes say "b".
    votes = [crowd(i, a, LABELS[i % 3]) for i in range(5) for a in range(3)]
    votes += [crowd(5, 0, "a")]
    full = batch_consensus([*votes, crowd(5, 1, "b"), crowd(5, 2, "b")], LABELS, method=method, votes_required=1)
    soft = batch_consensus(
        [*votes, weighed(5, 1, "b", 0.2), weighed(5, 2, "b", 0.2)], LABELS, method=method, votes_required=1
    )
    assert full[5].label == "b"
    assert soft[5].label == "a" and soft[5].posterior["b"] < full[5].posterior["b"]
    assert soft[5].vote_count == 3


def test_iterative_methods_take_one_weight_below_one() -> None:
    votes = [weighed(1, 1, "a", 0.2), weighed(1, 2, "a", 0.5), crowd(1, 3, "b")]
    with pytest.raises(ValueError, match="one weight below 1"):
        batch_consensus(votes, LABELS, method="dawid_skene", votes_required=1)


# --- adaptive redundancy: votes_required is a cap, a confident patch settles before it ----------------


def test_without_early_confidence_two_agreeing_votes_of_three_required_stay_pending() -> None:
    result = one([crowd(1, 1, "b"), crowd(1, 2, "b")], method="weighted")
    assert (result.label, result.status) == (None, "pending")


def test_two_agreeing_crowd_votes_settle_a_patch_when_confident_enough() -> None:
    result = one([crowd(1, 1, "b"), crowd(1, 2, "b")], method="weighted", early_confidence=0.9)
    assert (result.label, result.status, result.confidence) == ("b", "agreed", 1.0)


def test_one_vote_never_settles_early_and_a_split_waits_for_more_votes() -> None:
    assert one([crowd(1, 1, "b")], votes_required=3, early_confidence=0.5).status == "pending"
    split = one([crowd(1, 1, "b"), crowd(1, 2, "c")], early_confidence=0.5)
    assert (split.label, split.status) == (None, "pending")  # a tie is never confident
    two_to_one = one([crowd(1, 1, "b"), crowd(1, 2, "b"), crowd(1, 3, "a")], votes_required=5, early_confidence=0.9)
    assert two_to_one.status == "pending"  # 2/3 < 0.9: ask again, up to the cap of 5
    at_cap = one([crowd(1, i, "b") for i in range(1, 4)] + [crowd(1, 4, "a"), crowd(1, 5, "c")], votes_required=5,
                 early_confidence=0.9)  # fmt: skip
    assert (at_cap.label, at_cap.status) == ("b", "contested")  # the cap reached: the usual rules decide


def test_the_batch_methods_settle_early_on_their_own_posterior() -> None:
    # Dawid-Skene learns that annotator 3 always agrees with the gold: its vote with one other is confident.
    gold = dict.fromkeys(range(10, 16), "a")
    votes = [crowd(i, 3, "a") for i in gold] + [crowd(i, 4, "b") for i in gold]
    votes += [crowd(1, 3, "c"), crowd(1, 5, "c")]
    fixed = batch_consensus(votes, LABELS, method="dawid_skene", votes_required=3, gold=gold)
    adaptive = batch_consensus(votes, LABELS, method="dawid_skene", votes_required=3, gold=gold, early_confidence=0.9)
    assert fixed[1].status == "pending"
    assert (adaptive[1].label, adaptive[1].status) == ("c", "agreed")
    assert adaptive[1].confidence >= 0.9


@pytest.mark.parametrize("value", [0.2, 1.5])
def test_an_early_confidence_outside_half_to_one_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="early_confidence"):
        one([crowd(1, 1, "b"), crowd(1, 2, "b")], early_confidence=value)
