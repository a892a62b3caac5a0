"""Benchmark: the online reliability refit (annotations.domain.dawid_skene.fit_arrays) against crowd-kit's
Dawid-Skene (annotations.domain.consensus.fit_dawid_skene, what a round's batch consensus runs), and at 3M votes.

A simulated crowd: ``--students`` students with per-class accuracies drawn from [0.6, 0.85], 5 classes, 3 votes
per patch, 5% of patches with a known (expert) label. Three measurements:

1. Both fits on the same ``--small`` votes: seconds each, their ratio, and how far their confusion matrices are
   apart (max absolute cell difference), so the speed is for the same answer.
2. ``fit_arrays`` cold on ``--large`` votes: seconds and EM iterations.
3. The online case: 1% more votes, warm-started from (2): seconds and iterations.

    .venv/bin/python tests/bench/bench_online_consensus.py [--small 60000] [--large 3000000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from annotations.domain.consensus import VoteRecord, fit_dawid_skene  # noqa: E402
from annotations.domain.dawid_skene import fit_arrays  # noqa: E402

K = 5


def crowd(n_votes: int, students: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(item, worker, label) arrays of ``n_votes`` votes (3 per item) and each item's known label or -1."""
    rng = np.random.default_rng(seed)
    n_items = n_votes // 3
    truth = rng.integers(0, K, n_items)
    accuracy = rng.uniform(0.6, 0.85, size=(students, K))
    item = np.repeat(np.arange(n_items), 3)
    # Three different students per item: a start and a stride below a third of the crowd.
    start, stride = rng.integers(0, students, n_items), rng.integers(1, students // 3, n_items)
    worker = (np.repeat(start, 3) + np.tile(np.arange(3), n_items) * np.repeat(stride, 3)) % students
    right = rng.random(len(item)) < accuracy[worker, truth[item]]
    wrong = (truth[item] + rng.integers(1, K, len(item))) % K
    label = np.where(right, truth[item], wrong)
    known = np.where(rng.random(n_items) < 0.05, truth, -1)
    return item, worker, label, known


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=60_000)
    parser.add_argument("--large", type=int, default=3_000_000)
    parser.add_argument("--students", type=int, default=300)
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.1f}")

    item, worker, label, known = crowd(args.small, args.students, 0)
    n_items = len(known)
    names = [f"c{c}" for c in range(K)]
    records = [
        VoteRecord(item=int(i), annotator=int(w), label=names[c], role="crowd")
        for i, w, c in zip(item, worker, label, strict=True)
    ]
    truth = {int(i): names[known[i]] for i in np.flatnonzero(known >= 0)}
    reference, t_ck = timed(lambda: fit_dawid_skene(records, names, truth=truth))
    fit, t_arr = timed(
        lambda: fit_arrays(
            item, worker, label, n_items=n_items, n_workers=args.students, n_classes=K, truth=known, tol=0.0
        )
    )
    seen = sorted(reference.confusion)
    gaps = np.stack([np.abs(fit.confusion[w] - np.array(reference.confusion[w])) for w in seen])
    diff, mean_diff = float(gaps.max()), float(gaps.mean())
    ours = fit.posteriors.argmax(axis=1)
    theirs = np.array([max(reference.posteriors[i], key=reference.posteriors[i].get) for i in range(n_items)])
    same = float((np.array(names)[ours] == theirs).mean())
    print(
        f"{args.small:,} votes: crowd-kit {t_ck:.2f} s, arrays {t_arr:.2f} s ({fit.iterations} iterations, as "
        f"crowd-kit's 100), ratio {t_ck / t_arr:.1f}x; confusion cells differ by {mean_diff:.4f} on average, "
        f"{diff:.4f} at most; same item label {same:.2%}"
    )

    item, worker, label, known = crowd(args.large, args.students, 1)
    n_items = len(known)
    sizes = {"n_workers": args.students, "n_classes": K}
    cold, t_cold = timed(
        lambda: fit_arrays(
            item[:-30_000],
            worker[:-30_000],
            label[:-30_000],
            n_items=n_items - 10_000,
            truth=known[:-10_000],
            tol=1e-4,
            **sizes,
        )
    )
    print(
        f"{args.large - 30_000:,} votes cold: {t_cold:.1f} s, {cold.iterations} iterations, converged {cold.converged}"
    )
    warm, t_warm = timed(
        lambda: fit_arrays(
            item, worker, label, n_items=n_items, truth=known, warm_confusion=cold.confusion, warm_priors=cold.priors,
            tol=1e-4, **sizes,
        )
    )  # fmt: skip
    print(f"+30,000 votes warm: {t_warm:.1f} s, {warm.iterations} iterations, converged {warm.converged}")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
