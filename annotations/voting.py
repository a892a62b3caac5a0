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

from . import prepared
from .consensus import recompute_consensus
from .models import AnnotationTask, Consensus, LabelClass, Patch, Project, Role, Vote
from .queue import QueueError
from .students import reference_changed, refresh_students

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


_LABEL_FIELDS = [f.attname for f in LabelClass._meta.concrete_fields]
_LABELS_SQL = (
    "SELECT " + ", ".join(f'"{f.column}"' for f in LabelClass._meta.concrete_fields) + " FROM annotations_labelclass"
    ' WHERE project_id = %(project)s ORDER BY "order"'
)
# A crowd vote's two writes as prepared statements (annotations.prepared). The task update is
# AnnotationTask.record_vote in SQL, guarded by AnnotationTask.lease_is_held: it matches no row unless
# the voter holds a running lease on this task of this patch, and the caller then says why.
_RECORD_VOTE_SQL = """
UPDATE annotations_annotationtask
SET votes_received = votes_received + 1, lease_owner_id = NULL, lease_expires_at = NULL,
    state = CASE WHEN votes_received + 1 >= votes_needed THEN 'done' ELSE 'open' END, updated_at = %(now)s
WHERE id = %(task)s AND project_id = %(project)s AND patch_id = %(patch)s AND state = 'leased'
  AND lease_owner_id = %(user)s AND lease_expires_at >= %(now)s
RETURNING """ + ", ".join(f.column for f in AnnotationTask._meta.concrete_fields)
_TASK_FIELDS = [f.attname for f in AnnotationTask._meta.concrete_fields]
# The partial unique index (one active vote per patch and annotator) refuses a second vote, even from
# two requests racing: the loser's insert does nothing and returns no id.
_INSERT_VOTE_SQL = """
INSERT INTO annotations_vote
    (project_id, patch_id, annotator_id, label_id, role, task_id, time_spent_ms, provenance, model_version_shown_id,
     is_active, created_at)
VALUES (%(project)s, %(patch)s, %(user)s, %(label)s, %(role)s, %(task)s, %(time_spent_ms)s, %(provenance)s, %(shown)s,
        true, %(now)s)
ON CONFLICT (patch_id, annotator_id) WHERE is_active DO NOTHING
RETURNING id
"""
ALREADY_VOTED = "You have already voted on this patch; undo or correct your vote instead."


def _labels(project: Project) -> list[LabelClass]:
    """The project's labels in display order: one query serves the lookup and the consensus."""
    return [
        LabelClass.from_db("default", _LABEL_FIELDS, row) for row in prepared.rows(_LABELS_SQL, {"project": project.pk})
    ]


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
    provenance: str = Vote.Provenance.MANUAL,
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
    spent = max(0, min(int(time_spent_ms or 0), 24 * 3600 * 1000))
    with transaction.atomic():
        task = None
        if task_id not in (None, ""):
            task, pid = _record_vote_on_task(project, user, task_id, patch_id, now)
        elif role == Role.CROWD and not crowd_without_task:
            raise VoteConflict("Crowd votes need a leased task: ask for the next task first.")
        else:
            pid = _patch_id(project, patch_id)
        values = {"project": project.pk, "patch": pid, "user": user.pk, "label": label_obj.pk, "role": str(role)}
        values.update(
            task=task.pk if task is not None else None,
            time_spent_ms=spent,
            now=now,
            provenance=str(provenance),
            shown=model_version_shown,
        )
        inserted = prepared.rows(_INSERT_VOTE_SQL, values)
        if not inserted:
            raise VoteConflict(ALREADY_VOTED)  # rolls back the task's update with it
        vote = Vote(
            pk=inserted[0][0],
            project=project,
            patch_id=pid,
            annotator=user,
            label=label_obj,
            role=role,
            task=task,
            time_spent_ms=spent,
            provenance=provenance,
            model_version_shown_id=model_version_shown,
            created_at=now,
        )
        vote._state.adding = False
        if role != Role.CROWD:
            reference_changed(project.pk)  # the reference of the students' learning curves
        consensus = recompute_consensus(project, pid, labels)
        if task is not None and task.kind == Kind.CROWD and task.state == AnnotationTask.State.OPEN:
            if project.adaptive_redundancy and consensus.status != Consensus.Status.PENDING:
                task.state = AnnotationTask.State.DONE  # closed by the consensus upsert (adaptive redundancy)
        if task is not None and task.kind == Kind.GOLD:
            # A gold answer: the student's gold counts and certification follow it (annotations.students); a
            # certification that changes recomputes the patches they voted on, this one included.
            if refresh_students(project, user):
                consensus = Consensus.objects.get(patch_id=pid)
    gold_answer = None
    if task is not None and task.kind == Kind.GOLD and project.training_mode:
        gold_answer = consensus.label
    return VoteOutcome(vote=vote, task=task, consensus=consensus, gold_answer=gold_answer)


def _record_vote_on_task(
    project: Project, user: Any, task_id: Any, patch_id: Any, now: Any
) -> tuple[AnnotationTask, int]:
    """Count a vote on a task the user holds (one UPDATE); VoteError/VoteConflict saying why not."""
    try:
        tid, pid = int(task_id), int(patch_id)
    except (TypeError, ValueError) as exc:
        raise VoteError("No such task in this project.") from exc
    if 0 < tid <= 2**63 - 1 and 0 < pid <= 2**63 - 1:
        params = {"task": tid, "project": project.pk, "patch": pid, "user": user.pk, "now": now}
        updated = prepared.rows(_RECORD_VOTE_SQL, params)
        if updated:
            task = AnnotationTask.from_db("default", _TASK_FIELDS, updated[0])
            task.project = project
            return task, task.patch_id  # the task's patch is the project's (checked when it was queued)
    # Not counted: find out why, in the order the checks were always made.
    found = AnnotationTask.objects.filter(project=project, pk=tid).first() if 0 < tid <= 2**63 - 1 else None
    if found is None:
        raise VoteError("No such task in this project.")
    if str(found.patch_id) != str(patch_id):
        raise VoteError("The task is for a different patch.")
    raise VoteConflict("Your lease on this task has expired or was never yours; ask for the next task.")


def correct_vote(
    project: Project,
    user: Any,
    role: str,
    *,
    vote_id: Any,
    label: Any,
    provenance: str = Vote.Provenance.MANUAL,
) -> VoteOutcome:
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
            provenance=provenance,
        )
        if Role.CROWD not in (role, old.role):
            reference_changed(project.pk)
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
        if vote.role != Role.CROWD:
            reference_changed(project.pk)
        task = _give_back(project, user, vote, now) if vote.task_id is not None else None
        recompute_consensus(project, vote.patch_id)
    return task
