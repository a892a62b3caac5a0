"""The accept-the-model strip: patches the latest model assigns to one class, from its stored scores.

Read from ``SlideScores`` (one packed row per slide), a slide at a time, keeping only the patches predicted
as the class: a strip over a million patches holds the predicted patches' ids and two floats each, never
the full probability matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from annotations.models import Consensus, Patch, Project, Role, SuggestionAccess, Vote
from learner.core.strategies import margin

from . import scores
from .models import ModelVersion, SlideScores

ORDERS = ("confidence", "uncertainty")
MAX_STRIP = 200
# Consensus states that already settle a patch: the strip leaves them out.
SETTLED = (Consensus.Status.AGREED, Consensus.Status.EXPERT)


def strip_allowed(project: Project, role: str) -> bool:
    """The project's ``suggestion_strip`` setting: admins always count as experts; the crowd only when it
    says ``crowd`` or ``both`` (off by default: seeing the model's answer first anchors a student's vote)."""
    setting = project.suggestion_strip
    if role == Role.CROWD:
        return setting in (SuggestionAccess.CROWD, SuggestionAccess.BOTH)
    if role == Role.ADMIN:
        return setting != SuggestionAccess.OFF
    return setting in (SuggestionAccess.EXPERTS, SuggestionAccess.BOTH)


def latest_version(project: Project) -> ModelVersion | None:
    """The newest model version that still has its scores."""
    return ModelVersion.objects.filter(project=project, pruned_at__isnull=True).order_by("-created_at", "-id").first()


@dataclass(frozen=True)
class StripItem:
    patch_id: int
    probability: float  # of the strip's class
    uncertainty: float  # 1 - (top-1 minus top-2)
    runner_up: int  # the model's second choice (class index): what "flip" changes the label to


def strip(
    project: Project, user: Any, role: str, version: ModelVersion, label_index: int, n: int, order: str
) -> list[StripItem]:
    """Up to ``n`` patches ``version`` predicts as class ``label_index``, most confident (or most
    uncertain) first, leaving out patches the user voted on, settled ones and, for the crowd, gold checks."""
    voted = set(Vote.objects.filter(project=project, annotator=user, is_active=True).values_list("patch_id", flat=True))
    settled = set(Consensus.objects.filter(project=project, status__in=SETTLED).values_list("patch_id", flat=True))
    excluded = voted | settled
    if role == Role.CROWD:
        excluded |= set(Patch.objects.filter(project=project, is_gold=True).values_list("pk", flat=True))
    excluded_ids = np.fromiter(excluded, dtype=np.int64, count=len(excluded))
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    n_classes = len(version.class_names)
    rows = SlideScores.objects.filter(model_version=version, slide__status="ready").only("patch_ids", "probs")
    for row in rows.iterator(chunk_size=16):
        ids, probs = scores.unpack(row, n_classes)
        mine = np.argmax(probs, axis=1) == label_index
        if excluded_ids.size:
            mine &= ~np.isin(ids, excluded_ids)
        if not mine.any():
            continue
        p = probs[mine].astype(np.float64)
        second = np.argsort(-p, axis=1)[:, 1] if n_classes > 1 else np.zeros(len(p), dtype=np.int64)
        parts.append((ids[mine], p[:, label_index], margin(p), second))
    if not parts:
        return []
    ids = np.concatenate([a for a, _, _, _ in parts])
    prob = np.concatenate([b for _, b, _, _ in parts])
    unc = np.concatenate([c for _, _, c, _ in parts])
    second = np.concatenate([d for _, _, _, d in parts])
    key = -prob if order == "confidence" else -unc
    top = np.lexsort((ids, key))[:n]
    return [
        StripItem(int(ids[i]), round(float(prob[i]), 5), round(float(unc[i]), 5), int(second[i])) for i in top.tolist()
    ]
