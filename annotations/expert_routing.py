"""Which of a round's patches go to the crowd and which straight to experts (``Project.expert_routing``).

``contested`` (the default): the whole batch goes to the crowd; a patch the crowd contests is sent to the
experts by annotations.consensus when it becomes contested. ``value``: each patch is routed by expected
value per cost (the rule is in annotations.domain.value_routing) from the model's posterior for the patch and
the current Dawid-Skene confusion matrices of the *available* students (crowd members of the project who
voted in the last ``AVAILABLE_DAYS``), read from the project's ReliabilityFit (annotations.reliability keeps
it current as votes arrive). Contested patches still go to experts either way.

Until the available students have ``MIN_EVIDENCE`` crowd votes in the fit there is nothing to weigh the
crowd by, and patches go to the crowd (which is how its reliabilities are learned); the reason says so.
One query for the fit and one for the crowd memberships, whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from django.utils import timezone

from .domain.dawid_skene import confusion_from_counts
from .domain.value_routing import crowd_outcome, route
from .models import ExpertRouting, LabelClass, Membership, Project, ReliabilityFit, Role
from .students import uncounted_students

AVAILABLE_DAYS = 14
MIN_EVIDENCE = 20  # crowd votes of the available students in the fit before their reliabilities are trusted
CROWD_FIRST_REASON = "crowd: the project routes crowd first (patches the crowd contests go to experts)"
REASON_LENGTH = 300


@dataclass(frozen=True)
class Split:
    """A batch's routing: patch id -> reason, for the patches going to experts and to the crowd."""

    expert: dict[int, str]
    crowd: dict[int, str]


def split_batch(
    project: Project, patch_ids: list[int], proba: np.ndarray | None, class_names: list[str] | None = None
) -> Split:
    """Route these patches (``proba``: the model's posterior per patch, columns in ``class_names`` order, the
    project's label order when None; ``proba`` None when there is no model yet, a cold start: the crowd's
    class priors stand in for it)."""
    if project.expert_routing != ExpertRouting.VALUE or not patch_ids:
        return Split(expert={}, crowd=dict.fromkeys(patch_ids, CROWD_FIRST_REASON))
    if class_names is None:
        class_names = list(LabelClass.objects.filter(project=project).order_by("order").values_list("name", flat=True))
    fit = ReliabilityFit.objects.filter(project=project).first()
    pooled, priors, why_not = _pooled(project, fit, class_names)
    if pooled is None or priors is None:
        return Split(expert={}, crowd=dict.fromkeys(patch_ids, f"crowd: {why_not}"[:REASON_LENGTH]))
    confusion = confusion_from_counts(pooled)
    outcome = crowd_outcome(
        confusion,
        priors,
        votes_required=project.votes_required,
        contested_threshold=project.contested_threshold,
        early_confidence=project.redundancy_confidence if project.adaptive_redundancy else None,
        seed=project.seed,
    )
    p = np.tile(priors, (len(patch_ids), 1)) if proba is None else np.asarray(proba, dtype=np.float64)
    decided = route(
        p, confusion, outcome, expert_cost=project.expert_cost, crowd_cost=project.crowd_cost, labels=class_names
    )
    split = Split(expert={}, crowd={})
    for pid, expert, reason in zip(patch_ids, decided.to_expert.tolist(), decided.reasons, strict=True):
        (split.expert if expert else split.crowd)[pid] = reason[:REASON_LENGTH]
    return split


def _pooled(
    project: Project, fit: ReliabilityFit | None, class_names: list[str]
) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """The available (recently voting, counted) students' summed expected counts and the fit's priors, or why
    there are none."""
    if fit is None:
        return None, None, "no reliability estimate of the students yet (routing by value)"
    if list(fit.labels) != list(class_names):
        return None, None, "the label set changed since the students' reliabilities were estimated"
    # A student below the certification threshold may vote, but consensus leaves their votes out: the crowd
    # a patch would get is the certified (counted) students.
    uncounted = uncounted_students(project)
    crowd = {
        str(u)
        for u in Membership.objects.filter(project=project, role=Role.CROWD).values_list("user_id", flat=True)
        if u not in uncounted
    }
    since = timezone.now() - timedelta(days=AVAILABLE_DAYS)
    k = len(class_names)
    pooled = np.zeros((k, k))
    n = 0
    for annotator, student in fit.students.items():
        if annotator in crowd and datetime.fromisoformat(student["last_vote"]) >= since:
            pooled += np.asarray(student["counts"], dtype=np.float64)
            n += int(student["votes"])
    if n < MIN_EVIDENCE:
        return None, None, f"the available students have {n} votes in the reliability fit, under {MIN_EVIDENCE}"
    return pooled, np.asarray(fit.priors, dtype=np.float64), ""
