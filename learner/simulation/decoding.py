"""How much of the truth the votes of a run hold, and how much of it consensus recovers: on the same votes,
(a) majority vote, (b) the platform's own batch consensus (the project's method, Dawid-Skene by default,
seeded with its gold: ``recompute_project_consensus``, what a round's snapshot runs) and (c) the decoder
that knows every vote's true confusion (for an improving student, their confusion at that vote's index
in the run), Bayes-optimal under a uniform prior. The share of (c)'s gain over (a) that (b) reaches says
how close the platform's estimates of who is reliable come to the truth.

Measured on the run's non-gold patches with at least one crowd vote (gold patches are clamped to the
expert's label by (b) and are validation, not labels the loop paid for)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from annotations import consensus as platform_consensus
from annotations.domain.consensus import batch_consensus
from annotations.models import Consensus, Role

from .errors import SimulationError

if TYPE_CHECKING:
    from .runs import Run


def decoder_accuracies(run: Run) -> dict[str, Any]:
    """Accuracies of majority vote, the platform's consensus and the true-confusion decoder on the run's
    current active votes, their gains over majority in points, and the share of the true decoder's gain the
    platform's consensus reaches (None when the true decoder gains nothing over majority).

    Recomputes the project's consensus in bulk (the platform's batch path) first; call it when the run is done.
    """
    project = run.project
    labels = platform_consensus.label_names(project)
    index = {name: i for i, name in enumerate(labels)}
    platform_consensus.recompute_project_consensus(project)
    records = platform_consensus.vote_records(project, weighted=True)
    by_item: dict[int, list[Any]] = defaultdict(list)
    for record in records:
        by_item[int(record.item)].append(record)
    items = sorted(
        item for item, votes in by_item.items() if item not in run.gold_ids and any(v.role == Role.CROWD for v in votes)
    )
    if not items:
        raise SimulationError(f"{project.name!r} has no crowd-voted patch to decode.")
    truth = np.array([run.truth[item] for item in items])

    majority = batch_consensus(
        [v for item in items for v in by_item[item]], labels, method="majority", votes_required=1
    )
    chosen_majority = np.array([index[majority[item].label or labels[0]] for item in items])

    posteriors = dict(
        Consensus.objects.filter(project=project, patch_id__in=items).values_list("patch_id", "posterior")
    )
    platform = np.array([_argmax(posteriors.get(item) or {}, labels) for item in items])

    people = run.person_of()
    log_post = np.zeros((len(items), len(labels)))
    crowd_votes = 0
    for row, item in enumerate(items):
        for vote in by_item[item]:
            person_index, person = people[int(vote.annotator)]
            at = run.vote_index.get((person_index, item))
            if at is None:
                raise SimulationError(
                    f"Vote of annotator {vote.annotator} on patch {item} was not cast by the simulation's people."
                )
            crowd_votes += vote.role == Role.CROWD
            log_post[row] += np.log(np.clip(person.confusion_at(at)[:, index[vote.label]], 1e-12, None))
    true_decoder = log_post.argmax(axis=1)

    accuracy = {
        "majority": float((chosen_majority == truth).mean()),
        "platform": float((platform == truth).mean()),
        "true_confusion": float((true_decoder == truth).mean()),
    }
    gain_true = accuracy["true_confusion"] - accuracy["majority"]
    gain_platform = accuracy["platform"] - accuracy["majority"]
    return {
        "patches": len(items),
        "crowd_votes": int(crowd_votes),
        "method": project.consensus_method,
        "accuracy": accuracy,
        "gain_points": {"platform": 100 * gain_platform, "true_confusion": 100 * gain_true},
        "share_of_true_gain": gain_platform / gain_true if gain_true > 0 else None,
    }


def _argmax(posterior: dict[str, float], labels: list[str]) -> int:
    """The leading label of a stored posterior, ties to the first in the project's order (-1: no posterior)."""
    if not posterior:
        return -1
    scores = [posterior.get(label, 0.0) for label in labels]
    return int(np.argmax(scores))


def student_accuracy_by_vote(run: Run, parts: int = 2) -> dict[str, list[dict[str, float]]]:
    """Each student's accuracy against the truth over their votes of the run (every vote they cast, in the
    order cast), cut into ``parts`` equal stretches: for an improving crowd the later stretches are better."""
    from annotations.models import Vote

    people = run.person_of()
    by_student: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    for annotator, patch, label in Vote.objects.filter(project=run.project, role=Role.CROWD).values_list(
        "annotator_id", "patch_id", "label__name"
    ):
        index, person = people[annotator]
        at = run.vote_index.get((index, patch))
        if at is None:
            raise SimulationError(f"Vote of {person.name} on patch {patch} was not cast by the simulation.")
        by_student[person.name].append((at, run.source.class_names[run.truth[patch]] == label))
    out: dict[str, list[dict[str, float]]] = {}
    for name, votes in sorted(by_student.items()):
        votes.sort()
        stretches = np.array_split(np.array([right for _, right in votes], dtype=float), parts)
        out[name] = [{"votes": len(s), "accuracy": float(s.mean()) if len(s) else float("nan")} for s in stretches]
    return out
