"""Agreement statistics and annotator reliability, checked against values that can be worked out by hand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annotations.domain.agreement import annotator_reliability, expert_labels, project_agreement
from annotations.domain.consensus import VoteRecord

LABELS = ["a", "b", "c"]


def crowd(item: int, annotator: int | str, label: str) -> VoteRecord:
    return VoteRecord(item=item, annotator=annotator, label=label, role="crowd")


def expert(item: int, annotator: int | str, label: str) -> VoteRecord:
    return VoteRecord(item=item, annotator=annotator, label=label, role="expert")


def from_counts(rows: list[list[int]], labels: list[str]) -> list[VoteRecord]:
    """Votes that reproduce an items x labels count table, one annotator id per vote within an item."""
    votes = []
    for item, row in enumerate(rows):
        answers = [label for label, n in zip(labels, row, strict=True) for _ in range(n)]
        votes += [crowd(item, rater, label) for rater, label in enumerate(answers)]
    return votes


# --- project agreement ----------------------------------------------------------------------------


def test_it_gives_kappa_and_alpha_of_one_for_perfect_agreement() -> None:
    votes = [crowd(item, rater, "abc"[item % 3]) for item in range(6) for rater in range(3)]
    stats = project_agreement(votes, LABELS)
    assert stats.overall.fleiss_kappa == pytest.approx(1.0)
    assert stats.overall.krippendorff_alpha == pytest.approx(1.0)
    assert (stats.overall.n_items, stats.overall.raters_per_item) == (6, 3)
    assert all(score.fleiss_kappa == pytest.approx(1.0) for score in stats.per_class.values())


def test_it_reproduces_fleiss_worked_example() -> None:
    # The 10 subjects x 14 raters x 5 categories example of Fleiss' kappa on Wikipedia: kappa = 0.210.
    rows = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]  # fmt: skip
    labels = ["1", "2", "3", "4", "5"]
    stats = project_agreement(from_counts(rows, labels), labels)
    assert stats.overall.fleiss_kappa == pytest.approx(0.210, abs=5e-4)


def test_it_reproduces_krippendorffs_nominal_example_with_missing_ratings() -> None:
    # Krippendorff's canonical 3 coders x 15 units example (nan = not rated); nominal alpha = 0.691358.
    coders = [
        [None, None, None, None, None, 3, 4, 1, 2, 1, 1, 3, 3, None, 3],
        [1, None, 2, 1, 3, 3, 4, 3, None, None, None, None, None, None, None],
        [None, None, 2, 1, 3, 4, 4, None, 2, 1, 1, 3, 3, None, 4],
    ]
    votes = [
        crowd(unit, coder, str(value)) for coder, row in enumerate(coders) for unit, value in enumerate(row) if value
    ]
    stats = project_agreement(votes, ["1", "2", "3", "4"])
    assert stats.overall.krippendorff_alpha == pytest.approx(0.691358, abs=1e-6)
    assert stats.overall.n_items == 12  # units rated at least twice


def test_it_reports_systematic_disagreement_as_negative() -> None:
    votes = [crowd(0, 1, "a"), crowd(0, 2, "b"), crowd(1, 1, "b"), crowd(1, 2, "a")]
    stats = project_agreement(votes, LABELS)
    assert stats.overall.fleiss_kappa == pytest.approx(-1.0)
    assert stats.overall.krippendorff_alpha == pytest.approx(-0.5)  # 1 - D_o/D_e = 1 - 1/(2/3)


def test_it_scores_each_class_one_against_the_rest() -> None:
    # Everyone agrees on what is "a"; "b" and "c" are mixed up half the time.
    votes = [crowd(i, r, "a") for i in range(4) for r in range(2)]
    votes += [crowd(i, 0, "b") for i in range(4, 8)] + [crowd(i, 1, "bc"[i % 2]) for i in range(4, 8)]
    stats = project_agreement(votes, LABELS)
    assert stats.per_class["a"].fleiss_kappa == pytest.approx(1.0)
    assert stats.per_class["b"].fleiss_kappa is not None and stats.per_class["b"].fleiss_kappa < 0.7
    assert stats.overall.fleiss_kappa is not None and stats.overall.fleiss_kappa < 1.0


def test_it_returns_none_when_only_one_class_is_used() -> None:
    stats = project_agreement([crowd(i, r, "a") for i in range(4) for r in range(3)], LABELS)
    assert (stats.overall.fleiss_kappa, stats.overall.krippendorff_alpha) == (None, None)
    assert stats.per_class["b"].fleiss_kappa is None


def test_it_returns_none_when_no_item_has_two_votes() -> None:
    stats = project_agreement([crowd(0, 1, "a"), crowd(1, 1, "b")], LABELS)
    assert stats.overall == stats.per_class["a"]
    assert (stats.overall.fleiss_kappa, stats.overall.krippendorff_alpha, stats.overall.n_items) == (None, None, 0)


def test_it_uses_the_most_common_number_of_raters_for_fleiss() -> None:
    votes = [crowd(i, r, "abc"[i % 3]) for i in range(4) for r in range(3)] + [crowd(9, 1, "a"), crowd(9, 2, "b")]
    score = project_agreement(votes, LABELS).overall
    assert (score.raters_per_item, score.n_items_fleiss, score.n_items) == (3, 4, 5)
    assert score.fleiss_kappa == pytest.approx(1.0)  # the 2-vote item that disagrees is left out of Fleiss
    assert score.krippendorff_alpha is not None and score.krippendorff_alpha < 1.0  # but not out of alpha


def test_it_can_restrict_agreement_to_crowd_votes() -> None:
    votes = [crowd(i, r, "ab"[i % 2]) for i in range(4) for r in range(2)] + [expert(i, "e", "c") for i in range(4)]
    assert project_agreement(votes, LABELS, roles={"crowd"}).overall.fleiss_kappa == pytest.approx(1.0)
    everyone = project_agreement(votes, LABELS).overall.fleiss_kappa
    assert everyone is not None and everyone < 0.5


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4), st.sampled_from(LABELS)), max_size=30))
def test_it_never_raises_and_never_returns_nan(rows: list[tuple[int, int, str]]) -> None:
    unique = {(item, rater): label for item, rater, label in rows}
    stats = project_agreement([crowd(i, r, label) for (i, r), label in unique.items()], LABELS)
    for score in [stats.overall, *stats.per_class.values()]:
        for value in (score.fleiss_kappa, score.krippendorff_alpha):
            assert value is None or -1.0 - 1e-9 <= value <= 1.0 + 1e-9


# --- annotator reliability ------------------------------------------------------------------------


def test_it_gives_kappa_one_to_an_annotator_who_always_agrees_with_the_expert() -> None:
    votes = [crowd(i, "u", "abc"[i % 3]) for i in range(6)] + [expert(i, "e", "abc"[i % 3]) for i in range(6)]
    report = annotator_reliability(votes, LABELS, with_dawid_skene=False)
    assert report["u"].kappa_vs_experts == pytest.approx(1.0)
    assert report["u"].n_expert_overlap == 6
    assert report["e"].kappa_vs_experts is None  # the only expert is never compared with themself


def test_it_compares_each_expert_with_the_other_experts() -> None:
    votes = [expert(i, e, "ab"[i % 2]) for i in range(4) for e in ("e1", "e2")]
    report = annotator_reliability(votes, LABELS, with_dawid_skene=False)
    assert report["e1"].kappa_vs_experts == pytest.approx(1.0)
    assert report["e1"].ds_confusion is None


def test_it_works_out_kappa_against_experts_by_hand() -> None:
    # Answers a, b, c against expert a, b, b: observed 2/3, chance 1/3, kappa = (2/3 - 1/3) / (2/3) = 0.5.
    votes = [crowd(0, "u", "a"), crowd(1, "u", "b"), crowd(2, "u", "c")]
    votes += [expert(0, "e", "a"), expert(1, "e", "b"), expert(2, "e", "b")]
    assert annotator_reliability(votes, LABELS, with_dawid_skene=False)["u"].kappa_vs_experts == pytest.approx(0.5)


def test_it_returns_none_without_overlap_or_with_a_single_class() -> None:
    votes = [crowd(0, "lonely", "a"), crowd(1, "same", "a"), crowd(2, "same", "a")]
    votes += [expert(1, "e", "a"), expert(2, "e", "a")]
    report = annotator_reliability(votes, LABELS, with_dawid_skene=False)
    assert (report["lonely"].kappa_vs_experts, report["lonely"].n_expert_overlap) == (None, 0)
    assert report["same"].kappa_vs_experts is None  # both used only "a": kappa is undefined
    assert (report["lonely"].gold_accuracy, report["lonely"].gold_confusion) == (None, None)


def test_it_scores_accuracy_and_confusion_on_gold_items() -> None:
    votes = [crowd(0, "u", "a"), crowd(1, "u", "b"), crowd(2, "u", "b"), crowd(3, "u", "c"), crowd(4, "u", "a")]
    gold = {0: "a", 1: "b", 2: "c", 3: "c"}  # item 4 is not gold
    report = annotator_reliability(votes, LABELS, gold=gold, with_dawid_skene=False)["u"]
    assert (report.gold_accuracy, report.n_gold) == (0.75, 4)
    assert report.gold_confusion == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # rows truth, columns answer


def test_it_estimates_dawid_skene_confusion_for_a_biased_annotator() -> None:
    # "x" answers b whenever the truth is a; the experts' labels on items 0-5 give that away.
    truth = {i: "abc"[i % 3] for i in range(30)}
    votes = [crowd(i, r, label) for i, label in truth.items() for r in ("r1", "r2")]
    votes += [crowd(i, "x", "b" if label == "a" else label) for i, label in truth.items()]
    votes += [expert(i, "e", truth[i]) for i in range(6)]
    report = annotator_reliability(votes, LABELS)
    a, b = LABELS.index("a"), LABELS.index("b")
    x = report["x"].ds_confusion
    assert x is not None and x[a][b] > 0.95
    assert report["r1"].ds_confusion is not None and report["r1"].ds_confusion[a][a] > 0.95
    assert report["e"].ds_confusion is None


def test_it_lists_only_untied_expert_decisions_as_expert_labels() -> None:
    votes = [expert(0, "e1", "a"), expert(0, "e2", "a"), expert(1, "e1", "a"), expert(1, "e2", "b"), crowd(2, 1, "c")]
    assert expert_labels(votes, LABELS) == {0: "a"}


def test_it_rejects_an_unknown_label() -> None:
    with pytest.raises(ValueError, match="not one of the project's labels"):
        project_agreement([crowd(0, 1, "z")], LABELS)


def test_pair_agreement_gives_the_share_and_cohens_kappa_of_a_pair_table() -> None:
    from annotations.domain.agreement import pair_agreement

    # 10 pairs: 4 (a, a), 3 (b, b), 2 (a, b), 1 (b, a). Observed 0.7; answers a 6 b 4, reference a 5 b 5:
    # chance (6*5 + 4*5) / 100 = 0.5, so kappa (0.7 - 0.5) / 0.5 = 0.4.
    found = pair_agreement({("a", "a"): 4, ("b", "b"): 3, ("a", "b"): 2, ("b", "a"): 1})
    assert found.n_pairs == 10
    assert found.agreement == pytest.approx(0.7) and found.kappa == pytest.approx(0.4)
    assert pair_agreement({}) == type(found)(0, None, None)
    # One label on both sides: chance agreement is 1 and kappa undefined.
    assert pair_agreement({("a", "a"): 3}).kappa is None
