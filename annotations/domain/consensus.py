"""Consensus labels per patch from annotators' votes.

Two entry points:

- `consensus_for_item` runs when a vote arrives. It only uses the cheap, closed-form methods
  ("majority", "weighted", "expert_override"); a project configured for an iterative method gets the
  role-weighted interim result, recorded honestly as method "weighted" until the next batch run; unless the
  caller passes a current Dawid-Skene fit of the crowd (`Reliabilities`, the online consensus of
  annotations.reliability), when "dawid_skene" is computed per item with the fit's confusions held fixed.
- `batch_consensus` recomputes every item of a project at once and is where the iterative methods run
  (crowd-kit 1.4.2: `DawidSkene`, `GLAD`, `MACE`).

Rules shared by every method (documented here because the statuses feed the queue and the learner):

- Votes are the *active* votes: one per (item, annotator). A superseded vote must be filtered out by
  the caller; a second vote from the same annotator on an item is a ValueError, because silently
  picking one would make the result depend on the order of the input.
- "admin" votes count as "expert" votes.
- Ties: the label is the first of the tied labels in the project's label order, and the status is
  "contested" whatever the threshold, so a tie is never reported as agreement.
- Status, in order of precedence:
  1. "expert": the item has expert votes (or a gold label in `batch_consensus`) that agree on one label
     and the consensus label is that label.
  2. "contested": experts voted but tied among themselves or were outvoted (possible with "majority"
     and "weighted"), or the crowd is tied, or the share of crowd votes disagreeing with the label is
     above `contested_threshold`.
  3. "pending": no expert vote and fewer crowd votes than `votes_required`. The label is None so that
     nobody trains on it; the posterior still shows the interim leaning. With adaptive redundancy
     (`early_confidence` set) `votes_required` is a cap: a patch with at least EARLY_MIN_CROWD_VOTES crowd
     votes whose posterior gives the (untied) leading label `early_confidence` or more is not pending,
     unless its crowd votes are split beyond `contested_threshold`: a split asks for more votes, up to the cap
     (Dawid-Skene can be sure of one of two disagreeing students; settling then would send the patch to an
     expert as contested where one more crowd vote may do).
     With a model prior for the item (`priors`, the model's posterior for it when a round chose it), a
     Dawid-Skene posterior is also weighed against that prior: one crowd vote is then enough when the
     posterior times the prior, renormalised, gives the same untied leading label `early_confidence` or
     more (the prior decides only whether to stop asking; the label and its confidence stay the votes').
  4. "agreed": otherwise.
- `agreement` is the share of all the item's votes (crowd and expert) equal to the label; 0.0 when the
  label is None. `confidence` is the posterior probability of the label; 0.0 when the label is None.

Vote weights (`VoteRecord.weight`, in (0, 1]; 1 unless the caller says otherwise): a project may count
votes that accepted the model's suggestion for less than an independent vote (annotations.consensus
drops the ones it excludes, weight 0, before they get here). A weight scales the vote wherever votes are
summed: the cheap methods' scores, the experts' decision, the share of crowd votes disagreeing, and
`agreement`. It does not scale the quorum: a down-weighted vote is still one more person's vote towards
`votes_required` and `vote_count`. The iterative methods cannot weight a vote inside their fit
(crowd-kit takes none), so a weight w < 1 interpolates geometrically between the method's posterior
with those votes counted fully and without them: posterior ∝ with^w · without^(1-w). For Dawid–Skene
with its confusion matrices held fixed, that is each such vote's likelihood raised to the power w.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

Item = int | str
Annotator = int | str
# Spelled out because Mapping is invariant in its key: a dict[int, str] of patch ids must be accepted.
KnownLabels = Mapping[int, str] | Mapping[str, str] | Mapping[int | str, str]

CROWD = "crowd"
EXPERT = "expert"
ADMIN = "admin"
ROLES = frozenset({CROWD, EXPERT, ADMIN})
EXPERT_ROLES = frozenset({EXPERT, ADMIN})

PENDING = "pending"
AGREED = "agreed"
CONTESTED = "contested"
EXPERT_STATUS = "expert"

CHEAP_METHODS = ("majority", "weighted", "expert_override")
ITERATIVE_METHODS = ("dawid_skene", "glad", "mace")
METHODS = CHEAP_METHODS + ITERATIVE_METHODS

# Adaptive redundancy never settles a patch on one crowd vote, however sure its posterior, unless the model's
# prior for the patch agrees with it (see "pending" in the module docstring).
EARLY_MIN_CROWD_VOTES = 2
EARLY_MIN_CROWD_VOTES_WITH_PRIOR = 1

# Relative tolerance for calling two scores a tie: weighted sums of floats such as 3.0 + 1.0 must
# compare equal to 4.0 however they were added up.
_TIE_RTOL = 1e-9


@dataclass(frozen=True)
class VoteRecord:
    item: Item
    annotator: Annotator
    label: str
    role: str
    weight: float = 1.0  # see "Vote weights" in the module docstring

    @property
    def is_expert(self) -> bool:
        return self.role in EXPERT_ROLES


@dataclass(frozen=True)
class ConsensusResult:
    item: Item
    label: str | None
    confidence: float
    posterior: dict[str, float]
    method: str
    vote_count: int
    agreement: float
    status: str


@dataclass(frozen=True)
class Reliabilities:
    """A stored Dawid-Skene fit of the crowd (annotations.reliability), for the per-vote consensus.

    ``confusion[annotator]`` is a K x K matrix (rows: truth, columns: answer, in ``labels`` order); ``pooled``
    stands in for a student the fit has not seen yet; ``priors`` are the class priors.
    """

    labels: tuple[str, ...]
    priors: np.ndarray
    confusion: Mapping[Annotator, np.ndarray]
    pooled: np.ndarray


def reliability_posterior(votes: Sequence[VoteRecord], labels: Sequence[str], fit: Reliabilities) -> dict[str, float]:
    """One item's Dawid-Skene posterior with the fit's confusion matrices held fixed: the batch method's E-step
    for this item alone (experts' untied decision clamps it, as gold does in the batch fit; a vote's weight
    scales its log-likelihood, the "Vote weights" rule)."""
    experts_label, experts_tied = expert_decision(votes, labels)
    if experts_label is not None and not experts_tied:
        return {label: float(label == experts_label) for label in labels}
    index = {label: j for j, label in enumerate(fit.labels)}
    log_post = np.log(np.clip(fit.priors, 1e-12, None)).astype(np.float64)
    for vote in votes:
        if vote.is_expert:
            continue
        matrix = fit.confusion.get(vote.annotator, fit.pooled)
        log_post = log_post + vote.weight * np.log(np.clip(matrix[:, index[vote.label]], 1e-12, None))
    post = np.exp(log_post - log_post.max())
    post /= post.sum()
    return {label: float(post[index[label]]) for label in labels}


@dataclass(frozen=True)
class DawidSkeneFit:
    """What the Dawid–Skene model learned from the crowd votes of a project.

    `posteriors` holds the items that had crowd votes (gold/expert items clamped to one-hot).
    `confusion[annotator][i][j]` is the estimated probability that the annotator answers `labels[j]`
    when the truth is `labels[i]` (rows: truth, columns: answer, the scikit-learn convention).
    """

    labels: tuple[str, ...]
    posteriors: dict[Item, dict[str, float]]
    confusion: dict[Annotator, list[list[float]]]
    priors: dict[str, float]


# ---------------------------------------------------------------------------------------------------
# Validation


def validate_votes(votes: Iterable[VoteRecord], labels: Sequence[str]) -> None:
    """Raise ValueError with a sentence a user can act on if the votes or label set are unusable."""
    if not labels:
        raise ValueError("The project has no label classes; add at least one label before computing consensus.")
    duplicates = [label for label, n in Counter(labels).items() if n > 1]
    if duplicates:
        raise ValueError(f"The label set lists {duplicates!r} more than once; each label class must be unique.")
    known = set(labels)
    seen: set[tuple[Item, Annotator]] = set()
    for vote in votes:
        if vote.label not in known:
            raise ValueError(
                f"Vote by annotator {vote.annotator!r} on item {vote.item!r} has label {vote.label!r}, "
                f"which is not one of the project's labels {list(labels)!r}; add the label class or fix the vote."
            )
        if not (isinstance(vote.weight, int | float) and 0 < vote.weight <= 1):
            raise ValueError(
                f"Vote by annotator {vote.annotator!r} on item {vote.item!r} has weight {vote.weight!r}; a weight "
                "must be above 0 and at most 1 (leave out the votes that must not count)."
            )
        if vote.role not in ROLES:
            raise ValueError(
                f"Vote by annotator {vote.annotator!r} on item {vote.item!r} has role {vote.role!r}; "
                f"the role must be one of {sorted(ROLES)!r}."
            )
        key = (vote.item, vote.annotator)
        if key in seen:
            raise ValueError(
                f"Annotator {vote.annotator!r} has more than one vote on item {vote.item!r}; "
                "pass only each annotator's latest (active) vote."
            )
        seen.add(key)


def as_label_dict(known: KnownLabels | None) -> dict[Item, str]:
    """A plain dict of item -> label from any of the mappings callers pass (or None)."""
    return dict((known or {}).items())


def _validate_options(
    method: str, votes_required: int, expert_weight: float, contested_threshold: float, early_confidence: float | None
) -> None:
    if early_confidence is not None and not 0.5 <= early_confidence <= 1:
        raise ValueError(f"early_confidence must be in [0.5, 1], not {early_confidence}.")
    if method not in METHODS:
        raise ValueError(f"Unknown consensus method {method!r}; choose one of {list(METHODS)!r}.")
    if votes_required < 1:
        raise ValueError(f"votes_required must be at least 1, not {votes_required}.")
    if not expert_weight > 0:
        raise ValueError(f"expert_weight must be positive, not {expert_weight}.")
    if not 0 <= contested_threshold < 1:
        raise ValueError(f"contested_threshold must be in [0, 1), not {contested_threshold}.")


# ---------------------------------------------------------------------------------------------------
# Small pure helpers


def _argmax_in_label_order(scores: Mapping[str, float], labels: Sequence[str]) -> tuple[str, bool]:
    """Best label and whether it is tied; ties go to the label that comes first in the project's order."""
    best = max(scores[label] for label in labels)
    tied = [label for label in labels if math.isclose(scores[label], best, rel_tol=_TIE_RTOL, abs_tol=1e-12)]
    return tied[0], len(tied) > 1


def _normalise(scores: Mapping[str, float], labels: Sequence[str]) -> dict[str, float]:
    total = sum(scores[label] for label in labels)
    if total <= 0:
        return {label: 1.0 / len(labels) for label in labels}
    return {label: scores[label] / total for label in labels}


def _counts(votes: Iterable[VoteRecord], labels: Sequence[str], weight: float = 1.0) -> dict[str, float]:
    scores = dict.fromkeys(labels, 0.0)
    for vote in votes:
        scores[vote.label] += weight * vote.weight
    return scores


def expert_decision(votes: Sequence[VoteRecord], labels: Sequence[str]) -> tuple[str | None, bool]:
    """The experts' label for one item (majority among its expert/admin votes) and whether they tied.

    Returns (None, False) when no expert voted.
    """
    expert_votes = [v for v in votes if v.is_expert]
    if not expert_votes:
        return None, False
    return _argmax_in_label_order(_counts(expert_votes, labels), labels)


def _cheap_scores(
    votes: Sequence[VoteRecord], labels: Sequence[str], method: str, expert_weight: float
) -> dict[str, float]:
    crowd = [v for v in votes if not v.is_expert]
    experts = [v for v in votes if v.is_expert]
    if method == "majority":
        return _counts(votes, labels)
    if method == "weighted":
        scores = _counts(crowd, labels)
        for label, score in _counts(experts, labels, expert_weight).items():
            scores[label] += score
        return scores
    if method == "expert_override":
        # The crowd only counts when no expert has looked at the patch.
        return _counts(experts if experts else crowd, labels)
    raise ValueError(f"{method!r} is not a per-vote consensus method; use one of {list(CHEAP_METHODS)!r}.")


def _result(
    item: Item,
    votes: Sequence[VoteRecord],
    labels: Sequence[str],
    posterior: dict[str, float],
    method: str,
    *,
    votes_required: int,
    contested_threshold: float,
    forced_label: str | None = None,
    early_confidence: float | None = None,
    prior: Mapping[str, float] | None = None,
) -> ConsensusResult:
    """Turn a posterior into a ConsensusResult, applying the status rules in the module docstring.

    `forced_label` is a label fixed from outside the posterior (a gold label); it counts as an expert decision.
    `prior` (the model's posterior for the item, or None) is only passed with a Dawid-Skene posterior.
    """
    leading, tied = _argmax_in_label_order(posterior, labels)
    crowd = [v for v in votes if not v.is_expert]
    experts_label, experts_tied = expert_decision(votes, labels)
    if forced_label is not None:
        leading, tied, experts_label, experts_tied = forced_label, False, forced_label, False

    label: str | None = leading
    disagreeing = _weighted_share(crowd, lambda v: v.label != leading)
    if experts_label is not None:
        status = EXPERT_STATUS if (not experts_tied and leading == experts_label) else CONTESTED
    elif len(crowd) < votes_required and not (
        early_confidence is not None
        and not tied
        and not disagreeing > contested_threshold
        and (
            (len(crowd) >= EARLY_MIN_CROWD_VOTES and posterior[leading] >= early_confidence - _TIE_RTOL)
            or (
                prior is not None
                and len(crowd) >= EARLY_MIN_CROWD_VOTES_WITH_PRIOR
                and _settled_by_prior(posterior, prior, labels, leading, early_confidence)
            )
        )
    ):
        status, label = PENDING, None
    else:
        status = CONTESTED if (tied or disagreeing > contested_threshold) else AGREED

    agreement = _weighted_share(votes, lambda v: v.label == label) if (label is not None and votes) else 0.0
    return ConsensusResult(
        item=item,
        label=label,
        confidence=float(posterior[label]) if label is not None else 0.0,
        posterior=posterior,
        method=method,
        vote_count=len(votes),
        agreement=agreement,
        status=status,
    )


def with_prior(posterior: Mapping[str, float], prior: Mapping[str, float], labels: Sequence[str]) -> dict[str, float]:
    """The votes' posterior weighed by the model's prior for the item, renormalised (uniform if they exclude
    each other); a label the prior does not name counts as 0."""
    return _normalise({label: posterior[label] * max(float(prior.get(label, 0.0)), 0.0) for label in labels}, labels)


def _settled_by_prior(
    posterior: Mapping[str, float], prior: Mapping[str, float], labels: Sequence[str], leading: str, confidence: float
) -> bool:
    combined = with_prior(posterior, prior, labels)
    best, tied = _argmax_in_label_order(combined, labels)
    return best == leading and not tied and combined[leading] >= confidence - _TIE_RTOL


def _weighted_share(votes: Sequence[VoteRecord], condition: Callable[[VoteRecord], bool]) -> float:
    """The weight of the votes meeting ``condition`` over the weight of all (the plain share when every weight is 1)."""
    total = sum(v.weight for v in votes)
    return sum(v.weight for v in votes if condition(v)) / total if total > 0 else 0.0


def group_by_item(votes: Iterable[VoteRecord]) -> dict[Item, list[VoteRecord]]:
    grouped: dict[Item, list[VoteRecord]] = defaultdict(list)
    for vote in votes:
        grouped[vote.item].append(vote)
    return grouped


# ---------------------------------------------------------------------------------------------------
# Per-vote consensus


def consensus_for_item(
    votes: Sequence[VoteRecord],
    labels: Sequence[str],
    *,
    method: str,
    votes_required: int,
    expert_weight: float = 3.0,
    contested_threshold: float = 0.34,
    early_confidence: float | None = None,
    reliabilities: Reliabilities | None = None,
    prior: Mapping[str, float] | None = None,
) -> ConsensusResult:
    """Consensus for one item from its active votes; cheap enough to run on every vote.

    For the iterative methods this returns the "weighted" result and says so in `method`: their
    estimates need the whole project and are refreshed by `batch_consensus`. The exception is
    "dawid_skene" given a current fit of the crowd (``reliabilities``, the online consensus): the item's
    posterior is then Dawid-Skene's with those confusion matrices held fixed (:func:`reliability_posterior`),
    so each student counts by their reliability on every vote, and adaptive redundancy settles on it; only
    then does ``prior`` (the model's posterior for the item) count, as the module docstring says.
    """
    _validate_options(method, votes_required, expert_weight, contested_threshold, early_confidence)
    if not votes:
        raise ValueError("consensus_for_item needs at least one vote; an item nobody voted on has no consensus row.")
    items = {v.item for v in votes}
    if len(items) > 1:
        raise ValueError(f"consensus_for_item got votes for several items {sorted(map(str, items))!r}; pass one item.")
    validate_votes(votes, labels)
    if method == "dawid_skene" and reliabilities is not None and list(reliabilities.labels) == list(labels):
        used = method
        posterior = reliability_posterior(votes, labels, reliabilities)
    else:
        used = method if method in CHEAP_METHODS else "weighted"
        posterior = _normalise(_cheap_scores(votes, labels, used, expert_weight), labels)
    return _result(
        votes[0].item,
        votes,
        labels,
        posterior,
        used,
        votes_required=votes_required,
        contested_threshold=contested_threshold,
        early_confidence=early_confidence,
        prior=prior if used == "dawid_skene" else None,
    )


# ---------------------------------------------------------------------------------------------------
# Batch consensus


def batch_consensus(
    votes: Sequence[VoteRecord],
    labels: Sequence[str],
    *,
    method: str,
    votes_required: int,
    expert_weight: float = 3.0,
    contested_threshold: float = 0.34,
    gold: KnownLabels | None = None,
    seed: int = 0,
    early_confidence: float | None = None,
    priors: Mapping[Item, Mapping[str, float]] | None = None,
) -> dict[Item, ConsensusResult]:
    """Consensus for every item that has votes.

    Expert decisions and `gold` labels (gold wins where both exist) fix those items' labels for the
    iterative methods and, for "dawid_skene", seed the EM so that each crowd annotator's per-class
    reliability is learned against them. For the cheap methods `gold` is ignored: they must give the same
    answer as `consensus_for_item`. `seed` feeds MACE's random restarts; the other methods are deterministic.
    ``priors`` (item -> the model's posterior for it) count for "dawid_skene" only (the module docstring).
    """
    _validate_options(method, votes_required, expert_weight, contested_threshold, early_confidence)
    validate_votes(votes, labels)
    gold_labels = as_label_dict(gold)
    _validate_gold(gold_labels, labels)
    by_item = group_by_item(votes)

    def finish(item: Item, item_votes: list[VoteRecord], posterior: dict[str, float]) -> ConsensusResult:
        return _result(
            item,
            item_votes,
            labels,
            posterior,
            method,
            votes_required=votes_required,
            contested_threshold=contested_threshold,
            forced_label=gold_labels.get(item) if method in ITERATIVE_METHODS else None,
            early_confidence=early_confidence,
            prior=(priors or {}).get(item) if method == "dawid_skene" else None,
        )

    if method in CHEAP_METHODS:
        return {
            item: finish(item, item_votes, _normalise(_cheap_scores(item_votes, labels, method, expert_weight), labels))
            for item, item_votes in by_item.items()
        }

    truth = _truth_labels(by_item, labels, gold_labels)
    posteriors = _iterative_posteriors(votes, labels, method, truth, seed)

    results: dict[Item, ConsensusResult] = {}
    for item, item_votes in by_item.items():
        if item in truth:
            posterior = {label: float(label == truth[item]) for label in labels}
        elif item in posteriors:
            posterior = posteriors[item]
        else:
            # Only expert votes, and the experts tied: nothing for a model to learn from.
            posterior = _normalise(_counts(item_votes, labels), labels)
        results[item] = finish(item, item_votes, posterior)
    return results


def _iterative_posteriors(
    votes: Sequence[VoteRecord], labels: Sequence[str], method: str, truth: Mapping[Item, str], seed: int
) -> dict[Item, dict[str, float]]:
    """The iterative method's posteriors, with down-weighted votes interpolated (see "Vote weights")."""

    def fit(used: Sequence[VoteRecord]) -> tuple[dict[Item, dict[str, float]], dict[str, float] | None]:
        if method == "dawid_skene":
            found = fit_dawid_skene(used, labels, truth=truth)
            return found.posteriors, found.priors or None
        return _fit_glad_or_mace(used, labels, method, seed), None

    weights = {v.weight for v in votes if v.weight < 1}
    if not weights:
        return fit(votes)[0]
    if len(weights) > 1:
        raise ValueError(
            f"The iterative methods take one weight below 1 for all down-weighted votes, not {sorted(weights)!r}."
        )
    (w,) = weights
    with_them, _ = fit(votes)
    without, priors = fit([v for v in votes if v.weight == 1])
    # An item only the down-weighted votes speak for leans on the prior (Dawid-Skene's class priors, else uniform).
    fallback = priors or dict.fromkeys(labels, 1.0 / len(labels))
    blended: dict[Item, dict[str, float]] = {}
    for item, full in with_them.items():
        base = without.get(item, fallback)
        scores = {label: (full[label] ** w) * (base.get(label, 0.0) ** (1 - w)) for label in labels}
        blended[item] = _normalise(scores, labels)
    return blended


def _validate_gold(gold: Mapping[Any, str], labels: Sequence[str]) -> None:
    unknown = {item: label for item, label in gold.items() if label not in set(labels)}
    if unknown:
        raise ValueError(
            f"Gold labels {unknown!r} are not among the project's labels {list(labels)!r}; fix the gold set."
        )


def _truth_labels(
    by_item: Mapping[Item, Sequence[VoteRecord]], labels: Sequence[str], gold: Mapping[Any, str]
) -> dict[Item, str]:
    """Labels treated as known truth: untied expert decisions, overridden by gold labels."""
    truth: dict[Item, str] = {}
    for item, item_votes in by_item.items():
        label, tied = expert_decision(item_votes, labels)
        if label is not None and not tied:
            truth[item] = label
    truth.update(gold)
    return truth


@contextmanager
def _quiet_crowdkit() -> Iterator[None]:
    # crowd-kit 1.4.2 predates pandas 3 and emits hundreds of deprecation warnings per fit (inplace=,
    # copy=); they say nothing about our data, so they are silenced for crowd-kit's own code only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Warning, module=r"crowdkit\.")
        yield


def _frame(votes: Iterable[VoteRecord]) -> pd.DataFrame:
    """Votes as crowd-kit's long format: columns task, worker, label."""
    import pandas as pd

    rows = [(v.item, v.annotator, v.label) for v in votes]
    return pd.DataFrame(rows, columns=["task", "worker", "label"]).astype(object)


def _posteriors_from_frame(probas: pd.DataFrame, labels: Sequence[str]) -> dict[Item, dict[str, float]]:
    # crowd-kit only returns columns for labels that occur in the data; absent labels get probability 0.
    matrix = probas.reindex(columns=list(labels), fill_value=0.0).to_numpy(dtype=float)
    matrix = np.nan_to_num(matrix, nan=0.0)
    sums = matrix.sum(axis=1, keepdims=True)
    matrix = np.divide(matrix, sums, out=np.full_like(matrix, 1.0 / len(labels)), where=sums > 0)
    return {
        item: {label: float(p) for label, p in zip(labels, row, strict=True)}
        for item, row in zip(probas.index, matrix, strict=True)
    }


def fit_dawid_skene(
    votes: Sequence[VoteRecord],
    labels: Sequence[str],
    *,
    truth: KnownLabels | None = None,
    n_iter: int = 100,
) -> DawidSkeneFit:
    """Dawid–Skene on the crowd votes (crowd-kit `DawidSkene`), seeded with known labels.

    `truth` (gold and expert labels) goes to crowd-kit's `fit(true_labels=...)`, which clamps those items'
    posteriors to one-hot at every EM step, so the annotators' confusion matrices are anchored to them
    rather than to the crowd majority. Expert votes are not fed as a worker: their items are clamped anyway.
    crowd-kit's `initial_error` prior is not used: it only enters the first M-step, so gold clamping is
    what actually carries the information.
    """
    from crowdkit.aggregation import DawidSkene

    validate_votes(votes, labels)
    crowd = [v for v in votes if not v.is_expert]
    empty = DawidSkeneFit(labels=tuple(labels), posteriors={}, confusion={}, priors={})
    if not crowd:
        return empty
    data = _frame(crowd)
    true_labels = _true_label_series(truth or {}, data)
    model = DawidSkene(n_iter=n_iter)
    with _quiet_crowdkit():
        probas = model.fit_predict_proba(data, true_labels=true_labels)
    assert model.errors_ is not None and model.priors_ is not None
    priors = model.priors_.reindex(list(labels), fill_value=0.0)
    posteriors = _posteriors_from_frame(probas, labels)
    return DawidSkeneFit(
        labels=tuple(labels),
        posteriors=posteriors,
        confusion=_confusion_from_errors(model.errors_, labels, _evidence(crowd, posteriors, labels)),
        priors={label: float(priors[label]) for label in labels},
    )


def _evidence(
    crowd: Iterable[VoteRecord], posteriors: Mapping[Item, Mapping[str, float]], labels: Sequence[str]
) -> dict[Annotator, np.ndarray]:
    """Expected number of items of each true class each annotator saw (the weight behind each matrix row)."""
    evidence: dict[Annotator, np.ndarray] = defaultdict(lambda: np.zeros(len(labels)))
    for vote in crowd:
        evidence[vote.annotator] += np.array([posteriors[vote.item][label] for label in labels])
    return evidence


def _true_label_series(truth: Mapping[Any, str], data: pd.DataFrame) -> pd.Series[Any] | None:
    import pandas as pd

    # A gold label that no crowd worker used is kept on purpose: crowd-kit then adds that label's column,
    # which is the only way the model can learn that the crowd calls, say, every "a" a "b".
    seen_items = set(data["task"])
    kept = {item: label for item, label in truth.items() if item in seen_items}
    if not kept:
        return None
    return pd.Series(list(kept.values()), index=pd.Index(list(kept.keys()), dtype=object), dtype=object)


def _confusion_from_errors(
    errors: pd.DataFrame, labels: Sequence[str], evidence: Mapping[Annotator, np.ndarray]
) -> dict[Annotator, list[list[float]]]:
    """crowd-kit's errors_ (rows: worker x observed label, columns: true label) as truth x answer matrices."""
    confusion: dict[Annotator, list[list[float]]] = {}
    for worker, block in errors.groupby(level="worker", sort=False):
        observed = block.droplevel("worker").reindex(index=list(labels), columns=list(labels), fill_value=0.0)
        matrix = np.nan_to_num(observed.to_numpy(dtype=float).T, nan=0.0)
        # crowd-kit floors every cell at 1e-10 and renormalises, so a true class the annotator never met comes
        # out as an arbitrary split over the labels they happened to use; report those rows as uniform instead.
        unseen = evidence[worker] < 1e-6
        matrix[unseen] = 0.0
        sums = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, sums, out=np.full_like(matrix, 1.0 / len(labels)), where=sums > 0)
        confusion[worker] = matrix.tolist()
    return confusion


def _fit_glad_or_mace(
    votes: Sequence[VoteRecord], labels: Sequence[str], method: str, seed: int
) -> dict[Item, dict[str, float]]:
    """GLAD or MACE (crowd-kit) over all votes; experts enter as ordinary, usually reliable, workers.

    Neither crowd-kit model accepts gold labels, so gold/expert items are fixed by the caller after the fit.
    """
    from crowdkit.aggregation import GLAD, MACE

    if not votes:
        return {}
    data = _frame(votes)
    if data["label"].nunique() < 2:
        # Both models divide by (number of labels - 1); with one label in use every item gets that label.
        only = str(data["label"].iloc[0])
        return {item: {label: float(label == only) for label in labels} for item in data["task"].unique()}
    with _quiet_crowdkit():
        if method == "glad":
            probas = GLAD(n_iter=100, silent=True).fit_predict_proba(data)
        else:
            probas = MACE(n_restarts=3, n_iter=50, random_state=seed).fit_predict_proba(data)
    return _posteriors_from_frame(probas, labels)
