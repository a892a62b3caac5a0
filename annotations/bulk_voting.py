"""Bulk labelling: one expert action ("label all these as C", from a lasso on the map) cast as one vote per
patch through the same rules as ``annotations.voting``, in one transaction, undone as one.

The votes stay append-only: a patch the expert had already labelled otherwise gets a new vote that
supersedes the old one (kept, inactive), exactly as a correction does; a patch already carrying the
expert's label is left alone. Every vote of the action carries its ``VoteBatch``. Undoing the batch
retracts its votes that are still active and, where a vote had superseded one of the expert's earlier
votes, casts that earlier label again (a new vote superseding the retracted one), so every patch's
consensus is what it was before the action. Consensus is recomputed for the action's patches with one
query and one upsert (``consensus.recompute_consensus_many``).

Experts and admins only: crowd votes need a leased task each, and a crowd member must not label what they
were not shown blind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from .consensus import recompute_consensus_many
from .models import Patch, Project, Role, Vote, VoteBatch
from .students import reference_changed
from .voting import VoteConflict, VoteError, _label, _labels

# The most patches one action may label: a lasso over more is refused with this number in the message.
MAX_BULK_PATCHES = 10_000
BULK_ROLES = (Role.ADMIN, Role.EXPERT)


class BulkForbidden(VoteError):
    status_code = 403


class BulkNotFound(VoteError):
    status_code = 404


@dataclass(frozen=True)
class BulkOutcome:
    batch: VoteBatch
    created: int  # new votes (first votes and corrections)
    corrected: int  # of which replaced one of the expert's own earlier votes
    unchanged: int  # patches that already carried the expert's vote for this label


@dataclass(frozen=True)
class UndoOutcome:
    batch: VoteBatch
    retracted: int
    restored: int  # earlier votes cast again
    skipped: int  # the action's votes already changed since (corrected or undone one by one)


def action_digest(label_id: int, patch_ids: Iterable[int]) -> str:
    text = f"{label_id}:" + ",".join(str(p) for p in sorted(patch_ids))
    return hashlib.sha256(text.encode()).hexdigest()


def _lock_annotator(project: Project, user: Any) -> None:
    """Serialise one annotator's bulk actions in a project (two identical requests racing: one wins)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [int(project.pk) % 2**31, int(user.pk) % 2**31])


def _selection(patch_ids: Iterable[Any], exclude: Iterable[Any]) -> list[int]:
    try:
        chosen = {int(p) for p in patch_ids}
        left_out = {int(p) for p in exclude}
    except (TypeError, ValueError) as exc:
        raise VoteError("Patch ids must be whole numbers.") from exc
    if len(chosen) > MAX_BULK_PATCHES:
        raise VoteError(
            f"One action labels at most {MAX_BULK_PATCHES:,} patches; this selection has {len(chosen):,}. "
            "Select a smaller region."
        )
    ids = sorted(chosen - left_out)
    if not ids:
        raise VoteError("No patches are left to label once the excluded ones are taken out.")
    return ids


def cast_bulk_votes(
    project: Project,
    user: Any,
    role: str,
    *,
    patch_ids: Iterable[Any],
    label: Any,
    exclude: Iterable[Any] = (),
    source: str = "map",
) -> BulkOutcome:
    """Label ``patch_ids`` less ``exclude`` as ``label`` (id or name) in one action. Nothing is written
    unless every patch is the project's."""
    if role not in BULK_ROLES:
        raise BulkForbidden(f"Your role in this project ({role}) may not label in bulk; experts and admins may.")
    ids = _selection(patch_ids, exclude)
    labels = _labels(project)
    label_obj = _label(labels, label)
    digest = action_digest(label_obj.pk, ids)
    with transaction.atomic():
        _lock_annotator(project, user)
        found = set(Patch.objects.filter(project=project, pk__in=ids).values_list("pk", flat=True))
        unknown = [p for p in ids if p not in found]
        if unknown:
            shown = ", ".join(str(p) for p in unknown[:5])
            raise VoteError(
                f"{len(unknown)} of the selected patches are not in this project (ids {shown}"
                f"{', ...' if len(unknown) > 5 else ''}); nothing was labelled."
            )
        same = VoteBatch.objects.filter(project=project, annotator=user, digest=digest, undone_at__isnull=True).first()
        if same is not None:
            raise VoteConflict(
                f"You already labelled exactly these {len(ids)} patches as {label_obj.name} (action {same.pk}); "
                "undo that action first to do it again."
            )
        existing = {
            v.patch_id: v
            for v in Vote.objects.select_for_update().filter(patch_id__in=ids, annotator=user, is_active=True)
        }
        unchanged = {pid for pid, v in existing.items() if v.label_id == label_obj.pk}
        if len(unchanged) == len(ids):
            raise VoteConflict(f"All {len(ids)} patches already carry your label {label_obj.name}; nothing to do.")
        replaced = [v.pk for pid, v in existing.items() if pid not in unchanged]
        batch = VoteBatch.objects.create(
            project=project, annotator=user, label=label_obj, source=source[:16], digest=digest, n_patches=len(ids)
        )
        Vote.objects.filter(pk__in=replaced).update(is_active=False)
        new = [
            Vote(
                project=project,
                patch_id=pid,
                annotator=user,
                label=label_obj,
                role=role,
                batch=batch,
                provenance=Vote.Provenance.BULK,
                supersedes_id=existing[pid].pk if pid in existing else None,
            )
            for pid in ids
            if pid not in unchanged
        ]
        try:
            with transaction.atomic():
                Vote.objects.bulk_create(new, batch_size=1000)
        except IntegrityError as exc:  # a single vote of this expert landed on one of them meanwhile
            raise VoteConflict("One of these patches got another vote of yours meanwhile; try again.") from exc
        batch.n_votes = len(new)
        batch.save(update_fields=["n_votes"])
        reference_changed(project.pk)  # only experts and admins label in bulk
        recompute_consensus_many(project, [v.patch_id for v in new], labels)
    return BulkOutcome(batch=batch, created=len(new), corrected=len(replaced), unchanged=len(unchanged))


def undo_bulk_votes(project: Project, user: Any, role: str, batch_id: Any) -> UndoOutcome:
    """Undo one bulk action of the user's as one: every patch's consensus is as it was before it."""
    if role not in BULK_ROLES:
        raise BulkForbidden(f"Your role in this project ({role}) may not label in bulk; experts and admins may.")
    now = timezone.now()
    with transaction.atomic():
        _lock_annotator(project, user)
        batch = VoteBatch.objects.select_for_update().filter(project=project, pk=batch_id).first()
        if batch is None:
            raise BulkNotFound("No such bulk action in this project.")
        if batch.annotator_id != user.pk:
            raise BulkForbidden("Only the expert who made a bulk action can undo it.")
        if batch.undone_at is not None:
            raise VoteConflict(f"This action was already undone ({batch.undone_at:%Y-%m-%d %H:%M} UTC).")
        votes = list(Vote.objects.select_for_update().filter(batch=batch, is_active=True).order_by("id"))
        Vote.objects.filter(pk__in=[v.pk for v in votes]).update(is_active=False, retracted_at=now)
        earlier = Vote.objects.in_bulk([v.supersedes_id for v in votes if v.supersedes_id is not None])
        restored = [
            Vote(
                project=project,
                patch_id=v.patch_id,
                annotator=user,
                label_id=earlier[v.supersedes_id].label_id,
                role=earlier[v.supersedes_id].role,
                task_id=earlier[v.supersedes_id].task_id,
                time_spent_ms=earlier[v.supersedes_id].time_spent_ms,
                provenance=earlier[v.supersedes_id].provenance,
                supersedes=v,
            )
            for v in votes
            if v.supersedes_id is not None
        ]
        Vote.objects.bulk_create(restored, batch_size=1000)
        batch.undone_at = now
        batch.save(update_fields=["undone_at"])
        reference_changed(project.pk)
        recompute_consensus_many(project, [v.patch_id for v in votes])
    return UndoOutcome(batch=batch, retracted=len(votes), restored=len(restored), skipped=batch.n_votes - len(votes))
