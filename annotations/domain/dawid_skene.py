"""Dawid-Skene on integer arrays: the same model as ``consensus.fit_dawid_skene`` (crowd-kit's), for millions of votes.

``consensus.fit_dawid_skene`` takes VoteRecords and a pandas frame: right for a round's batch consensus, too
slow and too big to refit a project's crowd every few seconds (at 3M votes the records alone are gigabytes).
This fit takes the votes as parallel numpy arrays (item index, worker index, label index, weight) and runs the
same EM with vectorised steps (``np.bincount`` over the votes, no Python loop over votes, items or workers):

- E-step: an item's posterior ∝ prior · Π over its votes of ``confusion[worker, :, label] ** weight``; items
  with a known label (gold and untied expert decisions) are clamped to one-hot, as crowd-kit's ``true_labels``.
- M-step: the priors are the mean posterior; ``counts[w, i, j]`` = Σ weight · posterior[item, i] over the votes
  of worker w answering j; a confusion matrix is its counts, floored at ``FLOOR`` (crowd-kit floors at 1e-10),
  row-normalised. A true class a worker never met (no evidence) is a uniform row.
- It starts from the per-item weighted vote shares (crowd-kit's majority start) or, warm, from an E-step with
  the previous fit's confusions (the online refresh: a few new votes move an converged fit a little, so it
  converges in a few iterations); it stops when no posterior moves by more than ``tol``, after ``max_iter``
  iterations, or when ``deadline`` (a ``time.monotonic()`` value) passes, and says which.

A vote weight w scales its log-likelihood, which is the "Vote weights" rule of ``domain.consensus`` (a vote's
likelihood raised to the power w) applied inside the fit rather than by interpolation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

FLOOR = 1e-6


@dataclass(frozen=True)
class ArrayFit:
    """What an array fit learned. ``counts[w]`` is worker w's K x K expected count matrix (rows: truth,
    columns: answer); ``confusion`` the same row-normalised; ``posteriors`` (items x K); ``priors`` (K)."""

    counts: np.ndarray
    confusion: np.ndarray
    priors: np.ndarray
    posteriors: np.ndarray
    iterations: int
    converged: bool


def confusion_from_counts(counts: np.ndarray) -> np.ndarray:
    """Row-normalised confusion matrices (..., K, K) from expected counts; rows without evidence uniform."""
    k = counts.shape[-1]
    evidence = counts.sum(axis=-1, keepdims=True)
    floored = np.where(evidence > 1e-9, counts + FLOOR, 1.0)
    return floored / floored.sum(axis=-1, keepdims=True) if k else floored


def fit_arrays(
    item: np.ndarray,
    worker: np.ndarray,
    label: np.ndarray,
    *,
    n_items: int,
    n_workers: int,
    n_classes: int,
    weight: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    warm_confusion: np.ndarray | None = None,
    warm_priors: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-5,
    deadline: float | None = None,
) -> ArrayFit:
    """Fit Dawid-Skene to crowd votes given as index arrays (see the module docstring).

    ``truth`` (n_items, int) holds each item's known class or -1. ``warm_confusion`` (n_workers, K, K) and
    ``warm_priors`` (K) start the EM from an earlier fit (rows of new workers may be uniform).
    """
    k = n_classes
    item, worker, label = (np.asarray(a, dtype=np.int64) for a in (item, worker, label))
    w = np.ones(len(item)) if weight is None else np.asarray(weight, dtype=np.float64)
    if not (len(item) == len(worker) == len(label) == len(w)):
        raise ValueError("The vote arrays must have the same length.")
    if len(item) and (label.min() < 0 or label.max() >= k):
        raise ValueError("A vote's label index is outside the label set.")
    known = np.full(n_items, -1, dtype=np.int64) if truth is None else np.asarray(truth, dtype=np.int64)
    clamped = known >= 0
    one_hot = np.zeros((n_items, k))
    one_hot[np.flatnonzero(clamped), known[clamped]] = 1.0

    if warm_confusion is not None:
        priors = np.full(k, 1.0 / k) if warm_priors is None else np.asarray(warm_priors, dtype=np.float64)
        post = _e_step(item, worker, label, w, np.asarray(warm_confusion, dtype=np.float64), priors, n_items)
    else:
        # The weighted share of each label among an item's votes (crowd-kit's majority-vote start).
        post = np.zeros((n_items, k))
        np.add.at(post, (item, label), w)
        sums = post.sum(axis=1, keepdims=True)
        post = np.divide(post, sums, out=np.full_like(post, 1.0 / k), where=sums > 0)
    post[clamped] = one_hot[clamped]

    iterations, converged = 0, False
    counts = _m_step(item, worker, label, w, post, n_workers, k)
    while iterations < max_iter:
        iterations += 1
        confusion = confusion_from_counts(counts)
        priors = _priors(post, k)
        new = _e_step(item, worker, label, w, confusion, priors, n_items)
        new[clamped] = one_hot[clamped]
        moved = float(np.abs(new - post).max()) if n_items else 0.0
        post = new
        counts = _m_step(item, worker, label, w, post, n_workers, k)
        if moved < tol:
            converged = True
            break
        if deadline is not None and time.monotonic() > deadline:
            break
    return ArrayFit(
        counts=counts,
        confusion=confusion_from_counts(counts),
        priors=_priors(post, k),
        posteriors=post,
        iterations=iterations,
        converged=converged,
    )


def _priors(post: np.ndarray, k: int) -> np.ndarray:
    if not len(post):
        return np.full(k, 1.0 / k)
    priors = post.mean(axis=0) + FLOOR
    return priors / priors.sum()


def _m_step(
    item: np.ndarray, worker: np.ndarray, label: np.ndarray, w: np.ndarray, post: np.ndarray, n_workers: int, k: int
) -> np.ndarray:
    """Expected counts (workers, truth, answer): one bincount per true class over the votes."""
    counts = np.empty((n_workers, k, k))
    cell = worker * k + label
    columns = np.ascontiguousarray(post.T)
    uniform = bool((w == 1).all())
    for i in range(k):
        share = np.take(columns[i], item)
        counts[:, i, :] = np.bincount(cell, weights=share if uniform else share * w, minlength=n_workers * k).reshape(
            n_workers, k
        )
    return counts


def _e_step(
    item: np.ndarray,
    worker: np.ndarray,
    label: np.ndarray,
    w: np.ndarray,
    confusion: np.ndarray,
    priors: np.ndarray,
    n_items: int,
) -> np.ndarray:
    """Posteriors (items, K) from the confusions: log prior plus each vote's weighted log-likelihood."""
    k = len(priors)
    log_conf = np.log(confusion)
    cell = worker * k + label
    uniform = bool((w == 1).all())
    log_post = np.empty((k, n_items))
    for i in range(k):
        ll = np.take(np.ascontiguousarray(log_conf[:, i, :]).ravel(), cell)
        log_post[i] = np.log(priors[i]) + np.bincount(item, weights=ll if uniform else ll * w, minlength=n_items)
    log_post -= log_post.max(axis=0, keepdims=True)
    post = np.exp(log_post)
    post /= post.sum(axis=0, keepdims=True)
    return np.ascontiguousarray(post.T)
