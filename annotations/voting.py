"""Casting, correcting and undoing votes (each change recomputes the patch's consensus in annotations.consensus).

Votes are append-only: a correction inserts a new vote that supersedes the old one (kept,
inactive) and an undo retracts the vote (kept, inactive, ``retracted_at`` set). A partial
unique index allows one active vote per (patch, annotator), so a double submission cannot
create a second vote even when two requests race.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from .consensus import recompute_consensus
from .models import AnnotationTask, Consensus, LabelClass, Patch, Project, Role, Vote, VoteProvenance
from .queue import QueueError

Kind = AnnotationTask.Kind

UNDO_WINDOW = timedelta(minutes=30)


class VoteError(QueueError):
    status_code = 400


class VoteConflict(VoteError):
    status_code = 409


@dataclass(frozen=True)
class VoteOutcome:
    vote: Vote
    task: AnnotationTask | None
    consensus: Consensus
    gold_answer: LabelClass | None  # only in training mode, after a gold vote


def _labels(project: Project) -> list[LabelClass]:
    """The project's labels in display order: one query serves the lookup and the consensus."""
    return list(LabelClass.objects.filter(project=project).order_by("order"))


def _label(labels: list[LabelClass], label: Any) -> LabelClass:
    """A label by id (ASCII digits) or by name; VoteError naming the choices if none."""
    text = str(label)
    by_id = text.isascii() and text.isdigit()
    found = next((lc for lc in labels if (lc.pk == int(text) if by_id else lc.name == text)), None)
    if found is None:
        names = ", ".join(lc.name for lc in labels)
        raise VoteError(f"Unknown label {label!r} for this project; use one of: {names}.")
    return found


def _patch_id(project: Project, patch_id: Any) -> int:
    """The id of a patch of the project; VoteError for anything else."""
    try:
        pid = int(patch_id)
    except (TypeError, ValueError) as exc:
        raise VoteError("That patch does not belong to this project.") from exc
    if not (0 < pid <= 2**63 - 1 and Patch.objects.filter(project=project, pk=pid).exists()):
        raise VoteError("That patch does not belong to this project.")
    return pid


def cast_vote(
    project: Project,
    user: Any,
    role: str,
    *,
    patch_id: Any,
    label: Any,
    task_id: Any = None,
    time_spent_ms: int = 0,
    provenance: str = VoteProvenance.SINGLE,
    model_version_shown: int | None = None,
    crowd_without_task: bool = False,
) -> VoteOutcome:
    """Record a vote. Crowd members need a live lease on the task (unless ``crowd_without_task``: the
    accept-the-model strip, where the project lets the crowd accept suggestions); experts and admins may
    vote on any patch of the project (from the viewer) with or without a task. ``provenance`` says how
    the vote was made and ``model_version_shown`` which model's suggestion the voter saw, if any."""
    labels = _labels(project)
    label_obj = _label(labels, label)
    now = timezone.now()
    with transaction.atomic():
        task = None
        if task_id not in (None, ""):
            task = AnnotationTask.objects.select_for_update().filter(project=project, pk=task_id).first()
            if task is None:
                raise VoteError("No such task in this project.")
            if str(task.patch_id) != str(patch_id):
                raise VoteError("The task is for a different patch.")
            if not task.lease_is_held(user, now):
                raise VoteConflict("Your lease on this task has expired or was never yours; ask for the next task.")
            pid = task.patch_id  # the task's patch is the project's (checked when it was queued)
        elif role == Role.CROWD and not crowd_without_task:
            raise VoteConflict("Crowd votes need a leased task: ask for the next task first.")
        else:
            pid = _patch_id(project, patch_id)
        try:
            # The partial unique index (one active vote per patch and annotator) refuses a second vote,
            # even from two requests racing.
            with transaction.atomic():
                vote = Vote.objects.create(
                    project=project,
                    patch_id=pid,
                    annotator=user,
                    label=label_obj,
                    role=role,
                    task=task,
                    time_spent_ms=max(0, min(int(time_spent_ms or 0), 24 * 3600 * 1000)),
                    provenance=provenance,
                    model_version_shown_id=model_version_shown,
                )
        except IntegrityError as exc:
            raise VoteConflict("You have already voted on this patch; undo or correct your vote instead.") from exc
        if task is not None:
            task.record_vote()
        consensus = recompute_consensus(project, pid, labels)
    gold_answer = None
    if task is not None and task.kind == Kind.GOLD and project.training_mode:
        gold_answer = consensus.label
    return VoteOutcome(vote=vote, task=task, consensus=consensus, gold_answer=gold_answer)


def correct_vote(project: Project, user: Any, role: str, *, vote_id: Any, label: Any) -> VoteOutcome:
    """Replace one's own active vote with a new one (the old one stays, inactive)."""
    labels = _labels(project)
    label_obj = _label(labels, label)
    with transaction.atomic():
        old = (
            Vote.objects.select_for_update().filter(project=project, pk=vote_id, annotator=user, is_active=True).first()
        )
        if old is None:
            raise VoteError("You have no active vote with that id in this project.")
        old.is_active = False
        old.save(update_fields=["is_active"])
        vote = Vote.objects.create(
            project=project,
            patch_id=old.patch_id,
            annotator=user,
            label=label_obj,
            role=role,
            task_id=old.task_id,
            time_spent_ms=old.time_spent_ms,
            supersedes=old,
        )
        consensus = recompute_consensus(project, old.patch_id, labels)
    return VoteOutcome(vote=vote, task=old.task, consensus=consensus, gold_answer=None)


def _give_back(project: Project, user: Any, vote: Vote, now: Any) -> AnnotationTask | None:
    """After a retraction: the task needs one vote more; lease it back to the voter unless someone
    else is labelling that patch right now (their lease is never taken away)."""
    task = AnnotationTask.objects.select_for_update().get(pk=vote.task_id)
    task.retract_vote()
    expiry = now + timedelta(minutes=project.lease_minutes)
    if task.lease_is_held_by_other(user, now):
        task.save(update_fields=["votes_received", "updated_at"])
        return None
    previous_state = task.state
    try:
        with transaction.atomic():
            task.lease(user, expiry, also_save=("votes_received",))
        return task
    except IntegrityError:
        pass
    # The patch was queued again meanwhile (a newer live task of the same kind): keep the old task
    # closed and lease the live one back if nobody holds it.
    AnnotationTask.objects.filter(pk=task.pk).update(votes_received=task.votes_received)
    task.state = previous_state
    live = (
        AnnotationTask.objects.select_for_update()
        .filter(AnnotationTask.live(), patch_id=task.patch_id, kind=task.kind)
        .exclude(pk=task.pk)
        .first()
    )
    if live is None or live.lease_is_running(now):
        return None
    live.lease(user, expiry)
    return live


def undo_last_vote(project: Project, user: Any) -> AnnotationTask | None:
    """Retract the user's most recent active vote and lease its task back to them.

    Returns the task to show again (None when the vote had no task, or someone else is on it now).
    """
    now = timezone.now()
    with transaction.atomic():
        vote = (
            Vote.objects.select_for_update()
            .filter(project=project, annotator=user, is_active=True, created_at__gte=now - UNDO_WINDOW)
            .order_by("-created_at", "-id")
            .first()
        )
        if vote is None:
            raise VoteError("There is no recent vote of yours to undo.")
        vote.is_active = False
        vote.retracted_at = now
        vote.save(update_fields=["is_active", "retracted_at"])
        task = _give_back(project, user, vote, now) if vote.task_id is not None else None
        recompute_consensus(project, vote.patch_id)
    return task
