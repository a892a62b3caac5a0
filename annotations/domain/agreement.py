"""Inter-annotator agreement and per-annotator reliability, for the dashboard.

Every statistic comes from a library: Fleiss' kappa from statsmodels (`stats.inter_rater`), Krippendorff's
alpha from the `krippendorff` package (nominal level), Cohen's kappa, accuracy and confusion matrices from
scikit-learn, and the Dawid–Skene confusion matrices from crowd-kit (through `consensus.fit_dawid_skene`).

A statistic that is undefined for the data given (no overlapping items, a single class in use, every item
rated once) is reported as None rather than raised or returned as NaN, so a young project's dashboard
simply shows blanks.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from annotations.domain.consensus import (
    Annotator,
    Item,
    KnownLabels,
    VoteRecord,
    as_label_dict,
    expert_decision,
    fit_dawid_skene,
    group_by_item,
    validate_votes,
)


@dataclass(frozen=True)
class AgreementScore:
    """Chance-corrected agreement over a set of items.

    Fleiss' kappa needs the same number of raters on every item, so it is computed on the items that have
    the most common number of votes (`raters_per_item`, ties to the larger number; `n_items_fleiss` of them).
    Krippendorff's alpha copes with any number of raters and uses every item with two or more votes
    (`n_items`).
    """

    fleiss_kappa: float | None
    krippendorff_alpha: float | None
    n_items: int
    n_items_fleiss: int
    raters_per_item: int | None


@dataclass(frozen=True)
class ProjectAgreement:
    overall: AgreementScore
    per_class: dict[str, AgreementScore]  # one-vs-rest: "is it this class or not?"


@dataclass(frozen=True)
class AnnotatorReliability:
    """How one annotator compares with the experts, the gold set and the Dawid–Skene model.

    Matrices follow scikit-learn: rows are the reference (truth) in label order, columns the annotator's answer.
    `ds_confusion` rows are probabilities (a class the annotator never met is a uniform row); it is None for
    annotators with no crowd votes, because expert votes are the model's reference, not its input.
    """

    annotator: Annotator
    n_votes: int
    kappa_vs_experts: float | None
    n_expert_overlap: int
    gold_accuracy: float | None
    n_gold: int
    gold_confusion: list[list[int]] | None
    ds_confusion: list[list[float]] | None


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def expert_labels(votes: Sequence[VoteRecord], labels: Sequence[str]) -> dict[Item, str]:
    """Items the experts settled (majority of their votes, not tied) and the label they gave."""
    validate_votes(votes, labels)
    decided: dict[Item, str] = {}
    for item, item_votes in group_by_item(votes).items():
        label, tied = expert_decision(item_votes, labels)
        if label is not None and not tied:
            decided[item] = label
    return decided


# ---------------------------------------------------------------------------------------------------
# Project-level agreement


def _count_table(votes: Sequence[VoteRecord], labels: Sequence[str]) -> np.ndarray:
    """Items x labels matrix of vote counts (the layout both statsmodels and krippendorff accept)."""
    index = {label: i for i, label in enumerate(labels)}
    by_item = group_by_item(votes)
    table = np.zeros((len(by_item), len(labels)), dtype=float)
    for row, item_votes in enumerate(by_item.values()):
        for vote in item_votes:
            table[row, index[vote.label]] += 1
    return table


def _score(table: np.ndarray) -> AgreementScore:
    from krippendorff import alpha as krippendorff_alpha
    from statsmodels.stats.inter_rater import fleiss_kappa

    raters = table.sum(axis=1).astype(int)
    rated = table[raters >= 2]
    if len(rated) == 0:
        return AgreementScore(None, None, 0, 0, None)
    counts = Counter(raters[raters >= 2].tolist())
    modal = max(counts, key=lambda n: (counts[n], n))
    fleiss_table = table[raters == modal]
    # Undefined cases (one class in use: chance agreement is 1) come back as 0/0; silence numpy's warning
    # and report None.
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa = _finite_or_none(fleiss_kappa(fleiss_table, method="fleiss"))
        try:
            alpha: float | None = _finite_or_none(
                krippendorff_alpha(value_counts=rated, level_of_measurement="nominal")
            )
        except ValueError:
            alpha = None
    return AgreementScore(
        fleiss_kappa=kappa,
        krippendorff_alpha=alpha,
        n_items=len(rated),
        n_items_fleiss=len(fleiss_table),
        raters_per_item=modal,
    )


def project_agreement(
    votes: Sequence[VoteRecord], labels: Sequence[str], *, roles: Collection[str] | None = None
) -> ProjectAgreement:
    """Fleiss' kappa and Krippendorff's alpha over the project's votes, overall and per class (one-vs-rest).

    `roles` restricts the votes used (e.g. `{"crowd"}` for crowd-only agreement); None uses every vote.
    """
    validate_votes(votes, labels)
    used = [v for v in votes if roles is None or v.role in roles]
    table = _count_table(used, labels)
    per_class: dict[str, AgreementScore] = {}
    for i, label in enumerate(labels):
        yes = table[:, i : i + 1]
        per_class[label] = _score(np.hstack([yes, table.sum(axis=1, keepdims=True) - yes]))
    return ProjectAgreement(overall=_score(table), per_class=per_class)


# ---------------------------------------------------------------------------------------------------
# Per-annotator reliability


def _kappa(answers: list[str], reference: list[str], labels: Sequence[str]) -> float | None:
    from sklearn.metrics import cohen_kappa_score

    if not answers:
        return None
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        # scikit-learn warns and returns NaN when both raters used a single class (kappa undefined).
        warnings.simplefilter("ignore", RuntimeWarning)
        return _finite_or_none(cohen_kappa_score(answers, reference, labels=list(labels)))


def annotator_reliability(
    votes: Sequence[VoteRecord],
    labels: Sequence[str],
    *,
    gold: KnownLabels | None = None,
    with_dawid_skene: bool = True,
) -> dict[Annotator, AnnotatorReliability]:
    """Per annotator: Cohen's kappa against the experts, accuracy and confusion on gold, Dawid–Skene confusion.

    The expert reference for an annotator's vote is the decision of the *other* experts on that item, so an
    expert is never compared with their own vote. Gold accuracy uses only `gold` (pass `expert_labels(...)`
    if expert decisions are the gold set). The Dawid–Skene model is seeded with gold and expert labels, as
    in `batch_consensus`; `with_dawid_skene=False` skips it (it needs crowd-kit and a few seconds on big sets).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix

    validate_votes(votes, labels)
    gold_labels = as_label_dict(gold)
    unknown = {item: label for item, label in gold_labels.items() if label not in set(labels)}
    if unknown:
        raise ValueError(f"Gold labels {unknown!r} are not among the project's labels {list(labels)!r}.")

    by_item = group_by_item(votes)
    ds_confusion: dict[Annotator, list[list[float]]] = {}
    if with_dawid_skene:
        truth = {**expert_labels(votes, labels), **gold_labels}
        ds_confusion = fit_dawid_skene(votes, labels, truth=truth).confusion

    by_annotator: dict[Annotator, list[VoteRecord]] = {}
    for vote in votes:
        by_annotator.setdefault(vote.annotator, []).append(vote)

    report: dict[Annotator, AnnotatorReliability] = {}
    for annotator, own in by_annotator.items():
        answers: list[str] = []
        reference: list[str] = []
        for vote in own:
            others = [v for v in by_item[vote.item] if v.annotator != annotator]
            label, tied = expert_decision(others, labels)
            if label is not None and not tied:
                answers.append(vote.label)
                reference.append(label)
        on_gold = [v for v in own if v.item in gold_labels]
        gold_truth = [gold_labels[v.item] for v in on_gold]
        gold_answers = [v.label for v in on_gold]
        report[annotator] = AnnotatorReliability(
            annotator=annotator,
            n_votes=len(own),
            kappa_vs_experts=_kappa(answers, reference, labels),
            n_expert_overlap=len(answers),
            gold_accuracy=float(accuracy_score(gold_truth, gold_answers)) if on_gold else None,
            n_gold=len(on_gold),
            gold_confusion=confusion_matrix(gold_truth, gold_answers, labels=list(labels)).tolist()
            if on_gold
            else None,
            ds_confusion=ds_confusion.get(annotator),
        )
    return report


# ---------------------------------------------------------------------------------------------------
# Agreement of a group of votes with a reference (the provenance split)


@dataclass(frozen=True)
class PairAgreement:
    """How often one set of answers matches a reference, over ``n_pairs`` (answer, reference) pairs on the
    same items: the raw share and Cohen's kappa (chance-corrected with both sides' label frequencies)."""

    n_pairs: int
    agreement: float | None
    kappa: float | None


def pair_agreement(pairs: Mapping[tuple[Hashable, Hashable], int]) -> PairAgreement:
    """``pairs`` maps (answer, reference) -> how many times that pair occurs (an aggregate query's rows).

    Kappa is None where it is undefined (no pairs, or both sides used one and the same single label)."""
    n = sum(pairs.values())
    if n <= 0:
        return PairAgreement(0, None, None)
    observed = sum(count for (answer, reference), count in pairs.items() if answer == reference) / n
    answers: Counter[Hashable] = Counter()
    references: Counter[Hashable] = Counter()
    for (answer, reference), count in pairs.items():
        answers[answer] += count
        references[reference] += count
    expected = sum(answers[label] * references[label] for label in answers) / (n * n)
    kappa = (observed - expected) / (1 - expected) if expected < 1 else None
    return PairAgreement(n, observed, kappa)
