"""``batch_consensus`` on vote arrays: the same results, without a Python object per vote.

A round's snapshot recomputes every voted patch of the project (annotations.consensus). With VoteRecords
that is 3M frozen dataclasses, a pandas frame for crowd-kit and a loop per item; here the votes are parallel
numpy arrays and every rule of ``domain.consensus`` (its module docstring is the specification) is a
vectorised step over them: ``np.bincount`` per label for the scores, the experts' decision, the crowd's
disagreeing share and ``agreement``. Dawid-Skene is crowd-kit's own fit on arrays
(``domain.dawid_skene_crowdkit``), with the "Vote weights" interpolation of ``_iterative_posteriors``.

Same results, not merely close ones: sums run over each item's votes in the order given (``np.bincount``
adds in array order, as ``sum()`` over the records does), ties use ``math.isclose``'s rule, and shares divide
the same sums, so labels, statuses and counts are those of ``batch_consensus`` and the floats agree to
rounding (Dawid-Skene's EM to about 1e-15). GLAD and MACE are not here: the caller keeps them on records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .consensus import (
    _TIE_RTOL,
    AGREED,
    CHEAP_METHODS,
    CONTESTED,
    EARLY_MIN_CROWD_VOTES,
    EARLY_MIN_CROWD_VOTES_WITH_PRIOR,
    EXPERT_STATUS,
    PENDING,
    ConsensusResult,
    _validate_options,
)
from .dawid_skene_crowdkit import fit_crowdkit, unique_inverse

ARRAY_METHODS = (*CHEAP_METHODS, "dawid_skene")
# Status codes of ArrayResults.status, an index into this tuple.
STATUSES = (PENDING, AGREED, CONTESTED, EXPERT_STATUS)
PENDING_CODE, AGREED_CODE, CONTESTED_CODE, EXPERT_CODE = range(4)


@dataclass(frozen=True)
class VoteArrays:
    """Counted active votes, one per row: ``item`` and ``annotator`` ids (int64), ``label`` (int64, the index in
    the project's label order), ``expert`` (bool: an expert or admin vote), ``weight`` (float64, in (0, 1])."""

    item: np.ndarray
    annotator: np.ndarray
    label: np.ndarray
    expert: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.item)

    def take(self, index: np.ndarray) -> VoteArrays:
        return VoteArrays(*(a[index] for a in (self.item, self.annotator, self.label, self.expert, self.weight)))


@dataclass(frozen=True)
class ArrayResults:
    """One row per item that has votes, items ascending: what ``ConsensusResult`` holds, column by column.
    ``label`` is -1 for None; ``status`` an index into STATUSES; ``posterior`` (items, K) in label order."""

    item: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    posterior: np.ndarray
    vote_count: np.ndarray
    agreement: np.ndarray
    status: np.ndarray
    method: str

    def __len__(self) -> int:
        return len(self.item)


def validate_arrays(votes: VoteArrays, n_labels: int) -> None:
    """``validate_votes``'s checks, with its messages, on arrays."""
    if n_labels < 1:
        raise ValueError("The project has no label classes; add at least one label before computing consensus.")
    if len(votes) and (votes.label.min() < 0 or votes.label.max() >= n_labels):
        raise ValueError("A vote has a label that is not one of the project's labels; add the label class or fix it.")
    bad = ~((votes.weight > 0) & (votes.weight <= 1))
    if bad.any():
        raise ValueError(
            f"A vote has weight {float(votes.weight[bad][0])!r}; a weight must be above 0 and at most 1 "
            "(leave out the votes that must not count)."
        )
    if len(votes) > 1:
        pairs = np.lexsort((votes.annotator, votes.item))
        same = (np.diff(votes.item[pairs]) == 0) & (np.diff(votes.annotator[pairs]) == 0)
        if same.any():
            at = pairs[np.flatnonzero(same)[0]]
            raise ValueError(
                f"Annotator {int(votes.annotator[at])!r} has more than one vote on item {int(votes.item[at])!r}; "
                "pass only each annotator's latest (active) vote."
            )


def find_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``ids`` sits in the ascending ``sorted_ids`` (clipped into range) and whether it is there."""
    at = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
    found = sorted_ids[at] == ids if len(sorted_ids) else np.zeros(len(ids), dtype=bool)
    return at, found


def _sums(index: np.ndarray, label: np.ndarray, weight: np.ndarray, n: int, k: int) -> np.ndarray:
    """(n, k) per-item sums of ``weight`` by label, each cell added in the votes' order."""
    return np.bincount(index * k + label, weights=weight, minlength=n * k).reshape(n, k)


def _normalise(scores: np.ndarray) -> np.ndarray:
    """``consensus._normalise`` per row: the total added label by label, uniform where it is not positive."""
    k = scores.shape[1]
    total = np.zeros(len(scores))
    for j in range(k):
        total = total + scores[:, j]
    safe = np.where(total > 0, total, 1.0)
    return np.where((total > 0)[:, None], scores / safe[:, None], 1.0 / k)


def _isclose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``math.isclose(a, b, rel_tol=_TIE_RTOL, abs_tol=1e-12)``, elementwise."""
    return (a == b) | (np.abs(a - b) <= np.maximum(_TIE_RTOL * np.maximum(np.abs(a), np.abs(b)), 1e-12))


def _leading(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_argmax_in_label_order`` per row: the first label within the tie tolerance of the best, and whether tied."""
    best = scores.max(axis=1, keepdims=True)
    close = _isclose(scores, best)
    return close.argmax(axis=1), close.sum(axis=1) > 1


def _share(index: np.ndarray, weight: np.ndarray, condition: np.ndarray, n: int) -> np.ndarray:
    """``_weighted_share`` per item: the weight meeting ``condition`` over the weight of all (0 with none)."""
    total = np.bincount(index, weights=weight, minlength=n)
    met = np.bincount(index, weights=np.where(condition, weight, 0.0), minlength=n)
    return np.divide(met, total, out=np.zeros(n), where=total > 0)


def batch_consensus_arrays(
    votes: VoteArrays,
    n_labels: int,
    *,
    method: str,
    votes_required: int,
    expert_weight: float = 3.0,
    contested_threshold: float = 0.34,
    gold_item: np.ndarray | None = None,
    gold_label: np.ndarray | None = None,
    early_confidence: float | None = None,
    prior_item: np.ndarray | None = None,
    prior: np.ndarray | None = None,
) -> ArrayResults:
    """``batch_consensus`` for the cheap methods and Dawid-Skene (see the module docstring).

    ``gold_item``/``gold_label`` are the gold labels (item ids and label indices, in the order of the mapping
    ``batch_consensus`` would be given). The votes' order is the records' order. ``prior_item``/``prior``
    (item ids, and a (len, n_labels) array of the model's posterior for each) are ``batch_consensus``'s
    ``priors``; items without votes are ignored.
    """
    _validate_options(method, votes_required, expert_weight, contested_threshold, early_confidence)
    if method not in ARRAY_METHODS:
        raise ValueError(f"{method!r} has no array path; use batch_consensus (one of {list(ARRAY_METHODS)!r} here).")
    validate_arrays(votes, n_labels)
    k = n_labels
    gold_item = np.zeros(0, dtype=np.int64) if gold_item is None else np.asarray(gold_item, dtype=np.int64)
    gold_label = np.zeros(0, dtype=np.int64) if gold_label is None else np.asarray(gold_label, dtype=np.int64)
    if len(gold_label) and (gold_label.min() < 0 or gold_label.max() >= k):
        raise ValueError("A gold label is not among the project's labels; fix the gold set.")
    items, index = unique_inverse(votes.item)
    n = len(items)
    if not n:
        return _empty(k, method)
    expert, crowd, w = votes.expert, ~votes.expert, votes.weight
    n_crowd = np.bincount(index[crowd], minlength=n)
    expert_scores = _sums(index[expert], votes.label[expert], w[expert], n, k)
    has_expert = np.bincount(index[expert], minlength=n) > 0
    experts_label, experts_tied = _leading(expert_scores)

    if method == "majority":
        posterior = _normalise(_sums(index, votes.label, w, n, k))
    elif method == "weighted":
        crowd_scores = _sums(index[crowd], votes.label[crowd], w[crowd], n, k)
        posterior = _normalise(
            crowd_scores + _sums(index[expert], votes.label[expert], expert_weight * w[expert], n, k)
        )
    elif method == "expert_override":
        crowd_scores = _sums(index[crowd], votes.label[crowd], w[crowd], n, k)
        posterior = _normalise(np.where(has_expert[:, None], expert_scores, crowd_scores))
    forced = np.full(n, -1, dtype=np.int64)
    if method == "dawid_skene":
        if len(np.unique(gold_item)) != len(gold_item):
            raise ValueError("An item is listed twice in the gold labels.")
        gold_at, inside = find_sorted(items, gold_item)
        forced[gold_at[inside]] = gold_label[inside]
        posterior = _dawid_skene(
            votes, index, n, k, has_expert, experts_label, experts_tied,
            gold_at[inside], gold_label[inside], np.flatnonzero(inside),
        )  # fmt: skip

    leading, tied = _leading(posterior)
    decided = has_expert | (forced >= 0)
    experts_label = np.where(forced >= 0, forced, experts_label)
    experts_tied = np.where(forced >= 0, False, experts_tied)
    leading = np.where(forced >= 0, forced, leading)
    tied = np.where(forced >= 0, False, tied)

    rows = np.arange(n)
    early = np.zeros(n, dtype=bool)
    disagreeing = _share(index[crowd], w[crowd], votes.label[crowd] != leading[index[crowd]], n)
    if early_confidence is not None:
        early = (n_crowd >= EARLY_MIN_CROWD_VOTES) & ~tied & (posterior[rows, leading] >= early_confidence - _TIE_RTOL)
        if method == "dawid_skene" and prior_item is not None and prior is not None and len(prior_item):
            early |= _settled_by_prior(items, posterior, leading, tied, n_crowd, prior_item, prior, early_confidence)
        early &= ~(disagreeing > contested_threshold)  # a split asks for more votes (domain.consensus)
    pending = ~decided & (n_crowd < votes_required) & ~early
    status = np.where(
        decided,
        np.where(~experts_tied & (leading == experts_label), EXPERT_CODE, CONTESTED_CODE),
        np.where(
            pending, PENDING_CODE, np.where(tied | (disagreeing > contested_threshold), CONTESTED_CODE, AGREED_CODE)
        ),
    ).astype(np.int8)
    label = np.where(pending, -1, leading)
    agreement = np.where(label >= 0, _share(index, w, votes.label == label[index], n), 0.0)
    confidence = np.where(label >= 0, posterior[rows, np.maximum(label, 0)], 0.0)
    return ArrayResults(
        item=items,
        label=label.astype(np.int64),
        confidence=confidence,
        posterior=posterior,
        vote_count=np.bincount(index, minlength=n).astype(np.int64),
        agreement=agreement,
        status=status,
        method=method,
    )


def _settled_by_prior(
    items: np.ndarray,
    posterior: np.ndarray,
    leading: np.ndarray,
    tied: np.ndarray,
    n_crowd: np.ndarray,
    prior_item: np.ndarray,
    prior: np.ndarray,
    confidence: float,
) -> np.ndarray:
    """``consensus._settled_by_prior`` per item (False where the item has no prior)."""
    n, k = posterior.shape
    prior_item = np.asarray(prior_item, dtype=np.int64)
    prior = np.asarray(prior, dtype=np.float64).reshape(len(prior_item), k)
    at, inside = find_sorted(items, prior_item)
    has = np.zeros(n, dtype=bool)
    has[at[inside]] = True
    weights = np.ones((n, k))
    weights[at[inside]] = np.maximum(prior[inside], 0.0)
    combined = _normalise(posterior * weights)
    best, best_tied = _leading(combined)
    rows = np.arange(n)
    return (
        has
        & (n_crowd >= EARLY_MIN_CROWD_VOTES_WITH_PRIOR)
        & ~tied
        & ~best_tied
        & (best == leading)
        & (combined[rows, leading] >= confidence - _TIE_RTOL)
    )


def _empty(k: int, method: str) -> ArrayResults:
    floats, ints = np.zeros(0), np.zeros(0, dtype=np.int64)
    return ArrayResults(ints, ints, floats, np.zeros((0, k)), ints, floats, np.zeros(0, dtype=np.int8), method)


def _dawid_skene(
    votes: VoteArrays,
    index: np.ndarray,
    n: int,
    k: int,
    has_expert: np.ndarray,
    experts_label: np.ndarray,
    experts_tied: np.ndarray,
    gold_rows: np.ndarray,
    gold_labels: np.ndarray,
    gold_positions: np.ndarray,
) -> np.ndarray:
    """``batch_consensus``'s Dawid-Skene posteriors: known items one-hot, crowd items from the fit (down-weighted
    votes interpolated, the "Vote weights" rule), items with only tied expert votes their vote shares."""
    # Known labels (``_truth_labels``): untied expert decisions, then gold, which wins. Their order is the
    # truth dict's: items by first vote, then gold items without an expert decision in the gold mapping's order.
    truth = np.where(has_expert & ~experts_tied, experts_label, -1)
    first_vote = np.full(n, len(votes), dtype=np.int64)
    np.minimum.at(first_vote, index, np.arange(len(votes), dtype=np.int64))
    rank = np.where(truth >= 0, first_vote, len(votes) + len(gold_rows))
    added = truth[gold_rows] < 0
    rank[gold_rows[added]] = len(votes) + gold_positions[added]
    truth[gold_rows] = gold_labels

    def fit(used: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(items, posteriors, priors or None) of crowd-kit's fit on the crowd votes among ``used``."""
        crowd = np.flatnonzero(used & ~votes.expert)
        if not len(crowd):
            return np.zeros(0, dtype=np.int64), np.zeros((0, k)), None
        tasks, task = unique_inverse(index[crowd])
        known = truth[tasks]
        order = np.flatnonzero(known >= 0)
        order = order[np.argsort(rank[tasks[order]], kind="stable")]
        found = fit_crowdkit(
            task, votes.annotator[crowd], votes.label[crowd], n_tasks=len(tasks), n_classes=k, truth=known,
            truth_order=order,
        )  # fmt: skip
        return tasks, found.posteriors, found.priors

    everything = np.ones(len(votes), dtype=bool)
    below = np.unique(votes.weight[votes.weight < 1])
    if len(below) > 1:
        raise ValueError(
            f"The iterative methods take one weight below 1 for all down-weighted votes, not {below.tolist()!r}."
        )
    tasks, fitted, _ = fit(everything)
    if len(below):
        (w,) = below.tolist()
        without_tasks, without, priors = fit(votes.weight == 1)
        base = np.empty_like(fitted)
        base[:] = np.full(k, 1.0 / k) if priors is None else priors
        at = np.searchsorted(tasks, without_tasks)
        base[at] = without
        fitted = _normalise((fitted**w) * (base ** (1 - w)))

    posterior = _normalise(_sums(index, votes.label, votes.weight, n, k))  # only tied expert votes
    posterior[tasks] = fitted
    known = np.flatnonzero(truth >= 0)
    posterior[known] = 0.0
    posterior[known, truth[known]] = 1.0
    return posterior


def expert_decisions(votes: VoteArrays, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """``agreement.expert_labels`` on arrays: the items the experts settled (the weighted majority of their votes,
    not tied) ascending, and the label index they gave. The votes are not validated here: the recompute passes
    the same arrays to ``batch_consensus_arrays``, which does (``validate_arrays``)."""
    expert = votes.expert
    items, index = unique_inverse(votes.item[expert])
    if not len(items):
        return items, np.zeros(0, dtype=np.int64)
    label, tied = _leading(_sums(index, votes.label[expert], votes.weight[expert], len(items), n_labels))
    return items[~tied], label[~tied].astype(np.int64)


def from_results(results: Mapping[Any, ConsensusResult], labels: Sequence[str], method: str) -> ArrayResults:
    """``batch_consensus``'s results (the methods without an array path: GLAD, MACE) as ArrayResults."""
    if not results:
        return _empty(len(labels), method)
    index = {label: j for j, label in enumerate(labels)}
    items = sorted(results, key=int)
    ordered = [results[item] for item in items]
    return ArrayResults(
        item=np.array([int(item) for item in items], dtype=np.int64),
        label=np.array([index[r.label] if r.label is not None else -1 for r in ordered], dtype=np.int64),
        confidence=np.array([r.confidence for r in ordered], dtype=np.float64),
        posterior=np.array([[r.posterior[label] for label in labels] for r in ordered], dtype=np.float64),
        vote_count=np.array([r.vote_count for r in ordered], dtype=np.int64),
        agreement=np.array([r.agreement for r in ordered], dtype=np.float64),
        status=np.array([STATUSES.index(r.status) for r in ordered], dtype=np.int8),
        method=method,
    )


# ---------------------------------------------------------------------------------------------------
# What a recompute writes


@dataclass(frozen=True)
class StoredRows:
    """A project's stored consensus rows, patches ascending (annotations.consensus_batch.stored_rows): ``label``
    an index (-1 none, -2 a label not the project's), ``status`` an index into STATUSES (-1 another), ``method``
    whether it is the method being computed, ``keys`` 0 when the posterior names exactly the project's labels,
    1 when it is empty, 2 otherwise, ``posterior`` (rows, K) the stored probabilities."""

    item: np.ndarray
    id: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    agreement: np.ndarray
    vote_count: np.ndarray
    status: np.ndarray
    method: np.ndarray
    keys: np.ndarray
    posterior: np.ndarray


@dataclass(frozen=True)
class Changes:
    """What a recompute writes (annotations.consensus._recompute_project): ``create`` and ``update`` are result
    rows (``update_ids`` the stored rows they rewrite), ``to_pending`` stored row ids whose votes no longer count;
    ``settled``, ``unsettled`` and ``contested`` patch ids (tasks to close, tasks to reopen, reviews to queue)."""

    create: np.ndarray
    update: np.ndarray
    update_ids: np.ndarray
    to_pending: np.ndarray
    settled: np.ndarray
    unsettled: np.ndarray
    contested: np.ndarray


def plan_changes(stored: StoredRows, results: ArrayResults, tolerance: float) -> Changes:
    """The record path's comparison (``_changed``): label, status, method and vote count exactly, the
    probabilities within ``tolerance``) and its settled / unsettled / newly contested rules, on arrays."""
    n = len(results)
    safe, exists = find_sorted(stored.item, results.item)
    s = safe[exists]
    r = np.flatnonzero(exists)
    changed = (
        (results.label[r] != stored.label[s])
        | (results.status[r] != stored.status[s])
        | ~stored.method[s]
        | (results.vote_count[r] != stored.vote_count[s])
        | (np.abs(results.confidence[r] - stored.confidence[s]) > tolerance)
        | (np.abs(results.agreement[r] - stored.agreement[s]) > tolerance)
        | (stored.keys[s] != 0)
        | (np.abs(results.posterior[r] - stored.posterior[s]) > tolerance).any(axis=1)
    )
    # Stored rows without a result (their votes no longer count) go back to pending, when not already so.
    gone = np.ones(len(stored.item), dtype=bool)
    gone[s] = False
    g = np.flatnonzero(gone)
    to_pending = g[
        (stored.label[g] != -1)
        | (stored.status[g] != PENDING_CODE)
        | ~stored.method[g]
        | (stored.vote_count[g] != 0)
        | (np.abs(stored.confidence[g]) > tolerance)
        | (np.abs(stored.agreement[g]) > tolerance)
        | (stored.keys[g] != 1)
    ]
    before = np.full(n, -2, dtype=np.int64)  # -2: no stored row
    before[r] = stored.status[s]
    status = results.status
    settled = (status != PENDING_CODE) & ((before == -2) | (before == PENDING_CODE))
    unsettled = (status == PENDING_CODE) & (before != -2) & (before != status)
    contested = (status == CONTESTED_CODE) & (before != CONTESTED_CODE)
    left = to_pending[stored.status[to_pending] != PENDING_CODE]  # they were settled: ask the crowd again
    return Changes(
        create=np.flatnonzero(~exists),
        update=r[changed],
        update_ids=stored.id[s[changed]],
        to_pending=stored.id[to_pending],
        settled=results.item[settled],
        unsettled=np.concatenate([stored.item[left], results.item[unsettled]]),
        contested=results.item[contested],
    )
