"""Each patch's consensus label, kept current from its votes, and the rule that sends disputes to experts.

Two ways to compute it, one mapping to rows:

- :func:`recompute_consensus` after every vote, correction or undo: one patch, the project's cheap
  per-item method (the iterative methods fall back to a role-weighted vote per item, except Dawid-Skene in a
  project whose crowd fit is kept current, annotations.reliability, which uses that fit's confusions);
  :func:`recompute_consensus_many` the same for a bulk action's patches, in one query and one upsert.
- :func:`recompute_project_consensus` in bulk (a round's snapshot, the admin's "recompute"): every
  voted patch with the project's method, Dawid-Skene and GLAD included, seeded with the gold labels; on
  numpy arrays read with one COPY (annotations.consensus_batch), the same results as ``batch_consensus``.

Suggestion-made votes (:data:`SUGGESTION_PROVENANCES`) count with the project's ``suggestion_weight`` in
all three, and not at all when it is 0 (:func:`vote_weight`); changing the setting recomputes the project
(``annotations.tasks.recompute_project_consensus_task``, on the worker).

Crowd votes of a student below the project's certification threshold (too few gold answers, or too few of
them right: annotations.students) are left out of all three the same way; a student's certification changing
recomputes the patches they voted on.

Whenever a patch ends ``contested``, :func:`send_contested_to_experts` queues it for expert review;
it is the only place that rule is written. It runs where the status is written: after a vote that
leaves its patch contested (in the vote's transaction), and for the rows a bulk recompute turned
contested (in the recompute's transaction). A round's publish does not sweep the project for
contested patches: they were routed when they became so, and a round writes only its batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone
from psycopg.types.json import Jsonb

from . import consensus_batch, prepared, queue
from .domain.agreement import expert_labels
from .domain.consensus import ConsensusResult, VoteRecord, batch_consensus, consensus_for_item
from .domain.consensus_arrays import (
    ARRAY_METHODS,
    VoteArrays,
    batch_consensus_arrays,
    expert_decisions,
    from_results,
    plan_changes,
)
from .models import AnnotationTask, Consensus, LabelClass, Patch, Project, Role, Vote
from .students import certification_params, counts_sql, refresh_students, uncounted_students

# Expert reviews sort above every crowd task (round priorities are 10,000 x round number + rank).
EXPERT_REVIEW_PRIORITY = 1e6
CONSENSUS_UPDATE_FIELDS = ["label", "confidence", "posterior", "method", "vote_count", "agreement", "status"]
# A bulk recompute leaves a row alone when its probabilities moved by less than this and nothing else
# changed (label, status, method and vote count are compared exactly, so no decision is left stale:
# domain.consensus_arrays.plan_changes). An iterative method re-estimates every annotator from every vote, so
# one new vote moves every patch's posterior in the last decimals; rewriting every voted patch's row for that
# made each round's snapshot write O(voted patches) rows.
PROBABILITY_TOLERANCE = 1e-3


def label_names(project: Project) -> list[str]:
    """The project's label names in display order (the class index order of every model)."""
    return list(LabelClass.objects.filter(project=project).order_by("order").values_list("name", flat=True))


# Votes whose label came from the model: the annotator accepted the suggestion strip's answer. Not
# "similar" or "bulk": their label is the annotator's own call on patches they chose (the neighbours of
# a patch, a lasso), no model answer is proposed for them, and they are experts' votes; a flipped strip
# patch is "manual" (the annotator overruled the model), so it counts in full as well.
SUGGESTION_PROVENANCES = frozenset({Vote.Provenance.ACCEPTED_SUGGESTION.value})


def vote_weight(project: Project, provenance: str) -> float:
    """How much a vote made this way counts in the project's consensus (0: it is left out)."""
    return float(project.suggestion_weight) if provenance in SUGGESTION_PROVENANCES else 1.0


def weighted_record(
    project: Project, item: int, annotator: int, label: str, role: str, provenance: str
) -> VoteRecord | None:
    """A vote as the domain functions take it, weighted by how it was made; None when the project leaves it out."""
    weight = vote_weight(project, provenance)
    if weight <= 0:
        return None
    return VoteRecord(item=item, annotator=annotator, label=label, role=role, weight=weight)


def consensus_options(project: Project) -> dict[str, Any]:
    """The project's consensus settings, as the domain functions take them."""
    return {
        "method": project.consensus_method,
        "votes_required": project.votes_required,
        "expert_weight": project.expert_weight,
        "contested_threshold": project.contested_threshold,
        # Adaptive redundancy: votes_required is then a cap, and a confident patch is settled before it.
        "early_confidence": project.redundancy_confidence if project.adaptive_redundancy else None,
    }


def uses_model_prior(project: Project) -> bool:
    """Whether adaptive redundancy weighs the project's votes by the model's posterior per patch
    (``Project.redundancy_model_prior``; only a Dawid-Skene project with adaptive redundancy)."""
    on = project.adaptive_redundancy and project.redundancy_model_prior
    return bool(on and project.consensus_method == "dawid_skene")


# The model's posterior for a patch: its latest crowd task's that carries one (annotations.queue.publish_round).
_MODEL_PRIOR_SQL = """
SELECT model_posterior FROM annotations_annotationtask
WHERE patch_id = %(patch)s AND kind = 'crowd' AND model_posterior IS NOT NULL ORDER BY id DESC LIMIT 1
"""


def _model_prior(project: Project, patch_id: int) -> dict[str, float] | None:
    if not uses_model_prior(project):
        return None
    found = prepared.rows(_MODEL_PRIOR_SQL, {"patch": patch_id})
    if not found:
        return None
    value = found[0][0]
    return json.loads(value) if isinstance(value, str) else value  # Django loads jsonb as text


def _model_priors(project: Project, patch_ids: list[int]) -> dict[int, dict[str, float]]:
    if not uses_model_prior(project):
        return {}
    latest = (
        AnnotationTask.objects.filter(
            project=project, kind=AnnotationTask.Kind.CROWD, patch_id__in=patch_ids, model_posterior__isnull=False
        )
        .order_by("patch_id", "-id")
        .distinct("patch_id")
        .values_list("patch_id", "model_posterior")
    )
    return dict(latest.iterator(chunk_size=10_000))


def consensus_fields(result: ConsensusResult, label: LabelClass | None) -> dict[str, Any]:
    """A domain result as the fields of a Consensus row."""
    return {
        "label": label,
        "confidence": result.confidence,
        "posterior": result.posterior,
        "method": result.method,
        "vote_count": result.vote_count,
        "agreement": result.agreement,
        "status": result.status,
    }


def vote_records(project: Project, *, weighted: bool = False) -> list[VoteRecord]:
    """Every active vote of the project, as the domain functions take them; ``weighted``: as consensus
    counts them (suggestion-made votes weighted, or left out, see :func:`vote_weight`; the votes of students
    below the certification threshold left out)."""
    rows = Vote.objects.filter(project=project, is_active=True).values_list(
        "patch_id", "annotator_id", "label__name", "role", "provenance"
    )
    if not weighted:
        return [VoteRecord(item=p, annotator=a, label=lbl, role=r) for p, a, lbl, r, _ in rows.iterator(10_000)]
    uncounted = uncounted_students(project)
    records = (
        weighted_record(project, p, a, lbl, r, how)
        for p, a, lbl, r, how in rows.iterator(10_000)
        if not (a in uncounted and r == Role.CROWD)
    )
    return [record for record in records if record is not None]


def gold_labels(project: Project, records: list[VoteRecord] | None = None) -> dict[int, str]:
    """Gold patches' expert labels (the expert decision on each gold patch)."""
    records = vote_records(project) if records is None else records
    experts = expert_labels(records, label_names(project))
    gold_ids = set(Patch.objects.filter(project=project, is_gold=True).values_list("pk", flat=True))
    return {int(item): label for item, label in experts.items() if item in gold_ids}


def send_contested_to_experts(project: Project, patch_ids: Iterable[int] | None = None) -> int:
    """Queue an expert review for each contested patch (of ``patch_ids``, else of the project).

    Idempotent: a patch with a live review keeps it (no second one, its priority unchanged). Returns
    the number of reviews created.
    """
    contested = Consensus.objects.filter(project=project, status=Consensus.Status.CONTESTED)
    if patch_ids is not None:
        contested = contested.filter(patch_id__in=list(patch_ids))
    return _queue_reviews(project, contested.values_list("patch_id", flat=True))


CONTESTED_REASON = "expert: the crowd contested it (split votes)"


def _queue_reviews(project: Project, patch_ids: Iterable[int]) -> int:
    priorities = dict.fromkeys(patch_ids, EXPERT_REVIEW_PRIORITY)
    reasons = dict.fromkeys(priorities, CONTESTED_REASON)
    return queue.enqueue_patches(project, priorities, kind=AnnotationTask.Kind.EXPERT, reasons=reasons)


# The patch's active votes that count: a crowd vote of a student below the certification threshold does not
# (their membership says so; annotations.students).
_ACTIVE_VOTES_SQL = f"""
SELECT v.annotator_id, v.label_id, v.role, v.provenance FROM annotations_vote v
LEFT JOIN annotations_membership m ON m.user_id = v.annotator_id AND m.project_id = v.project_id
WHERE v.patch_id = %(patch)s AND v.is_active
  AND (v.role <> 'crowd' OR {counts_sql("m", "m.gold_answers", "m.gold_correct")})
ORDER BY v.created_at, v.id
"""
# One row per patch (patch_id is unique); a new row starts without a model version, an existing one keeps its own.
_UPSERT_CONSENSUS_SQL = """
INSERT INTO annotations_consensus
    (patch_id, project_id, label_id, confidence, posterior, method, vote_count, agreement, status, updated_at)
VALUES (%(patch)s, %(project)s, %(label)s, %(confidence)s, %(posterior)s, %(method)s, %(vote_count)s, %(agreement)s,
        %(status)s, %(updated_at)s)
ON CONFLICT (patch_id) DO UPDATE SET
    project_id = EXCLUDED.project_id, label_id = EXCLUDED.label_id, confidence = EXCLUDED.confidence,
    posterior = EXCLUDED.posterior, method = EXCLUDED.method, vote_count = EXCLUDED.vote_count,
    agreement = EXCLUDED.agreement, status = EXCLUDED.status, updated_at = EXCLUDED.updated_at
RETURNING id
"""
# Adaptive redundancy: the same upsert, and in the same statement (no query more on the vote's path) the
# patch's open crowd task is closed, since its consensus no longer waits for votes. A leased one is left to
# its holder, whose vote still counts.
_CLOSE_CROWD_TASK_SQL = """
WITH closed AS (
    UPDATE annotations_annotationtask SET state = 'done', updated_at = %(updated_at)s
    WHERE patch_id = %(patch)s AND kind = 'crowd' AND state = 'open'
)
"""


def close_settled_crowd_tasks(project: Project, patch_ids: Iterable[int]) -> int:
    """Adaptive redundancy, for many patches at once: close the open crowd tasks of these (settled) patches."""
    ids = list(patch_ids)
    if not (project.adaptive_redundancy and ids):
        return 0
    closed, now = 0, timezone.now()
    for start in range(0, len(ids), 10_000):  # a batch recompute can settle a large share of a big project
        closed += AnnotationTask.objects.filter(
            project=project,
            patch_id__in=ids[start : start + 10_000],
            kind=AnnotationTask.Kind.CROWD,
            state=AnnotationTask.State.OPEN,
        ).update(state=AnnotationTask.State.DONE, updated_at=now)
    return closed


def reopen_unsettled_crowd_tasks(project: Project, patch_ids: Iterable[int]) -> int:
    """Adaptive redundancy, after a batch recompute found these patches less sure than their last vote did
    (Dawid-Skene weighs each student by their reliability, the per-vote count does not): reopen each one's
    latest closed crowd task that has room for another vote, unless the patch has a live one, so the crowd is
    asked again, up to votes_required, instead of the patch waiting to be chosen by a round."""
    ids = list(patch_ids)
    if not (project.adaptive_redundancy and ids):
        return 0
    reopened, now = 0, timezone.now()
    crowd = AnnotationTask.objects.filter(project=project, kind=AnnotationTask.Kind.CROWD)
    for start in range(0, len(ids), 10_000):
        chunk = ids[start : start + 10_000]
        live = crowd.filter(AnnotationTask.live(), patch_id__in=chunk).values("patch_id")
        latest = (
            crowd.filter(patch_id__in=chunk, state=AnnotationTask.State.DONE, votes_received__lt=F("votes_needed"))
            .exclude(patch_id__in=live)
            .order_by("patch_id", "-id")
            .distinct("patch_id")
            .values_list("id", flat=True)
        )
        reopened += AnnotationTask.objects.filter(pk__in=list(latest)).update(
            state=AnnotationTask.State.OPEN, updated_at=now
        )
    return reopened


def recompute_consensus(project: Project, patch: Patch | int, labels: list[LabelClass] | None = None) -> Consensus:
    """Recompute one patch's consensus from its active votes with the project's cheap method.

    ``labels`` (the project's, in display order) saves the caller's query when it has them. The row
    is written with one upsert.
    """
    patch_id = patch.pk if isinstance(patch, Patch) else int(patch)
    labels = list(LabelClass.objects.filter(project=project).order_by("order")) if labels is None else labels
    # Runs on every vote: two prepared statements (annotations.prepared), no ORM query building.
    votes = prepared.rows(_ACTIVE_VOTES_SQL, {"patch": patch_id, **certification_params(project)})
    name_of = {lc.pk: lc.name for lc in labels}
    weighed = (weighted_record(project, patch_id, a, name_of[lbl], r, how) for a, lbl, r, how in votes)
    records = [record for record in weighed if record is not None]
    if records:
        result = consensus_for_item(
            records,
            [lc.name for lc in labels],
            **consensus_options(project),
            reliabilities=_reliabilities(project),
            prior=_model_prior(project, patch_id),
        )
        label = next((lc for lc in labels if lc.name == result.label), None) if result.label else None
        fields = consensus_fields(result, label)
    else:
        fields = _pending_fields(project)
    row = Consensus(patch_id=patch_id, project=project, updated_at=timezone.now(), **fields)
    settled = project.adaptive_redundancy and row.status != Consensus.Status.PENDING
    ((row.pk,),) = prepared.rows(
        _CLOSE_CROWD_TASK_SQL + _UPSERT_CONSENSUS_SQL if settled else _UPSERT_CONSENSUS_SQL,
        {
            "patch": patch_id,
            "project": project.pk,
            "label": row.label_id,
            "confidence": row.confidence,
            "posterior": Jsonb(row.posterior),
            "method": row.method,
            "vote_count": row.vote_count,
            "agreement": row.agreement,
            "status": row.status,
            "updated_at": row.updated_at,
        },
    )
    row._state.adding = False
    if row.status == Consensus.Status.CONTESTED:
        _queue_reviews(project, [patch_id])
    _note_votes(project)
    return row


def _reliabilities(project: Project) -> Any:
    """The crowd's current Dawid-Skene fit for the per-vote consensus (annotations.reliability.current)."""
    from .reliability import current

    return current(project)


def _note_votes(project: Project) -> None:
    """Every vote path recomputes here: tell the online reliabilities (annotations.reliability)."""
    from .reliability import note_votes

    note_votes(project)


def _pending_fields(project: Project) -> dict[str, Any]:
    """Every vote was retracted: the patch is back to pending with no label."""
    return {
        "label": None,
        "confidence": 0.0,
        "posterior": {},
        "method": project.consensus_method,
        "vote_count": 0,
        "agreement": 0.0,
        "status": Consensus.Status.PENDING,
    }


def recompute_consensus_many(
    project: Project, patch_ids: Iterable[int], labels: list[LabelClass] | None = None
) -> dict[int, Consensus]:
    """Recompute these patches' consensus (each from its own active votes, the project's cheap method) with
    one query for their votes and one upsert for their rows, and queue reviews for the contested ones in one
    call: what a bulk action (annotations.bulk_voting) does instead of one transaction per patch."""
    ids = sorted({int(p) for p in patch_ids})
    labels = list(LabelClass.objects.filter(project=project).order_by("order")) if labels is None else labels
    name_of = {lc.pk: lc.name for lc in labels}
    names = [lc.name for lc in labels]
    by_patch: dict[int, list[VoteRecord]] = {pid: [] for pid in ids}
    votes = Vote.objects.filter(patch_id__in=ids, is_active=True).values_list(
        "patch_id", "annotator_id", "label_id", "role", "provenance"
    )
    uncounted = uncounted_students(project)
    for pid, a, lbl, r, how in votes.iterator(chunk_size=10_000):
        if a in uncounted and r == Role.CROWD:
            continue  # a student below the certification threshold
        record = weighted_record(project, pid, a, name_of[lbl], r, how)
        if record is not None:
            by_patch[pid].append(record)
    options = consensus_options(project)
    fit = _reliabilities(project)
    priors = _model_priors(project, ids)
    rows: dict[int, Consensus] = {}
    for pid, records in by_patch.items():
        if records:
            result = consensus_for_item(records, names, **options, reliabilities=fit, prior=priors.get(pid))
            label = next((lc for lc in labels if lc.name == result.label), None) if result.label else None
            fields = consensus_fields(result, label)
        else:
            fields = _pending_fields(project)
        rows[pid] = Consensus(patch_id=pid, project=project, **fields)
    Consensus.objects.bulk_create(
        list(rows.values()),
        update_conflicts=True,
        unique_fields=["patch"],
        update_fields=[*CONSENSUS_UPDATE_FIELDS, "project", "updated_at"],
        batch_size=1000,
    )
    contested = [pid for pid, row in rows.items() if row.status == Consensus.Status.CONTESTED]
    if contested:
        _queue_reviews(project, contested)
    close_settled_crowd_tasks(project, [pid for pid, row in rows.items() if row.status != Consensus.Status.PENDING])
    _note_votes(project)
    return rows


def recompute_project_consensus(project: Project) -> int:
    """Batch consensus with the project's method (the iterative ones run here), seeded with gold.

    Returns the number of consensus rows computed. The patches it turned contested (new rows, or rows
    that were not contested before) get their expert review in the same transaction; contested rows
    it leaves as they were were routed when they became contested. A row whose votes no longer count
    (each left out by the suggestion weight) goes back to pending.
    """
    with _project_lock(project):
        return _recompute_project(project)


@contextmanager
def _project_lock(project: Project) -> Iterator[None]:
    """One batch recompute of a project at a time (a round's snapshot, a settings change on the worker, the
    admin's button): two at once would both create the same new rows. A session-level advisory lock, so
    the long read and fit before the write need no open transaction; a killed worker's lock goes with its
    connection."""
    key = int.from_bytes(
        hashlib.blake2b(f"consensus:{project.pk}".encode(), digest_size=8).digest(), "big", signed=True
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [key])
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [key])


def schedule_project_recompute(project: Project) -> None:
    """Recompute the project's consensus on the worker once the caller's transaction commits (at a million
    patches, with Dawid-Skene, it takes minutes: not something a settings request waits for)."""
    from .tasks import recompute_project_consensus_task

    project_id = project.pk
    transaction.on_commit(lambda: recompute_project_consensus_task.delay(project_id))


def _recompute_project(project: Project) -> int:
    """The batch recompute on arrays (annotations.consensus_batch, annotations.domain.consensus_arrays): the
    votes read once, gold from the same arrays, the stored rows compared as arrays, rows built only for what
    is new or changed. GLAD and MACE compute on records (crowd-kit's own models) and are compared the same way."""
    refresh_students(project, recompute=False)  # who counts now: this recompute covers every patch
    labels = list(LabelClass.objects.filter(project=project).order_by("order").values_list("pk", "name"))
    label_ids, names = [pk for pk, _ in labels], [name for _, name in labels]
    method = project.consensus_method
    if method in ARRAY_METHODS:
        votes = consensus_batch.counted_vote_arrays(project, label_ids)
        prior_item, prior = consensus_batch.model_priors(project, names) if uses_model_prior(project) else (None, None)
        results = (
            batch_consensus_arrays(
                votes,
                len(names),
                **consensus_options(project),
                **_gold_arrays(project, votes, names),
                prior_item=prior_item,
                prior=prior,
            )
            if len(votes)
            else from_results({}, names, method)
        )
    else:
        records = vote_records(project, weighted=True)
        found = (
            batch_consensus(
                records, names, **consensus_options(project), gold=gold_labels(project, records), seed=project.seed
            )
            if records
            else {}
        )
        results = from_results(found, names, method)
    stored = consensus_batch.stored_rows(project, label_ids, names)
    changes = plan_changes(stored, results, PROBABILITY_TOLERANCE)
    # Only what changed is written: at a million patches most consensus rows are the same as before.
    with transaction.atomic():
        consensus_batch.insert_rows(project, results, changes.create, label_ids, names)
        consensus_batch.rewrite_rows(
            changes.update_ids.tolist(), results, changes.update, label_ids, names, changes.to_pending.tolist(), method
        )
        if len(changes.contested):
            send_contested_to_experts(project, changes.contested.tolist())
        close_settled_crowd_tasks(project, changes.settled.tolist())
        reopen_unsettled_crowd_tasks(project, changes.unsettled.tolist())
    return len(results)


def _gold_arrays(project: Project, votes: VoteArrays, names: list[str]) -> dict[str, np.ndarray]:
    """``gold_labels`` from the vote arrays: the experts' untied decision on each gold patch."""
    items, decided = expert_decisions(votes, len(names))
    gold_ids = np.fromiter(
        Patch.objects.filter(project=project, is_gold=True).values_list("pk", flat=True).iterator(), dtype=np.int64
    )
    on_gold = np.isin(items, gold_ids)
    return {"gold_item": items[on_gold], "gold_label": decided[on_gold]}
