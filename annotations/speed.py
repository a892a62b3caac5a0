"""Labelling speed per annotator and per mode (how each vote was made), and each mode's share in the labels
a round trained on: the dashboard's "is the strip, the lasso, 'more like this' worth it?" figures.

Each is one aggregate query in PostgreSQL, never a row per vote in Python: a project has millions of votes.

**Time per vote.** A vote's time is the gap since the same annotator's previous vote in the project
(``LAG`` in the order of the ``(project, annotator, created_at)`` index, which the scan reads without a
sort), so the seconds spent choosing the patches of a bulk action, a strip or a page of neighbours land
on the first vote of the action and its other votes cost nothing, which is what makes those modes fast.
A gap longer than :data:`IDLE_SECONDS` is a break, not work: such a vote (the first after a break, or an
annotator's first) counts the time its client measured (``time_spent_ms``, the single-vote annotator
sends it), capped at the same bound. Undone votes are not labels and are left out; imports (label files, QuPath
regions) are not labelling in the platform and have no speed (they count in the training share).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db import connection
from django.utils import timezone

from .models import Consensus, Project, Vote

IDLE_SECONDS = 300
# Modes with a speed: everything but the imports.
IMPORTED = (Vote.Provenance.LABEL_IMPORT.value, Vote.Provenance.REGION_IMPORT.value)
# The consensus statuses a round trains on (learner.round_stages.FINAL_LABEL_STATUSES).
TRAINED_STATUSES = (Consensus.Status.AGREED.value, Consensus.Status.EXPERT.value)
# Rates over weeks move slowly, and at millions of votes the window query reads every vote of the period
# (bench_provenance.py): computed at most every two minutes per project and period.
CACHE_SECONDS = 120
MAX_DAYS = 366

_SPEED_SQL = f"""
WITH timed AS (
    SELECT annotator_id, provenance, time_spent_ms,
           EXTRACT(EPOCH FROM created_at - LAG(created_at) OVER (PARTITION BY annotator_id ORDER BY created_at)) AS gap
    FROM {Vote._meta.db_table}
    WHERE project_id = %(project)s AND created_at >= %(since)s AND retracted_at IS NULL
)
SELECT annotator_id, provenance, COUNT(*),
       SUM(CASE WHEN gap IS NOT NULL AND gap <= %(idle)s THEN gap
                ELSE LEAST(time_spent_ms, %(idle)s * 1000) / 1000.0 END)
FROM timed
WHERE provenance <> ALL(%(imported)s)
GROUP BY annotator_id, provenance
ORDER BY annotator_id, provenance
"""

_TRAINED_MODES_SQL = f"""
SELECT v.provenance, COUNT(*) FROM {Vote._meta.db_table} v
JOIN {Consensus._meta.db_table} c ON c.patch_id = v.patch_id
WHERE c.project_id = %(project)s AND c.status = ANY(%(statuses)s) AND c.label_id IS NOT NULL AND v.is_active
GROUP BY v.provenance
"""


def _per_hour(labels: int, seconds: float) -> float | None:
    return labels * 3600.0 / seconds if seconds > 0 else None


def _row(labels: int, seconds: float) -> dict[str, Any]:
    return {"labels": labels, "seconds": round(seconds, 3), "per_hour": _per_hour(labels, seconds)}


def labelling_speed(project: Project, since: datetime) -> dict[str, Any]:
    """Labels, seconds worked and labels per hour since ``since``: per mode (all annotators) and per
    annotator and mode, with each annotator's total."""
    with connection.cursor() as cursor:
        cursor.execute(
            _SPEED_SQL, {"project": project.pk, "since": since, "idle": IDLE_SECONDS, "imported": list(IMPORTED)}
        )
        rows = [(int(a), str(p), int(n), float(s or 0.0)) for a, p, n, s in cursor.fetchall()]
    names = dict(get_user_model().objects.filter(pk__in={a for a, *_ in rows}).values_list("pk", "username"))
    modes: dict[str, list[float]] = {}
    people: dict[int, dict[str, Any]] = {}
    for annotator, mode, n, seconds in rows:
        total = modes.setdefault(mode, [0, 0.0])
        total[0] += n
        total[1] += seconds
        person = people.setdefault(
            annotator, {"username": names.get(annotator, str(annotator)), "modes": {}, "labels": 0, "seconds": 0.0}
        )
        person["modes"][mode] = _row(n, seconds)
        person["labels"] += n
        person["seconds"] += seconds
    annotators = [
        {**person, **_row(person["labels"], person["seconds"])}
        for person in sorted(people.values(), key=lambda p: p["username"])
    ]
    return {
        "since": since.isoformat(),
        "idle_seconds": IDLE_SECONDS,
        "modes": {mode: _row(int(n), s) for mode, (n, s) in sorted(modes.items())},
        "annotators": annotators,
    }


def cached_labelling_speed(project: Project, days: int) -> dict[str, Any]:
    """:func:`labelling_speed` over the last ``days`` days, shared by every server process for a few seconds
    (a window sort over the project's votes at every dashboard refresh is not needed)."""
    key = f"histoloop:speed:{project.pk}:{project.created_at.timestamp():.6f}:{days}"
    value = cache.get(key)
    if value is None:
        value = labelling_speed(project, timezone.now() - timedelta(days=days))
        value["days"] = days
        cache.set(key, value, CACHE_SECONDS)
    return value


def trained_label_modes(project: Project) -> dict[str, int]:
    """How the active votes behind the project's trainable labels (final consensus) were made: votes per
    mode. A round records it at its snapshot (``metrics["label_provenance"]``), as votes cast later must not
    change what an earlier model is said to have learnt from."""
    with connection.cursor() as cursor:
        cursor.execute(_TRAINED_MODES_SQL, {"project": project.pk, "statuses": list(TRAINED_STATUSES)})
        return {str(mode): int(n) for mode, n in cursor.fetchall()}


def shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {mode: n / total for mode, n in sorted(counts.items())} if total else {}
