"""Adaptive redundancy weighing the votes by the model's prior (Project.redundancy_model_prior), per vote."""

from __future__ import annotations

import numpy as np
import pytest

from annotations.domain.consensus import Reliabilities, VoteRecord, consensus_for_item, with_prior

LABELS = ["aca", "n", "scc"]
# A student right 80% of the time, errors split evenly: one vote is a likelihood of 0.8 against 0.1.
STUDENT = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
FIT = Reliabilities(labels=tuple(LABELS), priors=np.full(3, 1 / 3), confusion={1: STUDENT, 2: STUDENT}, pooled=STUDENT)
PRIOR_ACA = {"aca": 0.7, "n": 0.1, "scc": 0.2}
OPTIONS = {"method": "dawid_skene", "votes_required": 3, "early_confidence": 0.9}


def vote(annotator: int, label: str, role: str = "crowd") -> VoteRecord:
    return VoteRecord(item=7, annotator=annotator, label=label, role=role)


def test_one_vote_agreeing_with_a_sure_model_settles_the_patch() -> None:
    # 0.8 * 0.7 against 0.1 * 0.2 and 0.1 * 0.1: the two together give "aca" 0.949.
    result = consensus_for_item([vote(1, "aca")], LABELS, **OPTIONS, reliabilities=FIT, prior=PRIOR_ACA)
    assert result.status == "agreed"
    assert result.label == "aca"
    # The label's confidence is the votes' own posterior, not the prior-weighted one.
    assert result.confidence == pytest.approx(0.8)
    assert with_prior(result.posterior, PRIOR_ACA, LABELS)["aca"] == pytest.approx(0.56 / 0.59)


def test_one_vote_against_the_model_or_without_a_prior_waits_for_more() -> None:
    against = consensus_for_item([vote(1, "scc")], LABELS, **OPTIONS, reliabilities=FIT, prior=PRIOR_ACA)
    assert (against.status, against.label) == ("pending", None)
    alone = consensus_for_item([vote(1, "aca")], LABELS, **OPTIONS, reliabilities=FIT, prior=None)
    assert (alone.status, alone.label) == ("pending", None)
    # An unsure model (0.45 / 0.45) adds too little: 0.8 * 0.45 against 0.1 * 0.55 is 0.867, under 0.9.
    unsure = {"aca": 0.45, "n": 0.1, "scc": 0.45}
    result = consensus_for_item([vote(1, "aca")], LABELS, **OPTIONS, reliabilities=FIT, prior=unsure)
    assert result.status == "pending"


def test_the_prior_counts_only_with_adaptive_redundancy_and_a_dawid_skene_posterior() -> None:
    fixed = {**OPTIONS, "early_confidence": None}
    assert consensus_for_item([vote(1, "aca")], LABELS, **fixed, reliabilities=FIT, prior=PRIOR_ACA).status == "pending"
    # No current fit: the per-vote posterior is the interim vote share (1.0 for one vote), which a prior cannot weigh.
    cold = consensus_for_item([vote(1, "aca")], LABELS, **OPTIONS, reliabilities=None, prior=PRIOR_ACA)
    assert (cold.method, cold.status) == ("weighted", "pending")
    majority = {**OPTIONS, "method": "majority"}
    assert consensus_for_item([vote(1, "aca")], LABELS, **majority, prior=PRIOR_ACA).status == "pending"


def test_two_split_votes_stay_contested_whatever_the_model_says() -> None:
    votes = [vote(1, "aca"), vote(2, "scc")]
    result = consensus_for_item(
        votes, LABELS, **OPTIONS, reliabilities=FIT, prior={"aca": 0.98, "n": 0.01, "scc": 0.01}
    )
    # A tie between the votes is never settled by the prior: the patch waits for its third vote.
    assert (result.status, result.label) == ("pending", None)


def test_a_split_dawid_skene_is_sure_of_asks_a_third_vote_instead_of_an_expert() -> None:
    """A reliable student against a guessing one: Dawid-Skene is sure of the reliable one's label, but the crowd
    is split beyond contested_threshold, so adaptive redundancy asks for another crowd vote (settling would make
    the patch contested and send it to an expert at ten times the cost); at the cap the split is contested."""
    guessing = np.full((3, 3), 1 / 3)
    sure = np.array([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.01, 0.98]])
    fit = Reliabilities(labels=tuple(LABELS), priors=np.full(3, 1 / 3), confusion={1: sure, 2: guessing}, pooled=sure)
    split = [vote(1, "aca"), vote(2, "scc")]
    result = consensus_for_item(split, LABELS, **OPTIONS, reliabilities=fit)
    assert result.posterior["aca"] >= 0.9  # sure enough to settle, were the votes not split
    assert (result.status, result.label) == ("pending", None)
    at_cap = consensus_for_item(split, LABELS, **{**OPTIONS, "votes_required": 2}, reliabilities=fit)
    assert (at_cap.status, at_cap.label) == ("contested", "aca")
