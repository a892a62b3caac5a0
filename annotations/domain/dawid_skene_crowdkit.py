"""crowd-kit 1.4.2's ``DawidSkene(n_iter=100).fit(data, true_labels)`` on integer arrays, step for step.

The batch consensus (``domain.consensus.fit_dawid_skene``) runs crowd-kit over a pandas frame of VoteRecords:
at 3M votes the records and frames take most of a snapshot's minutes. ``domain.dawid_skene.fit_arrays`` is
fast but is a different fit (its own floor, start and stopping rule): switching the batch to it moved 0.22% of
the labels and rewrote half the rows once. This module is the same fit as crowd-kit's, written with
``np.bincount`` over the votes, so the batch gives the same posteriors (to rounding) at a fraction of the cost.
What it replicates, read from crowd-kit's source (``aggregation/classification/dawid_skene.py``):

- Columns: the labels the crowd used plus the known labels of items the crowd voted on; any other label of
  the project is not a column (its probability is 0 after ``_posteriors_from_frame``).
- Start: majority vote shares (unweighted counts per item), corrected by the known labels (one-hot), with
  pandas' quirk kept: a known label no crowd vote used becomes a new column while the corrections run, NaN
  in the rows written before it existed and in every unknown row, so its starting prior is a mean over the
  defined rows only (``probas.mean()`` skips NaN; the M-step's ``groupby().sum()`` treats NaN as 0).
- M-step: per (worker, observed label) the summed posteriors, floored at 1e-10 (only the pairs that occur),
  divided per worker and true class by the sum over the labels that worker used.
- E-step: log2 prior (floored at 1e-10) plus each vote's log2 error; shifted by the row max, exp2, normalised;
  the known items then corrected to one-hot; priors the mean posterior.
- Stopping: after each iteration the evidence lower bound per vote (Σ over votes and classes of
  posterior · (ln error + ln prior) plus the posteriors' entropy, both floored at 1e-10 as crowd-kit's
  in-place clips do); stop when it improves by less than ``tol`` (1e-5) or after ``n_iter`` iterations.
- Output: the last posteriors floored at 1e-10 (crowd-kit clips them in place in the bound) and the priors
  (unfloored means).

The property test ``tests/unit/test_consensus_arrays.py`` checks this against crowd-kit itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-10  # crowd-kit's _EPS


@dataclass(frozen=True)
class CrowdkitFit:
    """``posteriors`` (tasks, K) over the project's K labels (0 for labels that were not columns), rows summing
    to 1 as ``consensus._posteriors_from_frame`` leaves them; ``priors`` (K) as ``fit_dawid_skene`` reports them
    (reindexed, 0 where not a column); ``iterations`` the EM iterations run (crowd-kit's ``len(loss_history_)``)."""

    posteriors: np.ndarray
    priors: np.ndarray
    iterations: int


def fit_crowdkit(
    task: np.ndarray,
    worker: np.ndarray,
    label: np.ndarray,
    *,
    n_tasks: int,
    n_classes: int,
    truth: np.ndarray,
    truth_order: np.ndarray,
    n_iter: int = 100,
    tol: float = 1e-5,
) -> CrowdkitFit:
    """Fit crowd-kit's Dawid-Skene to these crowd votes (see the module docstring).

    ``task`` (votes) indexes tasks 0..n_tasks-1, each with at least one vote; ``worker`` any int index;
    ``label`` the project label index. ``truth`` (n_tasks) is each task's known label or -1;
    ``truth_order`` lists the known tasks in the order of the ``true_labels`` series (it decides which rows a
    new column's start leaves NaN, nothing else).
    """
    task, label = np.asarray(task, dtype=np.int64), np.asarray(label, dtype=np.int64)
    workers, worker = unique_inverse(np.asarray(worker, dtype=np.int64))
    n_workers = len(workers)
    truth = np.asarray(truth, dtype=np.int64)
    known = truth >= 0
    known_tasks = np.flatnonzero(known)
    # The columns: labels the crowd used, and known labels (of these tasks) no crowd vote used.
    crowd_used = np.bincount(label, minlength=n_classes) > 0
    columns = np.flatnonzero(crowd_used | (np.bincount(truth[known], minlength=n_classes) > 0))
    kc = len(columns)
    col = np.full(n_classes, -1, dtype=np.int64)
    col[columns] = np.arange(kc)
    lab = col[label]
    tru = np.where(known, col[np.maximum(truth, 0)], -1)
    # Posteriors are kept class-major, (classes, tasks): each class's column is contiguous for the gathers and
    # bincounts over the votes, and a task's max and sum over classes are elementwise over a few rows.
    one_hot = np.zeros((kc, len(known_tasks)))
    one_hot[tru[known_tasks], np.arange(len(known_tasks))] = 1.0

    def correct(post: np.ndarray) -> np.ndarray:
        post[:, known_tasks] = one_hot
        return post

    # Start: majority vote shares, corrected; the priors with pandas' NaN rows of new columns skipped.
    counts = np.bincount(lab * n_tasks + task, minlength=kc * n_tasks).reshape(kc, n_tasks).astype(np.float64)
    post = correct(counts / counts.sum(axis=0))
    priors = post.mean(axis=1) if n_tasks else np.zeros(kc)
    new_columns = np.flatnonzero(~crowd_used[columns])
    if len(new_columns):
        ordered = np.asarray(truth_order, dtype=np.int64)
        labels_in_order = tru[ordered]
        _, first = np.unique(labels_in_order, return_index=True)
        rank = np.full(kc, -1, dtype=np.int64)
        rank[labels_in_order[np.sort(first)]] = np.arange(len(first))  # true_labels.unique() order
        row_rank = rank[tru[ordered]]
        for c in new_columns:
            defined = row_rank >= rank[c]  # rows corrected at or after the column was created
            priors[c] = post[c, ordered[defined]].mean()

    cell = worker * kc + lab
    n_cells = n_workers * kc
    present = (np.bincount(cell, minlength=n_cells) > 0).reshape(n_workers, kc)
    n_votes = len(task)

    def m_step(post: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sums = np.empty((n_workers, kc, kc))  # worker, observed label, true label
        for c in range(kc):
            sums[:, :, c] = np.bincount(cell, weights=post[c][task], minlength=n_cells).reshape(n_workers, kc)
        floored = np.where(present[:, :, None], np.maximum(sums, EPS), 0.0)
        errors = floored / floored.sum(axis=1, keepdims=True)
        return sums, errors

    def e_step(priors: np.ndarray, errors: np.ndarray) -> np.ndarray:
        # (true class, cell): each class's log2 errors contiguous for the gather over the votes
        log_errors = np.log2(np.where(present[:, :, None], errors, 1.0)).reshape(n_cells, kc).T.copy()
        log_lik = np.empty((kc, n_tasks))
        log_priors = np.log2(np.maximum(priors, EPS))
        for c in range(kc):
            log_lik[c] = log_priors[c] + np.bincount(task, weights=log_errors[c][cell], minlength=n_tasks)
        scaled = np.exp2(log_lik - log_lik.max(axis=0))
        return scaled / scaled.sum(axis=0)

    def lower_bound(post: np.ndarray, priors: np.ndarray, sums: np.ndarray, errors: np.ndarray) -> float:
        log_errors = np.log(np.where(present[:, :, None], errors, 1.0))
        joint = float((sums * log_errors).sum()) + float(sums.sum(axis=(0, 1)) @ np.log(np.maximum(priors, EPS)))
        floored = np.maximum(post, EPS)
        entropy = -float((np.log(floored) * floored).sum())
        return (joint + entropy) / n_votes

    _, errors = m_step(post)
    loss, iterations = -np.inf, 0
    for _ in range(n_iter):
        iterations += 1
        post = correct(e_step(priors, errors))
        priors = post.mean(axis=1)
        sums, errors = m_step(post)
        new_loss = lower_bound(post, priors, sums, errors)
        if new_loss - loss < tol:
            break
        loss = new_loss

    # The output as fit_dawid_skene leaves it: floored, renormalised, over the project's labels.
    floored = np.maximum(post, EPS)
    posteriors = np.zeros((n_tasks, n_classes))
    posteriors[:, columns] = (floored / floored.sum(axis=0)).T
    full_priors = np.zeros(n_classes)
    full_priors[columns] = priors
    return CrowdkitFit(posteriors=posteriors, priors=full_priors, iterations=iterations)


def unique_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(ids, return_inverse=True)``, by a bincount when the ids are small non-negative integers (patch
    and annotator ids: no sort of millions of votes)."""
    if len(ids) and ids.min() >= 0 and ids.max() < 4 * len(ids) + 1024:
        seen = np.bincount(ids) > 0
        return np.flatnonzero(seen), (np.cumsum(seen) - 1)[ids]
    values, inverse = np.unique(ids, return_inverse=True)
    return values, inverse.reshape(-1)
