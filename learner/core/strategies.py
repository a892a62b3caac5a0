"""Query strategies as pure functions over probability and embedding arrays.

Uncertainty scores reuse modAL's array functions (`modAL.uncertainty._proba_uncertainty`, `_proba_margin`,
`_proba_entropy`): modAL's public `classifier_*` functions need a fitted classifier object and would call
`predict_proba` again, while a round already holds the pool's probabilities. Every score is oriented so
that higher means "ask a human about this one first".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from modAL.uncertainty import _proba_entropy, _proba_margin, _proba_uncertainty
from sklearn.cluster import KMeans, MiniBatchKMeans

from learner.core.errors import LearnerError, StopFn, check_stop

Strategy = Literal["least_confidence", "margin", "entropy", "random", "diverse", "kcenter"]
STRATEGIES: tuple[str, ...] = ("least_confidence", "margin", "entropy", "random", "diverse", "kcenter")
RANDOM_ARM = "random"
# Clustering and distances run on this many principal components of the embeddings (see reduce_dims).
PCA_DIMS = 64
# "diverse" clusters the DIVERSE_PREFILTER x n most uncertain candidates into n clusters.
DIVERSE_PREFILTER = 10


@dataclass(frozen=True)
class Selection:
    """One chosen pool item: its index into the pool arrays, the arm that chose it, and that arm's score."""

    index: int
    arm: str
    score: float | None


def least_confidence(proba: np.ndarray) -> np.ndarray:
    return np.asarray(_proba_uncertainty(proba), dtype=float)


def margin(proba: np.ndarray) -> np.ndarray:
    """1 - (p_top1 - p_top2): 1 for a tie between the two best classes, 0 for a certain prediction."""
    return 1.0 - np.asarray(_proba_margin(proba), dtype=float)


def entropy(proba: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats (scipy, rows renormalised)."""
    return np.asarray(_proba_entropy(proba), dtype=float)


UNCERTAINTY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "least_confidence": least_confidence,
    "margin": margin,
    "entropy": entropy,
}


def _check_proba(proba: np.ndarray | None, strategy: str) -> np.ndarray:
    if proba is None:
        raise LearnerError(f"The '{strategy}' strategy needs class probabilities for the pool.")
    p = np.asarray(proba, dtype=float)
    if p.ndim != 2 or p.shape[1] < 2:
        raise LearnerError(f"Probabilities must be a 2-D array (items x classes >= 2), got shape {p.shape}.")
    return p


def reduce_dims(x: np.ndarray, max_dims: int, extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Project to at most `max_dims` principal components (fitted on x), and `extra` into the same space.
    k-means and k-centre on 1280-d embeddings of a 15k pool take minutes on two cores; on 64 PCA
    dimensions they take about a second and keep the cluster structure that matters for spreading a
    batch out."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1] <= max_dims or len(x) <= max_dims:
        return x, extra
    # principal axes from the covariance of a subsample: an eigh of d x d is several times faster here
    # than sklearn's randomized PCA, and 3,000 rows pin down the leading directions well enough
    rows = np.random.default_rng(0).choice(len(x), size=min(len(x), 3000), replace=False)
    mean = x[rows].mean(axis=0)
    centred = x[rows] - mean
    _, vectors = np.linalg.eigh(centred.T @ centred)
    basis = np.ascontiguousarray(vectors[:, ::-1][:, :max_dims])
    has_extra = extra is not None and len(extra) > 0
    projected_extra = (np.asarray(extra, dtype=np.float32) - mean) @ basis if has_extra else extra
    return (x - mean) @ basis, projected_extra


def top_n(scores: np.ndarray, n: int, candidates: np.ndarray) -> np.ndarray:
    """Indices (from `candidates`) of the n highest scores, highest first; ties broken by lower index."""
    if n <= 0 or len(candidates) == 0:
        return np.zeros(0, dtype=int)
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:n]]


def kcenter_greedy(
    embeddings: np.ndarray,
    n: int,
    candidates: np.ndarray,
    centres: np.ndarray | None = None,
    should_stop: StopFn | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-first traversal (Sener & Savarese's core-set greedy): repeatedly take the candidate farthest
    from everything chosen so far and from `centres` (e.g. the labelled set). Without centres it starts at
    the candidate nearest the mean, so the result is deterministic. Returns (indices, distance when picked).
    """
    x = np.asarray(embeddings, dtype=np.float32)[candidates]
    if len(x) == 0 or n <= 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    sq = (x * x).sum(1)

    def dist_to(points: np.ndarray) -> np.ndarray:
        # min over points of squared euclidean distance, in chunks to bound memory
        best = np.full(len(x), np.inf, dtype=np.float32)
        for start in range(0, len(points), 1024):
            p = points[start : start + 1024]
            d = sq[:, None] - 2 * x @ p.T + (p * p).sum(1)[None, :]
            best = np.minimum(best, d.min(axis=1))
        return np.maximum(best, 0)

    chosen: list[int] = []
    picked_dist: list[float] = []
    if centres is not None and len(centres):
        min_d = dist_to(np.asarray(centres, dtype=np.float32))
    else:
        first = int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
        chosen.append(first)
        picked_dist.append(0.0)
        min_d = dist_to(x[first : first + 1])
    while len(chosen) < min(n, len(x)):
        check_stop(should_stop, "select")
        nxt = int(np.argmax(min_d))
        chosen.append(nxt)
        picked_dist.append(float(np.sqrt(min_d[nxt])))
        min_d = np.minimum(min_d, dist_to(x[nxt : nxt + 1]))
    return candidates[np.array(chosen, dtype=int)], np.array(picked_dist)


def cluster_then_uncertainty(
    embeddings: np.ndarray,
    scores: np.ndarray,
    n: int,
    candidates: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Diverse mini-batch selection (Zhdanov 2019): keep the `DIVERSE_PREFILTER * n` most uncertain candidates,
    cluster them into n groups with k-means, take the most uncertain item of each cluster. Highest score first."""
    pool = top_n(scores, min(len(candidates), max(n, DIVERSE_PREFILTER * n)), candidates)
    if len(pool) <= n:
        return pool
    x = np.asarray(embeddings, dtype=np.float32)[pool]
    seed = int(rng.integers(2**31 - 1))
    labels = KMeans(n_clusters=n, random_state=seed, n_init=1).fit_predict(x)
    picks = []
    for c in range(n):
        members = pool[labels == c]
        if len(members):
            picks.append(top_n(scores, 1, members)[0])
    picked = np.array(picks, dtype=int)
    if len(picked) < n:  # empty clusters: fill with the next most uncertain
        rest = np.setdiff1d(pool, picked)
        picked = np.concatenate([picked, top_n(scores, n - len(picked), rest)])
    return picked[np.argsort(-scores[picked], kind="stable")]


def interleave(strategy_picks: list[Selection], random_picks: list[Selection]) -> list[Selection]:
    """Spread random-arm items evenly through the batch, so a queue worked only halfway still has both arms."""
    total = len(strategy_picks) + len(random_picks)
    if not random_picks:
        return list(strategy_picks)
    slots = {round((j + 0.5) * total / len(random_picks) - 0.5) for j in range(len(random_picks))}
    out: list[Selection] = []
    s_iter, r_iter = iter(strategy_picks), iter(random_picks)
    for pos in range(total):
        nxt = next(r_iter, None) if pos in slots else next(s_iter, None)
        if nxt is None:  # slot collision or exhaustion: take from whichever remains
            nxt = next(s_iter, None) or next(r_iter)
        out.append(nxt)
    return out


def _split_random(
    n: int, pool_size: int, random_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 <= random_fraction <= 1.0:
        raise LearnerError(f"random_fraction must be between 0 and 1, got {random_fraction}.")
    n = min(n, pool_size)
    n_random = round(n * random_fraction)
    random_idx = np.sort(rng.choice(pool_size, size=n_random, replace=False)) if n_random else np.zeros(0, int)
    remaining = np.setdiff1d(np.arange(pool_size), random_idx)
    return random_idx, remaining


def select_batch(
    strategy: str,
    n: int,
    *,
    proba: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    labelled_embeddings: np.ndarray | None = None,
    random_fraction: float = 0.1,
    rng: np.random.Generator | int | None = None,
    uncertainty: str = "margin",
    should_stop: StopFn | None = None,
) -> list[Selection]:
    """Choose n pool items: round(n * random_fraction) uniformly at random (arm "random", drawn first from the
    whole pool so the control arm is unbiased), the rest by `strategy` (arm = strategy name).

    Strategies: "least_confidence", "margin", "entropy" (need proba); "diverse" (cluster-then-uncertainty,
    needs proba + embeddings, ranks by `uncertainty`); "kcenter" (core-set greedy, needs embeddings and
    optionally labelled_embeddings as existing centres); "random". Pool indices refer to rows of proba /
    embeddings. Returned in priority order, the random arm interleaved evenly; `score` is the strategy's
    criterion (uncertainty, or distance for kcenter); random-arm items carry their uncertainty when known.
    Clustering and distances use at most `PCA_DIMS` principal components of the embeddings.
    """
    if strategy not in STRATEGIES:
        raise LearnerError(f"Unknown query strategy '{strategy}'. Choose one of {', '.join(STRATEGIES)}.")
    if uncertainty not in UNCERTAINTY:
        raise LearnerError(f"Unknown uncertainty '{uncertainty}'. Choose one of {', '.join(UNCERTAINTY)}.")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    sizes = {len(a) for a in (proba, embeddings) if a is not None}
    if len(sizes) > 1:
        raise LearnerError("proba and embeddings must describe the same pool (same number of rows).")
    if not sizes:
        raise LearnerError("select_batch needs the pool's probabilities or embeddings.")
    pool_size = sizes.pop()
    random_idx, remaining = _split_random(n, pool_size, 1.0 if strategy == "random" else random_fraction, gen)
    n_strategy = min(n, pool_size) - len(random_idx)
    check_stop(should_stop, "select")

    scores: np.ndarray | None = None
    if strategy in UNCERTAINTY:
        scores = UNCERTAINTY[strategy](_check_proba(proba, strategy))
    elif proba is not None:
        scores = UNCERTAINTY[uncertainty](_check_proba(proba, strategy))

    arm_scores: np.ndarray | None = scores
    if strategy == "random" or n_strategy <= 0:
        picked = np.zeros(0, dtype=int)
    elif strategy in UNCERTAINTY:
        assert scores is not None
        picked = top_n(scores, n_strategy, remaining)
    elif strategy == "diverse":
        if embeddings is None or scores is None:
            raise LearnerError("The 'diverse' strategy needs both probabilities and embeddings for the pool.")
        reduced, _ = reduce_dims(embeddings, PCA_DIMS)
        picked = cluster_then_uncertainty(reduced, scores, n_strategy, remaining, gen)
    else:  # kcenter
        if embeddings is None:
            raise LearnerError("The 'kcenter' strategy needs embeddings for the pool.")
        reduced, centres = reduce_dims(embeddings, PCA_DIMS, extra=labelled_embeddings)
        picked, dist = kcenter_greedy(reduced, n_strategy, remaining, centres, should_stop)
        arm_scores = np.zeros(pool_size)
        arm_scores[picked] = dist

    def score_of(values: np.ndarray | None, i: int) -> float | None:
        return None if values is None else float(values[i])

    strategy_sel = [Selection(int(i), strategy, score_of(arm_scores, int(i))) for i in picked]
    random_order = gen.permutation(random_idx)
    random_sel = [Selection(int(i), RANDOM_ARM, score_of(scores, int(i))) for i in random_order]
    return interleave(strategy_sel, random_sel)


def cold_start(
    embeddings: np.ndarray,
    n: int,
    *,
    method: Literal["kmeans", "kcenter"] = "kmeans",
    random_fraction: float = 0.1,
    rng: np.random.Generator | int | None = None,
    should_stop: StopFn | None = None,
) -> list[Selection]:
    """The first batch, before any label: spread over the pretrained-embedding space.

    "kmeans": k-means with n clusters, the item nearest each centroid (representative, avoids outliers);
    "kcenter": farthest-first traversal (covers the space, outliers included). A random control arm as in
    `select_batch`. Arm name is "cold_start_<method>"; score is the distance to centroid (kmeans) or the
    covering distance when picked (kcenter), both in the `PCA_DIMS` principal-component space.
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise LearnerError(f"Embeddings must be a 2-D array (items x features), got shape {x.shape}.")
    x, _ = reduce_dims(x, PCA_DIMS)
    random_idx, remaining = _split_random(n, len(x), random_fraction, gen)
    k = min(n, len(x)) - len(random_idx)
    arm = f"cold_start_{method}"
    picks: list[Selection] = []
    if k > 0:
        check_stop(should_stop, "cold start")
        if method == "kcenter":
            idx, dist = kcenter_greedy(x, k, remaining, None, should_stop)
            picks = [Selection(int(i), arm, float(d)) for i, d in zip(idx, dist, strict=True)]
        elif method == "kmeans":
            seed = int(gen.integers(2**31 - 1))
            xr = x[remaining]
            if len(xr) > 50_000:
                km: KMeans | MiniBatchKMeans = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3)
            else:
                km = KMeans(n_clusters=k, random_state=seed, n_init=1)
            labels = km.fit_predict(xr)
            check_stop(should_stop, "cold start")
            d = ((xr - km.cluster_centers_[labels]) ** 2).sum(1)
            for c in range(k):
                members = np.flatnonzero(labels == c)
                if len(members):
                    best = members[np.argmin(d[members])]
                    picks.append(Selection(int(remaining[best]), arm, float(np.sqrt(d[best]))))
        else:
            raise LearnerError(f"Unknown cold-start method '{method}'. Use 'kmeans' or 'kcenter'.")
    random_sel = [Selection(int(i), RANDOM_ARM, None) for i in gen.permutation(random_idx)]
    return interleave(picks, random_sel)
