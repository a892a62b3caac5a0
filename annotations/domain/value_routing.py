"""Route a round's patches by expected value per cost (issue 15, part 3): pure numpy, no Django.

The decision rule, for one patch whose true class the model believes is distributed as ``p`` (its posterior,
K classes), with the available students' pooled confusion matrix ``C`` (rows: truth, columns: answer) and the
project's costs ``c_e`` (an expert vote) and ``c_c`` (a crowd vote):

1. **What the crowd would produce.** For each true class i, :func:`crowd_outcome` simulates the crowd's
   path through the platform's own rules with a fixed-seed Monte Carlo (``SAMPLES`` vote sequences per class,
   answers drawn from ``C[i]``): votes are collected up to ``votes_required`` (with adaptive redundancy,
   stopped once at least two votes give the leading label a share of ``redundancy_confidence`` or more; a
   project's ``redundancy_model_prior``, which may stop at one vote, is not played, so there the crowd's
   expected cost is an upper bound), the crowd is *contested* when the share disagreeing with the leading
   label is above ``contested_threshold`` or the lead is tied, and otherwise the label is the Dawid-Skene
   decision (class priors times the likelihood of the votes under ``C``). This gives, per true class,
   ``q[i]`` = P(final label right), ``n[i]`` = expected crowd votes, ``r[i]`` = P(contested). A contested
   patch goes to an expert, whose label counts as right (consensus clamps Dawid-Skene to expert decisions,
   so the platform treats it as the truth), at one expert vote more.
2. **Both options, for this patch.** Crowd: accuracy ``A_c = p·q``, cost ``K_c = c_c·(p·n) + c_e·(p·r)``.
   Expert: accuracy ``A_e = 1``, cost ``K_e = c_e``.
3. **Gain per cost.** A label is worth what it adds to what the model already knows: the model's own
   guess is right with probability ``A_0 = max(p)``. The patch goes to the experts when their gain per
   cost unit is higher, ``(A_e - A_0) / K_e > (A_c - A_0) / K_c``; otherwise (also when an expert adds
   nothing, ``A_e <= A_0``) to the crowd, the cheaper default.

Everything is vectorised over the batch: :func:`crowd_outcome` is per class (K x SAMPLES x votes), then
each patch is a few dot products. The reason string says which way it went and the numbers behind it,
with the students' Cohen's κ against the truth on the patch's two likeliest classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SAMPLES = 2000
EXPERT_ACCURACY = 1.0


@dataclass(frozen=True)
class CrowdOutcome:
    """Per true class: P(the crowd's final label is right), expected crowd votes, P(contested)."""

    right: np.ndarray
    votes: np.ndarray
    contested: np.ndarray


@dataclass(frozen=True)
class Routing:
    """Per patch of the batch: whether it goes to experts, the numbers behind it, and the reason string."""

    to_expert: np.ndarray
    crowd_accuracy: np.ndarray
    crowd_cost: np.ndarray
    reasons: list[str]


def crowd_outcome(
    confusion: np.ndarray,
    priors: np.ndarray,
    *,
    votes_required: int,
    contested_threshold: float,
    early_confidence: float | None,
    seed: int = 0,
    samples: int = SAMPLES,
) -> CrowdOutcome:
    """Simulate the crowd's path for each true class (see the module docstring, step 1)."""
    k = confusion.shape[0]
    v = int(votes_required)
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(confusion, axis=1)
    cumulative[:, -1] = 1.0
    u = rng.random((k, samples, v))
    # answers[i, s, t]: the t-th vote of sample s when the truth is i
    answers = (u[..., None] > cumulative[:, None, None, :]).sum(axis=-1)
    answers = np.minimum(answers, k - 1)
    one_hot = np.eye(k)[answers]  # (k, samples, v, k)
    running = np.cumsum(one_hot, axis=2)  # counts after t+1 votes
    used = np.full((k, samples), v)
    if early_confidence is not None and v > 2:
        shares = running.max(axis=-1) / np.arange(1, v + 1)[None, None, :]
        top = np.sort(running, axis=-1)
        untied = top[..., -1] > top[..., -2] if k > 1 else np.ones_like(shares, dtype=bool)
        settled = (shares >= early_confidence - 1e-9) & untied
        settled[..., :1] = False  # never on one vote (domain.consensus.EARLY_MIN_CROWD_VOTES)
        first = np.where(settled.any(axis=-1), settled.argmax(axis=-1) + 1, v)
        used = first
    counts = np.take_along_axis(running, (used - 1)[..., None, None], axis=2)[:, :, 0, :]  # (k, samples, k)
    n = used.astype(np.float64)
    ordered = np.sort(counts, axis=-1)
    tied = ordered[..., -1] == ordered[..., -2] if k > 1 else np.zeros(counts.shape[:2], dtype=bool)
    disagreeing = 1.0 - ordered[..., -1] / n
    contested = tied | (disagreeing > contested_threshold + 1e-12)
    log_c = np.log(np.clip(confusion, 1e-12, None))
    decoded = (np.log(np.clip(priors, 1e-12, None)) + counts @ log_c.T).argmax(axis=-1)  # (k, samples)
    truth = np.arange(k)[:, None]
    right = np.where(contested, EXPERT_ACCURACY, (decoded == truth).astype(np.float64))
    return CrowdOutcome(right=right.mean(axis=1), votes=n.mean(axis=1), contested=contested.mean(axis=1))


def route(
    proba: np.ndarray,
    confusion: np.ndarray,
    outcome: CrowdOutcome,
    *,
    expert_cost: float,
    crowd_cost: float,
    labels: Sequence[str],
) -> Routing:
    """Steps 2 and 3 of the module docstring for a batch: ``proba`` (patches, K), rows summing to 1."""
    p = np.asarray(proba, dtype=np.float64)
    p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
    a_c = p @ outcome.right
    k_c = crowd_cost * (p @ outcome.votes) + expert_cost * (p @ outcome.contested)
    a_0 = p.max(axis=1)
    gain_e = (EXPERT_ACCURACY - a_0) / expert_cost
    gain_c = (a_c - a_0) / np.clip(k_c, 1e-12, None)
    to_expert = (EXPERT_ACCURACY > a_0 + 1e-12) & (gain_e > gain_c)
    kappa, first, second = top_two_kappa(p, confusion)
    votes = p @ outcome.votes
    reasons = []
    for j in range(len(p)):
        where = "expert" if to_expert[j] else "crowd"
        pair = f"{labels[first[j]]} vs {labels[second[j]]}" if len(labels) > 1 else labels[0]
        verdict = "crowd's gain per cost lower" if to_expert[j] else "crowd's gain per cost at least an expert's"
        reasons.append(
            f"{where}: crowd expected right {a_c[j]:.0%} (students' κ {kappa[j]:.2f} on {pair}), model alone "
            f"{a_0[j]:.0%}; {votes[j]:.1f} crowd votes cost {k_c[j]:.3g} with expected expert review, "
            f"expert {expert_cost:.3g}; {verdict} ({gain_c[j]:.3g} vs {gain_e[j]:.3g})"
        )
    return Routing(to_expert=to_expert, crowd_accuracy=a_c, crowd_cost=k_c, reasons=reasons)


def top_two_kappa(p: np.ndarray, confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen's κ between a student's answer and the truth on each patch's two likeliest classes (a and b,
    equally likely; an answer outside them counts as a disagreement), and the two classes' indices."""
    k = confusion.shape[0]
    order = np.argsort(-p, axis=1, kind="stable")
    a = order[:, 0]
    b = order[:, 1] if k > 1 else order[:, 0]
    caa, cab, cba, cbb = confusion[a, a], confusion[a, b], confusion[b, a], confusion[b, b]
    observed = (caa + cbb) / 2
    expected = 0.5 * (caa + cba) / 2 + 0.5 * (cab + cbb) / 2
    kappa = np.where(expected < 1 - 1e-12, (observed - expected) / np.clip(1 - expected, 1e-12, None), 1.0)
    return kappa, a, b
