"""The annotation queue: building it, leasing one task at a time, skipping, expiring.

Leasing is ``SELECT ... FOR UPDATE SKIP LOCKED`` on the candidate rows followed by an update in
the same transaction, so two annotators asking at once never get the same task, and neither
waits on the other's row lock. Expired leases are taken back lazily by the same query.

A user may hold one lease ahead (``fresh=True``) so the annotator can load the next patch while
the person looks at the current one: never more than ``MAX_LEASES`` unexpired leases at a time.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from django.db import IntegrityError, transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from . import prepared, students
from .models import AnnotationTask, Consensus, Patch, Project, Role, Slide, TaskSkip, Vote

Kind = AnnotationTask.Kind
State = AnnotationTask.State


class QueueError(Exception):
    """A queue operation that cannot be done; the message is shown to the user."""

    status_code = 400


class LeaseError(QueueError):
    status_code = 409


@dataclass(frozen=True)
class QueueStats:
    open: int
    leased: int
    done: int
    expert_open: int
    gold_patches: int


def kinds_for_role(role: str) -> tuple[str, ...]:
    if role == Role.CROWD:
        return (Kind.CROWD,)
    return (Kind.EXPERT, Kind.CROWD)


def _available(project: Project, now: Any) -> Q:
    return Q(project=project) & AnnotationTask.available(now)


SKIP_MEMORY = timedelta(hours=1)


MAX_LEASES = 2  # the task on screen and one ahead
# A round's batch ranks above every earlier round's: priority = step x round number + a rank fraction.
ROUND_PRIORITY_STEP = 10.0


# The hot path's statements (annotations.prepared): fixed text, prepared once per connection. A task
# comes back with its patch and the patch's slide name, all that TaskSerializer shows.
_TASK_FIELDS = [f.attname for f in AnnotationTask._meta.concrete_fields]
_PATCH_FIELDS = [f.attname for f in Patch._meta.concrete_fields]
_TASK_COLUMNS = ", ".join(
    [f"t.{f.column}" for f in AnnotationTask._meta.concrete_fields]
    + [f"p.{f.column}" for f in Patch._meta.concrete_fields]
    + ["s.name"]
)
_HELD_SQL = f"""
SELECT {_TASK_COLUMNS}
FROM annotations_annotationtask t
JOIN annotations_patch p ON p.id = t.patch_id
JOIN annotations_slide s ON s.id = p.slide_id
WHERE t.lease_owner_id = %(user)s AND t.project_id = %(project)s AND t.state = 'leased'
  AND t.lease_expires_at >= %(now)s
ORDER BY t.lease_expires_at, t.id
"""
# AnnotationTask.available(now), not voted on by the user, not skipped by them lately, not a patch
# they hold a task for; the best by priority, locked without waiting (SKIP LOCKED), and leased in the
# same statement. The state IN (...) repeats the partial index's condition, so that the plan PostgreSQL
# keeps for the prepared statement walks task_live_by_priority.
_LEASE_SQL = f"""
WITH picked AS (
    SELECT t.id FROM annotations_annotationtask t
    WHERE t.project_id = %(project)s AND t.kind = %(kind)s
      AND t.state IN ('open', 'leased')
      AND (t.state = 'open' OR t.lease_expires_at < %(now)s)
      AND NOT EXISTS (
          SELECT 1 FROM annotations_vote v WHERE v.patch_id = t.patch_id AND v.annotator_id = %(user)s)
      AND NOT EXISTS (
          SELECT 1 FROM annotations_taskskip k
          WHERE k.task_id = t.id AND k.user_id = %(user)s AND k.created_at >= %(skipped_since)s)
      AND t.patch_id <> ALL(%(held)s::bigint[])
    ORDER BY t.priority DESC, t.id
    LIMIT 1
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE annotations_annotationtask t
SET state = 'leased', lease_owner_id = %(user)s, lease_expires_at = %(expiry)s, updated_at = %(now)s
FROM picked, annotations_patch p, annotations_slide s
WHERE t.id = picked.id AND p.id = t.patch_id AND s.id = p.slide_id
RETURNING {_TASK_COLUMNS}
"""
_LOCK_USER_SQL = "SELECT id FROM auth_user WHERE id = %(user)s FOR NO KEY UPDATE"


def _task_from_row(row: tuple[Any, ...], project: Project, user: Any) -> AnnotationTask:
    """A task row with its patch and slide name (a _TASK_COLUMNS row) as model instances."""
    n_task, n_patch = len(_TASK_FIELDS), len(_PATCH_FIELDS)
    task = AnnotationTask.from_db("default", _TASK_FIELDS, row[:n_task])
    patch = Patch.from_db("default", _PATCH_FIELDS, row[n_task : n_task + n_patch])
    patch.slide = Slide.from_db("default", ["id", "name"], (patch.slide_id, row[-1]))
    patch.project = project
    task.project, task.patch = project, patch
    if task.lease_owner_id == getattr(user, "pk", None):
        task.lease_owner = user
    return task


def held_leases(project: Project, user: Any, now: Any = None) -> list[AnnotationTask]:
    """The user's unexpired leases in this project, the one leased first first."""
    params = {"user": user.pk, "project": project.pk, "now": now or timezone.now()}
    return [_task_from_row(row, project, user) for row in prepared.rows(_HELD_SQL, params)]


def _wants_gold(project: Project, user: Any, ahead: int) -> bool:
    """A reproducible coin flip per (project, user, vote count) at the student's gold rate: the project's
    ``gold_rate``, or with ``adaptive_gold`` one that follows what the gold checks say of the student
    (annotations.students). At most one query.

    ``ahead`` counts the leases already held, so a lease taken ahead gets the flip of the vote
    it will become."""
    return students.wants_gold(project, user, ahead)


def _lease_gold(project: Project, user: Any, now: Any) -> AnnotationTask | None:
    """A gold patch this crowd member has not seen, as a private one-vote task."""
    candidates = (
        Patch.objects.filter(project=project, is_gold=True, consensus__label__isnull=False)
        .exclude(Exists(Vote.objects.filter(patch=OuterRef("pk"), annotator=user)))
        .exclude(Exists(AnnotationTask.objects.filter(patch=OuterRef("pk"), lease_owner=user, state=State.LEASED)))
        .values_list("pk", flat=True)[:200]
    )
    ids = list(candidates)
    if not ids:
        return None
    patch_id = random.Random(f"{project.seed}:{user.pk}:{len(ids)}").choice(ids)
    task = AnnotationTask(project=project, patch_id=patch_id, kind=Kind.GOLD, votes_needed=1, priority=0)
    task.lease(user, now + timedelta(minutes=project.lease_minutes))
    return task


def lease_next_task(project: Project, user: Any, role: str, *, fresh: bool = False) -> AnnotationTask | None:
    """Lease the highest-priority task this user may do, or return the lease they already hold.

    With ``fresh=True`` a held lease is never returned: a new task is leased, one the user does
    not hold and whose patch they hold no other task for, unless they already hold
    ``MAX_LEASES`` unexpired leases. Returns None when nothing is left for this user (or, fresh,
    when they hold enough).
    """
    now = timezone.now()
    with transaction.atomic():
        # One leasing request per user at a time, so concurrent requests cannot exceed the cap.
        # FOR NO KEY UPDATE does not block votes and other rows referencing the user. It is a
        # statement of its own: the next one then reads the leases a request just ahead committed.
        prepared.rows(_LOCK_USER_SQL, {"user": user.pk})
        held_now = held_leases(project, user, now)
        if held_now and not fresh:
            return held_now[0]  # the lease already held (page reload, or a concurrent request)
        if len(held_now) >= MAX_LEASES:
            return None
        if role == Role.CROWD and _wants_gold(project, user, ahead=len(held_now)):
            gold = _lease_gold(project, user, now)
            if gold is not None:
                return gold
        params = {
            "project": project.pk,
            "user": user.pk,
            "now": now,
            "expiry": now + timedelta(minutes=project.lease_minutes),
            "skipped_since": now - SKIP_MEMORY,
            # Voting on one task of a patch would leave the other one unvotable.
            "held": [t.patch_id for t in held_now],
        }
        for kind in kinds_for_role(role):
            leased = prepared.rows(_LEASE_SQL, {**params, "kind": str(kind)})
            if leased:
                return _task_from_row(leased[0], project, user)
    return None


def lease_ahead(project: Project, user: Any, role: str, current: AnnotationTask | None) -> AnnotationTask | None:
    """The user's second lease besides ``current``: one they already hold, else a fresh one."""
    if current is None:
        return None
    others = [t for t in held_leases(project, user) if t.pk != current.pk]
    if others:
        return others[0]
    return lease_next_task(project, user, role, fresh=True)


def release_task(project: Project, user: Any, task_id: int) -> AnnotationTask:
    """Skip: give a leased task back to the pool (a private gold task is cancelled)."""
    with transaction.atomic():
        task = AnnotationTask.objects.select_for_update().filter(project=project, pk=task_id).first()
        if task is None:
            raise QueueError("No such task in this project.")
        if task.lease_owner_id != user.pk or task.state != State.LEASED:
            raise LeaseError("You do not hold a lease on this task; ask for the next task instead.")
        task.release()
        TaskSkip.objects.create(task=task, user=user)
    return task


def seeded_spread(patches: Iterable[tuple[int, int]], seed: int) -> dict[int, float]:
    """Priorities for a cold queue: a seeded random order that alternates between slides.

    ``patches`` are (patch_id, slide_id). Each slide's patches are shuffled, then slides are
    visited round-robin (in a shuffled order), so the first tasks cover many slides. Priorities lie
    in (0, 1], below every round's (see ``publish_round``), whatever the number of patches.
    """
    rng = random.Random(seed)
    by_slide: dict[int, list[int]] = defaultdict(list)
    for patch_id, slide_id in patches:
        by_slide[slide_id].append(patch_id)
    slides = sorted(by_slide)
    rng.shuffle(slides)
    for slide_id in slides:
        rng.shuffle(by_slide[slide_id])
    order: list[int] = []
    depth = 0
    while len(order) < sum(len(v) for v in by_slide.values()):
        for slide_id in slides:
            if depth < len(by_slide[slide_id]):
                order.append(by_slide[slide_id][depth])
        depth += 1
    total = len(order)
    return {patch_id: (total - rank) / total for rank, patch_id in enumerate(order)}


def enqueue_patches(
    project: Project,
    priorities: dict[int, float],
    *,
    kind: str = Kind.CROWD,
    round_id: int | None = None,
    arms: dict[int, str] | None = None,
    reasons: Mapping[int, str] | None = None,
    posteriors: Mapping[int, dict[str, float]] | None = None,
) -> int:
    """Create tasks for patches that have no live task of this kind; update priorities of live ones.

    Returns the number of tasks created. Patches that already reached consensus from enough
    votes are not queued again for the crowd. ``reasons`` (patch id -> why it was routed this way) is
    each task's ``route_reason``; a live task given one takes it. ``posteriors`` (patch id -> the model's
    posterior for it, label name -> probability) is each task's ``model_posterior``, likewise.
    """
    if not priorities:
        return 0
    arms = arms or {}
    reasons = reasons or {}
    posteriors = posteriors or {}
    votes_needed = project.votes_required if kind == Kind.CROWD else 1
    live = {
        t.patch_id: t
        for t in AnnotationTask.objects.filter(
            AnnotationTask.live(), project=project, kind=kind, patch_id__in=list(priorities)
        )
    }
    settled: set[int] = set()
    if kind == Kind.CROWD:
        enough = Q(vote_count__gte=votes_needed)
        if project.adaptive_redundancy:  # a confident consensus needs no more crowd votes
            enough |= Q(status__in=[Consensus.Status.AGREED, Consensus.Status.EXPERT])
        settled = set(
            Consensus.objects.filter(enough, project=project, patch_id__in=list(priorities)).values_list(
                "patch_id", flat=True
            )
        )
    to_update = []
    for patch_id, task in live.items():
        wanted = (
            priorities[patch_id],
            round_id or task.round_id,
            arms.get(patch_id, task.arm),
            reasons.get(patch_id, task.route_reason),
            posteriors.get(patch_id, task.model_posterior),
        )
        if wanted != (task.priority, task.round_id, task.arm, task.route_reason, task.model_posterior):
            task.priority, task.round_id, task.arm, task.route_reason, task.model_posterior = wanted
            to_update.append(task)
    AnnotationTask.objects.bulk_update(
        to_update, ["priority", "round", "arm", "route_reason", "model_posterior"], batch_size=1000
    )
    new = [
        AnnotationTask(
            project=project,
            patch_id=pid,
            kind=kind,
            priority=prio,
            round_id=round_id,
            arm=arms.get(pid, ""),
            votes_needed=votes_needed,
            route_reason=reasons.get(pid, ""),
            model_posterior=posteriors.get(pid),
        )
        for pid, prio in priorities.items()
        if pid not in live and pid not in settled
    ]
    try:
        with transaction.atomic():  # a savepoint, so a conflict does not abort the caller's transaction
            AnnotationTask.objects.bulk_create(new, batch_size=1000)
    except IntegrityError:
        # A concurrent enqueue created some of the same tasks; fall back to one at a time.
        created = 0
        for task in new:
            try:
                with transaction.atomic():
                    task.save()
                created += 1
            except IntegrityError:
                continue
        return created
    return len(new)


def publish_round(
    project: Project,
    *,
    round_id: int,
    chosen: list[tuple[int, str]],
    rest_priority: Mapping[int, float] | None = None,
    round_number: int,
    tail: int | None = None,
    proba: Any = None,
    class_names: list[str] | None = None,
) -> int:
    """Put a round's choice at the top of the crowd queue; returns the number of tasks created.

    With the project's ``expert_routing`` "value", the chosen patches the crowd would be a waste on go to
    the experts' queue instead, at the same priorities (annotations.expert_routing); ``proba`` (the model's
    posterior per chosen patch, rows in ``chosen`` order and columns in ``class_names`` order, None on a cold
    start) is what that weighs, and each crowd task keeps its row as ``model_posterior`` (what adaptive
    redundancy with ``redundancy_model_prior`` weighs the votes against). Every task gets its ``route_reason``.
    A patch sent to the experts leaves the crowd queue in the same transaction (:func:`retire_crowd_tasks`).

    ``chosen`` is (patch id, arm) in the strategy's order, best first: its patches rank above every
    earlier round's. With ``rest_priority`` (the new model's uncertainty per patch), the ``tail``
    (default: as many as were chosen) most uncertain other open crowd tasks come next, above what
    earlier rounds left. Everything else keeps its place.

    It writes O(batch) rows, never the whole queue: the caller's transaction then holds row locks on
    at most ``len(chosen) + tail`` tasks, for the moment between these writes and its commit, and
    annotators leasing meanwhile get the next unlocked task (SKIP LOCKED) instead of waiting or
    finding the queue empty.
    """
    n = len(chosen)
    base = ROUND_PRIORITY_STEP * round_number
    # The batch in (base, base + 1], the tail in (base - 1, base]; earlier rounds stay at or below
    # base - STEP + 1. Ranks are fractions, so a batch of any size fits in its band.
    priorities = {pid: base + (n - rank) / max(n, 1) for rank, (pid, _) in enumerate(chosen)}
    if rest_priority:
        # The tail only moves up: its tasks stay in the round (and arm) that queued them.
        size = n if tail is None else tail
        moved = _uncertain_tail(project, rest_priority, exclude=priorities, size=size)
        enqueue_patches(project, {pid: base - 1 + min(max(score, 0.0), 1.0) * 0.999 for pid, score in moved})
    from .expert_routing import split_batch

    split = split_batch(project, [pid for pid, _ in chosen], proba, class_names)
    arms = dict(chosen)
    created = 0
    if split.expert:
        experts = {pid: priorities[pid] for pid in split.expert}
        created += enqueue_patches(
            project, experts, kind=Kind.EXPERT, round_id=round_id, arms=arms, reasons=split.expert
        )
        retire_crowd_tasks(project, list(split.expert))
    crowd = {pid: priorities[pid] for pid in split.crowd}
    posteriors = _posteriors(chosen, proba, class_names, crowd)
    return created + enqueue_patches(
        project, crowd, round_id=round_id, arms=arms, reasons=split.crowd, posteriors=posteriors
    )


def _posteriors(
    chosen: list[tuple[int, str]], proba: Any, class_names: list[str] | None, wanted: Mapping[int, float]
) -> dict[int, dict[str, float]]:
    """The model's posterior per patch of ``wanted`` (label name -> probability, rounded to 6 decimals), from
    ``proba``'s rows in ``chosen`` order; none on a cold start."""
    if proba is None or not class_names:
        return {}
    rows = np.asarray(proba, dtype=np.float64)
    return {
        pid: {name: round(float(p), 6) for name, p in zip(class_names, rows[i], strict=True)}
        for i, (pid, _) in enumerate(chosen)
        if pid in wanted
    }


def retire_crowd_tasks(project: Project, patch_ids: list[int]) -> int:
    """These patches now go to the experts: take their live crowd tasks out of the students' queue.

    An open task, or one whose lease expired, is cancelled (no longer wanted; nothing reopens a cancelled
    task, unlike a closed one under adaptive redundancy). A lease still running is left to its holder: they
    may be looking at the patch right now, and cancelling it would throw their vote away ("your lease has
    expired") for a patch whose votes still count in its consensus. Its ``votes_needed`` drops to the next
    vote, so that vote closes the task instead of reopening it for the next student (a skip or a lapsed
    lease lets at most one more student vote on it). Returns the number cancelled.

    Two set-based UPDATEs over at most ``len(patch_ids)`` rows, in the caller's transaction: the publish
    stays O(batch), and leasing meanwhile skips these locked rows (SKIP LOCKED) rather than waiting. Each
    statement re-checks its condition on a row a concurrent lease or vote has just changed, so a task
    leased in between is capped, not cancelled.
    """
    if not patch_ids:
        return 0
    now = timezone.now()
    crowd = AnnotationTask.objects.filter(project=project, kind=Kind.CROWD, patch_id__in=patch_ids)
    cancelled = crowd.filter(AnnotationTask.available(now)).update(
        state=State.CANCELLED, lease_owner=None, lease_expires_at=None, updated_at=now
    )
    crowd.filter(state=State.LEASED, lease_expires_at__gte=now, votes_needed__gt=F("votes_received") + 1).update(
        votes_needed=F("votes_received") + 1, updated_at=now
    )
    return cancelled


def _uncertain_tail(
    project: Project, scores: Mapping[int, float], *, exclude: Mapping[int, float], size: int, chunk: int = 5000
) -> list[tuple[int, float]]:
    """The ``size`` patches with the highest scores that have an open crowd task, best first."""
    if size <= 0:
        return []
    ranked = sorted((pid for pid in scores if pid not in exclude), key=lambda pid: -scores[pid])
    found: list[tuple[int, float]] = []
    for start in range(0, len(ranked), chunk):
        part = ranked[start : start + chunk]
        open_ids = set(
            AnnotationTask.objects.filter(
                project=project, kind=Kind.CROWD, state=State.OPEN, patch_id__in=part
            ).values_list("patch_id", flat=True)
        )
        found.extend((pid, scores[pid]) for pid in part if pid in open_ids)
        if len(found) >= size:
            break
    return found[:size]


def queue_stats(project: Project) -> QueueStats:
    now = timezone.now()
    tasks = AnnotationTask.objects.filter(project=project)
    return QueueStats(
        open=tasks.filter(_available(project, now), kind=Kind.CROWD).count(),
        leased=tasks.filter(state=State.LEASED, lease_expires_at__gte=now).count(),
        done=tasks.filter(state=State.DONE).count(),
        expert_open=tasks.filter(_available(project, now), kind=Kind.EXPERT).count(),
        gold_patches=Patch.objects.filter(project=project, is_gold=True).count(),
    )
