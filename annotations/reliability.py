"""Online consensus (issue 15, part 7): the crowd's Dawid-Skene reliabilities, kept current as votes arrive.

A round's batch consensus fits Dawid-Skene on the project's votes, but only when a round runs; value routing
(annotations.expert_routing) needs each student's confusion matrix *now*. So every committed vote of a
project that routes by value notes itself (:func:`note_votes`, called from annotations.consensus where every
vote path recomputes its patch): the first vote of a quiet spell schedules :func:`refresh` on the worker
``REFRESH_DELAY_S`` seconds later (a cache ``add``, so a burst of votes schedules one refresh, not one each),
and the refresh takes every vote that arrived by then.

:func:`refresh` reads the project's active votes with one binary ``COPY`` into numpy arrays (no model
instance, no tuple per vote: 3M votes are 120 MB of float64 parsed in one go), fits
:func:`annotations.domain.dawid_skene.fit_arrays` warm-started from the stored fit, within
``REFRESH_BUDGET_S`` seconds of EM, and stores the students' expected-count matrices in the project's
:class:`ReliabilityFit` row, the one place routing reads them. Known labels anchor the fit as in the batch
consensus: untied expert decisions (gold patches' included) clamp their patches; suggestion-made votes count
with the project's suggestion weight (left out at 0).
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
from django.core.cache import cache
from django.db import connection, transaction
from django.utils import timezone
from psycopg import sql

from .consensus import SUGGESTION_PROVENANCES, uses_model_prior
from .domain.consensus import Reliabilities
from .domain.consensus_arrays import find_sorted
from .domain.dawid_skene import ArrayFit, confusion_from_counts, fit_arrays
from .models import ExpertRouting, LabelClass, Project, ReliabilityFit, Role, Vote

logger = logging.getLogger(__name__)

REFRESH_DELAY_S = 20  # a vote's effect on the reliabilities is at most this late (plus the fit's time)
REFRESH_BUDGET_S = 30.0  # a refresh's EM stops iterating after this long (the warm start converges well before)
_SCHEDULED = "reliability:scheduled:{}"

# COPY's binary format: an 11-byte signature, a 4-byte flags word and a 4-byte header extension length; each
# row a 2-byte field count and, per field, a 4-byte length and the value; a 2-byte -1 trailer.
_COPY_HEADER = 19
_COLUMNS = ("patch", "annotator", "label", "expert", "weight", "at")


CURRENT_TTL_S = 5.0  # how long a process reuses the fit it read before reading it again
_current: dict[int, tuple[float, Reliabilities | None]] = {}


def kept_current(project: Project) -> bool:
    """Whether the project reads its crowd's reliabilities online: it routes by value, or its adaptive
    redundancy weighs the votes by the model's prior (which needs a Dawid-Skene posterior on every vote)."""
    return project.expert_routing == ExpertRouting.VALUE or uses_model_prior(project)


def current(project: Project) -> Reliabilities | None:
    """The project's stored crowd fit as the per-vote consensus takes it, or None (no fit, or the project does
    not read it online, :func:`kept_current`: the only projects whose fit is kept current). Read at most once per
    CURRENT_TTL_S per process: on a busy project the vote path mostly finds it in memory, and it is at most that
    much older than the stored one (itself at most REFRESH_DELAY_S plus a fit behind the votes)."""
    if not kept_current(project) or project.consensus_method != "dawid_skene":
        return None
    now = time.monotonic()
    cached = _current.get(project.pk)
    if cached is not None and now - cached[0] < CURRENT_TTL_S:
        return cached[1]
    row = ReliabilityFit.objects.filter(project=project).values_list("labels", "priors", "students").first()
    found = None
    if row is not None and row[2]:
        labels, priors, students = row
        counts = {int(a): np.asarray(s["counts"], dtype=np.float64) for a, s in students.items()}
        found = Reliabilities(
            labels=tuple(labels),
            priors=np.asarray(priors, dtype=np.float64),
            confusion={a: confusion_from_counts(c) for a, c in counts.items()},
            pooled=confusion_from_counts(sum(counts.values())),
        )
    _current[project.pk] = (now, found)
    return found


def forget_current(project_id: int) -> None:
    """Drop this process's copy of the project's fit (a refresh in this process just stored a new one)."""
    _current.pop(project_id, None)


def note_votes(project: Project) -> None:
    """A vote of ``project`` changed: schedule a refresh of its reliabilities once the transaction commits,
    unless one is scheduled already. Only projects that read the reliabilities online (:func:`kept_current`)."""
    if not kept_current(project):
        return
    project_id = project.pk
    transaction.on_commit(lambda: _schedule(project_id))


def _schedule(project_id: int) -> None:
    from .tasks import refresh_reliabilities_task

    # The key lives longer than the delay: a worker that is busy for a while still gets one message, not many.
    if cache.add(_SCHEDULED.format(project_id), 1, timeout=REFRESH_DELAY_S + 10 * 60):
        refresh_reliabilities_task.apply_async((project_id,), countdown=REFRESH_DELAY_S)


def refresh_scheduled(project_id: int) -> None:
    """The scheduled refresh starts: votes from now on schedule the next one."""
    cache.delete(_SCHEDULED.format(project_id))


def refresh(project: Project, *, budget_s: float = REFRESH_BUDGET_S) -> ReliabilityFit | None:
    """Refit the project's crowd (Dawid-Skene on its active votes) and store it; None when another refresh
    of the project is running (it will store a fit as current as this one would)."""
    with _try_lock(project) as locked:
        if not locked:
            return None
        return _refresh(project, budget_s)


class _try_lock:
    """A session advisory lock on the project's refresh, taken without waiting."""

    def __init__(self, project: Project) -> None:
        digest = hashlib.blake2b(f"reliability:{project.pk}".encode(), digest_size=8).digest()
        self.key = int.from_bytes(digest, "big", signed=True)
        self.locked = False

    def __enter__(self) -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", [self.key])
            self.locked = bool(cursor.fetchone()[0])
        return self.locked

    def __exit__(self, *exc: Any) -> None:
        if self.locked:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [self.key])


def _refresh(project: Project, budget_s: float) -> ReliabilityFit:
    started = time.monotonic()
    labels = list(LabelClass.objects.filter(project=project).order_by("order").values_list("id", "name"))
    names = [name for _, name in labels]
    votes = vote_arrays(project, [pk for pk, _ in labels])
    previous = ReliabilityFit.objects.filter(project=project).first()
    # The budget bounds the EM, not the read (its time is the COPY's, linear in the votes).
    fit, annotators, last_vote, n_votes = _fit(votes, len(names), previous, names, time.monotonic() + budget_s)
    students = {
        str(int(a)): {
            "counts": np.round(fit.counts[w], 4).tolist(),
            "votes": int(n_votes[w]),
            "last_vote": datetime.fromtimestamp(float(last_vote[w]), tz=UTC).isoformat(),
        }
        for w, a in enumerate(annotators)
    }
    row, _ = ReliabilityFit.objects.update_or_create(
        project=project,
        defaults={
            "labels": names,
            "priors": np.round(fit.priors, 6).tolist(),
            "students": students,
            "n_votes": int(n_votes.sum()),
            "iterations": fit.iterations,
            "converged": fit.converged,
            "seconds": round(time.monotonic() - started, 3),
            "fitted_at": timezone.now(),
        },
    )
    forget_current(project.pk)
    return row


def _fit(
    votes: np.ndarray, k: int, previous: ReliabilityFit | None, names: list[str], deadline: float
) -> tuple[ArrayFit, np.ndarray, np.ndarray, np.ndarray]:
    """The array fit of these vote rows, and per crowd worker: annotator id, last vote time, vote count."""
    expert = votes[:, 3] > 0
    crowd = votes[~expert]
    items, item_index = np.unique(crowd[:, 0].astype(np.int64), return_inverse=True)
    annotators, worker_index = np.unique(crowd[:, 1].astype(np.int64), return_inverse=True)
    label_index = crowd[:, 2].astype(np.int64)
    truth = _expert_truth(votes[expert], items, k)
    warm = None
    warm_priors = None
    if previous is not None and previous.labels == names and previous.students:
        warm = np.full((len(annotators), k, k), 1.0 / k)
        for w, a in enumerate(annotators.tolist()):
            stored = previous.students.get(str(a))
            if stored is not None:
                warm[w] = confusion_from_counts(np.asarray(stored["counts"], dtype=np.float64))
        warm_priors = np.asarray(previous.priors, dtype=np.float64)
    fit = fit_arrays(
        item_index,
        worker_index,
        label_index,
        n_items=len(items),
        n_workers=len(annotators),
        n_classes=k,
        weight=crowd[:, 4],
        truth=truth,
        warm_confusion=warm,
        warm_priors=warm_priors,
        deadline=deadline,
    )
    last_vote = np.zeros(len(annotators))
    np.maximum.at(last_vote, worker_index, crowd[:, 5])
    n_votes = np.bincount(worker_index, minlength=len(annotators))
    return fit, annotators, last_vote, n_votes


def _expert_truth(expert_votes: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Each crowd item's untied expert decision (weighted majority of its expert votes) as a class index, or -1."""
    truth = np.full(len(items), -1, dtype=np.int64)
    if not len(expert_votes) or not len(items):
        return truth
    at, inside = find_sorted(items, expert_votes[:, 0].astype(np.int64))
    scores = np.zeros((len(items), k))
    np.add.at(scores, (at[inside], expert_votes[inside, 2].astype(np.int64)), expert_votes[inside, 4])
    best = scores.max(axis=1)
    top = scores.argmax(axis=1)
    tied = (np.isclose(scores, best[:, None], rtol=1e-9, atol=1e-12) & (scores > 0)).sum(axis=1) > 1
    decided = (best > 0) & ~tied
    truth[decided] = top[decided]
    return truth


def vote_arrays(project: Project, label_ids: list[int]) -> np.ndarray:
    """(patch, annotator, label index, is expert, weight, created_at epoch) of every counted active vote of the
    project, as one (votes, 6) float64 array (ids below 2**53 are exact), read with one binary COPY.

    The label index is its position in ``label_ids`` (the project's label order); the weight is the vote's
    weight in consensus (annotations.consensus.vote_weight), votes of weight 0 left out."""
    suggestion = float(project.suggestion_weight)
    weight = sql.SQL("CASE WHEN v.provenance = ANY({p}) THEN {w} ELSE 1.0 END").format(
        p=sql.Literal(sorted(SUGGESTION_PROVENANCES)), w=sql.Literal(suggestion)
    )
    query = sql.SQL(
        "COPY (SELECT v.patch_id::double precision, v.annotator_id::double precision, "
        "(array_position({labels}::bigint[], v.label_id) - 1)::double precision, "
        "(v.role <> {crowd})::int::double precision, ({weight})::double precision, "
        "extract(epoch FROM v.created_at)::double precision "
        "FROM {vote} v WHERE v.project_id = {project} AND v.is_active AND ({weight}) > 0) "
        "TO STDOUT (FORMAT binary)"
    ).format(
        labels=sql.Literal([int(x) for x in label_ids]),
        crowd=sql.Literal(str(Role.CROWD)),
        weight=weight,
        vote=sql.Identifier(Vote._meta.db_table),
        project=sql.Literal(int(project.pk)),
    )
    buffer = bytearray()
    with connection.cursor() as cursor, cursor.cursor.copy(query) as copy:
        for block in copy:
            buffer += block
    return _parse_copy(buffer, len(_COLUMNS))


def _parse_copy(buffer: bytearray, n: int) -> np.ndarray:
    """A binary COPY of ``n`` non-NULL float8 columns as a (rows, n) float64 array."""
    fields = [("n", ">i2")]
    for j in range(n):
        fields += [(f"len{j}", ">i4"), (f"c{j}", ">f8")]
    body = memoryview(buffer)[_COPY_HEADER : len(buffer) - 2]
    if not len(body):
        return np.zeros((0, n))
    rows = np.frombuffer(body, dtype=np.dtype(fields))
    if (rows["n"] != n).any() or any((rows[f"len{j}"] != 8).any() for j in range(n)):
        raise ValueError("Unexpected COPY row layout while reading the votes.")  # a NULL (a label not listed)
    return np.column_stack([rows[f"c{j}"].astype(np.float64) for j in range(n)])
